"""Hostile inputs (issue #13): FIFOs where files are expected, header
counters at their limits, a damaged snapshot record, and the one-liner
whose Disk is referenced only by the call expression.

Each test crafts its input per docs/FORMAT.md.  The FIFO tests run the call
in a child process with a time limit, so a hang fails the test instead of
hanging the suite.
"""
from __future__ import annotations

import gc
import os
import struct
import subprocess

import pytest

import vdisk
from vdisk import layout as L
from vdisk_testkit.helpers import measure_in_child, pattern

KiB = 1 << 10
MiB = 1 << 20
BS = 4 * KiB


# ============================================================================ the one-liner
def test_one_liner_read_on_a_dropped_disk(img):
    """The bound pread holds the Disk for the call: no AttributeError from a
    Disk collected mid-call (the hot path holds it only weakly).  The calls
    stand outside the asserts: pytest's assertion rewriting would keep the
    Disk alive in a temporary."""
    with vdisk.create(img, MiB, block_size=BS) as d:
        d.pwrite(b"hello", 0)
    gc.collect()
    small = vdisk.open(img).pread(10, 0)
    spanning = vdisk.open(img).pread(3 * BS, 0)        # the slow path too
    assert small == b"hello" + bytes(5)
    assert spanning == b"hello" + bytes(3 * BS - 5)


def test_one_liner_writes_on_a_dropped_disk(img, tmp_path):
    with vdisk.create(img, MiB, block_size=BS) as d:
        d.pwrite(b"x" * BS, 0)
    in_place = vdisk.open(img, "r+").pwrite(b"y", 0)                # the hot path
    allocating = vdisk.open(img, "r+").pwrite(b"z" * 10, 5 * BS)    # the slow path
    other = str(tmp_path / "new.vdk")
    created = vdisk.create(other, "1MiB").pwrite(b"abc", 7)
    assert (in_place, allocating, created) == (1, 10, 3)
    with vdisk.open(img) as d:              # each dropped Disk closed (and flushed) at once
        assert d.pread(2, 0) == b"yx"
        assert d.pread(10, 5 * BS) == b"z" * 10
    with vdisk.open(other) as d:
        assert d.pread(10, 0) == bytes(7) + b"abc"


def test_dropped_disk_still_closes_at_once(img):
    """The bound methods hold the Disk only for the call: dropping the last
    reference closes it (its lock is free for a writer) without a gc pass."""
    vdisk.create(img, MiB, block_size=BS).close()
    d = vdisk.open(img)
    read = d.pread
    del d
    assert read(4, 0) == bytes(4)           # the bound method alone keeps it open ...
    del read
    with vdisk.open(img, "r+") as w:        # ... and once it goes, the shared lock is gone
        w.pwrite(b"w", 0)


# ============================================================================ FIFOs
HANG_LIMIT = 30          # seconds: a call that waits on a FIFO never returns at all


def in_child(body: str, *args) -> dict:
    """measure_in_child with a time limit: a hang fails the test (the child is killed)."""
    try:
        return measure_in_child(body, *args, timeout=HANG_LIMIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {HANG_LIMIT} s (a FIFO opened or read without O_NONBLOCK?)")


def assert_refused_fifo(result: dict, path: str) -> None:
    err = result["error"]
    assert err is not None, f"no VdiskError: {result}"
    assert err.startswith("InvalidArgumentError: "), err
    assert path in err and "FIFO" in err, err


@pytest.fixture
def fifo(tmp_path):
    path = str(tmp_path / "pipe.vdk")
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("call", ["vdisk.open(args[0])", "vdisk.open(args[0], 'r+')", "vdisk.check(args[0])",
                                  "vdisk.check(args[0], repair=True)"])
def test_fifo_image_is_refused_not_waited_on(fifo, call):
    assert_refused_fifo(in_child(call, fifo), fifo)


@pytest.mark.parametrize("call", [
    "vdisk.create(args[0], '1MiB', overwrite=True)",
    "vdisk.convert(args[1], args[0], overwrite=True)",
    "vdisk.restore([args[2]], args[0], overwrite=True)",
])
def test_fifo_output_with_overwrite_is_refused(fifo, tmp_path, call):
    """create/convert/restore(..., fifo, overwrite=True): refuse_if_in_use
    probes the existing file; a FIFO is refused, and stays a FIFO."""
    src = str(tmp_path / "src.vdk")
    with vdisk.create(src, MiB, block_size=BS) as d:
        d.pwrite(pattern(1, BS), 0)
    delta = str(tmp_path / "full.vdelta")
    vdisk.backup(src, delta)
    assert_refused_fifo(in_child(call, fifo, src, delta), fifo)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)


