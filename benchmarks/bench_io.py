"""Data-path workloads: vdisk against a raw file driven by os.pread/os.pwrite
from a Python loop, and tracking on against tracking off.

Each workload is a group; inside it, ``extra_info["impl"]`` names the side
("raw", "vdisk"; "paired" for tracking on against off, section 5).  report.py divides the sides.  Timings
are never asserted.

Flush policy: every *write* round ends with a flush on both sides
(``Disk.flush()`` for vdisk, ``os.fsync`` for the raw file), so write
numbers are durable throughput, except the explicitly "buffered" random
write group, where both sides skip it (the previous round's state is
flushed, untimed, in setup).  Reads run against a warm page cache on both
sides.
"""
from __future__ import annotations

import os
import random
import time

import vdisk
from conftest import (RANDOM_IO, RANDOM_OPS, REGION, SEED, SEQ_IO, remove, rounds, tag)

SEQ_OFFSETS = list(range(0, REGION, SEQ_IO))


# ---------------------------------------------------------------------------- 1. sequential 1 MiB writes
class FreshRaw:
    """A new, empty raw file per round (made in the untimed setup)."""

    def __init__(self, workdir, name):
        self.path = os.path.join(workdir, name)
        self.fd = -1

    def setup(self):
        self.close()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        remove(self.path)


class FreshImage:
    """A new, empty 64 KiB-block image per round (made in the untimed setup)."""

    def __init__(self, workdir, name, track):
        self.path = os.path.join(workdir, name)
        self.track = track
        self.d = None

    def setup(self):
        self.close()
        self.d = vdisk.create(self.path, REGION, block_size="64KiB", overwrite=True, track_changes=self.track)

    def close(self):
        if self.d is not None:
            self.d.close()
            self.d = None
        remove(self.path)


def test_seq_write_raw(benchmark, workdir, payload):
    tag(benchmark, "seq_write_1MiB", "raw", nbytes=REGION, ops=len(SEQ_OFFSETS))
    f = FreshRaw(workdir, "seq.raw")

    def run():
        fd = f.fd
        for off in SEQ_OFFSETS:
            os.pwrite(fd, payload, off)
        os.fsync(fd)

    try:
        benchmark.pedantic(run, setup=f.setup, rounds=rounds(15), warmup_rounds=1)
    finally:
        f.close()


def _seq_write(img: FreshImage, payload):
    def run():
        d = img.d
        for off in SEQ_OFFSETS:
            d.pwrite(payload, off)
        d.flush()
    return run


def test_seq_write_vdisk(benchmark, workdir, payload):
    tag(benchmark, "seq_write_1MiB", "vdisk", nbytes=REGION, ops=len(SEQ_OFFSETS))
    img = FreshImage(workdir, "seq-vdisk.vdk", True)
    try:
        benchmark.pedantic(_seq_write(img, payload), setup=img.setup, rounds=rounds(15), warmup_rounds=1)
    finally:
        img.close()


# ---------------------------------------------------------------------------- 2. sequential 1 MiB reads
def test_seq_read_raw(benchmark, filled_raw):
    tag(benchmark, "seq_read_1MiB", "raw", nbytes=REGION, ops=len(SEQ_OFFSETS))
    fd = filled_raw

    def run():
        for off in SEQ_OFFSETS:
            os.pread(fd, SEQ_IO, off)

    benchmark.pedantic(run, rounds=rounds(25), warmup_rounds=1)


def test_seq_read_vdisk(benchmark, filled_vdisk):
    tag(benchmark, "seq_read_1MiB", "vdisk", nbytes=REGION, ops=len(SEQ_OFFSETS))
    d = filled_vdisk

    def run():
        for off in SEQ_OFFSETS:
            d.pread(SEQ_IO, off)

    benchmark.pedantic(run, rounds=rounds(25), warmup_rounds=1)


# the same reads into a caller's buffer (no result object, no copy out)
def test_seq_readinto_raw(benchmark, filled_raw):
    tag(benchmark, "seq_readinto_1MiB", "raw", nbytes=REGION, ops=len(SEQ_OFFSETS))
    fd = filled_raw
    buf = bytearray(SEQ_IO)

    def run():
        for off in SEQ_OFFSETS:
            os.preadv(fd, [buf], off)

    benchmark.pedantic(run, rounds=rounds(25), warmup_rounds=1)


def test_seq_readinto_vdisk(benchmark, filled_vdisk):
    tag(benchmark, "seq_readinto_1MiB", "vdisk", nbytes=REGION, ops=len(SEQ_OFFSETS))
    d = filled_vdisk
    buf = bytearray(SEQ_IO)

    def run():
        for off in SEQ_OFFSETS:
            d.preadinto(buf, off)

    benchmark.pedantic(run, rounds=rounds(25), warmup_rounds=1)


# ---------------------------------------------------------------------------- 3. random 4 KiB writes
# on allocated blocks (the region is prefilled), fixed-seed 4 KiB-aligned offsets
def _rand_write_raw(benchmark, fd, small, offsets, durable):
    workload = "rand_write_4KiB" if durable else "rand_write_4KiB_buffered"
    tag(benchmark, workload, "raw", nbytes=len(offsets) * RANDOM_IO, ops=len(offsets))

    def run():
        for off in offsets:
            os.pwrite(fd, small, off)
        if durable:
            os.fsync(fd)

    setup = None if durable else (lambda: os.fsync(fd))
    benchmark.pedantic(run, setup=setup, rounds=rounds(21), warmup_rounds=1)


def _rand_write(d, small, offsets, durable):
    assert len(offsets) < d.fold_interval   # no automatic fold inside a round: folds happen at flush

    def run():
        for off in offsets:
            d.pwrite(small, off)
        if durable:
            d.flush()
    return run


