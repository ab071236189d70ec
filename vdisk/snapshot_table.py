"""The snapshot table's records: serialization and the checks every open makes.

One record per snapshot (docs/FORMAT.md, "Snapshot table"): its name, size,
generation, change-id token and the regions of its frozen block table and
counters.  This module needs neither numpy nor the compiled core (``vdisk
info`` lists snapshots without loading them, vdisk/summary.py);
vdisk.snapshots, which holds the Snapshot view, re-exports every name.
"""
from __future__ import annotations

import bisect
import datetime
import re
import struct
import typing

from . import layout as L
from .changeid import format_change_id
from .errors import CorruptImageError, InvalidArgumentError


# backup()'s temporary snapshots: this prefix and 32 hex digits.  One that no
# backup reads any more (its backup was interrupted) is deleted by the next backup.
BACKUP_SNAPSHOT_PREFIX = "vdisk-backup-"
_BACKUP_SNAPSHOT_RE = re.compile(r"^vdisk-backup-[0-9a-f]{32}$")


def is_backup_snapshot(name: str) -> bool:
    return bool(_BACKUP_SNAPSHOT_RE.match(name))


class SnapshotInfo(typing.NamedTuple):
    name: str
    change_id: str
    generation: int
    created: datetime.datetime
    size: int


class SnapshotRecord:
    """One entry of the on-disk snapshot table (docs/FORMAT.md, "Snapshot table")."""

    __slots__ = [name for name, _ in L.SNAPSHOT_FIELDS if not name.startswith("reserved") and name != "name_length"]
    # the slots' types, for type checkers (layout.SNAPSHOT_FIELDS declares the bytes)
    snapshot_id: int
    generation: int
    virtual_size: int
    created_ns: int
    table_offset: int
    counter_offset: int
    tracking_uuid: bytes
    token: int
    name: str

    def __init__(self, **fields: typing.Any):
        fields.setdefault("token", 0)          # a legacy record: its id is tokenless
        for k in self.__slots__:
            setattr(self, k, fields[k])

    def table_bytes(self, block_size: int) -> int:
        return L.round_up(max(1, -(-self.virtual_size // block_size)) * 4, block_size)

    def regions(self, block_size: int) -> list[tuple[str, int, int]]:
        n = self.table_bytes(block_size)
        return [(f"snapshot {self.name!r} table", self.table_offset, n),
                (f"snapshot {self.name!r} counters", self.counter_offset, n)]

    def pack(self) -> bytes:
        name = self.name.encode()
        values: list[object] = []
        for field, _code in L.SNAPSHOT_FIELDS:
            if field == "name":
                values.append(name)
            elif field == "name_length":
                values.append(len(name))
            elif field.startswith("reserved"):
                values.append(b"")
            else:
                values.append(getattr(self, field))
        body = L.SNAPSHOT_STRUCT.pack(*values)
        return body + struct.pack("<I", L.crc32c(body))

    @classmethod
    def unpack(cls, raw: bytes, index: int) -> "SnapshotRecord":
        body = raw[:L.SNAPSHOT_ENTRY_SIZE - 4]
        (crc,) = struct.unpack_from("<I", raw, L.SNAPSHOT_ENTRY_SIZE - 4)
        if L.crc32c(body) != crc:
            raise CorruptImageError(f"snapshot table entry {index}: CRC mismatch")
        fields = dict(zip((f for f, _ in L.SNAPSHOT_FIELDS), L.SNAPSHOT_STRUCT.unpack(body)))
        n = fields.pop("name_length")
        if not 1 <= n <= L.MAX_SNAPSHOT_NAME:
            raise CorruptImageError(f"snapshot table entry {index}: name length {n}")
        try:
            fields["name"] = fields["name"][:n].decode()
        except UnicodeDecodeError:
            raise CorruptImageError(f"snapshot table entry {index}: name is not UTF-8") from None
        for k in [k for k in fields if k.startswith("reserved")]:
            del fields[k]
        return cls(**fields)

    @property
    def change_id(self) -> str:
        """The id of the generation the snapshot closed (tokenless for a legacy record)."""
        return format_change_id(self.tracking_uuid, self.generation, self.token)

    def info(self) -> SnapshotInfo:
        return SnapshotInfo(self.name, self.change_id, self.generation,
                            datetime.datetime.fromtimestamp(self.created_ns / 1e9, datetime.timezone.utc),
                            self.virtual_size)


def check_name(name: str, taken: typing.Container[str]) -> str:
    if not isinstance(name, str):
        raise InvalidArgumentError(f"snapshot name must be a string, not {type(name).__name__}")
    raw = name.encode()
    if not name or len(raw) > L.MAX_SNAPSHOT_NAME or not name.isprintable() or name != name.strip():
        raise InvalidArgumentError(
            f"snapshot name {name!r}: must be 1 to {L.MAX_SNAPSHOT_NAME} bytes of printable UTF-8 without "
            f"leading or trailing spaces")
    if name in taken:
        raise InvalidArgumentError(f"a snapshot named {name!r} exists already")
    return name


def parse_table(raw: bytes, count: int, hdr: L.Header, file_size: int,
                damaged: list[str] | None = None) -> list[SnapshotRecord]:
    """Records of a snapshot table, each checked against the format's limits:
    CRC, name, size, generation and id (not from the future), regions
    (aligned, inside the file, overlapping neither the header's regions nor
    an earlier record's), names and ids unique.

    A record that fails raises CorruptImageError, or, when ``damaged`` is a
    list, is left out and its message appended there (each damaged record
    alone: the others, and the live disk, stay readable; see "Snapshot
    table" in docs/FORMAT.md)."""
    out: list[SnapshotRecord] = []
    names: set[str] = set()
    ids: set[int] = set()
    bs = hdr.block_size
    starts: list[int] = []          # sorted, disjoint [start, stop) of the regions taken so far
    stops: list[int] = []
    for _name, off, length in hdr.regions():
        _take(starts, stops, off, off + length)
    for i in range(count):
        try:
            rec = SnapshotRecord.unpack(raw[i * L.SNAPSHOT_ENTRY_SIZE:(i + 1) * L.SNAPSHOT_ENTRY_SIZE], i)
            _check_record(rec, i, hdr, file_size, names, ids, starts, stops)
        except CorruptImageError as exc:
            if damaged is None:
                raise
            damaged.append(str(exc))
            continue
        for _what, off, length in rec.regions(bs):
            _take(starts, stops, off, off + length)
        names.add(rec.name)
        ids.add(rec.snapshot_id)
        out.append(rec)
    return out


def _check_record(rec: SnapshotRecord, i: int, hdr: L.Header, file_size: int, names: set[str], ids: set[int],
                  starts: list[int], stops: list[int]) -> None:
    bs = hdr.block_size
    where = f"snapshot table entry {i} ({rec.name!r})"
    if rec.name in names or rec.snapshot_id in ids:
        raise CorruptImageError(f"{where}: duplicate name or id")
    if rec.virtual_size % L.SECTOR or L.blocks_for(rec.virtual_size, hdr.block_shift) > L.MAX_BLOCKS:
        raise CorruptImageError(f"{where}: virtual size {rec.virtual_size} outside the format's limits")
    # a generation counts within its tracking epoch: reset_tracking starts the header's again at 1
    newest = hdr.generation if rec.tracking_uuid == hdr.tracking_uuid else L.MAX_GENERATION + 1
    if not 1 <= rec.generation < newest or rec.snapshot_id >= hdr.snapshot_next_id:
        raise CorruptImageError(f"{where}: generation {rec.generation} or id {rec.snapshot_id} from the future")
    spans = []
    for what, off, length in rec.regions(bs):
        if off % bs or off < L.round_up(L.HEADER_AREA, bs) or off + length > file_size:
            raise CorruptImageError(f"{where}: {what} region [{off}, {off + length}) unaligned or outside the file")
        spans.append((off, off + length))
    (a0, a1), (b0, b1) = spans
    if a0 < b1 and b0 < a1 or any(_overlaps(starts, stops, lo, hi) for lo, hi in spans):
        raise CorruptImageError(f"{where}: its table or counter region overlaps another metadata region")


def _overlaps(starts: list[int], stops: list[int], lo: int, hi: int) -> bool:
    j = bisect.bisect_right(starts, lo) - 1       # the last region starting at or before lo
    return (j >= 0 and stops[j] > lo) or (j + 1 < len(starts) and starts[j + 1] < hi)


def _take(starts: list[int], stops: list[int], lo: int, hi: int) -> None:
    j = bisect.bisect_right(starts, lo)
    starts.insert(j, lo)
    stops.insert(j, hi)
