"""Copies of an image must not pass for each other (issue #12), and a lost
header commit must not make tracking under-report (issue #13).

Every test here failed on the code before the checkpoint log: ids were
"<tracking-uuid>/<generation>", the same strings on every copy of an image.
"""
from __future__ import annotations

import importlib
import os
import shutil
import struct

import pytest
from click.testing import CliRunner

import vdisk
from vdisk import layout as L
from vdisk.cli import main
from vdisk_testkit.helpers import differing_blocks, extent_blocks, pattern, read_all

BS = 4096
SIZE = 16 * BS
LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy-v1.vdk")
# tests/data/make_legacy_v1.py made it (vdisk at cabe396): its ids, and the writes (block, seed, generation)
LEGACY_IDS = ["d102f774-9bb0-4cc0-9e30-aeb8f6e16a23/1", "d102f774-9bb0-4cc0-9e30-aeb8f6e16a23/2",
              "d102f774-9bb0-4cc0-9e30-aeb8f6e16a23/3"]
LEGACY_WRITES = [(0, 1, 1), (3, 2, 1), (5, 3, 2), (0, 4, 3), (7, 5, 4)]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code != 0, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: error: "), result.stderr
    return lines[0]


def make_image(path) -> str:
    """An image with one closed generation and data in blocks 0 and 3."""
    with vdisk.create(path, SIZE, block_size=BS) as d:
        d.pwrite(pattern(1, BS), 0)
        d.pwrite(pattern(2, BS), 3 * BS)
        return d.checkpoint()


def copies(tmp_path):
    img = tmp_path / "img.vdk"
    make_image(img)
    a, b = tmp_path / "A.vdk", tmp_path / "B.vdk"
    shutil.copyfile(img, a)
    shutil.copyfile(img, b)
    return a, b


# ============================================================================ two copies diverge
def test_diverged_copies_api(tmp_path):
    """cp img A; cp img B; A is written and backed up in full (id F); B
    checkpoints and is written: B refuses F, and a chain of A's full and B's
    delta is refused by restore and merge, naming both deltas."""
    a, b = copies(tmp_path)
    with vdisk.open(a, "r+") as d:
        d.pwrite(pattern(10, BS), BS)
    full_a = vdisk.backup(str(a), str(tmp_path / "A0.h5"))
    with vdisk.open(b, "r+") as d:
        own = d.checkpoint()
        d.pwrite(pattern(20, BS), 2 * BS)
        assert own != full_a.change_id
        with pytest.raises(vdisk.StaleChangeIdError, match="did not issue it"):
            d.changes_since(full_a.change_id)
    with pytest.raises(vdisk.StaleChangeIdError):
        vdisk.backup(str(b), str(tmp_path / "B1.h5"), since=full_a.change_id)
    assert not os.path.exists(tmp_path / "B1.h5")
    # B's own delta is fine, but it does not go on top of A's full backup
    vdisk.backup(str(b), str(tmp_path / "B1.h5"), since=own)
    chain = [str(tmp_path / "A0.h5"), str(tmp_path / "B1.h5")]
    with pytest.raises(vdisk.BackupChainError) as ei:
        vdisk.restore(chain, str(tmp_path / "T.vdk"))
    assert "diverged copies" in str(ei.value) and chain[0] in str(ei.value) and chain[1] in str(ei.value)
    assert not os.path.exists(tmp_path / "T.vdk")
    with pytest.raises(vdisk.BackupChainError, match="diverged copies"):
        vdisk.merge(chain, str(tmp_path / "M.h5"))
    assert not os.path.exists(tmp_path / "M.h5")
    with pytest.raises(vdisk.BackupChainError, match="diverged copies"):
        vdisk.verify_chain(chain)
    assert [s["change_id"] for s in vdisk.verify_chain(chain[:1])] == [full_a.change_id]
    # and the other way round: A refuses B's id
    with vdisk.open(a) as d:
        with pytest.raises(vdisk.StaleChangeIdError):
            d.changes_since(own)


