"""Changed-block tracking (after VMware's US patent 8443166).

The contract
------------
* ``changes_since(id)`` never under-reports: every block whose content may
  differ from its content at the id's point is in the answer, after clean
  closes, crashes and power loss alike.  Without a crash it is exact, up to
  whole blocks.
* The write path only sets bits: a fine dirty byte per block and a dirty
  flag per 64-block group.  An overwrite in place of durably mapped data
  also needs its coarse region's bit durable (written and synced) before
  the data write is issued: the write-ahead rule.  Writes that remap a
  block (allocation, copy-on-write, unmap) need no bit: the flush makes
  the folded counters durable before the block table that exposes them.
* Arming costs one sync per region per interval, at most ``arm_budget``
  of them: past that, every region is armed in one sync (a crash in that
  interval then reports the whole disk: more, never less).
* A fold (at flush, checkpoint, close, and every ``fold_interval`` writes)
  turns dirty bits into per-block counters holding the current generation,
  writes the counter pages, and, once the caller has synced them, clears
  the coarse bits of the regions that were idle during the interval.
* After a crash, every block of every region whose coarse bit is set counts
  as changed in the current generation: the over-report is bounded by the
  regions written since the last fold, and no tracking state is reset.

Change ids are ``"<tracking-uuid>/<generation>"``: the state at the end of
that generation.  An id from another image or tracking epoch, a generation
not yet closed, or a malformed string raises StaleChangeIdError.
"""
from __future__ import annotations

import re
import uuid as _uuid

import numpy as np

from . import _fast
from .errors import StaleChangeIdError
from .extents import Extents
from .arrays import lazy_zeros
from .layout import SECTOR, SUMMARY_SHIFT, regions_for

PAGE = 4096
DEFAULT_ARM_BUDGET = 16     # write-ahead syncs per interval before arming every region at once
COUNTERS_PER_PAGE = PAGE // 4
_ID_RE = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/([0-9]{1,10})$")


def format_change_id(tracking_uuid: bytes, generation: int) -> str:
    return f"{_uuid.UUID(bytes=tracking_uuid)}/{generation}"


def parse_change_id(change_id, tracking_uuid: bytes, generation: int) -> int:
    """The generation an id names, checked against this image's tracking state.

    Valid ids name a closed generation 1 <= g < generation of this tracking epoch.
    """
    if not isinstance(change_id, str):
        raise StaleChangeIdError(f"change id must be a string, got {type(change_id).__name__}")
    m = _ID_RE.match(change_id.strip().lower())
    if not m:
        raise StaleChangeIdError(f"malformed change id {change_id!r}: expected '<tracking-uuid>/<generation>' or '*'")
    ours = str(_uuid.UUID(bytes=tracking_uuid))
    if m.group(1) != ours:
        raise StaleChangeIdError(
            f"change id {change_id!r} belongs to tracking epoch {m.group(1)}, this image tracks as {ours} "
            f"(another image, or tracking was reset): take a full backup")
    gen = int(m.group(2))
    if gen < 1 or gen >= generation:
        raise StaleChangeIdError(
            f"change id {change_id!r} names generation {gen}, but this image's last closed generation "
            f"is {generation - 1}: the id is from the future (or from a reverted copy of the image)")
    return gen


