"""Change ids: the value type, and the sentinel that names no point.

A change id is ``"<tracking-uuid>/<generation>.<token>"`` (legacy ids, from
before the image had a checkpoint log: ``"<tracking-uuid>/<generation>"``);
:data:`ANY` (``"*"``) names no point: every allocated extent, a full backup.
vdisk/tracking.py says what an id means to an image (its epoch, a closed
generation, the checkpoint log's token) and resolves one.

Ids stay strings at the API, the CLI and the control channel.  Where a
string enters, it is parsed once (:meth:`ChangeId.parse`, or
:func:`parse_since` where ANY is allowed) and the layers below are handed
the ChangeId: ``ChangeId.parse`` of a ChangeId is that ChangeId, so nothing
below parses again.  This module imports neither numpy nor the compiled core: the CLI's
commands use it as they parse their flags, and ``vdisk info`` names an
image's ids through it (vdisk/summary.py); vdisk.tracking re-exports its names.
"""
from __future__ import annotations

import dataclasses
import re
import uuid as _uuid
import typing
from typing import Union

from .errors import StaleChangeIdError

if typing.TYPE_CHECKING:
    from .layout import Header

ANY = "*"                   # the id of "nothing": every allocated extent (a full backup)
_ID_RE = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/([0-9]{1,10})"
                    r"(?:\.([0-9a-f]{16}))?$")


@dataclasses.dataclass(frozen=True)
class ChangeId:
    """A parsed change id: tracking epoch, generation and token (0: a legacy id).
    ``text`` is the string it was parsed from (messages quote it as given); equality
    and hashing ignore it, ``str()`` is the canonical form."""
    tracking_uuid: bytes
    generation: int
    token: int = 0
    text: str = dataclasses.field(default="", compare=False, repr=False)

    @classmethod
    def parse(cls, change_id: object) -> "ChangeId":
        """Syntax only (StaleChangeIdError for anything that is not an id, None included); a ChangeId as it is."""
        if isinstance(change_id, ChangeId):
            return change_id
        if not isinstance(change_id, str):
            raise StaleChangeIdError(f"change id must be a string, got {type(change_id).__name__}")
        m = _ID_RE.match(change_id.strip().lower())
        if not m:
            raise StaleChangeIdError(f"malformed change id {change_id!r}: expected "
                                     f"'<tracking-uuid>/<generation>.<token>' or {ANY!r}")
        token = int(m.group(3), 16) if m.group(3) else 0
        if m.group(3) and token == 0:
            raise StaleChangeIdError(f"malformed change id {change_id!r}: token 0 is never issued")
        return cls(_uuid.UUID(m.group(1)).bytes, int(m.group(2)), token, change_id)

    @property
    def given(self) -> str:
        """The id as it was given (the canonical form for an id vdisk made itself)."""
        return self.text or str(self)

    def __str__(self) -> str:
        base = f"{_uuid.UUID(bytes=self.tracking_uuid)}/{self.generation}"
        return f"{base}.{self.token:016x}" if self.token else base


Since = Union[str, ChangeId]    # what a "since" holds once parsed: ANY or a ChangeId


def parse_since(since: "str | ChangeId") -> Since:
    """A since as given at the API: ANY stays ANY, anything else is parsed (StaleChangeIdError)."""
    return ANY if since == ANY else ChangeId.parse(since)


def format_change_id(tracking_uuid: bytes, generation: int, token: int = 0) -> str:
    return str(ChangeId(tracking_uuid, generation, token))


def parse_change_id(change_id: "str | ChangeId", tracking_uuid: bytes, generation: int) -> int:
    """The generation an id names, checked against a tracking epoch and a
    generation bound only (1 <= g < generation): the syntax check of a delta's
    attributes.  An image checks the token too (CheckpointLog.resolve)."""
    cid = ChangeId.parse(change_id)
    _check_epoch(cid, tracking_uuid, generation)
    return cid.generation


def _check_epoch(cid: ChangeId, tracking_uuid: bytes, generation: int) -> None:
    text = cid.given
    if cid.tracking_uuid != tracking_uuid:
        raise StaleChangeIdError(
            f"change id {text!r} belongs to tracking epoch {_uuid.UUID(bytes=cid.tracking_uuid)}, this image "
            f"tracks as {_uuid.UUID(bytes=tracking_uuid)} (another image, or tracking was reset): take a full "
            f"backup")
    if cid.generation < 1 or cid.generation >= generation:
        raise StaleChangeIdError(
            f"change id {text!r} names generation {cid.generation}, but this image's last closed generation "
            f"is {generation - 1}: the id is from the future (or from a reverted copy of the image)")


def issued_id(hdr: "Header", generation: int, token: int) -> str | None:
    """The id of closed generation `generation` as an image with a checkpoint
    log issues it, given the token its log holds for that generation (0:
    none): tokenless below the header's legacy_generation, else none."""
    if token:
        return format_change_id(hdr.tracking_uuid, generation, token)
    return format_change_id(hdr.tracking_uuid, generation) if generation < hdr.legacy_generation else None
