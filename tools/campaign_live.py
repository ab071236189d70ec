"""Kill campaign of live backups: SIGKILL the server or the backup client mid-backup.

Each trial serves a fresh image with `vdisk serve` while a stamp writer
(tests/live_helpers.py) writes its live export, and runs `vdisk backup FILE
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

    nice -n 19 python3 tools/campaign_live.py --trials 100

Prints trials, kills by target, violations; exits 1 on any violation.
CI runs a few trials through tests/test_live_kill.py.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import vdisk  # noqa: E402
from live_helpers import StampWriter  # noqa: E402  (tests/ is on the path only now)
from nbd_helpers import ServeProcess  # noqa: E402

MiB = 1 << 20
UNITS = 1024


def _backup_cmd(img: str, dest: str) -> list[str]:
    return [sys.executable, "-m", "vdisk", "backup", img, dest, "--consumer", "c", "--compression", "none"]


def trial(work: str, seed: int, max_delay: float = 1.0) -> dict:
    """One trial in directory work; returns {target, delay, violation or None, deltas}."""
    rng = random.Random(seed)
    os.environ["VDISK_RUNTIME_DIR"] = os.path.join(work, "run")
    img = os.path.join(work, "disk.vdk")
    sock = os.path.join(work, "nbd.sock")
    with vdisk.create(img, 16 * MiB, block_size=(4096, 65536)[seed % 2]) as d:
        d.consumers.register("c")
    kill_at, target = rng.randrange(3), rng.choice(("server", "backup"))
    out = {"target": target, "delay": 0.0, "violation": None, "deltas": 0}
    dests = []
    srv = ServeProcess(img, sock)
    w = StampWriter(sock, UNITS)
    try:
        for i in range(3):
            dest = os.path.join(work, f"d{i}.vdelta")
            dests.append(dest)
            p = subprocess.Popen(_backup_cmd(img, dest), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if i != kill_at:
                _, err = p.communicate(timeout=300)
                if p.returncode:
                    raise AssertionError(f"backup {i} exited {p.returncode}: {err.decode()[-300:]}")
                continue
            out["delay"] = delay = rng.uniform(0, max_delay)
            time.sleep(delay)
            (srv.proc if target == "server" else p).kill()
            p.communicate(timeout=300)
            if target == "server":
                srv.kill()
                w.stop(check=False)
                srv = ServeProcess(img, sock)
                w = StampWriter(sock, UNITS)
        w.stop()
        final = os.path.join(work, "final.vdelta")
        dests.append(final)
        r = subprocess.run(_backup_cmd(img, final), capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise AssertionError(f"the backup after the kill exited {r.returncode}: {r.stderr[-300:]}")
        assert srv.stop() == 0, srv.stderr()[-500:]
        out["violation"] = verify(img, dests, work)
        out["deltas"] = sum(os.path.exists(p) for p in dests)
    except Exception as exc:                        # any failure is a violation
        out["violation"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    finally:
        w.stop(check=False)
        srv.kill()
    return out


def verify(img: str, dests: list[str], work: str) -> str | None:
    by_id = {}
    for p in dests:
        if os.path.exists(p):
            s = vdisk.verify(p)                     # a placed delta is complete
            by_id[s["change_id"]] = (p, s)
    with vdisk.open(img) as d:
        cid = d.consumers["c"].change_id
        snaps = [s.name for s in d.snapshots]
        content = d.pread(d.size, 0)
    if snaps:
        return f"snapshots left after a completed backup: {snaps}"
    chain, cur = [], cid
    while cur != "*":
        if cur not in by_id:
            return f"the consumer's chain names {cur}, whose delta is missing (have {sorted(by_id)})"
        p, s = by_id[cur]
        chain.insert(0, p)
        cur = s["since"]
        if len(chain) > len(dests):
            return "the chain loops"
    target = os.path.join(work, "restored.raw")
    vdisk.restore(chain, target, format="raw", overwrite=True)
    with open(target, "rb") as f:
        restored = f.read()
    os.unlink(target)
    if restored != content:
        first = next(i for i in range(len(content)) if restored[i] != content[i])
        return f"the chain {[os.path.basename(c) for c in chain]} restores wrong data from offset {first}"
    res = vdisk.check(img)
    if res.corruptions:
        return f"check: {res.corruptions[:3]}"
    return None


def run(trials: int, seed0: int = 0, max_delay: float = 1.0, log=print) -> dict:
    stats = collections.Counter()
    violations = []
    for t in range(trials):
        with tempfile.TemporaryDirectory(prefix="vdisk-live-kill-") as work:
            r = trial(work, seed0 + t, max_delay)
        stats[r["target"]] += 1
        stats["deltas"] += r["deltas"]
        if r["violation"]:
            violations.append((seed0 + t, r["violation"]))
            log(f"seed {seed0 + t}: kill {r['target']} after {r['delay']:.2f}s: VIOLATION {r['violation']}")
    return {"trials": trials, "server": stats["server"], "backup": stats["backup"], "deltas": stats["deltas"],
            "violations": violations}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=1.0)
    a = ap.parse_args(argv)
    t = time.monotonic()
    r = run(a.trials, a.seed, a.max_delay)
    print(f"{r['trials']} trials ({r['server']} server kills, {r['backup']} backup-client kills), "
          f"{r['deltas']} deltas checked, {len(r['violations'])} violations, {time.monotonic() - t:.0f} s")
    return 1 if r["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
