"""Start-up cost of the ``vdisk`` command line: ``python benchmarks/startup.py [--runs N]``.

For each command it runs a fresh interpreter N times (default 15) and
reports the least wall time of the imports that command makes (vdisk.cli,
then the modules the command itself loads), beside the same interpreter
importing numpy alone, and beside ``qemu-img --version``'s whole process.
``--against DIR`` adds a column for another vdisk tree (a checkout of main,
say; its ``vdisk/`` needs the built ``_fast`` module), sampled interleaved
with this one so that load on the machine falls on both alike, and the
ratio this/that.  The least of N is the figure least disturbed by other
load; it never asserts on a time.
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
    "import numpy": "import numpy",
    "vdisk --help": "import vdisk.cli",
    "vdisk info": "import vdisk.cli, vdisk.summary",        # main before vdisk/summary.py: vdisk.disk
    "vdisk check": "import vdisk.cli, vdisk.check",
    "vdisk convert": "import vdisk.cli, vdisk.convert, tqdm",
    "vdisk backup": "import vdisk.cli, vdisk.backup, vdisk.delta, h5py, tqdm",
}


def _env(tree: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    return env


def import_ms(code: str, tree: str | None) -> float:
    if code == "import vdisk.cli, vdisk.summary" and tree is not None and not os.path.exists(
            os.path.join(tree, "vdisk", "summary.py")):
        code = "import vdisk.cli, vdisk.disk"           # what `vdisk info` loaded before vdisk/summary.py
    probe = f"import time; t = time.perf_counter(); {code}; print((time.perf_counter() - t) * 1000)"
    return float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                env=_env(tree), cwd=tree or os.getcwd()).stdout)


def process_ms(argv: list[str], runs: int, trees: list[str | None] | None = None) -> list[float]:
    """The least wall time of argv's whole process, for each tree (sampled interleaved)."""
    trees = trees or [None]
    best = [float("inf")] * len(trees)
    for _ in range(runs):
        for i, tree in enumerate(trees):
            t = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True, env=_env(tree), cwd=tree or os.getcwd())
            best[i] = min(best[i], (time.perf_counter() - t) * 1000)
    return best


def _row(name: str, best: list[float]) -> str:
    row = f"| {name} | {best[0]:.0f} |"
    if len(best) > 1:
        row += f" {best[1]:.0f} | {best[0] / best[1]:.2f}x |"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--against", metavar="DIR", help="another vdisk tree to measure beside this one")
    args = ap.parse_args()
    trees: list[str | None] = [None] + ([os.path.abspath(args.against)] if args.against else [])
    head = f"| what | import time, least of {args.runs} (ms) |"
    if args.against:
        head += f" {args.against} (ms) | ratio |"
    print(head)
    print("| --- | ---: |" + (" ---: | ---: |" if args.against else ""))
    for name, code in CASES.items():
        best = [float("inf")] * len(trees)
        for _ in range(args.runs):
            for i, tree in enumerate(trees):
                best[i] = min(best[i], import_ms(code, tree))
        print(_row(name, best))
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "s.vdk")
        subprocess.run([sys.executable, "-m", "vdisk", "create", img, "1G"], capture_output=True, check=True)
        for name, argv in (("whole `vdisk info` process", [sys.executable, "-m", "vdisk", "info", img]),
                           ("whole `vdisk --help` process", [sys.executable, "-m", "vdisk", "--help"])):
            print(_row(name, process_ms(argv, args.runs, trees)))
        if shutil.which("qemu-img"):
            q2 = os.path.join(tmp, "s.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", q2, "1G"], check=True)
            print(f"| whole `qemu-img info` process | {process_ms(['qemu-img', 'info', q2], args.runs)[0]:.0f} |")


if __name__ == "__main__":
    main()
