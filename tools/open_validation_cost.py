"""Measure what the shared-refcount validation adds to a writable open
(docs/FORMAT.md, "Validation at open", cites this).

The image: 1 GiB virtual, 4 KiB blocks, 256 MiB of data written in 64 KiB
pieces at random places (every table page holds entries), then 8 rounds of
1,000 random 4 KiB overwrites each followed by a snapshot.  Times opening
it read-write (open only, not the close's flush), median of RUNS, with the
validation and with it replaced by a no-op, and a read-only open (which
skips it); then the peak RSS growth of each open in a fresh interpreter.

    python tools/open_validation_cost.py [DIR]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import vdisk
from vdisk.disk import Disk

RUNS = 21
BS = 4096
VSIZE = 1 << 30
DATA = 256 << 20
SNAPSHOTS = 8

CHILD = """
import sys, time, vdisk
from vdisk.disk import Disk
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
if sys.argv[2] == "off":
    Disk._validate_shared_refcounts = lambda self: None
before = hwm()
d = vdisk.open(sys.argv[1], "r" if sys.argv[2] == "ro" else "r+")
print(hwm() - before)
d.close()
"""


def build(path: str) -> None:
    rng = np.random.default_rng(1)
    piece = 64 << 10
    with vdisk.create(path, VSIZE, block_size=BS, overwrite=True) as d:
        slots = rng.choice(VSIZE // piece, DATA // piece, replace=False)
        for s in slots.tolist():
            d.pwrite(rng.integers(1, 256, piece, dtype=np.uint8).tobytes(), s * piece)
        for i in range(SNAPSHOTS):
            for b in rng.integers(0, VSIZE // BS, 1000).tolist():
                d.pwrite(rng.integers(1, 256, BS, dtype=np.uint8).tobytes(), b * BS)
            d.snapshot(f"s{i}").close()


def time_open(path: str, mode: str) -> float:
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        d = vdisk.open(path, mode)
        times.append(time.perf_counter() - t)
        d.close()
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", nargs="?", help="where the temporary image goes (default: the system's temporary directory)")
    directory = ap.parse_args(argv).dir
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "v.vdk")
        build(path)
        with vdisk.open(path) as d:
            mapped = d.info()["allocated_blocks"]
        print(f"image: {os.stat(path).st_blocks * 512 >> 20} MiB on disk, {mapped} blocks mapped live, "
              f"{SNAPSHOTS} snapshots, {VSIZE >> 20} MiB virtual, {BS} B blocks")
        validated = time_open(path, "r+")
        real = Disk._validate_shared_refcounts
        Disk._validate_shared_refcounts = lambda self: None
        try:
            plain = time_open(path, "r+")
        finally:
            Disk._validate_shared_refcounts = real
        ro = time_open(path, "r")
        print(f"open r+ with the validation: {validated * 1e3:.1f} ms; without: {plain * 1e3:.1f} ms "
              f"(+{(validated - plain) * 1e3:.1f} ms, x{validated / plain:.2f}); open r: {ro * 1e3:.1f} ms "
              f"(median of {RUNS})")
        for label, arg in [("r+ with", "on"), ("r+ without", "off"), ("r", "ro")]:
            out = subprocess.run([sys.executable, "-c", CHILD, path, arg], capture_output=True, text=True,
                                 check=True)
            print(f"peak RSS growth, open {label}: {int(out.stdout) / (1 << 20):.1f} MiB")


if __name__ == "__main__":
    main()
