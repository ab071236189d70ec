"""Real SIGKILLs of a writer process, checked against the crash contract.

A child process (``python -m vdisk_testkit.killsim SPEC``) opens an image read-write and
runs the crash workload of vdisk_testkit/crashsim.py (writes with and without a
flush after them, discards, checkpoints, snapshot create/delete/revert,
resizes, backups, compact, reset_tracking).  Before each op it appends the op to a log
file, after it returns the op's result (the change id it handed out, if
any).  A killed process's writes stay in the page cache, so the parent
reads every line the child wrote; a line the kill cut short is ignored
(its op had not started).  The parent kills the child at a random moment,
rebuilds the model from the log (ops logged but not completed may or may
not have happened), and checks the image with crashsim.check_image:
check clean but for leaks, flushed data intact, no foreign or garbage
data, snapshots intact, changes_since for every id handed out (in this
round or an earlier one) covering the truth, the same after recovery, and
an incremental backup since the last backup of the chain restoring after
the deltas exported before the kill.  Then the next child continues on the
same image: a campaign of R rounds kills R writers of one image.  With
copies, some killed images are also copied (a copy of a crashed image) and
diverge; at the end no copy answers an id the writers handed out after its
copy, nor the image a copy's (crashsim.CopyWatch).

Used by tests/test_crash.py (a few kills in CI) and tools/campaign_kill.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import vdisk
from vdisk_testkit.crashsim import CopyWatch, CrashModel, Workload, apply_op, check_chain_restores, check_image, weights



@dataclasses.dataclass
class KillStats:
    kills: int = 0           # children killed while running the workload
    ops: int = 0             # ops the killed children started
    in_flight: dict = dataclasses.field(default_factory=dict)   # kind of the op each kill interrupted
    leaky: int = 0           # kills after which check found leaked blocks
    restores: int = 0        # post-kill incremental backups restored after the chain
    orphans: int = 0         # kills that left a backup's temporary snapshot
    orphans_dropped: int = 0  # of those, deleted by a later backup (and checked gone)
    copies: int = 0          # killed images copied and diverged
    copy_checks: int = 0     # (copy, id) pairs checked at the end


class KillCampaign:
    """One image, killed writer after killed writer."""

    def __init__(self, seed: int, workdir: str, size: int = 256 * 1024, block_size: int = 4096,
                 max_delay: float = 0.6, restore: bool = True, copies: int = 0, copy_rate: float = 0.3):
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.path = os.path.join(workdir, "k.vdk")
        self.deltas = os.path.join(workdir, "deltas")
        os.makedirs(self.deltas, exist_ok=True)
        self.block_size = block_size
        self.max_size = 4 * size
        self.max_delay = max_delay
        self.restore = restore
        vdisk.create(self.path, size, block_size=block_size).close()
        self.model = CrashModel(size, block_size)
        self.stats = KillStats()
        self.round = 0
        self.ops_seen = 0
        self.watch = CopyWatch(random.Random(seed ^ 0x5EED), workdir, block_size, limit=copies,
                               rate=copy_rate) if copies else None

    def spec(self) -> dict:
        """What the next child needs: its seed and what earlier rounds left."""
        m = self.model
        return {"path": self.path, "log": os.path.join(self.workdir, f"log-{self.round}"),
                "seed": self.seed * 1000 + self.round, "tag": f"r{self.round}-", "block_size": self.block_size,
                "max_size": self.max_size, "delta_dir": self.deltas, "fold_interval": self.rng.randint(2, 40),
                "snapshots": sorted(m.committed), "chain_id": m.chain_id}

    def kill_once(self) -> None:
        spec = self.spec()
        self.round += 1
        proc = subprocess.Popen([sys.executable, "-m", "vdisk_testkit.killsim", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()
            if first != "ready\n":          # it failed before its first op: say why
                proc.wait(timeout=30)
                raise AssertionError(f"kill child did not start: {first!r} {proc.stderr.read()[-3000:]}")
            time.sleep(self.rng.uniform(0, self.max_delay))
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != -signal.SIGKILL:
            raise AssertionError(f"kill child ended by itself ({proc.returncode}) before the kill: {err[-3000:]}")
        self.stats.kills += 1
        self.check(spec["log"])

    def check(self, log: str) -> None:
        """Replay the log into the model and check the image (see the module docstring)."""
        m = self.model
        ops = read_log(log)
        last = None
        for op, done, result in ops:
            if self.watch:
                self.watch.op_index = self.ops_seen
            self.ops_seen += 1
            m.begin(op)
            if done:
                m.end(op, result)
                if self.watch:
                    self.watch.issued_by(m, result)
                if op["k"] == "backup":
                    check_chain_restores(m, self.workdir)
            last = op if not done else None
        self.stats.ops += len(ops)
        kind = last["k"] if last else "between ops"
        self.stats.in_flight[kind] = self.stats.in_flight.get(kind, 0) + 1
        where = f"seed {self.seed} kill {self.round} (in {kind}, after {len(ops)} ops)"
        restore = os.path.join(self.deltas, f"after-kill-{self.round}.h5") if self.restore and m.chain else None
        try:
            state, infos, epoch, leaked, cid, consumer = check_image(self.path, m, where, recovery=True,
                                                                     restore=restore)
        except vdisk.ImageLockedError as exc:      # the open finding of RELIABILITY.md "Kill": who holds it?
            raise AssertionError(f"{where}: {exc}; the image's locks now: {lock_holders(self.path)}") from exc
        self.stats.leaky += leaked > 0
        if self.watch:
            self.watch.maybe_take(self.path)
        before = set(m.leftover)
        m.recovered(state, infos, epoch, consumer)
        self.stats.orphans += len(m.leftover - before)
        self.stats.orphans_dropped = m.leftovers_dropped
        if cid is not None:                # the post-kill incremental extends the chain
            self.stats.restores += 1
            m.points.append((cid, state.copy()))
            m.chain, m.chain_id, m.chain_content = m.chain + [restore], cid, state.copy()


def lock_holders(path: str) -> list[str]:
    """The /proc/locks entries on path's inode, each with its holder's command line (Linux)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return [f"(not readable: {exc})"]
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    for line in lines:
        fields = line.split()
        if ident not in fields:
            continue
        pid = fields[4] if fields[1] != "->" else fields[5]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:
            cmd = "(gone)"
        out.append(f"{line.strip()} [pid {pid}: {cmd}]")
    return out or ["none"]


