"""Crash simulation: a random workload, a model of what the image may hold
after a crash, and the checks of the crash contract.

Shared by tests/test_crash.py (short runs in CI), vdisk_testkit/killsim.py (real
SIGKILLs of a writer process) and tools/campaign_powerloss.py (power loss
through vdisk.testing.RecordingIO, sampled at every fsync).

The workload is a stream of ops as plain dicts (:class:`Workload`), run on
a Disk by :func:`apply_op`, so a child process can log each op before it
runs it.  The model (:class:`CrashModel`) registers an op's result before
the op runs (``begin``) and its completion after it returns (``end``), so
a crash state taken inside an op is judged fairly: it keeps, per byte, the
content as of the last completed flush and every value written since.  A
crash state passes (:func:`check_image`) when
  * check() finds no corruption (leaks allowed) and the image opens;
  * every byte holds its flushed value or a value written after the flush
    (never zeros for flushed data, never another block's data, never garbage);
  * every committed snapshot exists with its frozen content, and no other
    snapshot exists but the one an interrupted op was creating (a backup's
    temporary snapshot included);
  * for every change id handed out (checkpoints, snapshots, backups),
    changes_since(id) contains every block whose content differs from the
    content at the id's point;
  * the same holds after opening read-write (recovery: the content must
    not change) and reopening;
  * the consumer "c" (backups through ``consumer=``) names either the id of
    its last completed backup or, when one was running, that backup's id
    once its delta file is in place: never an id whose delta is missing,
    never an older one; none after a reset_tracking committed;
  * optionally: an incremental backup of the recovered image since the id
    of the last backup taken before the crash, restored after the chain of
    deltas exported before the crash, equals the recovered content;
  * copies (:class:`CopyWatch`): some crash states that passed are kept as
    copies of the image (a copy of a crashed image, or of an open one) and
    diverge (writes, checkpoints); at the end no copy answers an id the
    original handed out after the copy (StaleChangeIdError, and a backup
    of the copy since it writes nothing), the original answers no id of a
    copy, and every id a copy does answer covers its changes.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile

import numpy as np

import vdisk
from vdisk.backup import sidecar_path
from vdisk.testing import RecordingIO
from vdisk_testkit.helpers import block_mask, differing_mask, pattern

BACKUP_PREFIX = "vdisk-backup-"     # vdisk.backup()'s temporary snapshot

BASE_WEIGHTS = {"write": 45, "zero": 8, "discard": 12, "flush": 12, "checkpoint": 10, "resize": 5}
SNAPSHOT_WEIGHTS = {"snapshot": 6, "delete": 3, "revert": 3}
BACKUP_WEIGHTS = {"backup": 4, "cbackup": 2}   # cbackup: a backup of the registered consumer "c"
CONSUMER = "c"
COMPACT_WEIGHTS = {"compact": 2}
RESET_WEIGHTS = {"reset": 1}       # reset_tracking: a new epoch, every id handed out goes stale
FILL_WEIGHTS = {"fill": 10}        # writes of 16 to 128 blocks: the file outgrows the first refcount table


def weights(snapshots: bool = False, backups: bool = False, compact: bool = False,
            fill: bool = False, reset: bool = False) -> dict[str, int]:
    """Op kinds and their weights for a workload."""
    out = dict(BASE_WEIGHTS)
    if reset:
        out.update(RESET_WEIGHTS)
    if snapshots:
        out.update(SNAPSHOT_WEIGHTS)
    if backups:
        out.update(BACKUP_WEIGHTS)
    if compact:
        out.update(COMPACT_WEIGHTS)
    if fill:
        out.update(FILL_WEIGHTS)
    return out


# ---------------------------------------------------------------------------- the workload
class Workload:
    """Random ops as plain dicts (JSON-safe: a child process logs them).

    It knows the snapshots it may delete or revert to and the last backup
    of its chain; ``done`` tells it what an op did.  ``tag`` makes snapshot
    names and delta paths unique across workloads on one image.
    """

    def __init__(self, rng: random.Random, kinds: dict[str, int], block_size: int, max_size: int,
                 delta_dir: str | None = None, tag: str = "", snapshots=(), chain_id: str | None = None,
                 script=()):
        self.rng = rng
        self.kinds, self.weights = list(kinds), list(kinds.values())
        self.bs = block_size
        self.max_size = max_size
        self.delta_dir = delta_dir
        self.tag = tag
        self.snapshots = set(snapshots)
        self.chain_id = chain_id
        self.far = "fill" in kinds      # resizes anywhere up to max_size: grows past the table's capacity
        self.script = list(script)      # ops to run first
        self.n = 0

    def next(self, size: int) -> dict:
        rng = self.rng
        self.n += 1
        if self.script:
            return self.script.pop(0)
        while True:
            kind = rng.choices(self.kinds, self.weights)[0]
            if kind in ("delete", "revert") and not self.snapshots:
                continue
            break
        if kind in ("write", "zero", "fill"):
            off = rng.randrange(size)
            most = 128 * self.bs if kind == "fill" else 3 * self.bs
            length = rng.randint(min(size - off, most // 8) if kind == "fill" else 1, min(size - off, most))
            return {"k": "write", "off": off, "len": length, "seed": rng.randrange(2**31), "zero": kind == "zero",
                    "flush": rng.random() < 0.2}     # a write and a flush right after it
        if kind == "discard":
            off = rng.randrange(size)
            return {"k": "discard", "off": off, "len": rng.randint(1, size - off)}
        if kind in ("delete", "revert"):
            return {"k": kind, "name": rng.choice(sorted(self.snapshots))}
        if kind == "snapshot":
            return {"k": "snapshot", "name": f"s{self.tag}{self.n}"}
        if kind == "resize":
            cap = max(512, min(2 * size, self.max_size) if not self.far else self.max_size)
            return {"k": "resize", "size": rng.randrange(1, cap // 512 + 1) * 512}
        if kind == "backup":
            full = self.chain_id is None or rng.random() < 0.25
            return {"k": "backup", "dest": os.path.join(self.delta_dir, f"{self.tag}b{self.n}.h5"),
                    "since": None if full else self.chain_id, "compression": rng.choice(["lzf", None])}
        if kind == "cbackup":
            return {"k": "cbackup", "dest": os.path.join(self.delta_dir, f"{self.tag}c{self.n}.h5")}
        return {"k": kind}              # flush, checkpoint, compact, reset

    def done(self, op: dict, result) -> None:
        if op["k"] == "snapshot":
            self.snapshots.add(op["name"])
        elif op["k"] == "delete":
            self.snapshots.discard(op["name"])
        elif op["k"] == "backup":
            self.chain_id = result
        elif op["k"] == "reset":
            self.chain_id = None        # the next backup is a full one


def op_data(op: dict) -> bytes:
    return pattern(op["seed"], op["len"], zero=op["zero"])


def apply_op(d: vdisk.Disk, op: dict):
    """Run one op on the disk; returns the change id it handed out, if any."""
    k = op["k"]
    if k == "write":
        d.pwrite(op_data(op), op["off"])
        if op.get("flush"):
            d.flush()
    elif k == "discard":
        d.discard(op["off"], op["len"])
    elif k == "flush":
        d.flush()
    elif k == "checkpoint":
        return d.checkpoint()
    elif k == "snapshot":
        with d.snapshot(op["name"]) as snap:
            return snap.change_id
    elif k == "delete":
        d.delete_snapshot(op["name"])
    elif k == "revert":
        d.revert(op["name"])
    elif k == "resize":
        d.resize(op["size"])
    elif k == "compact":
        d.compact()
    elif k == "reset":
        d.reset_tracking()
    elif k == "backup":
        return vdisk.backup(d, op["dest"], since=op["since"], compression=op["compression"]).change_id
    elif k == "cbackup":
        if CONSUMER not in d.consumers:
            d.consumers.register(CONSUMER)
        return vdisk.backup(d, op["dest"], consumer=CONSUMER, compression=None).change_id
    else:
        raise ValueError(f"unknown op {op!r}")
    return None


# ---------------------------------------------------------------------------- the model
class CrashModel:
    def __init__(self, size: int, block_size: int):
        self.bs = block_size
        self.cur = np.zeros(size, np.uint8)
        self.flushed = self.cur.copy()
        self.versions: list[np.ndarray] = []
        self.points: list[tuple[str, np.ndarray]] = []   # (change id, content then)
        self.snap_content: dict[str, np.ndarray] = {}     # every snapshot ever taken: frozen content
        self.committed: set[str] = set()                  # snapshots that must exist
        self.leftover: set[str] = set()                   # an interrupted backup's snapshot: may exist until
                                                          # a backup completes (it deletes them)
        self.leftovers_dropped = 0                        # ... how many a completed backup deleted
        self.in_flight: str | None = None                 # the snapshot an op is creating/deleting
        self.backup_inflight: np.ndarray | None = None    # content at the start of a running backup
        self.chain: list[str] = []                        # deltas of the current backup chain
        self.chain_id: str | None = None                  # the change id of its last delta
        self.chain_content: np.ndarray | None = None      # the content at that point
        self.reset_inflight = False                       # a reset_tracking is running: the epoch may change
        self.consumer_id: str | None = None               # the consumer's id after its last completed backup
        self.consumer_dest: str | None = None             # the delta of its running backup

    def will_become(self, new: np.ndarray) -> None:
        self.versions.append(new.copy())
        self.cur = new

    def flushed_now(self) -> None:
        self.flushed = self.cur.copy()
        self.versions = []

    def allowed(self, state: np.ndarray) -> np.ndarray:
        """Boolean per byte: the byte is the flushed value or one written since."""
        def fit(a):
            out = np.zeros(len(state), np.uint8)
            n = min(len(a), len(state))
            out[:n] = a[:n]
            return out
        ok = state == fit(self.flushed)
        for v in self.versions:
            ok |= state == fit(v)
        return ok

    # --- ops: begin registers the result before the op runs, end its completion
    def begin(self, op: dict) -> None:
        k = op["k"]
        if k in ("write", "discard"):
            new = self.cur.copy()
            off, n = op["off"], op["len"]
            new[off:off + n] = np.frombuffer(op_data(op), np.uint8) if k == "write" else 0
            self.will_become(new)
        elif k in ("snapshot", "delete"):
            self.in_flight = op["name"]
            if k == "snapshot":
                self.snap_content[op["name"]] = self.cur.copy()
        elif k == "revert":
            self.will_become(self.snap_content[op["name"]].copy())
        elif k == "resize":
            size, new_size = len(self.cur), op["size"]
            grown = np.zeros(new_size, np.uint8)
            grown[:min(size, new_size)] = self.cur[:min(size, new_size)]
            if new_size < size:          # the cut-off data becomes zeros first
                cut = self.cur.copy()
                cut[new_size:] = 0
                self.will_become(cut)
            self.will_become(grown)
        elif k in ("backup", "cbackup"):
            self.backup_inflight = self.cur.copy()
            if k == "cbackup":
                self.consumer_dest = op["dest"]
        elif k == "reset":
            self.reset_inflight = True

    def end(self, op: dict, result) -> None:
        k = op["k"]
        if k == "discard" or (k == "write" and not op.get("flush")):
            return
        self.flushed_now()               # every other op flushes
        if k == "checkpoint":
            self.points.append((result, self.cur.copy()))
        elif k == "snapshot":
            self.committed.add(op["name"])
            self.points.append((result, self.snap_content[op["name"]]))
        elif k == "delete":
            self.committed.discard(op["name"])
        elif k == "backup":
            self.points.append((result, self.backup_inflight))
            self.chain = [op["dest"]] if op["since"] is None else self.chain + [op["dest"]]
            self.chain_id, self.chain_content = result, self.backup_inflight
            self.backup_inflight = None
        elif k == "cbackup":
            self.points.append((result, self.backup_inflight))
            self.consumer_id, self.consumer_dest, self.backup_inflight = result, None, None
        elif k == "reset":
            self.new_epoch()
        if k in ("backup", "cbackup"):
            self.leftovers_dropped += len(self.leftover)
            self.leftover.clear()        # a completed backup deleted them
        self.in_flight = None

    def new_epoch(self) -> None:
        """Tracking was reset: every id handed out is stale, the chain ends."""
        self.points = []
        self.chain, self.chain_id, self.chain_content = [], None, None
        self.consumer_id = None
        self.reset_inflight = False

    def check_consumer(self, recorded: str | None, epoch: str, where: str) -> None:
        """The consumer's id in a crash state (see the module docstring)."""
        if recorded == self.consumer_id:
            return
        if recorded is None:         # cleared by a reset that committed
            assert self.reset_inflight and epoch != (self.consumer_id or "").split("/")[0], \
                f"{where}: consumer {CONSUMER!r} lost its id {self.consumer_id}"
            return
        dest = self.consumer_dest
        assert dest is not None and os.path.exists(dest), \
            f"{where}: consumer {CONSUMER!r} names {recorded}, but no delta for it is in place (last: {self.consumer_id})"
        assert vdisk.verify(dest)["change_id"] == recorded, f"{where}: consumer id {recorded} is not its delta's"

    def recovered(self, state: np.ndarray, snapshots, epoch: str, consumer: str | None = None) -> None:
        """After a crash state was checked and opened read-write: its content is
        the durable content now; resolve what the interrupted op did (epoch:
        the image's tracking id)."""
        self.cur = state.copy()
        self.flushed_now()
        if any(cid.split("/")[0] != epoch for cid, _ in self.points) or (
                self.chain_id and self.chain_id.split("/")[0] != epoch):
            assert self.reset_inflight, "the tracking epoch changed with no reset_tracking running"
            self.new_epoch()
        self.reset_inflight = False
        if consumer is not None and consumer != self.consumer_id:   # the running consumer backup recorded its id
            self.points.append((consumer, self.backup_inflight))
        if consumer != self.consumer_id:
            self.consumer_id = consumer
        self.consumer_dest = None
        present = {info.name: info for info in snapshots}
        for name, info in present.items():
            if name not in self.committed and name not in self.leftover:   # an interrupted create that committed
                if name.startswith(BACKUP_PREFIX):      # (or backup): the next backup deletes it
                    self.snap_content[name] = self.backup_inflight
                    self.leftover.add(name)
                else:
                    self.committed.add(name)
                self.points.append((info.change_id, self.snap_content[name]))
        self.committed &= set(present)         # an interrupted delete that committed
        self.leftover &= set(present)
        self.in_flight = None
        self.backup_inflight = None