def test_diverged_copies_cli(tmp_path):
    a, b = copies(tmp_path)
    with vdisk.open(a, "r+") as d:
        d.pwrite(pattern(10, BS), BS)
    r = run("backup", a, tmp_path / "A0.h5")
    assert r.exit_code == 0, r.stderr
    f = r.stdout.strip()
    r = run("checkpoint", b)
    assert r.exit_code == 0, r.stderr
    own = r.stdout.strip()
    with vdisk.open(b, "r+") as d:
        d.pwrite(pattern(20, BS), 2 * BS)
    line = one_error_line(run("backup", b, tmp_path / "B1.h5", "--since", f))
    assert "did not issue" in line
    assert not os.path.exists(tmp_path / "B1.h5")
    assert run("backup", b, tmp_path / "B1.h5", "--since", own).exit_code == 0
    line = one_error_line(run("restore", tmp_path / "T.vdk", tmp_path / "A0.h5", tmp_path / "B1.h5"))
    assert "diverged copies" in line and "A0.h5" in line and "B1.h5" in line
    assert not os.path.exists(tmp_path / "T.vdk")
    line = one_error_line(run("merge", tmp_path / "M.h5", tmp_path / "A0.h5", tmp_path / "B1.h5"))
    assert "diverged copies" in line
    line = one_error_line(run("verify", "--chain", tmp_path / "A0.h5", tmp_path / "B1.h5"))
    assert "diverged copies" in line and "A0.h5" in line and "B1.h5" in line
    assert run("verify", tmp_path / "A0.h5", tmp_path / "B1.h5").exit_code == 0     # each file is sound
    assert not os.path.exists(tmp_path / "M.h5")


def test_ids_from_before_the_copy_stay_valid_on_both(tmp_path):
    """Up to the copy the copies share their history: an id from then is
    answered by both, and correctly."""
    img = tmp_path / "img.vdk"
    before = make_image(img)
    with vdisk.open(img) as d:
        then = read_all(d)
    a, b = tmp_path / "A.vdk", tmp_path / "B.vdk"
    shutil.copyfile(img, a)
    shutil.copyfile(img, b)
    for path, block in ((a, 1), (b, 2)):
        with vdisk.open(path, "r+") as d:
            d.pwrite(pattern(block, BS), block * BS)
            d.checkpoint()
            assert extent_blocks(d.changes_since(before), BS) == differing_blocks(read_all(d), then, BS) == {block}


def test_copy_of_an_open_image_diverges_too(tmp_path):
    """A copy taken while a writer holds the image (a crash-consistent copy)
    behaves like any copy: its next checkpoint draws its own token."""
    img = tmp_path / "img.vdk"
    make_image(img)
    with vdisk.open(img, "r+") as d:
        d.pwrite(pattern(5, BS), 5 * BS)
        d.flush()
        shutil.copyfile(img, tmp_path / "C.vdk")
        mine = d.checkpoint()
    with vdisk.open(tmp_path / "C.vdk", "r+") as c:
        theirs = c.checkpoint()
        with pytest.raises(vdisk.StaleChangeIdError):
            c.changes_since(mine)
    assert mine.rsplit(".", 1)[0] == theirs.rsplit(".", 1)[0] and mine != theirs


# ============================================================================ a file put back
def put_back_case(tmp_path):
    img = tmp_path / "img.vdk"
    make_image(img)
    shutil.copyfile(img, tmp_path / "old.vdk")             # a file-level backup of the image
    with vdisk.open(img, "r+") as d:
        d.pwrite(pattern(7, BS), 1 * BS)
        newer = d.checkpoint()                             # a consumer backs up here
        held = read_all(d)
    shutil.copyfile(tmp_path / "old.vdk", img)             # the older file is put back
    return img, newer, held


def test_put_back_file_does_not_reissue_ids_api(tmp_path):
    img, newer, held = put_back_case(tmp_path)
    with vdisk.open(img, "r+") as d:
        d.pwrite(pattern(8, BS), 6 * BS)
        again = d.checkpoint()                             # the same generation as `newer`
        assert again != newer
        try:
            changed = extent_blocks(d.changes_since(newer), BS)
        except vdisk.StaleChangeIdError:
            changed = None
        else:       # answered: it must name every block that differs from the consumer's copy
            assert differing_blocks(read_all(d), held, BS) <= changed
        assert changed is None
    with pytest.raises(vdisk.StaleChangeIdError):
        vdisk.backup(str(img), str(tmp_path / "i.h5"), since=newer)
    assert not os.path.exists(tmp_path / "i.h5")


def test_put_back_file_does_not_reissue_ids_cli(tmp_path):
    img, newer, _held = put_back_case(tmp_path)
    r = run("checkpoint", img)
    assert r.exit_code == 0 and r.stdout.strip() != newer
    one_error_line(run("changes", img, "--since", newer))
    one_error_line(run("backup", img, tmp_path / "i.h5", "--since", newer))
    assert not os.path.exists(tmp_path / "i.h5")


