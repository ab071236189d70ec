"""Conversion workloads: ``vdisk.convert`` beside ``qemu-img convert`` on the
same files, in the same run.

Images (made once per module, untimed), ``VDISK_BENCH_CONVERT_MIB`` MiB of
virtual size (default 1024):

* ``half.raw``: 1 MiB of incompressible data, then 1 MiB of zeros (written,
  not holes), alternating: half data, half zeros.
* ``half.qcow2``: ``qemu-img convert -O qcow2`` of it (the zero clusters
  unallocated); ``half.vdk``: ``vdisk.convert`` of it.
* ``text.qcow2``: the same layout with text-like data,
  ``qemu-img convert -c`` (zlib): nearly every data cluster compressed.

Workloads (group: sides)

* ``convert_qcow2_vdisk``: vdisk = ``vdisk.convert(half.qcow2, out.vdk)``;
  qemu-img = ``qemu-img convert -O raw half.qcow2 out.raw``.
* ``convert_qcow2c_vdisk``: the same from ``text.qcow2``.
* ``convert_raw_vdisk``: vdisk = ``vdisk.convert(half.raw, out.vdk)``;
  qemu-img = ``qemu-img convert -f raw -O qcow2 half.raw out.qcow2``.
* ``convert_vdisk_qcow2``: vdisk = ``vdisk.convert(half.vdk, out.qcow2,
  dst_format="qcow2")``; qemu-img = the same raw to qcow2 conversion as
  above (the same content, from qemu-img's best source format).

Every vdisk side ends durable: the output is fsynced before it is renamed
into place.  qemu-img's default cache mode for convert (``unsafe``) never
syncs, so each qemu-img baseline runs twice: ``qemu-img`` (the default:
the bytes may still be in the page cache when it exits) and
``qemu-img-sync`` (``-t writeback``: one fdatasync at the end, as
durable as vdisk's output).  The ``qemu-img-sync`` pair is the
like-for-like one.  qemu-img's time includes its process start (a few ms).

Each round writes a new file; the previous output is removed and ``sync``
runs in the untimed setup, so no round pays for another's writeback.
Reads hit a warm page cache on both sides.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

import vdisk
from conftest import SEED, remove, rounds, tag

MiB = 1 << 20
SIZE = int(os.environ.get("VDISK_BENCH_CONVERT_MIB", "1024")) * MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def _text(seed: int, n: int) -> bytes:
    """Text-like bytes (words of lowercase letters): deflate shrinks them about 2.5x, quickly."""
    rng = np.random.default_rng(seed)
    words = [bytes(rng.integers(97, 123, int(rng.integers(2, 9)), dtype=np.uint8)) for _ in range(500)]
    out = b" ".join(words[i] for i in rng.integers(0, 500, n // 3).tolist())
    return out[:n]


def _half_raw(path: str, chunk_of) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        zeros = bytes(MiB)
        for i in range(SIZE // MiB):
            os.pwrite(fd, chunk_of(i) if i % 2 == 0 else zeros, i * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def images(workdir):
    rng = np.random.default_rng(SEED + 20)
    noise = rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
    text = _text(SEED + 21, 8 * MiB)
    paths = {name: os.path.join(workdir, name) for name in
             ("half.raw", "half.qcow2", "half.vdk", "text.raw", "text.qcow2")}
    _half_raw(paths["half.raw"], lambda i: noise[(i % 8) * MiB:(i % 8 + 1) * MiB])
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", paths["half.raw"], paths["half.qcow2"]],
                   check=True)
    vdisk.convert(paths["half.raw"], paths["half.vdk"])
    _half_raw(paths["text.raw"], lambda i: text[(i % 8) * MiB:(i % 8 + 1) * MiB])
    subprocess.run(["qemu-img", "convert", "-c", "-W", "-m", "16", "-f", "raw", "-O", "qcow2", paths["text.raw"],
                    paths["text.qcow2"]], check=True)
    remove(paths["text.raw"])
    try:
        yield paths
    finally:
        for p in paths.values():
            remove(p)


class Output:
    """The output path of a round: removed, and the page cache written back, in the untimed setup."""

    def __init__(self, workdir, name):
        self.path = os.path.join(workdir, name)

    def setup(self):
        remove(self.path)
        os.sync()

    def close(self):
        remove(self.path)


def _run_vdisk(benchmark, workdir, workload, src, dst_format, name, check_against):
    tag(benchmark, workload, "vdisk", nbytes=SIZE, ops=1)
    out = Output(workdir, name)
    try:
        benchmark.pedantic(lambda: vdisk.convert(src, out.path, dst_format=dst_format),
                           setup=out.setup, rounds=rounds(2), iterations=1)
        # a sanity check of the last round's output (untimed, not a timing assert)
        assert vdisk.compare(check_against, out.path) is None
    finally:
        out.close()


def _run_qemu(benchmark, workdir, workload, args, name, sync: bool):
    tag(benchmark, workload, "qemu-img-sync" if sync else "qemu-img", nbytes=SIZE, ops=1)
    out = Output(workdir, name)
    cmd = ["qemu-img", "convert", *(["-t", "writeback"] if sync else []), *args, out.path]
    try:
        benchmark.pedantic(lambda: subprocess.run(cmd, check=True), setup=out.setup, rounds=rounds(2),
                           iterations=1)
    finally:
        out.close()


# ---------------------------------------------------------------------------- qcow2 -> vdisk
def test_qcow2_to_vdisk(benchmark, workdir, images):
    _run_vdisk(benchmark, workdir, "convert_qcow2_vdisk", images["half.qcow2"], "vdisk", "o1.vdk",
               images["half.raw"])


@pytest.mark.parametrize("sync", [False, True], ids=["default", "sync"])
def test_qcow2_to_raw_qemu(benchmark, workdir, images, sync):
    _run_qemu(benchmark, workdir, "convert_qcow2_vdisk", ["-O", "raw", images["half.qcow2"]], "o1.raw", sync)


# ---------------------------------------------------------------------------- compressed qcow2 -> vdisk
def test_compressed_qcow2_to_vdisk(benchmark, workdir, images):
    _run_vdisk(benchmark, workdir, "convert_qcow2c_vdisk", images["text.qcow2"], "vdisk", "o2.vdk",
               images["text.qcow2"])


@pytest.mark.parametrize("sync", [False, True], ids=["default", "sync"])
def test_compressed_qcow2_to_raw_qemu(benchmark, workdir, images, sync):
    _run_qemu(benchmark, workdir, "convert_qcow2c_vdisk", ["-O", "raw", images["text.qcow2"]], "o2.raw", sync)


# ---------------------------------------------------------------------------- raw -> vdisk
def test_raw_to_vdisk(benchmark, workdir, images):
    _run_vdisk(benchmark, workdir, "convert_raw_vdisk", images["half.raw"], "vdisk", "o3.vdk", images["half.raw"])


@pytest.mark.parametrize("sync", [False, True], ids=["default", "sync"])
def test_raw_to_qcow2_qemu(benchmark, workdir, images, sync):
    _run_qemu(benchmark, workdir, "convert_raw_vdisk", ["-f", "raw", "-O", "qcow2", images["half.raw"]], "o3.qcow2",
              sync)


# ---------------------------------------------------------------------------- vdisk -> qcow2
def test_vdisk_to_qcow2(benchmark, workdir, images):
    _run_vdisk(benchmark, workdir, "convert_vdisk_qcow2", images["half.vdk"], "qcow2", "o4.qcow2",
               images["half.raw"])


@pytest.mark.parametrize("sync", [False, True], ids=["default", "sync"])
def test_raw_to_qcow2_qemu_baseline(benchmark, workdir, images, sync):
    _run_qemu(benchmark, workdir, "convert_vdisk_qcow2", ["-f", "raw", "-O", "qcow2", images["half.raw"]],
              "o4.qcow2", sync)