def read_log(path: str) -> list[tuple[dict, bool, object]]:
    """(op, completed?, result) for every op the child started; a line cut short is dropped."""
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")[:-1]           # the last piece has no newline: cut short, or empty
    ops: list[list] = []
    for line in lines:
        rec = json.loads(line)
        if "op" in rec:
            assert rec["i"] == len(ops), f"log out of order at {rec}"
            ops.append([rec["op"], False, None])
        else:
            assert rec["i"] == len(ops) - 1, f"log out of order at {rec}"
            ops[-1][1:] = [True, rec["ok"]]
    return [tuple(o) for o in ops]


def run(seed: int, kills: int, workdir: str, **kw) -> KillStats:
    camp = KillCampaign(seed, workdir, **kw)
    for _ in range(kills):
        camp.kill_once()
    if camp.watch:
        camp.watch.final_check(camp.path)
        camp.stats.copies, camp.stats.copy_checks = len(camp.watch.copies), camp.watch.checks
    return camp.stats


# ---------------------------------------------------------------------------- the child
def child(spec: dict) -> None:
    rng = random.Random(spec["seed"])
    d = vdisk.open(spec["path"], "r+")
    d.fold_interval = spec["fold_interval"]
    work = Workload(rng, weights(snapshots=True, backups=True, compact=True, reset=True), spec["block_size"],
                    spec["max_size"], delta_dir=spec["delta_dir"], tag=spec["tag"], snapshots=spec["snapshots"],
                    chain_id=spec["chain_id"])
    fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    print("ready", flush=True)
    for i in range(10 ** 7):
        op = work.next(d.size)
        os.write(fd, (json.dumps({"i": i, "op": op}) + "\n").encode())
        result = apply_op(d, op)
        os.write(fd, (json.dumps({"i": i, "ok": result}) + "\n").encode())
        work.done(op, result)


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
