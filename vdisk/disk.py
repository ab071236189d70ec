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

Threads: every public method takes the Disk's lock (a reentrant C lock, shared
with the Cython hot path); data I/O releases the GIL while it waits
(the hot path keeps it when the caller is the process's only thread, and
for a read the page cache holds: vdisk/_hotpath.pyx).  ``flush()`` and the automatic
fold hold it only for steps 1 and 5 and run steps 2-4 (the fsyncs and the
table write, from a copy of the changed table pages taken at step 1)
without it, so other threads read and write meanwhile: what they write is
the next flush's (docs/FORMAT.md, "Flushes beside writers").  Flushes never
overlap; commits (checkpoint, snapshots, resize, ...) flush with the lock
held throughout.  Processes: a writer holds an exclusive flock on the
file, readers a shared one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import threading
import time
import uuid as _uuid
import weakref
from typing import TYPE_CHECKING, Callable, Concatenate, Iterator, ParamSpec, Sequence, TypeVar

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

import numpy as np
import numpy.typing as npt

from . import _fast, _hotpath
from . import consumers as consumer_table
from . import layout as L
from .errors import (ClosedError, CorruptImageError, FormatError, InvalidArgumentError, OutOfRangeError,
                     ReadOnlyError, SnapshotNotFoundError, UnsupportedFeatureError, VdiskIOError)
from . import header as _header
from .errors import TO_REPLACE, NoSuchFileError, Param
from ._types import BytesOut, PathArg, Progress, SizeArg
from .allocator import Allocator
from .arrays import as_bytes_view as _as_bytes_view, lazy_zeros, load_array as _load_array, write_nonzero_pages
from .blocktable import BlockTable, TablePage, plan_read, validate as _validate_table
from .header import older_slot_regions, read_header as _read_header, read_image_header  # noqa: F401
from .extents import Extents
from .fileio import FileIO, atomic_output, refuse_if_in_use
from .layout import SUMMARY_SHIFT
from .snapshot_ops import SnapshotHost, SnapshotOps
from .results import ImageInfo
from .snapshots import Check, Snapshot, SnapshotInfo, TableView, ViewHost, SnapshotRecord, is_backup_snapshot, parse_table
from . import tracking as _tracking
from .changeid import ANY, ChangeId
from .tracking import ChangeTracker, CheckpointLog

PAGE = 4096
DEFAULT_FOLD_INTERVAL = 1 << 16   # writes between automatic folds


COPY_LIMIT = 16 << 20                # table bytes a flush copies to write them without the lock

_P = ParamSpec("_P")
_R = TypeVar("_R")
#: (first block, past the last block) -> (starts, lengths) of block runs, as the kernels return them
BlockRuns = Callable[[int, int], "tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]"]


class _FlushJob:
    """One flush, between its step 1 (under the lock) and its step 5."""

    def __init__(self, table: list[TablePage], copied: bool, pending: list[int], folded: bool):
        self.table = table          # (file offset, buffer) of the table pages to write at step 3
        self.copied = copied        # table holds copies: steps 2-4 may run without the lock
        self.pending = pending      # references to release at step 5
        self.folded = folded
        self.done = threading.Event()       # steps 2-4 are over (error or not)
        self.error: VdiskIOError | None = None
        self.finished = False       # step 5 ran (or the error was raised)
        self.runner: int | None = None      # the thread in steps 2-4


def _parse_block_size(block_size: SizeArg) -> int:
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
        hint: tuple[str | Param, ...] = (("; a block size of ", Param("block_size", L.format_size(1 << fits).replace(" ", "")),
                        " holds it") if fits is not None else ())
        raise OutOfRangeError.naming(
            f"size {size} needs {L.blocks_for(size, block_shift)} blocks of {1 << block_shift} bytes; "
            f"the limit is {L.MAX_BLOCKS} blocks ({L.format_size(L.MAX_BLOCKS << block_shift)})", *hint)


