"""Measure the cost of the coarse region size (docs/FORMAT.md cites this).

For each region size: random 4 KiB writes over a sparse 64 GiB image with
a fold every 1,000 writes (the write-ahead rule costs one fsync per newly
dirtied region per interval), and sequential 1 MiB writes.  Prints write
throughput relative to tracking off, fsyncs per 1,000 writes, the
worst-case over-report after a crash (dirty regions x region size) and the
bitmap size for a 1 TiB disk.

    python tools/coarse_region.py [DIR]
"""
import argparse
import os
import random
import tempfile
import time

import vdisk
from vdisk.fileio import FileIO


class CountingIO(FileIO):
    fsyncs = 0

    def fsync(self):
        CountingIO.fsyncs += 1
        super().fsync()


def run(directory, region, track, pattern):
    path = os.path.join(directory, "c.vdk")
    d = vdisk.create(path, "64GiB", block_size="64KiB", overwrite=True, track_changes=track,
                     coarse_region_size=region if track else None, io_factory=CountingIO)
    rng = random.Random(1)
    buf = os.urandom(4096)
    big = os.urandom(1 << 20)
    n = 4000
    offsets = [rng.randrange(64 << 30 >> 12) << 12 for _ in range(n)]
    # allocate first, so the timed part measures tracking, not allocation
    for off in offsets:
        d.pwrite(buf, off)
    d.flush()
    CountingIO.fsyncs = 0
    t = time.perf_counter()
    if pattern == "random":
        for i, off in enumerate(offsets):
            d.pwrite(buf, off)
            if i % 1000 == 999:
                d.flush()
    else:
        for i in range(256):
            d.pwrite(big, i << 20)
            if i % 64 == 63:
                d.flush()
    d.flush()
    elapsed = time.perf_counter() - t
    fs = CountingIO.fsyncs
    dirty_max = len({o >> (region.bit_length() - 1) for o in offsets[:1000]})
    d.close()
    os.unlink(path)
    return elapsed, fs, dirty_max


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", help="where the 64 GiB sparse test image goes (default: a new temporary one)")
    directory = ap.parse_args(argv).dir or tempfile.mkdtemp()
    base_r, _, _ = run(directory, 1 << 25, False, "random")
    base_s, _, _ = run(directory, 1 << 25, False, "seq")
    print(f"{'region':>8} {'rand 4K vs off':>15} {'seq 1M vs off':>14} {'fsyncs/1k rand':>15} "
          f"{'over-report bound':>18} {'bitmap @1TiB':>13}")
    for shift in (20, 22, 24, 25, 26, 28):
        region = 1 << shift
        tr, fs, dirty = run(directory, region, True, "random")
        ts, _, _ = run(directory, region, True, "seq")
        bitmap = (1 << 40) // region // 8
        print(f"{region >> 20:>6}Mi {base_r / tr:>15.2f} {base_s / ts:>14.2f} {fs / 4:>15.0f} "
              f"{dirty * region / 2**30:>15.1f}GiB {bitmap:>12}B")


if __name__ == "__main__":
    main()
