"""Power-loss campaign: crash states through the recording I/O layer.

Each seed runs one random workload (writes, zero writes, discards,
flushes, checkpoints, resizes, snapshot create/delete/revert, full and
incremental backups, compact, reset_tracking) on an image opened through
vdisk.testing.RecordingIO, samples crash states at every fsync and after
every op (unsynced writes dropped at random, some torn at 512-byte
sectors; one seed in eight grows the disk and the file far enough to
relocate the block table and the refcount table), and checks each against
the crash contract (vdisk_testkit/crashsim.py: flushed data intact, no foreign or garbage data, check clean but for
leaks, committed snapshots intact, changes_since never under-reports for
any id handed out, the exported backup chain still restores after the
crash; up to two crash states per seed are kept as copies, diverge, and at
the end answer no id the original handed out after them, nor it theirs).  CI runs the same code through tests/test_crash.py
(VDISK_CRASH_SEEDS); this is the long run (docs/RELIABILITY.md):

    nice -n 19 python3 tools/campaign_powerloss.py --states 10000 [--jobs 2]
    python3 tools/campaign_powerloss.py --seeds 4              # a quick look

Prints states, violations and time; exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
import time
import traceback

from vdisk_testkit import crashsim


def config_for(seed: int, ops: int, per_point: int) -> dict:
    """The workload of one seed: block size, image size and fold interval vary;
    one seed in eight writes a 7 MiB disk whole, snapshots it and keeps
    writing large runs and resizing up to 12 MiB, so the block table and the
    refcount table are relocated (slow: two thirds of the ops); of the rest,
    one in four runs the data ops alone (more states per write path)."""
    if seed % 8 == 7:
        return dict(ops=max(1, 2 * ops // 3), per_point=per_point, block_size=4096, size=1730 * 4096,
                    max_size=12 << 20, fold_interval=3 + seed % 13, snapshots=True, backups=True, compact=True,
                    fill=True, reset=True, restore_rate=0.05, copies=2)
    everything = seed % 4 != 3
    return dict(ops=ops, per_point=per_point, block_size=(4096, 8192)[seed % 2],
                size=(96, 160, 64)[seed % 3] * 1024, fold_interval=3 + seed % 13,
                snapshots=everything, backups=everything, compact=everything, reset=everything, restore_rate=0.05,
                copies=2)


RELOCATIONS = {"_grow_tables": 0, "_grow_refcounts": 0}     # counted in each worker


def _count_relocations() -> None:
    """Count the Disk's table relocations (the figures say the campaign reached them)."""
    from vdisk.disk import Disk
    for name in RELOCATIONS:
        real = getattr(Disk, name, None)
        if real is None or getattr(real, "counted", False):
            continue

        def counted(self, *args, _real=real, _name=name, **kw):
            RELOCATIONS[_name] += 1
            return _real(self, *args, **kw)
        counted.counted = True
        setattr(Disk, name, counted)


def run_seed(args) -> dict:
    seed, ops, per_point = args
    _count_relocations()
    cfg = config_for(seed, ops, per_point)
    t = time.monotonic()
    before = dict(RELOCATIONS)
    out = {"seed": seed, "states": 0, "leaky": 0, "restores": 0, "copies": 0, "copy_checks": 0, "violation": None}
    try:
        checker = crashsim.run_campaign(seed, **cfg)
        out.update(states=checker.states, leaky=checker.leaky, restores=checker.restores)
        if checker.watch:
            out.update(copies=len(checker.watch.copies), copy_checks=checker.watch.checks)
    except Exception as exc:          # any failure is a violation: an image that does not open is one
        out["violation"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    out["seconds"] = time.monotonic() - t
    out["table_relocations"] = RELOCATIONS["_grow_tables"] - before["_grow_tables"]
    out["refcount_relocations"] = RELOCATIONS["_grow_refcounts"] - before["_grow_refcounts"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--states", type=int, help="run seeds until this many crash states were checked")
    size.add_argument("--seeds", type=int, help="run this many seeds")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--ops", type=int, default=60, help="ops per seed (default 60)")
    ap.add_argument("--per-point", type=int, default=4, help="crash states per sampling point (default 4)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    args = ap.parse_args(argv)
    if args.states is None and args.seeds is None:
        args.seeds = 4
    seeds = (range(args.first_seed, args.first_seed + args.seeds) if args.seeds is not None
             else itertools.count(args.first_seed))
    tasks = ((s, args.ops, args.per_point) for s in seeds)
    t0 = time.monotonic()
    totals = {"seeds": 0, "states": 0, "leaky": 0, "restores": 0, "table_relocations": 0, "refcount_relocations": 0,
              "copies": 0, "copy_checks": 0}
    violations = []
    with multiprocessing.Pool(args.jobs) as pool:
        for res in pool.imap_unordered(run_seed, tasks):
            totals["seeds"] += 1
            for k in ("states", "leaky", "restores", "table_relocations", "refcount_relocations", "copies",
                      "copy_checks"):
                totals[k] += res[k]
            if res["violation"]:
                violations.append(res)
                print(f"VIOLATION seed {res['seed']}: {res['violation']}", flush=True)
            if totals["seeds"] % 10 == 0:
                print(f"  {totals['seeds']} seeds, {totals['states']} states, {len(violations)} violations, "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
            if args.states is not None and totals["states"] >= args.states:
                pool.terminate()
                break
    elapsed = time.monotonic() - t0
    print(f"power-loss campaign: {totals['states']} crash states over {totals['seeds']} seeds "
          f"(seeds from {args.first_seed}, {args.ops} ops each, {args.per_point} states per point), "
          f"{len(violations)} violations; {totals['leaky']} states with leaked blocks, "
          f"{totals['restores']} post-crash incremental backups restored after the chain; "
          f"{totals['table_relocations']} block-table and {totals['refcount_relocations']} refcount-table "
          f"relocations in the workloads; {totals['copies']} copies of crash states diverged, "
          f"{totals['copy_checks']} (copy, id) pairs checked; "
          f"{elapsed:.1f} s with {args.jobs} job(s)")
    if violations:
        print("violating seeds:", ", ".join(str(v["seed"]) for v in sorted(violations, key=lambda v: v["seed"])))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
