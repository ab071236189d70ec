"""Concurrency: threads sharing one Disk, processes sharing one image.

Threads.  Writer threads write overlapping ranges (a shared area) and
disjoint ones (an area of their own) while reader threads read, a
snapshot thread takes, reads and deletes snapshots, and a tracking thread
checkpoints and asks changes_since.  Every public Disk method takes the
Disk's lock, so every call must be atomic and the whole history
linearizable: there is one order of all calls, consistent with real time
(a call that returned before another started comes first), in which every
read returns the content left by the writes before it.

Each write fills its range with 8-byte words naming the write and the
word's position, so every word read says which write put it there.  The
check builds the precedence graph of what the answers imply and looks for
a cycle (a cycle means no such order exists):
  * real time: X -> Y when X returned before Y was called;
  * final content: at each word, every other write that covered it came
    before the write whose word is there at the end;
  * a read (a snapshot is a read of the whole disk at the moment it was
    taken) that saw write V at a word: V -> read, and the read -> the final
    writer of that word when that is not V; a word read as zero: the read
    came before every write that covers it.
A torn write (two overlapping writes each winning part of the overlap), a
torn or stale read, or a snapshot that is not one instant all make a
cycle.  A word naming a write that never covered that position (foreign
or misplaced data) fails at once.

changes_since(id) must contain every block written by a write that
certainly ran between the id's point and the query (started after the
point's call returned, returned before the query was called), and
nothing outside the blocks written by writes that may have (no crash: the
tracking is exact up to whole blocks).  The same holds for a snapshot's
changes_since, up to the snapshot's point.  At the end, the content must
survive close and reopen, and check must find the image clean.

VDISK_CONCURRENCY_ROUNDS (default 1) repeats each scenario with new seeds,
VDISK_CONCURRENCY_WRITES (default 300) sets the writes per writer thread:
the long run is docs/RELIABILITY.md's.

Processes.  Writers and readers in several processes compete for one
image: a writer must be alone (a shared counter inside the image counts
every writer's turn exactly once, and a busy flag is never seen set by
another writer or by a reader).
"""
from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import vdisk
from vdisk_testkit.helpers import block_mask

ROUNDS = int(os.environ.get("VDISK_CONCURRENCY_ROUNDS", "1"))
WRITES = int(os.environ.get("VDISK_CONCURRENCY_WRITES", "300"))

WORD = 8
ID_SHIFT = 20            # write id = (thread + 1) << ID_SHIFT | k


def words_for(wid: int, first_word: int, count: int) -> bytes:
    """The content of a write: per word, its id (high half) and its position (low half)."""
    pos = np.arange(first_word, first_word + count, dtype=np.uint64)
    return ((np.uint64(wid) << np.uint64(32)) | pos).astype("<u8").tobytes()


@dataclasses.dataclass
class Call:
    start: int               # time.monotonic_ns() before the call
    end: int                 # after it returned


@dataclasses.dataclass
class Write(Call):
    wid: int
    w0: int                  # first word
    w1: int                  # past the last word


@dataclasses.dataclass
class Read(Call):
    w0: int
    words: np.ndarray        # uint64 words read
    what: str


@dataclasses.dataclass
class Point(Call):
    cid: str                 # a change id: a checkpoint's or a snapshot's


@dataclasses.dataclass
class Query(Call):
    cid: str
    blocks: np.ndarray       # boolean per block: reported
    upto: Call | None = None  # a snapshot's query: its answer is as of the snapshot


class History:
    def __init__(self):
        self.lock = threading.Lock()
        self.writes: list[Write] = []
        self.reads: list[Read] = []
        self.points: list[Point] = []
        self.queries: list[Query] = []
        self.snapshot_reads: list[tuple[str, np.ndarray]] = []   # (name, words) read later by another thread
        self.snapshot_content: dict[str, np.ndarray] = {}
        self.final: np.ndarray | None = None                      # the content once every thread is done

    def add(self, kind: str, item) -> None:
        with self.lock:
            getattr(self, kind).append(item)


