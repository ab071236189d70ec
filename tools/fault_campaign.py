"""Fault-injection campaign: EIO and ENOSPC at every call site of random workloads.

Each seed is one workload (vdisk_testkit/faultsim.py: writes partial and whole,
allocating and in place, discards, flushes, checkpoints, resizes that grow
and shrink, snapshot create/delete/revert, compact, full and incremental
backups, reopen, reset_tracking; block size, image size and fold interval
vary with the seed, and one seed in eight grows the image to 9 MiB and
fills it, relocating the block table and the refcount table).  A dry run
counts its pwrite, fsync, truncate and hole-punch calls; then every one of
them fails in turn, with each errno, and each run is checked: the failing
operation raised VdiskIOError with that errno, the Disk kept working
(failed data writes only) or was poisoned (every later call refused, no
flush ever succeeds again, nothing more written), and the image reopened
satisfies the crash contract as it stands and in power-loss states taken
at the fault.  CI runs the same code on fixed workloads through
tests/test_faults.py; this is the long run (docs/RELIABILITY.md):

    nice -n 19 python3 tools/fault_campaign.py --seeds 40 --jobs 2
    python3 tools/fault_campaign.py --seeds 2              # a quick look

Prints sites, faults, images checked, violations and time; exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import errno
import multiprocessing
import sys
import time
import traceback

from vdisk_testkit import faultsim

GROWN = 9 * 1024 * 1024


def scenario_for(seed: int, ops: int) -> faultsim.Scenario:
    """The workload of one seed."""
    if seed % 8 == 7:           # relocations: the table, then the refcount table inside one big write
        return faultsim.Scenario(seed=seed, ops=max(4, ops // 4), grow_to=GROWN, extra_rate=0.1)
    bs = (4096, 8192)[seed % 2]
    return faultsim.Scenario(seed=seed, ops=ops, block_size=bs, size=(96, 160, 64)[seed % 3] * 1024,
                             fold_interval=2 + seed % 7, coarse=max(bs, 16384 << (seed % 3)),
                             arm_budget=1 + seed % 4)


def run_seed(args) -> dict:
    seed, ops, errnos, crash_states = args
    sc = scenario_for(seed, ops)
    try:
        s = faultsim.campaign([sc], errnos=errnos, crash_states=crash_states)
    except Exception as exc:         # the harness itself failed: count it as a violation
        s = {"scenarios": 1, "sites": 0, "faults": 0, "poisoned": 0, "kept_working": 0, "states": 0,
             "by_kind": {}, "by_op": {}, "seconds": 0.0,
             "violations": [f"seed {seed}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"]}
    s["seed"] = seed
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2, help="workloads to run (default 2)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--ops", type=int, default=24, help="ops per workload (default 24)")
    ap.add_argument("--crash-states", type=int, default=3,
                    help="power-loss states checked at each fault (default 3: all pending writes, none, a random subset)")
    ap.add_argument("--errnos", default="EIO,ENOSPC", help="errnos to inject (default EIO,ENOSPC)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    args = ap.parse_args(argv)
    errnos = tuple(getattr(errno, name.strip()) for name in args.errnos.split(","))
    tasks = [(s, args.ops, errnos, args.crash_states) for s in range(args.first_seed, args.first_seed + args.seeds)]
    t0 = time.monotonic()
    totals = {"seeds": 0, "sites": 0, "faults": 0, "poisoned": 0, "kept_working": 0, "states": 0}
    by_kind: dict[str, int] = {}
    by_op: dict[str, int] = {}
    violations = []
    with multiprocessing.Pool(args.jobs) as pool:
        for res in pool.imap_unordered(run_seed, tasks):
            totals["seeds"] += 1
            for k in ("sites", "faults", "poisoned", "kept_working", "states"):
                totals[k] += res[k]
            for mine, theirs in ((by_kind, res["by_kind"]), (by_op, res["by_op"])):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            for v in res["violations"]:
                violations.append(v)
                print(f"VIOLATION seed {res['seed']}: {v}", flush=True)
            print(f"  seed {res['seed']}: {res['sites']} sites, {res['faults']} faults, "
                  f"{len(res['violations'])} violations, {res['seconds']:.0f} s "
                  f"(total {totals['seeds']} seeds, {time.monotonic() - t0:.0f} s)", flush=True)
    elapsed = time.monotonic() - t0
    names = ", ".join(errno.errorcode[e] for e in errnos)
    print(f"fault campaign: {totals['seeds']} workloads (seeds {args.first_seed}-{args.first_seed + args.seeds - 1}, "
          f"{args.ops} ops each), {totals['sites']} call sites, {totals['faults']} faults injected ({names}); "
          f"{totals['poisoned']} poisoned the Disk, {totals['kept_working']} left it working; "
          f"{totals['states']} images checked against the crash contract "
          f"({args.crash_states} power-loss states per fault); {len(violations)} violations; "
          f"{elapsed:.1f} s with {args.jobs} job(s)")
    print("  faults by call:", ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    print("  faults by op:", ", ".join(f"{k} {v}" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
