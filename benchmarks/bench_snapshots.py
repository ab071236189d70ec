"""Snapshot workloads (issue 4), each beside its baseline in the same run.

* snapshot create on an image with 100k allocated 4 KiB blocks, against
  ``qemu-img snapshot -c`` on a qcow2 with the same 100k allocated 4 KiB
  clusters (qemu-img's time includes its process start, a few ms);
* copy-on-write 4 KiB writes (every block shared with a snapshot) against
  the same writes overwriting unshared blocks in place;
* sequential 1 MiB reads of a snapshot against the same reads of the live disk.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

import vdisk
from conftest import SEED, remove, rounds, tag

BLOCKS = 100_000
BS = 4096
COW_WRITES = 4096


@pytest.fixture(scope="module")
def allocated(workdir):
    """A vdisk image and a qcow2 image, each with 100k allocated 4 KiB blocks."""
    size = BLOCKS * BS
    data = np.random.default_rng(SEED).integers(1, 256, 1 << 20, dtype=np.uint8).tobytes()
    path = os.path.join(workdir, "snap.vdk")
    d = vdisk.create(path, size, block_size="4KiB", overwrite=True)
    for off in range(0, size, 1 << 20):
        d.pwrite(data[:min(1 << 20, size - off)], off)
    d.flush()
    raw = os.path.join(workdir, "snap.raw")
    with open(raw, "wb") as f:
        for off in range(0, size, 1 << 20):
            f.write(data[:min(1 << 20, size - off)])
    qcow = os.path.join(workdir, "snap.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, qcow],
                   check=True)
    remove(raw)
    try:
        yield d, qcow
    finally:
        d.close()
        remove(path)
        remove(qcow)


def _drop_snapshots(d) -> None:
    for info in d.snapshots:
        d.delete_snapshot(info.name)


def test_snapshot_create_vdisk(benchmark, allocated):
    d, _ = allocated
    names = iter(range(10**6))
    tag(benchmark, "snapshot_create_100k", "vdisk", ops=1, blocks=BLOCKS)
    benchmark.pedantic(lambda: d.snapshot(f"b{next(names)}"), setup=lambda: _drop_snapshots(d),
                       rounds=rounds(5), iterations=1)
    _drop_snapshots(d)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_snapshot_create_qemu(benchmark, allocated):
    _, qcow = allocated
    names = iter(range(10**6))

    def setup():
        out = subprocess.run(["qemu-img", "snapshot", "-l", qcow], capture_output=True, text=True).stdout
        for line in out.splitlines()[2:]:
            subprocess.run(["qemu-img", "snapshot", "-d", line.split()[1], qcow], check=True)
    tag(benchmark, "snapshot_create_100k", "qemu-img", ops=1, blocks=BLOCKS)
    benchmark.pedantic(lambda: subprocess.run(["qemu-img", "snapshot", "-c", f"q{next(names)}", qcow], check=True),
                       setup=setup, rounds=rounds(5), iterations=1)


def _offsets():
    rng = np.random.default_rng(SEED + 5)
    return (rng.choice(BLOCKS, COW_WRITES, replace=False) * BS).tolist()


@pytest.mark.parametrize("shared", [True, False], ids=["copy-on-write", "in-place"])
def test_write_4k(benchmark, allocated, shared):
    """Every block shared with a snapshot (each write copies it) or unshared (in place)."""
    d, _ = allocated
    buf = os.urandom(BS)
    offs = _offsets()

    def setup():
        _drop_snapshots(d)
        if shared:
            d.snapshot("cow")
    tag(benchmark, "write_4KiB_shared", "vdisk-cow" if shared else "vdisk-inplace",
        nbytes=COW_WRITES * BS, ops=COW_WRITES)

    def run():
        for off in offs:
            d.pwrite(buf, off)
        d.flush()
    benchmark.pedantic(run, setup=setup, rounds=rounds(4), iterations=1)
    _drop_snapshots(d)


def test_read_snapshot(benchmark, allocated):
    d, _ = allocated
    snap = d.snapshot("reader")
    size = snap.size
    tag(benchmark, "read_1MiB_snapshot", "vdisk-snapshot", nbytes=size, ops=size >> 20)

    def run():
        for off in range(0, size - (1 << 20) + 1, 1 << 20):
            snap.pread(1 << 20, off)
    benchmark.pedantic(run, rounds=rounds(4), iterations=1)
    _drop_snapshots(d)


def test_read_live(benchmark, allocated):
    d, _ = allocated
    size = d.size
    tag(benchmark, "read_1MiB_snapshot", "vdisk-live", nbytes=size, ops=size >> 20)

    def run():
        for off in range(0, size - (1 << 20) + 1, 1 << 20):
            d.pread(1 << 20, off)
    benchmark.pedantic(run, rounds=rounds(4), iterations=1)
