"""Kill campaign of live backups: SIGKILL the server, the CLI client or the backup mid-way.

The sweep (``--steps SEEDS``; CI: tests/test_live_kill.py) stops every step
of both workflows below once per seed, deterministically: the server runs
through vdisk_testkit/livestop.py, whose stop points SIGKILL it at a step, or hold
it there while the campaign SIGKILLs the CLI client; the pull tool is a
process of its own that SIGKILLs itself at each of its steps
(vdisk_testkit/livekill.py: step_targets(), backup_step_trial, pull_step_trial).  The checks are those
below, plus: after every backup the consumer's id names a delta that
exists, and each prefix of the consumer's chain restores to a state the
writer went through, in order.

The random trials (``--trials N``):
each trial serves a fresh image with `vdisk serve` while a stamp writer
(vdisk_testkit/live_helpers.py) writes its live export, and runs `vdisk backup FILE
DEST --consumer c` from CLI processes three times; during one of them it
kills, after a random delay, either the server (then serves the image
again) or the CLI process.  Then it stops the writer, runs one more backup
(which must succeed), stops the server and checks:

* the consumer's id names a delta that exists, and so on back to a full
  backup: walking ``since`` links from the consumer's id never meets a
  missing delta ("no consumer id names a point whose delta is missing");
* that chain restores to the image's content byte for byte (the writer
  was stopped before the last backup): no changed block is missing;
* no temporary backup snapshot is left (the next backup reclaims those of
  interrupted ones), and check finds no corruption.

A pull trial does the same for the README's pull workflow driven by a
tool (this process): snapshot create, nbdinfo --map of the consumer's
dirty bitmap on the snapshot export, reads of those extents into the
tool's copy, consumer update, snapshot delete.  In one round it stops at
a random step: SIGKILL of the CLI process of step 1, 4 or 5 after a
random delay, a copy of only some of the extents in step 3, or SIGKILL
of the server (served again).  The next rounds start by deleting the
tool's leftover snapshots.  After a last full round with the writer
stopped, the tool's copy must be the image's content byte for byte, and
no snapshot is left.

    nice -n 19 python3 tools/campaign_live.py --steps 3
    nice -n 19 python3 tools/campaign_live.py --trials 100

Prints trials, kills by target, violations; exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import sys
import time

from vdisk_testkit.livekill import run, sweep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50, help="trials with kills after random delays")
    ap.add_argument("--steps", type=int, default=0, metavar="SEEDS",
                    help="instead: the sweep of every (target, step), SEEDS times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=1.0)
    a = ap.parse_args(argv)
    t = time.monotonic()
    r = sweep(a.steps, a.seed) if a.steps else run(a.trials, a.seed, a.max_delay)
    stats = dict(r["stats"])
    deltas = stats.pop("deltas", 0)
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(stats.items()))
    print(f"{r['trials']} trials ({kinds}), {deltas} deltas checked, {len(r['violations'])} violations, "
          f"{time.monotonic() - t:.0f} s")
    return 1 if r["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