def test_restore_onto_fifo_target_is_refused(fifo, tmp_path):
    """An existing target that is a FIFO (no overwrite): the incremental path opens it."""
    src = str(tmp_path / "src.vdk")
    with vdisk.create(src, MiB, block_size=BS) as d:
        d.pwrite(pattern(1, BS), 0)
    full = str(tmp_path / "full.vdelta")
    r = vdisk.backup(src, full)
    with vdisk.open(src, "r+") as d:
        d.pwrite(pattern(2, BS), BS)
    inc = str(tmp_path / "inc.vdelta")
    vdisk.backup(src, inc, since=r.change_id)
    target = str(tmp_path / "target.vdk")
    vdisk.restore([full], target)
    os.unlink(target)
    os.mkfifo(target)
    assert_refused_fifo(in_child("vdisk.restore([args[1]], args[0])", target, inc), target)


def test_restore_with_fifo_chain_sidecar_is_refused(tmp_path):
    """A restore target whose <target>.vdisk-chain sidecar is a FIFO."""
    src = str(tmp_path / "src.vdk")
    with vdisk.create(src, MiB, block_size=BS) as d:
        d.pwrite(pattern(1, BS), 0)
    full = str(tmp_path / "full.vdelta")
    r = vdisk.backup(src, full)
    with vdisk.open(src, "r+") as d:
        d.pwrite(pattern(2, BS), BS)
    inc = str(tmp_path / "inc.vdelta")
    vdisk.backup(src, inc, since=r.change_id)
    target = str(tmp_path / "target.vdk")
    vdisk.restore([full], target)
    side = target + ".vdisk-chain"
    assert os.path.isfile(side)
    os.unlink(side)
    os.mkfifo(side)
    assert_refused_fifo(in_child("vdisk.restore([args[1]], args[0])", target, inc), side)
    with vdisk.open(target) as d:           # untouched
        assert d.pread(2 * BS, 0) == pattern(1, BS) + bytes(BS)


def test_fsync_dir_of_a_fifo_fails_at_once(fifo):
    """The directory sync after a rename opens the directory: O_DIRECTORY,
    so a FIFO in its place fails (ENOTDIR) instead of waiting for a writer."""
    result = in_child("from vdisk.fileio import fsync_dir\nfsync_dir(args[0])", fifo)
    assert result["error"] and result["error"].startswith("VdiskIOError") and "Not a directory" in result["error"]


def test_cli_info_on_a_fifo(fifo):
    import sys
    try:
        proc = subprocess.run([sys.executable, "-m", "vdisk", "info", fifo], capture_output=True, text=True,
                              timeout=HANG_LIMIT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vdisk info hung for {HANG_LIMIT} s on a FIFO")
    assert proc.returncode != 0
    assert "FIFO" in proc.stderr and fifo in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_open_regular_refuses_other_kinds(tmp_path):
    """The one helper every open goes through: a socket and a character
    device are refused by kind, a regular file opens blocking again."""
    import socket
    from vdisk.fileio import open_regular
    sock_path = str(tmp_path / "s")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    try:
        with pytest.raises(vdisk.InvalidArgumentError, match="socket"):
            open_regular(sock_path, os.O_RDONLY)
    finally:
        s.close()
    with pytest.raises(vdisk.InvalidArgumentError, match="character device"):
        open_regular("/dev/null", os.O_RDONLY)
    with pytest.raises(vdisk.InvalidArgumentError, match="directory"):
        open_regular(str(tmp_path), os.O_RDONLY)
    f = str(tmp_path / "f")
    open(f, "wb").close()
    fd = open_regular(f, os.O_RDWR)
    try:
        import fcntl
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)


