"""vdisk/summary.py: `vdisk info` read without numpy says what Disk.info() says, key for key,
on every kind of image (tracking on and off, snapshots, consumers, checkpoint tokens, the
legacy image's tokenless ids, armed coarse regions, damaged snapshot records, large and
chunked block tables), refuses what an open refuses, and loads neither numpy nor _fast."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import vdisk
from vdisk import layout as L
from vdisk import summary

KiB, MiB = 1 << 10, 1 << 20
LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy-v1.vdk")


def same_as_an_open(path) -> dict:
    data, snaps = summary.summarize(path)
    with vdisk.open(path) as d:
        assert data == d.info()
        assert snaps == d.snapshots
    return data


def test_a_fresh_and_a_written_image(tmp_path):
    path = tmp_path / "a.vdk"
    with vdisk.create(path, "8MiB") as d:
        pass
    assert same_as_an_open(path)["allocated_blocks"] == 0
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"x" * 3 * 64 * KiB, 64 * KiB)
        d.pwrite(b"y", 8 * MiB - 1)
    assert same_as_an_open(path)["allocated_blocks"] == 4


def test_snapshots_consumers_and_change_ids(tmp_path):
    path = tmp_path / "s.vdk"
    with vdisk.create(path, "4MiB", block_size="4KiB") as d:
        d.pwrite(b"a" * 10 * KiB, 0)
        d.snapshot("first")
        d.pwrite(b"b" * 4 * KiB, 40 * KiB)
        d.snapshot("second")
        d.delete_snapshot("first")
        cid = d.checkpoint()
        d.consumers.register("nightly")
        d.consumers.register("weekly", cid)
        d.pwrite(b"c", 1 * MiB)
    data = same_as_an_open(path)
    assert data["change_id"] == cid and data["snapshots"] == 1
    assert data["consumers"] == [{"name": "nightly", "change_id": None}, {"name": "weekly", "change_id": cid}]


def test_untracked_image(tmp_path):
    path = tmp_path / "u.vdk"
    with vdisk.create(path, "1MiB", track_changes=False) as d:
        d.pwrite(b"z", 0)
    assert "change_id" not in same_as_an_open(path)


def test_before_the_first_checkpoint_and_the_legacy_images_tokenless_ids(tmp_path):
    path = tmp_path / "n.vdk"
    vdisk.create(path, "1MiB").close()
    assert same_as_an_open(path)["change_id"] is None
    old = tmp_path / "old.vdk"
    shutil.copy(LEGACY, old)
    assert "." not in same_as_an_open(old)["change_id"].split("/")[1]      # tokenless, as the log-less image issued


def test_armed_coarse_regions(tmp_path):
    """Bits set in the coarse bitmap (a crash before the fold) count as Disk.info counts them:
    those of regions inside the disk only."""
    path = tmp_path / "c.vdk"
    vdisk.create(path, "64MiB", block_size="4KiB", coarse_region_size="1MiB").close()
    with vdisk.open(path) as d:
        h = d._hdr
    with open(path, "r+b") as f:
        f.seek(h.bitmap_offset)
        f.write(bytes([0b10000101, 0, 0, 0, 0, 0, 0, 0b10000000, 0xFF]))     # regions 0, 2, 7, 63 and past 64
    assert same_as_an_open(path)["dirty_coarse_regions"] == 4


def test_a_damaged_snapshot_record_is_counted_as_an_open_counts_it(tmp_path):
    path = tmp_path / "d.vdk"
    with vdisk.create(path, "1MiB") as d:
        d.snapshot("a")
        d.snapshot("b")
        off = d._hdr.snapshot_offset
    with open(path, "r+b") as f:
        f.seek(off + 10)
        f.write(b"\xff")                        # record 0's CRC fails
    data = same_as_an_open(path)
    assert data["damaged_snapshot_records"] == 1 and data["snapshots"] == 1


@pytest.mark.parametrize("numpy_past, chunk", [(summary.NUMPY_PAST, summary.CHUNK), (0, 4096), (1 << 40, 4096)])
def test_block_table_counts_in_chunks_with_or_without_numpy(tmp_path, monkeypatch, numpy_past, chunk):
    monkeypatch.setattr(summary, "NUMPY_PAST", numpy_past)
    monkeypatch.setattr(summary, "CHUNK", chunk)
    path = tmp_path / "t.vdk"
    rng = __import__("random").Random(7)
    with vdisk.create(path, "64MiB", block_size="4KiB") as d:
        for b in rng.sample(range(16384), 3000):
            d.pwrite(b"\1", b * 4 * KiB + rng.randrange(4096))
    assert same_as_an_open(path)["allocated_blocks"] == 3000


def test_refuses_what_an_open_refuses(tmp_path):
    for name, content in (("short", b"\x89VDISK\r\n" + bytes(100)), ("other", b"x" * 10000), ("empty", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(vdisk.VdiskError) as mine:
            summary.summarize(path)
        with pytest.raises(vdisk.VdiskError) as theirs:
            vdisk.open(path)
        assert type(mine.value) is type(theirs.value) and str(mine.value) == str(theirs.value)
    with pytest.raises(FileNotFoundError):
        summary.summarize(tmp_path / "nope.vdk")
    path = tmp_path / "locked.vdk"
    with vdisk.create(path, "1MiB"):
        with pytest.raises(vdisk.ImageLockedError):
            summary.summarize(path)


def test_info_loads_neither_numpy_nor_the_compiled_core(tmp_path):
    path = tmp_path / "i.vdk"
    with vdisk.create(path, "4MiB") as d:
        d.pwrite(b"q", 0)
        d.snapshot("s")
        d.consumers.register("c")
    code = ("import sys; from vdisk.cli import main\n"
            "try:\n    main(sys.argv[1:], prog_name='vdisk')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(*(m in sys.modules for m in ('numpy', 'vdisk._fast', 'h5py', 'tqdm')), file=sys.stderr)")
    for args in (["info", str(path)], ["info", "--output", "json", str(path)]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines()[-1] == "False False False False", (args, r.stderr)
        assert "allocated" in r.stdout
