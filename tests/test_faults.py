"""Injected I/O faults: EIO and ENOSPC from every pwrite, fsync, truncate and
hole punch of a workload, in turn (the engine is vdisk_testkit/faultsim.py; the long
run is tools/fault_campaign.py).  After each fault the failing operation
raised VdiskIOError, the Disk kept working or was poisoned (vdisk/disk.py,
"I/O errors"), and the image, reopened, satisfies the crash contract, as it
stands and after a power loss at the fault.
"""
import errno
import os

import pytest

import vdisk
from vdisk.testing import FaultPlan, FaultyIO, FaultyRecordingIO, KINDS, RecordingIO

from vdisk_testkit import faultsim
from vdisk_testkit.faultsim import Scenario
from vdisk_testkit.helpers import extent_blocks, pattern

BS = 4096
GROWN = 9 * 1024 * 1024     # 2,300 blocks of 4 KiB: past the refcount table of a 96 KiB image

# Every site of these workloads fails in turn, with EIO and with ENOSPC.  Together
# their ops cover every operation the fault workload has (test_ci_scenarios_cover_every_op).
CI_SCENARIOS = [
    pytest.param(Scenario(seed=16), None, 100, id="seed16"),
    pytest.param(Scenario(seed=17), None, 100, id="seed17"),
    pytest.param(Scenario(seed=101, block_size=8192, size=160 * 1024, fold_interval=6, ops=16), None, 60,
                 id="seed101-8k"),
    # grow past the table capacity, then one write past the refcount table's: both relocate
    pytest.param(Scenario(seed=0, grow_to=GROWN, ops=4, extra_rate=0.1), {"resize", "write"}, 20,
                 id="relocations"),
] + [pytest.param(Scenario(seed=1000 + i), None, 1, id=f"seed{1000 + i}")     # more on demand
     for i in range(int(os.environ.get("VDISK_FAULT_SEEDS", "0")))]
ALL_OPS = {"create", "write", "discard", "flush", "checkpoint", "resize", "snapshot", "delete", "revert",
           "compact", "backup", "cbackup", "reopen", "reset", "close"}


def faulty(plan, recording=False):
    return (FaultyRecordingIO if recording else FaultyIO).factory(plan)


# ============================================================================ the fault layer itself
def test_dry_run_counts_every_kind(img):
    plan = FaultPlan()
    plan.trace = []
    d = vdisk.create(img, "1MiB", block_size=BS, io_factory=faulty(plan))
    plan.label = "work"
    d.pwrite(pattern(1, 3 * BS), 0)
    d.discard(0, BS)
    d.flush()
    d.resize("8MiB")                 # relocates the tables: truncate
    d.compact()                      # punches the freed block
    d.close()
    assert all(plan.counts[k] > 0 for k in KINDS), plan.counts
    assert plan.fired is None and plan.landed_after == 0
    assert len(plan.sites()) == sum(plan.counts.values()) == len(plan.trace)
    assert {label for *_, label in plan.trace} == {"", "work"}


def test_plan_fails_the_nth_call_and_lands_half_on_enospc(tmp_path):
    plan = FaultPlan("pwrite", 1, errno.ENOSPC, partial=True)
    rec = FaultyRecordingIO.factory(plan)(str(tmp_path / "f"), writable=True, create=True)
    rec.pwrite(b"a" * 2048, 0)
    with pytest.raises(vdisk.VdiskIOError) as exc:
        rec.pwritev([b"b" * 1024, b"c" * 1024], 0)          # one call: the second pwrite
    assert exc.value.errno == errno.ENOSPC and plan.fired == ("pwrite", 1, errno.ENOSPC)
    assert rec.pread(2048, 0) == b"b" * 1024 + b"a" * 1024   # a short write, then the error
    rec.pwrite(b"d", 0)
    assert plan.counts["pwrite"] == 3 and plan.landed_after == 1
    rec.close()


