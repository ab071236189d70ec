"""Injected faults below Python: EIO and ENOSPC at every write-side system call
of the ``vdisk`` commands that do not go through a Disk's FileIO alone:
restore (fresh and advancing, vdisk and raw targets), convert (raw and
qcow2 into vdisk, vdisk out to raw and qcow2), ``check --repair``, backup
(full and incremental: the HDF5 delta file) and merge.  The engine behind
tests/test_op_faults.py (CI) and tools/fault_campaign_ops.py (the long run).

The injector is vdisk_testkit/faultshim.c, an LD_PRELOAD library built
here with gcc (once per source version, cached in the temp directory).  It
counts the write, writev, pwrite(v), fsync, fdatasync, ftruncate, fallocate
(and posix_fallocate, copy_file_range, sendfile) calls a process makes on
descriptors whose path lies under the run's directory (directory fsyncs
included), and fails the k-th.  Python's os calls, h5py's bundled libhdf5
(its sec2 driver) and ctypes' fallocate all call into libc through the
dynamic linker, so they all reach it.

For each operation a fault-free dry run counts the calls (N sites, each
logged with its kind and file) and must succeed with a correct result.
Then, for k = 1..N and each fault mode (EIO; ENOSPC; ENOSPC after a short
write, every later write failing too, as a file system that fills up),
the command runs again in a fresh copy of the inputs with call k failing.
Every run must satisfy:

* the child exits with status 1 and writes exactly one line on stderr,
  ``vdisk: error: ...`` naming the error (the errno's text), within the
  timeout: no traceback, no signal, no hang; a run whose failed call was
  an fsync never exits 0;
* its inputs are untouched: every input file byte-identical (the backup
  source, which a backup opens read-write for its temporary snapshot:
  same content, no corruption, no snapshot but the ones it had and at
  most one ``vdisk-backup-*``);
* the destination does not exist and no temporary file is left in the
  directory, or (a fault that let the command succeed) it is complete
  and correct: same content as expected, ``vdisk check`` clean, deltas
  verify and restore, qcow2 output clean under ``qemu-img check``;
* an advancing restore leaves its target and sidecar as they were or
  fully advanced; whatever state it leaves, a later fault-free advance
  either refuses (VdiskError) or builds exactly the expected image;
* ``check --repair``: the image still checks (``vdisk.check`` returns),
  and a second, fault-free ``check --repair`` leaves it clean with the
  content a fault-free repair gives.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno as _errno
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

import vdisk
from vdisk import layout as L

from vdisk_testkit.helpers import pattern

SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultshim.c")
BS = 4096
KiB = 1024
MODES = ("eio", "enospc", "short")          # short: ENOSPC after a short write, later writes failing too
MODE_ERRNO = {"eio": _errno.EIO, "enospc": _errno.ENOSPC, "short": _errno.ENOSPC}
WRITE_KINDS = {"write", "pwrite", "pwritev", "writev", "copy_file_range", "sendfile"}
SYNC_KINDS = {"fsync", "fdatasync"}
TEMP_SUFFIXES = (".partial", ".converting", ".restoring", ".tmp")
TIMEOUT = 60


# ============================================================================ the shim
def build_shim(cache_root: str | None = None) -> str:
    """Compile faultshim.c into a shared library (cached by the source's hash); its path."""
    with open(SHIM_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    directory = os.path.join(cache_root or tempfile.gettempdir(), f"vdisk-faultshim-{digest}")
    lib = os.path.join(directory, "faultshim.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(directory, exist_ok=True)
    tmp = f"{lib}.{os.getpid()}.tmp"
    subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", tmp, SHIM_SOURCE, "-ldl"],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, lib)
    return lib


def shim_env(shim: str, directory: str, fail_at: int = 0, mode: str = "eio", report: str | None = None,
             log: str | None = None) -> dict:
    env = dict(os.environ)
    env["LD_PRELOAD"] = shim
    env["FAULTSHIM_DIR"] = os.path.realpath(directory)
    env["FAULTSHIM_FAIL_AT"] = str(fail_at)
    env["FAULTSHIM_ERRNO"] = str(MODE_ERRNO[mode])
    env["FAULTSHIM_MODE"] = "short" if mode == "short" else "once"
    for key, value in (("FAULTSHIM_REPORT", report), ("FAULTSHIM_LOG", log)):
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    return env


def run_cli(shim: str, directory: str, argv: list[str], fail_at: int = 0, mode: str = "eio",
            report: str | None = None, log: str | None = None) -> subprocess.CompletedProcess:
    """``python -m vdisk.cli ARGV`` in directory, under the shim."""
    env = shim_env(shim, directory, fail_at, mode, report, log)
    return subprocess.run([sys.executable, "-m", "vdisk.cli", *argv], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


# ============================================================================ inputs
def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def vdisk_content(path: str) -> bytes:
    with vdisk.open(path) as d:
        return d.pread(d.size, 0)


def raw_content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclasses.dataclass
class Inputs:
    """The files every run copies, and what the fault-free operations produce."""
    dir: str
    chain_content: bytes          # the source at inc.h5's point: restore and merge give this
    base_content: bytes           # the source at full.h5's point
    src_content: bytes            # the source now (src.vdk; raw.img holds the same bytes)
    inc_change_id: str            # the point of inc.h5 (the since of a next incremental)
    full_change_id: str           # the point of full.h5
    src_snapshots: tuple          # the names of src.vdk's snapshots
    repaired_content: bytes       # damaged.vdk after one fault-free check --repair


def _damage(path: str) -> None:
    """A duplicate pointer, a pointer past the end of the file, a leaked block and a
    change counter from the future: check --repair has something of each kind to fix."""
    with vdisk.open(path) as d:
        h = d._hdr
        table = d._table.copy()
        refs = d._refcounts.copy()
        file_size = os.path.getsize(path)
    mapped = np.flatnonzero(table[:L.blocks_for(h.virtual_size, h.block_shift)])
    assert len(mapped) >= 4
    free = [p for p in range(file_size // BS) if refs[p] == 0 and p * BS >= L.HEADER_AREA]
    with open(path, "r+b") as f:
        def put(offset, fmt, value):
            f.seek(offset)
            f.write(struct.pack(fmt, value))
        put(h.table_offset + 4 * int(mapped[1]), "<I", int(table[mapped[0]]))     # duplicate
        put(h.table_offset + 4 * int(mapped[2]), "<I", file_size // BS + 7)      # past the end
        if free:
            put(h.refcount_offset + 2 * free[0], "<H", 1)                        # a leak
        put(h.counter_offset + 4 * int(mapped[3]), "<I", h.generation + 5)      # from the future


def prepare(directory: str, scale: int = 1) -> Inputs:
    """Make the inputs: src.vdk with a snapshot and a backup chain full.h5 (uncompressed)
    and inc.h5 (gzip), raw.img and src.qcow2 with src.vdk's content, damaged.vdk.
    scale multiplies src.vdk's size and every extent written to it (4 KiB blocks:
    scale 1 is 256 KiB; from about 64 on, data moves in more than one 8 MiB batch)."""
    p = lambda name: os.path.join(directory, name)   # noqa: E731
    k = scale
    with vdisk.create(p("src.vdk"), 256 * KiB * k, block_size=BS) as d:
        d.pwrite(pattern(1, 8 * BS * k), 0)
        d.pwrite(pattern(2, 3 * BS * k), 20 * BS * k)
        d.pwrite(pattern(3, BS * k - 100), 63 * BS * k)
        d.snapshot("keep")
        d.pwrite(pattern(4, 2 * BS * k + 7), 30 * BS * k + 5)
        base = d.pread(d.size, 0)
    full = vdisk.backup(p("src.vdk"), p("full.h5"), compression=None)
    with vdisk.open(p("src.vdk"), "r+") as d:
        d.pwrite(pattern(5, 2 * BS * k), 4 * BS * k)
        d.discard(20 * BS * k, BS * k)
        d.resize(320 * KiB * k)
        d.pwrite(pattern(6, 3 * BS * k), 70 * BS * k)
        chain = d.pread(d.size, 0)
    inc = vdisk.backup(p("src.vdk"), p("inc.h5"), since=full.change_id, compression="gzip")
    with vdisk.open(p("src.vdk"), "r+") as d:
        d.pwrite(pattern(7, BS * k), 10 * BS * k)
        d.discard(0, 2 * BS * k)
        d.pwrite(pattern(8, 5 * BS * k), 50 * BS * k)
        d.flush()
        now = d.pread(d.size, 0)
        snaps = tuple(s.name for s in d.snapshots)
    with open(p("raw.img"), "wb") as f:
        f.write(now)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", p("raw.img"), p("src.qcow2")],
                   check=True, capture_output=True)
    with vdisk.create(p("damaged.vdk"), 256 * KiB, block_size=BS) as d:
        for i, b in enumerate((0, 3, 9, 17, 40, 41, 63)):
            d.pwrite(pattern(20 + i, BS), b * BS)
        d.snapshot("s1")
        d.pwrite(pattern(30, BS), 3 * BS)
        d.pwrite(pattern(31, BS), 50 * BS)
    _damage(p("damaged.vdk"))
    assert vdisk.check(p("damaged.vdk")).corruptions
    scratch = p("repaired.vdk")
    shutil.copyfile(p("damaged.vdk"), scratch)
    assert vdisk.check(scratch, repair=True).ok
    repaired = vdisk_content(scratch)
    os.unlink(scratch)
    return Inputs(directory, chain, base, now, inc.change_id, full.change_id, snaps, repaired)


# ============================================================================ operations
class Run:
    """One run's directory and what it finds there."""

    def __init__(self, directory: str, inputs: Inputs):
        self.dir, self.inputs = directory, inputs
        self.succeeded = False

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def copy(self, *names: str) -> None:
        for n in names:
            shutil.copyfile(os.path.join(self.inputs.dir, n), self.path(n))

    def strays(self, allowed: set[str]) -> list[str]:
        return sorted(n for n in os.listdir(self.dir) if n not in allowed)


@dataclasses.dataclass
class Op:
    """An operation: its inputs, its command line and how to judge what it left."""
    name: str
    inputs: tuple                 # files copied into the run's directory
    argv: list                    # the vdisk command's arguments (relative to the run's directory)
    outputs: tuple = ()           # files it may create
    setup: object = None          # setup(run): more preparation in the run's directory
    judge: object = None          # judge(run, ok: bool) -> list of violations
    mutates: tuple = ()           # inputs it may change on purpose (judged by judge)
    kept_if: object = None        # after a failure, outputs may stay (judged as a success) if stdout says
                                  # this (a str), or if kept_if(run) is true (a callable)


def _identical(run: Run, names) -> list[str]:
    return [f"input {n} changed" for n in names if sha(run.path(n)) != sha(os.path.join(run.inputs.dir, n))]


def _no_output(run: Run, op: Op) -> list[str]:
    out = []
    for n in op.outputs:
        if os.path.lexists(run.path(n)):
            out.append(f"{n} exists after a failure")
    return out


def _vdisk_ok(path: str, expected: bytes, what: str) -> list[str]:
    out = []
    try:
        r = vdisk.check(path)
        if not r.ok:
            out.append(f"{what}: check not clean: {r.corruptions} leaks {r.leaked_blocks}")
        if vdisk_content(path) != expected:
            out.append(f"{what}: content differs from the expected image")
    except vdisk.VdiskError as exc:
        out.append(f"{what}: {type(exc).__name__}: {exc}")
    return out


def _restore_chain(run: Run, deltas: list[str], expected: bytes, what: str) -> list[str]:
    target = run.path(".judge-restore.vdk")
    try:
        vdisk.verify(deltas[-1])
        vdisk.restore(deltas, target)
        if vdisk_content(target) != expected:
            return [f"{what}: restores to other content"]
        return []
    except vdisk.VdiskError as exc:
        return [f"{what}: {type(exc).__name__}: {exc}"]
    finally:
        for n in (target, target + ".vdisk-chain"):
            if os.path.lexists(n):
                os.unlink(n)


# --- restore ------------------------------------------------------------------
def _judge_restore_fresh(fmt: str):
    def judge(run: Run, ok: bool) -> list[str]:
        target = run.path("t." + fmt)
        side = target + ".vdisk-chain"
        if not ok:
            return []
        if fmt == "vdisk":
            out = _vdisk_ok(target, run.inputs.chain_content, target)
        else:
            out = [] if raw_content(target) == run.inputs.chain_content else [f"{target}: content differs"]
        if not os.path.exists(side):
            out.append("the sidecar is missing after a success")
        return out
    return judge


def _advance_setup(fmt: str):
    def setup(run: Run) -> None:
        vdisk.restore([run.path("full.h5")], run.path("t." + fmt), format=fmt)
        with open(run.path("t." + fmt + ".vdisk-chain"), "rb") as f:
            run.before_sidecar = f.read()
    return setup


def _read_target(path: str, fmt: str) -> bytes:
    return vdisk_content(path) if fmt == "vdisk" else raw_content(path)


def _judge_advance(fmt: str):
    def judge(run: Run, ok: bool) -> list[str]:
        target = run.path("t." + fmt)
        side_path = target + ".vdisk-chain"
        inp = run.inputs
        out = []
        side = None
        if os.path.exists(side_path):
            with open(side_path, "rb") as f:
                raw = f.read()
            side = json.loads(raw)
        if ok:
            if side is None or side.get("state") != "complete" or side.get("change_id") != inp.inc_change_id:
                out.append(f"success, but the sidecar is {side and side.get('state')} at "
                           f"{side and side.get('change_id')}")
            content = _read_target(target, fmt)
            if content != inp.chain_content:
                out.append("success, but the target holds other content")
            if fmt == "vdisk":
                out += _vdisk_ok(target, inp.chain_content, target)
            return out
        # a failure: as it was, or fully advanced, or refused from now on
        if side is not None and side.get("state") == "complete":
            content = _read_target(target, fmt)
            if side.get("change_id") == inp.inc_change_id and content != inp.chain_content:
                out.append("the sidecar says advanced, the content is not")
            if side.get("change_id") != inp.inc_change_id and content != inp.base_content:
                out.append("the sidecar says not advanced, the content changed")
        if fmt == "vdisk":
            try:
                vdisk.check(target)
            except vdisk.VdiskError as exc:
                out.append(f"the target does not check: {type(exc).__name__}: {exc}")
        # a later fault-free advance refuses or builds the right image
        try:
            vdisk.restore([run.path("inc.h5")], target, format=fmt)
        except vdisk.VdiskError:
            return out
        except Exception as exc:    # noqa: BLE001 - reported, not raised
            return out + [f"a later advance raised {type(exc).__name__}: {exc}"]
        if _read_target(target, fmt) != inp.chain_content:
            out.append("a later fault-free advance built a wrong image")
        return out
    return judge


def _judge_overwrite(fmt: str):
    """restore --overwrite onto a target restored from full.h5: old or new, never a mix."""
    def judge(run: Run, ok: bool) -> list[str]:
        inp = run.inputs
        target = run.path("t." + fmt)
        side_path = target + ".vdisk-chain"
        if not os.path.exists(target):
            return ["the target is gone"]
        content = _read_target(target, fmt)
        points = {inp.base_content: inp.full_change_id, inp.chain_content: inp.inc_change_id}
        out = []
        if ok and content != inp.chain_content:
            out.append("success, but the target holds other content")
        if content not in points:
            return out + ["the target holds neither the old nor the new image"]
        if fmt == "vdisk":
            out += _vdisk_ok(target, content, target)
        if os.path.exists(side_path):
            with open(side_path, encoding="utf-8") as f:
                side = json.load(f)
            if side.get("state") == "complete" and side.get("change_id") != points[content]:
                out.append(f"the sidecar says {side.get('change_id')}, the target holds {points[content]}")
        elif ok:
            out.append("the sidecar is missing after a success")
        return out
    return judge


def _convert_overwrite_setup(run: Run) -> None:
    vdisk.create(run.path("out.vdk"), 64 * KiB, block_size=BS).close()


def _judge_convert_overwrite(run: Run, ok: bool) -> list[str]:
    path = run.path("out.vdk")
    if not os.path.exists(path):
        return ["out.vdk is gone"]
    try:
        content = vdisk_content(path)
    except vdisk.VdiskError as exc:
        return [f"out.vdk does not open: {type(exc).__name__}: {exc}"]
    if content == run.inputs.src_content:
        return _vdisk_ok(path, content, "out.vdk (new)")
    if ok:
        return ["success, but out.vdk holds other content"]
    if content != bytes(64 * KiB):
        return ["out.vdk holds neither the old nor the new image"]
    return _vdisk_ok(path, content, "out.vdk (old)")


# --- convert ------------------------------------------------------------------
def _judge_convert(dst: str, fmt: str, expected_attr: str):
    def judge(run: Run, ok: bool) -> list[str]:
        if not ok:
            return []
        expected = getattr(run.inputs, expected_attr)
        path = run.path(dst)
        if fmt == "vdisk":
            return _vdisk_ok(path, expected, dst)
        if fmt == "raw":
            return [] if raw_content(path) == expected else [f"{dst}: content differs"]
        out = []
        r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
        if r.returncode != 0:
            out.append(f"qemu-img check {dst}: exit {r.returncode}: {r.stdout.strip()} {r.stderr.strip()}")
        r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, run.path("raw.img")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            out.append(f"qemu-img compare {dst} raw.img: exit {r.returncode}: {r.stdout.strip()}")
        return out
    return judge


# --- check --repair -----------------------------------------------------------
def _judge_repair(run: Run, ok: bool) -> list[str]:
    path = run.path("damaged.vdk")
    out = []
    if not ok:
        try:
            vdisk.check(path)
        except vdisk.VdiskError as exc:
            out.append(f"after the failed repair check raises {type(exc).__name__}: {exc}")
        try:
            r = vdisk.check(path, repair=True)
        except vdisk.VdiskError as exc:
            return out + [f"a second repair failed: {type(exc).__name__}: {exc}"]
        if not r.ok:
            out.append(f"a second repair left {r.corruptions} leaks {r.leaked_blocks}")
    return out + _vdisk_ok(path, run.inputs.repaired_content, "the repaired image")


# --- backup and merge ---------------------------------------------------------
def _judge_backup(dest: str, chain: tuple):
    def judge(run: Run, ok: bool) -> list[str]:
        inp = run.inputs
        src = run.path("src.vdk")
        out = []
        try:
            r = vdisk.check(src)
            if r.corruptions:
                out.append(f"the source is corrupt: {r.corruptions}")
            with vdisk.open(src) as d:
                if d.pread(d.size, 0) != inp.src_content:
                    out.append("the source's content changed")
                names = [s.name for s in d.snapshots]
            extra = [n for n in names if n not in inp.src_snapshots]
            if [n for n in names if n in inp.src_snapshots] != list(inp.src_snapshots) or len(extra) > 1 or \
                    any(not n.startswith("vdisk-backup-") for n in extra):
                out.append(f"the source's snapshots are {names}")
        except vdisk.VdiskError as exc:
            out.append(f"the source does not open: {type(exc).__name__}: {exc}")
        if ok:
            out += _restore_chain(run, [run.path(n) for n in chain] + [run.path(dest)], inp.src_content, dest)
        return out
    return judge


def _consumer_setup(run: Run) -> None:
    """The consumer "c" of src.vdk, its last backup inc.h5."""
    with vdisk.open(run.path("src.vdk"), "r+") as d:
        d.consumers.register("c", run.inputs.inc_change_id)


def _delta_placed(run: Run) -> bool:
    """The delta was in place before a later step failed (recording the id,
    whose failed commit may or may not have landed, or the source's close):
    it stays, and the judge checks the consumer names its id or the older one."""
    return os.path.exists(run.path("new.h5"))


def _judge_consumer_backup(run: Run, ok: bool) -> list[str]:
    """On top of the backup's checks: the consumer names its new id only once
    the delta is in place (and surely after a success), else its old one."""
    out = _judge_backup("new.h5", ("full.h5", "inc.h5"))(run, ok)
    try:
        with vdisk.open(run.path("src.vdk")) as d:
            got = d.consumers["c"].change_id
    except vdisk.VdiskError as exc:
        return out + [f"the consumer cannot be read: {type(exc).__name__}: {exc}"]
    placed = os.path.exists(run.path("new.h5"))
    new = vdisk.verify(run.path("new.h5"))["change_id"] if placed else None
    if run.succeeded and got != new:
        out.append(f"success, but the consumer names {got}, not the delta's {new}")
    elif got not in (run.inputs.inc_change_id, new):
        out.append(f"the consumer names {got}: neither its old id nor a placed delta's ({new})")
    return out


def _judge_merge(run: Run, ok: bool) -> list[str]:
    if not ok:
        return []
    return _restore_chain(run, [run.path("merged.h5")], run.inputs.chain_content, "merged.h5")


def _judge_create(run: Run, ok: bool) -> list[str]:
    return _vdisk_ok(run.path("new.vdk"), bytes(1 << 20), "new.vdk") if ok else []


def operations(inputs: Inputs) -> list[Op]:
    chain = ("full.h5", "inc.h5")
    ops = []
    for fmt in ("vdisk", "raw"):
        t = "t." + fmt
        ops.append(Op(f"restore-{fmt}", chain, ["restore", "-O", fmt, t, *chain], (t, t + ".vdisk-chain"),
                      judge=_judge_restore_fresh(fmt)))
    for fmt in ("vdisk", "raw"):
        t = "t." + fmt
        ops.append(Op(f"restore-advance-{fmt}", chain, ["restore", "-O", fmt, t, "inc.h5"], (),
                      setup=_advance_setup(fmt), judge=_judge_advance(fmt), mutates=(t, t + ".vdisk-chain")))
    for fmt in ("vdisk", "raw"):
        t = "t." + fmt
        ops.append(Op(f"restore-overwrite-{fmt}", chain, ["restore", "--overwrite", "-O", fmt, t, *chain], (),
                      setup=_advance_setup(fmt), judge=_judge_overwrite(fmt), mutates=(t, t + ".vdisk-chain")))
    ops += [
        Op("convert-overwrite", ("raw.img",), ["convert", "--overwrite", "-f", "raw", "raw.img", "out.vdk"], (),
           setup=_convert_overwrite_setup, judge=_judge_convert_overwrite, mutates=("out.vdk",)),
        Op("convert-raw-vdisk", ("raw.img",), ["convert", "-f", "raw", "raw.img", "out.vdk"], ("out.vdk",),
           judge=_judge_convert("out.vdk", "vdisk", "src_content")),
        Op("convert-qcow2-vdisk", ("src.qcow2",), ["convert", "src.qcow2", "out.vdk"], ("out.vdk",),
           judge=_judge_convert("out.vdk", "vdisk", "src_content")),
        Op("convert-vdisk-raw", ("src.vdk",), ["convert", "-O", "raw", "src.vdk", "out.raw"], ("out.raw",),
           judge=_judge_convert("out.raw", "raw", "src_content")),
        Op("convert-vdisk-qcow2", ("src.vdk", "raw.img"), ["convert", "-O", "qcow2", "src.vdk", "out.qcow2"],
           ("out.qcow2",), judge=_judge_convert("out.qcow2", "qcow2", "src_content")),
        Op("check-repair", ("damaged.vdk",), ["check", "--repair", "damaged.vdk"], (), judge=_judge_repair,
           mutates=("damaged.vdk",)),
        Op("backup-full", ("src.vdk",), ["backup", "--compression", "none", "src.vdk", "new.h5"], ("new.h5",),
           judge=_judge_backup("new.h5", ()), mutates=("src.vdk",)),
        Op("backup-incremental", ("src.vdk", "full.h5", "inc.h5"),
           ["backup", "--since", inputs.inc_change_id, "src.vdk", "new.h5"], ("new.h5",),
           judge=_judge_backup("new.h5", chain), mutates=("src.vdk",)),
        Op("backup-consumer", ("src.vdk", "full.h5", "inc.h5"), ["backup", "--consumer", "c", "src.vdk", "new.h5"],
           ("new.h5",), setup=_consumer_setup, judge=_judge_consumer_backup, mutates=("src.vdk",),
           kept_if=_delta_placed),
        Op("merge", chain, ["merge", "merged.h5", *chain], ("merged.h5",), judge=_judge_merge),
        Op("create", (), ["create", "--block-size", "4KiB", "new.vdk", "1MiB"], ("new.vdk",), judge=_judge_create,
           kept_if="Formatting"),
    ]
    return ops


# ============================================================================ one run
@dataclasses.dataclass
class Outcome:
    op: str
    site: int                     # 0: the dry run
    mode: str
    kind: str
    returncode: int
    stderr: str
    violations: list
    seconds: float
    succeeded: bool = False


def execute(shim: str, op: Op, inputs: Inputs, work_root: str, site: int = 0, mode: str = "eio",
            kind: str = "", count: bool = False) -> tuple[Outcome, list]:
    """Run op with call `site` failing (0: none) in a fresh directory; judge it.
    With count=True also return the logged calls [(kind, file name)]."""
    t0 = time.monotonic()
    run_dir = tempfile.mkdtemp(prefix=f"{op.name}-{site}-{mode}-", dir=work_root)
    run = Run(run_dir, inputs)
    calls = []
    try:
        run.copy(*op.inputs)
        if op.setup is not None:
            op.setup(run)
        before = set(os.listdir(run_dir))
        report = log = None
        if count:
            meta = tempfile.mkdtemp(prefix="meta-", dir=work_root)
            report, log = os.path.join(meta, "report"), os.path.join(meta, "log")
        violations = []
        try:
            r = run_cli(shim, run_dir, op.argv, fail_at=site, mode=mode, report=report, log=log)
            rc, err, stdout = r.returncode, r.stderr, r.stdout
        except subprocess.TimeoutExpired as exc:
            rc, err = None, (exc.stderr or b"").decode("utf-8", "replace") if isinstance(exc.stderr, bytes) \
                else (exc.stderr or "")
            stdout = ""
            violations.append(f"no exit within {TIMEOUT} s (a hang)")
        if count:
            with open(log, encoding="utf-8", errors="replace") if os.path.exists(log) else open(os.devnull) as f:
                for line in f:
                    _n, k, path = line.rstrip("\n").split(" ", 2)
                    calls.append((k, os.path.relpath(path, run_dir) if path.startswith(run_dir) else path))
            shutil.rmtree(meta, ignore_errors=True)
        ok = rc == 0
        # the command's result was complete before a later step failed (create: the image, then its close)
        kept = not ok and op.kept_if is not None and (op.kept_if(run) if callable(op.kept_if)
                                                      else op.kept_if in stdout)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if site == 0:
            if not ok:
                violations.append(f"the fault-free run failed: exit {rc}: {err.strip()[-2000:]}")
        else:
            if rc is not None and rc < 0:
                violations.append(f"killed by signal {-rc}")
            elif ok and kind in SYNC_KINDS:
                violations.append("a failed fsync was reported as a success (exit 0)")
            elif ok:
                violations.append(f"exit 0 although call {site} ({kind}) failed")
            elif rc is not None and rc != 1:
                violations.append(f"exit {rc}, expected 1")
            if not ok and rc is not None:
                if len(lines) != 1 or not lines[0].startswith("vdisk: error: "):
                    violations.append(f"stderr is not one error line: {err.strip()[-3000:]!r}")
                elif os.strerror(MODE_ERRNO[mode]) not in lines[0] and "errno" not in lines[0]:
                    violations.append(f"the error line does not name the error: {lines[0]!r}")
        # inputs untouched
        violations += _identical(run, [n for n in op.inputs if n not in op.mutates])
        if not ok and not kept:
            violations += _no_output(run, op)
            strays = [n for n in run.strays(before) if not n.startswith(".judge-")]
            if strays:
                violations.append(f"left behind: {strays}")
        if op.judge is not None and rc is not None:
            run.succeeded = ok          # ok: exit 0; the judge is told ok or kept
            try:
                violations += op.judge(run, ok or kept)
            except Exception as exc:     # noqa: BLE001 - the judge itself tripped: report it
                violations.append(f"judging raised {type(exc).__name__}: {exc}")
        return Outcome(op.name, site, mode, kind, rc if rc is not None else -999, err, violations,
                       time.monotonic() - t0, ok), calls
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def site_of(calls: list, kind: set | str, name, which: int = 0) -> tuple[int, str]:
    """The site (1-based) and kind of the which-th call (negative: from the end) of a
    kind in `kind` on a file for which name(file) is true (name may be a string)."""
    kinds = {kind} if isinstance(kind, str) else set(kind)
    match = name if callable(name) else (lambda f: f == name)
    hits = [i for i, (k, f) in enumerate(calls, start=1) if k in kinds and match(f)]
    if not hits:
        raise LookupError(f"no {sorted(kinds)} call on such a file among {calls}")
    site = hits[which]
    return site, calls[site - 1][0]


# ============================================================================ a campaign
def select_sites(n: int, limit: int | None, kinds: list[str]) -> list[int]:
    """Sites 1..n; with a limit, that many spread evenly, always the first, the last
    and the first of each kind."""
    if limit is None or n <= limit:
        return list(range(1, n + 1))
    chosen = {1, n}
    seen = set()
    for i, k in enumerate(kinds, start=1):
        if k not in seen:
            seen.add(k)
            chosen.add(i)
    step = n / max(1, limit - len(chosen))
    x = 1.0
    while len(chosen) < limit and x <= n:
        chosen.add(int(x))
        x += step
    return sorted(chosen)


def campaign(ops: list[str] | None = None, modes=MODES, limit: int | None = None, jobs: int = 2,
             work_root: str | None = None, log=None, rotate: bool = False, scale: int = 1) -> dict:
    """Dry runs, then every (selected) site of every operation in every mode (rotate: one
    mode per site, in turn).  A summary dict."""
    t0 = time.monotonic()
    shim = build_shim()
    root = tempfile.mkdtemp(prefix="vdisk-opfaults-", dir=work_root)
    try:
        inp_dir = os.path.join(root, "inputs")
        os.mkdir(inp_dir)
        inputs = prepare(inp_dir, scale)
        all_ops = [o for o in operations(inputs) if ops is None or o.name in ops]
        summary = {"operations": len(all_ops), "sites": 0, "faults": 0, "by_op": {}, "by_kind": {},
                   "by_mode": {}, "succeeded": 0, "violations": [], "seconds": 0.0}
        tasks = []
        for op in all_ops:
            dry, calls = execute(shim, op, inputs, root, count=True)
            if dry.violations:
                summary["violations"].append(f"{op.name} dry run: {dry.violations}")
                continue
            kinds = [k for k, _ in calls]
            summary["sites"] += len(calls)
            files = sorted({re.sub(r"\.[0-9a-f]{8}\.", ".*.", f) for _, f in calls})    # temporary names
            summary["by_op"][op.name] = {"sites": len(calls), "faults": 0, "files": files}
            for k in kinds:
                summary["by_kind"][k] = summary["by_kind"].get(k, 0) + 1
            for i, site in enumerate(select_sites(len(calls), limit, kinds)):
                kind = kinds[site - 1]
                usable = [m for m in modes if m != "short" or kind in WRITE_KINDS] or ["eio"]
                for mode in ([usable[i % len(usable)]] if rotate else usable):
                    tasks.append((op, site, mode, kind))
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(execute, shim, op, inputs, root, site, mode, kind)
                       for op, site, mode, kind in tasks]
            for fut in concurrent.futures.as_completed(futures):
                out, _ = fut.result()
                summary["faults"] += 1
                summary["by_op"][out.op]["faults"] += 1
                summary["by_mode"][out.mode] = summary["by_mode"].get(out.mode, 0) + 1
                summary["succeeded"] += out.succeeded
                if out.violations:
                    msg = f"{out.op} site {out.site} ({out.kind}, {out.mode}): exit {out.returncode}: " \
                          f"{'; '.join(out.violations)}"
                    summary["violations"].append(msg)
                    if log:
                        log(msg)
        summary["seconds"] = time.monotonic() - t0
        return summary
    finally:
        shutil.rmtree(root, ignore_errors=True)
