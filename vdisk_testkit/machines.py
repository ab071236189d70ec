"""Shared rules of the hypothesis state machines (tests/test_model.py,
tests/test_snapshots.py, tests/test_identity_model.py).

The model of an image is a bytearray of its content; a change id is a
point: (id, the content at the point, the blocks touched since).  The rule
every machine checks: changes_since(id) covers every block whose content
differs from the content at the id's point (never under-report).

* draw_write, draw_extent, resize_model: what a write, a discard or a resize
  draws and does to the model, for any machine.
* ImageMachine: one image opened read-write, with the rules write, discard,
  resize and reopen, the invariant above over the newest points, and a
  teardown that closes the image, checks it and reads it back.  A machine
  subclasses it, adds its @initialize (calling start) and its own rules,
  and tunes it with the class attributes below.
"""
from __future__ import annotations

import tempfile

import hypothesis.strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vdisk
from vdisk_testkit.helpers import blocks_of, differing_blocks, extent_blocks, pattern


def draw_write(data, size: int, block_size: int, big: bool = False) -> tuple[int, bytes]:
    """(offset, bytes) of a write inside [0, size): at most 3 blocks long unless big; all
    zeros at times (a zero write)."""
    off = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - off if big else min(size - off, 3 * block_size)))
    zero = data.draw(st.booleans())
    return off, pattern(data.draw(st.integers(0, 2**31)), length, zero)


def draw_extent(data, size: int) -> tuple[int, int]:
    """(offset, length) of a non-empty extent inside [0, size) (a discard)."""
    off = data.draw(st.integers(0, size - 1))
    return off, data.draw(st.integers(1, size - off))


def resize_model(model: bytearray, new: int) -> None:
    """The content after a resize to `new` bytes: zeros past the old end, or cut."""
    if new > len(model):
        model.extend(bytes(new - len(model)))
    else:
        del model[new:]


def under_reported(d, cid: str, now: bytes, then: bytes, block_size: int) -> tuple[set[int], set[int]]:
    """(blocks changes_since(cid) reports, blocks that differ from `then` and it does not report)."""
    got = extent_blocks(d.changes_since(cid), block_size)
    return got, differing_blocks(now, then, block_size) - got


class ImageMachine(RuleBasedStateMachine):
    """One image against a bytearray (see the module docstring)."""

    IMAGE = "m.vdk"                 # the image's file name in the machine's temporary directory
    BIG_WRITES = False              # writes up to the end of the disk, not only up to 3 blocks
    RESIZE_SECTORS = st.integers(8, 700)    # new size of a resize, in 512-byte sectors
    POINTS_CHECKED = 3              # the invariant asks the newest this many points
    EXACT_CHANGES = False           # also: nothing reported outside the blocks touched since

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = self.dir.name + "/" + self.IMAGE
        self.disk = None

    def start(self, block_size: int, size: int) -> None:
        """Create the image: call from the subclass's @initialize."""
        self.bs = block_size
        self.disk = vdisk.create(self.path, size, block_size=block_size)
        self.model = bytearray(size)
        self.points: list[tuple[str, bytes, set[int]]] = []    # (change id, content at that point, touched since)

    def point(self, cid: str) -> None:
        """A change id handed out now."""
        self.points.append((cid, bytes(self.model), set()))

    def touch(self, offset: int, length: int) -> None:
        for p in self.points:
            p[2].update(blocks_of(offset, length, self.bs))

    @rule(data=st.data())
    def write(self, data):
        big = self.BIG_WRITES and data.draw(st.booleans())
        off, buf = draw_write(data, len(self.model), self.bs, big)
        assert self.disk.pwrite(buf, off) == len(buf)
        self.model[off:off + len(buf)] = buf
        self.touch(off, len(buf))

    @rule(data=st.data())
    def discard(self, data):
        off, length = draw_extent(data, len(self.model))
        self.disk.discard(off, length)
        self.model[off:off + length] = bytes(length)
        self.touch(off, length)

    @rule(data=st.data())
    def resize(self, data):
        new = data.draw(self.RESIZE_SECTORS) * 512
        old = len(self.model)
        self.disk.resize(new)
        resize_model(self.model, new)
        if new > old:
            self.touch(old, new - old)        # the grown area (and the old last block) changed
        else:
            self.touch(new, 1)                # the new last block's cut-off tail was zeroed
        assert self.disk.size == new

    @rule()
    def reopen(self):
        fold = self.disk.fold_interval
        self.disk.close()
        assert self.disk.closed
        self.disk = vdisk.open(self.path, "r+")
        self.disk.fold_interval = fold

    @precondition(lambda self: self.disk is not None)
    @invariant()
    def changes_never_under_report(self):
        now = bytes(self.model)
        nb = -(-len(now) // self.bs)
        for cid, then, touched in self.points[-self.POINTS_CHECKED:]:
            got, missing = under_reported(self.disk, cid, now, then, self.bs)
            assert not missing, f"under-report for {cid}: missing blocks {sorted(missing)[:10]}"
            if self.EXACT_CHANGES:
                may = {b for b in touched if b < nb} | differing_blocks(now, then, self.bs)
                assert got <= may, f"over-report without a crash for {cid}: {sorted(got - may)[:10]}"

    def teardown(self):
        if self.disk is not None:
            content = bytes(self.model)
            self.disk.close()
            res = vdisk.check(self.path)
            assert res.ok, res
            with vdisk.open(self.path) as d:
                assert d.pread(d.size, 0) == content
        self.dir.cleanup()