# ============================================================================ counters at their limits
def small_image(path, snapshots=0) -> bytes:
    """1 MiB, 4 KiB blocks, data in blocks 0-3 and 10, a checkpoint; returns the content."""
    with vdisk.create(path, MiB, block_size=BS) as d:
        d.pwrite(pattern(1, 4 * BS), 0)
        d.pwrite(pattern(2, BS), 10 * BS)
        d.checkpoint()
        for i in range(snapshots):
            d.snapshot(f"s{i}")
            d.pwrite(pattern(10 + i, BS), (20 + i) * BS)
        d.flush()
        return d.pread(MiB, 0)


def slots(path) -> list[L.Header]:
    with open(path, "rb") as f:
        raw = f.read(2 * L.SLOT_SIZE)
    return [L.Header.unpack(raw[o:o + L.SLOT_SIZE]) for o in L.SLOT_OFFSETS]


def active_slot(path) -> int:
    h = slots(path)
    return 0 if h[0].sequence > h[1].sequence else 1


def write_slot(path, slot: int, **fields) -> None:
    """Set header fields of one slot (a valid CRC: the damage is in the values)."""
    h = slots(path)[slot]
    for k, v in fields.items():
        setattr(h, k, v)
    with open(path, "r+b") as f:
        f.seek(L.SLOT_OFFSETS[slot])
        f.write(h.pack())


def near_limit(limit: int, slot: int, below: int) -> int:
    """A sequence about `below` under limit that belongs in slot (sequence % 2 == slot)."""
    s = limit - below
    return s if s % 2 == slot else s - 1


def test_sequence_near_the_limit_refuses_writers_and_repair_renumbers(img):
    content = small_image(img, snapshots=1)
    a = active_slot(img)
    seq = near_limit(2 ** 62 - 1, a, 3)          # three commits from the reader's limit
    write_slot(img, a, sequence=seq)
    with vdisk.open(img) as d:                   # readers still read it
        assert d.pread(MiB, 0) == content
    with pytest.raises(vdisk.CorruptImageError, match=r"sequence .*check --repair") as exc:
        vdisk.open(img, "r+")
    assert img in str(exc.value)
    r = vdisk.check(img)
    assert not r.ok and any("sequence" in c for c in r.corruptions), r
    r = vdisk.check(img, repair=True)
    assert r.ok and r.repaired, r
    assert max(h.sequence for h in slots(img)) < 16
    with vdisk.open(img, "r+") as d:             # writable again, nothing lost
        assert d.pread(MiB, 0) == content
        assert [s.name for s in d.snapshots] == ["s0"]
        for _ in range(4):
            cid = d.checkpoint()
    with vdisk.open(img) as d:
        assert d.change_id == cid                # every commit survived the reopen


def test_commits_stop_at_the_limit_instead_of_being_rolled_back(img):
    """The issue's scenario: commits past 2^62 - 1 were written into a slot the
    next open refuses, silently rolling them back (and with a snapshot
    deleted and its blocks reused in between, the image no longer opened).
    A commit that would pass the limit raises, writes nothing, and stops the
    Disk; the commits before it stand."""
    content = small_image(img, snapshots=1)
    d = vdisk.open(img, "r+")
    d._hdr.sequence = 2 ** 62 - 3                 # white-box: no image gets here honestly (see the test above)
    d.delete_snapshot("s0")                       # commit: 2^62 - 2, and its second copy before the
    assert d._hdr.sequence == 2 ** 62 - 1         # release (docs/FORMAT.md, "The older slot"): the last
    d.pwrite(pattern(7, 4 * BS), 40 * BS)         # reuses the snapshot's freed blocks
    d.flush()
    with pytest.raises(vdisk.VdiskIOError, match="limit") as exc:
        d.checkpoint()                            # would be 2^62: refused
    assert img in str(exc.value)
    with pytest.raises(vdisk.VdiskIOError):       # stopped: nothing more written
        d.pread(1, 0)
    d.close()
    with vdisk.open(img) as d:
        assert d._hdr.sequence == 2 ** 62 - 1     # the delete's commits stand, not rolled back
        assert d.snapshots == []
        assert d.pread(40 * BS, 0) == content[:40 * BS]
        assert d.pread(4 * BS, 40 * BS) == pattern(7, 4 * BS)
    assert vdisk.check(img, repair=True).ok
    assert vdisk.check(img).ok


