"""Incremental backup of a served image while an NBD client writes, against the same
backup of the image opened in-process; and the NBD write latency during that backup.

    python benchmarks/bench_live.py [--rounds 3] [--mib 256] [--changed-mib 64] [--rate 2000]

Each round, on a fresh image: a full backup of consumer `b`, then the same
changed set (--changed-mib of 64 KiB blocks at random places, the same seed
on both sides), then the timed incremental backup with --consumer b:

Both sides first run an empty incremental (since a fresh checkpoint) as a
warm-up: a server process imports h5py at its first backup, a one-time
cost printed apart.

* in-process: ``vdisk.backup(disk, consumer="b")`` on the open Disk, nothing else running;
* served: ``vdisk.backup(path, consumer="b")`` from this process to a `vdisk serve`
  child (the control channel), while one NBD connection writes 4 KiB units
  one after the other (a 1 MiB region: they add at most 1 MiB to the delta),
  --rate writes a second (default 2000, 8 MiB/s; 0: as fast as answered).

Prints the ratio (in-process time / served time: 1.0 means no cost, the
target is >= 0.8) and the writer's latency percentiles while idle, during
the backup, and during a `vdisk check` of the served image (which holds the
image still for the whole check).  No timing is asserted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import vdisk
from vdisk_testkit.live_helpers import StampWriter
from vdisk_testkit.nbd_helpers import ServeProcess

MiB = 1 << 20
BS = 64 * 1024


def prepare(path: str, mib: int, changed_mib: int, seed: int, work: str) -> None:
    rng = np.random.default_rng(seed)
    with vdisk.create(path, mib * MiB, block_size=BS) as d:
        data = rng.integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
        for off in range(0, mib * MiB // 2, 8 * MiB):
            d.pwrite(data, off)
        d.consumers.register("b")
        vdisk.backup(d, os.path.join(work, "full.vdelta"), consumer="b", compression="none")
        blocks = rng.choice(mib * MiB // BS, changed_mib * MiB // BS, replace=False)
        chunk = rng.integers(0, 256, BS, dtype=np.uint8).tobytes()
        for b in blocks.tolist():
            d.pwrite(chunk, b * BS)
    os.unlink(os.path.join(work, "full.vdelta"))


def pct(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, p)) if xs else float("nan")


def one_round(work: str, mib: int, changed_mib: int, seed: int, rate: float) -> dict:
    img = os.path.join(work, "disk.vdk")
    prepare(img, mib, changed_mib, seed, work)
    with vdisk.open(img, "r+") as d:
        warm = os.path.join(work, "warm.vdelta")      # the same warm-up as the served side
        vdisk.backup(d, warm, since=d.checkpoint(), compression="none")
        os.unlink(warm)
        t = time.perf_counter()
        vdisk.backup(d, os.path.join(work, "inproc.vdelta"), consumer="b", compression="none")
        inproc = time.perf_counter() - t
    os.unlink(os.path.join(work, "inproc.vdelta"))
    os.unlink(img)
    prepare(img, mib, changed_mib, seed, work)
    sock = os.path.join(work, "nbd.sock")
    srv = ServeProcess(img, sock)
    try:
        w = StampWriter(sock, 256, rate=rate)       # 256 units of 4 KiB: a 1 MiB region
        time.sleep(1.0)
        idle = list(w.latencies)
        # warm-up: the server's first backup imports h5py (measured apart as "cold")
        with vdisk.connect(img) as live:
            cid = live.checkpoint()
        t = time.perf_counter()
        vdisk.backup(img, os.path.join(work, "warm.vdelta"), since=cid, compression="none")
        cold = time.perf_counter() - t
        os.unlink(os.path.join(work, "warm.vdelta"))
        n0 = len(w.latencies)
        t = time.perf_counter()
        vdisk.backup(img, os.path.join(work, "served.vdelta"), consumer="b", compression="none")
        served = time.perf_counter() - t
        during = w.latencies[n0:len(w.latencies)]
        n1 = len(w.latencies)
        t = time.perf_counter()
        assert vdisk.check(img).ok               # holds the image still for the whole check
        checked = time.perf_counter() - t
        in_check = w.latencies[n1:len(w.latencies)]
        w.stop()
    finally:
        srv.stop()
    os.unlink(os.path.join(work, "served.vdelta"))
    os.unlink(img)
    return {"inproc": inproc, "served": served, "cold": cold, "idle": idle, "during": during, "check": checked,
            "in_check": in_check}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--changed-mib", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2000,
                    help="the client's 4 KiB writes per second (0: as fast as the server answers)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vdisk-bench-live-")
    os.environ.setdefault("VDISK_RUNTIME_DIR", os.path.join(work, "run"))
    try:
        rows = [one_round(work, args.mib, args.changed_mib, 100 + r, args.rate) for r in range(args.rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [r["inproc"] / r["served"] for r in rows]
    idle = [x for r in rows for x in r["idle"]]
    during = [x for r in rows for x in r["during"]]
    rate = f"{args.rate:g} writes/s" if args.rate else "unthrottled"
    print(f"incremental backup of {args.changed_mib} MiB changed in a {args.mib} MiB image, {args.rounds} rounds, "
          f"client writing 4 KiB {rate}")
    print(f"in-process: {statistics.median(r['inproc'] for r in rows):.3f} s   "
          f"served while writing: {statistics.median(r['served'] for r in rows):.3f} s")
    print(f"the server's first backup (an empty incremental that imports h5py): "
          f"{statistics.median(r['cold'] for r in rows) * 1e3:.0f} ms")
    print(f"ratio in-process/served: {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
    print(f"NBD 4 KiB write latency idle:   p50 {pct(idle, 50):.2f} ms  p99 {pct(idle, 99):.2f} ms  "
          f"max {pct(idle, 100):.2f} ms  ({len(idle)} writes)")
    print(f"NBD 4 KiB write latency backup: p50 {pct(during, 50):.2f} ms  p99 {pct(during, 99):.2f} ms  "
          f"max {pct(during, 100):.2f} ms  ({len(during)} writes)")
    in_check = [x for r in rows for x in r["in_check"]]
    print(f"NBD 4 KiB write latency check:  p50 {pct(in_check, 50):.2f} ms  p99 {pct(in_check, 99):.2f} ms  "
          f"max {pct(in_check, 100):.2f} ms  ({len(in_check)} writes; check took "
          f"{statistics.median(r['check'] for r in rows) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