def test_failed_fsync_poisons_the_file_and_keeps_its_writes_pending(tmp_path):
    plan = FaultPlan("fsync", 1, errno.EIO)
    rec = FaultyRecordingIO.factory(plan)(str(tmp_path / "f"), writable=True, create=True)
    rec.pwrite(b"a" * 512, 0)
    rec.fsync()
    rec.pwrite(b"b" * 512, 0)
    heard = []
    rec.on_poison = heard.append
    with pytest.raises(vdisk.VdiskIOError) as exc:
        rec.fsync()
    assert heard == [rec.poisoned] and exc.value is rec.poisoned
    for call in (rec.fsync, lambda: rec.pwrite(b"c", 0), lambda: rec.truncate(0), lambda: rec.punch_hole(0, 512)):
        with pytest.raises(vdisk.VdiskIOError, match="reopen"):
            call()
    # after the failed fsync, a power loss keeps any subset of its writes
    assert rec.crash_image(keep=[False]) == b"a" * 512
    assert rec.crash_image(keep=[True]) == b"b" * 512
    assert plan.landed_after == 0
    rec.close()


# ============================================================================ the policy, one case each
def _open_faulty(img, plan, recording=False):
    vdisk.create(img, "1MiB", block_size=BS).close()
    return vdisk.open(img, "r+", io_factory=faulty(plan, recording))


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_failed_fsync_poisons_the_disk_and_no_flush_succeeds_after(img, err):
    plan = FaultPlan()
    d = _open_faulty(img, plan)
    d.pwrite(b"a" * BS, 0)
    d.flush()
    d.pwrite(b"b" * BS, 0)           # in place: durable only at the next flush
    d.pwrite(b"c" * BS, 8 * BS)      # a new block
    plan.kind, plan.nth, plan.err = "fsync", plan.counts["fsync"], err
    with pytest.raises(vdisk.VdiskIOError) as exc:
        d.flush()
    assert exc.value.errno == err
    for _ in range(3):               # never retried into a false success
        with pytest.raises(vdisk.VdiskIOError, match="reopen the image"):
            d.flush()
    for call in (lambda: d.pread(BS, 0), lambda: d.pwrite(b"x", 0), d.checkpoint, d.map,
                 lambda: d.changes_since("*"), lambda: d.resize(2 * BS)):
        with pytest.raises(vdisk.VdiskIOError, match="reopen the image"):
            call()
    assert d.closed
    with vdisk.open(img, "r+") as d2:     # the file and its lock were released at once
        assert d2.pread(BS, 0) in (b"a" * BS, b"b" * BS)
        assert d2.pread(BS, 8 * BS) in (bytes(BS), b"c" * BS)
    d.close()                        # quietly: the error was reported
    with pytest.raises(vdisk.VdiskIOError):
        d.flush()
    assert plan.landed_after == 0    # nothing reached the file after the failed fsync
    assert not vdisk.check(img).corruptions


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_failed_data_write_keeps_the_disk_usable(img, err):
    plan = FaultPlan()
    d = _open_faulty(img, plan)
    d.pwrite(b"a" * BS, 0)
    d.flush()
    plan.kind, plan.nth, plan.err, plan.partial = "pwrite", plan.counts["pwrite"], err, True
    with pytest.raises(vdisk.VdiskIOError) as exc:
        d.pwrite(b"b" * 3 * BS, 2 * BS)               # new blocks: the data write fails
    assert exc.value.errno == err and not d.closed
    assert d.pread(3 * BS, 2 * BS) == bytes(3 * BS)   # given back: the table never saw them
    d.pwrite(b"c" * 2 * BS, 3 * BS)
    d.flush()
    d.close()
    with vdisk.open(img) as d2:
        assert d2.pread(5 * BS, 0) == b"a" * BS + bytes(2 * BS) + b"c" * 2 * BS
    r = vdisk.check(img)
    assert not r.corruptions and r.leaked_blocks == 0, r