def test_snapshot_next_id_past_the_limit_is_refused_at_open(img):
    """2^64 - 1 passed validation and check; snapshot() then raised
    struct.error (a traceback in the CLI) after allocating blocks."""
    small_image(img)
    for slot in (0, 1):
        write_slot(img, slot, snapshot_next_id=2 ** 64 - 1)
    for mode in ("r", "r+"):
        with pytest.raises(vdisk.CorruptImageError, match="snapshot_next_id"):
            vdisk.open(img, mode)
    with pytest.raises(vdisk.CorruptImageError, match="snapshot_next_id"):
        vdisk.check(img)


def counters_state(d) -> tuple:
    h = d._hdr
    return (h.sequence, h.generation, h.snapshot_next_id, h.snapshot_count, h.snapshot_offset, d._end_block,
            len(d.snapshots))


@pytest.mark.parametrize("field, value, call", [
    ("snapshot_next_id", 2 ** 62, "snapshot"),
    ("generation", L.MAX_GENERATION, "snapshot"),
    ("generation", L.MAX_GENERATION, "checkpoint"),
])
def test_counter_at_its_limit_refused_before_anything_is_written(img, field, value, call):
    content = small_image(img)
    a = active_slot(img)
    write_slot(img, a, **{field: value})
    with open(img, "rb") as f:
        before = f.read()
    with vdisk.open(img, "r+") as d:
        state = counters_state(d)
        with pytest.raises(vdisk.OutOfRangeError):
            getattr(d, call)()
        assert counters_state(d) == state          # the in-memory header did not advance
        assert d.pread(MiB, 0) == content
    with open(img, "rb") as f:
        assert f.read() == before                  # nothing written, nothing leaked
    r = vdisk.check(img)
    assert r.ok and r.leaked_blocks == 0, r


def test_refcount_at_its_cap_refuses_snapshot_without_leaking(img):
    """A block at the refcount cap (a leak, allowed) cannot take a snapshot's
    reference: refused before the frozen table's blocks are allocated."""
    content = small_image(img)
    with vdisk.open(img) as d:
        p = int(d._table[0])
        ref_off = d._hdr.refcount_offset
    with open(img, "r+b") as f:
        f.seek(ref_off + 2 * p)
        f.write(struct.pack("<H", L.MAX_REFCOUNT))
    assert vdisk.check(img).leaked_blocks == 1
    with vdisk.open(img, "r+") as d:
        state = counters_state(d)
        with pytest.raises(vdisk.OutOfRangeError, match="references"):
            d.snapshot("s")
        assert counters_state(d) == state
        assert d.pread(MiB, 0) == content
    r = vdisk.check(img)
    assert r.leaked_blocks == 1, r                 # the one crafted, no more


# ============================================================================ a damaged snapshot record
def image_with_snapshots(path):
    """s0, then block 1 overwritten (its old block is referenced by s0 alone),
    s1, then block 2 overwritten.  Returns (live, s0, s1) contents and the
    physical block only s0 references."""
    with vdisk.create(path, MiB, block_size=BS) as d:
        d.pwrite(pattern(1, 4 * BS), 0)
        d.checkpoint()
        s0 = d.snapshot("s0").pread(MiB, 0)
        only_s0 = int(d._table[1])
        d.pwrite(pattern(2, BS), BS)
        s1 = d.snapshot("s1").pread(MiB, 0)
        d.pwrite(pattern(3, BS), 2 * BS)
        live = d.pread(MiB, 0)
    return live, s0, s1, only_s0


