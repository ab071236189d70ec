"""The image header: reading the valid slot, committing to the other one.

Two slots hold the header (docs/FORMAT.md, "Header"); a commit writes the
slot the current header does not occupy and fsyncs it, so a torn write
leaves the other slot valid.  The Disk and check both read and commit
through here.
"""
from __future__ import annotations

import errno
import struct
import typing

from . import layout as L
from .errors import CorruptImageError, FormatError, VdiskIOError

if typing.TYPE_CHECKING:
    from .fileio import FileIO


def read_slots(fio: FileIO) -> list[tuple[L.Header, int]]:
    """Every slot that passes every check (magic, CRC, fields, file size), with its index."""
    file_size = fio.size()
    raw = fio.pread(2 * L.SLOT_SIZE, 0)
    if raw[:8] != L.MAGIC and raw[L.SLOT_SIZE:L.SLOT_SIZE + 8] != L.MAGIC:
        raise FormatError(f"{fio.path}: not a vdisk image (no vdisk magic in either header slot)")
    valid: list[tuple[L.Header, int]] = []
    errors: list[str] = []
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
    return valid


def read_header(fio: FileIO) -> tuple[L.Header, int]:
    """The slot with the highest sequence that passes every check (magic,
    CRC, fields, file size), and its index."""
    return max(read_slots(fio), key=lambda hv: hv[0].sequence)


def read_image_header(fio: FileIO) -> tuple[L.Header, int]:
    """read_header of a file opened as an image: one shorter than the two
    slots is refused first (FormatError without the vdisk magic, else
    CorruptImageError: truncated).  Disk.open and vdisk/summary.py read here."""
    size = fio.size()
    if size < 2 * L.SLOT_SIZE:
        if fio.pread(8, 0)[:8] != L.MAGIC:
            raise FormatError(f"{fio.path}: not a vdisk image ({size} bytes, no vdisk magic)")
        raise CorruptImageError(f"{fio.path}: truncated to {size} bytes, shorter than the header")
    return read_header(fio)


def older_slot_regions(fio: FileIO, slot: int) -> list[tuple[str, int, int]] | None:
    """The metadata regions the slot other than slot names, None if an open
    would never read it (damaged, never written)."""
    try:
        others = [h for h, i in read_slots(fio) if i != slot]
    except FormatError:
        return None
    return others[0].regions() if others else None


def write_slot(fio: FileIO, raw: bytes, sequence: int) -> int:
    """Write a packed header into the slot its sequence names and fsync: the
    atomic commit point.  Returns the slot."""
    slot = sequence % 2
    fio.pwrite(raw, L.SLOT_OFFSETS[slot])
    fio.fsync()
    return slot


def commit(fio: FileIO, h: L.Header) -> int:
    """Advance h's sequence and commit it (write_slot); returns the slot.

    Never writes a slot a reader would refuse: a sequence past
    L.MAX_SEQUENCE (EOVERFLOW), or a header that fails validation or does
    not pack (EINVAL), raises VdiskIOError instead, with h unchanged:
    memory is ahead of the file, which keeps its last commit.  Operations
    check their own counters before writing anything; this is the backstop."""
    if h.sequence >= L.MAX_SEQUENCE:
        raise VdiskIOError(errno.EOVERFLOW, f"{fio.path}: header sequence {h.sequence} reached the format's "
                                            f"limit {L.MAX_SEQUENCE}; nothing committed (run 'vdisk check "
                                            f"--repair', which renumbers it)")
    h.sequence += 1
    try:
        h.validate()            # what every reader checks (but the file size): a slot they would refuse
        raw = h.pack()          # is never written
    except (CorruptImageError, struct.error) as exc:
        h.sequence -= 1
        raise VdiskIOError(errno.EINVAL, f"{fio.path}: the header to commit would not pass validation "
                                         f"({exc}); nothing committed") from None
    return write_slot(fio, raw, h.sequence)
