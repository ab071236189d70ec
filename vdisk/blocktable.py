"""The block table: virtual block -> physical block, and what changed in it.

Owns the live table array, the pages that may hold entries (scans skip
the rest), the pages changed since the last flush and the blocks remapped
since then (``fresh``: their mapping is not durable yet, so the flush
orders their tracking counters before it: the write-ahead rule lets
in-place writes into them go without a coarse bit).  ``fresh`` is one byte
per entry, so the Cython hot path reads it.  Also read planning (through
this table or a snapshot's) and table validation.

Changing an entry never touches refcounts: the caller gives the old block
to the allocator (``Allocator.decref_later``).  The table is written only
by the Disk's flush (step 3 of the write order), from the pages
``take_dirty`` hands it.
"""
from __future__ import annotations

import typing

import numpy as np
import numpy.typing as npt

from . import _fast
from . import layout as L
from .arrays import PAGE, lazy_zeros, page_runs
from .errors import CorruptImageError

TABLE_PER_PAGE = 4096 // L.TABLE_ENTRY_BYTES
#: (file offset, content) of table pages to write: a copy, or a view of the live table
TablePage = typing.Tuple[int, typing.Union[bytes, npt.NDArray[np.uint8]]]
Table = npt.NDArray[np.uint32]

if typing.TYPE_CHECKING:
    from .allocator import Allocator
    from .fileio import FileIO


