#!/usr/bin/env python3
"""Run the fuzz campaigns with atheris (libFuzzer) and report executions.

Targets (one harness each, vdisk_testkit/fuzz/fuzz_*.py):

    vdisk          image open and metadata reads, snapshots, check   (fuzz_vdisk.py)
    qcow2          the qcow2 reader and qcow2 -> raw conversion        (fuzz_qcow2.py)
    delta          the delta reader, verify, restore, merge            (fuzz_delta.py)
    changeid       change-id parsing, changes_since, chain sidecars    (fuzz_changeid.py)
    nbd            bytes at each state of an NBD session (vdisk serve)  (fuzz_nbd.py; not in the default set:
                   --targets nbd)
    delta-crafted  deltas whose HDF5 metadata is damaged *and* resealed:
                   probes libhdf5 behind the preamble (not in the default set)

Short run (a smoke test, about a minute)::

    python3 tools/fuzz/run.py --runs 2000

Long run (the figures for docs/RELIABILITY.md: 2,000,000 executions, about
21 minutes on 2 shared cores; nice it on a shared machine)::

    nice -n 19 python3 tools/fuzz/run.py --runs vdisk=600000,qcow2=600000,delta=300000,changeid=500000 \
        --keep-going --workdir /tmp/vdisk-fuzz-long

Crafted deltas (libhdf5 behind a resealed preamble)::

    nice -n 19 python3 tools/fuzz/run.py --targets delta-crafted --runs 300000 --timeout 10 --keep-going

Each target runs as a series of processes of at most ``--chunk`` executions
(a fresh process keeps the baseline low whatever else may leak; atheris
3.0.0's comparison tracing kept every comparison result, mended by
common.mend_trace_cmp_leak), seeded from freshly made real images
(``build_seeds``), from tests/fuzz_regressions/<target>/ and from the
corpus the earlier processes grew; the corpus and any finding (``crash-*``,
``timeout-*``, ``oom-*``) go under the workdir.  Limits per execution:
``--timeout`` seconds (a hang) and ``--input-mb`` of peak RSS one input may
add (a memory blow-up, checked by the harness; ``--rss-limit-mb`` is
libFuzzer's backstop for the whole process).  A finding stops the target;
with ``--keep-going`` it goes on until its executions are spent.  Every
finding is then replayed alone, without atheris, and the summary
(executions, seconds, executions per second, findings and what each does
alone) is printed and written to ``<workdir>/summary.json``.  Run against a
copy of the tree (``PYTHONPATH=<copy>``) when others edit it meanwhile.
Needs ``pip install -e '.[fuzz]'`` (atheris).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from vdisk_testkit.fuzz import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REGRESSIONS = os.path.join(ROOT, "tests", "fuzz_regressions")
PACKAGE = "vdisk_testkit.fuzz"

TARGETS = {                     # target: (harness module of PACKAGE, extra arguments)
    "vdisk": ("fuzz_vdisk", []),
    "qcow2": ("fuzz_qcow2", []),
    "delta": ("fuzz_delta", []),
    "changeid": ("fuzz_changeid", []),
    "nbd": ("fuzz_nbd", []),
    "delta-crafted": ("fuzz_delta", ["--crafted"]),
}
DEFAULT_TARGETS = ["vdisk", "qcow2", "delta", "changeid"]
MAX_LEN = {"vdisk": 256 * 1024, "qcow2": 256 * 1024, "delta": 128 * 1024, "delta-crafted": 128 * 1024,
           "changeid": 4096, "nbd": 4096}
FINDING_RE = re.compile(r"^(crash|timeout|oom|leak|slow-unit)-")
MAX_TRIAGE = 20                 # findings replayed alone per target


def module_for(target: str):
    return importlib.import_module(f"{PACKAGE}.{TARGETS[target][0]}")


def write_seeds(target: str, directory: str) -> int:
    os.makedirs(directory, exist_ok=True)
    seeds = module_for(target).build_seeds()
    for name, data in seeds.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    return len(seeds)


def parse_stats(text: str) -> dict:
    stats = {}
    for key in ("number_of_executed_units", "average_exec_per_sec", "peak_rss_mb"):
        m = re.findall(rf"stat::{key}:\s*(\d+)", text)
        if m:
            stats[key] = int(m[-1])
    if "number_of_executed_units" not in stats:          # killed before the final stats: the last status line
        m = re.findall(r"^#(\d+)\s", text, re.M)
        stats["number_of_executed_units"] = int(m[-1]) if m else 0
    return stats


_REPLAY = """
import sys, time, traceback
from vdisk_testkit.fuzz import common, {module} as h
data = open(sys.argv[1], "rb").read()
base = common.peak_rss_mb()
t = time.monotonic()
try:
    h.{func}(data)
    outcome = "passes"
except BaseException as exc:
    tb = traceback.extract_tb(exc.__traceback__)[-1]
    outcome = f"{{type(exc).__name__}} at {{tb.filename.rsplit('/', 1)[-1]}}:{{tb.lineno}}: {{str(exc)[:200]}}"