def now() -> int:
    return time.monotonic_ns()


# ---------------------------------------------------------------------------- the scenario
@dataclasses.dataclass
class Scenario:
    seed: int
    block_size: int = 4096
    nblocks: int = 256
    writers: int = 4
    readers: int = 2
    writes: int = WRITES
    shared_blocks: int = 8           # blocks [0, shared) every writer writes
    private_blocks: int = 32         # then one area per writer

    @property
    def size(self) -> int:
        return self.nblocks * self.block_size


def _writer(d, sc: Scenario, t: int, hist: History, errors: list) -> None:
    rng = random.Random(sc.seed * 100 + t)
    wpb = sc.block_size // WORD
    try:
        for k in range(sc.writes):
            if rng.random() < 0.6:
                a0, a1 = 0, sc.shared_blocks
            else:
                a0 = sc.shared_blocks + t * sc.private_blocks
                a1 = a0 + sc.private_blocks
            shape = rng.random()
            if shape < 0.4:         # inside one block: the in-place path
                b = rng.randrange(a0, a1)
                n = rng.randint(1, min(64, wpb))
                w0 = b * wpb + rng.randrange(wpb - n + 1)
            elif shape < 0.8:       # across block boundaries
                w0 = rng.randrange(a0 * wpb, a1 * wpb - 1)
                n = rng.randint(2, min(3 * wpb, a1 * wpb - w0))
            else:                   # whole blocks
                nbl = rng.randint(1, 2)
                b = rng.randrange(a0, a1 - nbl + 1)
                w0, n = b * wpb, nbl * wpb
            wid = (t + 1) << ID_SHIFT | k
            data = words_for(wid, w0, n)
            start = now()
            assert d.pwrite(data, w0 * WORD) == len(data)
            hist.add("writes", Write(start, now(), wid, w0, w0 + n))
            if rng.random() < 0.05:
                d.flush()
    except BaseException as exc:      # noqa: BLE001 - reported by the test
        errors.append(exc)


def _reader(d, sc: Scenario, t: int, hist: History, stop: threading.Event, errors: list) -> None:
    rng = random.Random(sc.seed * 100 + 50 + t)
    total = sc.size // WORD
    wpb = sc.block_size // WORD
    try:
        while not stop.is_set():
            r = rng.random()
            if r < 0.05:
                w0, n = 0, total
            elif r < 0.5:
                b = rng.randrange(sc.nblocks)
                n = rng.randint(1, wpb)
                w0 = b * wpb + rng.randrange(wpb - n + 1)
            else:
                w0 = rng.randrange(total - 1)
                n = rng.randint(1, min(3 * wpb, total - w0))
            start = now()
            if rng.random() < 0.3:
                buf = np.empty(n * WORD, np.uint8)
                d.preadinto(buf, w0 * WORD)
                raw = buf.tobytes()
            else:
                raw = d.pread(n * WORD, w0 * WORD)
            end = now()
            hist.add("reads", Read(start, end, w0, np.frombuffer(raw, "<u8").copy(), "read"))
            if t == 0 and rng.random() < 0.05:      # a snapshot another thread may be deleting
                with hist.lock:
                    names = sorted(hist.snapshot_content)
                if names:
                    name = rng.choice(names)
                    try:
                        with d.open_snapshot(name) as snap:
                            words = np.frombuffer(snap.pread(snap.size, 0), "<u8").copy()
                    except (vdisk.SnapshotNotFoundError, vdisk.ClosedError):
                        continue
                    hist.add("snapshot_reads", (name, words))
    except BaseException as exc:      # noqa: BLE001
        errors.append(exc)