def _rand_write_vdisk(benchmark, d, small, offsets, durable):
    workload = "rand_write_4KiB" if durable else "rand_write_4KiB_buffered"
    tag(benchmark, workload, "vdisk", nbytes=len(offsets) * RANDOM_IO, ops=len(offsets),
        fold_interval=d.fold_interval)
    setup = None if durable else d.flush
    benchmark.pedantic(_rand_write(d, small, offsets, durable), setup=setup, rounds=rounds(21), warmup_rounds=1)


def test_rand_write_raw(benchmark, filled_raw, small_payload, random_offsets):
    _rand_write_raw(benchmark, filled_raw, small_payload, random_offsets, True)


def test_rand_write_vdisk(benchmark, filled_vdisk, small_payload, random_offsets):
    _rand_write_vdisk(benchmark, filled_vdisk, small_payload, random_offsets, True)


def test_rand_write_buffered_raw(benchmark, filled_raw, small_payload, random_offsets):
    _rand_write_raw(benchmark, filled_raw, small_payload, random_offsets, False)


def test_rand_write_buffered_vdisk(benchmark, filled_vdisk, small_payload, random_offsets):
    _rand_write_vdisk(benchmark, filled_vdisk, small_payload, random_offsets, False)


# ---------------------------------------------------------------------------- 4. random 4 KiB reads
def test_rand_read_raw(benchmark, filled_raw, random_offsets):
    tag(benchmark, "rand_read_4KiB", "raw", nbytes=len(random_offsets) * RANDOM_IO, ops=len(random_offsets))
    fd = filled_raw

    def run():
        for off in random_offsets:
            os.pread(fd, RANDOM_IO, off)

    benchmark.pedantic(run, rounds=rounds(25), warmup_rounds=1)


def test_rand_read_vdisk(benchmark, filled_vdisk, random_offsets):
    tag(benchmark, "rand_read_4KiB", "vdisk", nbytes=len(random_offsets) * RANDOM_IO, ops=len(random_offsets))
    d = filled_vdisk

    def run():
        for off in random_offsets:
            d.pread(RANDOM_IO, off)

    benchmark.pedantic(run, rounds=rounds(25), warmup_rounds=1)


def test_region_is_allocated(filled_vdisk):
    """Sanity (not timing): the random workloads really run on allocated blocks."""
    n = REGION // filled_vdisk.block_size
    assert int((filled_vdisk._table[:n] != 0).sum()) == n
    assert RANDOM_OPS > 0



# ---------------------------------------------------------------------------- 5. tracking on/off, paired
# Tracking on against tracking off ("on", "off"), in paired rounds: each round runs both
# sides, in a random order, each timed alone after its own untimed setup.
# The per-round ratio off/on cancels what drifts between rounds (writeback
# of earlier work, other load), which two separate benchmarks run one after
# the other cannot.  report.py reads the per-round times from
# extra_info["paired"]; the benchmark's own timing (both sides) is unused.
def _paired(benchmark, workload: str, sides: dict, n_rounds: int, nbytes: int, ops: int,
            prefix: str = "tracking_paired_") -> None:
    tag(benchmark, f"{prefix}{workload}", "paired", nbytes=nbytes, ops=ops)
    rng = random.Random(SEED)
    times: dict[str, list[float]] = {side: [] for side in sides}

    def one_round():
        order = list(sides)
        rng.shuffle(order)
        for side in order:
            setup, run = sides[side]
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            run()
            times[side].append(time.perf_counter() - t0)

    one_round()                                  # warm-up, not kept
    for kept in times.values():
        kept.clear()
    benchmark.pedantic(one_round, rounds=n_rounds, warmup_rounds=0)
    benchmark.extra_info["paired"] = times


def test_tracking_paired_seq_write(benchmark, workdir, payload):
    imgs = {side: FreshImage(workdir, f"paired-seq-{side}.vdk", side == "on") for side in ("on", "off")}
    try:
        _paired(benchmark, "seq_write_1MiB", {side: (img.setup, _seq_write(img, payload)) for side, img in imgs.items()},
                rounds(15), REGION, len(SEQ_OFFSETS))
    finally:
        for img in imgs.values():
            img.close()


def _paired_rand(benchmark, disks, small, offsets, durable):
    workload = "rand_write_4KiB" if durable else "rand_write_4KiB_buffered"
    sides = {side: (None if durable else d.flush, _rand_write(d, small, offsets, durable))
             for side, d in disks.items()}
    _paired(benchmark, workload, sides, rounds(31), len(offsets) * RANDOM_IO, len(offsets))


def test_tracking_paired_rand_write(benchmark, filled_vdisk, filled_vdisk_notrack, small_payload, random_offsets):
    _paired_rand(benchmark, {"on": filled_vdisk, "off": filled_vdisk_notrack}, small_payload, random_offsets, True)


def test_tracking_paired_rand_write_buffered(benchmark, filled_vdisk, filled_vdisk_notrack, small_payload,
                                             random_offsets):
    _paired_rand(benchmark, {"on": filled_vdisk, "off": filled_vdisk_notrack}, small_payload, random_offsets, False)


def test_tracking_paired_control(benchmark, filled_vdisk, filled_vdisk_twin, small_payload, random_offsets):
    """The noise floor of the paired rows: tracking on against tracking on, two
    images filled alike (5c's workload); whatever it shows is not tracking."""
    sides = {side: (d.flush, _rand_write(d, small_payload, random_offsets, False))
             for side, d in (("on", filled_vdisk), ("twin", filled_vdisk_twin))}
    _paired(benchmark, "control_4KiB_buffered", sides, rounds(31), len(random_offsets) * RANDOM_IO,
            len(random_offsets))
