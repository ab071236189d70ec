#!/usr/bin/env python3
"""Run the vdisk benchmarks and print each workload as a ratio to its baseline.

    python benchmarks/report.py                  # run everything (a few minutes), print the table
    python benchmarks/report.py --quick          # small sizes, few rounds: a smoke run
    python benchmarks/report.py --json run.json  # no run: report a saved pytest-benchmark JSON
    python benchmarks/report.py --save run.json  # run, and keep the JSON
    python benchmarks/report.py --repeat 3       # three whole runs: median ratio and its range
    python benchmarks/report.py -- -k seq        # anything after -- goes to pytest
    python benchmarks/report.py --no-memory      # skip the peak-memory table (benchmarks/memory.py)

The ratio is a throughput ratio, subject / baseline = baseline time / subject
time, from the same run on the same machine: above 1 the vdisk side is
faster.  With one run, the bracket after a ratio is a 90% bootstrap interval
over the rounds; with --repeat, the range of the per-run ratios.  Timings
are never turned into pass/fail: the target column says whether a ratio
reached the goal set for it ("unclear" when the interval straddles it), for
reading, not for CI, and the exit status only reflects pytest errors.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
README = os.path.join(HERE, "README.md")
BENCH_FILES = sorted(f for f in os.listdir(os.path.dirname(os.path.abspath(__file__))) if f.startswith("bench_") and f.endswith(".py"))
MARK_BEGIN = "<!-- results:begin -->"
MARK_END = "<!-- results:end -->"

TRACKING_TARGET = 1 / 1.03      # tracking on / off throughput: at most 3% overhead
KERNEL_TARGET = 5.0             # tracking kernels vs numpy

# bench_patterns.py: vdisk against raw in paired rounds, both sides prefilled in 64 KiB and in 1 MiB writes
PATTERN_TARGET = 0.95
PREFILL_TEXT = {"64KiB": "64 KiB", "1MiB": "1 MiB"}
_PATTERNS = [
    ("12a", "seq 1 MiB reads", "seq_read_1MiB"),
    ("12b", "seq 4 MiB reads", "seq_read_4MiB"),
    ("13a", "seq 1 MiB in-place writes + flush", "seq_overwrite_1MiB"),
    ("13b", "seq 4 MiB in-place writes + flush", "seq_overwrite_4MiB"),
    ("15a", "random 4 KiB reads", "rand_read_4KiB"),
    ("15b", "random 4 KiB writes + flush", "rand_write_4KiB_flush"),
    ("15c", "random 4 KiB writes, buffered", "rand_write_4KiB_buffered"),
    ("16a", "mixed 4 KiB-1 MiB reads, 4 KiB-aligned", "mixed_read_aligned"),
    ("16b", "mixed 4 KiB-1 MiB reads, unaligned", "mixed_read_unaligned"),
    ("16c", "mixed 4 KiB-1 MiB writes, 4 KiB-aligned, buffered", "mixed_write_aligned"),
    ("16d", "mixed 4 KiB-1 MiB writes, unaligned, buffered", "mixed_write_unaligned"),
]
PATTERN_ROWS = [
    (f"{num}. {what}, both sides prefilled in {PREFILL_TEXT[pf]} writes (paired)",
     f"paired_{workload}@{pf}", "vdisk", "raw", PATTERN_TARGET, "≥0.95x raw")
    for num, what, workload in _PATTERNS for pf in ("64KiB", "1MiB")
]
PATTERN_ROWS.insert(8, ("14. seq 4 MiB writes + flush, fresh image (paired)", "paired_seq_write_4MiB_fresh", "vdisk", "raw",
                        PATTERN_TARGET, "≥0.95x raw"))

# (row label, workload group, subject impl, baseline impl, minimum ratio or None, target text)
PAIRS = [
    ("1. seq 1 MiB writes + flush, fresh image", "seq_write_1MiB", "vdisk", "raw", 0.9, "≥0.9x raw"),
    ("2. seq 1 MiB reads, `pread`", "seq_read_1MiB", "vdisk", "raw", 0.9, "≥0.9x raw"),
    ("2b. seq 1 MiB reads, `preadinto`", "seq_readinto_1MiB", "vdisk", "raw", 0.9, "≥0.9x raw"),
    ("3. random 4 KiB writes + flush", "rand_write_4KiB", "vdisk", "raw", 0.6, "≥0.6x raw"),
    ("3b. random 4 KiB writes, buffered", "rand_write_4KiB_buffered", "vdisk", "raw", 0.6, "≥0.6x raw"),
    ("4. random 4 KiB reads", "rand_read_4KiB", "vdisk", "raw", 0.6, "≥0.6x raw"),
    ("5a. tracking on/off: seq writes + flush", "tracking_paired_seq_write_1MiB", "on", "off",
     TRACKING_TARGET, "≤3% overhead"),
    ("5b. tracking on/off: random 4 KiB + flush", "tracking_paired_rand_write_4KiB", "on", "off",
     TRACKING_TARGET, "≤3% overhead"),
    ("5c. tracking on/off: random 4 KiB, buffered", "tracking_paired_rand_write_4KiB_buffered", "on", "off",
     TRACKING_TARGET, "≤3% overhead"),
    ("5d. control: 5c with tracking on on both sides (two images)", "tracking_paired_control_4KiB_buffered",
     "on", "twin", None, "noise floor of 5a-5c"),
    ("6a. `changed_blocks(4)` kernel, 0.1% changed", "changed_blocks_1TiB", "vdisk-kernel", "numpy",
     KERNEL_TARGET, "≥5x numpy"),
    ("6b. `changes_since(id/4)`, 0.1% changed", "changed_blocks_1TiB", "vdisk-changes_since", "numpy",
     KERNEL_TARGET, "≥5x numpy"),
    ("6c. fold of 0.1% dirty blocks", "fold_1TiB", "vdisk-kernel", "numpy", None, "none set"),
    ("7a. snapshot create, 100k allocated 4 KiB blocks", "snapshot_create_100k", "vdisk", "qemu-img",
     None, "vs qemu-img snapshot -c"),
    ("7b. 4 KiB writes to shared blocks (copy-on-write) vs unshared (in place)", "write_4KiB_shared",
     "vdisk-cow", "vdisk-inplace", None, "cost of COW"),
    ("7c. sequential 1 MiB reads: snapshot vs live", "read_1MiB_snapshot", "vdisk-snapshot", "vdisk-live",
     None, "≈1x"),
    ("9a. incremental backup, 512 changed extents of 256 MiB, no compression", "backup_incremental", "vdisk",
     "raw", 0.8, "≥0.8x raw copy"),
    ("9b. restore a full delta into a new raw file", "restore_full", "vdisk-raw", "raw", 0.8, "≥0.8x raw write"),
    ("9c. restore a full delta into a new vdisk image", "restore_full", "vdisk-vdisk", "raw", None, "none set"),
    ("11a. tracking on/off: fresh image filled with 1 MiB writes, then 20,000 random 4 KiB overwrites before "
     "the flush (the overwrites timed)", "tracking_paired_fresh_fill_overwrite_overwrites", "on", "off",
     TRACKING_TARGET, "≤3% overhead"),
    ("11b. the same, the fill, the overwrites and the flush timed", "tracking_paired_fresh_fill_overwrite_whole",
     "on", "off", TRACKING_TARGET, "≤3% overhead"),
    *PATTERN_ROWS,
    ("10a. convert qcow2 → vdisk, 1 GiB half data (vs `qemu-img convert -O raw`)", "convert_qcow2_vdisk", "vdisk",
     "qemu-img-sync", 1.0, "≥1x qemu-img"),
    ("10b. the same, against qemu-img's default (no fsync)", "convert_qcow2_vdisk", "vdisk", "qemu-img", None,
     "none set"),
    ("10c. convert compressed qcow2 → vdisk (vs `qemu-img convert -O raw`)", "convert_qcow2c_vdisk", "vdisk",
     "qemu-img-sync", 1.0, "≥1x qemu-img"),
    ("10d. the same, against qemu-img's default (no fsync)", "convert_qcow2c_vdisk", "vdisk", "qemu-img", None,
     "none set"),
    ("10e. convert raw → vdisk (vs `qemu-img convert -O qcow2`)", "convert_raw_vdisk", "vdisk", "qemu-img-sync",
     1.0, "≥1x qemu-img"),
    ("10f. the same, against qemu-img's default (no fsync)", "convert_raw_vdisk", "vdisk", "qemu-img", None,
     "none set"),
    ("10g. convert vdisk → qcow2 (vs qemu-img raw → qcow2)", "convert_vdisk_qcow2", "vdisk", "qemu-img-sync",
     None, "none set"),
    ("10h. the same, against qemu-img's default (no fsync)", "convert_vdisk_qcow2", "vdisk", "qemu-img", None,
     "none set"),
]

BASELINE_NAMES = {
    "raw": "raw file, os.pread/os.pwrite loop",
    "qemu-img": "qemu-img (subprocess)",
    "qemu-img-sync": "qemu-img convert -t writeback (subprocess; fsyncs at the end, as vdisk does)",
    "vdisk-inplace": "vdisk, unshared blocks",
    "vdisk-live": "vdisk, live disk",
    "off": "vdisk, track_changes=False (paired rounds)",
    "twin": "vdisk, tracking on, a second image (paired rounds)",
    "numpy": "numpy one-liner",
}


# ---------------------------------------------------------------------------- running
def run_pytest(json_path: str, extra: list[str], quick: bool) -> int:
    env = dict(os.environ)
    if quick:
        env.setdefault("VDISK_BENCH_MIB", "32")
        env.setdefault("VDISK_BENCH_OPS", "2048")
        env.setdefault("VDISK_BENCH_ROUNDS", "0.3")
        env.setdefault("VDISK_BENCH_BIG", "64GiB")
    cmd = [sys.executable, "-m", "pytest", *[os.path.join(HERE, f) for f in BENCH_FILES],
           "-p", "no:cacheprovider", "-o", "python_files=bench_*.py", "-o", "python_functions=test_*",
           "--rootdir", ROOT, "-q", "--benchmark-json", json_path,
           "--benchmark-columns=min,median,iqr,rounds", "--benchmark-sort=name", *extra]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env, stdout=sys.stderr)


def stale_build_warning() -> str | None:
    pyx = os.path.join(ROOT, "vdisk", "_fast.pyx")
    sos = [f for f in os.listdir(os.path.join(ROOT, "vdisk")) if f.startswith("_fast.") and f.endswith(".so")]
    if not os.path.exists(pyx) or not sos:
        return None
    so = max(os.path.getmtime(os.path.join(ROOT, "vdisk", f)) for f in sos)
    if os.path.getmtime(pyx) > so:
        return ("WARNING: vdisk/_fast.pyx is newer than the built extension; rebuild with "
                "`python3 setup.py build_ext --inplace` before trusting these numbers")
    return None


# ---------------------------------------------------------------------------- formatting
def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_bytes(n: float) -> str:
    for unit, k in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


STATS = {"median": np.median, "min": np.min, "mean": np.mean}


def stat_of(bench: dict, stat: str) -> float:
    return bench["stats"][stat]


def bootstrap_ratio(s: dict, b: dict, stat: str, n: int = 2000, level: float = 0.90):
    """Interval of baseline-stat / subject-stat from resampling each side's rounds."""
    ds, db = s["stats"].get("data"), b["stats"].get("data")
    if not ds or not db or len(ds) < 3 or len(db) < 3:
        return None
    rng = np.random.default_rng(12345)
    f = STATS[stat]
    xs = f(rng.choice(np.asarray(ds), size=(n, len(ds)), replace=True), axis=1)
    xb = f(rng.choice(np.asarray(db), size=(n, len(db)), replace=True), axis=1)
    r = xb / xs
    lo, hi = np.quantile(r, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_side(bench: dict, side: str) -> dict:
    """One side of a paired benchmark (extra_info["paired"][side]: its per-round
    times) in the shape of a pytest-benchmark entry, for stat_of and cell."""
    t = np.asarray(bench["extra_info"]["paired"][side], dtype=float)
    q1, q3 = np.quantile(t, [0.25, 0.75])
    stats = {"min": float(t.min()), "median": float(np.median(t)), "mean": float(t.mean()),
             "iqr": float(q3 - q1), "data": t.tolist()}
    return {"stats": stats, "extra_info": bench["extra_info"]}


def paired_ratios(bench: dict, subj: str, base: str) -> np.ndarray:
    """Per-round ratios base time / subject time (> 1: the subject was faster that round)."""
    p = bench["extra_info"]["paired"]
    return np.asarray(p[base], dtype=float) / np.asarray(p[subj], dtype=float)


def paired_interval(bench: dict, subj: str, base: str, n: int = 2000, level: float = 0.90):
    """Bootstrap interval of the median of the per-round ratios."""
    r = paired_ratios(bench, subj, base)
    if len(r) < 3:
        return None
    rng = np.random.default_rng(12345)
    med = np.median(rng.choice(r, size=(n, len(r)), replace=True), axis=1)
    lo, hi = np.quantile(med, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def cell(runs: list[dict], stat: str) -> str:
    """Throughput (or time) of one side: median over runs of the per-run statistic."""
    bench = runs[0]
    t = float(np.median([stat_of(r, stat) for r in runs]))
    noise = float(np.median([r["stats"]["iqr"] / 2 / r["stats"]["median"] for r in runs if r["stats"]["median"]]))
    info = bench.get("extra_info", {})
    nbytes, ops = info.get("bytes") or 0, info.get("ops") or 0
    noise_txt = f" ±{100 * noise:.0f}%"
    if nbytes and ops and nbytes // ops >= (1 << 20):
        rate = f"{nbytes / t / (1 << 20):,.0f} MiB/s"
    elif ops:
        rate = f"{ops / t / 1e3:,.1f} k op/s"
    else:
        return f"{fmt_time(t)}{noise_txt}"
    return f"{rate} ({fmt_time(t)}{noise_txt})"


def fmt_ratio(x: float) -> str:
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 0.995 else f"{x:.3g}"


def machine_line(data: dict) -> str:
    mi = data.get("machine_info", {})
    vb = mi.get("vdisk_bench")
    if not vb:
        return f"Machine: {mi.get('cpu', {}).get('brand_raw', '?')} (no vdisk_bench machine info in this JSON)"
    ram = vb.get("ram_bytes")
    cores = vb.get("cores")
    usable = vb.get("usable_cores")
    core_txt = f"{cores} cores" + (f" ({usable} usable)" if usable and usable != cores else "")
    return (f"Machine: {vb['cpu_model']}, {core_txt}, {fmt_bytes(ram) if ram else '?'} RAM, "
            f"Linux {vb.get('kernel', '?')}, {vb.get('python_impl', 'Python')} {vb['python']}, "
            f"numpy {vb['numpy']}; temp dir {vb['bench_dir']} on {vb['bench_fs']} "
            f"({vb.get('bench_device', '?')} at {vb.get('bench_mount', '?')})")


def _library(data: dict) -> dict:
    return data.get("machine_info", {}).get("vdisk_bench", {}).get("library") or {}


def library_line(datas: list[dict]) -> str | None:
    lib = _library(datas[0])
    if not lib:
        return None
    changed = lib.get("uncommitted") or []
    extra = f" plus uncommitted changes to {', '.join(changed)}" if changed else " (clean)"
    line = (f"Library: vdisk at commit {lib.get('commit') or '?'}{extra}; "
            f"source digest {lib.get('source_sha1', '?')}.")
    digests = [_library(d).get("source_sha1") for d in datas]
    if len(set(digests)) > 1:
        line += (f" **WARNING: the library's source changed between runs** (digests "
                 f"{', '.join(str(x) for x in digests)}): the runs measured different code.")
    return line


def build_report(datas: list[dict], stat: str) -> str:
    runs_by_key: dict[tuple, list] = {}
    for data in datas:
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "workload" in info and "impl" in info:
                runs_by_key.setdefault((info["workload"], info["impl"]), []).append(bench)
    first = datas[0]
    vb = first.get("machine_info", {}).get("vdisk_bench", {})
    when = first.get("datetime", "")
    try:
        when = _dt.datetime.fromisoformat(when.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        pass
    nruns = len(datas)
    spread = ("[90% bootstrap interval over the rounds]" if nruns == 1
              else f"[range of the {nruns} per-run ratios; the ratio is their median]")
    lines = [machine_line(first)]
    lib = library_line(datas)
    if lib:
        lines.append(lib)
    lines += [
        "",
        f"Run {when}{f' (+{nruns - 1} more)' if nruns > 1 else ''}: I/O region "
        f"{fmt_bytes(vb.get('region_bytes', 0))}, {vb.get('random_ops', '?')} random 4 KiB ops per round, "
        f"rounds ×{vb.get('rounds_scale', 1)}; per-side statistic: {stat} of the rounds "
        f"(± = half the interquartile range / median). Ratio = vdisk throughput / baseline throughput "
        f"(= baseline time / vdisk time), **> 1 means vdisk is faster**; {spread}.",
        "",
        "| workload | vdisk | baseline | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    missing = []
    for label, workload, subj, base, min_ratio, target in PAIRS:
        paired = runs_by_key.get((workload, "paired"))
        if paired:          # both sides in one benchmark: the median of the per-round ratios
            srun, brun = [paired_side(b, subj) for b in paired], [paired_side(b, base) for b in paired]
            per_run = [float(np.median(paired_ratios(b, subj, base))) for b in paired]
        else:
            srun, brun = runs_by_key.get((workload, subj)), runs_by_key.get((workload, base))
            if not srun or not brun or len(srun) != len(brun):
                missing.append(label)
                continue
            per_run = [stat_of(b, stat) / stat_of(s, stat) for s, b in zip(srun, brun)]
        ratio = float(np.median(per_run))
        if nruns == 1:
            interval = paired_interval(paired[0], subj, base) if paired else bootstrap_ratio(srun[0], brun[0], stat)
        else:
            interval = (min(per_run), max(per_run))
        ratio_txt = f"**{fmt_ratio(ratio)}x**"
        if interval:
            ratio_txt += f" [{fmt_ratio(interval[0])}–{fmt_ratio(interval[1])}]"
        if paired:
            ratio_txt += f"<br>{'tracking costs' if base == 'off' else 'the sides differ by'} " \
                         f"{100 * (1 / ratio - 1):+.1f}% time"
        if min_ratio is None:
            verdict = target
        elif interval and interval[0] < min_ratio <= interval[1]:
            verdict = f"{target}: unclear ({'met' if ratio >= min_ratio else 'missed'} at the {stat}, within noise)"
        else:
            verdict = f"{target}: {'met' if ratio >= min_ratio else '**missed**'}"
        base_txt = f"{cell(brun, stat)}<br>{BASELINE_NAMES.get(base, base)}"
        lines.append(f"| {label} | {cell(srun, stat)} | {base_txt} | {ratio_txt} | {verdict} |")
    if missing:
        lines += ["", "Not in this run: " + "; ".join(missing)]
    return "\n".join(lines)


def update_readme(table: str) -> None:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    pat = re.compile(re.escape(MARK_BEGIN) + r".*?" + re.escape(MARK_END), re.S)
    if not pat.search(text):
        raise SystemExit(f"{README}: no {MARK_BEGIN} ... {MARK_END} block to replace")
    text = pat.sub(lambda _m: f"{MARK_BEGIN}\n{table}\n{MARK_END}", text)
    with open(README, "w", encoding="utf-8") as f:
        f.write(text)


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return json.loads(text) if text.strip() else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="append",
                    help="report this pytest-benchmark JSON instead of running (repeat for several runs)")
    ap.add_argument("--save", help="keep the run's JSON here (with --repeat: PREFIX-1.json, PREFIX-2.json, ...)")
    ap.add_argument("--repeat", type=int, default=1, help="whole runs to make (default 1)")
    ap.add_argument("--stat", default="median", choices=sorted(STATS),
                    help="per-round statistic to compare (default: median)")
    ap.add_argument("--quick", action="store_true",
                    help="32 MiB region, 2048 random ops, 64 GiB tracking image, fewer rounds")
    ap.add_argument("--output", help="also write the markdown table to this file")
    ap.add_argument("--update-readme", action="store_true",
                    help=f"replace the results block of {os.path.relpath(README, ROOT)}")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory table (benchmarks/memory.py)")
    ap.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = ap.parse_args(argv)

    rc = 0
    datas = []
    if args.json:
        datas = [load(p) for p in args.json]
    else:
        for i in range(max(1, args.repeat)):
            fd, json_path = tempfile.mkstemp(prefix="vdisk-bench-", suffix=".json")
            os.close(fd)
            try:
                rc = run_pytest(json_path, args.pytest_args, args.quick) or rc
                datas.append(load(json_path))
                if args.save:
                    dest = args.save if args.repeat <= 1 else f"{os.path.splitext(args.save)[0]}-{i + 1}.json"
                    with open(json_path, "rb") as src, open(dest, "wb") as dst:
                        dst.write(src.read())
            finally:
                os.unlink(json_path)
    datas = [d for d in datas if d.get("benchmarks")]
    if not datas:
        print(f"no benchmark results (pytest exit status {rc})", file=sys.stderr)
        return rc or 1

    table = build_report(datas, args.stat)
    if not args.json and not args.no_memory:
        mem = subprocess.run([sys.executable, os.path.join(HERE, "memory.py")], cwd=ROOT, capture_output=True,
                             text=True)
        if mem.returncode:
            print(f"memory report failed: {mem.stderr.strip()[-2000:]}", file=sys.stderr)
            rc = rc or mem.returncode
        else:
            table += "\n\n### Peak memory\n\n" + mem.stdout.strip()
    warn = stale_build_warning()
    if warn:
        table = warn + "\n\n" + table
    print(table)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.update_readme:
        update_readme(table)
    if rc:
        print(f"pytest exited with status {rc} (a sanity check failed or a benchmark errored; "
              f"timings are never asserted)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
