"""Fuzz target (c): the delta reader (vdisk/delta.py) and what reads deltas
(verify, restore, merge).

One input is one delta file.  It is verified (:func:`vdisk.verify`: the
preamble, the HDF5 structure, the attributes checksum, the extents, every
block row's CRC), opened with :class:`vdisk.delta.DeltaFile` and read row by
row, and a full backup that verifies is restored (raw or vdisk) and merged.
Only VdiskError may escape.

Two threat models, two one-input functions:

* :func:`one_input` (target ``delta``): the file as given.  Byte damage to
  the HDF5 structure must be caught by the preamble's CRC before libhdf5
  parses anything; damage to the block rows (raw, gzip or lzf chunks) by
  the row CRCs and the filters.  The mutator also makes *well-formed*
  hostile deltas: it edits a delta through h5py (attributes, extents,
  dataset shapes and types), recomputes the attributes checksum and
  reseals the preamble, so the checks behind the checksums see them.
  It also makes *structure* mutations, what only a crafted delta holds
  (:func:`_structure_edit`): a dataset with external storage, replaced by
  an external or soft link or a virtual dataset, extra objects (groups,
  named datatypes, links, nested), attributes of other types (object and
  region references), filters vdisk never writes, huge declared shapes,
  chunks never written; the preamble is resealed over them with the
  storage of ``data`` as its skipped ranges.  The links, external files
  and virtual sources name a *bait* file in the scratch directory whose
  access time the harness resets before each input: if reading the delta
  opened the bait, that is a finding (:class:`BaitTouched`), whatever
  error vdisk then raised.
* :func:`one_input_crafted` (target ``delta-crafted``): byte damage to the
  HDF5 structure, then the preamble resealed over it, so libhdf5 parses
  damaged metadata: a crafted file.  docs/BACKUP_FORMAT.md says libhdf5 is
  not hardened against that; this target measures it (its findings are
  kept in tests/fuzz_regressions/delta-crafted/ and replayed in a child
  process with a time limit).  What it found so far, a libhdf5 loop on a
  global heap object of size 0, the reader now refuses first
  (vdisk.delta.check_global_heaps).

Input encoding::

    byte 0      flags: RESTORE_VDISK (restore to a vdisk image, not raw);
                for one_input_crafted also SEAL_ATTRS (recompute the
                attributes checksum through h5py before resealing)
    bytes 1..   the delta file
"""
from __future__ import annotations

import json
import os
import random
import struct
import sys
import tempfile
import time

import crc32c as _crc32c
import numpy as np

import vdisk
from vdisk import delta as D

from vdisk_testkit.fuzz.common import INTERESTING, KiB, MiB, guard, havoc, put_int, remove, scratch_path, write_sparse

NAME = "delta"
SEAL_ATTRS = 1 << 1
RESTORE_VDISK = 1 << 2
MAX_RESTORE = 64 * MiB


# ---------------------------------------------------------------------------- sealing
def reseal(raw: bytearray) -> None:
    """Recompute the preamble over raw as it is: its own CRC, the file size and
    the CRC of the bytes outside the skipped ranges (kept as the preamble
    lists them when they make sense, else none)."""
    if len(raw) < D.PREAMBLE_SIZE or raw[:8] != D.PREAMBLE_MAGIC:
        return
    body = bytes(raw[:D.PREAMBLE_SIZE - 4])
    magic, version, nskip, _size, _crc, _ = D.PREAMBLE_HEAD.unpack_from(body)
    skips = []
    if nskip <= D.MAX_SKIP_RANGES:
        skips = [D.PREAMBLE_SKIP.unpack_from(body, D.PREAMBLE_HEAD.size + i * D.PREAMBLE_SKIP.size)
                 for i in range(nskip)]
        pos = D.PREAMBLE_SIZE
        for off, n in skips:
            if off < pos or n == 0 or off + n > len(raw):
                skips = []
                break
            pos = off + n
    crc = 0
    for lo, hi in D._complement(skips, D.PREAMBLE_SIZE, len(raw)):
        crc = _crc32c.crc32c(bytes(raw[lo:hi]), crc)
    head = D.PREAMBLE_HEAD.pack(magic, version, len(skips), len(raw), crc, 0)
    head += b"".join(D.PREAMBLE_SKIP.pack(o, n) for o, n in skips)
    body = head.ljust(D.PREAMBLE_SIZE - 4, b"\0")
    raw[:D.PREAMBLE_SIZE] = body + struct.pack("<I", _crc32c.crc32c(body))


