"""Stateful model test: the Disk against a bytearray, and tracking against
the truth (hypothesis).

For every change id handed out, changes_since(id) must contain every block
whose content differs from its content at the id's point (never
under-report) and nothing outside the blocks touched since (exact up to
whole blocks, with no crash).
"""
import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import initialize, invariant, precondition, rule

from vdisk_testkit.helpers import assert_hot_bound, extent_blocks
from vdisk_testkit.machines import ImageMachine

BLOCK_SIZES = [4096, 8192, 65536]


class DiskMachine(ImageMachine):
    """The shared rules (vdisk_testkit/machines.py: write, discard, resize, reopen, changes
    never under-reported) with writes to the end of the disk, resizes up to 6.5 MB, exact
    changes (nothing outside the blocks touched since), reads, flushes, checkpoints and
    fold intervals."""

    BIG_WRITES = True
    RESIZE_SECTORS = st.one_of(st.integers(1, 1500), st.integers(1500, 13000))
    POINTS_CHECKED = 4
    EXACT_CHANGES = True

    @initialize(bs=st.sampled_from(BLOCK_SIZES), sectors=st.one_of(st.integers(1, 1200), st.integers(1200, 12000)),
                fold=st.integers(1, 50))
    def create(self, bs, sectors, fold):
        self.start(bs, sectors * 512)
        self.disk.fold_interval = fold

    @rule(data=st.data())
    def read(self, data):
        size = len(self.model)
        off = data.draw(st.integers(0, size))
        length = data.draw(st.integers(0, size - off))
        assert self.disk.pread(length, off) == bytes(self.model[off:off + length])

    @rule()
    def flush(self):
        self.disk.flush()

    @rule()
    def checkpoint(self):
        cid = self.disk.checkpoint()
        assert self.disk.change_id == cid
        self.point(cid)

    @precondition(lambda self: self.disk is not None)
    @invariant()
    def hot_path_bound(self):
        assert_hot_bound(self.disk)

    @precondition(lambda self: self.disk is not None)
    @invariant()
    def map_covers_data(self):
        mapped = extent_blocks(self.disk.map(), self.bs)
        nonzero = {b for b in range(-(-len(self.model) // self.bs))
                   if any(self.model[b * self.bs:(b + 1) * self.bs])}
        assert nonzero <= mapped


TestDiskModel = DiskMachine.TestCase
TestDiskModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
