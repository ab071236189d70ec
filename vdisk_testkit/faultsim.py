"""Injected I/O faults at every call site: the engine behind tests/test_faults.py
and tools/fault_campaign.py.

A dry run drives a seeded workload (vdisk_testkit/crashsim.py's ops, plus reopen,
reset_tracking, whole-block runs and a table relocation; the image is
created and finally closed through the same I/O layer) over
vdisk.testing.FaultyRecordingIO with an empty FaultPlan: it counts the
calls that change the file, by kind (pwrite, fsync, truncate, punch_hole).
Then, for each site (kind, n) and each errno, the same workload runs again
with the n-th call of that kind failing (an ENOSPC pwrite lands its first
half first, as a short write followed by the error does).  Each run must
satisfy:

* the operation that issued the call raises vdisk.VdiskIOError with the
  injected errno (not a bare OSError, nor any other exception);
* the Disk then follows the policy of vdisk/disk.py ("I/O errors"):
  either it keeps working, which is allowed only for a failed data write
  of pwrite or discard (the range then reads as its old or its new bytes,
  byte by byte, and the rest of the workload runs to a clean close), or
  it is poisoned: reads, writes and flush raise VdiskIOError, flush keeps
  raising (a failed fsync is never retried into a success), close()
  returns quietly, and no call reaches the file after the fault;
* a failed fsync always poisons;
* the image reopened with the plain FileIO satisfies the crash contract
  against the model (crashsim.check_image: opens, check() clean but for
  leaks, every byte flushed or written since, committed snapshots intact,
  changes_since never under-reports), both as the file stands and in
  power-loss states taken at the fault (the durable state plus any subset
  of the writes since the last successful fsync, some torn);
* a backup interrupted by the fault leaves no delta under its name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno as _errno
import itertools
import os
import random
import tempfile
import time
import traceback

import numpy as np

import vdisk
from vdisk.testing import FaultPlan, FaultyRecordingIO

from vdisk_testkit import crashsim
from vdisk_testkit.crashsim import CrashModel, Workload, apply_op, check_image

ERRNOS = (_errno.EIO, _errno.ENOSPC)
EXTRA_KINDS = ("reopen", "reset", "run", "grow_tables")
DATA_OPS = ("write", "discard")      # the ops whose failed data write may leave the Disk usable
# crashsim's ops, the rarer ones weighted up: the point is to reach every call site
WEIGHTS = {**crashsim.weights(snapshots=True, backups=True, compact=True),
           "snapshot": 8, "delete": 5, "revert": 6, "compact": 4, "backup": 4}


def workdir_root() -> str | None:
    """tmpfs when there is one: fsync costs nothing there, and the campaign syncs a lot."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One workload: a seed and the image's shape.

    grow_to: a size to grow the image to first (relocating the block table
    and counters), then fill with one write of whole blocks: past 2,048
    blocks of 4 KiB the refcount table of a small image outgrows its region
    and is relocated in the middle of that write.
    """
    seed: int
    ops: int = 24
    block_size: int = 4096
    size: int = 96 * 1024
    fold_interval: int = 4
    coarse: int = 16 * 1024          # small coarse regions: arming syncs, and past the budget, all at once
    arm_budget: int = 3
    extra_rate: float = 0.2          # share of ops drawn from EXTRA_KINDS
    grow_to: int = 0

    def describe(self) -> str:
        grow = f", grown to {self.grow_to}" if self.grow_to else ""
        return f"seed {self.seed}: {self.ops} ops, {self.size} bytes{grow}, block {self.block_size}"


@dataclasses.dataclass
class Outcome:
    """What one run (a dry run, or one injected fault) did."""
    site: tuple[str, int] | None
    err: int | None
    op: str | None = None            # the op during which the fault fired
    poisoned: bool | None = None
    states: int = 0                  # images checked against the crash contract
    violation: str | None = None


class Violation(AssertionError):
    pass


def _ops(sc: Scenario, d, work: Workload, xrng: random.Random, done: dict):
    """The next op (a crashsim op dict, or one of EXTRA_KINDS)."""
    bs = sc.block_size
    if sc.grow_to and not done.get("fill"):
        if not done.get("grow"):
            done["grow"] = True
            return {"k": "resize", "size": sc.grow_to}
        done["fill"] = True          # past the refcount table's capacity, in one write of whole blocks
        n = (d.size // bs) - 4
        return {"k": "write", "off": 2 * bs, "len": n * bs, "seed": xrng.randrange(2**31), "zero": False}
    if xrng.random() < sc.extra_rate:
        kind = xrng.choice(EXTRA_KINDS)
        if kind == "grow_tables":
            if done.get("grow_tables") or (d._hdr.table_capacity + 3) * bs > 8 << 20:
                kind = "run"            # once, and only where the grown image stays small to model
            else:
                done["grow_tables"] = True
                cap = d._hdr.table_capacity
                return {"k": "resize", "size": (cap + 3) * bs + 512}
        if kind == "run" and d.size >= bs:   # whole blocks: the append path, or remaps over mapped blocks
            nb = d.size // bs
            count = xrng.randint(1, min(6, max(1, nb)))
            first = xrng.randrange(max(1, nb - count + 1))
            return {"k": "write", "off": first * bs, "len": count * bs, "seed": xrng.randrange(2**31),
                    "zero": False}
        if kind in ("reopen", "reset"):
            return {"k": kind}
    return work.next(d.size)


class _Run:
    """One workload run under one FaultPlan."""

    def __init__(self, sc: Scenario, plan: FaultPlan, tmp: str, crash_states: int):
        self.sc = sc
        self.plan = plan
        self.tmp = tmp
        self.path = os.path.join(tmp, "f.vdk")
        self.factory = FaultyRecordingIO.factory(plan)
        self.crash_states = crash_states
        self.rng = random.Random(sc.seed * 7919 + 1)      # crash-state choices
        self.model = CrashModel(sc.size, sc.block_size)
        self.reset_from: str | None = None                 # tracking id before an in-flight reset
        self.states = 0
        self.d = None

    # --- the workload ---------------------------------------------------------------------
    def run(self) -> Outcome:
        sc, plan = self.sc, self.plan
        out = Outcome(site=(plan.kind, plan.nth) if plan.kind else None, err=plan.err if plan.kind else None)
        wrng = random.Random(sc.seed)
        xrng = random.Random(sc.seed + 10**6)
        work = Workload(wrng, WEIGHTS, sc.block_size, 4 * sc.size, delta_dir=self.tmp)
        done: dict = {}
        for step in itertools.count():
            op = ({"k": "create"} if step == 0 else {"k": "close"} if step >= sc.ops
                  else _ops(sc, self.d, work, xrng, done))
            self._label(op["k"])
            fired_before = plan.fired is not None
            try:
                result = self._apply(op)
            except vdisk.VdiskError as exc:
                if plan.fired is None or fired_before:
                    raise Violation(f"op {op['k']} failed without an injected fault: {exc!r}") from exc
                out.op = op["k"]
                self._after_fault(op, exc, out)
                if out.poisoned or op["k"] in ("create", "close"):
                    break
                continue
            except Exception as exc:
                if plan.fired is not None and not fired_before:
                    raise Violation(f"the fault in {op['k']} raised {type(exc).__name__}, not a VdiskError: "
                                    f"{exc}") from exc
                raise
            if plan.fired is not None and not fired_before:
                raise Violation(f"op {op['k']} returned although its {plan.fired[0]} failed")
            self._end(op, result, work)
            if op["k"] == "close":
                break
        if plan.fired is None and plan.kind is not None:
            raise Violation(f"site {plan.kind} #{plan.nth} was never reached (the dry run counted it)")
        self._final(out)
        out.states = self.states
        return out

    def _label(self, kind: str) -> None:
        self.current = kind
        self.plan.label = kind

    def _apply(self, op: dict):
        k = op["k"]
        sc = self.sc
        if k == "create":
            self.d = vdisk.create(self.path, sc.size, block_size=sc.block_size, coarse_region_size=sc.coarse,
                                  io_factory=self.factory)
            self._tune()
            return None
        if k == "close":
            self.d.close()
            return None
        if k == "reopen":
            self.d.close()
            self.d = vdisk.open(self.path, "r+", io_factory=self.factory)
            self._tune()
            return None
        if k == "reset":
            self.reset_from = self.d.tracking_id
            self.model.reset_inflight = True     # the consumer's id may be cleared
            self.d.reset_tracking()
            return None
        self.model.begin(op)
        return apply_op(self.d, op)

    def _tune(self) -> None:
        self.d.fold_interval = self.sc.fold_interval
        self.d._tracker.arm_budget = self.sc.arm_budget

    def _end(self, op: dict, result, work: Workload) -> None:
        k = op["k"]
        m = self.model
        if k in ("create",):
            return
        if k in ("close", "reopen"):
            m.flushed_now()
            return
        if k == "reset":
            m.flushed_now()
            m.points = []                # every id handed out is stale now
            m.chain, m.chain_id, m.chain_content = [], None, None
            m.consumer_id, m.reset_inflight = None, False
            work.chain_id = None
            self.reset_from = None
            return
        m.end(op, result)
        work.done(op, result)
        if k in ("backup", "cbackup"):
            assert os.path.exists(op["dest"]), f"backup returned but {op['dest']} does not exist"

    # --- after the fault ---------------------------------------------------------------------
    def _after_fault(self, op: dict, exc: vdisk.VdiskError, out: Outcome) -> None:
        kind, n, err = self.plan.fired
        where = f"{kind} #{n} ({_errno.errorcode[err]}) in {op['k']}"
        if not isinstance(exc, vdisk.VdiskIOError) or exc.errno != err:
            raise Violation(f"{where}: raised {type(exc).__name__}(errno={getattr(exc, 'errno', None)}): {exc}; "
                            f"expected VdiskIOError with errno {err}")
        if op["k"] == "backup" and os.path.exists(op["dest"]):
            raise Violation(f"{where}: the failed backup left {op['dest']}")
        if op["k"] == "create":
            left = [p for p in os.listdir(self.tmp) if p.endswith(".creating") or p == "f.vdk"]
            if left:
                raise Violation(f"{where}: the failed create left {left}")
            out.poisoned = True
            return
        d = self.d
        rec = d._io
        self._sample(rec, f"{where}: power loss at the fault")
        try:
            content = np.frombuffer(d.pread(d.size, 0), np.uint8)
        except vdisk.VdiskIOError:
            content = None
        out.poisoned = content is None
        if out.poisoned:
            self._check_poisoned(d, err, where)
            if self.plan.landed_after:
                raise Violation(f"{where}: {self.plan.landed_after} calls reached the file after the failed "
                                f"call, though the Disk stopped")
            return
        # the Disk kept working: allowed only for a failed data write, which then holds old or new bytes
        if kind == "fsync":
            raise Violation(f"{where}: the Disk kept working after a failed fsync")
        if op["k"] not in DATA_OPS:
            raise Violation(f"{where}: the Disk kept working after a failure inside {op['k']} "
                            f"(only a data write of pwrite/discard may leave it usable)")
        versions = self.model.versions          # begin() registered the write's result last
        target = versions[-1]
        before = versions[-2] if len(versions) > 1 else self.model.flushed
        if len(content) != len(target) or len(before) != len(target):
            raise Violation(f"{where}: after the failed write the disk has {len(content)} bytes, not {len(target)}")
        ok = (content == before) | (content == target)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise Violation(f"{where}: after the failed write, byte {bad} reads {content[bad]}, neither its old "
                            f"({before[bad]}) nor its new value ({target[bad]})")
        self.model.will_become(content.copy())
        # an fsync can fail later only if the file is poisoned: it must not be
        if rec.poisoned is not None:
            raise Violation(f"{where}: the I/O layer is poisoned but the Disk still reads")

    def _check_poisoned(self, d, err: int, where: str) -> None:
        for what, call in (("pread", lambda: d.pread(1, 0)), ("pwrite", lambda: d.pwrite(b"x", 0)),
                           ("flush", d.flush), ("flush again", d.flush),
                           ("checkpoint", d.checkpoint), ("changes_since", lambda: d.changes_since("*"))):
            try:
                call()
            except vdisk.VdiskIOError as e:
                if e.errno != err or "reopen" not in str(e):
                    raise Violation(f"{where}: {what} on the poisoned Disk raised {e!r}: expected errno {err} "
                                    f"and a message saying to reopen the image")
            except Exception as e:
                raise Violation(f"{where}: {what} on the poisoned Disk raised {type(e).__name__}: {e}") from e
            else:
                raise Violation(f"{where}: {what} on the poisoned Disk returned (a later flush must never "
                                f"succeed)")
        try:
            d.close()
        except Exception as e:
            raise Violation(f"{where}: close() of the poisoned Disk raised {type(e).__name__}: {e}") from e
        try:
            d.flush()
        except vdisk.VdiskIOError:
            pass
        else:
            raise Violation(f"{where}: flush() after closing the poisoned Disk returned")

    # --- the crash contract ---------------------------------------------------------------------
    def _sample(self, rec, where: str) -> None:
        """Power-loss states of the file now: all pending writes, none, and random subsets (some torn)."""
        if self.crash_states <= 0:
            return
        n = len(rec.pending)
        choices = [[True] * n, [False] * n]
        while len(choices) < self.crash_states:
            choices.append([self.rng.random() < 0.5 for _ in range(n)])
        for i, keep in enumerate(choices[:self.crash_states]):
            image = rec.crash_image(self.rng, keep=keep, torn=i >= 2 and self.rng.random() < 0.5)
            p = os.path.join(self.tmp, f"crash-{self.states}.vdk")
            with open(p, "wb") as f:
                f.write(image)
            try:
                self._check(p, f"{where}, state {i}", recovery=i == 0)
            finally:
                os.unlink(p)

    def _check(self, path: str, where: str, recovery: bool = True):
        self.states += 1
        model = self.model
        saved = model.points
        if self.reset_from is not None:          # an interrupted reset_tracking: committed or not
            with vdisk.open(path) as d:
                if d.tracking_id != self.reset_from:
                    model.points = []
        try:
            return check_image(path, model, where, recovery=recovery)
        except AssertionError as exc:
            raise Violation(str(exc)) from exc
        except Exception as exc:
            raise Violation(f"{where}: {type(exc).__name__}: {exc}") from exc
        finally:
            model.points = saved

    def _final(self, out: Outcome) -> None:
        if out.op == "create":
            return
        where = (f"{self.plan.fired[0]} #{self.plan.fired[1]} in {out.op}: the file after the run"
                 if self.plan.fired else "dry run: the file after the run")
        state, *_ = self._check(self.path, where)
        if not out.poisoned:             # closed cleanly: exactly the model's content
            if not np.array_equal(state, self.model.flushed):
                raise Violation(f"{where}: after a clean close the image differs from the model")


def run_site(sc: Scenario, site: tuple[str, int] | None, err: int = _errno.EIO, crash_states: int = 3,
             trace: list | None = None) -> tuple[Outcome, FaultPlan]:
    """Run sc's workload with the site (kind, n) failing with err (None: the dry run)."""
    kind, nth = site if site else (None, 0)
    plan = FaultPlan(kind, nth, err, partial=err == _errno.ENOSPC)
    if trace is not None:
        plan.trace = trace
    with tempfile.TemporaryDirectory(prefix="vdisk-faults-", dir=workdir_root()) as tmp:
        run = _Run(sc, plan, tmp, crash_states)
        try:
            out = run.run()
        except Violation as exc:
            out = Outcome(site=site, err=err if site else None, op=getattr(run, "current", None),
                          violation=f"{sc.describe()}, site {site} {_errno.errorcode.get(err) if site else ''}: "
                                    f"{exc}\n{traceback.format_exc(limit=-6)}")
        except Exception as exc:        # anything else is a violation too (an image that does not open is one)
            out = Outcome(site=site, err=err if site else None, op=getattr(run, "current", None),
                          violation=f"{sc.describe()}, site {site}: {type(exc).__name__}: {exc}\n"
                                    f"{traceback.format_exc(limit=-8)}")
        finally:
            if run.d is not None and not run.d.closed:
                with contextlib.suppress(Exception):
                    run.d.close()
    return out, plan


