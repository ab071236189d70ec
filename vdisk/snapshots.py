"""Internal snapshots: the snapshot table and the read-only Snapshot view.

The contract
------------
* A snapshot is the live disk's content, size and change counters frozen
  at one instant.  Taking it copies no data: its block table references
  the same physical blocks, whose refcounts rise; a later write to a
  shared block is copied on write.  It folds tracking and closes a
  generation, so its change id marks its point in time.
* A :class:`Snapshot` view reads exactly the frozen content, whatever the
  live disk does afterwards, from any thread: no block a snapshot
  references is freed or reused while the snapshot exists.
* ``snap.changes_since(id)`` is exact for the frozen content: the blocks
  whose frozen counter is newer than the id.
* Create, delete and revert are atomic: a new snapshot table (and, for a
  revert, a new block table) is written to fresh blocks and committed by
  the header; reference increments are durable before the commit and
  decrements follow it, so a crash leaves at worst leaked blocks.

This module holds the view (the table's records are vdisk/snapshot_table.py); the Disk
orders the writes (vdisk/disk.py).
"""
from __future__ import annotations

import io
import threading
import typing
import uuid as _uuid

if typing.TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from .disk import Disk

import numpy as np
import numpy.typing as npt

from . import _fast
from . import layout as L
from ._types import BytesOut
from .arrays import as_bytes_view as _as_bytes_view
from .blocktable import plan_read
from .errors import ClosedError, InvalidArgumentError, OutOfRangeError, ReadOnlyError
from .extents import Extents
from .snapshot_table import BACKUP_SNAPSHOT_PREFIX as BACKUP_SNAPSHOT_PREFIX    # re-exported: the records'
from .snapshot_table import SnapshotInfo as SnapshotInfo                      # names, as before they moved
from .snapshot_table import SnapshotRecord as SnapshotRecord
from .snapshot_table import check_name as check_name
from .snapshot_table import is_backup_snapshot as is_backup_snapshot
from .snapshot_table import parse_table as parse_table
from .changeid import ANY, ChangeId
from .tracking import resolve


#: a block table as the readers take it: a memoryview of its uint32 entries (or the array)
TableView = typing.Union[memoryview, npt.NDArray[np.uint32]]
#: check(): raises if the caller may no longer read (a closed or deleted view)
Check = typing.Callable[[], None]


class ViewHost(typing.NamedTuple):
    """What a Snapshot view needs of its Disk, given by the Disk (a view never
    names the Disk's private state):

    read_through(table_mv, mv, offset, check): fill mv from offset through
        another block table, under the Disk's lock, check() first;
    pread_through(table_mv, length, offset, check): the same into new bytes;
    resolve(change_id, record): the generation the id names on this view
        (StaleChangeIdError if the image did not issue it);
    load_frozen(offset, size, check): a frozen array of the file (the
        snapshot's counters), under the Disk's lock, check() first."""
    read_through: typing.Callable[[TableView, memoryview, int, Check], None]
    pread_through: typing.Callable[[TableView, int, int, Check], bytes]
    resolve: typing.Callable[[str | ChangeId | None, SnapshotRecord], int]
    load_frozen: typing.Callable[[int, int, Check], npt.NDArray[np.uint32]]


