#!/usr/bin/env python3
"""Why no vdisk write system call crosses a 256 KiB boundary (vdisk/fileio.py, WRITE_PIECE).

    python benchmarks/page_cache_folios.py            # 256 MiB raw file, about a minute

A buffered write makes page-cache folios as large as the write allows (its
length and alignment).  This measures, on a plain raw file (no vdisk code):

* for files filled with writes of 64 KiB to 2 MiB: the folio sizes the cache
  then holds (vdisk_testkit/pagecache.py, needs root), the CPU time of
  random 4 KiB overwrites and of sequential 1 MiB reads;
* the CPU time of sequential 1 MiB writes issued as one call or split into
  pieces of 64 KiB to 1 MiB (fresh file, then overwriting it).

CPU time (user + system of this process), not wall time, so the figures
hold on a busy machine; the best of three runs.  Nothing is asserted.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vdisk_testkit import pagecache  # noqa: E402

MiB = 1 << 20


def folio_summary(path: str) -> str:
    try:
        sizes = collections.Counter(n for _, n in pagecache.folios(path))
    except pagecache.Unavailable as exc:
        return f"({exc})"
    top = max(sizes, key=lambda n: n * sizes[n])
    return f"{top >> 10} KiB ({100 * top * sizes[top] / sum(n * c for n, c in sizes.items()):.0f}% of the bytes)"


def prefill_rows(work: str, size: int) -> None:
    rng = np.random.default_rng(1)
    offs = (rng.integers(0, size // 4096, 30000) * 4096).tolist()
    small = b"\x02" * 4096
    rb = bytearray(MiB)
    print("| filled with writes of | folios (most bytes) | random 4 KiB overwrite, CPU | sequential 1 MiB read, CPU |")
    print("| --- | --- | --- | --- |")
    for chunk in (64 << 10, 128 << 10, 256 << 10, 512 << 10, MiB, 2 * MiB):
        path = os.path.join(work, "f.raw")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            buf = os.urandom(chunk)
            for off in range(0, size, chunk):
                os.pwrite(fd, buf, off)
            os.fdatasync(fd)
            folios = folio_summary(path)
            reads = []
            for _ in range(3):
                t = time.process_time()
                for off in range(0, size, MiB):
                    os.preadv(fd, [rb], off)
                reads.append(time.process_time() - t)
            writes = []
            for _ in range(3):
                t = time.process_time()
                for o in offs:
                    os.pwrite(fd, small, o)
                writes.append((time.process_time() - t) / len(offs) * 1e6)
        finally:
            os.close(fd)
            os.unlink(path)
        print(f"| {chunk >> 10} KiB | {folios} | {min(writes):.1f} µs | {min(reads) / (size // MiB) * 1e6:.0f} µs |")


def piece_rows(work: str, size: int) -> None:
    mv = memoryview(os.urandom(MiB))
    print()
    print("| 1 MiB writes issued in pieces of | fresh file, CPU per MiB | overwrite, CPU per MiB |")
    print("| --- | --- | --- |")
    for piece in (64 << 10, 128 << 10, 256 << 10, MiB):
        path = os.path.join(work, "w.raw")
        best = [float("inf"), float("inf")]
        for _ in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                for k in range(2):
                    t = time.process_time()
                    for off in range(0, size, MiB):
                        for s in range(0, MiB, piece):
                            os.pwrite(fd, mv[s:s + piece], off + s)
                    best[k] = min(best[k], time.process_time() - t)
            finally:
                os.close(fd)
                os.unlink(path)
        n = size // MiB
        print(f"| {piece >> 10} KiB | {best[0] / n * 1e6:.0f} µs | {best[1] / n * 1e6:.0f} µs |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vdisk-bench-folios-") as work:
        print(f"load average {os.getloadavg()[0]:.2f}; {os.uname().sysname} {os.uname().release}; "
              f"raw file of {args.size_mib} MiB in {work}")
        print()
        prefill_rows(work, args.size_mib * MiB)
        piece_rows(work, args.size_mib * MiB)
    return 0


if __name__ == "__main__":
    sys.exit(main())
