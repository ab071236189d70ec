"""A lost header commit of an operation that moves a metadata region (issue #13).

Each test builds a history by hand: an operation whose commit names a new
region (counters, live table, snapshot table, refcounts) and releases the
old one, then writes that reuse whatever blocks were released, then a clean
close; the newest header slot is damaged (the image opens at the slot
before) and ``check --repair`` runs.  The slot before must not name
anything that was reused (docs/FORMAT.md, "Write order"): check finds no
corruption but lost generations, the data written is all there, and every
id handed out is refused or answered with every block that changed.
"""
import os

import vdisk
from vdisk.disk import Disk
from vdisk.fileio import FileIO

from vdisk_testkit import repairsim
from vdisk_testkit.helpers import differing_blocks, extent_blocks

BS = 4096
ONES = b"\x01\0\0\0" * (BS // 4)    # read as counters: generation 1; as a table: physical block 1


def _reuse(d, first_block: int, n: int, data: bytes = ONES) -> None:
    """Write n new blocks of data from first_block on: they take the blocks the last flush released."""
    for b in range(first_block, first_block + n):
        d.pwrite(data, b * BS)
    d.flush()


def _lose_newest_and_repair(path: str) -> list:
    """Damage the newest valid slot; the corruptions check finds then (but lost generations); repair."""
    off = vdisk.layout.SLOT_OFFSETS[repairsim.newest_slot(path)] + 20
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ 0x10]))
    found = [c for c in vdisk.check(path).corruptions if "is newer than generation" not in c]
    res = vdisk.check(path, repair=True)
    assert not res.corruptions, res.corruptions
    return found


def _assert_ids(path: str, issued: dict, expect: bytes) -> None:
    with vdisk.open(path) as d:
        now = d.pread(d.size, 0)     # a lost resize commit takes the size back, never data inside it
        assert now == expect[:len(now)], "data written before the lost commit (and flushed) is gone"
        for cid, then in issued.items():
            try:
                got = extent_blocks(d.changes_since(cid), BS)
            except vdisk.StaleChangeIdError:
                continue
            missing = differing_blocks(now, then, BS) - got
            assert not missing, f"{cid} misses changed blocks {sorted(missing)}"


def test_lost_reset_tracking_commit(tmp_path):
    path = str(tmp_path / "r.vdk")
    d = vdisk.create(path, 16 * BS, block_size=BS)
    for b in range(4):
        d.pwrite(bytes([b + 1]) * BS, b * BS)
    issued = {d.checkpoint(): d.pread(d.size, 0)}
    d.reset_tracking()          # the old epoch's counter region released
    _reuse(d, 8, 4)             # ... and reused for data: counters "1" if the old epoch comes back
    expect = d.pread(d.size, 0)
    d.close()
    split = repairsim.layouts_differ(path)
    found = _lose_newest_and_repair(path)
    assert not found, found
    _assert_ids(path, issued, expect)
    assert not split, "the older header slot names released regions"


def test_lost_revert_commit(tmp_path):
    path = str(tmp_path / "r.vdk")
    d = vdisk.create(path, 16 * BS, block_size=BS)
    for b in range(4):
        d.pwrite(bytes([b + 1]) * BS, b * BS)
    issued = {d.checkpoint(): d.pread(d.size, 0)}
    snap = d.snapshot("s")
    issued[snap.change_id] = d.pread(d.size, 0)
    snap.close()
    d.pwrite(b"\x77" * BS, 5 * BS)
    d.revert("s")               # the old live table released
    zeros_then_ones = bytes(64) + ONES[64:]     # as a table: blocks 0-15 unmapped, entries past the end set
    _reuse(d, 8, 4, zeros_then_ones)
    expect = d.pread(d.size, 0)
    d.close()
    split = repairsim.layouts_differ(path)
    found = _lose_newest_and_repair(path)
    assert not found, found
    _assert_ids(path, issued, expect)
    assert not split, "the older header slot names released regions"


def test_lost_delete_snapshot_commit(tmp_path):
    path = str(tmp_path / "r.vdk")
    d = vdisk.create(path, 16 * BS, block_size=BS)
    for b in range(4):
        d.pwrite(bytes([b + 1]) * BS, b * BS)
    snap = d.snapshot("s")
    issued = {snap.change_id: d.pread(d.size, 0)}
    frozen = snap.pread(snap.size, 0)
    snap.close()
    for b in range(4):          # copy-on-write: the old blocks are the snapshot's only
        d.pwrite(bytes([b + 0x41]) * BS, b * BS)
    d.flush()
    d.delete_snapshot("s")      # its table, counters, record and blocks released
    _reuse(d, 8, 8)
    expect = d.pread(d.size, 0)
    d.close()
    split = repairsim.layouts_differ(path)
    found = _lose_newest_and_repair(path)
    assert not found, found
    _assert_ids(path, issued, expect)
    assert not split, "the older header slot names released regions"
    with vdisk.open(path) as d:     # the snapshot, if the surviving header still has it, is intact
        for info in d.snapshots:
            with d.open_snapshot(info.name) as s:
                assert s.pread(s.size, 0) == frozen


def test_lost_table_growth_commit(tmp_path):
    path = str(tmp_path / "r.vdk")
    d = vdisk.create(path, 16 * BS, block_size=BS)
    for b in range(4):
        d.pwrite(bytes([b + 1]) * BS, b * BS)
    issued = {d.checkpoint(): d.pread(d.size, 0)}
    cap = d._hdr.table_capacity
    d.resize((cap + 8) * BS)    # a new table and counter region; the old ones released
    _reuse(d, 8, 4)
    expect = d.pread(d.size, 0)
    d.close()
    split = repairsim.layouts_differ(path)
    found = _lose_newest_and_repair(path)
    assert not found, found
    _assert_ids(path, issued, expect)
    assert not split, "the older header slot names released regions"