def seal_attrs(path: str) -> None:
    """Recompute the attributes checksum of the file at path (best effort:
    if h5py cannot read what it needs, the file stays as it is)."""
    import h5py
    fd = os.open(path, os.O_RDONLY)
    try:                    # h5py would loop forever on a bad global heap (the reader refuses those first)
        D.check_global_heaps(fd, os.fstat(fd).st_size, [], path)
    except vdisk.VdiskError:
        return
    finally:
        os.close(fd)
    try:
        with h5py.File(path, "r+") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            attrs = {k: (v if isinstance(v, str) else int(v)) for k, v in attrs.items()}
            arrays = [np.asarray(f[n][()]) for n in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS)]
            f.attrs["checksum"] = np.uint32(D.attrs_checksum(attrs, *arrays))
    except Exception:       # noqa: BLE001 - the harness's own edit; the reader gets the file either way
        pass


# ---------------------------------------------------------------------------- the bait
class BaitTouched(Exception):
    """Reading a delta opened a file outside it (the bait the structure mutations name)."""


BAIT = b"BAIT:not-part-of-any-delta\n" * 160
_bait_works: list[bool] = []


def bait_path() -> str:
    """A file outside every delta, made once per scratch directory; the
    structure mutations point external storage, links and virtual sources at it."""
    p = scratch_path("bait")
    if not os.path.exists(p):
        with open(p, "wb") as f:
            f.write(BAIT)
    return p


def arm_bait() -> bool:
    """Set the bait's access time far in the past (relatime then updates it on
    the next read); False where the file system does not keep access times."""
    p = bait_path()
    os.utime(p, (1, time.time()))
    if not _bait_works:                      # once: does a read show?
        with open(p, "rb") as f:
            f.read(1)
        _bait_works.append(os.stat(p).st_atime > 1)
        os.utime(p, (1, time.time()))
    return _bait_works[0]


def bait_touched() -> bool:
    return os.stat(bait_path()).st_atime > 1


# ---------------------------------------------------------------------------- one input
def exercise(path: str, restore_fmt: str) -> None:
    armed = arm_bait()
    try:
        _exercise(path, restore_fmt)
    finally:
        if armed and bait_touched():
            raise BaitTouched(f"reading {path} opened {bait_path()}, a file outside the delta")


def _exercise(path: str, restore_fmt: str) -> None:
    summary = guard(vdisk.verify, path)
    f = guard(D.DeltaFile.open, path)
    if f is not None:
        try:
            guard(f.summary)
            if f.rows:
                buf = np.empty((min(f.rows, 4), f.block_size), np.uint8)
                guard(f.read_rows, f.rows - len(buf), len(buf), buf)
                guard(f.block_of_row, f.rows - 1)
        finally:
            f.close()
    if summary is not None and summary["full"] and summary["virtual_size"] <= MAX_RESTORE:
        target = scratch_path("restored." + restore_fmt)
        merged = scratch_path("merged.h5")
        try:
            guard(vdisk.restore, [path], target, format="raw" if restore_fmt == "raw" else "vdisk",
                  overwrite=True)
            guard(vdisk.merge, [path], merged)
        finally:
            remove(target, target + ".vdisk-chain", merged)


def one_input(data: bytes) -> None:
    """The damage model: the file exactly as given."""
    flags = data[0] if data else 0
    path = scratch_path("fuzz.h5")
    write_sparse(path, data[1:])
    try:
        exercise(path, "vdisk" if flags & RESTORE_VDISK else "raw")
    finally:
        remove(path)


