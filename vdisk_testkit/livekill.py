"""Kill campaign of live backups: SIGKILL the server, the CLI client or the backup mid-way.

The sweep (tools/campaign_live.py ``--steps SEEDS``; CI: tests/test_live_kill.py)
stops every step of both workflows below once per seed, deterministically:
the server runs through vdisk_testkit/livestop.py, whose stop points SIGKILL
it at a step, or hold it there while the campaign SIGKILLs the CLI client; the pull tool is a
process of its own that SIGKILLs itself at each of its steps
(step_targets(), backup_step_trial, pull_step_trial).  The checks are those
below, plus: after every backup the consumer's id names a delta that
exists, and each prefix of the consumer's chain restores to a state the
writer went through, in order.

The random trials (tools/campaign_live.py ``--trials N``):
each trial serves a fresh image with `vdisk serve` while a stamp writer
(vdisk_testkit/live_helpers.py) writes its live export, and runs `vdisk backup
FILE DEST --consumer c` from CLI processes three times; during one of them it
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

Run as ``python -m vdisk_testkit.livekill IMG SOCK NAME COPY STOP``, this module is
the pull tool of pull_step_trial: one round, SIGKILLing itself at STOP.
"""
from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback

import vdisk
from vdisk_testkit.live_helpers import StampWriter, stamp_point
from vdisk_testkit.nbd_client import Client
from vdisk_testkit.nbd_helpers import ServeProcess, extents_of_map, nbdinfo_map

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


# ---------------------------------------------------------------------------- stops at each step
BACKUP_STEPS = ("snapshot", "copy", "synced", "dropped", "placed", "recorded")
PULL_TOOL_STEPS = ("created", "mapped", "copying", "copied", "updated")
PULL_OPS = ("op:snapshot_create", "op:consumer_update", "op:snapshot_delete")


def step_targets() -> list[tuple[str, str]]:
    """Every (target, step) of the deterministic sweep: the server killed at each step of its
    backup and of the pull workflow's operations, the CLI client killed while the server holds
    at each of them, the pull tool killed at each of its steps."""
    out = [(t, s) for t in ("server", "client") for s in BACKUP_STEPS]
    out += [(f"pull-{t}", s) for t in ("server", "client") for s in PULL_OPS]
    out += [("pull-tool", s) for s in PULL_TOOL_STEPS]
    return out


class StopServe(ServeProcess):
    """`vdisk serve` run through vdisk_testkit/livestop.py, with the stop `spec` (STEP:ACTION) armed by
    creating stop_file + '.arm'."""

    def __init__(self, image: str, sock: str, spec: str, stop_file: str):
        self.image, self.socket = image, sock
        self.stderr_path = sock + ".stderr"
        self._err = open(self.stderr_path, "wb")
        env = dict(os.environ, VDISK_STOP=spec, VDISK_STOP_FILE=stop_file)
        self.proc = subprocess.Popen([sys.executable, "-m", "vdisk_testkit.livestop", "serve", image,
                                      "--socket", sock], stdout=subprocess.DEVNULL, stderr=self._err, env=env)
        self.wait_ready()


class Stopped(Exception):
    """A CLI client was stopped on purpose (killed, or it failed because its server was)."""


