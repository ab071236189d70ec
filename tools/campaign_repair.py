"""Repair campaign: header commits lost at random points of random histories.

Each seed runs vdisk_testkit/repairsim.py: a random history (writes, zero writes,
discards, flushes, checkpoints, resizes, reopens) in which, at random
points, the newest header slot is damaged (the image opens at the commit
before, with the data and counters of what followed durable), ``check
--repair`` runs, and every id ever handed out is asked of the repaired
image: refused, or answered with every block that differs from its point;
an id string is never handed out twice.  CI runs a few seeds through
tests/test_repair_campaign.py; this is the long run (docs/RELIABILITY.md):

    nice -n 19 python3 tools/campaign_repair.py --seeds 300

With --regions the history also runs every operation whose commit moves a
metadata region (table growth, snapshot create/delete, revert,
reset_tracking, consumer register/update/forget), and after every repair
each snapshot the image holds must read the content it was taken with:

    nice -n 19 python3 tools/campaign_repair.py --regions --seeds 300

Prints losses, checks and violations; exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from vdisk_testkit import repairsim


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--ops", type=int, default=150, help="ops per seed (default 150)")
    ap.add_argument("--regions", action="store_true",
                    help="also run the operations whose commit moves a metadata region (table growth, snapshot "
                         "create/delete, revert, reset_tracking, consumer register/update/forget)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    tot = repairsim.RepairStats()
    violations = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        try:
            st = repairsim.run(seed, ops=args.ops, regions=args.regions)
        except Exception as exc:      # any failure is a violation
            violations.append(seed)
            print(f"VIOLATION seed {seed}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}", flush=True)
            continue
        for f in ("losses", "repairs_moved", "ids", "checks", "stale", "region_ops", "region_losses",
                  "layout_losses", "snapshot_checks"):
            setattr(tot, f, getattr(tot, f) + getattr(st, f))
    print(f"repair campaign: {args.seeds} seeds (from {args.first_seed}, {args.ops} ops each), {tot.losses} header "
          f"commits lost and repaired ({tot.repairs_moved} with counters past the surviving header: the "
          f"generation moved), {tot.ids} ids handed out, {tot.checks} (id, repaired image) checks, "
          f"{tot.stale} of them refused as stale, {len(violations)} violations; "
          + (f"{tot.region_ops} region-moving operations, {tot.region_losses} losses with a region-moving "
             f"operation's commit newest, {tot.layout_losses} with the two slots naming different regions, "
             f"{tot.snapshot_checks} (snapshot, repaired image) content checks; "
             if args.regions else "")
          + f"{time.monotonic() - t0:.1f} s")
    if violations:
        print("violating seeds:", ", ".join(map(str, violations)))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
