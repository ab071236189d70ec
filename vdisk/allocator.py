"""The allocator: refcounts, free blocks, and the references a flush releases.

Owns the refcount array and everything that decides where a new block
goes (docs/FORMAT.md, "Refcounts"): blocks released since open (the free
list), zero-refcount blocks the file held at open (found by a lazy hole
scan), and the end of the file.  A reference a table stops holding is not
dropped at once: it waits in ``pending`` until the flush has made the
table without it durable (``release_pending``, step 5 of the write order).
Also the refcount validators run at open.

The allocator writes only refcount pages (``write_pages``); it never
syncs and never commits the header: growing the refcount table is the
Disk's (``grow``, a callable it passes in), since that relocation commits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from . import _fast
from . import layout as L
from .arrays import distinct, lazy_zeros, write_pages
from .errors import CorruptImageError, OutOfRangeError

REFS_PER_PAGE = 4096 // L.REFCOUNT_BYTES
Refcounts = npt.NDArray[np.uint16]

if TYPE_CHECKING:
    from .fileio import FileIO
    from .snapshot_table import SnapshotRecord


class Allocator:
    def __init__(self, fio: FileIO, hdr: L.Header, refcounts: Refcounts, end_block: int,
                 grow: Callable[[int], None]):
        self._io = fio
        self._hdr = hdr
        self._grow = grow                   # grow(need): relocate the refcounts (the Disk commits it)
        self.refcounts = refcounts
        self.refs_mv = refcounts.data        # memoryview(refcounts)
        self.end_block = end_block          # the first block past the end of the file
        self.meta_end_block = L.round_up(L.HEADER_AREA, hdr.block_size) // hdr.block_size
        self.meta_ranges: list[tuple[int, int]] = []
        self.dirty_pages: set[int] = set()
        self.pending: list[int] = []        # references to drop once the table without them is durable
        self.free: list[int] = []           # blocks released since open (durably unreferenced)
        self.holes: list[int] = []          # zero-refcount blocks found by the scan, lowest last
        self.scan = self.meta_end_block
        self.scan_limit = end_block

    # --- metadata regions -----------------------------------------------------------
    def set_meta_ranges(self, ranges: list[tuple[int, int]]) -> None:
        """The block ranges [lo, hi) of every metadata region (never allocated as data)."""
        self.meta_ranges = ranges

    def replace(self, refcounts: Refcounts) -> None:
        """A relocated refcount table (the Disk's refcount growth)."""
        self.refcounts = refcounts
        self.refs_mv = refcounts.data

    # --- allocation ---------------------------------------------------------------
    def appends_only(self) -> bool:
        """Whether the next allocations all append at the end of the file
        (no free blocks, and the scan for holes has finished)."""
        return (not self.free and not self.holes
                and self.scan >= min(self.scan_limit, self._hdr.refcount_capacity))

    def find_hole(self) -> int:
        """The lowest block with refcount 0 that the file held at open, or -1.

        Scans the refcounts lazily, 64 Ki entries at a time, so opening an
        image with a huge sparse file costs nothing up front.  Blocks
        appended since open are allocated when appended, and come back
        through the free list if released.
        """
        limit = min(self.scan_limit, self._hdr.refcount_capacity)
        refs = self.refs_mv
        while True:
            while self.holes:
                p = self.holes.pop()
                if refs[p] == 0:
                    return p
            if self.scan >= limit:
                return -1
            lo, hi = self.scan, min(self.scan + 65536, limit)
            free = self.refcounts[lo:hi] == 0
            for m0, m1 in self.meta_ranges:       # never metadata, whatever its refcount says
                if m0 < hi and m1 > lo:
                    free[max(m0, lo) - lo:min(m1, hi) - lo] = False
            self.scan = hi
            self.holes = (np.flatnonzero(free)[::-1] + lo).tolist()

    def alloc(self) -> int:
        """One data block: a free one, a hole, or a new one at the end of the file."""
        p = -1
        while self.free and p < 0:
            q = self.free.pop()
            if self.refs_mv[q] == 0:       # not handed out by the scan meanwhile
                p = q
        if p < 0:
            p = self.find_hole()
        if p < 0:
            if self.end_block + 1 >= self._hdr.refcount_capacity:
                self._grow(self.end_block + 2)
            p = self.end_block
            if p > L.MAX_PHYS_BLOCKS:
                raise OutOfRangeError(f"{self._io.path}: the image file reached the format's limit of "
                                      f"{L.MAX_PHYS_BLOCKS} physical blocks")
            self.end_block += 1
        self.refs_mv[p] = 1
        self.dirty_pages.add(p // REFS_PER_PAGE)
        return p

    def give_back(self, p: int) -> None:
        """Undo alloc() of a block no table ever saw (its data write failed)."""
        self.refs_mv[p] = 0
        self.free.append(p)

    def append_run(self, count: int) -> int:
        """count new data blocks at the end of the file (not truncated: the data
        write extends it); returns the first."""
        if self.end_block + count + 1 >= self._hdr.refcount_capacity:
            self._grow(self.end_block + count + 2)
        p0 = self.end_block
        if p0 + count - 1 > L.MAX_PHYS_BLOCKS:
            raise OutOfRangeError(f"{self._io.path}: the image file reached the format's limit of "
                                  f"{L.MAX_PHYS_BLOCKS} physical blocks")
        self.end_block += count
        self.refcounts[p0:p0 + count] = 1
        self.dirty_pages.update(range(p0 // REFS_PER_PAGE, (p0 + count - 1) // REFS_PER_PAGE + 1))
        return p0

    def give_back_run(self, p0: int, count: int) -> None:
        """Undo append_run() (its data write failed; the table never saw the blocks)."""
        self.refcounts[p0:p0 + count] = 0
        self.free.extend(range(p0 + count - 1, p0 - 1, -1))

    def alloc_run(self, count: int) -> int:
        """count contiguous new blocks at the end of the file (for metadata
        regions); the file is extended over them."""
        if self.end_block + count + 1 >= self._hdr.refcount_capacity:
            self._grow(self.end_block + count + 2)
        p = self.end_block
        self.end_block += count
        self.refcounts[p:p + count] = 1
        self.dirty_pages.update(range(p // REFS_PER_PAGE, (p + count - 1) // REFS_PER_PAGE + 1))
        self._io.truncate(max(self._io.size(), self.end_block << self._hdr.block_shift))
        return p

    def check_headroom(self, used: np.ndarray) -> None:
        """One more reference to each block of used must fit (uint16 would wrap
        to 0: a free block); refused before anything changes."""
        if len(used) and self.refcounts[used].max() >= L.MAX_REFCOUNT:
            raise OutOfRangeError(f"{self._io.path}: a block would exceed {L.MAX_REFCOUNT} references "
                                  f"(run 'vdisk check --repair' if the image leaks)")

    def add_refs(self, used: np.ndarray) -> None:
        """One more reference to every block of used (a new table maps them)."""
        self.refcounts[used] += 1
        self.dirty_pages.update(distinct(used // REFS_PER_PAGE).tolist())

    # --- release ------------------------------------------------------------------
    def decref_later(self, p: int) -> None:
        """Drop a reference once the table that no longer holds it is durable."""
        self.pending.append(p)

    def release_blocks(self, blocks: Iterable[int]) -> None:
        """decref_later for each block of an iterable."""
        self.pending.extend(blocks)

    def release_run(self, offset: int, nbytes: int) -> None:
        """decref_later for each block of the file range [offset, offset + nbytes)."""
        bs = self._hdr.block_size
        self.pending.extend(range(offset // bs, (offset + nbytes) // bs))

    def take_pending(self) -> list[int]:
        """The pending references so far (a flush releases them once its table is
        durable); references dropped from now on wait for the next flush."""
        pending, self.pending = self.pending, []
        return pending

    def release_pending(self, pending: list[int] | None = None) -> bool:
        """Drop the pending references (the tables without them are durable), or
        those of a take_pending(); blocks reaching 0 join the free list.  True if
        there were any (their refcount pages are dirty: write_pages next)."""
        if pending is None:
            pending = self.take_pending()
        if not pending:
            return False
        refs = self.refs_mv
        for p in pending:
            refs[p] -= 1
            self.dirty_pages.add(p // REFS_PER_PAGE)
            if refs[p] == 0:
                self.free.append(p)
        self.free.sort(reverse=True)
        return True

    def write_pages(self) -> None:
        """Write the dirty refcount pages (not synced)."""
        if self.dirty_pages:
            write_pages(self._io, self.refcounts, sorted(self.dirty_pages), self._hdr.refcount_offset)
            self.dirty_pages.clear()

    # --- compaction ---------------------------------------------------------------
    def used_mask(self) -> npt.NDArray[np.bool_]:
        """One bool per block below the end of the file: in use (referenced, or metadata)."""
        end = min(self.end_block, self._hdr.refcount_capacity)
        used: npt.NDArray[np.bool_] = self.refcounts[:end] != 0
        for lo, hi in self.meta_ranges:
            used[lo:min(hi, end)] = True
        used[:self.meta_end_block] = True
        return used

    def last_used_block(self) -> int:
        """The end of the last block in use (as used_mask), scanning back from
        the file's end 1 Mi refcounts at a time: the cost is the free tail's,
        not the file's (Disk.close runs it on every writable close)."""
        end = min(self.end_block, self._hdr.refcount_capacity)
        floor = max([self.meta_end_block] + [min(hi, end) for _lo, hi in self.meta_ranges])
        hi = end
        while hi > floor:
            lo = max(floor, hi - (1 << 20))
            nz = np.flatnonzero(self.refcounts[lo:hi])
            if len(nz):
                return lo + int(nz[-1]) + 1
            hi = lo
        return floor

    def cut_tail(self, last: int) -> int:
        """Truncate the free blocks from block last to the end off the file
        (their released refcounts must be durable); returns the bytes cut."""
        if last >= self.end_block:
            return 0
        cut = (self.end_block - last) * self._hdr.block_size
        self._io.truncate(last * self._hdr.block_size)
        self.end_block = last
        self.free = [p for p in self.free if p < last]
        self.holes = [p for p in self.holes if p < last]
        self.scan = min(self.scan, last)
        self.scan_limit = min(self.scan_limit, last)
        return cut

    # --- validation at open -------------------------------------------------------
    def validate_meta(self) -> None:
        """Every block of a metadata region holds a reference (docs/FORMAT.md,
        "Refcounts"): releasing a region whose refcount says 0 would take it
        below zero."""
        for lo, hi in self.meta_ranges:
            zero = np.flatnonzero(self.refcounts[lo:hi] == 0)
            if len(zero):
                raise CorruptImageError(
                    f"{self._io.path}: metadata block {lo + int(zero[0])} has refcount 0, expected 1 "
                    f"(run 'vdisk check --repair')")

    def validate_shared(self, live_parts: Sequence[tuple[npt.NDArray[np.uint32], int]],
                        snapshots: Sequence[SnapshotRecord]) -> None:
        """Every data block's refcount is at least the number of tables that
        map it: the live table and every snapshot's frozen table
        (docs/FORMAT.md, "Refcounts").  A lower refcount would send a write
        to a shared block in place (a snapshot changes) and let a delete or
        revert free a block a table still maps (reused: one block reads
        another's data); a higher one is only a leak.

        Run at a writable open of an image with snapshots, before anything
        depends on the refcounts; the write path, delete_snapshot and revert
        keep the property from then on.  Without snapshots the live table's
        own validation is enough (each block mapped once, refcount nonzero).
        Read-only opens skip it: refcounts only steer a writer's choices
        (in place or copy, free or reuse), a reader follows the tables as
        they are, and no writer can run beside it (the writer's exclusive
        lock); the next writer validates at its own open.

        live_parts: (entries, first entry) of the live table where it may
        hold entries.  Each snapshot table is streamed from the pages the
        file holds, 1 MiB at a time, and its pointers checked as the live
        table's are (inside the data area, outside metadata; a refcount of
        0 fails the count); the reference counts go into a lazy array
        (pages only where referenced), so memory follows the referenced
        blocks, not the virtual size (docs/FORMAT.md, "Validation at open",
        has the cost)."""
        h, fio = self._hdr, self._io
        file_size = fio.size()
        hi = min(file_size // h.block_size, h.refcount_capacity)
        counts = lazy_zeros(hi, np.uint16)
        refs = self.refcounts[:hi]
        meta = sorted(r for r in self.meta_ranges if r[0] < r[1])
        m_starts = np.array([lo for lo, _ in meta], np.int64)
        m_stops = np.array([stop for _, stop in meta], np.int64)
        # at most 64 Ki cells, marked where a metadata range lies: only there is a range searched
        cell_shift = max(0, hi.bit_length() - 16)
        cells = np.zeros((hi >> cell_shift) + 1, np.uint8)
        for lo, stop in meta:
            cells[lo >> cell_shift:((stop - 1) >> cell_shift) + 1] = 1

        def count(part: np.ndarray, first: int, what: str) -> None:
            bad, problem = _fast.count_refs_within(part, len(part), self.meta_end_block, hi, m_starts, m_stops,
                                                   cells, cell_shift, counts, refs)
            if bad < 0:
                return
            p = int(part[bad])
            if problem == 1:
                found = f"{what} entry {first + bad} points to physical block {p}, outside the data area " \
                        f"[{self.meta_end_block}, {hi})"
            elif problem == 2:
                found = f"{what} points into a metadata region (physical block {p}, entry {first + bad})"
            else:
                found = (f"physical block {p} has refcount {int(refs[p])}, but more tables map it ({what} "
                         f"entry {first + bad} is one more): a write could change a snapshot and a delete free "
                         f"a block in use")
            raise CorruptImageError(f"{fio.path}: {found} (run 'vdisk check --repair')")

        for part, lo in live_parts:
            count(part, lo, "block table")
        step = 1 << 20
        for rec in snapshots:
            what = f"snapshot {rec.name!r} table"
            base = rec.table_offset
            end = min(base + L.blocks_for(rec.virtual_size, h.block_shift) * L.TABLE_ENTRY_BYTES, file_size)
            for off, length in fio.data_extents(base, end):
                stop = off + length
                off -= (off - base) % L.TABLE_ENTRY_BYTES
                for pos in range(off, stop, step):
                    raw = fio.pread(min(step, stop - pos), pos)
                    part = np.frombuffer(raw, np.uint32, len(raw) // L.TABLE_ENTRY_BYTES)
                    count(part, (pos - base) // L.TABLE_ENTRY_BYTES, what)
