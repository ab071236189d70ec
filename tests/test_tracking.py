"""Changed-block tracking: change ids, consumers, stale ids, crash recovery, resize, reset."""
import os
import random
import re

import numpy as np
import pytest

import vdisk
from vdisk.testing import RecordingIO
from vdisk_testkit.helpers import extent_blocks

BS = 4096


def blocks(ext):
    return extent_blocks(ext, BS)


@pytest.fixture
def disk(img):
    d = vdisk.create(img, "4MiB", block_size="4KiB")
    yield d
    d.close()


def test_change_ids_and_generation(disk):
    assert disk.change_id is None and disk.generation == 1
    tid = disk.tracking_id
    c1 = disk.checkpoint()
    assert re.fullmatch(f"{tid}/1\\.[0-9a-f]{{16}}", c1) and disk.change_id == c1 and disk.generation == 2
    c2 = disk.checkpoint()
    assert re.fullmatch(f"{tid}/2\\.[0-9a-f]{{16}}", c2) and c2.split(".")[1] != c1.split(".")[1]


def test_changes_since_exact_and_merged(disk):
    c = disk.checkpoint()
    disk.pwrite(b"x", 5 * BS + 10)          # partial write marks the block
    disk.pwrite(b"y" * (2 * BS), 6 * BS)    # blocks 6, 7: merged with 5
    disk.pwrite(b"z", 100 * BS)
    ext = disk.changes_since(c)
    assert list(ext) == [(5 * BS, 3 * BS), (100 * BS, BS)]
    assert ext.nbytes == 4 * BS and len(ext) == 2
    assert ext.offsets.dtype == np.uint64


def test_star_is_every_allocated_extent(disk):
    disk.pwrite(b"a" * 10, 0)
    disk.pwrite(b"b" * 10, 50 * BS)
    assert disk.changes_since("*") == disk.map()


def test_many_consumers_independent(disk):
    rng = random.Random(3)
    ids = {}
    truth = {}
    for step in range(30):
        b = rng.randrange(1024)
        disk.pwrite(os.urandom(100), b * BS)
        for t in truth.values():
            t.add(b)
        if step % 7 == 0:
            name = f"app{step}"
            ids[name] = disk.checkpoint()
            truth[name] = set()
    for name, cid in ids.items():
        assert blocks(disk.changes_since(cid)) == truth[name], name


def test_discard_and_zero_overwrite_are_changes(disk):
    disk.pwrite(b"q" * BS * 3, 0)
    c = disk.checkpoint()
    disk.discard(0, BS)                 # whole block freed
    disk.pwrite(bytes(BS), BS)          # zeros over data: unmapped, changed
    disk.discard(2 * BS + 5, 10)        # partial discard
    assert blocks(disk.changes_since(c)) == {0, 1, 2}


def test_zeros_onto_unallocated_are_not_changes(disk):
    c = disk.checkpoint()
    disk.pwrite(bytes(3 * BS), 10 * BS)
    disk.discard(20 * BS, 5 * BS)
    assert len(disk.changes_since(c)) == 0


def test_resize_grow_counts_as_changed(img):
    with vdisk.create(img, 3 * BS + 512, block_size="4KiB") as d:
        c = d.checkpoint()
        d.resize(6 * BS)
        # the old partial last block (3) and the grown blocks 4, 5
        assert blocks(d.changes_since(c)) == {3, 4, 5}


def test_shrink_then_grow_reports_zeroed_area(img):
    with vdisk.create(img, 8 * BS, block_size="4KiB") as d:
        d.pwrite(b"d" * 8 * BS, 0)
        c = d.checkpoint()
        d.resize(4 * BS + 1024)
        d.resize(8 * BS)
        assert d.pread(BS, 6 * BS) == bytes(BS)
        assert d.pread(BS, 4 * BS) == b"d" * 1024 + bytes(BS - 1024)
        assert blocks(d.changes_since(c)) == {4, 5, 6, 7}