def _snapshotter(d, sc: Scenario, hist: History, stop: threading.Event, errors: list) -> None:
    rng = random.Random(sc.seed * 100 + 80)
    live: list[tuple[str, Point]] = []
    n = 0
    try:
        while not stop.is_set():
            n += 1
            name = f"c{n}"
            start = now()
            snap = d.snapshot(name)
            end = now()
            words = np.frombuffer(snap.pread(snap.size, 0), "<u8").copy()
            point = Point(start, end, snap.change_id)
            hist.add("reads", Read(start, end, 0, words, f"snapshot {name}"))
            hist.add("points", point)
            with hist.lock:
                hist.snapshot_content[name] = words
            with hist.lock:    # what changed up to the snapshot, since a point surely before it
                before = [p for p in hist.points if p.end < point.start]
            if before and rng.random() < 0.5:
                earlier = rng.choice(before)
                hist.add("queries", Query(point.start, point.end, earlier.cid,
                                          block_mask(snap.changes_since(earlier.cid), sc.block_size, sc.nblocks),
                                          upto=point))
            again = np.frombuffer(snap.pread(snap.size, 0), "<u8")
            assert np.array_equal(again, words), f"snapshot {name} changed while the disk was written"
            snap.close()
            live.append((name, point))
            while len(live) > 3 or (live and rng.random() < 0.3):
                old, _ = live.pop(rng.randrange(len(live)))
                d.delete_snapshot(old)
            time.sleep(rng.uniform(0, 0.01))
    except BaseException as exc:      # noqa: BLE001
        errors.append(exc)


def _tracker(d, sc: Scenario, hist: History, stop: threading.Event, errors: list) -> None:
    rng = random.Random(sc.seed * 100 + 90)
    try:
        while not stop.is_set():
            if rng.random() < 0.4 or not hist.points:
                start = now()
                cid = d.checkpoint()
                hist.add("points", Point(start, now(), cid))
            else:
                with hist.lock:
                    point = rng.choice(hist.points)
                start = now()
                ext = d.changes_since(point.cid)
                end = now()
                hist.add("queries", Query(start, end, point.cid, block_mask(ext, sc.block_size, sc.nblocks)))
            time.sleep(rng.uniform(0, 0.005))
    except BaseException as exc:      # noqa: BLE001
        errors.append(exc)


def run_scenario(path: str, sc: Scenario) -> History:
    """Run the threads on a new image at path; returns what every call answered."""
    hist = History()
    errors: list = []
    stop = threading.Event()
    d = vdisk.create(path, sc.size, block_size=sc.block_size)
    d.fold_interval = 17          # folds in the middle of the writes, too
    try:
        writers = [threading.Thread(target=_writer, args=(d, sc, t, hist, errors)) for t in range(sc.writers)]
        others = [threading.Thread(target=_reader, args=(d, sc, t, hist, stop, errors)) for t in range(sc.readers)]
        others += [threading.Thread(target=_snapshotter, args=(d, sc, hist, stop, errors)),
                   threading.Thread(target=_tracker, args=(d, sc, hist, stop, errors))]
        for th in writers + others:
            th.start()
        for th in writers:
            th.join()
        stop.set()
        for th in others:
            th.join()
        if errors:
            raise errors[0]
        final = np.frombuffer(d.pread(d.size, 0), "<u8").copy()
        hist.reads.append(Read(now(), now(), 0, final, "final read"))
        hist.final = final
        for name in [i.name for i in d.snapshots]:
            d.delete_snapshot(name)
    finally:
        d.close()
    with vdisk.open(path) as d2:
        again = np.frombuffer(d2.pread(d2.size, 0), "<u8")
        assert np.array_equal(again, hist.final), "content changed across close and reopen"
    res = vdisk.check(path)
    assert res.ok and not res.leaked_blocks, res
    return hist