def test_crash_before_the_commit_never_reissues(tmp_path):
    """A checkpoint whose header commit did not happen wrote its token; the
    next checkpoint of that generation draws another."""
    img = tmp_path / "img.vdk"
    make_image(img)
    with vdisk.open(img, "r+") as d:
        g = d.generation
        d._issue_token()          # what a checkpoint does before its commit
        d._io.fsync()
        lost = d._log.token(g)
    with vdisk.open(img, "r+") as d:
        assert d.generation == g
        cid = d.checkpoint()
        assert int(cid.rsplit(".", 1)[1], 16) != lost


# ============================================================================ lost header commit (#13)
def newest_slot(path) -> int:
    raw = open(path, "rb").read(2 * L.SLOT_SIZE)
    seqs = [struct.unpack_from("<Q", raw, i * L.SLOT_SIZE + L.FIELD_OFFSETS["sequence"])[0] for i in (0, 1)]
    return max((0, 1), key=lambda i: seqs[i])


def flip_newest_header_byte(path) -> None:
    off = L.SLOT_OFFSETS[newest_slot(path)] + L.FIELD_OFFSETS["created_ns"]
    with open(path, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0x40]))


def test_repair_after_lost_commit_moves_generation_never_lowers_counters(tmp_path):
    """checkpoint t1, write B, checkpoint t2 (a consumer backs up), write C,
    close; the newest header slot is damaged.  Repair must not clamp C's
    counter: t2 is then stale, or answered with C's block."""
    img = tmp_path / "img.vdk"
    with vdisk.create(img, SIZE, block_size=BS) as d:
        t1 = d.checkpoint()
        d.pwrite(pattern(1, BS), 1 * BS)         # B
        t2 = d.checkpoint()
        at_t2 = read_all(d)
        d.pwrite(pattern(2, BS), 2 * BS)         # C
    flip_newest_header_byte(img)
    res = vdisk.check(img)
    assert any("block 2: change counter 3 is newer than generation 2" in c for c in res.corruptions)
    res = vdisk.check(img, repair=True)
    assert res.ok, res.corruptions
    with vdisk.open(img, "r+") as d:
        now = read_all(d)
        new = d.checkpoint()
        assert new != t2 and new != t1
        for cid, then in ((t2, at_t2),):
            try:
                got = extent_blocks(d.changes_since(cid), BS)
            except vdisk.StaleChangeIdError:
                continue
            assert differing_blocks(now, then, BS) <= got
        assert extent_blocks(d.changes_since(t1), BS) == {1, 2}
        assert d._tracker.counters[2] == 3       # never lowered
        d.pwrite(pattern(3, BS), 4 * BS)
        assert extent_blocks(d.changes_since(new), BS) == {4}


def test_repair_past_the_generation_limit_starts_a_new_epoch(tmp_path):
    img = tmp_path / "img.vdk"
    with vdisk.create(img, SIZE, block_size=BS) as d:
        t1 = d.checkpoint()
        d.pwrite(pattern(1, BS), 1 * BS)
        d.flush()
        off = d._hdr.counter_offset + 4 * 1
    with open(img, "r+b") as f:               # a counter at the limit: no generation can move past it
        f.seek(off)
        f.write(struct.pack("<I", L.MAX_GENERATION))
    assert not vdisk.check(img).ok
    assert vdisk.check(img, repair=True).ok
    with vdisk.open(img, "r+") as d:
        with pytest.raises(vdisk.StaleChangeIdError):
            d.changes_since(t1)
        assert d.generation == 1
        assert not d._tracker.counters[:d._hdr.nblocks].any()


# ============================================================================ legacy images
def legacy_copy(tmp_path, name="old.vdk"):
    path = tmp_path / name
    shutil.copyfile(LEGACY, path)
    return path


def legacy_content(upto_generation: int) -> bytes:
    """The legacy image's content at the end of a generation."""
    buf = bytearray(SIZE)
    for block, seed, gen in LEGACY_WRITES:
        if gen <= upto_generation:
            buf[block * BS:(block + 1) * BS] = pattern(seed, BS)
    return bytes(buf)


def test_legacy_image_opens_and_its_ids_keep_working(tmp_path):
    path = legacy_copy(tmp_path)
    for mode in ("r", "r+"):
        with vdisk.open(path, mode) as d:
            assert not d._hdr.has_log
            now = read_all(d)
            assert now == legacy_content(4)
            for g, cid in enumerate(LEGACY_IDS, start=1):
                assert extent_blocks(d.changes_since(cid), BS) == differing_blocks(now, legacy_content(g), BS)
            assert d.consumers.last_id("nightly") == LEGACY_IDS[1]
            assert d.snapshots[0].change_id == LEGACY_IDS[2]
    assert vdisk.check(path).ok
    with open(path, "rb") as f, open(LEGACY, "rb") as g:
        assert f.read() == g.read()            # opening (writable too) changed nothing


