"""The Disk: a sparse, crash-safe, change-tracking virtual disk in one file.

The crash contract
------------------
After a crash or power loss at any moment the image opens, and every block
reads either its content as of the last completed ``flush()`` or content
written after it: never zeros in place of flushed data, never another
block's data, never garbage.  ``check`` then finds no corruption (leaked
blocks are allowed, reported and repairable).

How: data is written before any metadata that points to it; the metadata
changes of an interval live in memory and reach the file at ``flush()`` in
a fixed order (docs/FORMAT.md, "Write order"):

1. counter pages of the tracking fold, refcount pages with increments;
2. fsync  (data, refcounts and counters durable);
3. block table pages;
4. fsync  (the new mapping is durable);
5. refcount decrements of blocks the table stopped referencing; only now
   may those blocks be reused; the coarse bits of regions not written in
   the interval are cleared (hot regions stay set: no re-arming fsync).

Geometry changes (resize, table relocation) and generation changes commit
through the header, written to the slot the current header does not occupy
and fsynced: a torn header write leaves the other slot valid.

I/O errors
----------
A failed host call (EIO, ENOSPC, ...) raises VdiskIOError with its errno,
from the call that issued it.  Then one of two things holds:

* the Disk keeps working: only when a data write of ``pwrite`` or
  ``discard`` failed (the block's data, or the coarse bit written ahead of
  it).  Nothing durable changed; blocks the request remapped are given
  back, so its range reads, byte by byte, its old or its new content.
* otherwise the Disk is *poisoned*: a metadata write, a truncate or an
  fsync failed (in flush, the fold a write triggers, checkpoint, resize,
  snapshot, delete_snapshot, revert, compact, reset_tracking or close),
  and memory and file may disagree.  It releases the file and its lock at
  once, writing nothing more; every later call, reads and flush included,
  raises VdiskIOError saying to reopen the image; close() returns quietly.
  Reads stop too: after a failed fsync the page cache may no longer hold
  what the block table points to.  A failed fsync is never retried, so no
  later flush can report a false success (the fsyncgate lesson).

Reopened, the image satisfies the crash contract above (tests/test_faults.py
fails every call site of a workload in turn and checks it).

Threads: every public method takes the Disk's lock; data I/O runs in
os.pread/os.pwrite, which release the GIL.  Processes: a writer holds an
exclusive flock on the file, readers a shared one.
"""
from __future__ import annotations

import errno
import functools
import io
import os
import struct
import threading
import time
import types
import uuid as _uuid
import weakref
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

import numpy as np

from . import _fast
from . import consumers as consumer_table
from . import layout as L
from .errors import (ClosedError, CorruptImageError, FormatError, InvalidArgumentError, OutOfRangeError,
                     ReadOnlyError, SnapshotNotFoundError, UnsupportedFeatureError, VdiskIOError)
from .errors import TO_REPLACE, NoSuchFileError, Param
from ._types import PathArg, SizeArg
from .arrays import lazy_zeros, load_array as _load_array
from .extents import Extents
from .fileio import FileIO, _io_error, fsync_dir, place_synced, refuse_if_in_use
from .layout import SUMMARY_SHIFT
from .snapshots import Snapshot, SnapshotInfo, SnapshotRecord, check_name, is_backup_snapshot, parse_table
from . import tracking as _tracking
from .tracking import ANY, ChangeTracker, CheckpointLog, _page_runs

PAGE = 4096
TABLE_PER_PAGE = PAGE // L.TABLE_ENTRY_BYTES
REFS_PER_PAGE = PAGE // L.REFCOUNT_BYTES
DEFAULT_FOLD_INTERVAL = 1 << 16   # writes between automatic folds