def _rebinds(method: Callable[Concatenate[Disk, _P], _R]) -> Callable[Concatenate[Disk, _P], _R]:
    """For Disk methods that may replace the table, refcount or tracker
    arrays, or the size: the Cython hot path is rebound before the lock is
    released, even when the method fails half-way."""
    @functools.wraps(method)
    def wrapper(self: Disk, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            finally:
                self._rebind_hot()
    return wrapper


def _poisons(method: Callable[Concatenate[Disk, _P], _R]) -> Callable[Concatenate[Disk, _P], _R]:
    """For Disk methods that write metadata or sync: an I/O error inside
    poisons the Disk (see "I/O errors" in the module docstring)."""
    @functools.wraps(method)
    def wrapper(self: Disk, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except VdiskIOError as exc:
            self._poison(exc)
            raise
    return wrapper


@contextlib.contextmanager
def _lock_released(lock: _hotpath.DiskLock) -> Iterator[bool]:
    """Inside: whether this thread is free of the RLock lock.  Held once (the
    hot path's hold around _fold_due), it is released for the block and taken
    back after; held deeper (a caller holds it around the call), it stays held
    and the answer is False."""
    if not lock._is_owned():
        yield True
        return
    state = lock._release_save()        # what threading.Condition.wait does with an RLock
    if state[0] > 1:
        lock._acquire_restore(state)
        yield False
        return
    try:
        yield True
    finally:
        lock._acquire_restore(state)


def _weakly(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """A Disk method as a callable for one of its parts, through a weak
    reference: no cycle, so a dropped Disk still closes at once.  Called
    after the Disk is gone (a part kept alive without it), it raises
    ClosedError."""
    ref = weakref.WeakMethod(method)
    name = getattr(method, "__name__", "a method")      # not method itself: call must hold no reference to it

    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        target = ref()
        if target is None:
            raise ClosedError(f"{name} of a disk that is gone (dropped and closed)")
        return target(*args, **kwargs)
    return call


def _poison_hook(ref: weakref.ref[Disk], err: VdiskIOError) -> None:
    """FileIO's on_poison for a Disk held by weak reference (a failed fsync).
    A thread without the Disk's lock is a flush in its unlocked syncs: that
    flush poisons the Disk under the lock (_flush_end), never closing the
    file under another thread's write."""
    disk = ref()
    if disk is not None and disk._lock._is_owned():
        disk._poison(err)


class Disk(io.RawIOBase):
    """An open vdisk image.  Use :func:`vdisk.create` or :func:`vdisk.open`."""

    def __init__(self, fio: FileIO, header: L.Header, slot: int, writable: bool):
        super().__init__()
        self._io = fio
        self._hdr = header
        self._slot = slot
        self._writable = writable
        self._lock = _hotpath.DiskLock()             # reentrant, in C: the hot path takes it too
        self._pos = 0
        self._shut = False
        self._closing = False
        self._poisoned: VdiskIOError | None = None   # the I/O error that stopped this Disk
        self._inflight: _FlushJob | None = None       # a flush between its step 1 and its step 5
        self._fold_wanted = False     # fold_interval writes counted under the lock: fold once it is released
        fio.on_poison = functools.partial(_poison_hook, weakref.ref(self))
        self._shift = header.block_shift           # fixed for the image's life
        self._block_mask = header.block_size - 1
        # the Cython hot path: its fallbacks are this Disk's Python paths, held weakly
        self._hot = _hotpath.HotPath(self._lock, _weakly(self._pread_slow), _weakly(self._pwrite_slow),
                                  _weakly(self._fold_due), DEFAULT_FOLD_INTERVAL)
        # the header as the newest slot holds it, and whether the other slot names other regions
        # (the write-order rule of _flush_locked step 5: nothing the older slot names is released)
        self._committed = dataclasses.replace(header)
        older = older_slot_regions(fio, slot) if writable else None
        self._slots_differ = older is not None and older != header.regions()
        self._load()
        self._snap_ops = SnapshotOps(fio, header, self._alloc, self._bt, self._tracker, SnapshotHost(
            _weakly(self._flush_locked), _weakly(self._commit_header), _weakly(self._grow_tables),
            _weakly(self._issue_token), _weakly(self._commit_snapshot_table), _weakly(self._alloc_run),
            _weakly(self._validate_table), _weakly(self._refresh_meta_ranges)))
        self._rebind_hot()

    def _rebind_hot(self) -> None:
        """Point the Cython hot path at the current arrays and size.  Every
        method that replaces one of them is decorated with @_rebinds."""
        t = self._tracker
        if self._shut:
            self._hot.shut()
            return
        if t is None:
            self._hot.bind(self._io, type(self._io) is FileIO, self._io.fd, self._bt.table, self._alloc.refcounts,
                           self._shift, self._hdr.virtual_size, True, self._writable, summary_shift=SUMMARY_SHIFT)
        else:
            self._hot.bind(self._io, type(self._io) is FileIO, self._io.fd, self._bt.table, self._alloc.refcounts,
                           self._shift, self._hdr.virtual_size, True, self._writable, summary_shift=SUMMARY_SHIFT,
                           dirty=t.dirty, groups=t.dirty_groups, coarse=t.coarse, fresh=self._bt.fresh,
                           rel=t.rel_shift)

    # white-box views of the parts' state (the tests and tools read them)
    @property
    def _table(self) -> npt.NDArray[np.uint32]:
        return self._bt.table

    @property
    def _refcounts(self) -> npt.NDArray[np.uint16]:
        return self._alloc.refcounts

    @property
    def _end_block(self) -> int:
        return self._alloc.end_block

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
        """fold_interval writes since the last fold: fold now.  The hot path calls
        this holding the lock once, the Python write path after releasing it: the
        fold's syncs then run without the lock (_flush_unlocked).  Held deeper
        (a caller of the Disk holds it around the write), the fold keeps it."""
        with _lock_released(self._lock) as free:
            if free:
                if not self._shut:
                    self._flush_unlocked(fold=True)
                return
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
        table = _load_array(fio, h.table_offset, h.table_capacity, np.uint32, file_size, keep=nb, ranges=loaded)
        self._bt = BlockTable(table, h.table_capacity, loaded)
        end_block = -(-file_size // bs)
        refcounts = _load_array(fio, h.refcount_offset, h.refcount_capacity, np.uint16, file_size, keep=end_block)
        self._alloc = Allocator(fio, h, refcounts, end_block, _weakly(self._grow_refcounts))
        self._refresh_meta_ranges()
        self._alloc.validate_meta()
        self._validate_table(self._bt.table, nb, "block table", runs=self._bt.runs(nb))
        if self._writable and self._snapshots:
            self._alloc.validate_shared(self._bt.parts(nb), self._snapshots)
        self._tracker = None
        if h.tracking:
            loaded = []
            counters = _load_array(fio, h.counter_offset, h.table_capacity, np.uint32, file_size,
                                   keep=_tracking.counters_kept(h), ranges=loaded)
            bitmap = fio.pread(h.bitmap_length, h.bitmap_offset)
            self._tracker = ChangeTracker(fio, h, counters, bitmap, self._writable, loaded=loaded)

    def _validate_table(self, table: npt.NDArray[np.uint32], n: int, what: str, allow_shared: bool = False,
                        runs: list[tuple[int, int]] | None = None) -> None:
        _validate_table(table, n, what, self._io, self._hdr, self._alloc, allow_shared, runs)

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
        self._alloc.set_meta_ranges([(off // bs, (off + length) // bs) for _, off, length in regions])

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

    def info(self) -> ImageInfo:
        """A summary for ``vdisk info``."""
        with self._lock:
            self._check_open()
            h = self._hdr
            allocated = self._bt.allocated(h.nblocks)
            out: ImageInfo = {
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
                out.update({"generation": h.generation, "tracking_id": str(_uuid.UUID(bytes=h.tracking_uuid)),
                            "change_id": self.change_id, "dirty_coarse_regions": self._tracker.dirty_regions})
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
        job = self._inflight
        if job is not None:         # a flush in its syncs in another thread: the file stays open until
            if job.runner != threading.get_ident():     # they are over (no write lands in a reused fd)
                job.done.wait()
            self._inflight = None
            job.finished = True
            job.error = job.error or err
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
    # (the HotPath in self._hot; these functions bind like methods, so the call
    # holds the Disk even when nothing else does); every other case comes back
    # to _pread_slow / _pwrite_slow below, the fallbacks the HotPath was given.
    pread, pwrite = _hotpath.methods("_hot")

    def _pread_slow(self, length: int, offset: int) -> bytes:
        """length bytes at offset; never-written areas read as zeros (what
        ``pread`` does for every case the hot path hands back)."""
        if offset < 0 or length < 0 or offset + length > self._hdr.virtual_size:
            self._check_range(offset, length, "read")
        shift = self._shift
        if length and (offset >> shift) == ((offset + length - 1) >> shift):
            with self._lock:
                self._check_open()
                p = self._bt.mv[offset >> shift]
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
            self._read_plan(buf.data, plan)       # memoryview(buf)
        return buf.tobytes()

    def preadinto(self, buffer: BytesOut, offset: int) -> int:
        if isinstance(buffer, np.ndarray) and not buffer.flags.c_contiguous:
            staging = np.empty(buffer.shape, dtype=buffer.dtype)
            n = self.preadinto(staging.data, offset)
            buffer[...] = staging               # a strided view: copy into it
            return n
        mv = _as_bytes_view(buffer)
        if mv.readonly:
            raise InvalidArgumentError("preadinto needs a writable buffer")
        n = len(mv)
        self._check_range(offset, n, "read")
        with self._lock:
            self._check_open()
            if not self._hot.read_through(self._bt.mv, mv, offset):    # Cython; else the Python path
                self._read_plan(mv, self._plan_read(offset, n))
        return n


    def _pread_exact(self, length: int, phys: int) -> bytes:
        data = self._io.pread(length, phys)
        return data if len(data) == length else data.ljust(length, b"\0")

    def _view_host(self) -> ViewHost:
        """What a snapshot view calls back (snapshots.py, ViewHost)."""
        return ViewHost(self._read_through, self._pread_through, self._resolve_for_snapshot,
                        self._load_frozen_checked)

    def _load_frozen_checked(self, offset: int, size: int, check: Check) -> npt.NDArray[np.uint32]:
        with self._lock:
            self._check_open()
            check()
            return self._load_frozen(offset, size)

    def _pread_through(self, table_mv: TableView, length: int, offset: int, check: Check) -> bytes:
        """_read_through into new bytes (the hot path fills them without a copy)."""
        with self._lock:
            self._check_open()
            check()
            data = self._hot.pread_through(table_mv, length, offset)
            if data is None:
                buf = bytearray(length)
                self._read_plan(memoryview(buf), self._plan_read(offset, length, table_mv))
                data = bytes(buf)
            return data

    def _read_through(self, table_mv: TableView, mv: memoryview, offset: int, check: Check) -> None:
        """Read through another block table (a snapshot's) under the Disk's lock."""
        with self._lock:
            self._check_open()
            check()
            if not self._hot.read_through(table_mv, mv, offset):     # Cython; else the Python path
                self._read_plan(mv, self._plan_read(offset, len(mv), table_mv))

    def _plan_read(self, offset: int, length: int, table: TableView | None = None) -> list[tuple[int, int, int]]:
        """Runs (buffer offset, physical offset or -1 for zeros, length) for a
        read through the live table (or another), merging blocks that are contiguous in the file."""
        return plan_read(self._bt.mv if table is None else table, self._shift, offset, length)

    def _read_plan(self, mv: memoryview, plan: list[tuple[int, int, int]]) -> None:
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
        self._fold_if_wanted()
        return n


    def _write_locked(self, mv: memoryview, offset: int) -> None:
        shift = self._hdr.block_shift
        bs = 1 << shift
        bt, alloc = self._bt, self._alloc
        end = offset + len(mv)
        b = offset >> shift
        if not offset & (bs - 1) and not len(mv) & (bs - 1) and alloc.appends_only():
            b1 = end >> shift
            if not bt.table[b:b1].any() and not _fast.zero_blocks(mv, bs).any():
                self._append_run(mv, b, b1)     # whole new blocks of data: one run at the end
                self._count_write()
                return
        self._write_remapping(mv, offset)

    def _write_remapping(self, mv: memoryview, offset: int, keep_zeros: bool = False) -> None:
        """_write_blocks, then the table changes it collected (undone if a write failed)."""
        bt, alloc = self._bt, self._alloc
        remaps: list[tuple[int, int, int]] = []   # (block, new, old): applied once the data is written
        try:
            self._write_blocks(mv, offset, remaps, keep_zeros)
        except BaseException:
            for _b, newp, _old in remaps:           # give the new blocks back; the table never saw them
                alloc.give_back(newp)
            raise
        for b, newp, oldp in remaps:
            bt.remap(b, newp)
            if oldp:                                # copy-on-write away from a shared block
                alloc.decref_later(oldp)
        self._count_write()

    def _count_write(self) -> None:
        """One more write towards the automatic fold, which the public write
        methods run once they released the lock (_fold_if_wanted)."""
        hot = self._hot
        hot.writes += 1
        if hot.writes >= hot.fold_interval and self._tracker is not None:
            self._fold_wanted = True

    def _fold_if_wanted(self) -> None:
        if self._fold_wanted:
            self._fold_due()

    def _append_run(self, mv: memoryview, b0: int, b1: int) -> None:
        """Write whole unallocated blocks [b0, b1) of data into new blocks
        appended at the end of the file: what _write_blocks does block by
        block (allocate, mark, write, then remap), for the run at once."""
        count = b1 - b0
        p0 = self._alloc.append_run(count)
        if self._tracker:
            self._tracker.mark_run(b0, b1)
        try:
            self._io.pwrite(mv, p0 << self._shift)
        except BaseException:               # give the blocks back; the table never saw them
            self._alloc.give_back_run(p0, count)
            raise
        self._bt.map_run(b0, b1, p0)

    def _write_blocks(self, mv: memoryview, offset: int, remaps: list[tuple[int, int, int]],
                      keep_zeros: bool = False) -> None:
        """Issue the data writes of a request; remaps collects the table changes.
        keep_zeros: zeros are written like data (no block freed, none left unallocated)."""
        shift = self._hdr.block_shift
        bs = 1 << shift
        bt = self._bt
        table, refs = bt.mv, self._alloc.refs_mv
        tracker = self._tracker
        end = offset + len(mv)
        pos = offset
        run_phys = None              # pending contiguous physical writes: one pwritev
        run_bufs: list[memoryview | bytearray] = []
        run_len = 0
        while pos < end:
            b = pos >> shift
            lo = pos - (b << shift)
            piece = min(bs - lo, end - pos)
            src = mv[pos - offset:pos - offset + piece]
            p = table[b]
            if p and piece == bs and not keep_zeros and _fast.is_zero(src):
                # a whole block of zeros: give the block back (detect-zeroes=unmap), shared or not
                if tracker:
                    tracker.mark(b)
                self._unmap(b)
                pos += piece
                continue
            buf: memoryview | bytearray
            if p and refs[p] == 1:
                if tracker:
                    self._write_ahead(tracker, b)
                phys, buf = (p << shift) + lo, src
            else:
                if not p and not keep_zeros and _fast.is_zero(src):
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
                newp = self._alloc.alloc()
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

    def _write_ahead(self, tracker: ChangeTracker, b: int) -> None:
        """Block b is about to be overwritten in place: the write-ahead rule,
        asked of the hot path (HotPath.write_ahead, the one place it is
        written); a region whose bit must be durable first is armed, and the
        rule asked again."""
        hot = self._hot
        if not hot.mark_write(b):
            tracker.arm(b)
            if not hot.mark_write(b):
                raise RuntimeError(f"block {b}: its region is armed, yet the hot path refuses the write")

    def _unmap(self, b: int) -> None:
        p = self._bt.unmap(b)
        if p:
            self._alloc.decref_later(p)

    def write_zeros(self, offset: int, length: int) -> None:
        """The range reads back as zeros and every block it touches stays, or
        becomes, allocated (NBD's WRITE_ZEROES with NO_HOLE: later writes there
        need no new space).  Tracked as a write; discard() frees blocks instead."""
        self._check_range(offset, length, "write")
        zeros = memoryview(bytes(min(length, 1 << 20)))
        with self._lock:
            self._check_writable()
            self._check_range(offset, length, "write")    # again: a shrink may have come first
            end = offset + length
            while offset < end:
                n = min(end - offset, len(zeros))
                self._write_remapping(zeros[:n], offset, keep_zeros=True)
                offset += n
        self._fold_if_wanted()

    def discard(self, offset: int, length: int) -> None:
        """The range reads back as zeros; whole blocks are freed."""
        self._check_range(offset, length, "discard")
        with self._lock:
            self._check_writable()
            self._check_range(offset, length, "discard")    # again: a shrink may have come first
            self._discard_locked(offset, length)
        self._fold_if_wanted()

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
                if self._bt.mv[b]:
                    if self._tracker:
                        self._tracker.mark(b)
                    self._unmap(b)
            elif self._bt.mv[b]:
                self._write_locked(memoryview(bytes(piece)), pos)
            pos += piece

    # ------------------------------------------------------------------ allocation
    @_poisons
    def _alloc_run(self, count: int) -> int:
        """count contiguous new blocks at the end of the file (for metadata regions)."""
        return self._alloc.alloc_run(count)

    # ------------------------------------------------------------------ flush
    def flush(self) -> None:
        """Make every write before this call durable (survives crash and power loss).

        Its syncs run without the Disk's lock: other threads keep reading and
        writing meanwhile (their writes are the next flush's)."""
        if self._shut:
            if self._closing and self._poisoned is None:   # io.IOBase.close() flushes once more: done
                return
            self._check_open()
        self._flush_unlocked()

    def _flush_unlocked(self, fold: bool = False) -> None:
        """A flush whose steps 2-4 (the syncs and the table write) run without the
        Disk's lock (when the caller does not hold it): step 1 and a copy of the
        changed table pages under the lock, then the I/O, then step 5 under the
        lock.  fold: the automatic fold (nothing to do without tracking)."""
        while True:
            with self._lock:
                if fold and (self._shut or self._tracker is None):
                    self._hot.writes = 0        # closed by another thread meanwhile, or nothing to fold
                    return
                self._check_open()
                if not self._writable:
                    return
                job = self._inflight
                if job is None or job.done.is_set():
                    job = self._flush_begin(copy=True)
                    break
            job.done.wait()         # another thread's flush is in its syncs: wait for them without the lock
        if job.copied:
            self._flush_io(job)     # the lock is free here (unless the caller holds it)
            with self._lock:
                self._flush_end(job)
        else:                       # too many table pages to copy: written under the lock, as _flush_locked
            with self._lock:
                self._flush_io(job)
                self._flush_end(job)

    @_poisons
    def _flush_locked(self) -> None:
        """The flush with the lock held throughout (the commits: checkpoint,
        snapshots, resize, ...).  The write order is _flush_begin, _flush_io
        and _flush_end."""
        job = self._flush_begin(copy=False)
        self._flush_io(job)
        self._flush_end(job)

    @_poisons
    def _flush_begin(self, copy: bool) -> "_FlushJob":
        """Step 1 of the write order (module docstring, docs/FORMAT.md "Write
        order"), under the lock: fold the tracking bits into counters, write the
        counter pages and the refcount pages with increments (not synced), and
        take the changed table pages (copies with copy=True, when they are at
        most COPY_LIMIT bytes) and the pending references: everything the
        flush makes durable is what memory holds now.  A flush still in its
        syncs is finished first (flushes never overlap)."""
        self._settle_flush()
        h, alloc, bt = self._hdr, self._alloc, self._bt
        self._hot.writes = 0
        self._fold_wanted = False
        # 1. counters of the tracking fold, refcount increments.  Nothing changes counters while
        # the syncs run without the lock (only a fold, or an operation that settles this flush first)
        folded = self._tracker.fold(h.generation) if self._tracker else False
        alloc.write_pages()
        copy = copy and bt.dirty_bytes() <= COPY_LIMIT
        job = _FlushJob(bt.take_dirty(h.table_offset, copy), copy, alloc.take_pending(), folded)
        self._inflight = job
        return job

    def _flush_io(self, job: "_FlushJob") -> None:
        """Steps 2-4, with or without the lock: sync (data, counters and refcounts
        durable), write the table pages taken at step 1, sync (the new mapping
        durable).  A failure is kept in the job for _flush_end to raise."""
        job.runner = threading.get_ident()
        try:
            self._io.fsync()
            if job.table:
                for off, buf in job.table:
                    self._io.pwrite(buf, off)
                self._io.fsync()
        except VdiskIOError as exc:
            job.error = exc
        finally:
            job.runner = None
            job.done.set()

    @_poisons
    def _flush_end(self, job: "_FlushJob") -> None:
        """Step 5, under the lock, once steps 2-4 of job are done: release the
        references the durable table no longer holds, clear the idle coarse
        bits.  Raises the flush's I/O error (which poisons the Disk).  Whoever
        comes first finishes a job: the flush's thread, or another thread's
        flush or commit (_settle_flush)."""
        if self._inflight is job:
            self._inflight = None
        if job.finished or self._shut:  # finished by another thread; or the Disk closed after the syncs
            job.finished = True
            if job.error is not None:
                raise job.error
            return
        job.finished = True
        if job.error is not None:
            raise job.error
        alloc = self._alloc
        # 5. references the durable table no longer holds: release them.  The older header slot
        # must name none of them: after a commit that moved a region, that slot names the old
        # region (a table, counters, a snapshot table ...), and a lost newest slot brings it back.
        # So first the last commit once more into the other slot: both name the new regions.
        if job.pending and self._slots_differ:
            self._commit_again()
        if alloc.release_pending(job.pending):
            alloc.write_pages()
        if self._tracker and (job.folded or self._tracker.dirty_regions):
            # with the lock released during the syncs, writes since the fold keep their regions' bits
            self._tracker.clear_idle_regions(since_fold=job.copied)

    def _settle_flush(self) -> None:
        """Under the lock: finish a flush whose syncs run in another thread (wait
        for them, then its step 5), before anything else writes metadata."""
        job = self._inflight
        if job is not None:
            job.done.wait()
            self._flush_end(job)

    @_poisons
    def _commit_header(self) -> None:
        """Write the header to the other slot and fsync: the atomic commit
        point (vdisk/header.py, commit: never a slot a reader would refuse;
        its VdiskIOError poisons the Disk: memory is ahead of the file,
        which keeps its last commit)."""
        self._settle_flush()
        self._write_slot(self._hdr)

    @_poisons
    def _commit_again(self) -> None:
        """The last commit once more (the same content, the next sequence) into
        the other slot: then both slots name the same regions, and what only
        the older one named may be released (_flush_locked step 5)."""
        again = dataclasses.replace(self._committed, sequence=self._hdr.sequence)
        self._write_slot(again)
        self._hdr.sequence = again.sequence

    def _write_slot(self, h: L.Header) -> None:
        self._slot = _header.commit(self._io, h)
        self._slots_differ = h.regions() != self._committed.regions()
        self._committed = dataclasses.replace(h)

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
            self._alloc.write_pages()
            self._log = CheckpointLog(self._io, first * h.block_size, cap)
            h.log_offset, h.log_capacity, h.legacy_generation = first * h.block_size, cap, h.generation
            h.incompatible_features |= L.INCOMPAT_CHECKPOINT_LOG
            self._refresh_meta_ranges()
        token = _tracking.new_token()
        self._log.write(h.generation, token)
        return token

    def _resolve(self, change_id: str | ChangeId | None) -> int:
        """The generation a change id names, if this image issued it (else StaleChangeIdError)."""
        return _tracking.resolve(change_id, self._hdr, self._log)

    def _resolve_for_snapshot(self, change_id: str | ChangeId | None, rec: SnapshotRecord) -> int:
        """The generation an id names on a snapshot's view: its own id, or an
        id of the image before it (same epoch, the log's token)."""
        with self._lock:
            self._check_open()
            h: _tracking.Epoch = self._hdr
            if rec.tracking_uuid != h.tracking_uuid:
                # a snapshot of an earlier epoch: its tokenless ids cannot be told apart any more
                h = _tracking.EpochOf(tracking_uuid=rec.tracking_uuid, generation=rec.generation + 1,
                                      legacy_generation=0)
            return _tracking.resolve(change_id, h, self._log, limit=rec.generation + 1,
                                     own=(rec.generation, rec.token))

    def changes_since(self, change_id: str | ChangeId | None) -> Extents:
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

    def changes_in(self, change_id: str | ChangeId | None, offset: int, length: int) -> Extents:
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

            def new_epoch(h: L.Header) -> None:
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

    def _find_snapshot(self, name: str) -> SnapshotRecord:
        for rec in self._snapshots:
            if rec.name == name:
                return rec
        raise SnapshotNotFoundError(f"{self.path}: no snapshot named {name!r}")

    def _load_frozen(self, offset: int, size: int) -> npt.NDArray[np.uint32]:
        return self._snap_ops.load_frozen(offset, size)

    def _write_entry_table(self, records: Sequence[SnapshotRecord] | Sequence[consumer_table.ConsumerRecord],
                           entry_size: int, limit: int) -> tuple[int, int]:
        """A new copy of a snapshot or consumer table in fresh blocks: (offset, capacity)."""
        if not records:
            return 0, 0
        bs = self._hdr.block_size
        nbytes = L.round_up(len(records) * entry_size, bs)
        first = self._alloc_run(nbytes // bs)
        self._io.pwrite(b"".join(rec.pack() for rec in records), first * bs)
        return first * bs, min(nbytes // entry_size, limit)

    def _release_run(self, offset: int, nbytes: int) -> None:
        self._alloc.release_run(offset, nbytes)

    @_poisons
    def snapshot(self, name: str | None = None) -> Snapshot:
        """Take a snapshot: no data is copied.  Folds tracking and closes the
        current generation; returns the read-only view.

        A flush without the lock comes first (its syncs beside other threads'
        writes), so the flush the snapshot makes under the lock, at its
        instant, has only what was written since to sync."""
        self._flush_unlocked()
        with self._lock:
            self._check_writable()
            rec, frozen = self._snap_ops.create(name, self._snapshots)
            view = Snapshot(self, rec, frozen, self._view_host())
            self._views.add(view)
            return view

    def _commit_snapshot_table(self, records: list[SnapshotRecord], advance: bool = False) -> None:
        def header_update(h: L.Header) -> None:
            if advance:
                h.snapshot_next_id += 1
                h.generation += 1
        self._commit_entry_table("snapshot", records, L.SNAPSHOT_ENTRY_SIZE, L.MAX_SNAPSHOTS, header_update)
        self._snapshots = records
        self._refresh_meta_ranges()

    def _commit_entry_table(self, kind: str, records: Sequence[SnapshotRecord] | Sequence[consumer_table.ConsumerRecord],
                            entry_size: int, limit: int,
                            header_update: Callable[[L.Header], None] | None = None) -> None:
        """A new copy of the snapshot or consumer table (kind) in fresh blocks,
        durable before the header names it; the old copy is released after."""
        h = self._hdr
        old_off, old_cap = getattr(h, f"{kind}_offset"), getattr(h, f"{kind}_capacity")
        off, cap = self._write_entry_table(records, entry_size, limit)
        self._alloc.write_pages()
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
        return consumer_table.Consumers(self, self._consumer_records, self._check_change_id, self._change_consumers)

    def _consumer_records(self) -> list[consumer_table.ConsumerRecord]:
        with self._lock:
            self._check_open()
            return list(self._consumers)

    def _check_change_id(self, change_id: str) -> None:
        with self._lock:
            self._resolve(change_id)

    @_poisons
    def _change_consumers(self, op: str, name: str, change_id: str | None) -> consumer_table.ConsumerInfo | None:
        with self._lock:
            self._check_writable()
            self._require_tracking()
            records, rec = consumer_table.apply(self._consumers, op, name, change_id, self._hdr, time.time_ns(),
                                                 self._resolve)
            self._flush_locked()
            self._commit_consumer_table(records)
            self._flush_locked()            # the old copy's blocks are free again
            return rec.info() if rec is not None else None

    def _commit_consumer_table(self, records: list[consumer_table.ConsumerRecord]) -> None:
        self._commit_entry_table("consumer", records, L.CONSUMER_ENTRY_SIZE, L.MAX_CONSUMERS)
        self._consumers = records
        self._refresh_meta_ranges()

    def open_snapshot(self, name: str) -> Snapshot:
        """A read-only view of an existing snapshot."""
        with self._lock:
            self._check_open()
            rec = self._find_snapshot(name)
            view = Snapshot(self, rec, self._snap_ops.open(rec), self._view_host())
            self._views.add(view)
            return view

    def drop_orphan_backup_snapshots(self) -> list[str]:
        """Delete the temporary snapshots of backups that never finished (a
        crash, an error while deleting them): those no open view in this
        process reads.  No other process reads them: a writer holds the
        image's exclusive lock.  Returns their names."""
        with self._lock:
            self._check_writable()
            in_use = {view.name for view in list(self._views) if not view.closed}
            orphans = [rec.name for rec in self._snapshots
                       if is_backup_snapshot(rec.name) and rec.name not in in_use]
            for name in orphans:
                self.delete_snapshot(name)
            return orphans

    @_poisons
    def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot; blocks no longer referenced become free.  The
        flushes before and after the commit sync without the lock (as
        snapshot())."""
        with self._lock:
            self._check_writable()
            self._find_snapshot(name)
        self._flush_unlocked()
        with self._lock:
            self._check_writable()
            rec = self._find_snapshot(name)     # again: another thread may have deleted it meanwhile
            self._snap_ops.delete(rec, self._snapshots)
            for view in list(self._views):
                if view.is_of(rec):
                    view.close()
        self._flush_unlocked()                  # the commit's releases: the blocks are free again

    def revert(self, name: str) -> None:
        """The live disk becomes the snapshot's content (and size).  Every block
        that differs is marked changed in the current generation, so every
        consumer's change id stays valid.  The flushes before and after the
        commit sync without the lock (as snapshot())."""
        with self._lock:
            self._check_writable()
            self._find_snapshot(name)
        self._flush_unlocked()
        self._revert_locked(name)
        self._flush_unlocked()                  # the old table's references released

    @_rebinds
    @_poisons
    def _revert_locked(self, name: str) -> None:
        with self._lock:
            self._check_writable()
            self._snap_ops.revert(self._find_snapshot(name))
            self._pos = min(self._pos, self._hdr.virtual_size)

    @_poisons
    def compact(self, *, progress: Progress | None = None) -> int:
        """Give unused space back to the file system: punch holes over free
        blocks and cut free blocks off the end of the file.  Returns the
        number of bytes released.  progress(done_blocks, total_blocks): called
        as the free runs are punched, finally with done == total."""
        with self._lock:
            self._check_writable()
            self._flush_locked()
            self._io.fsync()                 # the released refcounts are durable first
            bs = self._hdr.block_size
            alloc = self._alloc
            used = alloc.used_mask()
            last = alloc.last_used_block()
            released = 0
            starts, lengths = _fast.nonzero_runs((~used[:last]).astype(np.uint32), 0, last)
            for start, n in zip(starts.tolist(), lengths.tolist()):
                if self._io.punch_hole(start * bs, n * bs):
                    released += n * bs
                if progress is not None:
                    progress(start + n, alloc.end_block)
            released += alloc.cut_tail(last)
            self._io.fsync()
            if progress is not None:
                progress(alloc.end_block, alloc.end_block)
            return released


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
            return self._clipped_runs(offset, length, lambda b0, b1: _fast.nonzero_runs(self._bt.table, b0, b1))

    def _clipped_runs(self, offset: int, length: int, block_runs: BlockRuns) -> Extents:
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
        starts, lengths = self._bt.map_runs(self._hdr.nblocks)
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
                if tail and self._bt.mv[new_nb - 1]:   # zero the cut-off part of the new last block
                    cut = min(old_size, new_nb << h.block_shift) - new_size
                    self._write_locked(memoryview(bytes(cut)), new_size)
                if self._tracker:       # a crash before the commit shows the old size with these
                    # zeroed: their armed regions report them
                    self._tracker.mark_range(new_nb, old_nb, dirty=False)
                for b in np.flatnonzero(self._bt.table[new_nb:old_nb]).tolist():
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
        self._settle_flush()
        h = self._hdr
        bs = h.block_size
        cap = min(L.MAX_BLOCKS, max(need, 2 * h.table_capacity))
        tbytes = L.round_up(cap * 4, bs)
        cap = tbytes // 4
        nblk = tbytes // bs
        first = self._alloc_run(2 * nblk)
        t_off, c_off = first * bs, (first + nblk) * bs
        table = lazy_zeros(cap, np.uint32)
        table[:h.table_capacity] = self._bt.table
        write_nonzero_pages(self._io, table, t_off)
        old = [(h.table_offset, h.table_capacity), (h.counter_offset, h.table_capacity)]
        if self._tracker:
            self._tracker.grow_arrays(cap)
            write_nonzero_pages(self._io, self._tracker.counters, c_off)
        self._alloc.write_pages()
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
        self._bt.grow(table, cap)
        for off, capacity in old:       # the old regions are unreferenced now
            self._alloc.release_run(off, L.round_up(capacity * 4, bs))
        self._flush_locked()

    @_rebinds
    @_poisons
    def _grow_refcounts(self, need: int) -> None:
        """Relocate the refcount table to a larger region at the end of the file
        (the allocator calls this when it runs out of capacity)."""
        self._settle_flush()
        h, alloc = self._hdr, self._alloc
        bs = h.block_size
        cap = max(need, h.refcount_capacity + h.refcount_capacity // 2)
        while True:
            rbytes = L.round_up(cap * L.REFCOUNT_BYTES, bs)
            nblk = rbytes // bs
            if alloc.end_block + nblk + 2 <= cap:
                break
            cap = alloc.end_block + nblk + 2 + 1024
        cap = min(rbytes // L.REFCOUNT_BYTES, L.MAX_PHYS_BLOCKS)
        first = alloc.end_block
        alloc.end_block += nblk
        self._io.truncate(max(self._io.size(), alloc.end_block * bs))
        refs = lazy_zeros(cap, np.uint16)
        kept = len(alloc.refcounts)
        refs[:kept] = alloc.refcounts
        refs[first:first + nblk] = 1
        old_off, old_cap = h.refcount_offset, h.refcount_capacity
        alloc.replace(refs)
        # only the old entries and the new region's own can be nonzero: scanning the whole array would
        # touch every page of a capacity that the end of a huge sparse file asks for (fuzz finding)
        write_nonzero_pages(self._io, refs[:kept], first * bs)
        write_nonzero_pages(self._io, refs[first:first + nblk], first * bs + first * L.REFCOUNT_BYTES)
        self._io.fsync()
        h.refcount_offset, h.refcount_capacity = first * bs, cap
        self._commit_header()
        self._refresh_meta_ranges()
        alloc.dirty_pages.clear()
        alloc.release_run(old_off, L.round_up(old_cap * L.REFCOUNT_BYTES, bs))

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[Disk]:
        """Hold the Disk still: its lock held (no call of another thread runs)
        after a flush (when writable), so the file holds every write and does
        not change inside the block (the NBD server checks a served image so)."""
        with self._lock:
            if self._writable:
                self.flush()
            yield self

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        if self._shut:
            return
        try:
            with self._lock:
                job = self._inflight
                if job is not None and job.runner != threading.get_ident():
                    job.done.wait()     # a flush's syncs in another thread: over before the file closes
                if self._writable and self._io.poisoned is None:
                    try:
                        self._flush_locked()
                        if self._tracker:    # counters are durable: a clean close leaves no bit set
                            self._tracker.clear_idle_regions(everything=True)
                        self._io.fsync()     # the decrements and cleared bits of the last flush
                        # free blocks at the end go (a snapshot delete's): check then
                        # reports any data past the last used block as a killed writer's
                        if self._alloc.cut_tail(self._alloc.last_used_block()):
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

    def __del__(self) -> None:
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
    # the data area starts at a DATA_ALIGN file offset: the refcount region takes the blocks up to it
    # (sparse, never written), so a sequential writer's data lies where the page cache can use large folios
    if size >= L.DATA_ALIGN_MIN_SIZE:
        rbytes += -(meta_blocks * bs + rbytes) % max(L.DATA_ALIGN, bs)
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

    fio = None
    try:
        # built under a temporary name, synced, then put in place (a failed directory fsync takes it away)
        with atomic_output(path, overwrite=overwrite, what="creating", why=TO_REPLACE) as tmp:
            fio = io_factory(tmp, writable=True, create=True)
            fio.lock(exclusive=True)
            fio.truncate(end_blocks * bs)
            refs = np.zeros(rcap, dtype=np.uint16)
            refs[:end_blocks] = 1
            raw = refs.view(np.uint8)[:L.round_up(end_blocks * 2, PAGE)]
            fio.pwrite(raw, hdr.refcount_offset)
            fio.pwrite(hdr.pack(), L.SLOT_OFFSETS[1])
            fio.fsync()
        fio.path = path
    except BaseException:
        if fio is not None:
            fio.close()
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
        header, slot = read_image_header(fio)
        if writable and header.sequence > L.MAX_SEQUENCE - L.SEQUENCE_HEADROOM:
            raise CorruptImageError(
                f"{path}: header sequence {header.sequence} leaves fewer than {L.SEQUENCE_HEADROOM} commits before "
                f"the format's limit {L.MAX_SEQUENCE}: refusing to write (run 'vdisk check --repair', which "
                f"renumbers it)")
        return Disk(fio, header, slot, writable)
    except BaseException:
        fio.close()
        raise
