"""Power-loss simulation: drive a workload through RecordingIO and check
every sampled crash state against the crash contract.

The model keeps, per byte, the content as of the last completed flush and
every value written since (each op registers its result before it runs,
so states taken at fsyncs inside the op are judged fairly).  A crash state
passes when
  * the image opens, and check() finds no corruption (leaks allowed);
  * every byte holds its flushed value or a value written after the flush
    (never zeros for flushed data, never another block's data, never garbage);
  * for every change id handed out, changes_since(id) contains every block
    whose content differs from the content at the id's point;
  * the same holds after opening read-write (recovery) and reopening.
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np

import vdisk
from vdisk.testing import RecordingIO
from helpers import extent_blocks, pattern


class CrashModel:
    def __init__(self, size: int, block_size: int):
        self.bs = block_size
        self.cur = np.zeros(size, np.uint8)
        self.flushed = self.cur.copy()
        self.versions: list[np.ndarray] = []
        self.points: list[tuple[str, np.ndarray]] = []   # (change id, content then)
        self.snap_content: dict[str, np.ndarray] = {}     # every snapshot ever taken: frozen content
        self.committed: set[str] = set()                  # snapshots that must exist
        self.in_flight: str | None = None                 # the snapshot an op is creating/deleting

    def will_become(self, new: np.ndarray) -> None:
        self.versions.append(new.copy())
        self.cur = new

    def flushed_now(self) -> None:
        self.flushed = self.cur.copy()
        self.versions = []

    def allowed(self, state: np.ndarray) -> np.ndarray:
        """Boolean per byte: the byte is the flushed value or one written since."""
        def fit(a):
            out = np.zeros(len(state), np.uint8)
            n = min(len(a), len(state))
            out[:n] = a[:n]
            return out
        ok = state == fit(self.flushed)
        for v in self.versions:
            ok |= state == fit(v)
        return ok


class CrashChecker:
    def __init__(self, model: CrashModel, rng: random.Random, per_point: int, workdir: str):
        self.model = model
        self.rng = rng
        self.per_point = per_point
        self.workdir = workdir
        self.states = 0
        self.leaky = 0

    def sample(self, rec: RecordingIO) -> None:
        n = len(rec.pending)
        choices = [[True] * n, [False] * n]
        while len(choices) < self.per_point:
            choices.append([self.rng.random() < 0.5 for _ in range(n)])
        for keep in choices[:max(1, self.per_point)]:
            torn = self.rng.random() < 0.25
            self.verify(rec.crash_image(self.rng, keep=keep, torn=torn))

    def verify(self, image: bytes) -> None:
        self.states += 1
        path = os.path.join(self.workdir, f"crash-{self.states}.vdk")
        with open(path, "wb") as f:
            f.write(image)
        try:
            res = vdisk.check(path)
            assert not res.corruptions, f"state {self.states}: corruption {res.corruptions}"
            self.leaky += res.leaked_blocks > 0
            with vdisk.open(path) as d:
                self._verify_disk(d, "read-only open")
            if self.rng.random() < 0.2:          # recovery path: open r+, close, reopen
                with vdisk.open(path, "r+"):
                    pass
                with vdisk.open(path) as d:
                    self._verify_disk(d, "after recovery")
                assert not vdisk.check(path).corruptions
        finally:
            os.unlink(path)

    def _verify_disk(self, d, when: str) -> None:
        state = np.frombuffer(d.pread(d.size, 0), np.uint8)
        ok = self.model.allowed(state)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise AssertionError(f"state {self.states} ({when}): byte {bad} (block {bad // d.block_size}) holds "
                                 f"{state[bad]}, neither flushed ({self.model.flushed[bad] if bad < len(self.model.flushed) else 'n/a'}) "
                                 f"nor written since")
        names = {i.name for i in d.snapshots}
        missing = self.model.committed - names - {self.model.in_flight}
        assert not missing, f"state {self.states} ({when}): committed snapshots {missing} vanished"
        for name in names:
            assert name in self.model.snap_content, f"state {self.states}: unknown snapshot {name!r}"
            with d.open_snapshot(name) as snap:
                frozen = self.model.snap_content[name]
                got_s = np.frombuffer(snap.pread(snap.size, 0), np.uint8)
                if not np.array_equal(got_s, frozen):
                    bad = int(np.flatnonzero(got_s != frozen)[0]) if len(got_s) == len(frozen) else -1
                    raise AssertionError(f"state {self.states} ({when}): snapshot {name!r} differs at byte {bad}")
        for cid, then in self.model.points:
            got = extent_blocks(d.changes_since(cid), d.block_size)
            bs = d.block_size
            for b in range(-(-len(state) // bs)):
                lo, hi = b * bs, min((b + 1) * bs, len(state))
                differs = hi > len(then) or not np.array_equal(state[lo:hi], then[lo:hi])
                if differs and b not in got:
                    raise AssertionError(f"state {self.states} ({when}): block {b} changed since {cid} "
                                         f"but is not reported")


def run_campaign(seed: int, ops: int, per_point: int, block_size: int = 4096, size: int = 96 * 1024,
                 fold_interval: int = 7, snapshots: bool = False) -> CrashChecker:
    """One random workload with crash states sampled at every fsync and after every op."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.vdk")
        d = vdisk.create(path, size, block_size=block_size, io_factory=RecordingIO)
        d.fold_interval = fold_interval
        model = CrashModel(size, block_size)
        checker = CrashChecker(model, rng, per_point, tmp)
        rec = d._io
        rec.on_fsync = checker.sample
        try:
            for step in range(ops):
                size = d.size
                kind = rng.choices(["write", "zero", "discard", "flush", "checkpoint", "resize",
                                    "snapshot", "delete", "revert"],
                                   [45, 8, 12, 12, 10, 5] + ([6, 3, 3] if snapshots else [0, 0, 0]))[0]
                new = model.cur.copy()
                if kind in ("write", "zero"):
                    off = rng.randrange(size)
                    length = rng.randint(1, min(size - off, 3 * block_size))
                    data = pattern(rng.randrange(2**31), length, zero=kind == "zero")
                    new[off:off + length] = np.frombuffer(data, np.uint8)
                    model.will_become(new)
                    d.pwrite(data, off)
                elif kind == "discard":
                    off = rng.randrange(size)
                    length = rng.randint(1, size - off)
                    new[off:off + length] = 0
                    model.will_become(new)
                    d.discard(off, length)
                elif kind == "flush":
                    d.flush()
                    model.flushed_now()
                elif kind == "checkpoint":
                    cid = d.checkpoint()
                    model.flushed_now()
                    model.points.append((cid, model.cur.copy()))
                elif kind == "snapshot":
                    name = f"s{step}"
                    model.in_flight = name
                    model.snap_content[name] = model.cur.copy()
                    snap = d.snapshot(name)
                    snap.close()
                    model.flushed_now()
                    model.committed.add(name)
                    model.points.append((snap.change_id, model.cur.copy()))
                    model.in_flight = None
                elif kind == "delete":
                    if not model.committed:
                        continue
                    name = rng.choice(sorted(model.committed))
                    model.in_flight = name
                    d.delete_snapshot(name)
                    model.committed.discard(name)
                    model.flushed_now()
                    model.in_flight = None
                elif kind == "revert":
                    if not model.committed:
                        continue
                    name = rng.choice(sorted(model.committed))
                    model.will_become(model.snap_content[name].copy())
                    d.revert(name)
                    model.flushed_now()
                else:
                    new_size = rng.randrange(1, 2 * size // 512 + 2) * 512
                    grown = np.zeros(new_size, np.uint8)
                    grown[:min(size, new_size)] = new[:min(size, new_size)]
                    if new_size < size:          # the cut-off data becomes zeros first
                        cut = new.copy()
                        cut[new_size:] = 0
                        model.will_become(cut)
                    model.will_become(grown)
                    d.resize(new_size)
                    model.flushed_now()
                checker.sample(rec)
        finally:
            rec.on_fsync = None
            d.close()
        return checker