class ChangeTracker:
    """In-memory tracking state of one image and the writes that persist it.

    The owner (Disk) holds the lock and decides when to call fold() and
    clear_coarse(); this class knows where its regions are and what to write.
    """

    def __init__(self, io, header, counters: np.ndarray, bitmap: bytes, writable: bool, loaded=None):
        """loaded: the (start, stop) ranges of counters read from the file
        (zero elsewhere); None means all of them."""
        self.io = io
        self.hdr = header
        self.writable = writable
        self.rel_shift = header.coarse_shift - header.block_shift   # blocks -> coarse region
        self.counters = counters                      # uint32[capacity]
        cap = len(counters)
        self.dirty = lazy_zeros(cap, np.uint8)
        ngroups = (cap >> SUMMARY_SHIFT) + 1
        self.dirty_groups = lazy_zeros(ngroups, np.uint8)
        self.summary = lazy_zeros(ngroups, np.uint32)
        self.sole = lazy_zeros(ngroups, np.uint8)       # 1 + index of a group's only nonzero counter
        for lo, hi in ([(0, header.nblocks)] if loaded is None else loaded):
            lo, hi = lo >> SUMMARY_SHIFT << SUMMARY_SHIFT, min(hi, header.nblocks)
            if hi > lo:     # only what was read: the rest is zero, its pages untouched
                _fast.build_summary(self.counters[lo:hi], self.summary[lo >> SUMMARY_SHIFT:],
                                    self.sole[lo >> SUMMARY_SHIFT:], SUMMARY_SHIFT,
                                    hi - lo)
        self.bitmap = bytearray(bitmap.ljust(header.bitmap_length, b"\0"))
        self._coarse = np.zeros(regions_for(cap, self.rel_shift) + 1, dtype=np.uint8)
        self._touched = np.zeros_like(self._coarse)      # regions written during this interval
        self._rebind()
        self.armings = 0                  # write-ahead syncs in this interval
        self.arm_budget = DEFAULT_ARM_BUDGET
        self.recovered_regions = self._recover()


    # --- crash recovery ---------------------------------------------------------
    def _recover(self) -> int:
        """Regions whose coarse bit is set were written since the last fold:
        count all their blocks as changed in the current generation."""
        bits = np.unpackbits(np.frombuffer(bytes(self.bitmap), dtype=np.uint8), bitorder="little")
        nregions = regions_for(self.hdr.nblocks, self.rel_shift)
        set_regions = np.flatnonzero(bits[:nregions])
        bpr = 1 << self.rel_shift
        nb = self.hdr.nblocks
        for r in set_regions.tolist():
            lo, hi = r * bpr, min((r + 1) * bpr, nb)
            self.dirty[lo:hi] = 1
            self.dirty_groups[lo >> SUMMARY_SHIFT:((hi - 1) >> SUMMARY_SHIFT) + 1] = 1
            self._coarse[r] = 1
        # bits past the virtual size carry nothing; the next clear drops them
        if len(bits) > nregions and bits[nregions:].any():
            self._coarse[nregions:len(self._coarse)] = 0
        return len(set_regions)

    @property
    def dirty_regions(self) -> int:
        """Coarse regions whose bit is set on disk (written since the last fold)."""
        return int(self._coarse.sum())

    # --- the write path ---------------------------------------------------------
    def mark(self, b: int) -> None:
        """Block b is about to change through a remap (new block, copy-on-write,
        unmap): the flush makes its counter durable before the mapping."""
        self._dirty_mv[b] = 1
        self._groups_mv[b >> SUMMARY_SHIFT] = 1

    def mark_run(self, b0: int, b1: int) -> None:
        """mark() for blocks [b0, b1) (a run of fresh allocations)."""
        self.dirty[b0:b1] = 1
        self.dirty_groups[b0 >> SUMMARY_SHIFT:((b1 - 1) >> SUMMARY_SHIFT) + 1] = 1

    def mark_inplace(self, b: int) -> None:
        """Block b's durable data is about to be overwritten in place: its
        coarse bit must be durable before the data write is issued."""
        self._dirty_mv[b] = 1
        self._groups_mv[b >> SUMMARY_SHIFT] = 1
        r = b >> self.rel_shift
        if not self._coarse_mv[r]:
            self._arm(r)

    def _rebind(self) -> None:
        """Refresh the views the Disk's hot write path uses (after arrays change)."""
        self._dirty_mv = memoryview(self.dirty)
        self._groups_mv = memoryview(self.dirty_groups)
        self._coarse_mv = memoryview(self._coarse)
        self.hot = (self._dirty_mv, self._groups_mv, self._coarse_mv, self.rel_shift)

    def _arm(self, r: int) -> None:
        """Make region r's bit durable; past the interval's arming budget, arm
        every region at once (one sync; a crash then reports the whole disk)."""
        if self.armings < self.arm_budget:
            self.armings += 1
            self._persist_regions([r])
        else:
            nregions = regions_for(self.hdr.nblocks, self.rel_shift)
            self._persist_regions(range(nregions))

    def mark_range(self, b0: int, b1: int, dirty: bool = True) -> None:
        """Blocks [b0, b1) are about to change (resize, revert, import): arm
        their regions (durably) and, with dirty, mark the blocks."""
        if b1 <= b0:
            return
        if dirty:
            self.dirty[b0:b1] = 1
            self.dirty_groups[b0 >> SUMMARY_SHIFT:((b1 - 1) >> SUMMARY_SHIFT) + 1] = 1
        r0, r1 = b0 >> self.rel_shift, ((b1 - 1) >> self.rel_shift) + 1
        self._touched[r0:r1] = 1
        todo = np.flatnonzero(self._coarse[r0:r1] == 0) + r0
        if len(todo):
            self._persist_regions(todo)

    def _persist_regions(self, regions) -> None:
        regions = np.asarray(regions, dtype=np.int64)
        coarse = self._coarse.copy()
        coarse[regions] = 1
        bits = np.packbits(coarse[:len(self.bitmap) * 8], bitorder="little").tobytes()
        self.bitmap[:] = bits.ljust(len(self.bitmap), b"\0")
        lo = (int(regions.min()) >> 3) // SECTOR * SECTOR
        hi = -(-((int(regions.max()) >> 3) + 1) // SECTOR) * SECTOR
        self.io.pwrite(memoryview(self.bitmap)[lo:hi], self.hdr.bitmap_offset + lo)
        self.io.fsync()
        self._coarse[regions] = 1       # only once durable

    # --- folds -----------------------------------------------------------------
    def fold(self, generation: int, nblocks: int | None = None) -> bool:
        """Fold dirty bits into counters = generation and write the counter pages
        (not synced: the caller syncs, then calls clear_idle_regions).
        nblocks: fold this many blocks (a revert folds for the size it commits)."""
        nblocks = self.hdr.nblocks if nblocks is None else nblocks
        ngroups = -(-nblocks >> SUMMARY_SHIFT)
        groups = np.flatnonzero(self.dirty_groups[:ngroups]).astype(np.int64)
        if len(groups) == 0:
            return False
        self._touch_regions_of(groups)
        _fast.fold(self.dirty, self.dirty_groups, self.counters, self.summary, self.sole, groups,
                   generation, SUMMARY_SHIFT, nblocks)
        pages = np.unique(groups >> (10 - SUMMARY_SHIFT))   # 1024 counters per 4 KiB page
        self.write_counter_pages(pages)
        return True

    def _touch_regions_of(self, groups: np.ndarray) -> None:
        """Regions written during the interval (derived here, off the write path):
        their coarse bits stay set at this fold."""
        rel = self.rel_shift
        if rel >= SUMMARY_SHIFT:
            self._touched[groups >> (rel - SUMMARY_SHIFT)] = 1
        else:
            first = groups << (SUMMARY_SHIFT - rel)
            for k in range(1 << (SUMMARY_SHIFT - rel)):
                r = first + k
                self._touched[r[r < len(self._touched)]] = 1

    def write_counter_pages(self, pages) -> None:
        raw = self.counters.view(np.uint8)
        base = self.hdr.counter_offset
        for start, stop in _page_runs(pages):
            self.io.pwrite(raw[start * PAGE:stop * PAGE], base + start * PAGE)

    def clear_idle_regions(self, everything: bool = False) -> None:
        """After the folded counters are durable: clear the coarse bits of the
        regions not written during the interval (see fold).  Regions that were
        stay set, so a steady workload pays no re-arming fsync; after a crash
        the over-report is bounded by the regions written in the last two
        intervals.  everything=True clears all bits (clean close)."""
        if everything:      # a clean close: the counters say it all
            self._touched[:] = 0
        idle = np.flatnonzero(self._coarse[:len(self._touched)] & (self._touched == 0))
        self._touched[:] = 0
        self.armings = 0
        if len(idle) == 0:
            return
        self._coarse[idle] = 0
        bits = np.packbits(self._coarse[:self.hdr.bitmap_length * 8], bitorder="little")
        self.bitmap[:] = bits.tobytes().ljust(len(self.bitmap), b"\0")
        lo = (int(idle[0]) >> 3) // SECTOR * SECTOR
        hi = -(-((int(idle[-1]) >> 3) + 1) // SECTOR) * SECTOR
        self.io.pwrite(memoryview(self.bitmap)[lo:hi], self.hdr.bitmap_offset + lo)

    # --- queries -----------------------------------------------------------------
    def changed_blocks(self, since: int):
        """Block runs (starts, lengths) changed after generation `since`."""
        return _fast.changed_runs(self.counters, self.dirty, self.summary, self.sole, self.dirty_groups,
                                  since, SUMMARY_SHIFT, self.hdr.nblocks)

    def changes_since(self, since: int) -> Extents:
        starts, lengths = self.changed_blocks(since)
        return Extents.from_block_runs(starts, lengths, self.hdr.block_shift, self.hdr.virtual_size)

    # --- geometry changes ---------------------------------------------------------
    def grow_arrays(self, capacity: int) -> None:
        """Reallocate the per-block arrays for a larger table capacity."""
        def grown(a, n):
            b = lazy_zeros(n, a.dtype)
            b[:len(a)] = a
            return b
        self.counters = grown(self.counters, capacity)
        self.dirty = grown(self.dirty, capacity)
        ngroups = (capacity >> SUMMARY_SHIFT) + 1
        self.dirty_groups = grown(self.dirty_groups, ngroups)
        self.summary = grown(self.summary, ngroups)
        self.sole = grown(self.sole, ngroups)
        self._coarse = grown(self._coarse, regions_for(capacity, self.rel_shift) + 1)
        self._touched = grown(self._touched, len(self._coarse))
        self._rebind()

    def recoarsen(self) -> None:
        """After the header's coarse_shift or bitmap_length changed (all bits clear)."""
        self.rel_shift = self.hdr.coarse_shift - self.hdr.block_shift
        self.bitmap = bytearray(self.hdr.bitmap_length)
        self._coarse = np.zeros(regions_for(len(self.counters), self.rel_shift) + 1, dtype=np.uint8)
        self._touched = np.zeros_like(self._coarse)
        self._rebind()

    def reset(self) -> None:
        """A new tracking epoch: every counter and dirty bit cleared."""
        self.counters = lazy_zeros(len(self.counters), np.uint32)
        self.dirty = lazy_zeros(len(self.dirty), np.uint8)
        self.dirty_groups = lazy_zeros(len(self.dirty_groups), np.uint8)
        self.summary = lazy_zeros(len(self.summary), np.uint32)
        self.sole = lazy_zeros(len(self.sole), np.uint8)
        self._rebind()


def _page_runs(pages):
    """Contiguous runs [start, stop) of a sorted array of page numbers."""
    pages = np.asarray(pages, dtype=np.int64)
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    stops = pages[np.concatenate((breaks - 1, [len(pages) - 1]))] + 1
    return list(zip(starts.tolist(), stops.tolist()))