def one_input_crafted(data: bytes) -> None:
    """The crafted model: the preamble resealed over whatever the file holds."""
    flags = data[0] if data else 0
    raw = bytearray(data[1:])
    reseal(raw)
    path = scratch_path("fuzz.h5")
    write_sparse(path, raw)
    try:
        if flags & SEAL_ATTRS:
            seal_attrs(path)
            with open(path, "rb") as fh:
                raw = bytearray(fh.read())
            reseal(raw)
            write_sparse(path, raw)
        exercise(path, "vdisk" if flags & RESTORE_VDISK else "raw")
    finally:
        remove(path)


# ---------------------------------------------------------------------------- seeds
def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def build_seed_files(directory: str) -> dict[str, bytes]:
    """Real deltas of a small disk: full (uncompressed), incrementals (gzip,
    lzf) with zero extents and a resize, a full of an empty disk."""
    out = {}
    bs = 4 * KiB
    with vdisk.create(os.path.join(directory, "src.img"), 64 * KiB, block_size=bs) as d:
        d.pwrite(_pattern(1, 5000), 0)
        d.pwrite(_pattern(2, bs), 9 * bs)
        r = vdisk.backup(d, os.path.join(directory, "full.h5"), compression=None)
        d.pwrite(_pattern(3, 100), 40000)
        d.discard(0, bs)
        r = vdisk.backup(d, os.path.join(directory, "inc-gzip.h5"), since=r.change_id, compression="gzip")
        d.resize(80 * KiB + 512)
        d.pwrite(_pattern(4, 600), 80 * KiB - 100)
        vdisk.backup(d, os.path.join(directory, "inc-lzf.h5"), since=r.change_id, compression="lzf")
        vdisk.backup(d, os.path.join(directory, "full-gzip.h5"), compression="gzip")
    with vdisk.create(os.path.join(directory, "empty.img"), 8 * KiB, block_size=bs) as d:
        vdisk.backup(d, os.path.join(directory, "empty.h5"), compression=None)
    for name in ("full", "inc-gzip", "inc-lzf", "full-gzip", "empty"):
        with open(os.path.join(directory, name + ".h5"), "rb") as f:
            out[name] = f.read()
    return out


def build_seeds(directory: str | None = None) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        files = build_seed_files(tmp)
    seeds = {}
    for name, raw in files.items():
        seeds[name] = bytes([RESTORE_VDISK if "gzip" in name else 0]) + raw
    return seeds


# ---------------------------------------------------------------------------- a structure-aware mutator
def _sealed_ok(raw: bytes) -> bool:
    """The preamble checks out: h5py may safely parse this file."""
    try:
        size, meta_crc, skips = D.unpack_preamble(raw[:D.PREAMBLE_SIZE], "x")
    except vdisk.VdiskError:
        return False
    if size != len(raw):
        return False
    crc = 0
    for lo, hi in D._complement(skips, D.PREAMBLE_SIZE, len(raw)):
        crc = _crc32c.crc32c(raw[lo:hi], crc)
    return crc == meta_crc


def _declares_huge(f) -> bool:
    """A dataset of the delta declares more than 1 MiB (extents, checksums) or
    16 MiB (rows): the mutator does not read it (it would read fill values,
    the harness's memory, not vdisk's)."""
    for name in D.DATASETS:
        try:
            ds = f[name]
            if ds.size * ds.dtype.itemsize > (16 << 20 if name == D.DS_DATA else 1 << 20):
                return True
        except Exception:       # noqa: BLE001 - missing, a link h5py cannot follow, not a dataset
            pass
    return False