def test_failed_header_commit_poisons_and_the_image_opens_at_either_state(img):
    """A half-written header slot must not be followed by another commit, which
    would overwrite the only valid slot."""
    plan = FaultPlan()
    d = _open_faulty(img, plan)
    d.pwrite(b"a" * BS, 0)
    first = d.checkpoint()
    d.pwrite(b"b" * BS, 0)
    d.flush()
    # the checkpoint's flush has nothing left to write: its first pwrite is the header slot
    plan.kind, plan.nth, plan.err, plan.partial = "pwrite", plan.counts["pwrite"], errno.EIO, True
    with pytest.raises(vdisk.VdiskIOError):
        d.checkpoint()
    with pytest.raises(vdisk.VdiskIOError, match="reopen"):
        d.checkpoint()
    d.close()
    assert not vdisk.check(img).corruptions
    with vdisk.open(img) as d2:
        assert d2.generation in (2, 3)
        assert d2.pread(BS, 0) == b"b" * BS
        assert 0 in extent_blocks(d2.changes_since(first), BS)


def test_reset_tracking_never_shows_the_old_epoch_with_zeroed_counters(img):
    """Every power-loss state during reset_tracking: the old epoch with its
    counters (its ids still cover the changes), or the new epoch."""
    d = vdisk.create(img, "1MiB", block_size=BS, io_factory=RecordingIO)
    d.pwrite(b"a" * BS, 0)
    cid = d.checkpoint()
    d.pwrite(b"b" * BS, 4 * BS)
    d.checkpoint()
    old_epoch = d.tracking_id
    states = []
    d._io.on_fsync = lambda rec: states.extend(
        rec.crash_image(keep=[k] * len(rec.pending)) for k in (False, True))
    d.reset_tracking()
    d._io.on_fsync = None
    d.close()
    assert len(states) >= 6
    for i, image in enumerate(states):
        path = f"{img}.{i}"
        with open(path, "wb") as f:
            f.write(image)
        assert not vdisk.check(path).corruptions
        with vdisk.open(path) as s:
            if s.tracking_id == old_epoch:
                assert 4 in extent_blocks(s.changes_since(cid), BS), f"state {i}: under-report"
            else:
                with pytest.raises(vdisk.StaleChangeIdError):
                    s.changes_since(cid)
        os.unlink(path)


def test_poisoned_disk_views_refuse_reads(img):
    plan = FaultPlan()
    d = _open_faulty(img, plan)
    d.pwrite(b"a" * BS, 0)
    snap = d.snapshot("s")
    d.pwrite(b"b" * BS, 0)
    plan.kind, plan.nth = "fsync", plan.counts["fsync"]
    with pytest.raises(vdisk.VdiskIOError):
        d.flush()
    with pytest.raises(vdisk.VdiskIOError, match="reopen"):
        snap.pread(BS, 0)
    d.close()


# ============================================================================ every call site
@pytest.mark.parametrize("sc, only, min_sites", CI_SCENARIOS)
def test_every_call_site(sc, only, min_sites):
    s = faultsim.campaign([sc], only_ops=only)
    print(f"{sc.describe()}: {s['sites']} sites, {s['faults']} faults ({s['poisoned']} poisoned, "
          f"{s['kept_working']} kept working), {s['states']} images checked, {s['seconds']:.1f} s")
    assert not s["violations"], f"{len(s['violations'])} violations; the first:\n" + "\n\n".join(
        s["violations"][:3])
    assert s["sites"] >= min_sites, s            # the workload did reach its sites
    assert s["faults"] == len(faultsim.ERRNOS) * s["sites"]
    assert s["poisoned"] and s["kept_working"]    # both sides of the policy were exercised


def test_ci_scenarios_cover_every_op_and_kind():
    ops, kinds = set(), set()
    for param in CI_SCENARIOS:
        sc, only, _ = param.values
        sites, labels, dry = faultsim.sites_of(sc)
        assert dry.violation is None, dry.violation
        ops |= set(labels.values())
        kinds |= {k for k, _ in sites}
        if sc.grow_to:      # the refcount table is relocated inside the fill write: a truncate there
            assert ("truncate", "write") in {(k, labels[(k, n)]) for k, n in sites}
    assert ops == ALL_OPS, f"not reached: {ALL_OPS - ops}"
    assert kinds == set(KINDS)
