"""Named backup consumers stored in the image: each remembers its last change id.

The patent's point is that consumers need no state in the image: each
backup application keeps the change id of its own last backup.  This module
is the convenience on top, for applications that would rather let the image
remember: ``d.consumers.register("nightly")``, then
``vdisk.backup(d, dest, consumer="nightly")`` takes a full backup the first
time and an incremental after, recording the new id once the delta is in
place.

The contract
------------
* A consumer's id is recorded only after the backup it names is durable
  (``backup`` places the delta first).  A crash between the two leaves the
  older id, so the next backup covers more, never less; a failure to
  record leaves the delta in place (the failed commit may have landed).
* Every change of the table (register, update, forget) is atomic: a new
  copy of the table is written to fresh blocks and committed by the header,
  the old copy is released after (docs/FORMAT.md, "Consumer table").
* ``reset_tracking`` makes every id stale: it clears the recorded ids in the
  same commit, so each consumer's next backup is a full one.  ``revert``
  keeps them valid (the changed blocks are tracked).
* An id recorded for a consumer must be one this image handed out (a
  closed generation of the current tracking epoch): anything else raises
  StaleChangeIdError, never a silently incomplete next backup.

This module declares the table's serialization and the accessor; the Disk
orders the writes (vdisk/disk.py).
"""
from __future__ import annotations

import datetime
import struct
import typing
from typing import Callable

from . import layout as L
from .changeid import ANY, ChangeId, format_change_id
from .errors import ConsumerNotFoundError, CorruptImageError, InvalidArgumentError
from .errors import StaleChangeIdError

if typing.TYPE_CHECKING:
    from .disk import Disk
    from .extents import Extents

_NO_EPOCH = bytes(16)


class ConsumerInfo(typing.NamedTuple):
    name: str
    change_id: str | None      # the id of its last recorded backup; None: its next backup is a full one
    generation: int            # that id's generation (0: none)
    created: datetime.datetime
    updated: datetime.datetime


def _time(ns: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc)


class ConsumerRecord:
    """One entry of the on-disk consumer table (docs/FORMAT.md, "Consumer table")."""

    __slots__ = ("generation", "tracking_uuid", "created_ns", "updated_ns", "name", "token")

    def __init__(self, name: str, generation: int = 0, tracking_uuid: bytes = _NO_EPOCH,
                 created_ns: int = 0, updated_ns: int = 0, token: int = 0):
        self.name = name
        self.generation = generation
        self.token = token
        self.tracking_uuid = tracking_uuid
        self.created_ns = created_ns
        self.updated_ns = updated_ns

    @property
    def change_id(self) -> str | None:
        return format_change_id(self.tracking_uuid, self.generation, self.token) if self.generation else None

    def info(self) -> ConsumerInfo:
        return ConsumerInfo(self.name, self.change_id, self.generation, _time(self.created_ns),
                            _time(self.updated_ns))

    def pack(self) -> bytes:
        name = self.name.encode()
        body = L.CONSUMER_STRUCT.pack(self.generation, self.tracking_uuid, self.created_ns, self.updated_ns,
                                      len(name), self.token, b"", name)
        return body + struct.pack("<I", L.crc32c(body))

    @classmethod
    def unpack(cls, raw: bytes, index: int) -> "ConsumerRecord":
        body = raw[:L.CONSUMER_ENTRY_SIZE - 4]
        (crc,) = struct.unpack_from("<I", raw, L.CONSUMER_ENTRY_SIZE - 4)
        if L.crc32c(body) != crc:
            raise CorruptImageError(f"consumer table entry {index}: CRC mismatch")
        gen, epoch, created, updated, n, token, reserved, name = L.CONSUMER_STRUCT.unpack(body)
        if not 1 <= n <= L.MAX_CONSUMER_NAME or reserved.strip(b"\0") or name[n:].strip(b"\0"):
            raise CorruptImageError(f"consumer table entry {index}: name length {n} or reserved bytes")
        try:
            text = name[:n].decode()
        except UnicodeDecodeError:
            raise CorruptImageError(f"consumer table entry {index}: name is not UTF-8") from None
        if (gen == 0) != (epoch == _NO_EPOCH) or (gen == 0 and token):
            raise CorruptImageError(f"consumer {text!r}: generation {gen}, tracking epoch and token disagree")
        return cls(text, gen, epoch, created, updated, token)


def check_name(name: object, taken: typing.Container[str] = ()) -> str:
    if not isinstance(name, str):
        raise InvalidArgumentError(f"consumer name must be a string, not {type(name).__name__}")
    if not name or len(name.encode()) > L.MAX_CONSUMER_NAME or not name.isprintable() or name != name.strip():
        raise InvalidArgumentError(
            f"consumer name {name!r}: must be 1 to {L.MAX_CONSUMER_NAME} bytes of printable UTF-8 without "
            f"leading or trailing spaces")
    if name in taken:
        raise InvalidArgumentError(f"a consumer named {name!r} is registered already")
    return name


def parse_table(raw: bytes, count: int, hdr: L.Header) -> list[ConsumerRecord]:
    """Records of a consumer table, each checked against the format and the header.

    An id of the current tracking epoch must name a closed generation; an id
    of another epoch is impossible (reset_tracking clears them), so it is
    corruption too.
    """
    out, names = [], set()
    for i in range(count):
        rec = ConsumerRecord.unpack(raw[i * L.CONSUMER_ENTRY_SIZE:(i + 1) * L.CONSUMER_ENTRY_SIZE], i)
        if rec.name in names:
            raise CorruptImageError(f"consumer table: duplicate name {rec.name!r}")
        if rec.generation and (rec.tracking_uuid != hdr.tracking_uuid or rec.generation >= hdr.generation):
            raise CorruptImageError(f"consumer {rec.name!r}: id {rec.change_id} is not one this image handed out")
        names.add(rec.name)
        out.append(rec)
    return out