def test_lost_refcount_growth_commit(tmp_path):
    path = str(tmp_path / "r.vdk")
    n = 1024
    d = vdisk.create(path, n * BS, block_size=BS)
    d.pwrite(os.urandom(n * BS), 0)
    issued = {d.checkpoint(): d.pread(d.size, 0)}
    snap = d.snapshot("s")
    issued[snap.change_id] = d.pread(d.size, 0)
    snap.close()
    cap = d._hdr.refcount_capacity
    d.pwrite(os.urandom(n * BS), 0)     # copy-on-write past the refcount table's capacity: it moves
    assert d._hdr.refcount_capacity > cap
    d.flush()                   # the old refcount region released
    d.discard(0, 4 * BS)
    d.flush()
    _reuse(d, 0, 4)             # the lowest free block first: the old refcount region's
    expect = d.pread(d.size, 0)
    d.close()
    split = repairsim.layouts_differ(path)
    found = _lose_newest_and_repair(path)
    assert not found, found
    _assert_ids(path, issued, expect)
    assert not split, "the older header slot names released regions"


def test_repair_leaves_no_slot_naming_what_it_frees(tmp_path):
    """Repair drops a damaged consumer table and frees its blocks: the other
    header slot, which still named it, gets the repaired header first."""
    path = str(tmp_path / "r.vdk")
    d = vdisk.create(path, 16 * BS, block_size=BS)
    d.pwrite(b"\x01" * BS, 0)
    d.consumers.register("nightly", d.checkpoint())
    off = d._hdr.consumer_offset
    d.close()
    with open(path, "r+b") as f:
        f.seek(off + 3)
        f.write(b"\xee")
    res = vdisk.check(path, repair=True)
    assert res.repaired and not res.corruptions
    assert not repairsim.layouts_differ(path), "a header slot still names the consumer table repair freed"


class _CountingIO(FileIO):
    fsyncs = 0

    def fsync(self) -> None:
        _CountingIO.fsyncs += 1
        super().fsync()


def _write_flush_loop(d, rounds: int = 20) -> tuple[int, int]:
    """Overwrites, copy-on-write of shared blocks, discards, each round flushed: (fsyncs, commits)."""
    f0, s0 = _CountingIO.fsyncs, d._hdr.sequence
    for r in range(rounds):
        d.pwrite(bytes([r + 1]) * 100, 0)              # in place
        d.pwrite(bytes([r + 2]) * BS, (1 + r % 4) * BS)  # copy-on-write away from the snapshot's block
        d.discard((5 + r % 4) * BS, BS)                 # a reference released
        d.pwrite(bytes([r + 3]) * BS, (5 + r % 4) * BS)
        d.flush()
    return _CountingIO.fsyncs - f0, d._hdr.sequence - s0


def test_rule_costs_one_commit_per_region_move_not_per_flush(tmp_path):
    """The extra commit comes once after a commit that moved a region, never
    in the write + flush loop: the loop's fsyncs are those of the same loop
    on the image reopened (both slots the same header: nothing to settle)."""
    path = str(tmp_path / "r.vdk")
    d = vdisk.create(path, 16 * BS, block_size=BS, io_factory=_CountingIO)
    for b in range(12):
        d.pwrite(bytes([b + 1]) * BS, b * BS)
    d.snapshot("s").close()     # the first snapshot table: the older slot names none
    seq = d._hdr.sequence
    d.pwrite(b"\x09" * BS, BS)  # copy-on-write: a reference to release at the flush
    d.flush()
    assert d._hdr.sequence == seq + 1, "the first release after the move commits once more"
    assert not repairsim.layouts_differ(path)
    after_move = _write_flush_loop(d)
    d.close()
    with vdisk.open(path, "r+", io_factory=_CountingIO) as d:
        settled = _write_flush_loop(d)
    assert after_move[1] == 0 and settled[1] == 0, "a header commit in the write + flush loop"
    assert after_move[0] == settled[0]


def test_repair_distrusts_counters_reused_as_data(tmp_path, monkeypatch):
    """An image written before the rule (the second commit left out): the older
    slot names the counter region reset_tracking released, and data reused it.
    After the newest slot is lost, repair must not trust those counters: a new
    tracking epoch, every id stale."""
    monkeypatch.setattr(Disk, "_commit_again", lambda self: None)
    path = str(tmp_path / "r.vdk")
    d = vdisk.create(path, 16 * BS, block_size=BS)
    for b in range(4):
        d.pwrite(bytes([b + 1]) * BS, b * BS)
    cid = d.checkpoint()
    issued = {cid: d.pread(d.size, 0)}
    d.reset_tracking()
    _reuse(d, 8, 4)             # counters "1" for the old epoch, in blocks the table maps
    d.close()
    monkeypatch.undo()
    assert repairsim.layouts_differ(path)
    off = vdisk.layout.SLOT_OFFSETS[repairsim.newest_slot(path)] + 20
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ 0x10]))
    found = vdisk.check(path).corruptions
    assert any("change counters share" in c for c in found), found
    res = vdisk.check(path, repair=True)
    assert not res.corruptions, res.corruptions
    with vdisk.open(path) as d:
        now = d.pread(d.size, 0)
        try:
            got = extent_blocks(d.changes_since(cid), BS)
        except vdisk.StaleChangeIdError:
            got = None
        assert got is None or not differing_blocks(now, issued[cid], BS) - got
    assert not repairsim.layouts_differ(path)