def test_legacy_image_gets_the_log_at_its_first_close_of_a_generation(tmp_path):
    """The first checkpoint adds the log in the same commit; ids issued before
    (tokenless, below legacy_generation) stay valid; the tokenless string of
    the generation just closed is not an id of this image."""
    path = legacy_copy(tmp_path)
    with vdisk.open(path, "r+") as d:
        g = d.generation
        cid = d.checkpoint()
        assert d._hdr.has_log and d._hdr.legacy_generation == g
        assert cid.startswith(LEGACY_IDS[0].split("/")[0] + f"/{g}.")
        with pytest.raises(vdisk.StaleChangeIdError, match="no checkpoint token"):
            d.changes_since(cid.rsplit(".", 1)[0])
        now = read_all(d)
        for k, old in enumerate(LEGACY_IDS, start=1):
            assert extent_blocks(d.changes_since(old), BS) == differing_blocks(now, legacy_content(k), BS)
        assert d.consumers.last_id("nightly") == LEGACY_IDS[1]
        with d.open_snapshot("snap") as s:
            assert extent_blocks(s.changes_since(LEGACY_IDS[0]), BS) == {0, 5}
    res = vdisk.check(path)
    assert res.ok, res.corruptions


def test_copies_of_a_legacy_image_diverge_after_upgrade(tmp_path):
    a, b = legacy_copy(tmp_path, "A.vdk"), legacy_copy(tmp_path, "B.vdk")
    with vdisk.open(a, "r+") as d:
        d.pwrite(pattern(9, BS), 9 * BS)
        ida = d.checkpoint()
    with vdisk.open(b, "r+") as d:
        idb = d.checkpoint()
        with pytest.raises(vdisk.StaleChangeIdError):
            d.changes_since(ida)
        assert extent_blocks(d.changes_since(LEGACY_IDS[2]), BS) == {7}
    with vdisk.open(a) as d:
        with pytest.raises(vdisk.StaleChangeIdError):
            d.changes_since(idb)


def test_new_ids_refused_by_a_legacy_image(tmp_path):
    """A tokened id on an image without a log (an older copy of an upgraded file) is stale."""
    a, b = legacy_copy(tmp_path, "A.vdk"), legacy_copy(tmp_path, "B.vdk")
    with vdisk.open(a, "r+") as d:
        ida = d.checkpoint()
    with vdisk.open(b) as d:
        with pytest.raises(vdisk.StaleChangeIdError):
            d.changes_since(ida)
        with pytest.raises(vdisk.StaleChangeIdError, match="no checkpoint log"):
            d.changes_since(LEGACY_IDS[1] + ".0123456789abcdef")


# ============================================================================ the log's reach
def test_ids_older_than_the_ring_are_stale(tmp_path):
    img = tmp_path / "img.vdk"
    with vdisk.create(img, SIZE, block_size=BS) as d:
        cap = d._hdr.log_capacity
        first = d.checkpoint()
        d._log.write(d.generation + cap - 1, 1)   # as if cap more checkpoints had wrapped the ring ...
        d._hdr.generation += cap
        d._commit_header()
        with pytest.raises(vdisk.StaleChangeIdError, match="checkpoint log reaches"):
            d.changes_since(first)


def test_log_damage_is_found_and_repaired(tmp_path):
    img = tmp_path / "img.vdk"
    with vdisk.create(img, SIZE, block_size=BS) as d:
        cid = d.checkpoint()
        off = d._hdr.log_offset + 5 * L.LOG_ENTRY_SIZE
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<QQ", 7, 99))     # generation 7 does not belong in slot 5
    res = vdisk.check(img)
    assert any("checkpoint log entry 5" in c for c in res.corruptions)
    assert vdisk.check(img, repair=True).ok
    with vdisk.open(img) as d:
        assert d.changes_since(cid) == vdisk.Extents([])