# ---------------------------------------------------------------------------- the checks
class Linearizability:
    """The precedence graph of a history (see the module docstring)."""

    def __init__(self, hist: History, total_words: int):
        self.hist = hist
        ws = hist.writes
        self.index = {w.wid: i for i, w in enumerate(ws)}
        self.w0 = np.array([w.w0 for w in ws], np.int64)
        self.w1 = np.array([w.w1 for w in ws], np.int64)
        self.total = total_words
        self.final = self._decode(0, hist.final, "the final content")
        # nodes: writes, then reads, then one per distinct end time (the real-time chain)
        self.calls: list[Call] = list(ws) + list(hist.reads)
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []

    def _decode(self, w0: int, words: np.ndarray, what: str) -> np.ndarray:
        """Per word: the index of the write that put it there, or -1 for zero;
        fails on a word no write could have put there."""
        pos = np.arange(w0, w0 + len(words), dtype=np.uint64)
        wid = (words >> np.uint64(32)).astype(np.int64)
        zero = words == 0
        bad = ~zero & ((words & np.uint64(0xFFFFFFFF)) != pos)
        idx = np.full(len(words), -1, np.int64)
        known = np.array([self.index.get(int(x), -1) for x in np.unique(wid[~zero])], np.int64)
        lut = dict(zip(np.unique(wid[~zero]).tolist(), known.tolist()))
        if (~zero).any():
            idx[~zero] = np.array([lut[x] for x in wid[~zero].tolist()], np.int64)
        bad |= ~zero & (idx < 0)
        ok = idx >= 0
        covers = np.zeros(len(words), bool)
        covers[ok] = (self.w0[idx[ok]] <= pos[ok].astype(np.int64)) & (pos[ok].astype(np.int64) < self.w1[idx[ok]])
        bad |= ~zero & ~covers
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise AssertionError(f"{what}: word {w0 + i} (byte {(w0 + i) * WORD}) holds {int(words[i]):#x}: "
                                 f"no write put that there (foreign, misplaced or garbage data)")
        return idx

    def _edge(self, a, b) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(b, np.int64))
        self.edges.append((a.ravel(), b.ravel()))

    def check(self) -> None:
        nw = len(self.hist.writes)
        final = self.final
        # every word a write covered holds a write's data at the end
        cover = np.zeros(self.total + 1, np.int64)
        np.add.at(cover, self.w0, 1)
        np.add.at(cover, self.w1, -1)
        covered = np.cumsum(cover)[:self.total] > 0
        lost = covered & (final < 0)
        assert not lost.any(), f"word {int(np.flatnonzero(lost)[0])} was written but reads as zero at the end"
        # final content: every write -> the final writer of each word it covered
        for i in range(nw):
            winners = np.unique(final[self.w0[i]:self.w1[i]])
            self._edge(i, winners[winners != i])
        # reads
        for j, r in enumerate(self.hist.reads):
            node = nw + j
            seen = self._decode(r.w0, r.words, f"{r.what} of words [{r.w0}, {r.w0 + len(r.words)})")
            fin = final[r.w0:r.w0 + len(r.words)]
            self._edge(np.unique(seen[seen >= 0]), node)
            later = np.unique(fin[(seen != fin) & (fin >= 0)])
            self._edge(node, later)
            zero = seen < 0
            if zero.any():      # read before every write covering a word it read as zero
                cz = np.concatenate(([0], np.cumsum(zero)))
                lo = np.maximum(self.w0, r.w0) - r.w0
                hi = np.minimum(self.w1, r.w0 + len(r.words)) - r.w0
                overlap = hi > lo
                hits = np.zeros(nw, bool)
                hits[overlap] = cz[hi[overlap]] > cz[lo[overlap]]
                self._edge(node, np.flatnonzero(hits))
        self._real_time()
        self._find_cycle()

    def _real_time(self) -> None:
        n = len(self.calls)
        starts = np.array([c.start for c in self.calls], np.int64)
        ends = np.array([c.end for c in self.calls], np.int64)
        order = np.argsort(ends, kind="stable")
        sorted_ends = ends[order]
        chain = n + np.arange(n)                   # time node k: "the k-th end has passed"
        self._edge(order, chain)                   # a call -> the time node of its end
        self._edge(chain[:-1], chain[1:])
        k = np.searchsorted(sorted_ends, starts, side="left") - 1    # the last end strictly before each start
        has = k >= 0
        self._edge(chain[k[has]], np.flatnonzero(has))
        self.nodes = 2 * n

    def _find_cycle(self) -> None:
        src = np.concatenate([e[0] for e in self.edges])
        dst = np.concatenate([e[1] for e in self.edges])
        n = self.nodes
        indeg = np.bincount(dst, minlength=n)
        order = np.argsort(src, kind="stable")
        src_s, dst_s = src[order], dst[order]
        first = np.searchsorted(src_s, np.arange(n + 1))
        queue = list(np.flatnonzero(indeg == 0))
        indeg = indeg.tolist()
        dst_l = dst_s.tolist()
        first_l = first.tolist()
        done = 0
        while queue:
            v = queue.pop()
            done += 1
            for u in dst_l[first_l[v]:first_l[v + 1]]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    queue.append(u)
        if done < n:
            cycle = self._a_cycle(src, dst, [d > 0 for d in indeg])
            raise AssertionError("no order of the calls explains the answers; a cycle: "
                                 + " -> ".join(self._describe(v) for v in cycle if v < len(self.calls)))

    def _a_cycle(self, src: np.ndarray, dst: np.ndarray, stuck: list[bool]) -> list[int]:
        """A cycle among the nodes the topological sort could not place: walk
        back along predecessors (each such node has one) until a node repeats."""
        preds: dict[int, int] = {}
        for a, b in zip(src.tolist(), dst.tolist()):
            if stuck[a] and stuck[b]:
                preds.setdefault(b, a)
        v = next(i for i, s in enumerate(stuck) if s)
        seen: dict[int, int] = {}
        path = []
        while v not in seen:
            seen[v] = len(path)
            path.append(v)
            v = preds[v]
        return path[seen[v]:][::-1]

    def _describe(self, v: int) -> str:
        nw = len(self.hist.writes)
        c = self.calls[v]
        t0 = min(x.start for x in self.calls)
        when = f" (µs {(c.start - t0) // 1000} to {(c.end - t0) // 1000})"
        if v < nw:
            return f"write {c.wid:#x} of words [{c.w0}, {c.w1}){when}"
        return f"{c.what} of words [{c.w0}, {c.w0 + len(c.words)}){when}"


