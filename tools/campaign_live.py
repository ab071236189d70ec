"""Kill campaign of live backups: SIGKILL the server, the CLI client or the backup mid-way.

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

    nice -n 19 python3 tools/campaign_live.py --trials 100

Prints trials, kills by target, violations; exits 1 on any violation.
CI runs a few trials through tests/test_live_kill.py.
"""
from __future__ import annotations

import argparse
import collections
import json
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
from nbd_client import Client  # noqa: E402
from nbd_helpers import ServeProcess, extents_of_map, nbdinfo_map, run as run_tool  # noqa: E402

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


def _cli(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "vdisk", *args], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise AssertionError(f"vdisk {' '.join(args)} exited {r.returncode}: {r.stderr[-300:]}")
    return r


def _killed_cli(rng, max_delay: float, *args) -> None:
    p = subprocess.Popen([sys.executable, "-m", "vdisk", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0, max_delay))
    p.kill()
    p.wait(60)


def pull_trial(work: str, seed: int, max_delay: float = 0.6) -> dict:
    """The pull workflow interrupted at a random step of one round (module docstring)."""
    rng = random.Random(seed)
    os.environ["VDISK_RUNTIME_DIR"] = os.path.join(work, "run")
    img = os.path.join(work, "disk.vdk")
    sock = os.path.join(work, "nbd.sock")
    size = 16 * MiB
    with vdisk.create(img, size, block_size=(4096, 65536)[seed % 2]) as d:
        d.consumers.register("p")
    kill_round, step, target = rng.randrange(3), rng.randrange(1, 6), rng.choice(("tool", "server"))
    out = {"target": f"pull-{target}-step{step}", "delay": 0.0, "violation": None, "deltas": 0}
    copy = bytearray(size)
    state = {"srv": ServeProcess(img, sock)}
    state["w"] = StampWriter(sock, UNITS)

    def kill_server():
        state["srv"].kill()
        state["w"].stop(check=False)
        state["srv"] = ServeProcess(img, sock)
        state["w"] = StampWriter(sock, UNITS)

    def one_round(name: str, stop_at: int | None) -> None:
        for s in json.loads(_cli("snapshot", "list", img, "--output", "json").stdout):
            if s["name"].startswith("pull-"):           # a leftover of an interrupted round
                _cli("snapshot", "delete", img, s["name"])
        for k in range(1, 6):
            if k == stop_at and target == "server":
                kill_server()
                return
            if k == 1:
                if k == stop_at:
                    return _killed_cli(rng, max_delay, "snapshot", "create", img, name)
                _cli("snapshot", "create", img, name)
            elif k == 2:
                uri = f"nbd+unix:///disk@{name}?socket={sock}"
                dirty = extents_of_map(nbdinfo_map(uri, "qemu:dirty-bitmap:p"), 1)
            elif k == 3:
                c = Client(sock).connect(f"disk@{name}")
                todo = dirty[:rng.randrange(len(dirty) + 1)] if k == stop_at else dirty
                for off, n in todo:
                    copy[off:off + n] = c.read(off, n)
                c.close()
                if k == stop_at:
                    return
            elif k == 4:
                snaps = json.loads(_cli("snapshot", "list", img, "--output", "json").stdout)
                cid = next(s["change_id"] for s in snaps if s["name"] == name)
                if k == stop_at:
                    return _killed_cli(rng, max_delay, "consumer", "update", img, "p", cid)
                _cli("consumer", "update", img, "p", cid)
            else:
                if k == stop_at:
                    return _killed_cli(rng, max_delay, "snapshot", "delete", img, name)
                _cli("snapshot", "delete", img, name)
    try:
        for r in range(3):
            one_round(f"pull-{r}", step if r == kill_round else None)
            time.sleep(rng.uniform(0, 0.3))
        state["w"].stop()
        one_round("pull-last", None)
        assert state["srv"].stop() == 0
        with vdisk.open(img) as d:
            content = d.pread(d.size, 0)
            snaps = [s.name for s in d.snapshots]
        if snaps:
            out["violation"] = f"snapshots left after a completed round: {snaps}"
        elif bytes(copy) != content:
            first = next(i for i in range(size) if copy[i] != content[i])
            out["violation"] = f"the tool's copy misses a change at offset {first}"
        elif vdisk.check(img).corruptions:
            out["violation"] = "check found corruption"
    except Exception as exc:                        # any failure is a violation
        out["violation"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    finally:
        state["w"].stop(check=False)
        state["srv"].kill()
    return out


def run(trials: int, seed0: int = 0, max_delay: float = 1.0, log=print) -> dict:
    stats = collections.Counter()
    violations = []
    for t in range(trials):
        with tempfile.TemporaryDirectory(prefix="vdisk-live-kill-") as work:
            r = (pull_trial if t % 2 else trial)(work, seed0 + t, max_delay)
        stats[r["target"].split("-step")[0]] += 1
        stats["deltas"] += r["deltas"]
        if r["violation"]:
            violations.append((seed0 + t, r["violation"]))
            log(f"seed {seed0 + t}: kill {r['target']} after {r['delay']:.2f}s: VIOLATION {r['violation']}")
    return {"trials": trials, "stats": dict(stats), "violations": violations}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=1.0)
    a = ap.parse_args(argv)
    t = time.monotonic()
    r = run(a.trials, a.seed, a.max_delay)
    stats = dict(r["stats"])
    deltas = stats.pop("deltas", 0)
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(stats.items()))
    print(f"{r['trials']} trials ({kinds}), {deltas} deltas checked, {len(r['violations'])} violations, "
          f"{time.monotonic() - t:.0f} s")
    return 1 if r["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
