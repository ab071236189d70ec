"""Kill campaign: real SIGKILLs of writer processes at random moments.

Each seed creates one image and kills a writer process on it --rounds
times: the child runs the crash workload (writes with and without a flush,
discards, flushes, checkpoints, snapshot create/delete/revert, resizes,
backups, compact, reset_tracking) and logs every op before it starts and its result when
it returns; the parent kills it after a random delay, then checks the
image (vdisk_testkit/killsim.py, vdisk_testkit/crashsim.py: check clean but for leaks,
flushed data intact, no foreign or garbage data, snapshots intact,
changes_since for every id any earlier child handed out covering the
truth, the same after recovery, the backup chain plus a post-kill
incremental restoring to the recovered content; up to two killed images
per seed are copied and diverge, and at the end no copy answers an id
handed out after its copy, nor the image a copy's).  CI runs a few kills
through tests/test_crash.py (VDISK_KILLS); this is the long run
(docs/RELIABILITY.md):

    nice -n 19 python3 tools/campaign_kill.py --kills 200 [--jobs 2]

Prints kills, violations, time and which ops the kills interrupted; exits
1 on any violation.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import multiprocessing
import sys
import tempfile
import time
import traceback

from vdisk_testkit import killsim


def run_seed(args) -> dict:
    seed, rounds, max_delay = args
    t = time.monotonic()
    out = {"seed": seed, "kills": 0, "ops": 0, "leaky": 0, "restores": 0, "orphans": 0, "orphans_dropped": 0,
           "in_flight": {}, "copies": 0, "copy_checks": 0, "violation": None}
    with tempfile.TemporaryDirectory(prefix="vdisk-kill-") as tmp:
        camp = killsim.KillCampaign(seed, tmp, size=(256, 128, 512)[seed % 3] * 1024,
                                    block_size=(4096, 8192)[seed % 2], max_delay=max_delay, copies=2)
        try:
            for _ in range(rounds):
                camp.kill_once()
            camp.watch.final_check(camp.path)
        except Exception as exc:      # any failure is a violation: an image that does not open is one
            out["violation"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        st = camp.stats
        out.update(kills=st.kills, ops=st.ops, leaky=st.leaky, restores=st.restores, orphans=st.orphans,
                   orphans_dropped=st.orphans_dropped, in_flight=st.in_flight, copies=len(camp.watch.copies),
                   copy_checks=camp.watch.checks)
    out["seconds"] = time.monotonic() - t
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill at least this many writers (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="writers killed one after the other per image (default 5)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=0.6, help="kill within this many seconds of the start")
    ap.add_argument("--jobs", type=int, default=1, help="images killed at once (default 1)")
    args = ap.parse_args(argv)
    tasks = ((s, args.rounds, args.max_delay) for s in itertools.count(args.first_seed))
    t0 = time.monotonic()
    totals = collections.Counter()
    in_flight = collections.Counter()
    violations = []
    with multiprocessing.Pool(args.jobs) as pool:
        for res in pool.imap_unordered(run_seed, tasks):
            totals["seeds"] += 1
            for k in ("kills", "ops", "leaky", "restores", "orphans", "orphans_dropped", "copies", "copy_checks"):
                totals[k] += res[k]
            in_flight.update(res["in_flight"])
            if res["violation"]:
                violations.append(res)
                print(f"VIOLATION seed {res['seed']}: {res['violation']}", flush=True)
            if totals["seeds"] % 10 == 0:
                print(f"  {totals['seeds']} images, {totals['kills']} kills, {len(violations)} violations, "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
            if totals["kills"] >= args.kills:
                pool.terminate()
                break
    elapsed = time.monotonic() - t0
    print(f"kill campaign: {totals['kills']} SIGKILLs of writers over {totals['seeds']} images "
          f"(seeds from {args.first_seed}, {args.rounds} per image), {totals['ops']} ops started, "
          f"{len(violations)} violations; {totals['leaky']} kills left leaked blocks, "
          f"{totals['restores']} post-kill incremental backups restored after the chain; "
          f"{totals['orphans']} kills left a backup's temporary snapshot, {totals['orphans_dropped']} of them "
          f"deleted by a later backup; {totals['copies']} killed images copied and diverged, "
          f"{totals['copy_checks']} (copy, id) pairs checked; "
          f"{elapsed:.1f} s with {args.jobs} job(s)")
    print("op interrupted by the kill: " + ", ".join(f"{k} {n}" for k, n in in_flight.most_common()))
    if violations:
        print("violating seeds:", ", ".join(str(v["seed"]) for v in sorted(violations, key=lambda v: v["seed"])))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
