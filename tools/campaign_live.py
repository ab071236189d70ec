"""Kill campaign of live backups: SIGKILL the server, the CLI client or the backup mid-way.

The sweep (``--steps SEEDS``; CI: tests/test_live_kill.py) stops every step
of the consumer backup and of the pull workflow once per seed; the random
trials (``--trials N``) kill the server or the CLI client after a random
delay.  The trials and their checks are vdisk_testkit/livekill.py's (its
docstring says what each checks); this is the long run (docs/RELIABILITY.md):

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