def flip_record_bit(path, index: int, byte: int = 20, fix_crc: bool = False, **fields) -> None:
    h = slots(path)[active_slot(path)]
    off = h.snapshot_offset + index * L.SNAPSHOT_ENTRY_SIZE
    with open(path, "r+b") as f:
        f.seek(off)
        rec = bytearray(f.read(L.SNAPSHOT_ENTRY_SIZE))
        if fields:
            names = [n for n, _ in L.SNAPSHOT_FIELDS]
            vals = list(L.SNAPSHOT_STRUCT.unpack(bytes(rec[:L.SNAPSHOT_ENTRY_SIZE - 4])))
            for k, v in fields.items():
                vals[names.index(k)] = v
            rec[:L.SNAPSHOT_ENTRY_SIZE - 4] = L.SNAPSHOT_STRUCT.pack(*vals)
        else:
            rec[byte] ^= 0x10
        if fix_crc:
            struct.pack_into("<I", rec, L.SNAPSHOT_ENTRY_SIZE - 4, L.crc32c(bytes(rec[:L.SNAPSHOT_ENTRY_SIZE - 4])))
        f.seek(off)
        f.write(rec)


def refcount_of(path, p: int) -> int:
    h = slots(path)[active_slot(path)]
    with open(path, "rb") as f:
        f.seek(h.refcount_offset + 2 * p)
        return struct.unpack("<H", f.read(2))[0]


def test_damaged_snapshot_record_keeps_the_live_disk_readable(img):
    live, _s0, s1, _only = image_with_snapshots(img)
    flip_record_bit(img, 0)                          # one flipped bit: s0's CRC fails
    with vdisk.open(img) as d:                       # read-only: the live disk and s1 read as before
        assert d.pread(MiB, 0) == live
        assert [s.name for s in d.snapshots] == ["s1"]
        assert d.open_snapshot("s1").pread(MiB, 0) == s1
        assert d.info()["damaged_snapshot_records"] == 1
    with pytest.raises(vdisk.CorruptImageError) as exc:
        vdisk.open(img, "r+")
    msg = str(exc.value)
    assert img in msg and "snapshot table entry 0" in msg and "check --repair" in msg, msg


def test_repair_drops_the_damaged_snapshot_record_and_reclaims_its_blocks(img):
    live, _s0, s1, only_s0 = image_with_snapshots(img)
    flip_record_bit(img, 0)
    r = vdisk.check(img)
    assert not r.ok and any("snapshot table entry 0" in c and "drops" in c for c in r.corruptions), r
    assert refcount_of(img, only_s0) == 1
    r = vdisk.check(img, repair=True)
    assert r.ok and r.repaired and r.leaked_blocks == 0, r
    assert refcount_of(img, only_s0) == 0            # referenced by the dropped record alone: reclaimed
    with vdisk.open(img, "r+") as d:
        assert d.pread(MiB, 0) == live
        assert [s.name for s in d.snapshots] == ["s1"]
        assert d.open_snapshot("s1").pread(MiB, 0) == s1
        d.pwrite(pattern(9, 4 * BS), 8 * BS)         # allocations reuse reclaimed space, never s1's blocks
        d.delete_snapshot("s1")
        assert d.pread(MiB, 0)[:8 * BS] == live[:8 * BS]
    assert vdisk.check(img).ok


def test_repair_of_the_only_snapshot_record(img):
    live, _s0, _s1, _only = image_with_snapshots(img)
    flip_record_bit(img, 0)
    flip_record_bit(img, 1, byte=130)               # both records: a bit of s1's name too
    with vdisk.open(img) as d:
        assert d.pread(MiB, 0) == live and d.snapshots == []
    assert vdisk.check(img, repair=True).ok
    h = slots(img)[active_slot(img)]
    assert (h.snapshot_count, h.snapshot_offset, h.snapshot_capacity) == (0, 0, 0)
    r = vdisk.check(img)
    assert r.ok and r.leaked_blocks == 0, r
    with vdisk.open(img, "r+") as d:
        assert d.pread(MiB, 0) == live
        d.snapshot("again")


