#!/usr/bin/env python3
"""Per-call cost of a 4 KiB Disk.pread / Disk.pwrite against os.pread / os.pwrite.

A direct loop (no pytest-benchmark), on a 64 MiB image and raw file both
prefilled and flushed (64 KiB blocks, tracking on, every coarse region
armed: the steady state), the same random 4 KiB-aligned offsets on both
sides.  Rounds alternate the sides (vdisk, raw, raw, vdisk, ...) so the
drift of a shared machine falls on both; each round's figure is µs per
call, and the report gives the median and range of the per-round ratios.

    python benchmarks/call_cost.py [--rounds 15] [--calls 20000]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import vdisk

SIZE = 64 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vdisk-callcost-")
    img, raw = os.path.join(tmp, "c.vdk"), os.path.join(tmp, "c.raw")
    d = vdisk.create(img, SIZE, block_size="64KiB", track_changes=True)
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    chunk = os.urandom(1 << 20)
    for off in range(0, SIZE, 1 << 20):
        d.pwrite(chunk, off)
        os.pwrite(fd, chunk, off)
    d.flush()
    os.fsync(fd)
    small = chunk[:4096]
    for off in range(0, SIZE, 1 << 20):
        d.pwrite(small, off)            # arm every coarse region
    rnd = random.Random(1)
    offs = [rnd.randrange(SIZE // 4096) * 4096 for _ in range(args.calls)]

    def loops():
        dpr, dpw = d.pread, d.pwrite
        opr, opw = os.pread, os.pwrite

        def vd_read():
            for off in offs:
                dpr(4096, off)

        def raw_read():
            for off in offs:
                opr(fd, 4096, off)

        def vd_write():
            for off in offs:
                dpw(small, off)

        def raw_write():
            for off in offs:
                opw(fd, small, off)
        return {"read": (vd_read, raw_read), "write": (vd_write, raw_write)}

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) / len(offs) * 1e6

    try:
        for op, (vd, rw) in loops().items():
            vd(), rw()                  # warm up
            v, r, ratios = [], [], []
            for i in range(args.rounds):
                pair = [(vd, v), (rw, r)] if i % 2 == 0 else [(rw, r), (vd, v)]
                for fn, out in pair:
                    out.append(timed(fn))
                ratios.append(r[-1] / v[-1])
            print(f"4 KiB {op}: Disk.p{op} {statistics.median(v):.3f} µs [{min(v):.3f}-{max(v):.3f}], "
                  f"os.p{op} {statistics.median(r):.3f} µs [{min(r):.3f}-{max(r):.3f}], "
                  f"ratio (raw time / vdisk time) {statistics.median(ratios):.3f}x "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}], load {os.getloadavg()[0]:.1f}")
    finally:
        d.close()
        os.close(fd)
        for p in (img, raw):
            os.unlink(p)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