def test_stale_ids(img, tmp_path):
    with vdisk.create(img, "1MiB", block_size="4KiB") as d:
        c = d.checkpoint()
        tid = d.tracking_id
        other = vdisk.create(str(tmp_path / "other.vdk"), "1MiB")
        foreign = other.checkpoint()
        other.close()
        for bad in [foreign, f"{tid}/5", f"{tid}/2", f"{tid}/0", "garbage", "", "*/1", f"{tid}/-1",
                    f"{tid}", 17, None, f"{tid}/99999999999"]:
            with pytest.raises(vdisk.StaleChangeIdError):
                d.changes_since(bad)
        assert isinstance(vdisk.StaleChangeIdError("x"), vdisk.VdiskError)
        d.reset_tracking()
        assert d.tracking_id != tid and d.change_id is None and d.generation == 1
        with pytest.raises(vdisk.StaleChangeIdError, match="tracking epoch"):
            d.changes_since(c)
    with vdisk.open(img) as d:
        with pytest.raises(vdisk.StaleChangeIdError):
            d.changes_since(c)


def test_tracking_persists_across_reopen(img):
    with vdisk.create(img, "4MiB", block_size="4KiB") as d:
        c1 = d.checkpoint()
        d.pwrite(b"1", 3 * BS)
        c2 = d.checkpoint()
        d.pwrite(b"2", 9 * BS)
    with vdisk.open(img) as d:
        assert blocks(d.changes_since(c1)) == {3, 9}
        assert blocks(d.changes_since(c2)) == {9}
        assert d.info()["dirty_coarse_regions"] == 0


def test_track_changes_off(img):
    with vdisk.create(img, "1MiB", track_changes=False) as d:
        d.pwrite(b"x", 0)
        assert not d.track_changes and d.tracking_id is None
        with pytest.raises(vdisk.UnsupportedFeatureError, match="tracking is off"):
            d.checkpoint()
        with pytest.raises(vdisk.UnsupportedFeatureError):
            d.changes_since("*")


def test_automatic_fold_interval(disk):
    disk.fold_interval = 3
    c = disk.checkpoint()
    for i in range(7):
        disk.pwrite(b"w", i * BS)
    assert not disk._tracker.dirty[:7].all()       # folded into counters along the way
    assert (disk._tracker.counters[:6] == disk.generation).all()
    assert blocks(disk.changes_since(c)) == set(range(7))


def test_inplace_overwrite_arms_coarse_bit_before_data(img):
    """The write-ahead rule: the coarse bit is durable before the data write is issued."""
    d = vdisk.create(img, "64MiB", block_size="4KiB", coarse_region_size="1MiB", io_factory=RecordingIO)
    d.pwrite(b"a" * BS, 5 * 1024 * 1024)
    d.checkpoint()
    rec = d._io
    syncs_before = rec.fsyncs
    d.pwrite(b"b" * 10, 5 * 1024 * 1024)          # in-place overwrite of durable data
    assert rec.fsyncs == syncs_before + 1
    bitmap = rec.durable[8192:8192 + 512]
    assert bitmap[0] & (1 << 5)                    # region 5 armed and durable
    # the data write came after the sync: it is still pending
    assert rec.pending and rec.pending[-1][2] == b"b" * 10
    d.pwrite(b"c" * 10, 5 * 1024 * 1024 + 100)     # same region: no new sync
    assert rec.fsyncs == syncs_before + 1
    d.close()


def test_crash_recovery_reports_armed_regions(img):
    """Power loss after in-place overwrites, before any fold: the armed regions count as changed."""
    d = vdisk.create(img, "64MiB", block_size="4KiB", coarse_region_size="1MiB", io_factory=RecordingIO)
    d.pwrite(b"a" * 4 * BS, 0)
    d.pwrite(b"a" * 4 * BS, 7 * 1024 * 1024)
    c = d.checkpoint()
    d.pwrite(b"b" * 10, 2 * BS)                    # region 0
    d.pwrite(b"b" * 10, 7 * 1024 * 1024)           # region 7
    image = d._io.crash_image(keep=[True] * len(d._io.pending))
    d.close()
    with open(img, "wb") as f:
        f.write(image)
    with vdisk.open(img) as d2:
        got = blocks(d2.changes_since(c))
        assert {2, 7 * 256} <= got                         # never less
        assert got == set(range(256)) | set(range(7 * 256, 8 * 256))   # bounded: the two regions
        assert d2.info()["dirty_coarse_regions"] == 2
    with vdisk.open(img, "r+") as d3:                     # a writer folds the recovery ...
        assert blocks(d3.changes_since(c)) == got
    with vdisk.open(img) as d4:                           # ... and it persists
        assert blocks(d4.changes_since(c)) == got
        assert d4.info()["dirty_coarse_regions"] == 0