def test_snapshot_record_overlapping_the_live_table_is_damaged_alone(img):
    """A record whose CRC is fine but whose frozen table lies on the live
    block table: left out (it would make every region check fail), the
    live disk still opens read-only."""
    live, _s0, s1, _only = image_with_snapshots(img)
    h = slots(img)[active_slot(img)]
    flip_record_bit(img, 0, fix_crc=True, table_offset=h.table_offset)
    with vdisk.open(img) as d:
        assert d.pread(MiB, 0) == live
        assert [s.name for s in d.snapshots] == ["s1"]
    r = vdisk.check(img, repair=True)
    assert r.ok, r
    with vdisk.open(img, "r+") as d:
        assert d.pread(MiB, 0) == live
        assert d.open_snapshot("s1").pread(MiB, 0) == s1


def test_power_loss_during_the_repair_that_drops_a_record(img, tmp_path):
    """Power loss at every fsync of the repair (each pending write kept or
    lost, torn too): the live disk reads as before, the intact snapshot is
    never lost, and a second repair finishes the job."""
    import random
    from vdisk.testing import RecordingIO
    live, _s0, s1, _only = image_with_snapshots(img)
    with vdisk.open(img, "r+") as d:        # a third snapshot after the damaged one: two records move down
        s2 = d.snapshot("s2").pread(MiB, 0)
    flip_record_bit(img, 0)
    states = []
    rng = random.Random(13)

    def sample(rec):
        n = len(rec.pending)
        for keep in ([True] * n, [False] * n, None, None, None):
            states.append(rec.crash_image(rng, keep=keep))
        states.append(rec.crash_image(rng, torn=True))

    def factory(path, writable, **kw):
        rec = RecordingIO(path, writable, **kw)
        rec.on_fsync = sample
        return rec

    assert vdisk.check(img, repair=True, io_factory=factory).ok
    assert len(states) >= 6 * 3
    state_path = str(tmp_path / "state.vdk")
    for i, raw in enumerate(states):
        with open(state_path, "wb") as f:
            f.write(raw)
        with vdisk.open(state_path) as d:
            assert d.pread(MiB, 0) == live, i
        r = vdisk.check(state_path, repair=True)
        assert r.ok, (i, r)
        with vdisk.open(state_path, "r+") as d:
            assert d.pread(MiB, 0) == live, i
            assert [s.name for s in d.snapshots] == ["s1", "s2"], i
            assert d.open_snapshot("s1").pread(MiB, 0) == s1, i
            assert d.open_snapshot("s2").pread(MiB, 0) == s2, i


def test_cli_info_and_check_on_a_damaged_snapshot_record(img):
    """The CLI reads the live disk's info and says what is left out; check
    names the entry, and check --repair drops it (exit 0 after)."""
    from click.testing import CliRunner
    from vdisk.cli import main
    image_with_snapshots(img)
    flip_record_bit(img, 1)
    runner = CliRunner()
    r = runner.invoke(main, ["info", img])
    assert r.exit_code == 0, r.output
    assert "damaged snapshot records" in r.output and "check --repair" in r.output, r.output
    r = runner.invoke(main, ["check", img])
    assert r.exit_code != 0 and "snapshot table entry 1" in r.output + (r.stderr if r.stderr_bytes else ""), r.output
    r = runner.invoke(main, ["check", "--repair", img])
    assert r.exit_code == 0, r.output
    assert runner.invoke(main, ["check", img]).exit_code == 0


def test_a_commit_that_readers_would_refuse_is_never_written(img):
    """The backstop behind every operation's own checks: a header that
    would fail validation (here a snapshot_next_id past its limit, set
    behind the Disk's back) is not written; the Disk stops, the file keeps
    its last commit."""
    content = small_image(img)
    d = vdisk.open(img, "r+")
    before = slots(img)
    d._hdr.snapshot_next_id = 2 ** 64 - 1            # white-box: what snapshot() used to advance into
    with pytest.raises(vdisk.VdiskIOError, match="snapshot_next_id"):
        d.checkpoint()
    d.close()
    assert [h.sequence for h in slots(img)] == [h.sequence for h in before]
    with vdisk.open(img, "r+") as d:
        assert d.pread(MiB, 0) == content


