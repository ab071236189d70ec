"""Fault-injection campaign below Python: EIO and ENOSPC at every write-side
system call of restore, convert, check --repair, backup, merge and create.

Each operation runs through the CLI (``python -m vdisk.cli``) in a child
process with vdisk_testkit/faultshim.c preloaded (vdisk_testkit/opfaultsim.py is
the engine and states what every run must satisfy).  A fault-free dry run
counts the calls the operation makes under its directory (write, pwrite(v),
writev, fsync, fdatasync, ftruncate, fallocate, ... from Python and from
libhdf5 alike); then call k fails, for k = 1..N, in each mode: EIO, ENOSPC,
and ENOSPC after a short write with every later write failing.  CI runs a
few sites of each operation through tests/test_op_faults.py; this is the
long run (docs/RELIABILITY.md):

    nice -n 19 python3 tools/fault_campaign_ops.py --jobs 2          # every site, every mode
    python3 tools/fault_campaign_ops.py --sites 3 --ops merge,restore-raw   # a quick look

Prints the operations, sites, faults and violations; exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import json
import sys

from vdisk_testkit import opfaultsim


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", help="comma-separated operation names (default: all)")
    ap.add_argument("--modes", default=",".join(opfaultsim.MODES),
                    help="comma-separated fault modes: eio, enospc, short (default: all)")
    ap.add_argument("--sites", type=int, default=None,
                    help="at most about this many sites per operation (default: every site)")
    ap.add_argument("--rotate", action="store_true", help="one mode per site, in turn")
    ap.add_argument("--scale", type=int, default=1,
                    help="multiply the source image's size and extents (1: 256 KiB; 128: 32 MiB, several batches)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the runs' directories go (default: the temp dir)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    ops = args.ops.split(",") if args.ops else None
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in opfaultsim.MODES]
    if bad:
        ap.error(f"unknown modes {bad}")
    s = opfaultsim.campaign(ops, modes=modes, limit=args.sites, jobs=args.jobs, work_root=args.workdir,
                            rotate=args.rotate, scale=args.scale, log=lambda msg: print("VIOLATION", msg, flush=True))
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"operations {s['operations']}, sites {s['sites']}, faults {s['faults']} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(s['by_mode'].items()))}), "
              f"violations {len(s['violations'])}, {s['seconds']:.0f} s")
        print("sites by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(s["by_kind"].items())))
        for name, v in s["by_op"].items():
            print(f"  {name:22} sites {v['sites']:4}  faults {v['faults']:4}  files {', '.join(v['files'])}")
        for msg in s["violations"]:
            print("VIOLATION", msg)
    return 1 if s["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
