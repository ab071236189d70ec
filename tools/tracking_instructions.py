#!/usr/bin/env python3
"""Count the CPU instructions of a single-block 4 KiB write and read, and what tracking adds.

Timings of random 4 KiB writes with tracking on and off differ by less than
the noise of these machines, so this counts instead: callgrind runs the same
loop of in-place 4 KiB writes (64 KiB blocks, armed regions: the steady
state) with tracking on and off, at two loop lengths, and the difference
between the lengths divided by the extra writes is the cost of one write,
free of the setup.  Two figures per side: the whole process (user space)
and the hot path alone (``HotPath.pwrite``, inclusive of what it calls).
The same is done for 4 KiB writes into blocks allocated since the last
flush ("fresh": the fill is not flushed), and for a loop of 4 KiB reads of
allocated blocks (``Disk.pread``; ``HotPath.pread`` for the hot path),
with tracking on.
Kernel time is not counted by callgrind; it is the same on both sides (the
same pwrite of the same bytes) and makes the real overhead smaller still.

    python tools/tracking_instructions.py            # about a minute
    python tools/tracking_instructions.py --writes 20000 40000
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import os, random, sys, tempfile, vdisk
track, n, tmp, op = sys.argv[1] == "on", int(sys.argv[2]), sys.argv[3], sys.argv[4]
size = 16 << 20
d = vdisk.create(os.path.join(tmp, f"{op}-{sys.argv[1]}-{n}.vdk"), size, block_size="64KiB", track_changes=track)
block = b"\x01" * 65536
for off in range(0, size, 65536):
    d.pwrite(block, off)
if op != "fresh":
    d.flush()                     # "fresh": the blocks stay allocated-since-the-last-flush
rnd = random.Random(1)
offs = [rnd.randrange(size // 4096) * 4096 for _ in range(n)]
small = block[:4096]
for off in range(0, size, 1 << 20):
    d.pwrite(small, off)          # arm every coarse region: the loop below is the steady state
if op in ("write", "fresh"):
    pw = d.pwrite
    for off in offs:
        pw(small, off)
else:
    pr = d.pread
    for off in offs:
        pr(4096, off)
d.close()
"""


def count(track: str, n: int, tmp: str, op: str = "write") -> tuple[int, int]:
    out = os.path.join(tmp, f"cg.{op}.{track}.{n}")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")     # no spinning BLAS threads in the counts
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", CHILD,
                    track, str(n), tmp, op], check=True, capture_output=True, env=env)
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", out], check=True, capture_output=True,
                          text=True).stdout
    total = int(re.search(r"([\d,]+) \(100\.0+%\)\s+PROGRAM TOTALS", text).group(1).replace(",", ""))
    name = "read" if op == "read" else "write"
    # the def method (HotPath_7pwrite), or the cdef one Disk.pread/pwrite call (HotPath__pwrite in
    # older builds, HotPath_read / HotPath_write since the one-way boundary)
    hot = re.search(rf"^\s*([\d,]+) \([^)]*\)\s+\S*HotPath_(?:\d+|_)?p?{name}\b", text, re.M)
    return total, int(hot.group(1).replace(",", "")) if hot else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, nargs=2, default=(20000, 60000), metavar=("N1", "N2"))
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    n1, n2 = args.writes
    tmp = tempfile.mkdtemp(prefix="vdisk-cg-")
    try:
        per = {}
        for track in ("on", "off"):
            (t1, h1), (t2, h2) = count(track, n1, tmp), count(track, n2, tmp)
            per[track] = ((t2 - t1) / (n2 - n1), (h2 - h1) / (n2 - n1))
        fresh = {}
        for track in ("on", "off"):
            (t1, h1), (t2, h2) = count(track, n1, tmp, "fresh"), count(track, n2, tmp, "fresh")
            fresh[track] = ((t2 - t1) / (n2 - n1), (h2 - h1) / (n2 - n1))
        (t1, h1), (t2, h2) = count("on", n1, tmp, "read"), count("on", n2, tmp, "read")
        read = ((t2 - t1) / (n2 - n1), (h2 - h1) / (n2 - n1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"user-space instructions per in-place 4 KiB write ({n2 - n1} writes measured):")
    print("| side | whole process | HotPath.pwrite (inclusive) |")
    print("| --- | --- | --- |")
    for track in ("on", "off"):
        print(f"| tracking {track} | {per[track][0]:,.0f} | {per[track][1]:,.0f} |")
    d_total = per["on"][0] - per["off"][0]
    d_hot = per["on"][1] - per["off"][1]
    print(f"| difference | {d_total:+,.0f} ({100 * d_total / per['off'][0]:+.1f}%) | "
          f"{d_hot:+,.0f} ({100 * d_hot / max(per['off'][1], 1):+.1f}%) |")
    print()
    print(f"the same writes into blocks allocated since the last flush (fresh blocks):")
    print("| side | whole process | HotPath.pwrite (inclusive) |")
    print("| --- | --- | --- |")
    for track in ("on", "off"):
        print(f"| tracking {track} | {fresh[track][0]:,.0f} | {fresh[track][1]:,.0f} |")
    print()
    print(f"user-space instructions per 4 KiB read of an allocated block ({n2 - n1} reads measured):")
    print("| side | whole process | HotPath.pread (inclusive) |")
    print("| --- | --- | --- |")
    print(f"| tracking on | {read[0]:,.0f} | {read[1]:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