peak = common.peak_rss_mb()
print(f"{{outcome}} | {{time.monotonic() - t:.2f}} s | +{{peak - base}} MiB peak RSS")
"""


def triage(target: str, path: str, timeout: int) -> str:
    """Replay one finding in a fresh process without atheris: what it does there."""
    module = TARGETS[target][0]
    func = "one_input_crafted" if target == "delta-crafted" else "one_input"
    try:
        proc = subprocess.run([sys.executable, "-c", _REPLAY.format(module=module, func=func), path],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"hangs (no answer in {timeout} s)"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode < 0:
        return f"crashes (signal {-proc.returncode})"
    return lines[-1] if lines else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"


def run_target(target: str, runs: int, args) -> dict:
    module, extra = TARGETS[target]
    work = os.path.join(args.workdir, target)
    corpus, seeds, artifacts = (os.path.join(work, d) for d in ("corpus", "seeds", "artifacts"))
    for d in (corpus, artifacts):
        os.makedirs(d, exist_ok=True)
    nseeds = write_seeds(target, seeds)
    dirs = [corpus, seeds]
    kept = os.path.join(REGRESSIONS, target)
    if os.path.isdir(kept) and target != "delta-crafted":
        dirs.append(kept)
    total, seconds, restarts, processes = 0, 0.0, 0, 0
    peak = 0
    log_path = os.path.join(work, "fuzz.log")
    with open(log_path, "a") as log:
        while total < runs:
            before = set(os.listdir(artifacts))
            cmd = [sys.executable, "-m", f"{PACKAGE}.{module}", *extra, *dirs,
                   f"-runs={min(args.chunk, runs - total)}", f"-rss_limit_mb={args.rss_limit_mb}",
                   f"-timeout={args.timeout}",
                   f"-max_len={MAX_LEN[target]}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
                   f"-seed={args.seed + processes}" if args.seed else "-seed=0"]
            if args.max_time:
                cmd.append(f"-max_total_time={max(1, int(args.max_time - seconds))}")
            t0 = time.monotonic()
            scratch = tempfile.mkdtemp(prefix="vdisk-fuzz-run-", dir=common.scratch_base())
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      errors="replace", env=dict(os.environ, VDISK_FUZZ_INPUT_MB=str(args.input_mb),
                                                                 VDISK_FUZZ_SCRATCH=scratch))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            dt = time.monotonic() - t0
            log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n[exit {proc.returncode} after {dt:.1f} s]\n")
            stats = parse_stats(proc.stdout)
            total += stats["number_of_executed_units"]
            seconds += dt
            processes += 1
            peak = max(peak, stats.get("peak_rss_mb", 0))
            found = proc.returncode != 0 or set(os.listdir(artifacts)) - before
            if stats["number_of_executed_units"] == 0 or (args.max_time and seconds >= args.max_time):
                break
            if found:
                if not args.keep_going:
                    break
                restarts += 1
    findings = sorted(f for f in os.listdir(artifacts) if FINDING_RE.match(f))
    replays = {f: triage(target, os.path.join(artifacts, f), 2 * args.timeout) for f in findings[:MAX_TRIAGE]}
    return {"target": target, "execs": total, "seconds": round(seconds, 1),
            "execs_per_sec": round(total / seconds, 1) if seconds else 0.0, "findings": findings,
            "replays": replays,
            "processes": processes, "restarts": restarts, "seeds": nseeds, "corpus": len(os.listdir(corpus)),
            "peak_rss_mb": peak,
            "log": log_path}


def parse_runs(text: str, targets: list[str]) -> dict[str, int]:
    if "=" not in text:
        return {t: int(text) for t in targets}
    out = {}
    for part in text.split(","):
        name, n = part.split("=")
        out[name.strip()] = int(n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=None, help=f"comma-separated (default {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--runs", default="2000", help="executions per target: N, or target=N,target=N,...")
    p.add_argument("--workdir", default=os.path.join("/tmp", "vdisk-fuzz"))
    p.add_argument("--timeout", type=int, default=30, help="seconds for one input before it counts as a hang")
    p.add_argument("--input-mb", type=int, default=512,
                   help="memory one input may add to the process's peak RSS (MiB) before it counts as a blow-up")
    p.add_argument("--rss-limit-mb", type=int, default=2048,
                   help="libFuzzer's backstop: memory of one process (MiB)")
    p.add_argument("--chunk", type=int, default=20000, help="executions per process at most")
    p.add_argument("--max-time", type=int, default=0, help="seconds per target at most (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="libFuzzer's seed (0: random)")
    p.add_argument("--keep-going", action="store_true", help="restart a target after a finding")
    args = p.parse_args(argv)
    runs = parse_runs(args.runs, DEFAULT_TARGETS)
    targets = args.targets.split(",") if args.targets else [t for t in DEFAULT_TARGETS if t in runs]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    started = time.time()
    for t in targets:
        n = runs.get(t, next(iter(runs.values())))
        print(f"[{time.strftime('%H:%M:%S')}] {t}: {n} executions ...", flush=True)
        r = run_target(t, n, args)
        results.append(r)
        print(f"    {r['execs']} executions in {r['seconds']} s ({r['execs_per_sec']}/s) in {r['processes']} "
              f"process(es), {len(r['findings'])} finding(s), peak RSS {r['peak_rss_mb']} MiB", flush=True)
        for name, what in r["replays"].items():
            print(f"      {name}: replayed alone: {what}", flush=True)
    total = sum(r["execs"] for r in results)
    secs = sum(r["seconds"] for r in results)
    print(f"total: {total} executions in {secs:.0f} s ({total / secs if secs else 0:.0f}/s); "
          f"findings: {sum(len(r['findings']) for r in results)}")
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), "targets": results,
               "total_execs": total, "total_seconds": round(secs, 1), "python": sys.version.split()[0]}
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 1 if any(r["findings"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
