"""How long a flush (or a snapshot create) holds the Disk's lock, and what a writer
thread sees meanwhile.

    python benchmarks/bench_flush_lock.py [--rounds 5] [--flushes 8] [--mib 256] [--snapshots]

A 256 MiB image (64 KiB blocks, prefilled), one writer thread doing random
4 KiB in-place writes as fast as it can (what the NBD server's loop does
for a client writing at qd 16), and a flusher thread flushing every 0.2 s
(the server's periodic fold, ``fold_period``).  Two modes alternate in every
round, on the same image:

* locked: ``with d._lock: d._flush_locked()``, the flush as it was before
  (the same write order, every step under the lock);
* unlocked: ``d.flush()``, whose syncs and table write run without it.

Measured: the time the flusher thread holds the Disk's lock per flush (a
timing wrapper around the lock, counting only the flusher's outermost
holds), and the writer's per-write latency (p50, p99.9, max) over the mode's
run.  No timing is asserted.

--snapshots: the same with a snapshot create (then its delete, untimed
apart) in place of each flush: *locked* takes the snapshot as before (every
fsync under the lock: ``with d._lock: d._flush_locked(); ...create``),
*unlocked* is ``Disk.snapshot`` now (a flush without the lock first).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time

import vdisk
from vdisk import disk as disk_module

MiB = 1 << 20


class TimedRLock:
    """An RLock that records how long the thread named `who` holds it (outermost holds)."""

    def __init__(self, who: str):
        self._l = threading.RLock()
        self.who = who
        self.holds: list[float] = []
        self._depth = 0
        self._since = 0.0

    def _mine(self) -> bool:
        return threading.current_thread().name == self.who

    def acquire(self, *a, **k):
        ok = self._l.acquire(*a, **k)
        if ok and self._mine():
            self._depth += 1
            if self._depth == 1:
                self._since = time.perf_counter()
        return ok

    def release(self):
        if self._mine():
            self._depth -= 1
            if self._depth == 0:
                self.holds.append(time.perf_counter() - self._since)
        self._l.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()

    def _is_owned(self):
        return self._l._is_owned()

    def _release_save(self):
        return self._l._release_save()

    def _acquire_restore(self, state):
        self._l._acquire_restore(state)


def take_snapshot(d, mode: str, name: str) -> None:
    if mode == "locked":            # the old Disk.snapshot: everything under the lock
        with d._lock:
            rec, frozen = d._snap_ops.create(name, d._snapshots)
    else:
        d.snapshot(name).close()


def run_mode(d, lock: TimedRLock, mode: str, flushes: int, nblocks: int, seed: int, snapshots: bool = False):
    stop = threading.Event()
    lat: list[float] = []
    data = os.urandom(4096)
    rng = random.Random(seed)

    def writer():
        while not stop.is_set():
            off = rng.randrange(nblocks * 16) * 4096
            t = time.perf_counter()
            d.pwrite(data, off)
            lat.append(time.perf_counter() - t)

    w = threading.Thread(target=writer, name="writer")
    w.start()
    lock.holds = []
    per_flush = []
    for _ in range(flushes):
        time.sleep(0.2)
        n0 = len(lock.holds)
        if snapshots:
            take_snapshot(d, mode, "b")
            per_flush.append(sum(lock.holds[n0:]))
            d.delete_snapshot("b")
            continue
        if mode == "locked":
            with d._lock:
                d._flush_locked()
        else:
            d.flush()
        per_flush.append(sum(lock.holds[n0:]))
    stop.set()
    w.join()
    lat.sort()
    return per_flush, lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--flushes", type=int, default=8)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--snapshots", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vdisk-flushlock-")
    path = os.path.join(work, "d.vdisk")
    real_rlock = disk_module.threading.RLock
    lock = TimedRLock("flusher")
    disk_module.threading.RLock = lambda: lock       # the Disk's lock is made in Disk.__init__
    try:
        d = vdisk.create(path, args.mib * MiB, block_size="64KiB")
    finally:
        disk_module.threading.RLock = real_rlock
    chunk = os.urandom(8 * MiB)
    for off in range(0, args.mib * MiB, len(chunk)):
        d.pwrite(chunk, off)
    d.flush()
    nblocks = args.mib * MiB // (64 * 1024)
    results = {"locked": ([], []), "unlocked": ([], [])}
    for r in range(args.rounds):
        for mode in (("locked", "unlocked") if r % 2 == 0 else ("unlocked", "locked")):
            box: dict = {}
            t = threading.Thread(target=lambda m=mode: box.update(
                res=run_mode(d, lock, m, args.flushes, nblocks, r, args.snapshots)), name="flusher")
            t.start()
            t.join()
            holds, lat = box["res"]
            results[mode][0].extend(holds)
            results[mode][1].append(lat)
            print(f"round {r} {mode:8s}: lock held per {'snapshot' if args.snapshots else 'flush'} median {statistics.median(holds) * 1e3:.2f} ms, "
                  f"max {max(holds) * 1e3:.2f} ms; writes {len(lat)}, p99.9 {lat[int(len(lat) * 0.999)] * 1e3:.2f} ms,"
                  f" max {lat[-1] * 1e3:.2f} ms", flush=True)
    d.close()
    os.unlink(path)
    os.rmdir(work)
    print(f"load average {os.getloadavg()[0]:.1f}")
    for mode, (holds, lats) in results.items():
        p999 = [lat[int(len(lat) * 0.999)] * 1e3 for lat in lats]
        mx = [lat[-1] * 1e3 for lat in lats]
        print(f"{mode:8s}: lock held per flush median {statistics.median(holds) * 1e3:.2f} ms, "
              f"max {max(holds) * 1e3:.2f} ms (n={len(holds)}); writer p99.9 median {statistics.median(p999):.2f} ms "
              f"[{min(p999):.2f}-{max(p999):.2f}], max {max(mx):.1f} ms; writes/s median "
              f"{statistics.median(len(lat) for lat in lats) / (args.flushes * 0.2):.0f}")


if __name__ == "__main__":
    main()
