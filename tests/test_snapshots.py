"""Snapshots: frozen views, copy-on-write, delete, revert, exact snapshot changes."""
import os
import threading

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import initialize, invariant, precondition, rule

import vdisk
from vdisk import layout as L
from vdisk_testkit.helpers import extent_blocks, pattern
from vdisk_testkit.machines import ImageMachine

BS = 4096


# --------------------------------------------------------------------------- model test
class SnapshotMachine(ImageMachine):
    """Random writes, discards, resizes, snapshot create/delete/revert and
    reopens (the shared rules of vdisk_testkit/machines.py and the ones
    below); every snapshot's frozen content and change id held in the model
    and read back entirely after every step."""

    IMAGE = "s.vdk"

    @initialize(bs=st.sampled_from([4096, 16384]), sectors=st.integers(8, 600))
    def create(self, bs, sectors):
        self.start(bs, sectors * 512)
        self.snaps = {}        # name -> (content, change id)
        self.n = 0

    @precondition(lambda self: len(self.snaps) < 6)
    @rule(named=st.booleans())
    def take(self, named):
        self.n += 1
        snap = self.disk.snapshot(f"n{self.n}" if named else None)
        assert snap.size == len(self.model)
        assert self.disk.change_id == snap.change_id
        self.snaps[snap.name] = (bytes(self.model), snap.change_id)
        self.point(snap.change_id)
        snap.close()

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.disk.delete_snapshot(name)
        del self.snaps[name]

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def revert(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.disk.revert(name)
        self.model = bytearray(self.snaps[name][0])
        assert self.disk.size == len(self.model)

    @precondition(lambda self: self.disk is not None)
    @invariant()
    def everything_reads_back(self):
        assert self.disk.pread(self.disk.size, 0) == bytes(self.model)
        assert sorted(i.name for i in self.disk.snapshots) == sorted(self.snaps)
        for name, (content, cid) in self.snaps.items():
            with self.disk.open_snapshot(name) as snap:
                assert snap.change_id == cid
                assert snap.pread(snap.size, 0) == content


TestSnapshotModel = SnapshotMachine.TestCase
TestSnapshotModel.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- behaviour
@pytest.fixture
def disk(img):
    d = vdisk.create(img, "4MiB", block_size="4KiB")
    yield d
    if not d.closed:
        d.close()


def test_snapshot_copies_no_data(disk):
    disk.pwrite(os.urandom(64 * BS), 0)
    disk.flush()
    size_before = os.path.getsize(disk.path)
    snap = disk.snapshot("s")
    grown = os.path.getsize(disk.path) - size_before
    assert grown <= 8 * BS                      # frozen table + counters + snapshot table: metadata only
    assert snap.map() == disk.map()
    assert int(disk._refcounts[disk._table[0]]) == 2


def test_copy_on_write_and_in_place(disk):
    disk.pwrite(b"a" * BS, 0)
    disk.pwrite(b"b" * BS, BS)
    snap = disk.snapshot("s")
    p0, p1 = int(disk._table[0]), int(disk._table[1])
    disk.pwrite(b"X" * 10, 100)                 # shared: copied, the rest of the block kept
    assert int(disk._table[0]) != p0
    assert disk.pread(BS, 0) == b"a" * 100 + b"X" * 10 + b"a" * (BS - 110)
    assert snap.pread(BS, 0) == b"a" * BS
    p0b = int(disk._table[0])
    disk.pwrite(b"Y" * 10, 200)                 # now unshared: in place
    assert int(disk._table[0]) == p0b
    assert int(disk._table[1]) == p1


def test_snapshot_changes_since_exact_and_stale(disk):
    c0 = disk.checkpoint()
    disk.pwrite(b"1", 3 * BS)
    s1 = disk.snapshot("s1")
    disk.pwrite(b"2", 5 * BS)
    c2 = disk.checkpoint()
    disk.pwrite(b"3", 7 * BS)
    s2 = disk.snapshot("s2")
    disk.pwrite(b"4", 9 * BS)                   # after s2: not s2's business
    assert extent_blocks(s2.changes_since(c0), BS) == {3, 5, 7}
    assert extent_blocks(s2.changes_since(s1.change_id), BS) == {5, 7}
    assert extent_blocks(s2.changes_since(c2), BS) == {7}
    assert len(s2.changes_since(s2.change_id)) == 0
    assert extent_blocks(s1.changes_since(c0), BS) == {3}
    with pytest.raises(vdisk.StaleChangeIdError):
        s1.changes_since(c2)                    # newer than the snapshot
    with pytest.raises(vdisk.StaleChangeIdError):
        s1.changes_since(s2.change_id)
    assert s1.changes_since("*") == s1.map()


def test_revert_marks_differing_blocks_and_keeps_ids(disk):
    disk.pwrite(b"a" * 3 * BS, 0)
    c0 = disk.checkpoint()
    disk.snapshot("base")
    disk.pwrite(b"b" * BS, BS)
    disk.pwrite(b"c", 10 * BS)
    c1 = disk.checkpoint()
    gen = disk.generation
    disk.revert("base")
    assert disk.pread(3 * BS, 0) == b"a" * 3 * BS and disk.pread(1, 10 * BS) == b"\0"
    assert disk.generation == gen               # no tracking reset: every id stays valid
    assert extent_blocks(disk.changes_since(c1), BS) == {1, 10}
    assert extent_blocks(disk.changes_since(c0), BS) == {1, 10}


def test_revert_restores_size(disk):
    disk.pwrite(b"z" * 100, 4 * 1024 * 1024 - 100)
    disk.snapshot("big")
    disk.resize("1MiB")
    disk.snapshot("small")
    disk.resize("8MiB")
    assert [i.size for i in disk.snapshots] == [4 << 20, 1 << 20]
    disk.revert("big")
    assert disk.size == 4 << 20 and disk.pread(100, (4 << 20) - 100) == b"z" * 100
    disk.revert("small")
    assert disk.size == 1 << 20


def test_delete_frees_and_space_is_reused(disk):
    disk.pwrite(os.urandom(32 * BS), 0)
    disk.snapshot("s")
    disk.pwrite(os.urandom(32 * BS), 0)         # every block copied on write
    disk.flush()
    size = os.path.getsize(disk.path)
    disk.delete_snapshot("s")
    disk.pwrite(os.urandom(32 * BS), 64 * BS)   # new allocations reuse the freed blocks
    disk.flush()
    assert os.path.getsize(disk.path) == size
    disk.close()
    assert vdisk.check(disk.path).ok


def test_deleted_view_is_closed(disk):
    snap = disk.snapshot("s")
    disk.delete_snapshot("s")
    with pytest.raises(vdisk.ClosedError):
        snap.pread(10, 0)
    with pytest.raises(vdisk.SnapshotNotFoundError):
        disk.open_snapshot("s")
    with pytest.raises(vdisk.SnapshotNotFoundError):
        disk.delete_snapshot("s")
    with pytest.raises(vdisk.SnapshotNotFoundError):
        disk.revert("s")


@pytest.mark.parametrize("bad", ["", " lead", "trail ", "tab\there", "x" * 121, "é" * 61, 5])
def test_snapshot_name_rules(disk, bad):
    with pytest.raises(vdisk.VdiskError):
        disk.snapshot(bad)


def test_names_unique_and_generated(disk):
    disk.snapshot("a")
    with pytest.raises(vdisk.VdiskError, match="exists"):
        disk.snapshot("a")
    s = disk.snapshot()
    assert s.name and s.name != "a"
    assert disk.snapshot("é" * 60).name == "é" * 60       # 120 bytes of UTF-8


def test_snapshot_limit(disk, monkeypatch):
    monkeypatch.setattr(L, "MAX_SNAPSHOTS", 3)
    for i in range(3):
        disk.snapshot(f"s{i}")
    with pytest.raises(vdisk.OutOfRangeError, match="maximum"):
        disk.snapshot("one-too-many")


def test_snapshot_is_read_only_view(disk):
    snap = disk.snapshot("s")
    with pytest.raises(vdisk.ReadOnlyError):      # #17: ReadOnlyError, not AttributeError
        snap.pwrite(b"x", 0)
    assert snap.read(10) == bytes(10) and snap.tell() == 10
    assert snap.seek(0, 2) == snap.size


def test_reader_sees_frozen_content_while_writer_runs(disk):
    disk.pwrite(pattern(1, 64 * BS), 0)
    snap = disk.snapshot("frozen")
    expected = pattern(1, 64 * BS)
    stop = threading.Event()
    errors = []

    def writer():
        rng = np.random.default_rng(2)
        while not stop.is_set():
            off = int(rng.integers(0, 64)) * BS + int(rng.integers(0, 100))
            disk.pwrite(pattern(int(rng.integers(0, 1 << 30)), 3000), off)
            if rng.random() < 0.1:
                disk.flush()

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(200):
            if snap.pread(64 * BS, 0) != expected:
                errors.append("snapshot changed")
                break
    finally:
        stop.set()
        t.join()
    assert not errors
    assert disk.pread(64 * BS, 0) != expected


def test_compact_gives_space_back(disk):
    disk.pwrite(os.urandom(256 * BS), 0)
    disk.snapshot("s")
    disk.pwrite(os.urandom(256 * BS), 0)
    disk.flush()
    before = os.stat(disk.path).st_blocks
    disk.delete_snapshot("s")
    released = disk.compact()
    assert released >= 256 * BS
    assert os.stat(disk.path).st_blocks * 512 <= before * 512 - 200 * BS
    disk.close()
    assert vdisk.check(disk.path).ok


def test_snapshots_survive_reopen_and_check(img):
    with vdisk.create(img, "1MiB", block_size="4KiB") as d:
        d.pwrite(b"q" * 5000, 0)
        d.snapshot("keep")
        d.pwrite(b"r" * 5000, 0)
    res = vdisk.check(img)
    assert res.ok, res
    with vdisk.open(img) as d:
        assert d.open_snapshot("keep").pread(5000, 0) == b"q" * 5000
        assert [i.name for i in d.snapshots] == ["keep"]
        with pytest.raises(vdisk.ReadOnlyError):
            d.snapshot("x")


def test_snapshots_survive_reset_tracking(img):
    """A snapshot keeps the generation of its own tracking epoch: after
    reset_tracking (generation 1 again) the image still opens and checks."""
    with vdisk.create(img, "1MiB", block_size="4KiB") as d:
        d.pwrite(b"q" * 5000, 0)
        d.checkpoint()
        old = d.snapshot("old").change_id
        d.reset_tracking()
        d.pwrite(b"r" * 5000, 0)
        new = d.snapshot("new").change_id
    assert vdisk.check(img).ok
    with vdisk.open(img, "r+") as d:
        assert d.open_snapshot("old").pread(5000, 0) == b"q" * 5000
        assert d.open_snapshot("new").pread(5000, 0) == b"r" * 5000
        assert extent_blocks(d.open_snapshot("old").changes_since("*"), BS) == {0, 1}
        with pytest.raises(vdisk.StaleChangeIdError):
            d.changes_since(old)
        assert not d.changes_since(new)          # nothing written since the new snapshot
        d.revert("old")
        assert d.pread(5000, 0) == b"q" * 5000
    assert vdisk.check(img).ok


def test_cli_snapshot_commands(img):
    from click.testing import CliRunner
    from vdisk.cli import main
    vdisk.create(img, "1MiB").close()
    r = CliRunner().invoke(main, ["snapshot", "create", img, "first"])
    assert r.exit_code == 0 and r.output.startswith("first ")
    r = CliRunner().invoke(main, ["snapshot", "list", img, "--output", "json"])
    import json
    assert [s["name"] for s in json.loads(r.output)] == ["first"]
    assert CliRunner().invoke(main, ["snapshot", "revert", img, "first"]).exit_code == 0
    assert CliRunner().invoke(main, ["snapshot", "delete", img, "first"]).exit_code == 0
    r = CliRunner().invoke(main, ["snapshot", "delete", img, "first"])
    assert r.exit_code == 1
    assert CliRunner().invoke(main, ["compact", img]).exit_code == 0


# ---------------------------------------------------------------------------- Snapshot as a file (#17)
def test_snapshot_is_a_read_only_raw_file(disk):
    """A Snapshot is an io.RawIOBase: BufferedReader and copyfileobj take it, and
    every write path raises ReadOnlyError (a VdiskError) as a Disk opened "r" does
    (before: AttributeError on write, not an io object)."""
    import io
    import shutil
    disk.pwrite(pattern(1, 3 * BS), BS)
    snap = disk.snapshot("s")
    disk.pwrite(b"\xff" * BS, BS)              # the live disk moves on; the snapshot does not
    assert isinstance(snap, io.RawIOBase)
    assert snap.readable() and snap.seekable() and not snap.writable()
    expect = bytes(BS) + pattern(1, 3 * BS) + bytes(disk.size - 4 * BS)
    buffered = io.BufferedReader(snap, 8192)        # which closes snap when it is closed or collected
    assert buffered.read() == expect
    buffered.seek(0)
    out = io.BytesIO()
    shutil.copyfileobj(buffered, out)
    assert out.getvalue() == expect
    for attempt in (lambda: snap.write(b"x"), lambda: snap.pwrite(b"x", 0),
                    lambda: snap.truncate(0), lambda: snap.discard(0, BS)):
        with pytest.raises(vdisk.ReadOnlyError, match="read-only"):
            attempt()
    assert snap.pread(BS, BS) == pattern(1, 3 * BS)[:BS]     # nothing was written
    snap.close()
    assert snap.closed
    with pytest.raises(vdisk.ClosedError):
        snap.read(1)


def test_snapshot_closes_with_its_context_and_a_closed_one_refuses_with(disk):
    with disk.snapshot("s") as snap:
        assert snap.read(4) == bytes(4)
    assert snap.closed
    with pytest.raises(vdisk.ClosedError):
        with snap:
            pass


@pytest.mark.parametrize("block_size", [4096, 65536])
def test_snapshot_reads_through_the_hot_path_agree_with_the_python_path(tmp_path, block_size):
    """A snapshot's pread/preadinto run in Cython through its frozen table (HotPath.read_through,
    pread_through); every range, across holes, blocks rewritten after the snapshot (copy-on-write)
    and physically discontiguous runs, reads what the Python plan reads and what was written."""
    rng = np.random.default_rng(block_size)
    size = 64 * block_size
    with vdisk.create(str(tmp_path / "hp.vdk"), size, block_size=block_size) as d:
        model = bytearray(size)
        for _ in range(40):                            # scattered writes: discontiguous physical runs
            off, n = int(rng.integers(0, size - 3 * block_size)), int(rng.integers(1, 3 * block_size))
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            d.pwrite(data, off)
            model[off:off + n] = data
        d.discard(8 * block_size, 4 * block_size)
        model[8 * block_size:12 * block_size] = bytes(4 * block_size)
        snap = d.snapshot("s")
        d.pwrite(b"\xee" * (5 * block_size), block_size // 2)   # live only
        for _ in range(200):
            off = int(rng.integers(0, size))
            n = int(rng.integers(0, size - off + 1))
            want = bytes(model[off:off + n])
            assert snap.pread(n, off) == want
            buf = bytearray(n)
            assert snap.preadinto(buf, off) == n and buf == want
            assert d._hot.pread_through(snap._table_mv, n, off) == want     # the Cython path did it
            python = bytearray(n)
            d._read_plan(memoryview(python), d._plan_read(off, n, snap._table_mv))
            assert python == want
        with pytest.raises(vdisk.OutOfRangeError):
            snap.pread(2, size - 1)
        assert d._hot.pread_through(snap._table_mv, 2 * block_size, size - block_size) is None   # past the table