def test_arming_budget_arms_everything(img):
    d = vdisk.create(img, "64MiB", block_size="4KiB", coarse_region_size="1MiB", io_factory=RecordingIO)
    for r in range(40):
        d.pwrite(b"a", r * 1024 * 1024)
    d.checkpoint()
    d._tracker.arm_budget = 4
    before = d._io.fsyncs
    for r in range(40):
        d.pwrite(b"b", r * 1024 * 1024)
    assert d._io.fsyncs - before == 5              # 4 single armings, then all at once
    assert d.info()["dirty_coarse_regions"] == 64
    d.close()


def test_changes_since_large_sparse_image(tmp_path):
    """1 TiB, 64 KiB blocks: scattered changes found exactly; the query skips clean groups."""
    p = str(tmp_path / "big.vdk")
    with vdisk.create(p, "1TiB") as d:
        c = d.checkpoint()
        rng = np.random.default_rng(1)
        idx = np.unique(rng.integers(0, d._hdr.nblocks, 500))
        for b in idx.tolist():
            d.pwrite(b"x", b * d.block_size)
        d.flush()
        ext = d.changes_since(c)
        assert extent_blocks(ext, d.block_size) == set(idx.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_changed_runs_kernel_equals_numpy_through_folds(seed):
    """The query kernel against numpy on the same arrays, after builds and
    folds that make groups with none, one (the sole shortcut) and several
    changed blocks, with dirty blocks pending, for every generation."""
    from vdisk import _fast
    from vdisk.layout import SUMMARY_SHIFT
    rng = np.random.default_rng(seed)
    cap = 4096 + int(rng.integers(0, 64))
    nb = cap - int(rng.integers(0, 40))            # some counters past the disk's end
    ng = (cap >> SUMMARY_SHIFT) + 1
    counters = np.zeros(cap, np.uint32)
    counters[rng.choice(cap, 50, replace=False)] = rng.integers(1, 3, 50)
    dirty, dirty_groups = np.zeros(cap, np.uint8), np.zeros(ng, np.uint8)
    summary, sole = np.zeros(ng, np.uint32), np.zeros(ng, np.uint8)
    _fast.build_summary(counters, summary, sole, SUMMARY_SHIFT, nb)
    for gen in range(3, 12):
        for _ in range(int(rng.integers(1, 40))):          # scattered and clustered marks
            b = int(rng.integers(0, nb))
            n = 1 if rng.random() < 0.7 else int(rng.integers(2, 70))
            dirty[b:min(b + n, nb)] = 1
            dirty_groups[b >> SUMMARY_SHIFT:((min(b + n, nb) - 1) >> SUMMARY_SHIFT) + 1] = 1
        if rng.random() < 0.8:
            groups = np.flatnonzero(dirty_groups[:-(-nb >> SUMMARY_SHIFT)]).astype(np.int64)
            _fast.fold(dirty, dirty_groups, counters, summary, sole, groups, gen, SUMMARY_SHIFT, nb)
        for since in range(0, gen + 1):
            starts, lengths = _fast.changed_runs(counters, dirty, summary, sole, dirty_groups, since,
                                                 SUMMARY_SHIFT, nb)
            got = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)] or [np.empty(0, int)])
            want = np.flatnonzero((counters[:nb] > since) | (dirty[:nb] != 0))
            assert np.array_equal(got, want), (gen, since, np.setdiff1d(want, got)[:10])