def _semantic_edit(raw: bytes, rng: random.Random) -> bytes | None:
    """Edit a well-formed delta through h5py (an attribute, an extent, a
    dataset's shape), then reseal it: what a crafted delta can say."""
    import h5py
    path = scratch_path("mutate.h5")
    write_sparse(path, raw)
    try:
        with h5py.File(path, "r+") as f:
            if _declares_huge(f):
                return None                                      # a huge one: not read here
            kind = rng.randrange(5)
            if kind <= 1:
                name = rng.choice(list(D.ATTRS))
                v = f.attrs.get(name)
                if isinstance(v, str) or isinstance(v, bytes):
                    s = v.decode() if isinstance(v, bytes) else v
                    choices = [s[:-1], s + "0", s.upper(), "*", "", s.replace("/", "//"), s + "/1",
                               s[:-1] + str(rng.randrange(10)), " " + s, "0" * len(s)]
                    f.attrs[name] = rng.choice(choices)
                elif v is not None:
                    dt = D.ATTRS[name] if not isinstance(D.ATTRS[name], str) else np.dtype("<u8")
                    val = rng.choice((int(v) + rng.choice((-1, 1, 512, -512, 4096)), 0, rng.choice(INTERESTING)))
                    f.attrs[name] = np.array(val & ((1 << (8 * dt.itemsize)) - 1), dtype=dt)[()]
                r = rng.random()
                if r < 0.08:
                    del f.attrs[name]
                elif r < 0.16:                       # another type
                    f.attrs[name] = rng.choice(("4096", 4096.0, np.array([1, 2], "<u8"), np.int8(-1), b"\xff",
                                                np.uint64(1 << 63), "\u00e9" * 40))
            elif kind <= 3:
                name = rng.choice((D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS))
                a = f[name][()]
                if len(a):
                    i = rng.randrange(len(a))
                    big = a.dtype.itemsize * 8
                    a[i] = rng.choice((int(a[i]) + rng.choice((-1, 1, 4096, -4096)), 0,
                                       rng.choice(INTERESTING) & ((1 << big) - 1), int(a[0]), int(a[-1])))
                    a[i] = a[i]
                    f[name][...] = a
            else:
                name = rng.choice((D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS, D.DS_CRC))
                a = f[name][()]
                del f[name]
                r = rng.random()
                if r < 0.6:                          # another length
                    n = max(0, len(a) + rng.choice((-1, 1, 2)))
                    b = np.resize(a, n) if len(a) else np.zeros(n, a.dtype)
                    f.create_dataset(name, data=b)
                elif r < 0.8:                        # another dtype or rank
                    b = rng.choice((a.astype("<f8"), a.astype(">u8"), a.reshape(-1, 1), a.astype("<i4")))
                    f.create_dataset(name, data=b)
                elif r < 0.9:                        # chunked, or compressed
                    f.create_dataset(name, data=a, chunks=(max(1, len(a)),) if len(a) else None,
                                     compression="gzip" if len(a) else None)
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            attrs = {k: (v if isinstance(v, str) else int(v)) for k, v in attrs.items()}
            if rng.random() < 0.9 and all(n in f for n in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS)):
                arrays = [np.asarray(f[n][()]) for n in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS)]
                f.attrs["checksum"] = np.uint32(D.attrs_checksum(attrs, *arrays))
        with open(path, "rb") as fh:
            out = bytearray(fh.read())
        reseal(out)
        return bytes(out)
    except Exception:       # noqa: BLE001 - an edit h5py refuses: fall back to byte damage
        return None
    finally:
        remove(path)