def _as_bytes_view(data) -> memoryview:
    if isinstance(data, np.ndarray) and not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    try:
        mv = memoryview(data)
    except TypeError:
        raise InvalidArgumentError(f"expected a bytes-like object, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _parse_block_size(block_size) -> int:
    bs = L.parse_size(block_size, "block_size")
    if bs & (bs - 1) or not (1 << L.MIN_BLOCK_SHIFT) <= bs <= (1 << L.MAX_BLOCK_SHIFT):
        raise InvalidArgumentError(f"block_size {bs}: must be a power of two from 4 KiB to 4 MiB")
    return bs


def _check_size(size: int, block_shift: int) -> None:
    if size % L.SECTOR:
        raise OutOfRangeError(f"size {size} is not a multiple of {L.SECTOR} bytes")
    if L.blocks_for(size, block_shift) > L.MAX_BLOCKS:
        fits = next((s for s in range(block_shift + 1, L.MAX_BLOCK_SHIFT + 1)
                     if L.blocks_for(size, s) <= L.MAX_BLOCKS), None)
        hint: tuple = (("; a block size of ", Param("block_size", L.format_size(1 << fits).replace(" ", "")),
                        " holds it") if fits is not None else ())
        raise OutOfRangeError.naming(
            f"size {size} needs {L.blocks_for(size, block_shift)} blocks of {1 << block_shift} bytes; "
            f"the limit is {L.MAX_BLOCKS} blocks ({L.format_size(L.MAX_BLOCKS << block_shift)})", *hint)


def _read_header(fio) -> tuple[L.Header, int]:
    """The slot with the highest sequence that passes every check (magic,
    CRC, fields, file size), and its index."""
    file_size = fio.size()
    raw = fio.pread(2 * L.SLOT_SIZE, 0)
    if raw[:8] != L.MAGIC and raw[L.SLOT_SIZE:L.SLOT_SIZE + 8] != L.MAGIC:
        raise FormatError(f"{fio.path}: not a vdisk image (no vdisk magic in either header slot)")
    valid, errors = [], []
    for i in (0, 1):
        try:
            h = L.Header.unpack(raw[i * L.SLOT_SIZE:(i + 1) * L.SLOT_SIZE])
            if h.sequence % 2 != i:
                raise CorruptImageError(f"sequence {h.sequence} does not belong in slot {i}")
            h.validate(file_size)
        except FormatError as exc:
            if raw[i * L.SLOT_SIZE:i * L.SLOT_SIZE + 8] == L.MAGIC:   # a real header we cannot read
                raise FormatError(f"{fio.path}: header slot {i}: {exc}") from None
            errors.append(f"slot {i}: {exc}")
        except CorruptImageError as exc:
            errors.append(f"slot {i}: {exc}")
        else:
            valid.append((h, i))
    if not valid:
        raise CorruptImageError(f"{fio.path}: no valid header slot ({'; '.join(errors)})")
    return max(valid, key=lambda hv: hv[0].sequence)


def _rebinds(method):
    """For Disk methods that may replace the table, refcount or tracker
    arrays, or the size: the Cython hot path is rebound before the lock is
    released, even when the method fails half-way."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            finally:
                self._rebind_hot()
    return wrapper


def _poisons(method):
    """For Disk methods that write metadata or sync: an I/O error inside
    poisons the Disk (see "I/O errors" in the module docstring)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except VdiskIOError as exc:
            self._poison(exc)
            raise
    return wrapper


def _poison_hook(ref, err) -> None:
    """FileIO's on_poison for a Disk held by weak reference (a failed fsync)."""
    disk = ref()
    if disk is not None:
        disk._poison(err)


class Disk(io.RawIOBase):
    """An open vdisk image.  Use :func:`vdisk.create` or :func:`vdisk.open`."""

    def __init__(self, fio: FileIO, header: L.Header, slot: int, writable: bool):
        super().__init__()
        self._io = fio
        self._hdr = header
        self._slot = slot
        self._writable = writable
        self._lock = threading.RLock()
        self._pos = 0
        self._shut = False
        self._closing = False
        self._poisoned: VdiskIOError | None = None   # the I/O error that stopped this Disk
        fio.on_poison = functools.partial(_poison_hook, weakref.ref(self))
        self._shift = header.block_shift           # fixed for the image's life
        self._block_mask = header.block_size - 1
        self._hot = _fast.HotPath(self, self._lock, DEFAULT_FOLD_INTERVAL)
        self._load()
        self._rebind_hot()

    def _rebind_hot(self) -> None:
        """Point the Cython hot path at the current arrays and size.  Every
        method that replaces one of them is decorated with @_rebinds."""
        t = self._tracker
        track = {} if t is None else dict(dirty=t.dirty, groups=t.dirty_groups, coarse=t._coarse, rel=t.rel_shift)
        if self._shut:
            self._hot.shut()
            return
        self._hot.bind(self._io, type(self._io) is FileIO, self._io.fd, self._table, self._refcounts, self._shift,
                       self._hdr.virtual_size, True, self._writable, summary_shift=SUMMARY_SHIFT, **track)

    @property
    def fold_interval(self) -> int:
        """Writes between automatic folds of the tracking bits into the counters."""
        return self._hot.fold_interval

    @fold_interval.setter
    def fold_interval(self, n: int) -> None:
        if n < 1:
            raise InvalidArgumentError(f"fold_interval must be at least 1, got {n}")
        self._hot.fold_interval = n

    def _fold_due(self) -> None:
        """fold_interval writes since the last fold: fold now (the hot path calls this)."""
        with self._lock:
            if self._tracker is not None and not self._shut:
                self._flush_locked()
            else:
                self._hot.writes = 0

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        h, fio = self._hdr, self._io
        file_size = fio.size()
        self._snapshots: list[SnapshotRecord] = []
        self._damaged_snapshots: list[str] = []     # records left out (read-only opens only)
        if h.snapshot_count:
            raw = fio.pread(h.snapshot_count * L.SNAPSHOT_ENTRY_SIZE, h.snapshot_offset)
            if len(raw) < h.snapshot_count * L.SNAPSHOT_ENTRY_SIZE:
                raise CorruptImageError(f"{fio.path}: snapshot table truncated")
            # a damaged record takes only its own snapshot: a reader reads the live disk and the
            # other snapshots; a writer (whose refcounts would not count the record's references) refuses
            damaged: list[str] = []
            self._snapshots = parse_table(raw, h.snapshot_count, h, file_size, damaged=damaged)
            if damaged and self._writable:
                more = f" (and {len(damaged) - 1} more damaged records)" if len(damaged) > 1 else ""
                raise CorruptImageError(f"{fio.path}: {damaged[0]}{more}; refusing to write (run 'vdisk check "
                                        f"--repair', which drops the damaged snapshot record)")
            self._damaged_snapshots = [f"{fio.path}: {msg}" for msg in damaged]
        self._consumers: list[consumer_table.ConsumerRecord] = []
        if h.consumer_count:
            raw = fio.pread(h.consumer_count * L.CONSUMER_ENTRY_SIZE, h.consumer_offset)
            if len(raw) < h.consumer_count * L.CONSUMER_ENTRY_SIZE:
                raise CorruptImageError(f"{fio.path}: consumer table truncated")
            try:
                self._consumers = consumer_table.parse_table(raw, h.consumer_count, h)
            except CorruptImageError as exc:
                raise CorruptImageError(f"{fio.path}: {exc} (run 'vdisk check --repair', which drops the "
                                        f"consumer table)") from None
        self._views: "weakref.WeakSet[Snapshot]" = weakref.WeakSet()
        self._log = CheckpointLog.load(fio, h)
        bs = h.block_size
        nb = h.nblocks
        # entries past the virtual size are never data: not even loaded
        loaded: list[tuple[int, int]] = []
        self._table = _load_array(fio, h.table_offset, h.table_capacity, np.uint32, file_size, keep=nb,
                                  ranges=loaded)
        # table pages that may hold entries: read from the file, or written since (scans skip the rest)
        self._table_pages = np.zeros(h.table_capacity // TABLE_PER_PAGE + 1, dtype=bool)
        for lo, hi in loaded:
            self._table_pages[lo // TABLE_PER_PAGE:(hi - 1) // TABLE_PER_PAGE + 1] = True
        self._end_block = -(-file_size // bs)
        self._refcounts = _load_array(fio, h.refcount_offset, h.refcount_capacity, np.uint16, file_size,
                                      keep=self._end_block)
        self._meta_end_block = L.round_up(L.HEADER_AREA, bs) // bs
        self._refresh_meta_ranges()
        self._validate_meta_refcounts()
        self._validate_table(self._table, nb, "block table", runs=self._table_runs(nb))
        if self._writable and self._snapshots:
            self._validate_shared_refcounts()
        self._table_mv = memoryview(self._table)
        self._refs_mv = memoryview(self._refcounts)
        self._dirty_table_pages: set[int] = set()
        self._fresh: set[int] = set()         # blocks remapped since the last flush
        self._dirty_ref_pages: set[int] = set()
        self._pending_decref: list[int] = []
        self._free: list[int] = []      # blocks released since open (durably unreferenced)
        self._holes: list[int] = []     # zero-refcount blocks found by the scan, lowest last
        self._scan = self._meta_end_block
        self._scan_limit = self._end_block
        self._tracker = None
        if h.tracking:
            loaded = []
            counters = _load_array(fio, h.counter_offset, h.table_capacity, np.uint32, file_size,
                                   keep=_tracking.counters_kept(h), ranges=loaded)
            bitmap = fio.pread(h.bitmap_length, h.bitmap_offset)
            self._tracker = ChangeTracker(fio, h, counters, bitmap, self._writable, loaded=loaded)

    def _table_runs(self, n: int) -> list[tuple[int, int]]:
        """Entry ranges [start, stop) below n of the table pages that may hold entries."""
        pages = np.flatnonzero(self._table_pages[:-(-n // TABLE_PER_PAGE)])
        return [(a * TABLE_PER_PAGE, min(b * TABLE_PER_PAGE, n)) for a, b in _page_runs(pages)]

    def _validate_table(self, table, n: int, what: str, allow_shared: bool = False, runs=None) -> None:
        """Every pointer inside the file and the refcount table, outside the
        metadata regions, held by a nonzero refcount, and (for the live
        table) mapped once.  runs: the entry ranges that may be nonzero."""
        h = self._hdr
        # a data block lies wholly inside the file (a file cut inside a block is truncated)
        hi = min(self._io.size() // h.block_size, h.refcount_capacity)
        parts = []
        for lo, stop in ([(0, n)] if runs is None else runs):
            part = table[lo:stop]
            bad = _fast.check_table(part, len(part), self._meta_end_block, hi)
            if bad >= 0:
                raise CorruptImageError(
                    f"{self._io.path}: {what} entry {lo + bad} points to physical block {int(part[bad])}, "
                    f"outside the data area [{self._meta_end_block}, {hi}) (run 'vdisk check --repair')")
            parts.append(_fast.nonzero_values(part, len(part)))
        used = np.concatenate(parts) if parts else np.empty(0, np.uint32)
        if len(used):
            for lo, hi_m in self._meta_ranges:
                hits = used[(used >= lo) & (used < hi_m)]
                if len(hits):
                    raise CorruptImageError(
                        f"{self._io.path}: {what} points into a metadata region (physical block {int(hits[0])})")
            zero = used[self._refcounts[used] == 0]
            if len(zero):
                raise CorruptImageError(
                    f"{self._io.path}: {what} references physical block {int(zero[0])} whose refcount is 0 "
                    f"(run 'vdisk check --repair')")
            dup = -1 if allow_shared else _fast.find_duplicate(used, len(used), hi)
            if dup >= 0:
                raise CorruptImageError(
                    f"{self._io.path}: {what} maps physical block {int(used[dup])} from two entries, as if an "
                    f"earlier entry maps it too (run 'vdisk check --repair')")

    def _validate_shared_refcounts(self) -> None:
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

        Each snapshot table is streamed from the pages the file holds, 1 MiB
        at a time, and its pointers checked as the live table's are (inside
        the data area, outside metadata; a refcount of 0 fails the count);
        the reference counts go into a lazy array (pages only where
        referenced), so memory follows the referenced blocks, not the
        virtual size (docs/FORMAT.md, "Validation at open", has the cost)."""
        h, fio = self._hdr, self._io
        file_size = fio.size()
        hi = min(file_size // h.block_size, h.refcount_capacity)
        counts = lazy_zeros(hi, np.uint16)
        refs = self._refcounts[:hi]
        meta = sorted(r for r in self._meta_ranges if r[0] < r[1])
        m_starts = np.array([lo for lo, _ in meta], np.int64)
        m_stops = np.array([stop for _, stop in meta], np.int64)
        # at most 64 Ki cells, marked where a metadata range lies: only there is a range searched
        cell_shift = max(0, hi.bit_length() - 16)
        cells = np.zeros((hi >> cell_shift) + 1, np.uint8)
        for lo, stop in meta:
            cells[lo >> cell_shift:((stop - 1) >> cell_shift) + 1] = 1

        def count(part: np.ndarray, first: int, what: str) -> None:
            bad, problem = _fast.count_refs_within(part, len(part), self._meta_end_block, hi, m_starts, m_stops,
                                                   cells, cell_shift, counts, refs)
            if bad < 0:
                return
            p = int(part[bad])
            if problem == 1:
                found = f"{what} entry {first + bad} points to physical block {p}, outside the data area " \
                        f"[{self._meta_end_block}, {hi})"
            elif problem == 2:
                found = f"{what} points into a metadata region (physical block {p}, entry {first + bad})"
            else:
                found = (f"physical block {p} has refcount {int(refs[p])}, but more tables map it ({what} "
                         f"entry {first + bad} is one more): a write could change a snapshot and a delete free "
                         f"a block in use")
            raise CorruptImageError(f"{fio.path}: {found} (run 'vdisk check --repair')")

        for lo, stop in self._table_runs(h.nblocks):
            count(self._table[lo:stop], lo, "block table")
        step = 1 << 20
        for rec in self._snapshots:
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

    def _validate_meta_refcounts(self) -> None:
        """Every block of a metadata region holds a reference (docs/FORMAT.md,
        "Refcounts"): releasing a region whose refcount says 0 would take it
        below zero."""
        for lo, hi in self._meta_ranges:
            zero = np.flatnonzero(self._refcounts[lo:hi] == 0)
            if len(zero):
                raise CorruptImageError(
                    f"{self._io.path}: metadata block {lo + int(zero[0])} has refcount 0, expected 1 "
                    f"(run 'vdisk check --repair')")

    def _metadata_regions(self) -> list[tuple[str, int, int]]:
        """Every metadata region: the header's and each snapshot's frozen tables."""
        out = list(self._hdr.regions())
        for rec in self._snapshots:
            out += rec.regions(self._hdr.block_size)
        return out

    def _refresh_meta_ranges(self) -> None:
        bs = self._hdr.block_size
        regions = self._metadata_regions()
        L.check_no_overlap(regions, self.path)
        self._meta_ranges = [(off // bs, (off + length) // bs) for _, off, length in regions]

    # ------------------------------------------------------------------ properties
    @property
    def size(self) -> int:
        return self._hdr.virtual_size

    @property
    def block_size(self) -> int:
        return self._hdr.block_size

    @property
    def uuid(self) -> _uuid.UUID:
        return _uuid.UUID(bytes=self._hdr.image_uuid)

    @property
    def path(self) -> str:
        return self._io.path

    @property
    def mode(self) -> str:
        return "r+" if self._writable else "r"

    @property
    def generation(self) -> int:
        return self._hdr.generation

    @property
    def tracking_id(self) -> str | None:
        return str(_uuid.UUID(bytes=self._hdr.tracking_uuid)) if self._tracker else None

    @property
    def change_id(self) -> str | None:
        """The id of the last point taken (None before the first, or without tracking)."""
        if self._tracker is None or self._hdr.generation <= 1:
            return None
        return _tracking.id_of(self._hdr, self._log, self._hdr.generation - 1)

    @property
    def track_changes(self) -> bool:
        return self._tracker is not None

    def info(self) -> dict:
        """A summary for ``vdisk info``."""
        with self._lock:
            self._check_open()
            h = self._hdr
            allocated = sum(int(np.count_nonzero(self._table[lo:hi])) for lo, hi in self._table_runs(h.nblocks))
            out = {
                "path": self.path,
                "format": "vdisk",
                "version": h.version,
                "virtual_size": h.virtual_size,
                "block_size": h.block_size,
                "uuid": str(self.uuid),
                "allocated_blocks": allocated,
                "allocated_bytes": allocated * h.block_size,
                "file_size": self._io.size(),
                "coarse_region_size": 1 << h.coarse_shift,
                "track_changes": self.track_changes,
                "snapshots": len(self._snapshots),
                "consumers": [{"name": r.name, "change_id": r.change_id} for r in self._consumers],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.created_ns / 1e9)),
            }
            if self._damaged_snapshots:     # left out by a read-only open ('vdisk check --repair' drops them)
                out["damaged_snapshot_records"] = len(self._damaged_snapshots)
            if self._tracker:
                out.update(generation=h.generation, tracking_id=self.tracking_id, change_id=self.change_id,
                           dirty_coarse_regions=self._tracker.dirty_regions)
            return out

    # ------------------------------------------------------------------ io.RawIOBase
    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise InvalidArgumentError(f"invalid whence {whence}")
        if pos < 0:
            raise OutOfRangeError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        mv = _as_bytes_view(buffer)
        n = max(0, min(len(mv), self.size - self._pos))
        if n:
            self.preadinto(mv[:n], self._pos)
        self._pos += n
        return n

    def write(self, data: ReadableBuffer) -> int:
        mv = _as_bytes_view(data)
        n = self.pwrite(mv, self._pos)
        self._pos += n
        return n

    # ------------------------------------------------------------------ guards
    def _check_open(self) -> None:
        if self._shut:
            if self._poisoned is not None:
                raise VdiskIOError(self._poisoned.errno,
                                   f"{self.path}: this Disk stopped at an I/O error ({self._poisoned.strerror}) "
                                   f"and wrote nothing after it; reopen the image to continue")
            raise ClosedError("I/O operation on a closed Disk")

    def _poison(self, err: VdiskIOError) -> None:
        """Stop at an I/O error after which memory and file may disagree: release
        the file (and its lock) without writing anything more; every later
        call raises VdiskIOError, reads and flush included, close() returns."""
        if self._shut:
            return
        self._shut = self._closing = True
        self._hot.shut()
        try:
            self._io.close()
            super().close()         # io's own closed flag; its flush() finds the Disk shut
        finally:
            self._closing = False
            self._poisoned = err

    def _check_writable(self) -> None:
        self._check_open()
        if not self._writable:
            raise ReadOnlyError(f"{self.path} is open read-only (open with mode='r+' to write)")

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0:
            raise OutOfRangeError(f"{what}: negative offset {offset} or length {length}")
        if offset + length > self.size:
            raise OutOfRangeError(
                f"{what} of {length} bytes at offset {offset} reaches {offset + length}, past the virtual "
                f"size {self.size}")

    # ------------------------------------------------------------------ reads
    # pread/pwrite: single-block reads and in-place writes run in Cython
    # (_fast.disk_pread / disk_pwrite, bound like methods, so the call holds
    # the Disk even when nothing else does); every other case comes back to
    # _pread_slow / _pwrite_slow below.
    pread = _fast.disk_pread
    pwrite = _fast.disk_pwrite

    def _pread_slow(self, length: int, offset: int) -> bytes:
        """length bytes at offset; never-written areas read as zeros (what
        ``pread`` does for every case the hot path hands back)."""
        if offset < 0 or length < 0 or offset + length > self._hdr.virtual_size:
            self._check_range(offset, length, "read")
        shift = self._shift
        if length and (offset >> shift) == ((offset + length - 1) >> shift):
            with self._lock:
                self._check_open()
                p = self._table_mv[offset >> shift]
                if p:
                    return self._pread_exact(length, (p << shift) | (offset & self._block_mask))
            return bytes(length)
        with self._lock:
            self._check_open()
            plan = self._plan_read(offset, length)
            if len(plan) == 1:                  # one contiguous run: no staging copy
                _, phys, n = plan[0]
                return self._pread_exact(n, phys) if phys >= 0 else bytes(n)
            buf = np.empty(length, dtype=np.uint8)
            self._read_plan(memoryview(buf), plan)
        return buf.tobytes()

    def preadinto(self, buffer: WriteableBuffer, offset: int) -> int:
        if isinstance(buffer, np.ndarray) and not buffer.flags.c_contiguous:
            staging = np.empty(buffer.shape, dtype=buffer.dtype)
            n = self.preadinto(staging, offset)
            buffer[...] = staging               # a strided view: copy into it
            return n
        mv = _as_bytes_view(buffer)
        if mv.readonly:
            raise InvalidArgumentError("preadinto needs a writable buffer")
        n = len(mv)
        self._check_range(offset, n, "read")
        with self._lock:
            self._check_open()
            self._read_plan(mv, self._plan_read(offset, n))
        return n


    def _pread_exact(self, length: int, phys: int) -> bytes:
        data = self._io.pread(length, phys)
        return data if len(data) == length else data.ljust(length, b"\0")

    def _read_through(self, table_mv, mv: memoryview, offset: int, check) -> None:
        """Read through another block table (a snapshot's) under the Disk's lock."""
        with self._lock:
            self._check_open()
            check()
            self._read_plan(mv, self._plan_read(offset, len(mv), table_mv))

    def _plan_read(self, offset: int, length: int, table=None) -> list[tuple[int, int, int]]:
        """Runs (buffer offset, physical offset or -1 for zeros, length) for a
        read, merging blocks that are contiguous in the file."""
        shift = self._hdr.block_shift
        bs = 1 << shift
        table = self._table_mv if table is None else table
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
        return [tuple(run) for run in plan]

    def _read_plan(self, mv: memoryview, plan) -> None:
        for at, phys, n in plan:
            if phys >= 0:
                self._io.preadinto(mv[at:at + n], phys)
            else:
                mv[at:at + n] = bytes(n) if n <= 65536 else np.zeros(n, np.uint8).data

    # ------------------------------------------------------------------ writes
    def _pwrite_slow(self, data: ReadableBuffer, offset: int) -> int:
        """Write data at offset; returns len(data).  Zeros written to
        unallocated blocks allocate nothing (what ``pwrite`` does for every
        case the hot path hands back)."""
        mv = _as_bytes_view(data)
        n = len(mv)
        if offset < 0 or offset + n > self._hdr.virtual_size:
            self._check_range(offset, n, "write")
        with self._lock:
            if self._shut or not self._writable:
                self._check_writable()
            if offset + n > self._hdr.virtual_size:    # another thread shrank the disk since the check
                self._check_range(offset, n, "write")
            if n:
                self._write_locked(mv, offset)
        return n


    def _write_locked(self, mv: memoryview, offset: int) -> None:
        shift = self._hdr.block_shift
        bs = 1 << shift
        table, refs = self._table_mv, self._refs_mv
        tracker = self._tracker
        end = offset + len(mv)
        b = offset >> shift
        if ((end - 1) >> shift) == b and len(mv) < bs:
            # the hot path: a partial overwrite in place of an unshared block
            p = table[b]
            if p and refs[p] == 1:
                if tracker is not None:     # tracker.mark_inplace, inlined
                    dirty, groups, coarse, rel = tracker.hot
                    dirty[b] = 1
                    groups[b >> SUMMARY_SHIFT] = 1
                    if not coarse[b >> rel] and b not in self._fresh:
                        tracker._arm(b >> rel)      # write-ahead: durable before the data
                self._io.pwrite(mv, (p << shift) + (offset & (bs - 1)))
                self._count_write()
                return
        if not offset & (bs - 1) and not len(mv) & (bs - 1) and self._appends_only():
            b1 = end >> shift
            if not self._table[b:b1].any() and not _fast.zero_blocks(mv, bs).any():
                self._append_run(mv, b, b1)     # whole new blocks of data: one run at the end
                self._count_write()
                return
        remaps: list[tuple[int, int, int]] = []   # (block, new, old): applied once the data is written
        try:
            self._write_blocks(mv, offset, remaps)
        except BaseException:
            for _b, newp, _old in remaps:           # give the new blocks back; the table never saw them
                self._refs_mv[newp] = 0
                self._free.append(newp)
            raise
        for b, newp, oldp in remaps:
            table[b] = newp
            self._table_pages[b // TABLE_PER_PAGE] = True
            self._fresh.add(b)
            self._dirty_table_pages.add(b // TABLE_PER_PAGE)
            if oldp:                                # copy-on-write away from a shared block
                self._decref_later(oldp)
        self._count_write()

    def _count_write(self) -> None:
        hot = self._hot
        hot.writes += 1
        if hot.writes >= hot.fold_interval and self._tracker is not None:
            self._flush_locked()

    def _appends_only(self) -> bool:
        """Whether the next allocations all append at the end of the file
        (no free blocks, and the scan for holes has finished)."""
        return (not self._free and not self._holes
                and self._scan >= min(self._scan_limit, self._hdr.refcount_capacity))

    def _append_run(self, mv: memoryview, b0: int, b1: int) -> None:
        """Write whole unallocated blocks [b0, b1) of data into new blocks
        appended at the end of the file: what _write_blocks does block by
        block (allocate, mark, write, then remap), for the run at once."""
        count = b1 - b0
        if self._end_block + count + 1 >= self._hdr.refcount_capacity:
            self._grow_refcounts(self._end_block + count + 2)
        p0 = self._end_block
        if p0 + count - 1 > L.MAX_PHYS_BLOCKS:
            raise OutOfRangeError(f"{self.path}: the image file reached the format's limit of "
                                  f"{L.MAX_PHYS_BLOCKS} physical blocks")
        self._end_block += count
        self._refcounts[p0:p0 + count] = 1
        self._dirty_ref_pages.update(range(p0 // REFS_PER_PAGE, (p0 + count - 1) // REFS_PER_PAGE + 1))
        if self._tracker:
            self._tracker.mark_run(b0, b1)
        try:
            self._io.pwrite(mv, p0 << self._shift)
        except BaseException:               # give the blocks back; the table never saw them
            self._refcounts[p0:p0 + count] = 0
            self._free.extend(range(p0 + count - 1, p0 - 1, -1))
            raise
        self._table[b0:b1] = np.arange(p0, p0 + count, dtype=np.uint32)
        pages = range(b0 // TABLE_PER_PAGE, (b1 - 1) // TABLE_PER_PAGE + 1)
        self._table_pages[pages.start:pages.stop] = True
        self._dirty_table_pages.update(pages)
        self._fresh.update(range(b0, b1))

    def _write_blocks(self, mv: memoryview, offset: int, remaps: list) -> None:
        """Issue the data writes of a request; remaps collects the table changes."""
        shift = self._hdr.block_shift
        bs = 1 << shift
        table, refs = self._table_mv, self._refs_mv
        tracker = self._tracker
        end = offset + len(mv)
        pos = offset
        run_phys = None              # pending contiguous physical writes: one pwritev
        run_bufs: list = []
        run_len = 0
        while pos < end:
            b = pos >> shift
            lo = pos - (b << shift)
            piece = min(bs - lo, end - pos)
            src = mv[pos - offset:pos - offset + piece]
            p = table[b]
            if p and piece == bs and _fast.is_zero(src):
                # a whole block of zeros: give the block back (detect-zeroes=unmap), shared or not
                if tracker:
                    tracker.mark(b)
                self._unmap(b)
                pos += piece
                continue
            if p and refs[p] == 1:
                if tracker:
                    if b in self._fresh:    # mapping not durable yet: the flush orders it
                        tracker.mark(b)
                    else:                   # overwrite of durable data: write-ahead coarse bit
                        tracker.mark_inplace(b)
                phys, buf = (p << shift) + lo, src
            else:
                if not p and _fast.is_zero(src):
                    pos += piece            # zeros onto zeros: nothing changes
                    continue
                if tracker:
                    tracker.mark(b)
                if piece == bs:
                    buf = src
                else:                       # partial block: zeros or the shared block's data around it
                    whole = bytearray(bs) if not p else bytearray(self._io.pread(bs, p << shift).ljust(bs, b"\0"))
                    whole[lo:lo + piece] = src
                    buf = whole
                newp = self._alloc()
                remaps.append((b, newp, p))
                phys = newp << shift
            if run_phys is not None and run_phys + run_len == phys:
                run_bufs.append(buf)
                run_len += len(buf)
            else:
                if run_phys is not None:
                    self._io.pwritev(run_bufs, run_phys)
                run_phys, run_bufs, run_len = phys, [buf], len(buf)
            pos += piece
        if run_phys is not None:
            self._io.pwritev(run_bufs, run_phys)

    def _unmap(self, b: int) -> None:
        p = self._table_mv[b]
        if p:
            self._table_mv[b] = 0
            self._fresh.add(b)
            self._dirty_table_pages.add(b // TABLE_PER_PAGE)
            self._decref_later(p)

    def discard(self, offset: int, length: int) -> None:
        """The range reads back as zeros; whole blocks are freed."""
        self._check_range(offset, length, "discard")
        with self._lock:
            self._check_writable()
            self._check_range(offset, length, "discard")    # again: a shrink may have come first
            self._discard_locked(offset, length)

    def _discard_locked(self, offset: int, length: int) -> None:
        shift = self._hdr.block_shift
        end = offset + length
        pos = offset
        while pos < end:
            b = pos >> shift
            lo = pos - (b << shift)
            block_end = min((b + 1) << shift, self.size)
            piece = min(block_end, end) - pos
            if lo == 0 and pos + piece == block_end:
                if self._table_mv[b]:
                    if self._tracker:
                        self._tracker.mark(b)
                    self._unmap(b)
            elif self._table_mv[b]:
                self._write_locked(memoryview(bytes(piece)), pos)
            pos += piece

    # ------------------------------------------------------------------ allocation
    def _find_hole(self) -> int:
        """The lowest block with refcount 0 that the file held at open, or -1.

        Scans the refcounts lazily, 64 Ki entries at a time, so opening an
        image with a huge sparse file costs nothing up front.  Blocks
        appended since open are allocated when appended, and come back
        through the free list if released.
        """
        limit = min(self._scan_limit, self._hdr.refcount_capacity)
        refs = self._refs_mv
        while True:
            while self._holes:
                p = self._holes.pop()
                if refs[p] == 0:
                    return p
            if self._scan >= limit:
                return -1
            lo, hi = self._scan, min(self._scan + 65536, limit)
            free = self._refcounts[lo:hi] == 0
            for m0, m1 in self._meta_ranges:       # never metadata, whatever its refcount says
                if m0 < hi and m1 > lo:
                    free[max(m0, lo) - lo:min(m1, hi) - lo] = False
            self._scan = hi
            self._holes = (np.flatnonzero(free)[::-1] + lo).tolist()

    def _alloc(self) -> int:
        p = -1
        while self._free and p < 0:
            q = self._free.pop()
            if self._refs_mv[q] == 0:       # not handed out by the scan meanwhile
                p = q
        if p < 0:
            p = self._find_hole()
        if p < 0:
            if self._end_block + 1 >= self._hdr.refcount_capacity:
                self._grow_refcounts(self._end_block + 2)
            p = self._end_block
            if p > L.MAX_PHYS_BLOCKS:
                raise OutOfRangeError(f"{self.path}: the image file reached the format's limit of "
                                      f"{L.MAX_PHYS_BLOCKS} physical blocks")
            self._end_block += 1
        self._refs_mv[p] = 1
        self._dirty_ref_pages.add(p // REFS_PER_PAGE)
        return p

    @_poisons
    def _alloc_run(self, count: int) -> int:
        """count contiguous new blocks at the end of the file (for metadata regions)."""
        if self._end_block + count + 1 >= self._hdr.refcount_capacity:
            self._grow_refcounts(self._end_block + count + 2)
        p = self._end_block
        self._end_block += count
        self._refcounts[p:p + count] = 1
        self._dirty_ref_pages.update(range(p // REFS_PER_PAGE, (p + count - 1) // REFS_PER_PAGE + 1))
        self._io.truncate(max(self._io.size(), self._end_block << self._hdr.block_shift))
        return p

    def _decref_later(self, p: int) -> None:
        """Drop a reference once the table that no longer holds it is durable."""
        self._pending_decref.append(p)

    # ------------------------------------------------------------------ flush
    def flush(self) -> None:
        """Make every write before this call durable (survives crash and power loss)."""
        if self._shut:
            if self._closing and self._poisoned is None:   # io.IOBase.close() flushes once more: done
                return
            self._check_open()
        with self._lock:
            self._check_open()
            if self._writable:
                self._flush_locked()

    @_poisons
    def _flush_locked(self) -> None:
        h = self._hdr
        self._hot.writes = 0
        # 1. counters of the tracking fold, refcount increments
        folded = self._tracker.fold(h.generation) if self._tracker else False
        self._write_ref_pages()
        # 2. data, refcounts and counters durable
        self._io.fsync()
        # 3-4. the new mapping
        if self._dirty_table_pages:
            self._write_pages(self._table, sorted(self._dirty_table_pages), h.table_offset)
            self._dirty_table_pages.clear()
            self._io.fsync()
        self._fresh.clear()
        # 5. references the durable table no longer holds: release them
        if self._pending_decref:
            pending, self._pending_decref = self._pending_decref, []
            refs = self._refs_mv
            for p in pending:
                refs[p] -= 1
                self._dirty_ref_pages.add(p // REFS_PER_PAGE)
                if refs[p] == 0:
                    self._free.append(p)
            self._free.sort(reverse=True)
            self._write_ref_pages()
        if self._tracker and (folded or self._tracker.dirty_regions):
            self._tracker.clear_idle_regions()

    def _write_ref_pages(self) -> None:
        if self._dirty_ref_pages:
            self._write_pages(self._refcounts, sorted(self._dirty_ref_pages), self._hdr.refcount_offset)
            self._dirty_ref_pages.clear()

    def _write_pages(self, arr: np.ndarray, pages, base: int) -> None:
        raw = arr.view(np.uint8)
        for start, stop in _page_runs(pages):
            self._io.pwrite(raw[start * PAGE:stop * PAGE], base + start * PAGE)

    @_poisons
    def _commit_header(self) -> None:
        """Write the header to the other slot and fsync: the atomic commit point.

        Never writes a slot a reader would refuse: a sequence past
        L.MAX_SEQUENCE (EOVERFLOW), or a header that fails validation or
        does not pack (EINVAL), raises VdiskIOError instead, which poisons
        the Disk: memory is ahead of the file, which keeps its last commit.
        Operations check their own counters before writing anything; this
        is the backstop."""
        h = self._hdr
        if h.sequence >= L.MAX_SEQUENCE:
            raise VdiskIOError(errno.EOVERFLOW, f"{self.path}: header sequence {h.sequence} reached the format's "
                                                f"limit {L.MAX_SEQUENCE}; nothing committed (run 'vdisk check "
                                                f"--repair', which renumbers it)")
        h.sequence += 1
        try:
            h.validate()            # what every reader checks (but the file size): a slot they would refuse
            raw = h.pack()          # is never written
        except (CorruptImageError, struct.error) as exc:
            h.sequence -= 1
            raise VdiskIOError(errno.EINVAL, f"{self.path}: the header to commit would not pass validation "
                                             f"({exc}); nothing committed") from None
        slot = h.sequence % 2
        self._io.pwrite(raw, L.SLOT_OFFSETS[slot])
        self._io.fsync()
        self._slot = slot

    # ------------------------------------------------------------------ tracking
    @_poisons
    def checkpoint(self) -> str:
        """Fold and persist tracking, advance the generation; returns the id of this point."""
        with self._lock:
            self._check_writable()
            self._require_tracking()
            self._flush_locked()
            if self._hdr.generation >= L.MAX_GENERATION:
                raise OutOfRangeError("the generation counter is exhausted; call reset_tracking()")
            token = self._issue_token()
            self._io.fsync()                # the token durable before the commit that issues it
            self._hdr.generation += 1
            self._commit_header()
            return _tracking.format_change_id(self._hdr.tracking_uuid, self._hdr.generation - 1, token)

    def _issue_token(self) -> int:
        """Draw the token of the generation about to close and write it to the
        checkpoint log (not synced: the caller syncs before the header commit).
        A legacy image gets its log here, named by the same commit: tokenless
        ids below the current generation stay valid (legacy_generation)."""
        h = self._hdr
        if self._log is None:
            cap = L.log_capacity_for(h.block_size)
            nbytes = L.round_up(cap * L.LOG_ENTRY_SIZE, h.block_size)
            first = self._alloc_run(nbytes // h.block_size)
            self._write_ref_pages()
            self._log = CheckpointLog(self._io, first * h.block_size, cap)
            h.log_offset, h.log_capacity, h.legacy_generation = first * h.block_size, cap, h.generation
            h.incompatible_features |= L.INCOMPAT_CHECKPOINT_LOG
            self._refresh_meta_ranges()
        token = _tracking.new_token()
        self._log.write(h.generation, token)
        return token

    def _resolve(self, change_id) -> int:
        """The generation a change id names, if this image issued it (else StaleChangeIdError)."""
        return _tracking.resolve(change_id, self._hdr, self._log)

    def _resolve_for_snapshot(self, change_id, rec: SnapshotRecord) -> int:
        """The generation an id names on a snapshot's view: its own id, or an
        id of the image before it (same epoch, the log's token)."""
        with self._lock:
            self._check_open()
            h = self._hdr
            if rec.tracking_uuid != h.tracking_uuid:
                # a snapshot of an earlier epoch: its tokenless ids cannot be told apart any more
                h = types.SimpleNamespace(tracking_uuid=rec.tracking_uuid, generation=rec.generation + 1,
                                          legacy_generation=0)
            return _tracking.resolve(change_id, h, self._log, limit=rec.generation + 1,
                                     own=(rec.generation, rec.token))

    def changes_since(self, change_id: str | None) -> Extents:
        """Extents of every block changed after the point named by change_id.

        ``"*"`` means every allocated extent (a first, full backup).  An id
        this image did not issue (another copy's, see docs/FORMAT.md,
        "Checkpoint log") raises StaleChangeIdError.
        """
        with self._lock:
            self._check_open()
            tracker = self._require_tracking()
            if change_id == ANY:
                return self._map_locked()
            return tracker.changes_since(self._resolve(change_id))

    def changes_in(self, change_id: str | None, offset: int, length: int) -> Extents:
        """The extents of changes_since(change_id) that meet [offset, offset + length),
        clipped to it; the cost is that of the range's blocks (one summary check per
        32 blocks), not the disk's (the NBD server answers block status with it)."""
        self._check_range(offset, length, "changes_in")
        with self._lock:
            self._check_open()
            tracker = self._require_tracking()
            if change_id == ANY:
                return self.map_range(offset, length)
            since = self._resolve(change_id)        # a stale id raises even for an empty range
            return self._clipped_runs(offset, length, lambda b0, b1: tracker.changed_blocks_in(since, b0, b1))

    @_rebinds
    @_poisons
    def reset_tracking(self) -> None:
        """Start a new tracking epoch: every id handed out so far becomes stale."""
        with self._lock:
            self._check_writable()
            tracker = self._require_tracking()
            self._flush_locked()
            h = self._hdr
            # the new epoch's counters: a fresh region past the end of the file (zeros), named by
            # the same commit as the new epoch; a crash shows the old epoch with its own counters
            length = L.round_up(h.table_capacity * L.COUNTER_BYTES, h.block_size)
            first = self._alloc_run(length // h.block_size)
            # every consumer's id becomes stale: a table without them, named by the same commit
            old_offset = h.counter_offset

            def new_epoch(h):
                h.counter_offset = first * h.block_size
                h.tracking_uuid = L.new_uuid()
                h.generation = 1
                if h.has_log:       # no tokenless id of the new epoch was ever issued
                    h.legacy_generation = 1
            cleared = consumer_table.cleared(self._consumers, time.time_ns())
            self._commit_entry_table("consumer", cleared, L.CONSUMER_ENTRY_SIZE, L.MAX_CONSUMERS, new_epoch)
            tracker.reset()
            self._consumers = cleared
            self._refresh_meta_ranges()
            self._release_run(old_offset, length)
            self._flush_locked()

    def _require_tracking(self) -> ChangeTracker:
        if self._tracker is None:
            raise UnsupportedFeatureError.naming(f"{self.path}: change tracking is off for this image (create it "
                                                 f"with ", Param("track_changes", True), ")")
        return self._tracker

    # ------------------------------------------------------------------ snapshots
    @property
    def snapshots(self) -> list[SnapshotInfo]:
        """SnapshotInfo(name, change_id, generation, created, size) of every snapshot, oldest first."""
        with self._lock:
            self._check_open()
            return [rec.info() for rec in self._snapshots]

    def _find_snapshot(self, name) -> SnapshotRecord:
        for rec in self._snapshots:
            if rec.name == name:
                return rec
        raise SnapshotNotFoundError(f"{self.path}: no snapshot named {name!r}")

    def _load_frozen(self, offset: int, size: int) -> np.ndarray:
        nb = L.blocks_for(size, self._hdr.block_shift)
        return _load_array(self._io, offset, max(nb, 1), np.uint32, self._io.size())

    def _write_entry_table(self, records, entry_size: int, limit: int) -> tuple[int, int]:
        """A new copy of a snapshot or consumer table in fresh blocks: (offset, capacity)."""
        if not records:
            return 0, 0
        bs = self._hdr.block_size
        nbytes = L.round_up(len(records) * entry_size, bs)
        first = self._alloc_run(nbytes // bs)
        self._io.pwrite(b"".join(rec.pack() for rec in records), first * bs)
        return first * bs, min(nbytes // entry_size, limit)

    def _release_run(self, offset: int, nbytes: int) -> None:
        bs = self._hdr.block_size
        self._pending_decref.extend(range(offset // bs, (offset + nbytes) // bs))

    @_poisons
    def snapshot(self, name: str | None = None) -> Snapshot:
        """Take a snapshot: no data is copied.  Folds tracking and closes the
        current generation; returns the read-only view."""
        with self._lock:
            self._check_writable()
            h = self._hdr
            if len(self._snapshots) >= L.MAX_SNAPSHOTS:
                raise OutOfRangeError(f"{self.path}: the image holds the maximum of {L.MAX_SNAPSHOTS} snapshots")
            taken = {rec.name for rec in self._snapshots}
            if name is None:
                name = f"snap-{h.snapshot_next_id}"
                while name in taken:
                    name += "-"
            name = check_name(name, taken)
            # every counter this commit advances, checked before anything is written
            if h.generation >= L.MAX_GENERATION:
                raise OutOfRangeError("the generation counter is exhausted; call reset_tracking()")
            if h.snapshot_next_id >= L.MAX_SNAPSHOT_ID:
                raise OutOfRangeError(f"{self.path}: snapshot ids are exhausted (snapshot_next_id "
                                      f"{h.snapshot_next_id}, limit {L.MAX_SNAPSHOT_ID})")
            self._flush_locked()
            bs, nb = h.block_size, h.nblocks
            frozen = lazy_zeros(max(nb, 1), np.uint32)      # copied where the live table may hold entries
            for lo, hi in self._table_runs(nb):
                frozen[lo:hi] = self._table[lo:hi]
            used = _fast.nonzero_values(frozen, nb)
            if len(used) and self._refcounts[used].max() >= L.MAX_REFCOUNT:    # before any block is allocated
                raise OutOfRangeError(f"{self.path}: a block would exceed {L.MAX_REFCOUNT} references "
                                      f"(run 'vdisk check --repair' if the image leaks)")
            tbytes = L.round_up(max(nb, 1) * 4, bs)
            # 1. the frozen table and counters, in fresh blocks
            first = self._alloc_run(2 * (tbytes // bs))
            t_off, c_off = first * bs, first * bs + tbytes
            self._write_nonzero_pages(frozen, t_off)
            if self._tracker:
                self._write_nonzero_pages(self._tracker.counters[:max(nb, 1)], c_off)
            # 2. every block the live table maps gains a reference
            self._refcounts[used] += 1
            self._dirty_ref_pages.update(np.unique(used // REFS_PER_PAGE).tolist())
            token = self._issue_token()     # synced with the new table, before the commit
            rec = SnapshotRecord(snapshot_id=h.snapshot_next_id, generation=h.generation, virtual_size=h.virtual_size,
                                 created_ns=time.time_ns(), table_offset=t_off, counter_offset=c_off,
                                 tracking_uuid=h.tracking_uuid, name=name, token=token)
            records = self._snapshots + [rec]
            # 3. a new snapshot table; everything durable before the header names it
            self._commit_snapshot_table(records, advance=True)
            view = Snapshot(self, rec, frozen)
            self._views.add(view)
            return view

    def _commit_snapshot_table(self, records, advance: bool = False) -> None:
        def header_update(h):
            if advance:
                h.snapshot_next_id += 1
                h.generation += 1
        self._commit_entry_table("snapshot", records, L.SNAPSHOT_ENTRY_SIZE, L.MAX_SNAPSHOTS, header_update)
        self._snapshots = records
        self._refresh_meta_ranges()

    def _commit_entry_table(self, kind: str, records, entry_size: int, limit: int, header_update=None) -> None:
        """A new copy of the snapshot or consumer table (kind) in fresh blocks,
        durable before the header names it; the old copy is released after."""
        h = self._hdr
        old_off, old_cap = getattr(h, f"{kind}_offset"), getattr(h, f"{kind}_capacity")
        off, cap = self._write_entry_table(records, entry_size, limit)
        self._write_ref_pages()
        self._io.fsync()
        setattr(h, f"{kind}_offset", off)
        setattr(h, f"{kind}_capacity", cap)
        setattr(h, f"{kind}_count", len(records))
        if header_update:
            header_update(h)
        self._commit_header()
        if old_off:
            self._release_run(old_off, L.round_up(old_cap * entry_size, h.block_size))

    # ------------------------------------------------------------------ consumers
    @property
    def consumers(self) -> consumer_table.Consumers:
        """The named backup consumers stored in the image (vdisk/consumers.py)."""
        return consumer_table.Consumers(self)

    @_poisons
    def _change_consumers(self, op: str, name, change_id):
        with self._lock:
            self._check_writable()
            self._require_tracking()
            records, rec = consumer_table.apply(self._consumers, op, name, change_id, self._hdr, time.time_ns(),
                                                 self._resolve)
            self._flush_locked()
            self._commit_consumer_table(records)
            self._flush_locked()            # the old copy's blocks are free again
            return rec.info() if rec is not None else None

    def _commit_consumer_table(self, records) -> None:
        self._commit_entry_table("consumer", records, L.CONSUMER_ENTRY_SIZE, L.MAX_CONSUMERS)
        self._consumers = records
        self._refresh_meta_ranges()

    def open_snapshot(self, name: str) -> Snapshot:
        """A read-only view of an existing snapshot."""
        with self._lock:
            self._check_open()
            rec = self._find_snapshot(name)
            frozen = self._load_frozen(rec.table_offset, rec.virtual_size)
            self._validate_table(frozen, L.blocks_for(rec.virtual_size, self._hdr.block_shift),
                                 f"snapshot {name!r} table", allow_shared=True)
            view = Snapshot(self, rec, frozen)
            self._views.add(view)
            return view

    def _drop_orphan_backup_snapshots(self) -> list[str]:
        """Delete the temporary snapshots of backups that never finished (a
        crash, an error while deleting them): those no open view in this
        process reads.  No other process reads them: a writer holds the
        image's exclusive lock.  Returns their names."""
        with self._lock:
            self._check_writable()
            in_use = {view._rec.name for view in list(self._views) if not view.closed}
            orphans = [rec.name for rec in self._snapshots
                       if is_backup_snapshot(rec.name) and rec.name not in in_use]
            for name in orphans:
                self.delete_snapshot(name)
            return orphans

    @_poisons
    def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot; blocks no longer referenced become free."""
        with self._lock:
            self._check_writable()
            rec = self._find_snapshot(name)
            self._flush_locked()
            frozen = self._load_frozen(rec.table_offset, rec.virtual_size)
            nb = L.blocks_for(rec.virtual_size, self._hdr.block_shift)
            self._commit_snapshot_table([r for r in self._snapshots if r is not rec])
            # after the commit: drop the references the snapshot held
            self._pending_decref.extend(_fast.nonzero_values(frozen, nb).tolist())
            self._release_run(rec.table_offset, 2 * rec.table_bytes(self._hdr.block_size))
            for view in list(self._views):
                if view._rec is rec:
                    view.close()
            self._flush_locked()

    @_rebinds
    @_poisons
    def revert(self, name: str) -> None:
        """The live disk becomes the snapshot's content (and size).  Every block
        that differs is marked changed in the current generation, so every
        consumer's change id stays valid."""
        with self._lock:
            self._check_writable()
            rec = self._find_snapshot(name)
            self._flush_locked()
            h = self._hdr
            bs, shift = h.block_size, h.block_shift
            nb_s = L.blocks_for(rec.virtual_size, shift)
            frozen = self._load_frozen(rec.table_offset, rec.virtual_size)
            # it becomes the live table: each block mapped once (a snapshot is a copy of a live table;
            # a duplicate would take one reference for two entries below)
            self._validate_table(frozen, nb_s, f"snapshot {name!r} table")
            used = _fast.nonzero_values(frozen, nb_s)
            # a refcount at the cap is allowed (a leak) but cannot take the new table's reference:
            # refused before anything changes (the table growth below included), as snapshot() does
            # (uint16 would wrap to 0: a free block)
            if len(used) and self._refcounts[used].max() >= L.MAX_REFCOUNT:
                raise OutOfRangeError(f"{self.path}: a block would exceed {L.MAX_REFCOUNT} references "
                                      f"(run 'vdisk check --repair' if the image leaks)")
            if nb_s > h.table_capacity:
                self._grow_tables(nb_s)
            nb_old = h.nblocks
            table = lazy_zeros(h.table_capacity, np.uint32)
            table[:nb_s] = frozen[:nb_s]
            # 1. tracking: blocks whose mapping changes, and a grown area, changed now
            if self._tracker:
                differ = np.flatnonzero(table[:nb_s] != self._table[:nb_s])
                self._tracker.dirty[differ] = 1
                self._tracker.dirty_groups[np.unique(differ >> SUMMARY_SHIFT)] = 1
                if nb_s > nb_old or rec.virtual_size > h.virtual_size:
                    first = h.virtual_size >> shift
                    self._tracker.dirty[first:nb_s] = 1
                    self._tracker.dirty_groups[first >> SUMMARY_SHIFT:((nb_s - 1) >> SUMMARY_SHIFT) + 1] = 1
                self._tracker.fold(h.generation, nblocks=nb_s)
            # 2. the new live table in fresh blocks, its references counted
            tbytes = L.round_up(h.table_capacity * 4, bs)
            first = self._alloc_run(tbytes // bs)
            self._write_nonzero_pages(table, first * bs)
            self._refcounts[used] += 1
            self._dirty_ref_pages.update(np.unique(used // REFS_PER_PAGE).tolist())
            self._write_ref_pages()
            self._io.fsync()
            # 3. commit; then drop the old table's references
            old_off = h.table_offset
            old_used = _fast.nonzero_values(self._table, nb_old)
            h.table_offset, h.virtual_size = first * bs, rec.virtual_size
            self._commit_header()
            self._table = table
            self._table_mv = memoryview(table)
            self._table_pages = np.zeros(h.table_capacity // TABLE_PER_PAGE + 1, dtype=bool)
            self._table_pages[np.flatnonzero(table[:nb_s]) // TABLE_PER_PAGE] = True
            self._fresh.clear()
            self._refresh_meta_ranges()
            self._pending_decref.extend(old_used.tolist())
            self._release_run(old_off, tbytes)
            self._pos = min(self._pos, h.virtual_size)
            self._flush_locked()

    @_poisons
    def compact(self, *, progress: Callable[[int, int], None] | None = None) -> int:
        """Give unused space back to the file system: punch holes over free
        blocks and cut free blocks off the end of the file.  Returns the
        number of bytes released.  progress(done_blocks, total_blocks): called
        as the free runs are punched, finally with done == total."""
        with self._lock:
            self._check_writable()
            self._flush_locked()
            self._io.fsync()                 # the released refcounts are durable first
            bs = self._hdr.block_size
            used, last = self._used_blocks()
            released = 0
            starts, lengths = _fast.nonzero_runs((~used[:last]).astype(np.uint32), 0, last)
            for start, n in zip(starts.tolist(), lengths.tolist()):
                if self._io.punch_hole(start * bs, n * bs):
                    released += n * bs
                if progress is not None:
                    progress(start + n, self._end_block)
            released += self._cut_tail(last)
            self._io.fsync()
            if progress is not None:
                progress(self._end_block, self._end_block)
            return released

    def _used_blocks(self) -> tuple[np.ndarray, int]:
        """(used, last): which blocks a refcount or a metadata region holds,
        and the end of the last one."""
        end = min(self._end_block, self._hdr.refcount_capacity)
        used = self._refcounts[:end] != 0
        for lo, hi in self._meta_ranges:
            used[lo:min(hi, end)] = True
        used[:self._meta_end_block] = True
        last = int(np.flatnonzero(used)[-1]) + 1 if used.any() else self._meta_end_block
        return used, last

    def _cut_tail(self, last: int) -> int:
        """Truncate the free blocks past block last off the file (the
        released refcounts must be durable); returns the bytes cut."""
        if last >= self._end_block:
            return 0
        cut = (self._end_block - last) * self._hdr.block_size
        self._io.truncate(last * self._hdr.block_size)
        self._end_block = last
        self._free = [p for p in self._free if p < last]
        self._holes = [p for p in self._holes if p < last]
        self._scan = min(self._scan, last)
        self._scan_limit = min(self._scan_limit, last)
        return cut

    # ------------------------------------------------------------------ map
    def map(self) -> Extents:
        """Allocated (data) extents."""
        with self._lock:
            self._check_open()
            return self._map_locked()

    def host_map(self) -> list[tuple[int, int, int]]:
        """The data extents with where they are in the file: (offset, length,
        host offset) runs, each contiguous in the image file, in disk order
        (what ``qemu-img map`` lists as ``offset``)."""
        with self._lock:
            self._check_open()
            return [(o + at, n, phys) for o, length in self._map_locked()
                    for at, phys, n in self._plan_read(o, length)]

    def map_range(self, offset: int, length: int) -> Extents:
        """The allocated extents of map() that meet [offset, offset + length),
        clipped to it; the cost is that of the range's blocks, not the
        disk's (the NBD server answers block status and reads with it)."""
        self._check_range(offset, length, "map")
        with self._lock:
            self._check_open()
            return self._clipped_runs(offset, length, lambda b0, b1: _fast.nonzero_runs(self._table, b0, b1))

    def _clipped_runs(self, offset: int, length: int, block_runs) -> Extents:
        """The runs block_runs(b0, b1) gives for the blocks [offset, offset + length)
        meets, as byte extents clipped to that range (map_range, changes_in)."""
        if not length:
            return Extents()
        shift = self._hdr.block_shift
        b0, b1 = offset >> shift, ((offset + length - 1) >> shift) + 1
        starts, lengths = block_runs(b0, b1)
        ext = Extents.from_block_runs(starts, lengths, shift, self.size)
        if len(ext):
            ends = np.minimum(ext.offsets + ext.lengths, np.uint64(offset + length))
            offs = np.maximum(ext.offsets, np.uint64(offset))
            ext = Extents(offs, ends - offs)
        return ext

    def _map_locked(self) -> Extents:
        runs = [_fast.nonzero_runs(self._table, lo, hi) for lo, hi in self._table_runs(self._hdr.nblocks)]
        starts = np.concatenate([r[0] for r in runs]) if runs else np.empty(0, np.int64)
        lengths = np.concatenate([r[1] for r in runs]) if runs else np.empty(0, np.int64)
        return Extents.from_block_runs(starts, lengths, self._hdr.block_shift, self.size)

    # ------------------------------------------------------------------ resize
    @_rebinds
    @_poisons
    def resize(self, new_size: SizeArg) -> None:
        """Grow or shrink the virtual disk.  A grown area reads as zeros and
        counts as changed; a shrink frees the blocks past the new end."""
        new_size = L.parse_size(new_size, "size")
        _check_size(new_size, self._hdr.block_shift)
        with self._lock:
            self._check_writable()
            h = self._hdr
            old_size, old_nb = h.virtual_size, h.nblocks
            self._flush_locked()        # a resize is a barrier, even to the same size
            if new_size == old_size:
                return
            new_nb = L.blocks_for(new_size, h.block_shift)
            if new_size > old_size:
                if new_nb > h.table_capacity:
                    self._grow_tables(new_nb)
                h.virtual_size = new_size
                if self._tracker:       # the grown area (and the old last block) count as changed
                    first = old_size >> h.block_shift
                    self._tracker.mark_range(first, new_nb)
                self._commit_header()
            else:
                tail = new_size % h.block_size
                if tail and self._table_mv[new_nb - 1]:   # zero the cut-off part of the new last block
                    cut = min(old_size, new_nb << h.block_shift) - new_size
                    self._write_locked(memoryview(bytes(cut)), new_size)
                if self._tracker:       # a crash before the commit shows the old size with these
                    # zeroed: their armed regions report them
                    self._tracker.mark_range(new_nb, old_nb, dirty=False)
                for b in np.flatnonzero(self._table[new_nb:old_nb]).tolist():
                    self._unmap(new_nb + b)
                    if self._tracker:   # and so do their counters (folded below): also when the
                        self._tracker.mark(new_nb + b)      # commit is lost later (a damaged header slot)
                self._flush_locked()    # the table past the new end is zero and durable ...
                h.virtual_size = new_size
                self._commit_header()   # ... before the header shrinks
            self._pos = min(self._pos, new_size) if self._pos > new_size else self._pos

    @_rebinds
    @_poisons
    def _grow_tables(self, need: int) -> None:
        """Relocate the block table and the counters to a larger region at the end of the file."""
        h = self._hdr
        bs = h.block_size
        cap = min(L.MAX_BLOCKS, max(need, 2 * h.table_capacity))
        tbytes = L.round_up(cap * 4, bs)
        cap = tbytes // 4
        nblk = tbytes // bs
        first = self._alloc_run(2 * nblk)
        t_off, c_off = first * bs, (first + nblk) * bs
        table = lazy_zeros(cap, np.uint32)
        table[:h.table_capacity] = self._table
        self._write_nonzero_pages(table, t_off)
        old = [(h.table_offset, h.table_capacity), (h.counter_offset, h.table_capacity)]
        if self._tracker:
            self._tracker.grow_arrays(cap)
            self._write_nonzero_pages(self._tracker.counters, c_off)
        self._write_ref_pages()
        self._io.fsync()
        coarse = L.coarse_shift_for(cap, h.block_shift)
        h.table_offset, h.counter_offset, h.table_capacity = t_off, c_off, cap
        if coarse != h.coarse_shift:
            h.coarse_shift = coarse      # all coarse bits are clear: flushed just before
        h.bitmap_length = L.bitmap_length_for(cap, h.block_shift, h.coarse_shift)
        self._commit_header()
        self._refresh_meta_ranges()
        if self._tracker:
            self._tracker.recoarsen()
            self._io.pwrite(bytes(h.bitmap_length), h.bitmap_offset)
        self._table = table
        self._table_mv = memoryview(table)
        self._table_pages = np.concatenate(
            [self._table_pages, np.zeros(cap // TABLE_PER_PAGE + 1 - len(self._table_pages), dtype=bool)])
        for off, capacity in old:       # the old regions are unreferenced now
            nbytes = L.round_up(capacity * 4, bs)
            for p in range(off // bs, (off + nbytes) // bs):
                self._pending_decref.append(p)
        self._flush_locked()

    @_rebinds
    @_poisons
    def _grow_refcounts(self, need: int) -> None:
        """Relocate the refcount table to a larger region at the end of the file."""
        h = self._hdr
        bs = h.block_size
        cap = max(need, h.refcount_capacity + h.refcount_capacity // 2)
        while True:
            rbytes = L.round_up(cap * L.REFCOUNT_BYTES, bs)
            nblk = rbytes // bs
            if self._end_block + nblk + 2 <= cap:
                break
            cap = self._end_block + nblk + 2 + 1024
        cap = min(rbytes // L.REFCOUNT_BYTES, L.MAX_PHYS_BLOCKS)
        first = self._end_block
        self._end_block += nblk
        self._io.truncate(max(self._io.size(), self._end_block * bs))
        refs = lazy_zeros(cap, np.uint16)
        kept = len(self._refcounts)
        refs[:kept] = self._refcounts
        refs[first:first + nblk] = 1
        old_off, old_cap = h.refcount_offset, h.refcount_capacity
        self._refcounts = refs
        self._refs_mv = memoryview(refs)
        # only the old entries and the new region's own can be nonzero: scanning the whole array would
        # touch every page of a capacity that the end of a huge sparse file asks for (fuzz finding)
        self._write_nonzero_pages(refs[:kept], first * bs)
        self._write_nonzero_pages(refs[first:first + nblk], first * bs + first * L.REFCOUNT_BYTES)
        self._io.fsync()
        h.refcount_offset, h.refcount_capacity = first * bs, cap
        self._commit_header()
        self._refresh_meta_ranges()
        self._dirty_ref_pages.clear()
        old_blocks = L.round_up(old_cap * L.REFCOUNT_BYTES, bs) // bs
        for p in range(old_off // bs, old_off // bs + old_blocks):
            self._pending_decref.append(p)

    def _write_nonzero_pages(self, arr: np.ndarray, base: int) -> None:
        """Write the 4 KiB pages of arr that hold a nonzero byte, 1 MiB of arr at a time."""
        raw = arr.view(np.uint8)
        step = 256 * PAGE
        pages = []
        for lo in range(0, raw.nbytes, step):
            seg = raw[lo:lo + step]
            whole = len(seg) // PAGE
            pages.append(np.flatnonzero(seg[:whole * PAGE].reshape(whole, PAGE).any(axis=1)) + lo // PAGE)
            if len(seg) % PAGE and seg[whole * PAGE:].any():
                pages.append(np.array([lo // PAGE + whole]))
        for start, stop in _page_runs(np.concatenate(pages) if pages else []):
            self._io.pwrite(raw[start * PAGE:stop * PAGE], base + start * PAGE)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        if self._shut:
            return
        try:
            with self._lock:
                if self._writable and self._io.poisoned is None:
                    try:
                        self._flush_locked()
                        if self._tracker:    # counters are durable: a clean close leaves no bit set
                            self._tracker.clear_idle_regions(everything=True)
                        self._io.fsync()     # the decrements and cleared bits of the last flush
                        # free blocks at the end go (a snapshot delete's): check then
                        # reports any data past the last used block as a killed writer's
                        if self._cut_tail(self._used_blocks()[1]):
                            self._io.fsync()
                    except VdiskIOError as exc:
                        self._poison(exc)    # a later flush() must not report success
                        raise
        finally:
            self._shut = self._closing = True
            self._hot.shut()
            self._io.close()
            super().close()

    @property
    def closed(self) -> bool:
        return self._shut

    def __enter__(self) -> "Disk":
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._shut else self.mode
        return f"<vdisk.Disk {self.path!r} size={self.size} block_size={self.block_size} {state}>"

    def __del__(self):
        try:
            if not self._shut:
                self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------- create / open
def create(path: PathArg, size: SizeArg, block_size: SizeArg = "64KiB", *, overwrite: bool = False,
           track_changes: bool = True, coarse_region_size: SizeArg | None = None,
           io_factory: Callable[..., FileIO] = FileIO) -> Disk:
    """Create a new image and return it open for writing (mode "r+").

    The image is built under a temporary name and moved into place only
    when complete and synced, so a crash never leaves a half-made image
    under ``path``.  An existing file is refused unless ``overwrite=True``.
    """
    path = os.fspath(path)
    size = L.parse_size(size, "size")
    bs = _parse_block_size(block_size)
    shift = bs.bit_length() - 1
    _check_size(size, shift)
    if os.path.isdir(path):
        raise InvalidArgumentError(f"{path} is a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):      # name path, not the temporary file
        raise NoSuchFileError(path, f"directory {os.path.dirname(os.path.abspath(path))} does not exist")
    if os.path.exists(path) and not overwrite:
        raise InvalidArgumentError.naming(f"{path} exists (", *TO_REPLACE, ")")
    if overwrite:
        refuse_if_in_use(path)

    nb = L.blocks_for(size, shift)
    tbytes = L.round_up(max(nb, 1) * L.TABLE_ENTRY_BYTES, bs)
    cap = tbytes // L.TABLE_ENTRY_BYTES
    coarse = L.coarse_shift_for(cap, shift)
    if coarse_region_size is not None:
        crs = L.parse_size(coarse_region_size, "coarse_region_size")
        if crs & (crs - 1) or crs < bs or crs.bit_length() - 1 > L.MAX_COARSE_SHIFT:
            raise InvalidArgumentError(f"coarse_region_size {crs}: must be a power of two >= the block size")
        if L.regions_for(cap, crs.bit_length() - 1 - shift) > L.MAX_BITMAP_LENGTH * 8:
            raise InvalidArgumentError(f"coarse_region_size {crs}: the bitmap would exceed "
                                       f"{L.MAX_BITMAP_LENGTH} bytes for this size")
        coarse = crs.bit_length() - 1
    header_blocks = L.round_up(L.HEADER_AREA, bs) // bs
    log_cap = L.log_capacity_for(bs)
    log_blocks = L.round_up(log_cap * L.LOG_ENTRY_SIZE, bs) // bs
    meta_blocks = header_blocks + 2 * (tbytes // bs) + log_blocks
    rcap = meta_blocks + nb + nb // 8 + 64
    while True:
        rbytes = L.round_up(rcap * L.REFCOUNT_BYTES, bs)
        if rcap >= meta_blocks + rbytes // bs + nb // 8 + 64:
            break
        rcap = meta_blocks + rbytes // bs + nb + nb // 8 + 64
    rcap = rbytes // L.REFCOUNT_BYTES
    end_blocks = meta_blocks + rbytes // bs
    hdr = L.Header(
        virtual_size=size, block_shift=shift, coarse_shift=coarse, image_uuid=L.new_uuid(),
        tracking_uuid=L.new_uuid(), generation=1,
        table_offset=header_blocks * bs, table_capacity=cap,
        counter_offset=(header_blocks + tbytes // bs) * bs,
        log_offset=(header_blocks + 2 * (tbytes // bs)) * bs, log_capacity=log_cap, legacy_generation=1,
        incompatible_features=L.INCOMPAT_CHECKPOINT_LOG,
        refcount_offset=meta_blocks * bs, refcount_capacity=rcap,
        bitmap_length=L.bitmap_length_for(cap, shift, coarse),
        flags=L.FLAG_TRACKING if track_changes else 0, created_ns=time.time_ns(), sequence=1)
    hdr.validate(end_blocks * bs)

    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{_uuid.uuid4().hex[:8]}.creating")
    fio = io_factory(tmp, writable=True, create=True)
    try:
        fio.lock(exclusive=True)
        fio.truncate(end_blocks * bs)
        refs = np.zeros(rcap, dtype=np.uint16)
        refs[:end_blocks] = 1
        raw = refs.view(np.uint8)[:L.round_up(end_blocks * 2, PAGE)]
        fio.pwrite(raw, hdr.refcount_offset)
        fio.pwrite(hdr.pack(), L.SLOT_OFFSETS[1])
        fio.fsync()
        if overwrite:
            os.replace(tmp, path)
            fsync_dir(directory)
        else:
            place_synced(tmp, path, TO_REPLACE)   # a failed fsync takes it away
        fio.path = path
    except BaseException:
        fio.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Disk(fio, hdr, 1, writable=True)


def open(path: PathArg, mode: str = "r", *, io_factory: Callable[..., FileIO] = FileIO) -> Disk:  # noqa: A001 - the API's name
    """Open an existing image: mode "r" (default, shared lock) or "r+" (exclusive)."""
    if mode not in ("r", "r+"):
        raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise NoSuchFileError(path)
    writable = mode == "r+"
    fio = io_factory(path, writable=writable)
    try:
        fio.lock(exclusive=writable)
        if fio.size() < 2 * L.SLOT_SIZE:
            head = fio.pread(8, 0)
            if head[:8] != L.MAGIC:
                raise FormatError(f"{path}: not a vdisk image ({fio.size()} bytes, no vdisk magic)")
            raise CorruptImageError(f"{path}: truncated to {fio.size()} bytes, shorter than the header")
        header, slot = _read_header(fio)
        if writable and header.sequence > L.MAX_SEQUENCE - L.SEQUENCE_HEADROOM:
            raise CorruptImageError(
                f"{path}: header sequence {header.sequence} leaves fewer than {L.SEQUENCE_HEADROOM} commits before "
                f"the format's limit {L.MAX_SEQUENCE}: refusing to write (run 'vdisk check --repair', which "
                f"renumbers it)")
        return Disk(fio, header, slot, writable)
    except BaseException:
        fio.close()
        raise
