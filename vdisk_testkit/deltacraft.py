"""Crafting deltas as an attacker would (docs/BACKUP_FORMAT.md): a real delta
edited with h5py, its attributes checksum recomputed and its preamble resealed,
so that only vdisk.delta.check_structure stands between it and libhdf5.
Used by tests/test_delta_hostile.py, in the test process and in its children."""
from __future__ import annotations

import importlib
import os

import h5py
import numpy as np

import vdisk
from vdisk_testkit.helpers import pattern

D = importlib.import_module("vdisk.delta")
BS = 4096
KiB = 1 << 10


def make_delta(directory, name="d.h5", compression=None, size=64 * KiB) -> str:
    """A real full delta of a small disk: 2 data extents and 3 data rows."""
    path = os.path.join(directory, name)
    img = path + ".img"
    with vdisk.create(img, size, block_size=BS) as d:
        d.pwrite(pattern(1, 5000), 0)
        d.pwrite(pattern(2, BS), 9 * BS)
        vdisk.backup(d, path, compression=compression)
    os.unlink(img)
    return path


def extents_of(path):
    with h5py.File(path, "r") as f:
        return [f[n][()] for n in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS)]


def reseal(path, arrays=None) -> None:
    """What an attacker does after editing: the attributes checksum (over the
    given extents, by default the ones the file holds), the preamble's
    skipped ranges (the storage of 'data'), its CRCs."""
    with h5py.File(path, "r+") as f:
        attrs = {k: (v if isinstance(v, str) else int(v)) for k, v in f.attrs.items()
                 if isinstance(v, (str, int, np.integer))}
        if arrays is None:
            arrays = [np.asarray(f[n][()]) for n in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS)]
        f.attrs["checksum"] = np.uint32(D.attrs_checksum(attrs, *arrays))
    skips = []
    try:
        with h5py.File(path, "r") as f:
            ds = f[D.DS_DATA]
            if ds.chunks is not None:
                skips = D._chunk_ranges(ds)
            elif ds.id.get_offset() is not None and ds.id.get_storage_size():
                skips = [(ds.id.get_offset(), ds.id.get_storage_size())]
    except (OSError, KeyError):
        pass
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, D.pack_preamble(size, D.metadata_crc(fd, size, skips, path), skips), 0)
    finally:
        os.close(fd)


def replace(f, name, **kwargs):
    """Replace dataset name by one made with create_dataset(**kwargs) (same shape and dtype by default)."""
    old = f[name]
    data = kwargs.pop("data", False)
    data = old[()] if data is None else (None if data is False else data)
    kwargs.setdefault("shape", old.shape if data is None else data.shape)
    kwargs.setdefault("dtype", old.dtype)
    del f[name]
    return f.create_dataset(name, data=data, **kwargs)
