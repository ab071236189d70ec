"""Flushes and folds whose syncs run without the Disk's lock.

Disk.flush (and the automatic fold) take the lock for step 1 of the write
order (fold, counter and refcount pages, a copy of the changed table
pages) and for step 5 (releases, coarse bits), and run the syncs and the
table write between them without it (docs/FORMAT.md, "Write order").
Writers keep writing meanwhile; their writes are the next flush's.

The race test: writer threads overwrite, allocate and unmap their own
blocks while a flusher thread flushes and the writes themselves trigger
automatic folds, and a power loss is simulated at every fsync (the file as
the last sync left it plus a random subset of the writes issued since).
Every such state must open, pass check, hold for each block a version at
least as new as the last one acknowledged before a flush that had returned
(never older, never another block's), and report every block whose
content differs from the checkpoint's in changes_since(checkpoint).
"""
from __future__ import annotations

import os
import random
import struct
import threading
import time
import zlib

import pytest

import vdisk
from vdisk.testing import RecordingIO

BS = 4096
NBLOCKS = 256
PREFILLED = 128            # blocks 0..127 hold version 0 at the checkpoint; 128..191 are unallocated
USED = 192
WRITERS = 3


def content(b: int, v: int) -> bytes:
    """Version v of block b; every fifth version is zeros (the write unmaps the block)."""
    if v % 5 == 4:
        return bytes(BS)
    return struct.pack("<QQ", b, v + 1) * (BS // 16)


def version_of(b: int, data: bytes):
    """The version a block holds: an int, "zero", or raises on foreign data."""
    if data == bytes(BS):
        return "zero"
    cb, cv = struct.unpack_from("<QQ", data)
    assert data == struct.pack("<QQ", cb, cv) * (BS // 16) and cb == b, f"block {b}: foreign or torn data"
    return cv - 1


def initial(b: int) -> bytes:
    return content(b, 0) if b < PREFILLED else bytes(BS)


class Race:
    def __init__(self, d, seed: int, writes: int):
        self.d = d
        self.rng = random.Random(seed)
        self.writes = writes
        self.acked: dict[int, int] = {}        # block -> last acknowledged version
        self.issued: dict[int, int] = {}       # block -> last version whose pwrite began
        self.required: dict[int, int] = {}     # block -> version a returned flush made durable
        self.states: list[tuple[bytes, dict, dict]] = []
        self.stop = threading.Event()
        self.unlocked_syncs = 0                # fsyncs the flusher ran without the Disk's lock
        self.writes_during_syncs = 0           # writes acknowledged while such an fsync waited
        self.errors: list[BaseException] = []
        self.acks = 0

    def on_fsync(self, rec) -> None:
        """A power loss just before this fsync (two subsets of the pending writes)."""
        required = dict(self.required)     # before the image: flushes that returned are in it
        images = [rec.crash_image(self.rng), rec.crash_image(keep=[True] * 10 ** 6)]
        issued = dict(self.issued)          # after it: every version the image may hold
        self.states += [(zlib.compress(image), required, issued) for image in images]
        if threading.current_thread().name == "flusher" and not self.d._lock._is_owned():
            self.unlocked_syncs += 1
            before = self.acks
            time.sleep(0.003)               # a slow disk: writers must not wait for it
            self.writes_during_syncs += self.acks - before

    def writer(self, t: int, seed: int) -> None:
        rng = random.Random(seed)
        mine = [b for b in range(USED) if b % WRITERS == t]
        try:
            for _ in range(self.writes):
                b = rng.choice(mine)
                v = self.issued.get(b, 0) + 1
                self.issued[b] = v
                self.d.pwrite(content(b, v), b * BS)
                self.acked[b] = v
                self.acks += 1
        except BaseException as exc:        # pragma: no cover - reported below
            self.errors.append(exc)

    def flusher(self) -> None:
        try:
            while not self.stop.is_set():
                snap = dict(self.acked)     # acknowledged before this flush was called
                self.d.flush()
                self.required.update(snap)
                time.sleep(0.001)
        except BaseException as exc:        # pragma: no cover
            self.errors.append(exc)


def check_state(path: str, image: bytes, required: dict, issued: dict, c0: str, full_check: bool) -> None:
    with open(path, "wb") as f:
        f.write(image)
    with vdisk.open(path) as d:
        changed = set()
        for off, n in d.changes_since(c0):
            changed.update(range(off // BS, (off + n) // BS))
        for b in range(NBLOCKS):
            data = d.pread(BS, b * BS)
            v = version_of(b, data)
            req, top = required.get(b), issued.get(b, 0)
            if v == "zero":
                ok = (req is None and initial(b) == bytes(BS)) or any(
                    x % 5 == 4 for x in range(req if req is not None else 1, top + 1))
            else:
                ok = v <= top and (req is None or v >= req) and (v > 0 or b < PREFILLED)
            assert ok, f"block {b}: holds version {v}, a flush made version {req} durable (issued up to {top})"
            if data != initial(b):
                assert b in changed, f"block {b} changed since the checkpoint (version {v}) but is not reported"
    if full_check:
        res = vdisk.check(path)
        assert res.corruption_count == 0, res      # leaks allowed (a crash's appended blocks)


@pytest.mark.parametrize("seed", range(2))
def test_writers_racing_unlocked_flushes_and_folds_survive_power_loss_at_every_fsync(tmp_path, seed):
    path = str(tmp_path / "d.vdisk")
    d = vdisk.create(path, NBLOCKS * BS, block_size=BS, coarse_region_size="16KiB", io_factory=RecordingIO)
    for b in range(PREFILLED):
        d.pwrite(content(b, 0), b * BS)
    d.flush()
    c0 = d.checkpoint()
    d.fold_interval = 7             # automatic folds from the writers' own threads, too
    race = Race(d, seed, writes=250)
    d._io.on_fsync = race.on_fsync
    threads = [threading.Thread(target=race.writer, args=(t, seed * 10 + t), name=f"writer-{t}")
               for t in range(WRITERS)]
    fl = threading.Thread(target=race.flusher, name="flusher")
    fl.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    race.stop.set()
    fl.join(120)
    assert not race.errors, race.errors
    d._io.on_fsync = None
    final = dict(race.acked)
    d.close()
    # the syncs really ran beside the writers
    assert race.unlocked_syncs > 5, race.unlocked_syncs
    assert race.writes_during_syncs > 0, "no write completed while a flush was in its syncs"
    crash = str(tmp_path / "crash.vdisk")
    for i, (image, required, issued) in enumerate(race.states):
        check_state(crash, zlib.decompress(image), required, issued, c0, full_check=i % 7 == 0)
    assert len(race.states) > 50, len(race.states)
    with vdisk.open(path) as d:                # the clean close holds the last acknowledged versions
        for b in range(NBLOCKS):
            assert d.pread(BS, b * BS) == (content(b, final[b]) if b in final else initial(b)), b
    assert vdisk.check(path).ok


def test_a_flush_in_its_sync_does_not_hold_the_lock(tmp_path):
    """While a flush's fsync hangs (a slow disk), another thread reads, writes
    in place and allocates; those writes are not part of that flush (the
    next one makes them durable).  Before the change the flush held the
    Disk's lock through its fsyncs, and this test timed out."""
    path = str(tmp_path / "d.vdisk")
    d = vdisk.create(path, "1MiB", block_size=BS, io_factory=RecordingIO)
    d.pwrite(b"\1" * BS, 0)
    d.flush()
    entered, release = threading.Event(), threading.Event()

    def slow_fsync(rec):
        if threading.current_thread().name == "flusher" and not entered.is_set():
            entered.set()
            release.wait(10)
    d._io.on_fsync = slow_fsync
    d.pwrite(b"\2" * BS, 0)
    fl = threading.Thread(target=d.flush, name="flusher")
    fl.start()
    assert entered.wait(10)
    done = threading.Event()

    def other():
        d.pwrite(b"\3" * BS, 0)             # in place
        d.pwrite(b"\4" * BS, 8 * BS)        # a new block
        assert d.pread(BS, 8 * BS) == b"\4" * BS
        done.set()
    th = threading.Thread(target=other)
    th.start()
    ok = done.wait(5)
    release.set()
    th.join(10)
    fl.join(10)
    assert ok, "a write waited for another thread's flush to finish its fsync"
    d._io.on_fsync = None
    # the allocation came after that flush's step 1: a power loss now may lose it, never expose garbage
    image = d._io.crash_image(keep=[False] * len(d._io.pending))
    d.flush()
    d.close()
    with open(path + ".crash", "wb") as f:
        f.write(image)
    with vdisk.open(path + ".crash") as c:
        assert c.pread(BS, 0) in (b"\2" * BS, b"\3" * BS)
        assert c.pread(BS, 8 * BS) in (bytes(BS), b"\4" * BS)
    os.unlink(path + ".crash")
    with vdisk.open(path) as d:
        assert d.pread(BS, 8 * BS) == b"\4" * BS


@pytest.mark.parametrize("op", ["snapshot", "delete_snapshot", "revert"])
def test_snapshot_operations_sync_their_writes_without_the_lock(tmp_path, op):
    """snapshot, delete_snapshot and revert first flush without the lock: while
    that flush's fsync hangs, another thread writes in place and allocates.
    The operation itself then runs at one instant under the lock: a snapshot
    taken while a write waits holds either all of it or none of it (before
    the change the whole operation held the lock and this test timed out)."""
    path = str(tmp_path / "d.vdisk")
    d = vdisk.create(path, "1MiB", block_size=BS, io_factory=RecordingIO)
    d.pwrite(b"\1" * BS, 0)
    if op != "snapshot":
        d.snapshot("s")
    d.pwrite(b"\2" * BS, 0)         # unflushed: the operation's first flush has data to sync
    entered, release = threading.Event(), threading.Event()

    def slow_fsync(rec):
        if threading.current_thread().name == "op" and not entered.is_set() and not d._lock._is_owned():
            entered.set()
            release.wait(10)
    d._io.on_fsync = slow_fsync
    errors: list[BaseException] = []

    def run():
        try:
            getattr(d, op)("s")
        except BaseException as exc:        # pragma: no cover
            errors.append(exc)
    th = threading.Thread(target=run, name="op")
    th.start()
    assert entered.wait(10), "the operation's fsyncs all ran under the lock"
    done = threading.Event()

    def other():
        d.pwrite(b"\3" * BS, 0)
        d.pwrite(b"\4" * BS, 8 * BS)
        done.set()
    w = threading.Thread(target=other)
    w.start()
    ok = done.wait(5)
    release.set()
    w.join(10)
    th.join(10)
    d._io.on_fsync = None
    assert ok, f"a write waited for {op}'s first flush to sync"
    assert not errors, errors
    if op == "snapshot":            # the snapshot's instant came after the writes: it holds them
        with d.open_snapshot("s") as snap:
            assert snap.pread(BS, 0) == b"\3" * BS and snap.pread(BS, 8 * BS) == b"\4" * BS
    elif op == "revert":            # the revert came after the writes: they are undone
        assert d.pread(BS, 0) == b"\1" * BS and d.pread(BS, 8 * BS) == bytes(BS)
    else:
        assert d.snapshots == []
    d.close()
    assert vdisk.check(path).ok