def sites_of(sc: Scenario) -> tuple[list[tuple[str, int]], dict, Outcome]:
    """The dry run: every call site of the workload, the op each belongs to, and the dry run's outcome."""
    trace: list = []
    out, plan = run_site(sc, None, trace=trace, crash_states=1)
    ops = {(k, n): label for k, n, label in trace}
    return plan.sites(), ops, out


def campaign(scenarios, errnos=ERRNOS, crash_states: int = 3, progress=None, only_ops=None) -> dict:
    """Every site of every scenario, with every errno.  Returns a summary dict
    (violations listed); progress(summary) is called after each scenario.
    only_ops: fail only the sites of these ops (their labels in the dry run)."""
    t0 = time.monotonic()
    summary = {"scenarios": 0, "sites": 0, "faults": 0, "poisoned": 0, "kept_working": 0, "states": 0,
               "by_kind": {}, "by_op": {}, "violations": []}
    for sc in scenarios:
        sites, ops, dry = sites_of(sc)
        summary["scenarios"] += 1
        if dry.violation:
            summary["violations"].append(f"dry run: {dry.violation}")
            continue
        summary["states"] += dry.states
        for site in sites:
            if only_ops is not None and ops.get(site) not in only_ops:
                continue
            summary["sites"] += 1
            for err in errnos:
                out, plan = run_site(sc, site, err, crash_states)
                summary["faults"] += 1
                summary["states"] += out.states
                key = f"{site[0]}"
                summary["by_kind"][key] = summary["by_kind"].get(key, 0) + 1
                op = ops.get(site, "?")
                summary["by_op"][op] = summary["by_op"].get(op, 0) + 1
                if out.violation:
                    summary["violations"].append(out.violation)
                elif out.poisoned:
                    summary["poisoned"] += 1
                else:
                    summary["kept_working"] += 1
                if out.op is not None and op != out.op and not out.violation:
                    summary["violations"].append(f"{sc.describe()}: site {site} belongs to {op} in the dry run "
                                                 f"but fired in {out.op}: the workload is not deterministic")
        if progress:
            progress(summary)
    summary["seconds"] = time.monotonic() - t0
    return summary
