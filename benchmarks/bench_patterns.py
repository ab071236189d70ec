"""Access patterns the first matrix did not measure (issue #16), all in paired rounds.

Every workload here holds both of its sides in one benchmark and runs them in
each round, in a random order, each timed alone after its own untimed setup
(``_paired`` of bench_io.py): the per-round ratio cancels the drift of a shared
machine between rounds.  report.py reads ``extra_info["paired"]``.

* 11: a fresh image filled with 1 MiB writes, then 20,000 random 4 KiB
  overwrites of those blocks *before the flush* (they are still fresh:
  allocated since the last flush), tracking on against off.
* 12-16: vdisk against a raw file, with both sides prefilled either in 64 KiB
  writes (as bench_io.py does) or in 1 MiB writes (as users fill files: the
  page cache then builds large folios where the file offsets allow it).
  The prefill is in the workload name, ``@64KiB`` or ``@1MiB``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import vdisk
from bench_io import FreshImage, FreshRaw, _paired
from conftest import KiB, MiB, REGION, SEED, SEQ_IO, remove, rounds

PREFILLS = {"64KiB": 64 * KiB, "1MiB": MiB}
OVERWRITES = 20000             # workload 11
MIXED_OPS = 2048               # workload 15: operations per round


def _offsets(n: int, seed: int, unit: int = 4 * KiB) -> list[int]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, REGION // unit, n, dtype=np.int64) * unit).tolist()


def _mixed(aligned: bool, seed: int) -> list[tuple[int, int]]:
    """(offset, length) pairs: lengths log-uniform in [4 KiB, 1 MiB], so most
    span a 64 KiB block boundary; aligned: both multiples of 4 KiB, else any byte."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(4 * KiB), np.log(MiB), MIXED_OPS)).astype(np.int64)
    if aligned:
        lengths = np.maximum(lengths // (4 * KiB), 1) * (4 * KiB)
    offsets = (rng.random(MIXED_OPS) * (REGION - lengths)).astype(np.int64)
    if aligned:
        offsets -= offsets % (4 * KiB)
    return list(zip(offsets.tolist(), lengths.tolist()))


# ---------------------------------------------------------------------------- 11. fill, then overwrite before the flush
def _fill(d, payload):
    for off in range(0, REGION, SEQ_IO):
        d.pwrite(payload, off)


@pytest.mark.parametrize("timed", ["overwrites", "whole"])
def test_fresh_fill_overwrite_tracking(benchmark, workdir, payload, small_payload, timed):
    """timed="overwrites": the fill is in the untimed setup, the 20,000 overwrites
    are timed (the flush comes in the next setup's close); "whole": fill,
    overwrites and the flush, all timed."""
    offs = _offsets(OVERWRITES, SEED + 20)
    imgs = {side: FreshImage(workdir, f"fresh-ow-{side}.vdk", side == "on") for side in ("on", "off")}

    def sides():
        for side, img in imgs.items():
            if timed == "overwrites":
                def setup(img=img):
                    img.setup()
                    _fill(img.d, payload)

                def run(img=img):
                    pw = img.d.pwrite
                    for off in offs:
                        pw(small_payload, off)
            else:
                setup = img.setup

                def run(img=img):
                    d = img.d
                    _fill(d, payload)
                    for off in offs:
                        d.pwrite(small_payload, off)
                    d.flush()
            yield side, (setup, run)

    try:
        _paired(benchmark, f"fresh_fill_overwrite_{timed}", dict(sides()), rounds(15),
                REGION + OVERWRITES * 4 * KiB if timed == "whole" else OVERWRITES * 4 * KiB,
                len(range(0, REGION, SEQ_IO)) + OVERWRITES if timed == "whole" else OVERWRITES)
    finally:
        for img in imgs.values():
            img.close()


# ---------------------------------------------------------------------------- 12-16. vdisk against raw, both prefills
@pytest.fixture(scope="module", params=list(PREFILLS))
def filled_pair(request, workdir, payload):
    """(prefill name, raw fd, disk): both sides hold the region's data, written
    in chunks of the prefill's size and flushed."""
    name = request.param
    chunk = PREFILLS[name]
    raw_path = os.path.join(workdir, f"pat-{name}.raw")
    img_path = os.path.join(workdir, f"pat-{name}.vdk")
    fd = os.open(raw_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    d = vdisk.create(img_path, REGION, block_size="64KiB", overwrite=True, track_changes=True)
    try:
        mv = memoryview(payload)
        for off in range(0, REGION, chunk):
            piece = mv[off % len(payload):off % len(payload) + chunk]
            os.pwrite(fd, piece, off)
            d.pwrite(piece, off)
        os.fsync(fd)
        d.flush()
        yield name, fd, d
    finally:
        d.close()
        os.close(fd)
        remove(raw_path)
        remove(img_path)


def _vs_raw(benchmark, workload, raw, vd, n_rounds, nbytes, ops, raw_setup=None, vd_setup=None):
    _paired(benchmark, workload, {"vdisk": (vd_setup, vd), "raw": (raw_setup, raw)}, n_rounds, nbytes, ops,
            prefix="paired_")


@pytest.mark.parametrize("size", [MiB, 4 * MiB], ids=["1MiB", "4MiB"])
def test_seq_read(benchmark, filled_pair, size):
    name, fd, d = filled_pair
    offs = range(0, REGION, size)

    def raw():
        for off in offs:
            os.pread(fd, size, off)

    def vd():
        for off in offs:
            d.pread(size, off)

    _vs_raw(benchmark, f"seq_read_{size // MiB}MiB@{name}", raw, vd, rounds(25), REGION, len(offs))


@pytest.mark.parametrize("size", [MiB, 4 * MiB], ids=["1MiB", "4MiB"])
def test_seq_overwrite(benchmark, filled_pair, payload, size):
    """Sequential in-place writes over the whole prefilled region, then flush / fsync."""
    name, fd, d = filled_pair
    buf = (payload * (size // len(payload)))[:size]
    offs = range(0, REGION, size)

    def raw():
        for off in offs:
            os.pwrite(fd, buf, off)
        os.fsync(fd)

    def vd():
        for off in offs:
            d.pwrite(buf, off)
        d.flush()

    _vs_raw(benchmark, f"seq_overwrite_{size // MiB}MiB@{name}", raw, vd, rounds(9), REGION, len(offs))


def test_seq_write_4MiB_fresh(benchmark, workdir, payload):
    """4 MiB sequential writes into a fresh image / a fresh raw file, then flush / fsync."""
    buf = payload * 4
    offs = range(0, REGION, len(buf))
    img = FreshImage(workdir, "pat-fresh4.vdk", True)
    f = FreshRaw(workdir, "pat-fresh4.raw")

    def raw():
        for off in offs:
            os.pwrite(f.fd, buf, off)
        os.fsync(f.fd)

    def vd():
        for off in offs:
            img.d.pwrite(buf, off)
        img.d.flush()

    try:
        _vs_raw(benchmark, "seq_write_4MiB_fresh", raw, vd, rounds(9), REGION, len(offs), f.setup, img.setup)
    finally:
        img.close()
        f.close()


def test_rand_read(benchmark, filled_pair, random_offsets):
    name, fd, d = filled_pair

    def raw():
        for off in random_offsets:
            os.pread(fd, 4 * KiB, off)

    def vd():
        for off in random_offsets:
            d.pread(4 * KiB, off)

    _vs_raw(benchmark, f"rand_read_4KiB@{name}", raw, vd, rounds(25), len(random_offsets) * 4 * KiB,
            len(random_offsets))


@pytest.mark.parametrize("durable", [True, False], ids=["flush", "buffered"])
def test_rand_write(benchmark, filled_pair, small_payload, random_offsets, durable):
    name, fd, d = filled_pair
    assert len(random_offsets) < d.fold_interval

    def raw():
        for off in random_offsets:
            os.pwrite(fd, small_payload, off)
        if durable:
            os.fsync(fd)

    def vd():
        for off in random_offsets:
            d.pwrite(small_payload, off)
        if durable:
            d.flush()

    _vs_raw(benchmark, f"rand_write_4KiB_{'flush' if durable else 'buffered'}@{name}", raw, vd, rounds(21),
            len(random_offsets) * 4 * KiB, len(random_offsets),
            None if durable else (lambda: os.fsync(fd)), None if durable else d.flush)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_mixed_read(benchmark, filled_pair, aligned):
    name, fd, d = filled_pair
    ops = _mixed(aligned, SEED + 30 + aligned)

    def raw():
        for off, n in ops:
            os.pread(fd, n, off)

    def vd():
        for off, n in ops:
            d.pread(n, off)

    _vs_raw(benchmark, f"mixed_read_{'aligned' if aligned else 'unaligned'}@{name}", raw, vd, rounds(21),
            sum(n for _, n in ops), len(ops))


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_mixed_write(benchmark, filled_pair, payload, aligned):
    """Buffered: the previous round is flushed / fsynced in the untimed setup."""
    name, fd, d = filled_pair
    ops = _mixed(aligned, SEED + 40 + aligned)
    mv = memoryview(payload)

    def raw():
        for off, n in ops:
            os.pwrite(fd, mv[:n], off)

    def vd():
        for off, n in ops:
            d.pwrite(mv[:n], off)

    _vs_raw(benchmark, f"mixed_write_{'aligned' if aligned else 'unaligned'}@{name}", raw, vd, rounds(21),
            sum(n for _, n in ops), len(ops), lambda: os.fsync(fd), d.flush)