def _data_storage(path: str) -> list[tuple[int, int]]:
    """The storage of 'data' as the preamble lists it (none where it is not a plain dataset)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if f.id.links.get_info(D.DS_DATA.encode()).type != h5py.h5l.TYPE_HARD:
                return []
            ds = f[D.DS_DATA]
            if not isinstance(ds, h5py.Dataset) or ds.is_virtual or ds.external:
                return []
            if ds.chunks is not None:
                runs = D._chunk_ranges(ds)
                return runs if len(runs) <= D.MAX_SKIP_RANGES else []
            off, n = ds.id.get_offset(), ds.id.get_storage_size()
            return [(off, n)] if off is not None and n else []
    except Exception:       # noqa: BLE001 - what h5py cannot tell: no skipped range
        return []


def _checksum_of_zeros(attrs: dict, n: int) -> int:
    """attrs_checksum(attrs, zeros(n), zeros(n), zeros(n)) without the arrays."""
    canon = {k: (v if isinstance(v, str) else int(v)) for k, v in attrs.items() if k != "checksum"}
    crc = _crc32c.crc32c(json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    zero, left = bytes(1 << 20), 17 * n
    while left:
        crc = _crc32c.crc32c(zero[:min(left, len(zero))], crc)
        left -= min(left, len(zero))
    return crc


def seal_path(path: str, arrays=None) -> None:
    """Recompute the attributes checksum (over arrays: the extents, or an int n
    for n zeros each; by default the extents the file holds) and the preamble,
    its skipped ranges the storage of 'data'."""
    import h5py
    try:
        with h5py.File(path, "r+") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            attrs = {k: (v if isinstance(v, str) else int(v)) for k, v in attrs.items()
                     if isinstance(v, (str, int, np.integer))}
            if arrays is None:
                arrays = [np.asarray(f[n][()]) for n in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS)]
            f.attrs["checksum"] = np.uint32(_checksum_of_zeros(attrs, arrays) if isinstance(arrays, int)
                                            else D.attrs_checksum(attrs, *arrays))
    except Exception:       # noqa: BLE001 - best effort, as an attacker's tool
        pass
    skips = _data_storage(path)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, D.pack_preamble(size, D.metadata_crc(fd, size, skips, path), skips), 0)
    finally:
        os.close(fd)


MAX_DECLARED = 1 << 24          # huge declared shapes, kept to what a regression may cost a CI run
UNKNOWN_FILTERS = (2, 3, 4, 5, 6, 307, 32001, 32004, 32008, 32015, 40000)   # shuffle, fletcher32, szip, nbit,
#                                                    scaleoffset, bzip2, blosc, lz4, bitshuffle, zstd, unassigned


def _replace(f, name, **kw):
    old = f[name]
    kw.setdefault("shape", old.shape)
    kw.setdefault("dtype", old.dtype)
    del f[name]
    return f.create_dataset(name, **kw)


def _structure_edit(raw: bytes, rng: random.Random) -> bytes | None:
    """What only a crafted delta holds: other files named, other objects,
    other attribute types, filters, huge declared shapes, chunks never
    written (see the module docstring).  None if h5py refused the edit."""
    import h5py
    path = scratch_path("mutate.h5")
    write_sparse(path, raw)
    bait = bait_path()
    names = list(D.DATASETS)
    try:
        with h5py.File(path, "r+") as f:
            if _declares_huge(f):
                return None                                      # a huge one already: no more reading it
            arrays = [np.asarray(f[n][()]) for n in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS)]
            name = rng.choice(names)
            kind = rng.randrange(9)
            if kind == 0:                                        # external storage
                ds = f[name]
                nbytes = int(np.prod(ds.shape)) * ds.dtype.itemsize
                _replace(f, name, external=[(bait, rng.choice((0, 8, len(BAIT) // 2)), max(nbytes, 1))])
            elif kind == 1:                                      # an external link, in place or added
                target = name if rng.random() < 0.7 else rng.choice(("extra", "g/x"))
                if target in f:
                    del f[target]
                f[target] = h5py.ExternalLink(bait, "/" + name)
            elif kind == 2:                                      # a soft link, in place, added or dangling
                target = name if rng.random() < 0.7 else "extra"
                if target in f:
                    del f[target]
                f[target] = h5py.SoftLink(rng.choice(["/" + n for n in names] + ["/nowhere", "/" + target]))
            elif kind == 3:                                      # a virtual dataset over the bait
                ds = f[name]
                shape, dt = ds.shape, ds.dtype
                lay = h5py.VirtualLayout(shape=shape, dtype=dt)
                lay[...] = h5py.VirtualSource(bait, "/x", shape=shape, dtype=dt)
                del f[name]
                f.create_virtual_dataset(name, lay, fillvalue=0)
            elif kind == 4:                                      # huge declared shapes, nothing written
                n = 1 << rng.randrange(10, MAX_DECLARED.bit_length())
                chunked = rng.random() < 0.5
                for ext in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS) if rng.random() < 0.7 else (name,):
                    shape = (n,) if f[ext].ndim == 1 else (n, f[ext].shape[1])
                    if chunked:
                        _replace(f, ext, shape=shape, chunks=(min(n, 1 << 12),) + shape[1:2])
                    else:
                        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_LATE)
                        _replace(f, ext, shape=shape, dcpl=dcpl)
                if rng.random() < 0.7:
                    f.attrs["virtual_size"] = np.uint64(n * int(f.attrs["block_size"]))
                if rng.random() < 0.5:
                    arrays = n                                   # the checksum of n zero extents
            elif kind == 5:                                      # filters vdisk never writes
                ds = f[D.DS_DATA]
                data = ds[()]
                chunks = ds.chunks or (max(1, min(16, len(data))), data.shape[1])
                opts = rng.choice(({"shuffle": True, "compression": "gzip"}, {"fletcher32": True},
                                   {"scaleoffset": 0}, {"compression": "gzip", "compression_opts": 9},
                                   {"compression": "lzf"}, {"compression": rng.choice(UNKNOWN_FILTERS),
                                                            "allow_unknown_filter": True}))
                if len(data):
                    _replace(f, D.DS_DATA, data=data, chunks=chunks, **opts)
            elif kind == 6:                                      # chunked, no chunk written
                ds = f[name]
                if ds.size:
                    _replace(f, name, chunks=(max(1, min(16, ds.shape[0])),) + ds.shape[1:],
                             fillvalue=rng.choice((0, 1, 255)))
            elif kind == 7:                                      # extra objects
                what = rng.randrange(6)
                if what == 0:
                    f.create_group("g")
                elif what == 1:
                    f.create_group("g/h")["x"] = h5py.ExternalLink(bait, "/x")
                elif what == 2:
                    f["t"] = np.dtype("<u8")
                elif what == 3:
                    f["more"] = np.arange(4)
                elif what == 4:
                    f["alias"] = f[name]
                else:
                    f[name].attrs["note"] = rng.choice(("x", np.uint8(1)))
            else:                                                # attributes of other types
                attr = rng.choice(list(D.ATTRS) + ["extra"])
                value = rng.choice((lambda: f[D.DS_DATA].ref, lambda: f[D.DS_DATA].regionref[0:1],
                                    lambda: np.float64(1.0), lambda: np.arange(3, dtype="<u8"),
                                    lambda: np.array((1, 2), dtype=[("a", "<u4"), ("b", "<u4")])))
                f.attrs[attr] = value()
        seal_path(path, arrays)
        with open(path, "rb") as fh:
            return fh.read()
    except Exception:       # noqa: BLE001 - an edit h5py refuses: fall back to byte damage
        return None
    finally:
        remove(path)


def mutate(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 2:
        return havoc(data, rng)
    flags, raw = data[0], data[1:]
    what = rng.randrange(10)
    if what <= 2 and _sealed_ok(raw):
        out = _semantic_edit(raw, rng)
        if out is not None:
            return bytes([flags]) + out
    if what in (3, 4) and _sealed_ok(raw):
        out = _structure_edit(raw, rng)
        if out is not None:
            return bytes([flags]) + out
    if what == 5:
        flags ^= rng.choice((SEAL_ATTRS, RESTORE_VDISK))
        return bytes([flags]) + raw
    if what == 6:                                    # the preamble's fields
        buf = bytearray(raw)
        at = rng.choice((8, 12, 16, 24, 28, 32, 40, 48, 56))
        put_int(buf, at, rng.choice((4, 8)), rng.choice((0, 1, len(raw), D.PREAMBLE_SIZE, rng.randrange(len(raw) + 1),
                                                        rng.choice(INTERESTING))))
        return bytes([flags]) + bytes(buf)
    lo = D.PREAMBLE_SIZE if rng.random() < 0.8 else 0
    return bytes([flags]) + havoc(raw, rng, lo)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    from vdisk_testkit.fuzz.common import mixed_mutator
    return mixed_mutator(mutate)(data, max_size, seed)


if __name__ == "__main__":
    from vdisk_testkit.fuzz.common import atheris_main
    crafted = "--crafted" in sys.argv
    if crafted:
        sys.argv.remove("--crafted")
    atheris_main(one_input_crafted if crafted else one_input, custom_mutator)