def test_power_loss_during_the_sequence_renumbering(img, tmp_path):
    """Power loss at every fsync of the repair that renumbers the sequence:
    the image opens with the same content and snapshots, and a second
    repair leaves it writable."""
    import random
    from vdisk.testing import RecordingIO
    content = small_image(img, snapshots=1)
    a = active_slot(img)
    write_slot(img, a, sequence=near_limit(2 ** 62 - 1, a, 10))
    states = []
    rng = random.Random(7)

    def factory(path, writable, **kw):
        rec = RecordingIO(path, writable, **kw)
        rec.on_fsync = lambda r: states.extend(
            r.crash_image(rng, keep=k) for k in ([True] * len(r.pending), [False] * len(r.pending), None, None))
        return rec

    assert vdisk.check(img, repair=True, io_factory=factory).ok
    state_path = str(tmp_path / "state.vdk")
    for i, raw in enumerate(states):
        with open(state_path, "wb") as f:
            f.write(raw)
        with vdisk.open(state_path) as d:
            assert d.pread(MiB, 0) == content, i
            assert [s.name for s in d.snapshots] == ["s0"], i
        assert vdisk.check(state_path, repair=True).ok, i
        with vdisk.open(state_path, "r+") as d:
            assert d.pread(MiB, 0) == content, i
            d.checkpoint()


AUDITED = ["sequence", "generation", "snapshot_next_id", "snapshot_count", "snapshot_capacity", "consumer_count",
           "consumer_capacity", "table_capacity", "refcount_capacity", "created_ns"]
LIMITS = sorted({0, 1, 2 ** 31, 2 ** 32 - 2, 2 ** 32 - 1, 2 ** 62 - 1, 2 ** 62, 2 ** 63, 2 ** 64 - 2, 2 ** 64 - 1})


@pytest.mark.parametrize("field", AUDITED)
def test_every_header_counter_at_its_limits(img, field):
    """Each counter of the active slot at each limit that fits its bytes:
    opening, writing, checkpoint, snapshot, delete, resize, a consumer and
    reset_tracking raise only VdiskErrors, and the image still opens
    afterwards (read-only) whenever it opened before."""
    code = dict(L._FIELDS)[field]
    top = (1 << 8 * struct.calcsize("<" + code)) - 1
    content = small_image(img, snapshots=1)
    pristine = open(img, "rb").read()
    for value in [v for v in LIMITS if v <= top] + [top - 1, top]:
        with open(img, "wb") as f:
            f.write(pristine)
        a = active_slot(img)
        if field == "sequence" and value % 2 != a:
            value = value - 1 if value else 1
        write_slot(img, a, **{field: value})
        try:
            vdisk.open(img).close()
            opened = True
        except vdisk.VdiskError:
            opened = False
        ops = [lambda d: d.pwrite(pattern(5, BS), 30 * BS), lambda d: d.checkpoint(), lambda d: d.snapshot("new"),
               lambda d: d.delete_snapshot("s0"), lambda d: d.resize(2 * MiB), lambda d: d.consumers.register("c"),
               lambda d: d.reset_tracking(), lambda d: d.resize(MiB // 2)]
        try:
            d = vdisk.open(img, "r+")
        except vdisk.VdiskError:
            d = None
        if d is not None:
            for op in ops:
                try:
                    op(d)
                except vdisk.VdiskError:
                    pass
                except Exception as exc:  # noqa: BLE001
                    pytest.fail(f"{field}={value}: {type(exc).__name__} (not a VdiskError): {exc}")
            try:
                d.close()
            except vdisk.VdiskError:
                pass
        if opened:
            with vdisk.open(img) as d:      # whatever was committed, a reader still opens it
                d.pread(MiB // 2, 0)
        try:
            vdisk.check(img, repair=True)
        except vdisk.VdiskError:
            pass
    assert content                              # (the base image had data)
