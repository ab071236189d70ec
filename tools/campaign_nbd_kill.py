"""NBD server kill campaign: SIGKILL of `vdisk serve` after a client's flush, or with requests in flight.

Each seed creates one image and serves it --rounds times; in each round a
client (vdisk_testkit/nbdkill.py) sends random WRITE (some with FUA), WRITE_ZEROES,
TRIM, READ and FLUSH requests, up to --depth in flight, then the server is
SIGKILLed right after a FLUSH reply (every odd round, and 30% of the
others) or with requests in flight.  After each kill the image is checked
with vdisk_testkit/crashsim.py's checks: check clean but for leaks, every byte its
value as of the last acknowledged flush (as the flush was sent) or one
written since, FUA writes intact, changes_since of every change id handed
out in any earlier round covering every changed block, the same after
recovery, the consumer's id, the backup chain plus a post-kill incremental
restoring to the recovered content.  CI runs a few kills through
tests/test_nbd_kill.py; this is the long run (docs/RELIABILITY.md):

    nice -n 19 python3 tools/campaign_nbd_kill.py --kills 300 [--jobs 2]

Prints kills, violations, requests, time; exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import multiprocessing
import sys
import tempfile
import time
import traceback

from vdisk_testkit import nbdkill

FIELDS = [f.name for f in dataclasses.fields(nbdkill.NbdKillStats)]


def run_seed(args) -> dict:
    seed, rounds, depth = args
    t = time.monotonic()
    out = {"seed": seed, "violation": None}
    with tempfile.TemporaryDirectory(prefix="vdisk-nbdkill-") as tmp, \
            tempfile.TemporaryDirectory(prefix="vk-") as sockdir:
        camp = nbdkill.NbdKillCampaign(seed, tmp, sockdir, size=(256, 128, 512)[seed % 3] * 1024,
                                       block_size=(4096, 8192)[seed % 2], depth=depth)
        try:
            for _ in range(rounds):
                camp.kill_once()
        except Exception as exc:      # any failure is a violation: an image that does not open is one
            out["violation"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        out.update(dataclasses.asdict(camp.stats))
    out["seconds"] = time.monotonic() - t
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill at least this many servers (default 20)")
    ap.add_argument("--rounds", type=int, default=5, help="servers killed one after the other per image (default 5)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--depth", type=int, default=8, help="requests in flight at most (default 8)")
    ap.add_argument("--jobs", type=int, default=1, help="images served at once (default 1)")
    args = ap.parse_args(argv)
    # exactly the seeds needed, each run to its end (a worker stopped mid-round would orphan its server)
    seeds = -(-args.kills // args.rounds)
    tasks = [(s, args.rounds, args.depth) for s in range(args.first_seed, args.first_seed + seeds)]
    t0 = time.monotonic()
    totals = collections.Counter()
    ids = 0
    violations = []
    with multiprocessing.Pool(args.jobs) as pool:
        for res in pool.imap_unordered(run_seed, tasks):
            totals["seeds"] += 1
            for k in FIELDS:
                if k not in ("ids", "seconds"):
                    totals[k] += res[k]
            ids = max(ids, res["ids"])
            if res["violation"]:
                violations.append(res)
                print(f"VIOLATION seed {res['seed']}: {res['violation']}", flush=True)
            if totals["seeds"] % 10 == 0:
                print(f"  {totals['seeds']} images, {totals['kills']} kills, {len(violations)} violations, "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
    elapsed = time.monotonic() - t0
    print(f"NBD kill campaign: {totals['kills']} SIGKILLs of vdisk serve over {totals['seeds']} images "
          f"(seeds from {args.first_seed}, {args.rounds} per image, up to {args.depth} requests in flight): "
          f"{totals['after_flush']} right after a FLUSH reply, {totals['in_flight']} with requests in flight; "
          f"{totals['requests']} requests ({totals['flushes']} flushes, {totals['fua']} FUA writes); "
          f"{len(violations)} violations; up to {ids} change ids checked at one kill; "
          f"{totals['leaky']} kills left leaked blocks, {totals['restores']} post-kill incrementals restored "
          f"after the chain; {elapsed:.1f} s with {args.jobs} job(s)")
    if violations:
        print("violating seeds:", ", ".join(str(v["seed"]) for v in sorted(violations, key=lambda v: v["seed"])))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
