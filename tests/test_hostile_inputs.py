"""Hostile inputs (issue #13): FIFOs where files are expected, header
counters at their limits, a damaged snapshot record, and the one-liner
whose Disk is referenced only by the call expression.

Each test crafts its input per docs/FORMAT.md.  The FIFO tests run the call
in a child process with a time limit, so a hang fails the test instead of
hanging the suite.
"""
from __future__ import annotations

import gc
import os
import struct
import subprocess

import pytest

import vdisk
from vdisk import layout as L
from helpers import measure_in_child, pattern

KiB = 1 << 10
MiB = 1 << 20
BS = 4 * KiB


# ============================================================================ the one-liner
def test_one_liner_read_on_a_dropped_disk(img):
    """The bound pread holds the Disk for the call: no AttributeError from a
    Disk collected mid-call (the hot path holds it only weakly).  The calls
    stand outside the asserts: pytest's assertion rewriting would keep the
    Disk alive in a temporary."""
    with vdisk.create(img, MiB, block_size=BS) as d:
        d.pwrite(b"hello", 0)
    gc.collect()
    small = vdisk.open(img).pread(10, 0)
    spanning = vdisk.open(img).pread(3 * BS, 0)        # the slow path too
    assert small == b"hello" + bytes(5)
    assert spanning == b"hello" + bytes(3 * BS - 5)


def test_one_liner_writes_on_a_dropped_disk(img, tmp_path):
    with vdisk.create(img, MiB, block_size=BS) as d:
        d.pwrite(b"x" * BS, 0)
    in_place = vdisk.open(img, "r+").pwrite(b"y", 0)                # the hot path
    allocating = vdisk.open(img, "r+").pwrite(b"z" * 10, 5 * BS)    # the slow path
    other = str(tmp_path / "new.vdk")
    created = vdisk.create(other, "1MiB").pwrite(b"abc", 7)
    assert (in_place, allocating, created) == (1, 10, 3)
    with vdisk.open(img) as d:              # each dropped Disk closed (and flushed) at once
        assert d.pread(2, 0) == b"yx"
        assert d.pread(10, 5 * BS) == b"z" * 10
    with vdisk.open(other) as d:
        assert d.pread(10, 0) == bytes(7) + b"abc"


def test_dropped_disk_still_closes_at_once(img):
    """The bound methods hold the Disk only for the call: dropping the last
    reference closes it (its lock is free for a writer) without a gc pass."""
    vdisk.create(img, MiB, block_size=BS).close()
    d = vdisk.open(img)
    read = d.pread
    del d
    assert read(4, 0) == bytes(4)           # the bound method alone keeps it open ...
    del read
    with vdisk.open(img, "r+") as w:        # ... and once it goes, the shared lock is gone
        w.pwrite(b"w", 0)