class Served:
    """The served image of one trial: the server (restarted after it is killed) and a stamp
    writer on its live export that takes over where the killed one stopped."""

    def __init__(self, img: str, sock: str, spec: str, stop_file: str):
        self.img, self.sock, self.spec, self.stop_file = img, sock, spec, stop_file
        self.srv = StopServe(img, sock, spec, stop_file)
        self.w = StampWriter(sock, UNITS)
        deadline = time.monotonic() + 60
        while self.w.done < 64 and time.monotonic() < deadline:     # data for the first backup to copy
            time.sleep(0.01)

    def dead(self, within: float = 30) -> bool:
        """Whether the server process ended, waiting up to `within` seconds: a server that
        SIGKILLs itself closes its sockets (the CLI client sees it and exits) before its
        parent can reap it, and on a loaded machine the CLI can be faster than that."""
        try:
            self.srv.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            return False
        return True

    def restart(self) -> None:
        """Serve the image again after its server was killed; the new writer first writes again
        what the kill may have taken (acknowledged but unflushed writes into fresh blocks),
        so that every backup from here on sees a state(k) of the writer."""
        done = self.w.stop(check=False)
        flushed = self.w.flushed
        self.srv.kill()
        self.srv = StopServe(self.img, self.sock, self.spec, self.stop_file)
        self.w = StampWriter(self.sock, UNITS, start=done, replay_from=flushed)
        if not self.w.replayed.wait(120):
            raise AssertionError(f"the taking-over writer did not replay writes {flushed}..{done}: {self.w.errors}")

    def cli(self, *args) -> str:
        """vdisk ARGS from a CLI process; if the server holds at the armed stop meanwhile, the
        CLI process is SIGKILLed there and the server let go on (raises Stopped); if the CLI
        fails because the server killed itself, raises Stopped too."""
        p = subprocess.Popen([sys.executable, "-m", "vdisk", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        reached = self.stop_file + ".reached"
        deadline = time.monotonic() + 300
        while p.poll() is None and not os.path.exists(reached):
            if time.monotonic() > deadline:
                p.kill()
                raise AssertionError(f"vdisk {' '.join(args)} hangs")
            time.sleep(0.01)
        if os.path.exists(reached):
            p.kill()
            p.communicate()
            os.unlink(reached)
            open(self.stop_file + ".go", "w").close()
            raise Stopped(f"client of {args[0]} killed at the server's {self.spec}")
        out, err = p.communicate()
        if p.returncode:
            if self.dead():
                raise Stopped(f"server killed at {self.spec}: vdisk {args[0]} exited {p.returncode}")
            raise AssertionError(f"vdisk {' '.join(args)} exited {p.returncode}: {err[-300:]}")
        return out

    def close(self) -> None:
        self.w.stop(check=False)
        self.srv.kill()


def _consumer_names_a_delta(srv: Served, name: str, dests: list[str]) -> str | None:
    """None if consumer `name` has no id or names one a complete delta among dests holds."""
    cons = json.loads(srv.cli("consumer", "list", srv.img, "--output", "json"))
    cid = next(c["change_id"] for c in cons if c["name"] == name)
    if cid is None:
        return None
    for p in dests:
        if os.path.exists(p) and vdisk.verify(p)["change_id"] == cid:
            return None
    return f"consumer {name} names {cid}, whose delta is missing"


def _new_image(work: str, seed: int, consumer: str) -> tuple[str, str, str]:
    os.environ["VDISK_RUNTIME_DIR"] = os.path.join(work, "run")
    img, sock = os.path.join(work, "disk.vdk"), os.path.join(work, "nbd.sock")
    with vdisk.create(img, 16 * MiB, block_size=(4096, 65536)[seed % 2]) as d:
        d.consumers.register(consumer)
    return img, sock, os.path.join(work, "stop")


def backup_step_trial(work: str, target: str, step: str, seed: int) -> dict:
    """`vdisk backup FILE DEST --consumer c` three times while the stamp writer writes; the
    stopped one (the first or the second, by seed) has the server SIGKILLed at `step`
    (target 'server') or its CLI client SIGKILLed while the server holds there ('client').
    After every backup the consumer's id names a delta that exists; after a last backup with
    the writer stopped, the consumer's chain restores, prefix by prefix, to states the
    writer went through in order, and in full to the image; no snapshot is left."""
    img, sock, stopf = _new_image(work, seed, "c")
    out = {"target": target, "step": step, "violation": None, "deltas": 0}
    srv = Served(img, sock, f"{step}:{'kill' if target == 'server' else 'hold'}", stopf)
    dests: list[str] = []
    try:
        stop_at = seed % 2
        for i in range(3):
            dest = os.path.join(work, f"d{i}.vdelta")
            dests.append(dest)
            if i == stop_at:
                open(stopf + ".arm", "w").close()
            try:
                srv.cli(*_backup_cmd(img, dest)[3:])
                if i == stop_at:
                    raise AssertionError(f"the backup was not stopped at {step}")
            except Stopped:
                if i != stop_at:
                    raise
                if target == "server":
                    srv.restart()
            out["violation"] = _consumer_names_a_delta(srv, "c", dests)
            if out["violation"]:
                return out
        srv.w.stop()
        final = os.path.join(work, "final.vdelta")
        dests.append(final)
        srv.cli(*_backup_cmd(img, final)[3:])
        assert srv.srv.stop() == 0, srv.srv.stderr()[-500:]
        out["violation"] = verify(img, dests, work) or verify_prefixes(img, dests, work)
        out["deltas"] = sum(os.path.exists(p) for p in dests)
    except Exception as exc:                        # any failure is a violation
        out["violation"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    finally:
        srv.close()
    return out


def verify_prefixes(img: str, dests: list[str], work: str) -> str | None:
    """Each prefix of the consumer's chain restores to a state(k) of the stamp writer, k never
    going back (live_helpers.stamp_point): every delta is the image at one point."""
    by_id = {vdisk.verify(p)["change_id"]: p for p in dests if os.path.exists(p)}
    with vdisk.open(img) as d:
        cur = d.consumers["c"].change_id
    chain = []
    while cur != "*":
        chain.insert(0, by_id[cur])
        cur = vdisk.verify(by_id[cur])["since"]
    last = 0
    target = os.path.join(work, "prefix.raw")
    for n in range(1, len(chain) + 1):
        vdisk.restore(chain[:n], target, format="raw", overwrite=True)
        with open(target, "rb") as f:
            k = stamp_point(f.read(), UNITS)
        os.unlink(target)
        if k < last:
            return f"delta {n} of the chain restores to the state after {k} writes, delta {n - 1} to {last}"
        last = k
    return None


def _tool_stop(stop: str | None, step: str) -> None:
    if stop == step:
        os.kill(os.getpid(), 9)


def pull_round(img: str, sock: str, name: str, copy_path: str, cli, stop: str | None = None) -> None:
    """One round of the README's pull workflow by a backup tool keeping a raw copy at
    copy_path, for consumer p; stop: SIGKILL this process at that step (PULL_TOOL_STEPS)."""
    for s in json.loads(cli("snapshot", "list", img, "--output", "json")):
        if s["name"].startswith("pull-"):           # a leftover of an interrupted round
            cli("snapshot", "delete", img, s["name"])
    cli("snapshot", "create", img, name)
    _tool_stop(stop, "created")
    dirty = extents_of_map(nbdinfo_map(f"nbd+unix:///disk@{name}?socket={sock}", "qemu:dirty-bitmap:p"), 1)
    _tool_stop(stop, "mapped")
    c = Client(sock).connect(f"disk@{name}")
    with open(copy_path, "r+b") as f:
        for i, (off, n) in enumerate(dirty):
            if i == len(dirty) // 2:
                f.flush()
                _tool_stop(stop, "copying")
            f.seek(off)
            f.write(c.read(off, n))
    c.close()
    _tool_stop(stop, "copied")
    snaps = json.loads(cli("snapshot", "list", img, "--output", "json"))
    cid = next(s["change_id"] for s in snaps if s["name"] == name)
    cli("consumer", "update", img, "p", cid)
    _tool_stop(stop, "updated")
    cli("snapshot", "delete", img, name)


def pull_step_trial(work: str, target: str, step: str, seed: int) -> dict:
    """The pull workflow, three rounds while the stamp writer writes; in the second the server
    SIGKILLs itself after the operation `step` (target pull-server), or the CLI client is
    SIGKILLed while the server holds there (pull-client), or the tool, a process of its own,
    SIGKILLs itself at `step` (pull-tool).  The round after the stopped one leaves the tool's
    copy a state the writer went through (no changed block missed); after a last round with
    the writer stopped the copy is the image byte for byte, and no snapshot is left."""
    img, sock, stopf = _new_image(work, seed, "p")
    out = {"target": target, "step": step, "violation": None, "deltas": 0}
    copy_path = os.path.join(work, "copy.raw")
    with open(copy_path, "wb") as f:
        f.truncate(16 * MiB)
    srv = Served(img, sock, f"{step}:{'hold' if target == 'pull-client' else 'kill'}", stopf)
    try:
        for r in range(4):
            if r == 1 and target == "pull-tool":
                p = subprocess.run([sys.executable, "-m", "vdisk_testkit.livekill", img, sock, f"pull-{r}",
                                    copy_path, step], capture_output=True, text=True, timeout=300)
                if p.returncode != -9:
                    raise AssertionError(f"the tool was not killed at {step}: exit {p.returncode} {p.stderr[-300:]}")
                continue
            if r == 1:
                open(stopf + ".arm", "w").close()
            try:
                pull_round(img, sock, f"pull-{r}", copy_path, srv.cli)
                if r == 1:
                    raise AssertionError(f"the round was not stopped at {step}")
            except Stopped:
                if r != 1:
                    raise
                if target == "pull-server":
                    srv.restart()
                continue
            if r == 2:
                with open(copy_path, "rb") as f:
                    stamp_point(f.read(), UNITS)
        srv.w.stop()
        pull_round(img, sock, "pull-last", copy_path, srv.cli)
        assert srv.srv.stop() == 0, srv.srv.stderr()[-500:]
        with vdisk.open(img) as d:
            content = d.pread(d.size, 0)
            snaps = [s.name for s in d.snapshots]
        with open(copy_path, "rb") as f:
            copy = f.read()
        if snaps:
            out["violation"] = f"snapshots left after a completed round: {snaps}"
        elif copy != content:
            first = next(i for i in range(len(copy)) if copy[i] != content[i])
            out["violation"] = f"the tool's copy misses a change at offset {first}"
        elif vdisk.check(img).corruptions:
            out["violation"] = "check found corruption"
    except Exception as exc:                        # any failure is a violation
        out["violation"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    finally:
        srv.close()
    return out


def step_trial(work: str, target: str, step: str, seed: int) -> dict:
    return (pull_step_trial if target.startswith("pull-") else backup_step_trial)(work, target, step, seed)


def sweep(seeds: int, seed0: int = 0, log=print) -> dict:
    """Every (target, step) of step_targets() for each of `seeds` seeds."""
    stats = collections.Counter()
    violations = []
    for seed in range(seed0, seed0 + seeds):
        for target, step in step_targets():
            with tempfile.TemporaryDirectory(prefix="vdisk-live-step-") as work:
                r = step_trial(work, target, step, seed)
            stats[target] += 1
            stats["deltas"] += r["deltas"]
            if r["violation"]:
                violations.append((seed, target, step, r["violation"]))
                log(f"seed {seed}: {target} stopped at {step}: VIOLATION {r['violation']}")
    return {"trials": sum(v for k, v in stats.items() if k != "deltas"), "stats": dict(stats),
            "violations": violations}


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


if __name__ == "__main__":
    img, sock, name, copy_path, stop = sys.argv[1:]
    pull_round(img, sock, name, copy_path, lambda *args: _cli(*args).stdout, stop)
