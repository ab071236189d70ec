"""The results of whole-image operations, as plain values.

:class:`BackupResult` is what :func:`vdisk.backup` and :func:`vdisk.merge`
return, :class:`CheckResult` what :func:`vdisk.check` returns.  They live
here, under backup.py, check.py and live.py, because each of those makes
them: a backup or check run inside a ``vdisk serve`` process comes back
through live.py's client as the same type, so no operation module and the
client need each other.
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

from .extents import Extents


class ConsumerBrief(TypedDict):
    """One consumer as :meth:`vdisk.Disk.info` lists it."""
    name: str
    change_id: str | None


class _ImageInfoBase(TypedDict):
    path: str
    format: str
    version: int
    virtual_size: int
    block_size: int
    uuid: str
    allocated_blocks: int
    allocated_bytes: int
    file_size: int
    coarse_region_size: int
    track_changes: bool
    snapshots: int
    consumers: list[ConsumerBrief]
    created: str


class ImageInfo(_ImageInfoBase, total=False):
    """What :meth:`vdisk.Disk.info` returns (``vdisk info``): the keys of the
    base always; ``damaged_snapshot_records`` when a read-only open left
    damaged records out; the tracking keys when the image tracks changes;
    ``served_by`` (pid, address) when a ``vdisk serve`` answered."""
    damaged_snapshot_records: int
    generation: int
    tracking_id: str
    change_id: str | None
    dirty_coarse_regions: int
    served_by: dict[str, Any]


class BackupResultDict(TypedDict):
    """BackupResult.to_dict(): the fields, with the number of extents for the extents
    (``vdisk backup --output json``)."""
    change_id: str
    since: str
    extents: int
    bytes_copied: int
    zero_bytes: int
    dest: str
    image_uuid: str
    tracking_id: str
    virtual_size: int
    block_size: int
    file_bytes: int


class CheckResultDict(TypedDict):
    """CheckResult.to_dict(): every field (``vdisk check --output json``)."""
    ok: bool
    corruptions: list[str]
    leaked_blocks: int
    unreferenced_data_blocks: int
    corruption_count: int
    repaired: bool
    allocated_blocks: int
    total_blocks: int
    image_end_offset: int


@dataclasses.dataclass(frozen=True)
class BackupResult:
    """What :func:`backup` (and :func:`merge`) wrote.

    ``change_id`` is what the consumer keeps for its next incremental;
    ``extents`` are the source extents the delta covers (data and zeros);
    ``bytes_copied`` the bytes of block data stored (zero extents store none).
    """
    change_id: str
    since: str
    extents: Extents
    bytes_copied: int
    zero_bytes: int
    dest: str
    image_uuid: str
    tracking_id: str
    virtual_size: int
    block_size: int
    file_bytes: int

    def to_dict(self) -> BackupResultDict:
        return {"change_id": self.change_id, "since": self.since, "extents": len(self.extents),
                "bytes_copied": self.bytes_copied, "zero_bytes": self.zero_bytes, "dest": self.dest,
                "image_uuid": self.image_uuid, "tracking_id": self.tracking_id,
                "virtual_size": self.virtual_size, "block_size": self.block_size, "file_bytes": self.file_bytes}


@dataclasses.dataclass
class CheckResult:
    """What check found.  ``corruptions`` lists the first MAX_LISTED
    findings of each kind, worded; ``corruption_count`` counts all of them
    (the number to report: the list is shortened)."""
    ok: bool = True
    corruptions: list[str] = dataclasses.field(default_factory=list)
    leaked_blocks: int = 0
    unreferenced_data_blocks: int = 0
    corruption_count: int = 0
    repaired: bool = False
    allocated_blocks: int = 0
    total_blocks: int = 0
    image_end_offset: int = 0

    def to_dict(self) -> CheckResultDict:
        return CheckResultDict(ok=self.ok, corruptions=list(self.corruptions), leaked_blocks=self.leaked_blocks,
                               unreferenced_data_blocks=self.unreferenced_data_blocks,
                               corruption_count=self.corruption_count, repaired=self.repaired,
                               allocated_blocks=self.allocated_blocks, total_blocks=self.total_blocks,
                               image_end_offset=self.image_end_offset)
