"""Stateful model test: the Disk against a bytearray, and tracking against
the truth (hypothesis).

For every change id handed out, changes_since(id) must contain every block
whose content differs from its content at the id's point (never
under-report) and nothing outside the blocks touched since (exact up to
whole blocks, with no crash).
"""
import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vdisk
from vdisk_testkit.helpers import assert_hot_bound, blocks_of, differing_blocks, extent_blocks, pattern

BLOCK_SIZES = [4096, 8192, 65536]


class DiskMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.TemporaryDirectory()
        self.path = self.dir.name + "/m.vdk"
        self.disk = None

    @initialize(bs=st.sampled_from(BLOCK_SIZES), sectors=st.one_of(st.integers(1, 1200), st.integers(1200, 12000)),
                fold=st.integers(1, 50))
    def create(self, bs, sectors, fold):
        self.bs = bs
        size = sectors * 512
        self.disk = vdisk.create(self.path, size, block_size=bs)
        self.disk.fold_interval = fold
        self.model = bytearray(size)
        self.points = []     # (change_id, content at that point, blocks touched since)

    def _touch(self, offset, length):
        for p in self.points:
            p[2].update(blocks_of(offset, length, self.bs))

    @rule(data=st.data(), zero=st.booleans(), big=st.booleans())
    def write(self, data, zero, big):
        size = len(self.model)
        off = data.draw(st.integers(0, size - 1))
        maxlen = size - off if big else min(size - off, 3 * self.bs)
        length = data.draw(st.integers(1, maxlen))
        buf = pattern(data.draw(st.integers(0, 2**31)), length, zero)
        assert self.disk.pwrite(buf, off) == length
        self.model[off:off + length] = buf
        self._touch(off, length)

    @rule(data=st.data())
    def read(self, data):
        size = len(self.model)
        off = data.draw(st.integers(0, size))
        length = data.draw(st.integers(0, size - off))
        assert self.disk.pread(length, off) == bytes(self.model[off:off + length])

    @rule(data=st.data())
    def discard(self, data):
        size = len(self.model)
        off = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, size - off))
        self.disk.discard(off, length)
        self.model[off:off + length] = bytes(length)
        self._touch(off, length)

    @rule()
    def flush(self):
        self.disk.flush()

    @rule(sectors=st.one_of(st.integers(1, 1500), st.integers(1500, 13000)))
    def resize(self, sectors):
        new = sectors * 512
        old = len(self.model)
        self.disk.resize(new)
        if new > old:
            self.model.extend(bytes(new - old))
            self._touch(old, new - old)       # the grown area (and the old last block) changed
        else:
            del self.model[new:]
            self._touch(new, 1)               # the new last block's cut-off tail was zeroed
        assert self.disk.size == new

    @rule()
    def checkpoint(self):
        cid = self.disk.checkpoint()
        assert self.disk.change_id == cid
        self.points.append((cid, bytes(self.model), set()))

    @rule()
    def reopen(self):
        fold = self.disk.fold_interval
        self.disk.close()
        assert self.disk.closed
        self.disk = vdisk.open(self.path, "r+")
        self.disk.fold_interval = fold

    @precondition(lambda self: self.disk is not None)
    @invariant()
    def changes_are_bounded(self):
        for cid, then, touched in self.points[-4:]:
            got = extent_blocks(self.disk.changes_since(cid), self.bs)
            must = differing_blocks(bytes(self.model), then, self.bs)
            nb = -(-len(self.model) // self.bs)
            may = {b for b in touched if b < nb} | {b for b in must}
            assert must <= got, f"under-report for {cid}: missing blocks {sorted(must - got)[:10]}"
            assert got <= may, f"over-report without a crash for {cid}: {sorted(got - may)[:10]}"

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

    def teardown(self):
        if self.disk is not None:
            content = bytes(self.model)
            self.disk.close()
            res = vdisk.check(self.path)
            assert res.ok, res
            with vdisk.open(self.path) as d:
                assert d.pread(d.size, 0) == content
        self.dir.cleanup()


TestDiskModel = DiskMachine.TestCase
TestDiskModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
