"""Named backup consumers stored in the image (vdisk/consumers.py)."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest

import vdisk
from vdisk import layout as L
from vdisk.testing import RecordingIO
from vdisk_testkit.helpers import blocks_of, extent_blocks, pattern, read_all

BS = 4096
SIZE = 1 << 20


@pytest.fixture
def img(tmp_path):
    path = str(tmp_path / "c.vdk")
    vdisk.create(path, SIZE, block_size=BS).close()
    return path


def assert_clean(path):
    res = vdisk.check(path)
    assert res.ok, res


# ---------------------------------------------------------------------------- the table
def test_register_update_forget_persist(img):
    with vdisk.open(img, "r+") as d:
        assert len(d.consumers) == 0 and "a" not in d.consumers
        info = d.consumers.register("a")
        assert info.name == "a" and info.change_id is None and info.generation == 0
        d.consumers.register("b")
        d.pwrite(b"x" * BS, 0)
        cid = d.checkpoint()
        info = d.consumers.update("a", cid)
        assert info.change_id == cid and info.updated >= info.created
        assert list(d.consumers) == ["a", "b"] and len(d.consumers) == 2
    assert_clean(img)
    with vdisk.open(img) as d:                              # read-only opens see them too
        assert d.consumers["a"].change_id == cid
        assert d.consumers.last_id("b") is None
        assert [i.name for i in d.consumers.values()] == ["a", "b"]
        assert d.info()["consumers"] == [{"name": "a", "change_id": cid}, {"name": "b", "change_id": None}]
    with vdisk.open(img, "r+") as d:
        d.consumers.forget("a")
        assert list(d.consumers) == ["b"]
        d.consumers.forget("b")
        assert len(d.consumers) == 0 and d._hdr.consumer_offset == 0   # an empty table is no table
    assert_clean(img)


def test_register_with_an_existing_id(img):
    with vdisk.open(img, "r+") as d:
        cid = d.checkpoint()
        assert d.consumers.register("a", cid).change_id == cid


def test_changes_of_a_consumer(img):
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"a" * BS, 0)
        d.consumers.register("c")
        assert d.consumers.changes("c") == d.map()          # no id yet: everything allocated
        d.consumers.update("c", d.checkpoint())
        d.pwrite(b"b" * BS, 5 * BS)
        assert extent_blocks(d.consumers.changes("c"), BS) == {5}


@pytest.mark.parametrize("name", ["", " a", "a ", "x" * 121, "é" * 61, "a\nb", 7, None])
def test_bad_names(img, name):
    with vdisk.open(img, "r+") as d:
        with pytest.raises(vdisk.InvalidArgumentError):
            d.consumers.register(name)
        assert len(d.consumers) == 0


def test_names_unique_and_limits(img, monkeypatch):
    with vdisk.open(img, "r+") as d:
        d.consumers.register("a")
        with pytest.raises(vdisk.InvalidArgumentError, match="already"):
            d.consumers.register("a")
        monkeypatch.setattr(L, "MAX_CONSUMERS", 3)
        d.consumers.register("b")
        d.consumers.register("c")
        with pytest.raises(vdisk.InvalidArgumentError, match="maximum"):
            d.consumers.register("d")
        with pytest.raises(vdisk.ConsumerNotFoundError, match="no consumer named 'zz'"):
            d.consumers.update("zz", d.checkpoint())
        with pytest.raises(vdisk.ConsumerNotFoundError):
            d.consumers.forget("zz")
        with pytest.raises(KeyError):                      # a mapping's error, too
            d.consumers["zz"]
        assert d.consumers.get("zz") is None


def test_a_table_of_many_blocks(img):
    with vdisk.open(img, "r+") as d:                        # 16 entries per 4 KiB block
        for i in range(40):
            d.consumers.register(f"consumer-{i}")
        cid = d.checkpoint()
        d.consumers.update("consumer-39", cid)
    assert_clean(img)
    with vdisk.open(img) as d:
        assert len(d.consumers) == 40 and d.consumers["consumer-39"].change_id == cid


@pytest.mark.parametrize("bad", ["nonsense", "00000000-0000-0000-0000-000000000000/1", "FUTURE", "*", "OTHER"])
def test_only_ids_this_image_handed_out(img, tmp_path, bad):
    with vdisk.create(str(tmp_path / "other.vdk"), SIZE) as other:
        other_id = other.checkpoint()
    with vdisk.open(img, "r+") as d:
        d.consumers.register("a")
        cid = d.checkpoint()
        bad = {"FUTURE": f"{d.tracking_id}/{d.generation}", "OTHER": other_id}.get(bad, bad)
        with pytest.raises(vdisk.StaleChangeIdError):
            d.consumers.update("a", bad)
        with pytest.raises(vdisk.StaleChangeIdError):
            d.consumers.register("b", bad)
        with pytest.raises(vdisk.InvalidArgumentError):
            d.consumers.update("a", None)
        assert d.consumers["a"].change_id is None and "b" not in d.consumers
        d.consumers.update("a", cid)


def test_read_only_and_untracked(img, tmp_path):
    with vdisk.open(img) as d:
        with pytest.raises(vdisk.ReadOnlyError):
            d.consumers.register("a")
    path = str(tmp_path / "u.vdk")
    with vdisk.create(path, SIZE, track_changes=False) as d:
        with pytest.raises(vdisk.UnsupportedFeatureError):
            d.consumers.register("a")
        assert len(d.consumers) == 0


def test_reset_tracking_clears_every_id_revert_keeps_them(img):
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"1" * BS, 0)
        d.snapshot("s")
        d.consumers.register("a", d.checkpoint())
        d.pwrite(b"2" * BS, BS)
        d.revert("s")
        assert d.consumers["a"].change_id is not None        # revert: the id stays valid
        assert blocks_of(0, 2 * BS, BS) >= extent_blocks(d.consumers.changes("a"), BS) >= {1}
        d.reset_tracking()
        assert d.consumers["a"].change_id is None             # a dead epoch's id would be stale
        assert d.consumers.changes("a") == d.map()
    assert_clean(img)
    with vdisk.open(img) as d:
        assert d.consumers["a"].change_id is None


# ---------------------------------------------------------------------------- backups
def restore_chain(deltas, target) -> bytes:
    vdisk.restore(deltas, target, format="raw")
    with open(target, "rb") as f:
        return f.read()


def test_backup_by_consumer(img, tmp_path):
    rng = random.Random(3)
    deltas = []
    with vdisk.open(img, "r+") as d:
        d.consumers.register("nightly")
        d.consumers.register("weekly")
        for i in range(4):
            for _ in range(5):
                off = rng.randrange(SIZE // BS) * BS
                d.pwrite(pattern(rng.randrange(1 << 30), BS), off)
            dest = str(tmp_path / f"n{i}.vdelta")
            res = vdisk.backup(d, dest, consumer="nightly")
            assert res.since == ("*" if i == 0 else deltas_ids[-1])
            assert d.consumers["nightly"].change_id == res.change_id
            deltas.append(dest)
            deltas_ids = [*(deltas_ids if i else []), res.change_id]
            if i == 1:      # the other consumer's full backup, independent of the first
                w = vdisk.backup(d, str(tmp_path / "w0.vdelta"), consumer="weekly")
                assert w.since == "*"
        content = read_all(d)
        assert d.snapshots == []                             # no temporary snapshot left
    assert restore_chain(deltas, str(tmp_path / "r.raw")) == content
    assert_clean(img)


def test_backup_by_consumer_from_a_path_and_errors(img, tmp_path):
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"z" * BS, 0)
        d.consumers.register("c")
        cid = d.checkpoint()
        with pytest.raises(vdisk.InvalidArgumentError, match="not both"):
            vdisk.backup(d, str(tmp_path / "x.vdelta"), consumer="c", since=cid)
        with d.snapshot("s") as snap, pytest.raises(vdisk.InvalidArgumentError, match="snapshot"):
            vdisk.backup(snap, str(tmp_path / "x.vdelta"), consumer="c")
        with pytest.raises(vdisk.ConsumerNotFoundError):
            vdisk.backup(d, str(tmp_path / "x.vdelta"), consumer="nobody")
        assert [s.name for s in d.snapshots] == ["s"]
    with vdisk.open(img) as d, pytest.raises(vdisk.ReadOnlyError):
        vdisk.backup(d, str(tmp_path / "x.vdelta"), consumer="c")
    assert not os.path.exists(tmp_path / "x.vdelta")
    res = vdisk.backup(img, str(tmp_path / "p.vdelta"), consumer="c")   # a path: opened r+
    with vdisk.open(img) as d:
        assert d.consumers["c"].change_id == res.change_id


def test_id_recorded_only_after_the_delta_is_in_place(img, tmp_path, monkeypatch):
    """A failure between placing the delta and recording the id keeps the
    delta (the commit may have landed) and, here, the older id: the next
    backup covers the same changes again (more, never less)."""
    with vdisk.open(img, "r+") as d:
        d.consumers.register("c")
        first = vdisk.backup(d, str(tmp_path / "0.vdelta"), consumer="c")
        d.pwrite(b"q" * BS, 7 * BS)

        def boom(*args):
            assert os.path.exists(tmp_path / "1.vdelta"), "the id is recorded before the delta is in place"
            raise vdisk.VdiskIOError(5, "injected")
        monkeypatch.setattr(vdisk.Consumers, "update", boom)
        with pytest.raises(vdisk.VdiskIOError) as err:
            vdisk.backup(d, str(tmp_path / "1.vdelta"), consumer="c")
        assert "is complete and stays" in "".join(getattr(err.value, "__notes__", []))
        assert os.path.exists(tmp_path / "1.vdelta")     # the failed commit may have landed: never removed
        monkeypatch.undo()
        assert d.consumers["c"].change_id == first.change_id
        again = vdisk.backup(d, str(tmp_path / "2.vdelta"), consumer="c")
        assert again.since == first.change_id and 7 in extent_blocks(again.extents, BS)


# ---------------------------------------------------------------------------- power loss
def test_power_loss_during_consumer_changes(tmp_path):
    """Crash states at every fsync of register/update/forget: the table is the
    one before or after the change, the image checks clean but for leaks."""
    path = str(tmp_path / "p.vdk")
    d = vdisk.create(path, SIZE, block_size=BS, io_factory=RecordingIO)
    rec = d._io
    rng = random.Random(5)
    states = []
    expect = {"before": {}, "after": {}}

    def sample(r):
        for keep in ([True] * len(r.pending), [False] * len(r.pending),
                     [rng.random() < 0.5 for _ in r.pending]):
            states.append((r.crash_image(rng, keep=keep, torn=rng.random() < 0.3), dict(expect["before"]),
                           dict(expect["after"])))

    ops = [("register", "a", None), ("register", "b", None), ("update", "a", "ID"), ("register", "c", "ID"),
           ("forget", "b", None), ("update", "c", "ID2"), ("forget", "a", None)]
    cur: dict = {}
    rec.on_fsync = sample
    try:
        for op, name, cid in ops:
            d.pwrite(pattern(rng.randrange(1 << 30), BS), rng.randrange(SIZE // BS) * BS)
            if cid:
                cid = d.checkpoint()
            after = dict(cur)
            if op == "forget":
                del after[name]
            else:
                after[name] = cid
            expect["before"], expect["after"] = dict(cur), after
            getattr(d.consumers, op)(*([name] if op == "forget" else [name, cid]))
            cur = after
            expect["before"] = dict(cur)
    finally:
        rec.on_fsync = None
        d.close()
    assert len(states) > 30
    seen_both = set()
    for i, (image, before, after) in enumerate(states):
        p = str(tmp_path / f"s{i}.vdk")
        with open(p, "wb") as f:
            f.write(image)
        res = vdisk.check(p)
        assert not res.corruptions, (i, res.corruptions)
        with vdisk.open(p, "r+") as c:
            got = {info.name: info.change_id for info in c.consumers.values()}
        assert got in (before, after), (i, got, before, after)
        seen_both.add(got == after and before != after)
        os.unlink(p)
    assert seen_both == {True, False}          # both sides of some commit were seen


# ---------------------------------------------------------------------------- damage
def _table_offset(path):
    with vdisk.open(path) as d:
        return d._hdr.consumer_offset


def _write_entry(path, offset, rec_bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rec_bytes)


@pytest.mark.parametrize("damage", ["crc", "future", "other-epoch", "name", "duplicate", "epoch-without-gen"])
def test_damaged_table_refused_reported_and_dropped(img, damage):
    from vdisk.consumers import ConsumerRecord
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"k" * BS, 3 * BS)
        cid = d.checkpoint()
        d.consumers.register("a", cid)
        d.consumers.register("b")
        hdr = d._hdr
        content = read_all(d)
    off = _table_offset(img)
    entry = L.CONSUMER_ENTRY_SIZE
    if damage == "crc":
        with open(img, "r+b") as f:
            f.seek(off + 10)
            b = f.read(1)
            f.seek(off + 10)
            f.write(bytes([b[0] ^ 0x40]))
    else:
        rec = {"future": ConsumerRecord("a", hdr.generation, hdr.tracking_uuid),
               "other-epoch": ConsumerRecord("a", 1, os.urandom(16)),
               "name": ConsumerRecord("a\udc80".encode("utf-8", "surrogatepass").decode("latin-1"), 0),
               "duplicate": ConsumerRecord("b"),
               "epoch-without-gen": ConsumerRecord("a", 0, hdr.tracking_uuid)}[damage]
        raw = rec.pack()
        if damage == "name":      # invalid UTF-8 behind a valid CRC
            body = bytearray(ConsumerRecord("aa").pack()[:entry - 4])
            body[132:134] = b"\xff\xfe"
            raw = bytes(body) + struct.pack("<I", L.crc32c(bytes(body)))
        _write_entry(img, off, raw)
    with pytest.raises(vdisk.CorruptImageError, match="check --repair"):
        vdisk.open(img)
    res = vdisk.check(img)
    assert not res.ok and any("consumer" in c for c in res.corruptions), res
    fixed = vdisk.check(img, repair=True)
    assert fixed.ok and fixed.repaired, fixed
    with vdisk.open(img, "r+") as d:
        assert len(d.consumers) == 0 and read_all(d) == content
        d.consumers.register("again")                       # usable again
    assert_clean(img)


@pytest.mark.parametrize("fields", [
    {"consumer_count": 2, "consumer_capacity": 1},
    {"consumer_capacity": L.MAX_CONSUMERS + 1, "consumer_count": 0},
    {"consumer_offset": 0},
    {"consumer_offset": 12345},
    {"consumer_offset": 1 << 40},
    {"consumer_count": 16},            # more entries than the region's first block holds written
])
def test_hostile_header_fields(img, fields):
    with vdisk.open(img, "r+") as d:
        d.consumers.register("a")
        hdr = d._hdr
    for k, v in fields.items():
        setattr(hdr, k, v)
    hdr.sequence += 1
    with open(img, "r+b") as f:
        f.seek(L.SLOT_OFFSETS[hdr.sequence % 2])
        f.write(hdr.pack())
        f.seek(L.SLOT_OFFSETS[(hdr.sequence + 1) % 2])
        f.write(bytes(L.SLOT_SIZE))            # no older slot to fall back on
    with pytest.raises(vdisk.CorruptImageError):
        vdisk.open(img)
    try:
        res = vdisk.check(img)
    except vdisk.CorruptImageError:
        return
    assert not res.ok


def test_untracked_image_with_consumers_refused(tmp_path):
    path = str(tmp_path / "u.vdk")
    vdisk.create(path, SIZE, track_changes=False).close()
    with vdisk.open(path) as d:
        hdr = d._hdr
    hdr.consumer_count, hdr.consumer_capacity, hdr.consumer_offset = 1, 16, 0x20000
    with pytest.raises(vdisk.CorruptImageError, match="without change tracking"):
        hdr.validate()


# ---------------------------------------------------------------------------- CLI
def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "vdisk", *args], capture_output=True, text=True, timeout=120)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_cli(img, tmp_path):
    run("consumer", "register", img, "nightly")
    run("consumer", "register", img, "weekly")
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"c" * BS, 2 * BS)
    first = run("backup", img, str(tmp_path / "f.vdelta"), "--consumer", "nightly").stdout.strip()
    listed = json.loads(run("consumer", "list", img, "--output", "json").stdout)
    assert [(c["name"], c["change_id"]) for c in listed] == [("nightly", first), ("weekly", None)]
    assert "nightly" in run("consumer", "list", img).stdout
    assert first in run("info", img).stdout
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"d" * BS, 9 * BS)
    changes = json.loads(run("changes", img, "--consumer", "nightly", "--output", "json").stdout)
    assert changes["extents"] == [{"offset": 9 * BS, "length": BS}]
    assert json.loads(run("changes", img, "--consumer", "weekly", "--output", "json").stdout)["bytes"] == 2 * BS
    cid = run("checkpoint", img).stdout.strip()
    run("consumer", "update", img, "weekly", cid)
    assert json.loads(run("consumer", "list", img, "--output", "json").stdout)[1]["change_id"] == cid
    run("consumer", "forget", img, "weekly")
    for args, msg in [(("consumer", "forget", img, "weekly"), "no consumer named 'weekly'"),
                      (("consumer", "register", img, "nightly"), "already"),
                      (("consumer", "update", img, "nightly", "bogus"), "malformed change id"),
                      (("changes", img), "exactly one of"),
                      (("changes", img, "--since", cid, "--consumer", "nightly"), "exactly one of"),
                      (("backup", img, str(tmp_path / "x.vdelta"), "--consumer", "x", "--since", cid), "not both")]:
        p = run(*args, ok=False)
        assert p.returncode != 0 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
    assert not os.path.exists(tmp_path / "x.vdelta")
    assert_clean(img)


def test_content_untouched_by_consumer_changes(img):
    with vdisk.open(img, "r+") as d:
        data = np.random.default_rng(1).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
        d.pwrite(data, 0)
        d.flush()
        for i in range(20):
            d.consumers.register(f"c{i}")
        for i in range(0, 20, 2):
            d.consumers.forget(f"c{i}")
        d.compact()
        assert read_all(d) == data
    with vdisk.open(img) as d:
        assert read_all(d) == data and len(d.consumers) == 10
    assert_clean(img)
