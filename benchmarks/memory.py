#!/usr/bin/env python3
"""Peak memory (RSS) of opening, querying, checking and converting large
images, each beside a baseline measured the same way in the same run.

    python benchmarks/memory.py            # prints the table (about 30 s)
    python benchmarks/report.py            # runs it too, after the timings

Every side runs in a fresh child process; its peak RSS is the child's own
``ru_maxrss`` from ``os.wait4``, so nothing of this process or of another
side counts.  The Python sides are also shown "above the interpreter": the
peak of a child that only imports vdisk and numpy is subtracted, which is the
memory the work itself needed.

Workloads (64 KiB blocks / clusters):

* a 1 TiB virtual image with 4,000 scattered allocated blocks: open, map,
  ``changes_since`` and 100 reads (vdisk), against ``qemu-img map`` of the
  same content in qcow2;
* ``vdisk check`` of that image, against ``qemu-img check`` of the qcow2;
* convert a 1 GiB qcow2 (half data) into a vdisk image, against
  ``qemu-img convert -O raw`` of the same file;
* a hostile header claiming the largest table the format allows, against
  the bare interpreter: open must fail fast and small.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BS = 64 * KiB
SCATTERED = 4000

IMPORT_ONLY = "import vdisk, numpy"

OPEN_QUERY = """
import sys, vdisk
with vdisk.open(sys.argv[1]) as d:
    ext = d.map()
    changed = d.changes_since(sys.argv[2])
    for off in ext.offsets[:100].tolist():
        d.pread(4096, off)
assert len(ext) > 0 and changed.nbytes > 0
"""

CHECK = """
import sys, vdisk
assert vdisk.check(sys.argv[1]).ok
"""

CONVERT = """
import sys, vdisk
vdisk.convert(sys.argv[1], sys.argv[2], src_format="qcow2")
"""

HOSTILE = """
import sys, vdisk
try:
    vdisk.open(sys.argv[1])
except vdisk.VdiskError:
    pass
else:
    raise SystemExit("a hostile image opened")
"""


def peak_rss(cmd: list[str]) -> int:
    """Run cmd to completion; its own peak RSS in bytes (Linux reports KiB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-400:]}")
    return usage.ru_maxrss * 1024


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def build(tmp: str) -> dict:
    """The images: a 1 TiB vdisk image and its qcow2 twin, a 1 GiB qcow2, a hostile image.

    Runs in a child (``memory.py --build DIR``): Linux carries a process's
    peak RSS across fork and exec, so the process that starts the measured
    children must stay small (no numpy, no vdisk).
    """
    import numpy as np
    import vdisk
    from vdisk import layout as L

    big = os.path.join(tmp, "big.vdk")
    rng = np.random.default_rng(1)
    blocks = np.sort(rng.choice(TiB // BS, SCATTERED, replace=False))
    data = rng.integers(1, 255, BS, dtype=np.uint8).tobytes()
    with vdisk.create(big, "1TiB", block_size=BS) as d:
        for b in blocks[:SCATTERED // 2].tolist():
            d.pwrite(data, b * BS)
        cid = d.checkpoint()
        for b in blocks[SCATTERED // 2:].tolist():
            d.pwrite(data, b * BS)
    big_q = os.path.join(tmp, "big.qcow2")
    vdisk.convert(big, big_q, dst_format="qcow2")

    half_raw = os.path.join(tmp, "half.raw")
    with open(half_raw, "wb") as f:
        f.truncate(GiB)
        chunk = rng.integers(1, 255, MiB, dtype=np.uint8).tobytes()
        for i in range(0, GiB // MiB, 2):
            f.seek(i * MiB)
            f.write(chunk)
    half_q = os.path.join(tmp, "half.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", half_raw, half_q], check=True)
    os.unlink(half_raw)

    hostile = os.path.join(tmp, "hostile.vdk")
    with vdisk.create(hostile, "1GiB", block_size=BS):
        pass
    with open(hostile, "r+b") as f:
        raw = f.read(2 * L.SLOT_SIZE)
        slot = max((i for i in (0, 1) if raw[i * L.SLOT_SIZE:i * L.SLOT_SIZE + 8] == L.MAGIC),
                   key=lambda i: L.Header.unpack(raw[i * L.SLOT_SIZE:(i + 1) * L.SLOT_SIZE]).sequence)
        h = L.Header.unpack(raw[slot * L.SLOT_SIZE:(slot + 1) * L.SLOT_SIZE])
        h.table_capacity = L.MAX_BLOCKS          # "the table is 1 GiB": the file is not
        h.refcount_capacity = L.MAX_PHYS_BLOCKS
        f.seek(L.SLOT_OFFSETS[slot])
        f.write(h.pack())                        # a valid CRC: the reader must check the sizes
    return dict(big=big, cid=cid, big_q=big_q, half_q=half_q, hostile=hostile, dst=os.path.join(tmp, "out.vdk"))


def build_in_child(tmp: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--build", tmp], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def measure() -> list[tuple[str, int, str, int, bool]]:
    """Rows: (workload, vdisk peak, baseline name, baseline peak, python baseline?)."""
    tmp = tempfile.mkdtemp(prefix="vdisk-mem-", dir=os.environ.get("VDISK_BENCH_DIR"))
    try:
        img = build_in_child(tmp)
        interp = peak_rss(py(IMPORT_ONLY))
        rows = [
            ("open 1 TiB image (4,000 scattered blocks), map, changes_since, 100 reads",
             peak_rss(py(OPEN_QUERY, img["big"], img["cid"])),
             "qemu-img map (same content, qcow2)",
             peak_rss(["qemu-img", "map", "--output=json", img["big_q"]]), interp),
            ("check the 1 TiB image",
             peak_rss(py(CHECK, img["big"])),
             "qemu-img check (same content, qcow2)",
             peak_rss(["qemu-img", "check", img["big_q"]]), interp),
            ("convert 1 GiB qcow2 (half data) → vdisk",
             peak_rss(py(CONVERT, img["half_q"], img["dst"])),
             "qemu-img convert -O raw",
             peak_rss(["qemu-img", "convert", "-O", "raw", img["half_q"], os.path.join(tmp, "out.raw")]),
             interp),
            ("open a hostile header claiming a 1 GiB table (refused)",
             peak_rss(py(HOSTILE, img["hostile"])),
             "the interpreter importing vdisk",
             interp, interp),
        ]
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(rows) -> str:
    def mib(n):
        return f"{n / MiB:,.1f} MiB"
    lines = ["Peak RSS of a child process per side (`ru_maxrss` via `os.wait4`); \"work\" subtracts the "
             "peak of a child that only imports vdisk and numpy. Ratio = vdisk peak / baseline peak: "
             "**< 1 means vdisk used less**.",
             "",
             "| workload | vdisk peak (work) | baseline | baseline peak | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for label, ours, base_name, base, interp in rows:
        lines.append(f"| {label} | {mib(ours)} ({mib(max(0, ours - interp))}) | {base_name} | {mib(base)} | "
                     f"**{ours / base:.2f}x** |")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--build"]:
        print(json.dumps(build(sys.argv[2])))
        return 0
    print(table(measure()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