class BlockTable:
    def __init__(self, table: Table, capacity: int, loaded: typing.Iterable[tuple[int, int]]):
        """loaded: the entry ranges [lo, hi) read from the file."""
        self.table = table
        self.mv = table.data        # memoryview(table)
        # table pages that may hold entries: read from the file, or written since (scans skip the rest)
        self.pages = np.zeros(capacity // TABLE_PER_PAGE + 1, dtype=bool)
        for lo, hi in loaded:
            self.pages[lo // TABLE_PER_PAGE:(hi - 1) // TABLE_PER_PAGE + 1] = True
        self.dirty_pages: set[int] = set()
        # blocks remapped since the last flush (1 per entry), and the table pages holding them
        self.fresh = lazy_zeros(capacity, np.uint8)
        self.fresh_pages: set[int] = set()

    def runs(self, n: int) -> list[tuple[int, int]]:
        """Entry ranges [start, stop) below n of the table pages that may hold entries."""
        pages = np.flatnonzero(self.pages[:-(-n // TABLE_PER_PAGE)])
        return [(a * TABLE_PER_PAGE, min(b * TABLE_PER_PAGE, n)) for a, b in page_runs(pages)]

    def parts(self, n: int) -> list[tuple[Table, int]]:
        """(entries, first entry) of each run below n (the refcount validator's input)."""
        return [(self.table[lo:hi], lo) for lo, hi in self.runs(n)]

    def allocated(self, n: int) -> int:
        """Mapped entries below n."""
        return sum(int(np.count_nonzero(self.table[lo:hi])) for lo, hi in self.runs(n))

    def used(self, n: int) -> Table:
        """The physical blocks the first n entries map."""
        return _fast.nonzero_values(self.table, n)

    def copy_into(self, out: Table, n: int) -> None:
        """out[:n] = the first n entries (only the pages that may hold entries are read)."""
        for lo, hi in self.runs(n):
            out[lo:hi] = self.table[lo:hi]

    def map_runs(self, n: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(starts, lengths) of the mapped block runs below n."""
        runs = [_fast.nonzero_runs(self.table, lo, hi) for lo, hi in self.runs(n)]
        starts = np.concatenate([r[0] for r in runs]) if runs else np.empty(0, np.int64)
        lengths = np.concatenate([r[1] for r in runs]) if runs else np.empty(0, np.int64)
        return starts, lengths

    # --- changes --------------------------------------------------------------------
    def remap(self, b: int, p: int) -> None:
        """Entry b now maps physical block p (0: unmapped); written at the next flush."""
        self.mv[b] = p
        self.pages[b // TABLE_PER_PAGE] = True
        self._freshen(b)

    def unmap(self, b: int) -> int:
        """Unmap entry b; returns the block it mapped (0 if none)."""
        p = self.mv[b]
        if p:
            self.mv[b] = 0
            self._freshen(b)
        return p

    def map_run(self, b0: int, b1: int, p0: int) -> None:
        """Entries [b0, b1) now map the physical blocks p0, p0 + 1, ..."""
        self.table[b0:b1] = np.arange(p0, p0 + (b1 - b0), dtype=np.uint32)
        pages = range(b0 // TABLE_PER_PAGE, (b1 - 1) // TABLE_PER_PAGE + 1)
        self.pages[pages.start:pages.stop] = True
        self.dirty_pages.update(pages)
        self.fresh[b0:b1] = 1
        self.fresh_pages.update(pages)

    def _freshen(self, b: int) -> None:
        """Entry b changed: its page is written at the next flush, the block is fresh until then."""
        self.fresh[b] = 1
        self.fresh_pages.add(b // TABLE_PER_PAGE)
        self.dirty_pages.add(b // TABLE_PER_PAGE)

    def is_fresh(self, b: int) -> bool:
        return bool(self.fresh[b])

    def take_dirty(self, base: int, copy: bool) -> list[TablePage]:
        """The table pages changed so far, as (file offset, buffer) writes for
        the table at base: copies of their content now (copy), or views of the
        live table (for a caller that writes them before releasing the lock).
        The pages and the fresh blocks start over: a remap from now on is the
        next flush's, and its block is treated as durably mapped (an in-place
        write to it arms its coarse bit: more syncs at worst, never less
        tracking)."""
        pages, self.dirty_pages = sorted(self.dirty_pages), set()
        self.settle()       # in place: the hot path holds the fresh array
        raw = self.table.view(np.uint8)
        out: list[TablePage] = []
        for start, stop in page_runs(pages):
            view = raw[start * PAGE:stop * PAGE]
            out.append((base + start * PAGE, view.tobytes() if copy else view))
        return out

    def settle(self) -> None:
        """No block is fresh any more (take_dirty: their mapping is on its way to the disk)."""
        for pg in self.fresh_pages:
            self.fresh[pg * TABLE_PER_PAGE:(pg + 1) * TABLE_PER_PAGE] = 0
        self.fresh_pages.clear()

    def dirty_bytes(self) -> int:
        """Bytes of table pages changed since the last take_dirty."""
        return len(self.dirty_pages) * PAGE

    def grow(self, table: Table, capacity: int) -> None:
        """A relocated, larger table holding the same entries."""
        self.table = table
        self.mv = table.data
        self.pages = np.concatenate(
            [self.pages, np.zeros(capacity // TABLE_PER_PAGE + 1 - len(self.pages), dtype=bool)])
        fresh = lazy_zeros(capacity, np.uint8)
        fresh[:len(self.fresh)] = self.fresh
        self.fresh = fresh

    def replace(self, table: Table, capacity: int, n: int) -> None:
        """A new, durable table (revert): its first n entries may be nonzero."""
        self.table = table
        self.mv = table.data
        self.pages = np.zeros(capacity // TABLE_PER_PAGE + 1, dtype=bool)
        self.pages[np.flatnonzero(table[:n]) // TABLE_PER_PAGE] = True
        self.settle()
        if len(self.fresh) < capacity:
            self.fresh = lazy_zeros(capacity, np.uint8)


def plan_read(table: memoryview | Table, shift: int, offset: int, length: int) -> list[tuple[int, int, int]]:
    """Runs (buffer offset, physical offset or -1 for zeros, length) for a
    read through table, merging blocks that are contiguous in the file."""
    bs = 1 << shift
    plan: list[list[int]] = []
    end = offset + length
    pos = offset
    while pos < end:
        b = pos >> shift
        lo = pos - (b << shift)
        piece = min(bs - lo, end - pos)
        p = table[b]
        phys = (p << shift) + lo if p else -1
        if plan:
            last = plan[-1]
            if (phys < 0 and last[1] < 0) or (phys >= 0 and last[1] >= 0 and last[1] + last[2] == phys):
                last[2] += piece
                pos += piece
                continue
        plan.append([pos - offset, phys, piece])
        pos += piece
    return [(run[0], run[1], run[2]) for run in plan]


def validate(table: Table, n: int, what: str, fio: FileIO, hdr: L.Header, alloc: Allocator,
             allow_shared: bool = False, runs: list[tuple[int, int]] | None = None) -> None:
    """Every pointer inside the file and the refcount table, outside the
    metadata regions, held by a nonzero refcount, and (for the live table)
    mapped once.  runs: the entry ranges that may be nonzero."""
    # a data block lies wholly inside the file (a file cut inside a block is truncated)
    hi = min(fio.size() // hdr.block_size, hdr.refcount_capacity)
    meta_end = alloc.meta_end_block
    parts = []
    for lo, stop in ([(0, n)] if runs is None else runs):
        part = table[lo:stop]
        bad = _fast.check_table(part, len(part), meta_end, hi)
        if bad >= 0:
            raise CorruptImageError(
                f"{fio.path}: {what} entry {lo + bad} points to physical block {int(part[bad])}, "
                f"outside the data area [{meta_end}, {hi}) (run 'vdisk check --repair')")
        parts.append(_fast.nonzero_values(part, len(part)))
    used = np.concatenate(parts) if parts else np.empty(0, np.uint32)
    if len(used):
        for lo, hi_m in alloc.meta_ranges:
            hits = used[(used >= lo) & (used < hi_m)]
            if len(hits):
                raise CorruptImageError(
                    f"{fio.path}: {what} points into a metadata region (physical block {int(hits[0])})")
        zero = used[alloc.refcounts[used] == 0]
        if len(zero):
            raise CorruptImageError(
                f"{fio.path}: {what} references physical block {int(zero[0])} whose refcount is 0 "
                f"(run 'vdisk check --repair')")
        dup = -1 if allow_shared else _fast.find_duplicate(used, len(used), hi)
        if dup >= 0:
            raise CorruptImageError(
                f"{fio.path}: {what} maps physical block {int(used[dup])} from two entries, as if an "
                f"earlier entry maps it too (run 'vdisk check --repair')")