class Snapshot(io.RawIOBase):
    """A read-only view of one snapshot: the read side of the Disk API, and a
    read-only, seekable io.RawIOBase (writes raise ReadOnlyError, as on a Disk
    opened "r"), so io.BufferedReader, shutil.copyfileobj and the like take it."""

    def __init__(self, disk: Disk, record: SnapshotRecord, table: npt.NDArray[np.uint32], host: ViewHost):
        super().__init__()
        self._disk = disk
        self._host = host
        self._shift = disk.block_size.bit_length() - 1
        self._rec = record
        self._table = table
        self._table_mv = table.data        # memoryview(table)
        self._counters: npt.NDArray[np.uint32] | None = None
        self._pos = 0
        self._closed = False
        self._lock = threading.Lock()

    # --- identity -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._rec.name

    @property
    def size(self) -> int:
        return self._rec.virtual_size

    @property
    def block_size(self) -> int:
        return self._disk.block_size

    @property
    def generation(self) -> int:
        return self._rec.generation

    @property
    def change_id(self) -> str:
        return self._rec.change_id

    @property
    def tracking_id(self) -> str:
        return str(_uuid.UUID(bytes=self._rec.tracking_uuid))

    @property
    def uuid(self) -> _uuid.UUID:
        return self._disk.uuid

    @property
    def info(self) -> SnapshotInfo:
        return self._rec.info()

    @property
    def closed(self) -> bool:
        return self._closed

    def is_of(self, record: SnapshotRecord) -> bool:
        """Whether this view reads the snapshot of record."""
        return self._rec is record

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"snapshot {self.name!r} is closed (or was deleted)")

    # --- reads --------------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        n = max(length, 0)
        if offset < 0 or offset + n > self.size:
            raise OutOfRangeError(f"read of {n} bytes at offset {offset} past the snapshot's size {self.size}")
        return self._host.pread_through(self._table_mv, n, offset, self._check_open)

    def preadinto(self, buffer: BytesOut, offset: int) -> int:
        if isinstance(buffer, np.ndarray) and not buffer.flags.c_contiguous:
            staging = np.empty(buffer.shape, dtype=buffer.dtype)
            n = self.preadinto(staging.data, offset)
            buffer[...] = staging
            return n
        mv = _as_bytes_view(buffer)
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            raise OutOfRangeError(f"read of {n} bytes at offset {offset} past the snapshot's size {self.size}")
        self._host.read_through(self._table_mv, mv, offset, self._check_open)
        return n

    def read(self, size: int = -1) -> bytes:
        self._check_open()
        n = self.size - self._pos if size is None or size < 0 else min(size, max(0, self.size - self._pos))
        data = self.pread(n, self._pos) if n > 0 else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer: WriteableBuffer) -> int:
        mv = _as_bytes_view(buffer)
        n = max(0, min(len(mv), self.size - self._pos))
        if n:
            self.preadinto(mv[:n], self._pos)
        self._pos += n
        return n

    def readable(self) -> bool:
        self._check_open()
        return True

    def seekable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return False

    def _read_only(self, what: str) -> typing.NoReturn:
        self._check_open()
        raise ReadOnlyError(f"snapshot {self.name!r} is read-only: {what} the live disk instead "
                            f"(or revert to the snapshot)")

    def write(self, data: ReadableBuffer) -> int:
        self._read_only("write to")

    def pwrite(self, data: ReadableBuffer, offset: int) -> int:
        self._read_only("write to")

    def truncate(self, size: int | None = None) -> int:
        self._read_only("resize")

    def discard(self, offset: int, length: int) -> None:
        self._read_only("discard on")

    def flush(self) -> None:
        """Nothing to make durable: a snapshot is never written."""
        self._check_open()

    def seek(self, offset: int, whence: int = 0) -> int:
        self._check_open()
        base = {0: 0, 1: self._pos, 2: self.size}.get(whence)
        if base is None:
            raise InvalidArgumentError(f"invalid whence {whence}")
        if base + offset < 0:
            raise OutOfRangeError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def map(self) -> Extents:
        self._check_open()
        nb = L.blocks_for(self.size, self._shift)
        starts, lengths = _fast.nonzero_runs(self._table, 0, nb)
        return Extents.from_block_runs(starts, lengths, self._shift, self.size)

    def host_map(self) -> list[tuple[int, int, int]]:
        """The data extents with where they are in the file: (offset, length,
        host offset) runs, each contiguous in the image file (as Disk.host_map)."""
        return [(o + at, n, phys) for o, length in self.map()
                for at, phys, n in plan_read(self._table_mv, self._shift, o, length)]

    def changes_since(self, change_id: str | ChangeId | None) -> Extents:
        """Blocks changed between the id's point and this snapshot (exact)."""
        self._check_open()
        if change_id == ANY:
            return self.map()
        since = self._host.resolve(change_id, self._rec)
        counters = self._load_counters()
        nb = L.blocks_for(self.size, self._shift)
        starts, lengths = _fast.runs_above(counters, since, 0, nb)
        return Extents.from_block_runs(starts, lengths, self._shift, self.size)

    def _load_counters(self) -> npt.NDArray[np.uint32]:
        with self._lock:
            if self._counters is None:
                # under the Disk's lock: a delete in another thread must not free the blocks under the read
                self._counters = self._host.load_frozen(self._rec.counter_offset, self._rec.virtual_size,
                                                        self._check_open)
            return self._counters

    # --- life -----------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            super().close()         # io.IOBase.close: flush(), then marks the object closed
            self._closed = True

    def __enter__(self) -> "Snapshot":
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vdisk.Snapshot {self.name!r} size={self.size} change_id={self.change_id!r}>"
