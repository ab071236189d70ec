"""What ``vdisk info`` shows of an image, read without numpy or the compiled core.

Every command-line call pays its imports: a Disk needs numpy and
vdisk._fast, whose import alone takes longer than qemu-img's whole run.
``vdisk info`` needs little of what a Disk loads: the header (the same
slot choice and field checks as an open), the snapshot and consumer
records (the same parsers and checks), one checkpoint-log entry (the
last change id's token), the coarse bitmap (a popcount) and the number
of mapped block-table entries.  This module reads those through the same
modules an open uses (vdisk/header.py, snapshot_table.py, consumers.py,
changeid.py) and returns what :meth:`vdisk.Disk.info` returns, key for
key.  What it does not do is validate the block table's entries (inside
the data area, outside metadata): that is ``vdisk check``'s job, as
``qemu-img info`` does not check either.

The file is opened read-only under the shared lock, as ``vdisk.open(path)``
does: an image a writer holds raises ImageLockedError (the CLI then asks
the ``vdisk serve`` that holds it, if one does).
"""
from __future__ import annotations

import array
import os
import struct
import time
import uuid as _uuid
from typing import Any, Iterator

from . import consumers as consumer_table
from . import layout as L
from .changeid import format_change_id, issued_id
from .errors import CorruptImageError, NoSuchFileError
from .fileio import FileIO
from .header import read_image_header
from .snapshot_table import SnapshotInfo, SnapshotRecord, parse_table

#: mapped entries are counted in pieces of this many bytes of block table
CHUNK = 1 << 20
#: past this many bytes of table data, count with numpy: array.count costs ~20 ns an entry,
#: numpy's import ~60 ms (benchmarks/README.md, "Start-up of the command line")
NUMPY_PAST = 8 << 20


def summarize(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[SnapshotInfo]]:
    """(what Disk.info() returns, the snapshots' SnapshotInfo oldest first) of the image at path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise NoSuchFileError(path)
    fio = FileIO(path, writable=False)
    try:
        fio.lock(exclusive=False)
        h, _slot = read_image_header(fio)
        file_size = fio.size()
        records: list[SnapshotRecord] = []
        damaged: list[str] = []
        if h.snapshot_count:
            raw = fio.pread(h.snapshot_count * L.SNAPSHOT_ENTRY_SIZE, h.snapshot_offset)
            if len(raw) < h.snapshot_count * L.SNAPSHOT_ENTRY_SIZE:
                raise CorruptImageError(f"{path}: snapshot table truncated")
            records = parse_table(raw, h.snapshot_count, h, file_size, damaged=damaged)
        consumers: list[consumer_table.ConsumerRecord] = []
        if h.consumer_count:
            raw = fio.pread(h.consumer_count * L.CONSUMER_ENTRY_SIZE, h.consumer_offset)
            if len(raw) < h.consumer_count * L.CONSUMER_ENTRY_SIZE:
                raise CorruptImageError(f"{path}: consumer table truncated")
            try:
                consumers = consumer_table.parse_table(raw, h.consumer_count, h)
            except CorruptImageError as exc:
                raise CorruptImageError(f"{path}: {exc} (run 'vdisk check --repair', which drops the "
                                        f"consumer table)") from None
        allocated = mapped_entries(fio, h.table_offset, h.nblocks, file_size)
        out: dict[str, Any] = {
            "path": path,
            "format": "vdisk",
            "version": h.version,
            "virtual_size": h.virtual_size,
            "block_size": h.block_size,
            "uuid": str(_uuid.UUID(bytes=h.image_uuid)),
            "allocated_blocks": allocated,
            "allocated_bytes": allocated * h.block_size,
            "file_size": file_size,
            "coarse_region_size": 1 << h.coarse_shift,
            "track_changes": h.tracking,
            "snapshots": len(records),
            "consumers": [{"name": r.name, "change_id": r.change_id} for r in consumers],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.created_ns / 1e9)),
        }
        if damaged:
            out["damaged_snapshot_records"] = len(damaged)
        if h.tracking:
            out.update(generation=h.generation, tracking_id=str(_uuid.UUID(bytes=h.tracking_uuid)),
                       change_id=last_change_id(fio, h), dirty_coarse_regions=dirty_regions(fio, h))
        return out, [rec.info() for rec in records]
    finally:
        fio.close()


def last_change_id(fio: FileIO, h: L.Header) -> str | None:
    """The id of the last closed generation (Disk.change_id): its token is one entry of the checkpoint log."""
    g = h.generation - 1
    if g < 1:
        return None
    if not h.has_log:
        return format_change_id(h.tracking_uuid, g)
    raw = fio.pread(L.LOG_ENTRY_SIZE, h.log_offset + (g % h.log_capacity) * L.LOG_ENTRY_SIZE)
    entry_g, token = struct.unpack("<QQ", raw.ljust(L.LOG_ENTRY_SIZE, b"\0"))
    return issued_id(h, g, token if entry_g == g else 0)      # an entry of another generation: none


def dirty_regions(fio: FileIO, h: L.Header) -> int:
    """Coarse regions of the disk whose bit is set on disk (ChangeTracker.dirty_regions after an open)."""
    nregions = L.regions_for(h.nblocks, h.coarse_shift - h.block_shift)
    bits = int.from_bytes(fio.pread(h.bitmap_length, h.bitmap_offset), "little")   # bit r: byte r>>3, bit r&7
    return (bits & ((1 << nregions) - 1)).bit_count()


def mapped_entries(fio: FileIO, offset: int, n: int, file_size: int) -> int:
    """Nonzero entries among the first n of the uint32 block table at offset (BlockTable.allocated):
    only the parts of the file that hold data are read, CHUNK bytes at a time."""
    end = min(offset + n * 4, file_size)
    extents = []
    for off, length in fio.data_extents(offset, end):
        lo = off - (off - offset) % 4
        extents.append((lo, off + length - lo))
    if sum(length for _, length in extents) > NUMPY_PAST:
        import numpy as np          # a table this large counts faster with numpy than numpy loads
        return sum(int(np.count_nonzero(np.frombuffer(piece, dtype="<u4"))) for piece in _pieces(fio, extents))
    count = 0
    for piece in _pieces(fio, extents):
        entries = array.array("I")          # 4 bytes on every platform vdisk builds on
        entries.frombytes(piece)            # zero in either byte order
        count += len(entries) - entries.count(0)
    return count


def _pieces(fio: FileIO, extents: list[tuple[int, int]]) -> Iterator[bytes]:
    """The bytes of each extent, CHUNK at a time, cut to whole 4-byte entries."""
    for off, length in extents:
        for pos in range(off, off + length, CHUNK):
            size = min(CHUNK, off + length - pos) // 4 * 4
            if size:
                yield fio.pread(size, pos)