class Consumers:
    """``Disk.consumers``: the named consumers of one image, a read-only mapping
    from name to :class:`ConsumerInfo` with methods that change the table.

        >>> d.consumers.register("nightly")
        >>> vdisk.backup(d, "full.vdelta", consumer="nightly")     # full: no id yet
        >>> vdisk.backup(d, "incr.vdelta", consumer="nightly")     # since the last one
        >>> d.consumers["nightly"].change_id
    """

    def __init__(self, disk: Disk, records: Callable[[], list[ConsumerRecord]], check_id: Callable[[str], object],
                 change: Callable[[str, str, str | None], ConsumerInfo | None]):
        """What the table needs of its Disk, given by the Disk: records() (a copy
        of the table, under its lock), check_id(change_id) (StaleChangeIdError
        if the image cannot answer it) and change(op, name, change_id) (commits
        a changed table); disk itself only for its public API."""
        self._disk = disk
        self._records = records
        self._check_id = check_id
        self._change = change

    def __getitem__(self, name: str) -> ConsumerInfo:
        for rec in self._records():
            if rec.name == name:
                return rec.info()
        raise ConsumerNotFoundError(f"{self._disk.path}: no consumer named {name!r} (register it first)")

    def get(self, name: str, default: ConsumerInfo | None = None) -> ConsumerInfo | None:
        try:
            return self[name]
        except ConsumerNotFoundError:
            return default

    def __contains__(self, name: object) -> bool:
        return any(rec.name == name for rec in self._records())

    def __iter__(self) -> typing.Iterator[str]:
        return iter([rec.name for rec in self._records()])

    def __len__(self) -> int:
        return len(self._records())

    def values(self) -> list[ConsumerInfo]:
        return [rec.info() for rec in self._records()]

    def last_id(self, name: str) -> str | None:
        """The change id of the consumer's last recorded backup (None: its next is full).

        None too when the image can no longer answer that id (the checkpoint
        log no longer holds its token: a copy of the image that diverged
        carries the consumer table along, or the ring moved past it)."""
        cid = self[name].change_id
        if cid is None:
            return None
        try:
            self._check_id(cid)
        except StaleChangeIdError:
            return None
        return cid

    def changes(self, name: str) -> Extents:
        """What the consumer's next backup must copy: the changes since its last
        id, or every allocated extent when it has none."""
        return self._disk.changes_since(self.last_id(name) or ANY)

    # --- changing -------------------------------------------------------------------
    def register(self, name: str, change_id: str | None = None) -> ConsumerInfo:
        """Add a consumer; change_id: the id of a backup it already holds (None: none yet)."""
        return self._changed("register", name, change_id)

    def update(self, name: str, change_id: str) -> ConsumerInfo:
        """Record change_id as the consumer's last completed backup.  Call it
        only once that backup is durable: the next one starts from this id."""
        if change_id is None:
            raise InvalidArgumentError("update needs a change id (forget and register again to start over)")
        return self._changed("update", name, change_id)

    def _changed(self, op: str, name: str, change_id: str | None) -> ConsumerInfo:
        info = self._change(op, name, change_id)
        assert info is not None             # register and update return the changed record's info
        return info

    def forget(self, name: str) -> None:
        """Remove a consumer from the image."""
        self._change("forget", name, None)

    def __repr__(self) -> str:
        return f"<vdisk consumers {list(self)!r}>"


def apply(records: list[ConsumerRecord], op: str, name: str, change_id: str | None, hdr: L.Header,
          now_ns: int, resolve: Callable[["str | ChangeId"], int]) -> tuple[list[ConsumerRecord], ConsumerRecord | None]:
    """The table after one change (records are not modified), and the changed record.
    resolve(change_id) -> generation: the image's check of an id (StaleChangeIdError)."""
    taken = {rec.name for rec in records}
    if op == "register":
        check_name(name, taken)
        if len(records) >= L.MAX_CONSUMERS:
            raise InvalidArgumentError(f"the image holds the maximum of {L.MAX_CONSUMERS} consumers")
        rec = ConsumerRecord(name, created_ns=now_ns, updated_ns=now_ns)
        out = records + [rec]
    else:
        if name not in taken:
            raise ConsumerNotFoundError(f"no consumer named {name!r} "
                                        f"({'nothing to forget' if op == 'forget' else 'register it first'})")
        if op == "forget":
            return [r for r in records if r.name != name], None
        old = next(r for r in records if r.name == name)
        rec = ConsumerRecord(name, created_ns=old.created_ns, updated_ns=now_ns)
        out = [rec if r is old else r for r in records]
    if change_id is not None:
        cid = ChangeId.parse(change_id)     # once: resolve takes the ChangeId
        rec.generation = resolve(cid)
        rec.tracking_uuid = hdr.tracking_uuid
        rec.token = cid.token
    return out, rec


def cleared(records: list[ConsumerRecord], now_ns: int) -> list[ConsumerRecord]:
    """The table with every id dropped (a new tracking epoch)."""
    return [ConsumerRecord(r.name, created_ns=r.created_ns, updated_ns=now_ns) for r in records]