# ---------------------------------------------------------------------------- the checks
def verify_disk(d: vdisk.Disk, model: CrashModel, where: str) -> np.ndarray:
    """The crash contract on an open image; returns its content."""
    bs = d.block_size
    state = np.frombuffer(d.pread(d.size, 0), np.uint8)
    ok = model.allowed(state)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        flushed = model.flushed[bad] if bad < len(model.flushed) else "n/a"
        raise AssertionError(f"{where}: byte {bad} (block {bad // bs}) holds {state[bad]}, neither flushed "
                             f"({flushed}) nor written since")
    names = {i.name for i in d.snapshots}
    missing = model.committed - names - {model.in_flight}
    assert not missing, f"{where}: committed snapshots {missing} vanished"
    for name in names:
        if name in model.committed or name == model.in_flight or name in model.leftover:
            frozen = model.snap_content[name]
        elif name.startswith(BACKUP_PREFIX) and model.backup_inflight is not None:
            frozen = model.backup_inflight
        else:
            raise AssertionError(f"{where}: snapshot {name!r} exists, but it was deleted or never taken")
        with d.open_snapshot(name) as snap:
            got = np.frombuffer(snap.pread(snap.size, 0), np.uint8)
        if not np.array_equal(got, frozen):
            bad = int(np.flatnonzero(got != frozen)[0]) if len(got) == len(frozen) else -1
            raise AssertionError(f"{where}: snapshot {name!r} differs at byte {bad} (size {len(got)}, "
                                 f"taken at {len(frozen)})")
    nb = -(-len(state) // bs)
    for cid, then in model.points:
        if cid.split("/")[0] != d.tracking_id:
            assert model.reset_inflight, f"{where}: tracking epoch changed to {d.tracking_id}, id {cid} went stale"
            continue                     # reset_tracking committed: every earlier id is stale
        under = differing_mask(state, then, bs) & ~block_mask(d.changes_since(cid), bs, nb)
        if under.any():
            raise AssertionError(f"{where}: blocks {np.flatnonzero(under)[:8].tolist()} changed since {cid} "
                                 f"but are not reported")
    return state


def check_chain_restores(model: CrashModel, workdir: str, extra: str | None = None,
                         expect: np.ndarray | None = None) -> None:
    """The chain of deltas (plus `extra`) restores to the content at its last point (or `expect`)."""
    target = os.path.join(workdir, "restored.vdk")
    try:
        vdisk.restore(model.chain + ([extra] if extra else []), target)
        with vdisk.open(target) as t:
            got = np.frombuffer(t.pread(t.size, 0), np.uint8)
        want = model.chain_content if expect is None else expect
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0]) if len(got) == len(want) else -1
            raise AssertionError(f"the chain {[os.path.basename(p) for p in model.chain]} + {extra and os.path.basename(extra)} "
                                 f"restores to other content (byte {bad}, size {len(got)} vs {len(want)})")
    finally:
        for p in (target, sidecar_path(target)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def check_image(path: str, model: CrashModel, where: str, recovery: bool = True, restore: str | None = None):
    """Check the crash contract on the image file at path (see the module docstring).

    recovery: also open it read-write, close, and check again.  restore: a
    path for an incremental backup (since the chain's last id) of the
    recovered image, restored after the chain and compared; the delta is
    kept there.  Returns (content, snapshots, tracking id, leaked blocks,
    backup change id or None, the consumer's id).
    """
    res = vdisk.check(path)
    assert not res.corruptions, f"{where}: corruption {res.corruptions}"
    with vdisk.open(path) as d:
        state = verify_disk(d, model, f"{where} (read-only open)")
        infos = d.snapshots
        epoch = d.tracking_id
        consumer = d.consumers.get(CONSUMER)
        consumer = consumer and consumer.change_id
    model.check_consumer(consumer, epoch, where)
    if recovery:
        with vdisk.open(path, "r+"):
            pass
        with vdisk.open(path) as d:
            again = verify_disk(d, model, f"{where} (after recovery)")
            infos = d.snapshots
        assert np.array_equal(again, state), f"{where}: opening read-write changed the content"
        res2 = vdisk.check(path)
        assert not res2.corruptions, f"{where}: corruption after recovery {res2.corruptions}"
    cid = None
    if restore and model.chain and model.chain_id.split("/")[0] == epoch:
        cid = vdisk.backup(path, restore, since=model.chain_id, compression=None).change_id
        check_chain_restores(model, os.path.dirname(restore), extra=restore, expect=state)
    return state, infos, epoch, res.leaked_blocks, cid, consumer


class CopyWatch:
    """Copies of the image taken from crash states, diverged, and the rule
    that no id crosses between diverged files (docs/FORMAT.md, "Checkpoint log")."""

    def __init__(self, rng: random.Random, workdir: str, block_size: int, limit: int = 2, rate: float = 0.0):
        self.rng = rng
        self.workdir = workdir
        self.bs = block_size
        self.limit = limit
        self.rate = rate
        self.op_index = 0               # the op running (or last run) on the original
        self.issued: list[tuple[int, str, np.ndarray]] = []     # (op index, id, content then) of the original
        self.copies: list[dict] = []
        self.checks = 0                 # (copy, id) pairs checked at the end

    def issued_by(self, model: CrashModel, result) -> None:
        """After model.end: record the id the op handed out."""
        if isinstance(result, str) and model.points and model.points[-1][0] == result:
            self.issued.append((self.op_index, result, model.points[-1][1]))

    def maybe_take(self, state_path: str) -> None:
        if len(self.copies) < self.limit and self.rng.random() < self.rate:
            self.take(state_path)

    def take(self, state_path: str) -> None:
        """Keep a copy of this (checked) image file and let it diverge."""
        path = os.path.join(self.workdir, f"copy-{len(self.copies)}.vdk")
        with open(state_path, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        own = []
        with vdisk.open(path, "r+") as d:
            for _ in range(1 + self.rng.randrange(3)):
                off = self.rng.randrange(d.size)
                n = min(d.size - off, self.rng.randint(1, 2 * self.bs))
                d.pwrite(pattern(self.rng.randrange(2**31), n), off)
                if d.track_changes:
                    own.append((d.checkpoint(), np.frombuffer(d.pread(d.size, 0), np.uint8).copy()))
            d.pwrite(pattern(self.rng.randrange(2**31), 1), self.rng.randrange(d.size))
        self.copies.append({"path": path, "index": self.op_index, "own": own})

    def final_check(self, original: str) -> None:
        """The rule, for every copy and every id (see the class docstring)."""
        for c in self.copies:
            with vdisk.open(c["path"]) as d:
                now = np.frombuffer(d.pread(d.size, 0), np.uint8)
                nb = -(-len(now) // self.bs)
                after = None
                for index, cid, then in self.issued + [(c["index"], cid, then) for cid, then in c["own"]]:
                    self.checks += 1
                    try:
                        got = block_mask(d.changes_since(cid), self.bs, nb)
                    except vdisk.StaleChangeIdError:
                        continue
                    if index > c["index"] and all(cid != o for o, _ in c["own"]):
                        raise AssertionError(f"copy {c['path']} (taken at op {c['index']}) answers {cid}, "
                                             f"which the original handed out at op {index}, after the copy")
                    under = differing_mask(now, then, self.bs) & ~got
                    if under.any():
                        raise AssertionError(f"copy {c['path']}: blocks {np.flatnonzero(under)[:8].tolist()} "
                                             f"changed since {cid} but are not reported")
                for index, cid, _ in self.issued:
                    if index > c["index"]:
                        after = cid
            if after is not None:       # a backup of the copy since the original's later id: refused, no file
                dest = os.path.join(self.workdir, "cross.h5")
                try:
                    vdisk.backup(c["path"], dest, since=after)
                except vdisk.StaleChangeIdError:
                    assert not os.path.exists(dest), "a refused backup left a delta"
                else:
                    raise AssertionError(f"copy {c['path']} backed up since {after}, an id of the original "
                                         f"after the copy")
        with vdisk.open(original) as d:
            for c in self.copies:
                for cid, _ in c["own"]:
                    self.checks += 1
                    try:
                        d.changes_since(cid)
                    except vdisk.StaleChangeIdError:
                        continue
                    raise AssertionError(f"the original answers {cid}, an id of its copy {c['path']}")


class CrashChecker:
    """Samples crash states of a RecordingIO and checks each."""

    def __init__(self, model: CrashModel, rng: random.Random, per_point: int, workdir: str,
                 recovery_rate: float = 0.2, restore_rate: float = 0.0, copies: CopyWatch | None = None):
        self.copies = copies
        self.model = model
        self.rng = rng
        self.per_point = per_point
        self.workdir = workdir
        self.recovery_rate = recovery_rate
        self.restore_rate = restore_rate
        self.states = 0
        self.leaky = 0
        self.restores = 0

    def sample(self, rec: RecordingIO) -> None:
        n = len(rec.pending)
        choices = [[True] * n, [False] * n]
        while len(choices) < self.per_point:
            choices.append([self.rng.random() < 0.5 for _ in range(n)])
        for keep in choices[:max(1, self.per_point)]:
            torn = self.rng.random() < 0.25
            self.verify(rec.crash_image(self.rng, keep=keep, torn=torn))

    def verify(self, image: bytes) -> None:
        self.states += 1
        path = os.path.join(self.workdir, f"crash-{self.states}.vdk")
        with open(path, "wb") as f:
            f.write(image)
        restore = None
        if self.model.chain and self.rng.random() < self.restore_rate:
            restore = os.path.join(self.workdir, f"crash-{self.states}.h5")
            self.restores += 1
        try:
            _, _, _, leaked, _, _ = check_image(path, self.model, f"state {self.states}",
                                          recovery=self.rng.random() < self.recovery_rate, restore=restore)
            self.leaky += leaked > 0
            if self.copies is not None:
                self.copies.maybe_take(path)
        finally:
            for p in (path, restore):
                if p:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)


def run_campaign(seed: int, ops: int, per_point: int, block_size: int = 4096, size: int = 96 * 1024,
                 fold_interval: int = 7, snapshots: bool = False, backups: bool = False, compact: bool = False,
                 fill: bool = False, reset: bool = False, restore_rate: float = 0.0,
                 max_size: int | None = None, script=None, copies: int = 0,
                 copy_rate: float = 0.02) -> CrashChecker:
    """One random workload with crash states sampled at every fsync and after every op.

    After each backup, the chain exported so far must restore to the
    content at its point; restore_rate: the share of crash states on which
    an incremental backup of the recovered image must restore after it.
    fill: large writes and resizes up to max_size (default 4 x size), after
    writing the whole disk and taking a snapshot (later writes copy on
    write), so the block table and the refcount table are relocated (give a
    size whose refcount table is nearly full: 1730 blocks at 4 KiB).
    script: ops to run first (they count in `ops`).  copies: keep up to this
    many crash states (a share copy_rate of those that pass) as diverging
    copies, checked against the original at the end (CopyWatch).
    """
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.vdk")
        d = vdisk.create(path, size, block_size=block_size, io_factory=RecordingIO)
        d.fold_interval = fold_interval
        model = CrashModel(size, block_size)
        watch = CopyWatch(random.Random(seed ^ 0x5EED), tmp, block_size, limit=copies, rate=copy_rate) \
            if copies else None
        checker = CrashChecker(model, rng, per_point, tmp, restore_rate=restore_rate, copies=watch)
        checker.watch = watch
        if script is None and fill:
            script = [{"k": "write", "off": 0, "len": size, "seed": seed, "zero": False, "flush": False},
                      {"k": "snapshot", "name": "whole"}]
        work = Workload(rng, weights(snapshots, backups, compact, fill, reset), block_size, max_size or 4 * size,
                        delta_dir=tmp, script=script or ())
        rec = d._io
        rec.on_fsync = checker.sample
        try:
            for i in range(ops):
                op = work.next(d.size)
                if watch:
                    watch.op_index = i
                model.begin(op)
                result = apply_op(d, op)
                model.end(op, result)
                if watch:
                    watch.issued_by(model, result)
                work.done(op, result)
                if op["k"] == "backup":
                    check_chain_restores(model, tmp)
                checker.sample(rec)
        finally:
            rec.on_fsync = None
            d.close()
        if watch:
            watch.final_check(path)
        return checker
