"""Start-up cost of the ``vdisk`` command line: ``python benchmarks/startup.py [--runs N]``.

For each command it runs a fresh interpreter N times (default 15) and
reports the least wall time of the imports that command makes (vdisk.cli,
then the modules the command itself loads), beside the same interpreter
importing nothing and importing numpy alone, and beside ``qemu-img
--version``'s whole process.  The least of N is the figure least disturbed
by other load on the machine; it never asserts on a time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

CASES = {
    "nothing (the clock alone)": "pass",
    "import numpy": "import numpy",
    "vdisk --help": "import vdisk.cli",
    "vdisk info": "import vdisk.cli, vdisk.disk",
    "vdisk check": "import vdisk.cli, vdisk.check",
    "vdisk convert": "import vdisk.cli, vdisk.convert, tqdm",
    "vdisk backup": "import vdisk.cli, vdisk.backup, vdisk.delta, h5py, tqdm",
}


def import_ms(code: str, runs: int) -> float:
    probe = f"import time; t = time.perf_counter(); {code}; print((time.perf_counter() - t) * 1000)"
    return min(float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                    check=True).stdout) for _ in range(runs))


def process_ms(argv: list[str], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        best = min(best, (time.perf_counter() - t) * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    print(f"| what | import time, least of {args.runs} (ms) |")
    print("| --- | ---: |")
    for name, code in CASES.items():
        print(f"| {name} | {import_ms(code, args.runs):.0f} |")
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "s.vdk")
        subprocess.run([sys.executable, "-m", "vdisk", "create", img, "1G"], capture_output=True, check=True)
        whole = process_ms([sys.executable, "-m", "vdisk", "info", img], args.runs)
        print(f"| whole `vdisk info` process | {whole:.0f} |")
    if shutil.which("qemu-img"):
        print(f"| whole `qemu-img --version` process | {process_ms(['qemu-img', '--version'], args.runs):.0f} |")


if __name__ == "__main__":
    main()
