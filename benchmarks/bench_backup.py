"""Backup and restore workloads (issue 5), each beside its baseline in the same run.

* An incremental backup (compression none) of N changed extents of the
  filled 256 MiB image, ``vdisk.backup(disk, dest, since=base)``: the
  temporary snapshot, the change query, the copy, the checksums, the
  HDF5 file, fsync and rename.  Baseline: the same extents copied out of a
  raw file holding the same data into a new plain file with
  os.pread/os.write, then fsync.
* A restore of a full, uncompressed delta of the whole image into a new
  raw file and into a new vdisk image (every block checksum checked, the
  file built under a temporary name, renamed, the sidecar written).
  Baseline: writing the same bytes from memory to a new raw file with
  os.write, then fsync.

Every side ends durable (fsync), in every round; each round writes a new
file (the previous one is removed in the untimed setup).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import vdisk
from conftest import REGION, SEED, SEQ_IO, remove, rounds, tag

BS = 64 * 1024
N_EXTENTS = 512


@pytest.fixture(scope="module")
def changed(filled_vdisk, filled_raw, payload):
    """N changed extents (1 to 3 blocks each, apart from each other) written to
    the image after a checkpoint, and the same bytes written to the raw file."""
    d = filled_vdisk
    rng = np.random.default_rng(SEED + 7)
    slots = REGION // BS // 4                      # one extent per 4-block slot, at most 3 blocks long
    starts = np.sort(rng.choice(slots, min(N_EXTENTS, slots), replace=False)) * 4
    lengths = rng.integers(1, 4, len(starts))
    base = d.checkpoint()
    extents = []
    for i, (b, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        off, length = b * BS, n * BS
        data = payload[(i * 4096) % len(payload):][:length].ljust(length, b"\x01")
        d.pwrite(data, off)
        os.pwrite(filled_raw, data, off)
        extents.append((off, length))
    d.flush()
    os.fsync(filled_raw)
    assert [(o, n) for o, n in d.changes_since(base)] == extents
    return base, extents


def test_backup_incremental_vdisk(benchmark, workdir, filled_vdisk, changed):
    d = filled_vdisk
    base, extents = changed
    dest = os.path.join(workdir, "incr.h5")
    nbytes = sum(n for _, n in extents)
    tag(benchmark, "backup_incremental", "vdisk", nbytes=nbytes, ops=len(extents))
    benchmark.pedantic(lambda: vdisk.backup(d, dest, since=base, compression=None),
                       setup=lambda: remove(dest), rounds=rounds(8), iterations=1)
    res = vdisk.verify(dest)
    assert res["bytes"] == nbytes and res["extents"] == len(extents) and d.snapshots == []
    remove(dest)


def test_backup_incremental_raw(benchmark, workdir, filled_raw, changed):
    _, extents = changed
    dest = os.path.join(workdir, "incr.raw-copy")
    nbytes = sum(n for _, n in extents)
    tag(benchmark, "backup_incremental", "raw", nbytes=nbytes, ops=len(extents))

    def run():
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            for off, length in extents:
                os.write(out, os.pread(filled_raw, length, off))
            os.fsync(out)
        finally:
            os.close(out)
    benchmark.pedantic(run, setup=lambda: remove(dest), rounds=rounds(8), iterations=1)
    assert os.path.getsize(dest) == nbytes
    remove(dest)


@pytest.fixture(scope="module")
def full_delta(workdir, filled_vdisk):
    path = os.path.join(workdir, "full.h5")
    vdisk.backup(filled_vdisk, path, compression=None)
    yield path
    remove(path)


def _clear(target):
    remove(target)
    remove(target + ".vdisk-chain")


@pytest.mark.parametrize("fmt", ["raw", "vdisk"])
def test_restore_full(benchmark, workdir, full_delta, fmt):
    target = os.path.join(workdir, f"restored.{fmt}")
    tag(benchmark, "restore_full", f"vdisk-{fmt}", nbytes=REGION, ops=REGION // SEQ_IO)
    benchmark.pedantic(lambda: vdisk.restore([full_delta], target, format=fmt),
                       setup=lambda: _clear(target), rounds=rounds(6), iterations=1)
    _clear(target)


def test_restore_full_baseline(benchmark, workdir, payload):
    target = os.path.join(workdir, "written.raw")
    tag(benchmark, "restore_full", "raw", nbytes=REGION, ops=REGION // SEQ_IO)

    def run():
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            for _ in range(0, REGION, SEQ_IO):
                os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
    benchmark.pedantic(run, setup=lambda: remove(target), rounds=rounds(6), iterations=1)
    remove(target)