# ============================================================================ clone
def build_with_snapshots(path):
    """An image with two snapshots at different sizes, shared blocks, a consumer."""
    with vdisk.create(path, SIZE, block_size=BS) as d:
        d.pwrite(pattern(1, 3 * BS), 0)
        d.consumers.register("nightly", d.checkpoint())
        d.snapshot("one")
        d.pwrite(pattern(2, BS), BS)
        d.resize(SIZE + BS + 512)
        d.pwrite(pattern(3, BS + 512), SIZE)
        d.snapshot("two")
        d.discard(0, BS)
        d.resize(SIZE - 3 * BS + 1024)
        d.pwrite(pattern(4, 100), 5 * BS)
        return {s.name: s.change_id for s in d.snapshots}, d.change_id


@pytest.mark.parametrize("with_snapshots", [False, True])
def test_clone_has_new_identity_and_same_content(tmp_path, with_snapshots):
    src, dst = tmp_path / "src.vdk", tmp_path / "dst.vdk"
    snap_ids, last = build_with_snapshots(src)
    res = vdisk.clone(src, dst, snapshots=with_snapshots)
    with vdisk.open(src) as s, vdisk.open(dst) as c:
        assert read_all(c) == read_all(s) and c.size == s.size and c.block_size == s.block_size
        assert c.uuid != s.uuid and c.tracking_id != s.tracking_id and str(c.uuid) == res["uuid"]
        assert len(c.consumers) == 0
        for cid in list(snap_ids.values()) + [last]:
            with pytest.raises(vdisk.StaleChangeIdError):
                c.changes_since(cid)
        if with_snapshots:
            assert [x.name for x in c.snapshots] == ["one", "two"]
            for name in ("one", "two"):
                with s.open_snapshot(name) as a, c.open_snapshot(name) as b:
                    assert a.size == b.size and a.pread(a.size, 0) == b.pread(b.size, 0)
                    assert a.change_id != b.change_id
            # shared blocks stay shared: no more data blocks than the source holds
            assert c.info()["allocated_blocks"] == s.info()["allocated_blocks"]
            assert vdisk.check(dst).leaked_blocks == 0
        else:
            assert c.snapshots == []
        assert c.map() == s.map()
    assert vdisk.check(dst).ok


def test_clone_refuses_existing_and_leaves_nothing_on_error(tmp_path, monkeypatch):
    src, dst = tmp_path / "src.vdk", tmp_path / "dst.vdk"
    build_with_snapshots(src)
    dst.write_bytes(b"keep")
    with pytest.raises(vdisk.InvalidArgumentError, match="exists"):
        vdisk.clone(src, dst)
    assert dst.read_bytes() == b"keep"
    C = importlib.import_module("vdisk.clone")

    def boom(*a, **k):
        raise OSError(5, "injected")
    monkeypatch.setattr(C, "_write_state", boom)
    with pytest.raises(OSError, match="injected"):
        vdisk.clone(src, dst, overwrite=True)
    assert dst.read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["dst.vdk", "src.vdk"]


def test_clone_cli(tmp_path):
    src, dst = tmp_path / "src.vdk", tmp_path / "dst.vdk"
    build_with_snapshots(src)
    r = run("clone", src, dst, "--snapshots")
    assert r.exit_code == 0, r.stderr
    assert "new identity" in r.stdout and "2 snapshots" in r.stdout
    one_error_line(run("clone", src, dst))
    assert run("clone", src, dst, "--overwrite").exit_code == 0
    with vdisk.open(dst) as c:
        assert c.snapshots == []
    r = run("convert", "--help")
    assert "new identity" in r.stdout


@pytest.mark.parametrize("written_after", [False, True])
def test_lost_shrink_commit_reports_the_cut_blocks(tmp_path, written_after):
    """A shrink commits after unmapping the blocks past the new end; if that
    commit is lost later, the image is back at the old size with those blocks
    reading zeros: their counters must say so, also when a writer reopened
    the shrunk image and rewrote the counter page they share with the last
    blocks (both found by tools/campaign_repair.py)."""
    img = tmp_path / "img.vdk"
    with vdisk.create(img, SIZE, block_size=BS) as d:
        d.pwrite(pattern(1, SIZE), 0)
        cid = d.checkpoint()
        then = read_all(d)
        d.resize(SIZE - 4 * BS)
    if written_after:
        with vdisk.open(img, "r+") as d:
            d.pwrite(pattern(2, BS), 0)
    flip_newest_header_byte(img)
    vdisk.check(img, repair=True)
    with vdisk.open(img) as d:
        assert d.size == SIZE
        now = read_all(d)
        assert differing_blocks(now, then, BS) == {12, 13, 14, 15} | ({0} if written_after else set())
        assert differing_blocks(now, then, BS) <= extent_blocks(d.changes_since(cid), BS)