def check_tracking(hist: History, sc: Scenario) -> int:
    """Every changes_since answer against the writes that surely / possibly ran in its interval."""
    wpb = sc.block_size // WORD
    ws = hist.writes
    starts = np.array([w.start for w in ws], np.int64)
    ends = np.array([w.end for w in ws], np.int64)
    b0 = np.array([w.w0 // wpb for w in ws], np.int64)
    b1 = np.array([(w.w1 - 1) // wpb + 1 for w in ws], np.int64)
    points = {p.cid: p for p in hist.points}

    def blocks(sel):
        acc = np.zeros(sc.nblocks + 1, np.int64)
        np.add.at(acc, b0[sel], 1)
        np.add.at(acc, b1[sel], -1)
        return np.cumsum(acc)[:sc.nblocks] > 0

    for q in hist.queries:
        p = points[q.cid]
        upto = q.upto or q
        must = blocks((starts > p.end) & (ends < upto.start))
        may = blocks((ends > p.start) & (starts < upto.end))
        what = f"changes_since({q.cid})" + (" of a snapshot" if q.upto else "")
        missing = must & ~q.blocks
        assert not missing.any(), f"{what} misses blocks {np.flatnonzero(missing)[:8].tolist()} written after it"
        extra = q.blocks & ~may
        assert not extra.any(), f"{what} reports blocks {np.flatnonzero(extra)[:8].tolist()} no write touched"
    return len(hist.queries)


def check_history(hist: History, sc: Scenario) -> dict:
    Linearizability(hist, sc.size // WORD).check()
    queries = check_tracking(hist, sc)
    for name, words in hist.snapshot_reads:
        assert np.array_equal(words, hist.snapshot_content[name]), f"snapshot {name} read differently when opened"
    return {"writes": len(hist.writes), "reads": len(hist.reads), "points": len(hist.points), "queries": queries,
            "snapshot_reads": len(hist.snapshot_reads)}


@pytest.mark.parametrize("block_size", [4096, 65536])
@pytest.mark.parametrize("rnd", range(ROUNDS))
def test_threads_against_a_linearizable_model(tmp_path, block_size, rnd):
    sc = Scenario(seed=rnd * 2 + (block_size == 65536), block_size=block_size,
                  nblocks=256 if block_size == 4096 else 24, shared_blocks=8 if block_size == 4096 else 3,
                  private_blocks=32 if block_size == 4096 else 4)
    hist = run_scenario(str(tmp_path / "c.vdk"), sc)
    stats = check_history(hist, sc)
    assert stats["queries"] > 5 and stats["points"] > 3 and stats["reads"] > 50, stats
    print(stats)


# ---------------------------------------------------------------------------- the checker can fail
def _history_of(writes, reads, final, total):
    hist = History()
    hist.writes = writes
    hist.reads = reads
    hist.final = final
    return Linearizability(hist, total)


def test_checker_finds_a_torn_write():
    """Two overlapping writes, each winning part of the overlap: no order explains it."""
    a = Write(0, 10, 1 << ID_SHIFT, 0, 4)
    b = Write(0, 10, 2 << ID_SHIFT, 2, 6)
    wa = np.frombuffer(words_for(a.wid, 0, 4), "<u8")
    wb = np.frombuffer(words_for(b.wid, 2, 4), "<u8")
    final = np.concatenate([wa[:3], wb[1:]])       # a wins word 2, b wins word 3
    with pytest.raises(AssertionError, match="no order"):
        _history_of([a, b], [], final, 6).check()
    final = np.concatenate([wa[:2], wb])           # b wins the whole overlap: fine
    _history_of([a, b], [], final, 6).check()


def test_checker_finds_a_stale_read():
    """A read that started after a write returned but does not see it."""
    a = Write(0, 10, 1 << ID_SHIFT, 0, 4)
    wa = np.frombuffer(words_for(a.wid, 0, 4), "<u8")
    stale = Read(20, 30, 0, np.zeros(4, np.uint64), "read")
    with pytest.raises(AssertionError, match="no order"):
        _history_of([a], [stale], wa.copy(), 4).check()
    early = Read(5, 30, 0, np.zeros(4, np.uint64), "read")   # overlaps the write in time: fine
    _history_of([a], [early], wa.copy(), 4).check()


def test_checker_finds_misplaced_data():
    a = Write(0, 10, 1 << ID_SHIFT, 0, 4)
    shifted = np.frombuffer(words_for(a.wid, 1, 4), "<u8")
    with pytest.raises(AssertionError, match="no write put that there"):
        _history_of([a], [], shifted.copy(), 4).check()


# ---------------------------------------------------------------------------- races found by the campaign
def test_write_racing_a_shrink_never_lands_past_the_end(tmp_path):
    """A write that passed its range check just before another thread shrank
    the disk must not store data past the new end: after a grow, that area
    reads as zeros."""
    path = str(tmp_path / "r.vdk")
    with vdisk.create(path, 64 * 1024, block_size=4096) as d:
        d.pwrite(b"\1" * 8192, 48 * 1024)
        d.flush()
        errors = []

        def late_write(offset):
            try:
                d.pwrite(b"\2" * 100, offset)        # in range for the size the write sees
            except vdisk.OutOfRangeError as exc:
                errors.append(exc)

        # one write into the cut-off tail of the new last block (mapped: in place), one past it
        threads = [threading.Thread(target=late_write, args=(off,)) for off in (50 * 1024, 60 * 1024)]
        with d._lock:                      # the writers wait for the lock, past their range checks
            for t in threads:
                t.start()
            time.sleep(0.3)
            d.resize(49 * 1024)            # the same (reentrant) lock: the shrink goes first
        for t in threads:
            t.join()
        d.resize(64 * 1024)
        tail = d.pread(15 * 1024, 49 * 1024)
        assert tail == bytes(len(tail)), "data written past the end came back with the grow"
        assert len(errors) == 2, "a write past the end must fail"
    assert vdisk.check(path).ok


def test_snapshot_changes_since_racing_its_delete(tmp_path):
    """A snapshot view's changes_since reads the frozen counters; a delete and
    new writes in another thread must not hand it reused blocks."""
    path = str(tmp_path / "s.vdk")
    with vdisk.create(path, 256 * 1024, block_size=4096) as d:
        base = d.checkpoint()
        d.pwrite(b"\1" * 4096, 0)
        snap = d.snapshot("s")                # its counters load at its first changes_since
        reading, go = threading.Event(), threading.Event()
        real = d._io.preadinto
        counter_off = snap._rec.counter_offset

        def slow_preadinto(buf, offset):
            if offset == counter_off and not go.is_set():
                reading.set()
                go.wait(2)
            return real(buf, offset)

        d._io.preadinto = slow_preadinto
        result = []

        def query():
            try:
                result.append(snap.changes_since(base))
            except vdisk.ClosedError as exc:
                result.append(exc)

        t = threading.Thread(target=query)
        t.start()
        assert reading.wait(5)

        def delete_and_reuse():
            d.delete_snapshot("s")
            for b in range(1, 60):           # the freed blocks of the frozen counters go to new data
                d.pwrite(b"\xff" * 4096, b * 4096)
            d.flush()

        t2 = threading.Thread(target=delete_and_reuse)
        t2.start()
        t2.join(0.5)                      # with the fix, it waits for the query's lock
        go.set()
        t.join()
        t2.join()
        d._io.preadinto = real
        (res,) = result
        if not isinstance(res, vdisk.ClosedError):
            assert list(res) == [(0, 4096)], f"the snapshot's answer came from reused blocks: {res}"


# ---------------------------------------------------------------------------- processes
_PROC_CHILD = textwrap.dedent("""
    import os, random, sys, time
    import vdisk
    path, role, turns, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    pid = os.getpid()
    done = refused = 0
    deadline = time.monotonic() + 60
    while done < turns and time.monotonic() < deadline:
        try:
            d = vdisk.open(path, "r+" if role == "writer" else "r")
        except vdisk.ImageLockedError:
            refused += 1
            time.sleep(rng.uniform(0, 0.003))
            continue
        with d:
            busy = int.from_bytes(d.pread(8, 8), "little")
            if busy:
                print("error", role, "saw the busy flag of", busy, flush=True)
                sys.exit(2)
            if role == "writer":
                count = int.from_bytes(d.pread(8, 0), "little")
                d.pwrite(pid.to_bytes(8, "little"), 8)
                time.sleep(rng.uniform(0, 0.002))
                if int.from_bytes(d.pread(8, 8), "little") != pid:
                    print("error another writer wrote the busy flag", flush=True)
                    sys.exit(2)
                d.pwrite((count + 1).to_bytes(8, "little"), 0)
                d.pwrite(bytes(8), 8)
            else:
                time.sleep(rng.uniform(0, 0.002))
        done += 1
    print("done", done, refused, flush=True)
""")


def test_processes_one_writer_or_many_readers(tmp_path):
    """Three writer and two reader processes compete for one image: every
    writer turn is counted exactly once (no two writers at once) and nobody
    sees another writer's busy flag (no reader beside a writer)."""
    path = str(tmp_path / "p.vdk")
    vdisk.create(path, 1 << 20, block_size=4096).close()
    turns = 15 * ROUNDS
    roles = ["writer"] * 3 + ["reader"] * 2
    procs = [subprocess.Popen([sys.executable, "-c", _PROC_CHILD, path, role, str(turns), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, role in enumerate(roles)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out, err[-2000:])
    done = [int(out.split()[1]) for out, _ in outs]
    refused = sum(int(out.split()[2]) for out, _ in outs)
    assert done == [turns] * len(roles), done
    with vdisk.open(path) as d:
        assert int.from_bytes(d.pread(8, 0), "little") == 3 * turns
        assert d.pread(8, 8) == bytes(8)
    assert refused > 0, "the processes never competed: the test proves nothing"
    assert vdisk.check(path).ok


def test_disk_lock_is_a_reentrant_lock_the_hot_path_honours(tmp_path):
    """The Disk's lock is vdisk._hotpath.DiskLock (C, reentrant, shared with the
    HotPath): RLock semantics, and a thread holding it stops the other
    threads' hot-path reads and writes until it lets go."""
    from vdisk._hotpath import DiskLock
    lk = DiskLock()
    assert lk.acquire() and lk.acquire(blocking=False)      # reentrant
    other = []
    t = threading.Thread(target=lambda: other.append((lk.acquire(blocking=False), lk.acquire(timeout=0.05))))
    t.start()
    t.join()
    assert other == [(False, False)]                         # held by this thread: others wait
    with pytest.raises(RuntimeError):
        _release_elsewhere(lk)                              # not the owner
    lk.release()
    lk.release()
    with pytest.raises(RuntimeError):
        lk.release()
    assert _acquire_elsewhere(lk)

    path = str(tmp_path / "l.vdk")
    d = vdisk.create(path, "1MiB", block_size="64KiB")
    d.pwrite(b"a" * 65536, 0)
    d.flush()
    d.pwrite(b"b", 0)                                        # armed: the next calls are on the hot path
    done = []
    with d._lock:
        ts = [threading.Thread(target=lambda: done.append(d.pread(1, 0))),
              threading.Thread(target=lambda: done.append(d.pwrite(b"c", 1)))]
        for th in ts:
            th.start()
        time.sleep(0.3)
        assert done == [], "the hot path ran while another thread held the Disk's lock"
    for th in ts:
        th.join(10)
    assert sorted(map(repr, done)) == sorted([repr(b"b"), repr(1)])
    d.close()


def test_disk_lock_wait_times_out_and_is_interrupted_by_a_signal():
    """A thread waiting for the DiskLock another thread holds: a timeout ends
    the wait after (not before) the timeout, a signal's handler runs during
    the wait (Ctrl-C raises KeyboardInterrupt in it), and once the holder
    lets go the waiter takes it."""
    import signal

    from vdisk._hotpath import DiskLock
    lk = DiskLock()
    held, release = threading.Event(), threading.Event()

    def holder():
        with lk:
            held.set()
            release.wait(10)
    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    t0 = time.monotonic()
    assert lk.acquire(timeout=0.15) is False
    waited = time.monotonic() - t0
    assert 0.14 <= waited < 2, waited
    assert lk.acquire(blocking=False) is False

    def interrupt(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGUSR1, interrupt)
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            lk.acquire()                        # blocks: only the handler ends it
        assert time.monotonic() - t0 < 3
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    release.set()
    assert lk.acquire(timeout=10) is True       # handed over once the holder is done
    assert lk._is_owned()
    lk.release()
    t.join(10)


def _release_elsewhere(lk) -> None:
    err = []

    def run():
        try:
            lk.release()
        except RuntimeError as exc:
            err.append(exc)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if err:
        raise err[0]


def _acquire_elsewhere(lk) -> bool:
    got = []

    def run():
        got.append(lk.acquire(timeout=1))
        lk.release()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return got == [True]


def test_alone_is_the_only_thread_of_the_only_interpreter():
    """The hot path keeps the GIL through its system calls only when no other
    thread could want it: the only thread state of the only interpreter.  A
    thread counts from its start (before it runs) until it has ended; a
    second interpreter counts too (it shares the GIL).  Asked in a fresh
    interpreter: this one may hold threads that earlier tests left."""
    code = textwrap.dedent("""
        import threading, time
        from vdisk._hotpath import alone_now
        assert alone_now()
        t = threading.Thread(target=time.sleep, args=(0.5,))
        assert alone_now()                  # made, not started: no thread state yet
        t.start()
        assert not alone_now()
        t.join()
        assert alone_now()
        try:
            import _xxsubinterpreters as sub
        except ImportError:
            print("no subinterpreters")
        else:
            i = sub.create()
            assert not alone_now()
            sub.destroy(i)
            assert alone_now()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr

