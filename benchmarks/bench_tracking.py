"""Change-tracking kernels on a big image: changed-block queries and the fold,
against the plain numpy one-liners over the same arrays.

The image is 1 TiB with 64 KiB blocks (16 Mi counters) and never holds data:
its tracker's in-memory arrays are set directly, 0.1% of the blocks
scattered.  Set ``VDISK_BENCH_BIG`` (e.g. ``64GiB``) for a smaller one.
Nothing writes the counters to disk (the fold kernel is called directly,
and every dirty bit is clear before close), so the image stays a few MB of
sparse file.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import vdisk
import vdisk._fast as fast
from vdisk.layout import SUMMARY_SHIFT
from conftest import SEED, remove, rounds, tag

BIG = os.environ.get("VDISK_BENCH_BIG", "1TiB")
CHANGED_FRACTION = 0.001      # 0.1% of the blocks, scattered
GENERATION = 10
OLD = 4                       # changes_since(OLD): counters > OLD count as changed
CHANGED_GEN = 5


def scattered(nblocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = max(1, int(nblocks * CHANGED_FRACTION))
    return np.sort(rng.choice(nblocks, size=k, replace=False)).astype(np.int64)


@pytest.fixture(scope="module")
def big(workdir):
    """(disk, nblocks, changed block indices): counters = 5 at 0.1% of blocks, generation 10."""
    path = os.path.join(workdir, "big.vdk")
    d = vdisk.create(path, BIG, block_size="64KiB", overwrite=True)
    t = d._tracker
    nb = d._hdr.nblocks
    ids = [d.checkpoint() for _ in range(GENERATION - 1)]   # real ids: ids[g - 1] names generation g
    assert d._hdr.generation == GENERATION
    idx = scattered(nb, SEED + 10)
    t.counters[idx] = CHANGED_GEN           # in memory only: nothing is dirty, so nothing folds them
    fast.build_summary(t.counters, t.summary, t.sole, SUMMARY_SHIFT, nb)
    d.bench_old_id = ids[OLD - 1]
    try:
        yield d, nb, idx
    finally:
        t.dirty[:] = 0                      # nothing to fold: close writes no counter pages
        t.dirty_groups[:] = 0
        d.close()
        remove(path)


def _runs_to_index(starts, lengths) -> np.ndarray:
    if len(starts) == 0:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts.tolist(), lengths.tolist())])


def test_changed_blocks_numpy(benchmark, big):
    d, nb, idx = big
    counters = d._tracker.counters
    tag(benchmark, "changed_blocks_1TiB", "numpy", nblocks=nb, changed=len(idx), image=BIG)
    out = benchmark(lambda: np.flatnonzero(counters[:nb] > OLD))
    assert np.array_equal(out, idx)          # correctness of the comparison, not a timing


def test_changed_blocks_kernel(benchmark, big):
    d, nb, idx = big
    tag(benchmark, "changed_blocks_1TiB", "vdisk-kernel", nblocks=nb, changed=len(idx), image=BIG)
    starts, lengths = benchmark(d._tracker.changed_blocks, OLD)
    assert np.array_equal(_runs_to_index(starts, lengths), idx)


def test_changes_since(benchmark, big):
    d, nb, idx = big
    cid = d.bench_old_id                    # the id of generation OLD (with its checkpoint token)
    tag(benchmark, "changed_blocks_1TiB", "vdisk-changes_since", nblocks=nb, changed=len(idx), image=BIG)
    ext = benchmark(d.changes_since, cid)
    assert ext.nbytes == len(idx) * d.block_size


# ---------------------------------------------------------------------------- the fold
@pytest.fixture(scope="module")
def fold_idx(big):
    d, nb, _ = big
    return scattered(nb, SEED + 11)


def test_fold_numpy(benchmark, big, fold_idx):
    """counters[dirty] = generation; dirty cleared: on copies of the tracker's arrays."""
    d, nb, _ = big
    t = d._tracker
    counters = t.counters.copy()
    dirty = np.zeros_like(t.dirty)
    tag(benchmark, "fold_1TiB", "numpy", nblocks=nb, dirty=len(fold_idx), image=BIG)

    def setup():
        dirty[fold_idx] = 1

    def run():
        counters[dirty.astype(bool)] = GENERATION
        dirty[:] = 0

    benchmark.pedantic(run, setup=setup, rounds=rounds(30), warmup_rounds=1)
    assert (counters[fold_idx] == GENERATION).all()


def test_fold_kernel(benchmark, big, fold_idx):
    """What ChangeTracker.fold does in memory (no counter-page writes): find the
    dirty groups, then _fast.fold over them."""
    d, nb, _ = big
    t = d._tracker
    ngroups = -(-nb >> SUMMARY_SHIFT)
    tag(benchmark, "fold_1TiB", "vdisk-kernel", nblocks=nb, dirty=len(fold_idx), image=BIG)
    saved = t.counters[fold_idx].copy()
    groups_of = fold_idx >> SUMMARY_SHIFT

    def setup():
        t.dirty[fold_idx] = 1
        t.dirty_groups[groups_of] = 1

    def run():
        groups = np.flatnonzero(t.dirty_groups[:ngroups]).astype(np.int64)
        return fast.fold(t.dirty, t.dirty_groups, t.counters, t.summary, t.sole, groups,
                         GENERATION, SUMMARY_SHIFT, nb)

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds(30), warmup_rounds=1)
        assert (t.counters[fold_idx] == GENERATION).all() and not t.dirty.any()
    finally:                                 # put the counters back for anything run after this
        t.counters[fold_idx] = saved
        t.dirty[:] = 0
        t.dirty_groups[:] = 0
        fast.build_summary(t.counters, t.summary, t.sole, SUMMARY_SHIFT, nb)
