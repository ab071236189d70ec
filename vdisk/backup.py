"""Backups of vdisk images to HDF5 delta files, and restores from chains of them.

The contract
------------
* ``backup(source, dest, since=None)`` writes one *delta*: the blocks of
  ``source`` changed after the change id ``since`` (every allocated block
  when ``since`` is None or ``"*"``: a full backup), as of one point in
  time.  From a Disk or a path that point is a temporary internal snapshot,
  taken at the start and deleted once the delta is complete and synced,
  before it is linked into place (also when the copy fails), so the disk
  stays writable during the copy; a source given as a path is closed
  (flushed and synced) then too.  A Disk opened "r" (or a path the user
  may not write, opened so) needs no snapshot: its shared lock keeps every
  writer out.  It cannot name a new point either (that writes the image):
  its delta names the image's last change id and holds the image as it is,
  blocks changed after that id included, which the next incremental since
  it copies again (more, never less); since that very id is refused, and
  so is a consumer's backup (its record is a write).  A crash (or a failed delete) can leave
  that snapshot (``vdisk-backup-`` and 32 hex digits); the next backup of
  the image deletes every such snapshot no open view reads.  The result's ``change_id`` names the
  point: the consumer keeps it and passes it as ``since`` next time.  A
  stale ``since`` raises StaleChangeIdError before any file is written.
* A delta appears under ``dest`` only complete and durable: it is written
  under a temporary name in dest's directory, fsynced, linked into place
  (never replacing a file) and the directory fsynced.  An interrupted
  backup, or one that raises (deleting the temporary snapshot, closing
  the source or syncing the directory failed too), leaves no file under
  ``dest``.
* ``restore(chain, target)`` of a full backup and its incrementals, in
  order, gives an image byte-identical to the source at the last delta's
  point.  Before the target is touched, the chain is validated: every
  delta's structure, attributes checksum and extents, the links (one image,
  one tracking epoch, each delta's ``since`` the previous one's
  ``change_id``, a full first) and every block checksum.  A fresh restore is
  built under a temporary name and renamed into place; applying
  incrementals to an already restored target verifies every delta
  completely before its first write.  A sidecar ``<target>.vdisk-chain``
  records the point the target is at.
* Damage raises :class:`ChecksumError` or :class:`CorruptImageError`
  naming the file and the block or structure; a broken chain raises
  :class:`BackupChainError` naming the link.  h5py/HDF5 errors never escape
  raw.
* Memory is bounded: data moves in batches of at most ``BATCH_BYTES``
  (and at least one block); the extents of a delta are held in memory.

The delta file itself is declared, read and written in vdisk/delta.py;
docs/BACKUP_FORMAT.md describes it and the sidecar, so that a delta can be
restored with h5py and numpy alone.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid as _uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Union

import numpy as np
import numpy.typing as npt

from .delta import (FLAG_ZERO, FORMAT_NAME, FORMAT_VERSION, UUID_RE, DeltaFile, DeltaWriter,
                    abandoned_partials, batch_rows_for, check_dest, now_iso, parse_compression,
                    remove_abandoned_partials)
from .errors import (BackupChainError, CorruptImageError, ImageLockedError, InvalidArgumentError, ReadOnlyError,
                     StaleChangeIdError, UnsupportedFeatureError, VdiskIOError)
from .errors import FROM_SCRATCH, Param
from ._types import PathArg, Progress
from .extents import Extents
from .fileio import FileIO, atomic_output, fsync_dir, open_regular, refuse_if_in_use
from .results import BackupResult as BackupResult
from .sinks import RangeWriteback, RawSink, VdiskSink
from .protocols import ImageSink
from .snapshots import BACKUP_SNAPSHOT_PREFIX, Snapshot
from .changeid import ANY, ChangeId, Since, parse_since

if TYPE_CHECKING:
    from .disk import Disk

Deltas = Union[PathArg, Iterable[PathArg]]       # one delta file, or a chain in order
#: a frozen view a delta is written from: a Snapshot, or a Disk nobody can write
View = Union["Disk", Snapshot]
#: before_place(): called once the delta is complete and synced, before it is put in place
BeforePlace = Callable[[], None]
Int64s = npt.NDArray[np.int64]


# ---------------------------------------------------------------------------- the chain sidecar
CHAIN_SUFFIX = ".vdisk-chain"          # the sidecar next to a restored target
CHAIN_FORMAT = "vdisk-chain"
CHAIN_VERSION = 1


def sidecar_path(target: PathArg) -> str:
    """The chain sidecar of a restored target: ``<target>.vdisk-chain``."""
    return os.fspath(target) + CHAIN_SUFFIX


# ---------------------------------------------------------------------------- extent arithmetic
def _runs_cover(starts: Int64s, ends: Int64s, points: Int64s) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
    """For each point: the index of the run [start, end) holding it, and whether one does."""
    idx = np.searchsorted(starts, points, side="right") - 1
    safe = np.maximum(idx, 0)
    inside = (idx >= 0) & (points < ends[safe]) if len(starts) else np.zeros(len(points), dtype=bool)
    return safe, inside


def _merge_runs(b0: Int64s, b1: Int64s, same: Iterable[npt.NDArray[Any]] = (),
                extra: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.bool_]:
    """True where a merged run starts: runs merge with the previous one when
    they touch it in blocks, every array in `same` is equal across the two,
    and `extra` (a mask, True = may join) allows it."""
    starts = np.ones(len(b0), dtype=bool)
    if len(b0) > 1:
        joins = b0[1:] == b1[:-1]
        for arr in same:
            joins &= arr[1:] == arr[:-1]
        if extra is not None:
            joins &= extra[1:]
        starts[1:] = ~joins
    return starts


def _split_by_allocation(changed: Extents, allocated: Extents, bs: int, size: int
                         ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.uint8]]:
    """Changed extents cut into data (allocated) and zero (unallocated) extents: offsets, lengths, flags."""
    if not changed:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.uint8)
    cs = (changed.offsets // np.uint64(bs)).astype(np.int64)
    ce = ((changed.offsets + changed.lengths + np.uint64(bs - 1)) // np.uint64(bs)).astype(np.int64)
    as_ = (allocated.offsets // np.uint64(bs)).astype(np.int64)
    ae = ((allocated.offsets + allocated.lengths + np.uint64(bs - 1)) // np.uint64(bs)).astype(np.int64)
    points = np.unique(np.concatenate((cs, ce, as_, ae)))
    s, e = points[:-1], points[1:]
    _, in_changed = _runs_cover(cs, ce, s)
    _, in_alloc = _runs_cover(as_, ae, s)
    s, e, zero = s[in_changed], e[in_changed], ~in_alloc[in_changed]
    first = _merge_runs(s, e, [zero])
    idx = np.flatnonzero(first)
    last = np.append(idx[1:] - 1, len(s) - 1)
    s_m, e_m = s[idx], e[last]
    offsets = s_m.astype(np.uint64) * np.uint64(bs)
    ends = np.minimum(e_m.astype(np.uint64) * np.uint64(bs), np.uint64(size))
    flags = np.where(zero[idx], FLAG_ZERO, 0).astype(np.uint8)
    return offsets, ends - offsets, flags


# ---------------------------------------------------------------------------- backup
def _resolve_source(source: object) -> tuple[View, bool]:
    """(the Disk or the Snapshot, owned disk?) for a path, a Disk or a Snapshot."""
    from .disk import Disk, open as open_disk
    if isinstance(source, Snapshot):
        return source, False
    if isinstance(source, Disk):
        return source, False
    if isinstance(source, (str, bytes, os.PathLike)):
        path = os.fsdecode(source) if isinstance(source, bytes) else source     # the same file, named as a str
        try:
            return open_disk(path, "r+"), True
        except VdiskIOError as exc:     # the user may only read it: nobody writes while we hold it "r"
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
        return open_disk(path, "r"), True
    raise InvalidArgumentError(f"backup source must be a path, a vdisk.Disk or a vdisk.Snapshot, "
                               f"not {type(source).__name__}")


def backup(source: PathArg | Disk | Snapshot, dest: PathArg, *, since: str | None = None,
           compression: str | None = "gzip", progress: Progress | None = None,
           consumer: str | None = None) -> BackupResult:
    """Back up `source` (a path, an open Disk or a Snapshot) to a new delta file `dest`.

    since=None or "*": a full backup of the allocated extents; since=<change id>:
    only the blocks changed after that point.  Returns a :class:`BackupResult`
    whose ``change_id`` the caller keeps for its next incremental.
    consumer=<name>: instead of since, a consumer registered in the image
    (``Disk.consumers``): the backup starts from its last recorded id (a full
    one if it has none) and, once the delta is in place, records the new id.
    progress(done_bytes, total_bytes) is called as data is copied, finally with done == total.
    """
    comp = parse_compression(compression)
    dest = check_dest(dest)
    remove_abandoned_partials(os.path.dirname(os.path.abspath(dest)))    # a killed backup's leftovers
    if consumer is not None and since is not None:
        raise InvalidArgumentError.naming("give ", Param("since"), " or ", Param("consumer"),
                                          ", not both: a consumer's backup starts from its own id")
    since = ANY if since is None else since
    try:
        view, owned = _resolve_source(source)
    except ImageLockedError:                 # served by `vdisk serve`: the backup runs in the server
        path = os.fsdecode(source) if isinstance(source, bytes) else source
        if not isinstance(path, (str, os.PathLike)):      # only opening a path takes a lock
            raise
        from . import live
        served = live.find_server(path)
        if served is None:
            raise
        with live.LiveDisk(os.fspath(path), served) as remote:
            return remote.backup(dest, since=None if since == ANY else since, consumer=consumer,
                                 compression=compression, progress=progress)
    try:
        if consumer is not None:
            if isinstance(view, Snapshot):
                raise InvalidArgumentError.naming(Param("consumer"), " needs the image (a path or a Disk), not a snapshot")
            disk = view
            if disk.tracking_id is None:
                raise UnsupportedFeatureError(f"{disk.path}: change tracking is off for this image: it has no "
                                              f"consumers")
            if not disk.writable():
                raise ReadOnlyError(f"{disk.path}: open read-only (no write permission, or mode 'r'), but a "
                                    f"consumer's backup records its new id in the image: back up since the "
                                    f"consumer's last id instead (vdisk consumer list shows it), or open the "
                                    f"image writable")
            since = disk.consumers.last_id(consumer) or ANY
            result = _backup_disk(disk, dest, since, comp, progress)
            _record(disk, consumer, result)
            return result
        if isinstance(view, Snapshot):
            return _backup_snapshot(view, dest, since, comp, progress)
        if not view.writable():
            return _backup_unwritable(view, dest, since, comp, progress, close_before_place=owned)
        return _backup_disk(view, dest, since, comp, progress, close_before_place=owned)
    finally:
        if owned:
            view.close()


def _record(disk: Disk, consumer: str, result: BackupResult) -> None:
    """The delta is in place: the consumer's next backup starts from its id.

    If recording fails, the delta stays: the failed commit may still have
    reached the disk (a failed fsync says nothing about what landed), so the
    consumer may name the new id, and removing its delta would break its
    chain.  If it names the older id, the next backup covers these changes
    again: more, never less.  A crash in between is the same case."""
    try:
        disk.consumers.update(consumer, result.change_id)
    except BaseException as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"the delta {result.dest} is complete and stays: consumer {consumer!r} names its id "
                         f"or its older one (vdisk consumer list tells)")
        raise


def _backup_disk(disk: Disk, dest: str, since: str | ChangeId, comp: str | None, progress: Progress | None,
                 close_before_place: bool = False) -> BackupResult:
    """Back up the live disk through a temporary snapshot, deleted before the delta is placed.
    close_before_place: the caller owns the disk and needs nothing more of it: close it
    before the delta is in place too (its last flush and fsync may fail)."""
    if disk.tracking_id is None:
        raise UnsupportedFeatureError.naming(f"{disk.path}: change tracking is off for this image: a backup "
                                             f"needs change ids (create the image with ", Param("track_changes", True), ")")
    since = parse_since(since)      # once: the layers below take the ChangeId
    if since != ANY:      # a stale id (another copy's too) fails before anything is written, even the snapshot
        disk.changes_in(since, 0, 0)        # validates the id at no cost (an empty range)
    disk.drop_orphan_backup_snapshots()     # of backups a crash or an error interrupted
    name = f"{BACKUP_SNAPSHOT_PREFIX}{_uuid.uuid4().hex}"
    snap = disk.snapshot(name)
    dropped: list[str] = []

    def drop_snapshot() -> None:     # the delta is complete and synced, not yet in place: a failure here leaves none
        dropped.append(name)
        disk.delete_snapshot(name)
        if close_before_place:
            disk.close()
    try:
        return _backup_snapshot(snap, dest, since, comp, progress, before_place=drop_snapshot)
    except BaseException as exc:
        if not dropped:
            try:
                disk.delete_snapshot(name)
            except Exception as cleanup:     # the copy's error is the one to see; say what was left
                if hasattr(exc, "add_note"):
                    exc.add_note(f"also, deleting the temporary snapshot {name!r} failed: {cleanup}")
        raise


def _backup_unwritable(disk: Disk, dest: str, since: str | ChangeId, comp: str | None, progress: Progress | None,
                       close_before_place: bool = False) -> BackupResult:
    """Back up a Disk opened "r": its shared lock keeps every writer out, so the
    image itself is the frozen view (no temporary snapshot, which would write).

    Naming a new point writes the image too (a checkpoint), so the delta names
    the last point the image closed (its change_id) while it holds the image
    as it is: blocks changed after that point may be in it.  Never less: the
    next incremental since that id copies every block changed after it, those
    again.  A backup since that very id would end where it starts: refused."""
    if disk.tracking_id is None:
        raise UnsupportedFeatureError.naming(f"{disk.path}: change tracking is off for this image: a backup "
                                             f"needs change ids (create the image with ", Param("track_changes", True), ")")
    since = parse_since(since)
    if since != ANY:
        disk.changes_in(since, 0, 0)            # a stale id fails before anything is written
    point = disk.change_id
    how = ("it is open read-only (no write permission, or mode 'r'), and naming a new point writes the image "
           "(vdisk checkpoint, or a writable open)")
    if point is None:
        raise ReadOnlyError(f"{disk.path}: no change id yet to name the backup's point, and {how}")
    if since != ANY and since == ChangeId.parse(point):
        raise ReadOnlyError(f"{disk.path}: since {since.given} is the image's last change id: a delta after it ends at a "
                            f"new point, and {how}")

    def close() -> None:
        if close_before_place:
            disk.close()
    return _write_delta(disk, point, dest, since, comp, progress, before_place=close)


def _backup_snapshot(snap: Snapshot, dest: str, since: str | ChangeId, compression: str | None,
                     progress: Progress | None, before_place: BeforePlace | None = None) -> BackupResult:
    if not snap._disk.track_changes:             # frozen counters of an untracked image say nothing
        raise UnsupportedFeatureError.naming(f"{snap._disk.path}: change tracking is off for this image: a "
                                             f"backup needs change ids (create the image with ",
                                             Param("track_changes", True), ")")
    return _write_delta(snap, snap.change_id, dest, parse_since(since), compression, progress, before_place)


def _write_delta(snap: View, change_id: str, dest: str, since: Since, compression: str | None,
                 progress: Progress | None, before_place: BeforePlace | None = None) -> BackupResult:
    """The delta of view snap (a Snapshot, or a Disk nobody can write) since `since`, named change_id."""
    from . import __version__
    changed = snap.changes_since(since)          # validates since: StaleChangeIdError before any file
    bs, size = snap.block_size, snap.size
    offsets, lengths, flags = _split_by_allocation(changed, snap.map() if since != ANY else changed, bs, size)
    data = (flags & FLAG_ZERO) == 0
    nblocks = (lengths + np.uint64(bs - 1)) // np.uint64(bs)
    rows = int(nblocks[data].sum())
    data_bytes = int(lengths[data].sum())
    zero_bytes = int(lengths[~data].sum())
    attrs: dict[str, Any] = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "image_uuid": str(snap.uuid),
        "tracking_id": snap.tracking_id, "since": ANY if since == ANY else str(since),     # as the image issues it: the chain links by string
        "change_id": change_id, "block_size": bs, "virtual_size": size, "data_blocks": rows,
        "data_bytes": data_bytes, "zero_bytes": zero_bytes, "created": now_iso(), "vdisk_version": __version__,
    }
    writer = DeltaWriter(dest, attrs, offsets, lengths, flags, compression)
    try:
        batch = batch_rows_for(bs)
        buf = np.empty((batch, bs), dtype=np.uint8)
        flat = buf.reshape(-1)
        done, fill, row = 0, 0, 0        # bytes copied, rows in buf, first row of buf
        reported = -1
        for i in np.flatnonzero(data).tolist():
            off, end = int(offsets[i]), int(offsets[i] + lengths[i])
            while off < end:
                take = min(end - off, (batch - fill) * bs)
                snap.preadinto(flat[fill * bs:fill * bs + take], off)
                used = -(-take // bs)
                if take % bs:                      # the disk's last, partial block: zero padding
                    flat[fill * bs + take:(fill + used) * bs] = 0
                fill += used
                off += take
                done += take
                if fill == batch:
                    writer.write_rows(row, buf)
                    row += fill
                    fill = 0
                    if progress:
                        progress(done, data_bytes)
                        reported = done
        if fill:
            writer.write_rows(row, buf[:fill])
            row += fill
        if progress and reported != done:
            progress(done, data_bytes)
        file_bytes = writer.commit(before_place)
    except BaseException:
        writer.abort()
        raise
    return BackupResult(change_id=change_id, since=attrs["since"], extents=changed, bytes_copied=data_bytes,
                        zero_bytes=zero_bytes, dest=dest, image_uuid=attrs["image_uuid"],
                        tracking_id=attrs["tracking_id"], virtual_size=size, block_size=bs, file_bytes=file_bytes)


# ---------------------------------------------------------------------------- verify
def verify(delta: PathArg, *, progress: Progress | None = None) -> dict[str, Any]:
    """Check one delta completely: structure, attributes checksum, extents, every
    block checksum.  Raises CorruptImageError/ChecksumError (FormatError for a
    file that is not a delta); returns a summary dict, whose ``abandoned_partials``
    lists the partial deltas of killed backups and merges in the delta's
    directory (reported, not removed: the next backup or merge there removes them).
    progress(done_bytes, total_bytes): called as block rows are checked, finally with done == total."""
    with DeltaFile.open(delta) as d:
        prog = _Progress(progress, d.rows * d.block_size)
        d.verify_rows(tick=prog.tick)
        prog.finish()
        return _summary(d)


def _summary(d: DeltaFile) -> dict[str, Any]:
    return dict(d.summary(), abandoned_partials=abandoned_partials(os.path.dirname(os.path.abspath(d.path))))


def verify_chain(deltas: Deltas) -> list[dict[str, Any]]:
    """verify() every delta, then check that they form one chain (a full
    first, each next one's since the previous one's change_id: deltas of two
    copies of an image that diverged do not).  Raises BackupChainError naming
    the link; returns the summaries."""
    files = _open_all(_delta_paths(deltas))
    try:
        check_chain(files)
        out = []
        for f in files:
            f.verify_rows()
            out.append(_summary(f))
        return out
    finally:
        for f in files:
            f.close()


# ---------------------------------------------------------------------------- chains
def _gen(change_id: str) -> int:
    """The generation of a delta's id, for the hints of a broken link (the ids were checked
    as the deltas opened; check_chain also takes stand-ins that carry the strings only)."""
    return ChangeId.parse(change_id).generation


def check_chain(files: list[DeltaFile], base: str | None = None, base_what: str = "") -> None:
    """Raise BackupChainError unless files form one chain: one image, one tracking
    epoch, a full first (or, with base, a first whose since is base), each
    next delta's since the previous one's change_id."""
    if not files:
        raise InvalidArgumentError("no delta files given")
    first = files[0]
    if base is None and not first.full:
        raise BackupChainError(
            f"missing full backup: {first.path} is an incremental (since {first.since}); a chain starts with "
            f"the full backup of image {first.image_uuid}")
    if base is not None and first.since != base:
        hint = ("it is of another copy of the image, which diverged from this chain at that generation"
                if _gen(first.since) == _gen(base) else
                "it is applied already" if not first.full and _gen(first.change_id) <= _gen(base) else
                "the deltas between them are missing" if not first.full and _gen(first.since) > _gen(base) else
                "not the next delta for it")
        raise BackupChainError(f"{first.path} starts at {first.since}, but {base_what} is at {base}: {hint}")
    for i, (prev, cur) in enumerate(zip(files, files[1:]), start=1):
        link = f"link {i}: {prev.path} -> {cur.path}"
        if cur.image_uuid != first.image_uuid:
            raise BackupChainError(f"{link}: foreign delta: {cur.path} is a backup of image {cur.image_uuid}, "
                                   f"the chain is of image {first.image_uuid}")
        if cur.tracking_id != prev.tracking_id:
            raise BackupChainError(
                f"{link}: tracking epoch changed: {cur.path} is of tracking epoch {cur.tracking_id}, "
                f"{prev.path} of {prev.tracking_id} (tracking was reset: start a new chain with a full backup)")
        if cur.block_size != prev.block_size:
            raise BackupChainError(f"{link}: block size {cur.block_size} differs from {prev.block_size}")
        if cur.full:
            raise BackupChainError(f"{link}: {cur.path} is a full backup (up to {cur.change_id}); only the first "
                                   f"delta of a chain may be one")
        if cur.since != prev.change_id:
            gp, gs, gc = _gen(prev.change_id), _gen(cur.since), _gen(cur.change_id)
            if cur.change_id == prev.change_id:
                kind = f"duplicate: {cur.path} covers the same point {cur.change_id} as {prev.path}"
            elif gs == gp:
                kind = (f"diverged copies: {cur.path} starts at {cur.since}, but {prev.path} ends at "
                        f"{prev.change_id}, the same generation with another checkpoint token: the two deltas "
                        f"are of two copies of the image that diverged, and {cur.path} does not apply on top "
                        f"of {prev.path}")
            elif gc <= gp:
                kind = (f"out of order: {cur.path} (up to {cur.change_id}) belongs before {prev.path} "
                        f"(up to {prev.change_id})")
            elif gs > gp:
                kind = (f"gap: {cur.path} starts at {cur.since}, but {prev.path} ends at {prev.change_id}: the "
                        f"delta(s) between them are missing")
            else:
                kind = (f"{cur.path} starts at {cur.since}, before {prev.path} ends at {prev.change_id}: it "
                        f"belongs to another consumer's chain")
            order = _chain_order(files)
            if order is not None and not kind.startswith("duplicate"):
                kind = ("out of order: the chain's order is "
                        + ", ".join(f.path for f in order) + f" ({kind})")
            raise BackupChainError(f"{link}: {kind}")


def _chain_order(files: list[DeltaFile]) -> list[DeltaFile] | None:
    """The deltas reordered into one chain, if some order makes one."""
    ordered = sorted(files, key=lambda f: (not f.full, f.since_generation))
    ok = ordered[0].full and all(
        not b.full and b.since == a.change_id and b.image_uuid == a.image_uuid and b.tracking_id == a.tracking_id
        for a, b in zip(ordered, ordered[1:]))
    return ordered if ok and ordered != files else None


class _RunSink(Protocol):
    """Where _Plan.copy sends its runs: whole rows of blocks (length bytes of them count), and zeros."""
    def data(self, offset: int, rows: npt.NDArray[np.uint8], length: int) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...


class _Plan:
    """Which delta provides each block of the result of applying a chain.

    Runs (sorted by block) of: owner delta, zero?, blocks [b0, b1), first
    row, byte cap (bytes past it read as zeros: the extent's end or a later
    shrink).  A delta's blocks survive up to the smallest virtual size of it
    and the deltas after it (a shrink cuts them; a later grow reads zeros
    there unless a later delta holds them).
    """

    def __init__(self, files: list[DeltaFile]):
        self.files = files
        self.size = files[-1].virtual_size
        self.bs = bs = files[-1].block_size
        sizes = np.array([f.virtual_size for f in files], dtype=np.int64)
        self.limits = np.minimum.accumulate(sizes[::-1])[::-1]   # suffix minimum of the virtual sizes
        clipped: list[tuple[Int64s, Int64s, npt.NDArray[np.bool_], Int64s, Int64s]] = []
        for f, lim in zip(files, self.limits.tolist()):
            lb = -(-lim // bs)
            keep = f.block_starts < lb
            s = f.block_starts[keep]
            e = np.minimum(f.block_ends[keep], lb)
            cap = np.minimum((f.offsets[keep] + f.lengths[keep]).astype(np.int64), lim)
            clipped.append((s, e, f.is_zero[keep], f.row_starts[keep], cap))
        points = np.unique(np.concatenate([np.concatenate((c[0], c[1])) for c in clipped] + [np.zeros(0, np.int64)]))
        s, e = points[:-1], points[1:]
        owner = np.full(len(s), -1, dtype=np.int64)
        zero = np.zeros(len(s), dtype=bool)
        row = np.zeros(len(s), dtype=np.int64)
        cap = np.zeros(len(s), dtype=np.int64)
        for i, (cs, ce, cz, cr, cc) in enumerate(clipped):          # newer deltas overwrite older ones
            idx, inside = _runs_cover(cs, ce, s)
            owner[inside] = i
            zero[inside] = cz[idx[inside]]
            row[inside] = cr[idx[inside]] + (s[inside] - cs[idx[inside]])
            cap[inside] = cc[idx[inside]]
        keep = owner >= 0
        s, e, owner, zero, row, cap = s[keep], e[keep], owner[keep], zero[keep], row[keep], cap[keep]
        cap = np.minimum(cap, e * bs)
        # a run joins the previous one if that one is whole up to its end and, for data, rows continue
        may_join = np.ones(len(s), dtype=bool)
        if len(s) > 1:
            may_join[1:] = (cap[:-1] == e[:-1] * bs) & (zero[1:] | (row[1:] == row[:-1] + (e[:-1] - s[:-1])))
        starts = _merge_runs(s, e, [owner, zero], may_join)
        idx = np.flatnonzero(starts)
        last = np.append(idx[1:] - 1, len(s) - 1) if len(idx) else idx
        self.owner, self.zero, self.b0, self.b1 = owner[idx], zero[idx], s[idx], e[last]
        self.row0, self.cap = row[idx], cap[last]

    def data_rows(self) -> int:
        return int((self.b1 - self.b0)[~self.zero].sum())

    def unused_rows(self, i: int) -> list[tuple[int, int]]:
        """Row ranges of delta i the plan never reads (superseded or cut off)."""
        sel = (self.owner == i) & ~self.zero
        used = sorted(zip(self.row0[sel].tolist(), (self.row0[sel] + self.b1[sel] - self.b0[sel]).tolist()))
        out: list[tuple[int, int]] = []
        pos = 0
        for a, b in used:
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < self.files[i].rows:
            out.append((pos, self.files[i].rows))
        return out

    def runs(self) -> Iterator[tuple[int, bool, int, int, int, int]]:
        """(owner, zero, b0, b1, row0, cap) per run, in block order."""
        return zip(self.owner.tolist(), self.zero.tolist(), self.b0.tolist(), self.b1.tolist(),
                   self.row0.tolist(), self.cap.tolist())

    def copy(self, sink: _RunSink, tick: Callable[[int], None] | None = None) -> None:
        """Send every run to sink.data(offset, bytes) / sink.zero(offset, length), in block order."""
        bs, size = self.bs, self.size
        batch = batch_rows_for(bs)
        buf = np.empty((batch, bs), dtype=np.uint8)
        flat = buf.reshape(-1)
        for owner, zero, b0, b1, row0, cap in self.runs():
            if zero:
                sink.zero(b0 * bs, min(b1 * bs, size) - b0 * bs)
                continue
            f = self.files[owner]
            for b in range(b0, b1, batch):
                n = min(batch, b1 - b)
                f.read_rows(row0 + b - b0, n, buf)
                lo, hi = b * bs, (b + n) * bs
                if cap < hi:                      # past the extent's end or a later shrink: zeros
                    flat[max(cap - lo, 0):n * bs] = 0
                sink.data(lo, buf[:n], min(hi, size) - lo)
                if tick:
                    tick(n * bs)


def _delta_paths(deltas: Deltas) -> list[str]:
    if isinstance(deltas, (str, bytes, os.PathLike)):
        deltas = [deltas]
    paths = [os.fspath(p) for p in deltas]
    if not paths:
        raise InvalidArgumentError("no delta files given")
    return paths


def _open_all(paths: Iterable[str]) -> list[DeltaFile]:
    files: list[DeltaFile] = []
    try:
        for p in paths:
            files.append(DeltaFile.open(p))
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


class _Progress:
    """progress(done, total) with done increasing, finally done == total."""

    def __init__(self, callback: Progress | None, total: int):
        self.callback, self.total, self.done, self.reported = callback, total, 0, -1

    def tick(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        self._report()

    def finish(self) -> None:
        self.done = self.total
        self._report()

    def _report(self) -> None:
        if self.callback and self.done != self.reported:
            self.reported = self.done
            self.callback(self.done, self.total)


# ---------------------------------------------------------------------------- restore targets
class _ToSink:
    """The plan's runs (whole rows of blocks) handed to an image sink
    (vdisk.protocols.ImageSink) as bytes."""

    def __init__(self, sink: ImageSink):
        self.sink = sink

    def data(self, offset: int, rows: npt.NDArray[np.uint8], length: int) -> None:
        self.sink.write(rows.reshape(-1)[:length], offset)

    def zero(self, offset: int, length: int) -> None:
        self.sink.zero(offset, length)


def _read_sidecar(target: str) -> dict[str, Any] | None:
    path = sidecar_path(target)
    try:
        fd = open_regular(path, os.O_RDONLY)    # a FIFO or device: InvalidArgumentError, never a wait
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptImageError(f"{path}: unreadable chain sidecar: {exc}") from None
    try:
        with os.fdopen(fd, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:      # RecursionError: JSON nested too deep
        raise CorruptImageError(f"{path}: unreadable chain sidecar: {exc}") from None
    required = {"format": str, "version": int, "state": str, "target_format": str, "image_uuid": str,
                "tracking_id": str, "change_id": str, "virtual_size": int, "block_size": int, "target": dict}
    if not isinstance(data, dict) or data.get("format") != CHAIN_FORMAT:
        raise CorruptImageError(f"{path}: not a vdisk chain sidecar")
    for k, t in required.items():
        if not isinstance(data.get(k), t):
            raise CorruptImageError(f"{path}: field {k!r} missing or not a {t.__name__}")
    if data["version"] != CHAIN_VERSION:
        raise UnsupportedFeatureError(f"{path}: chain sidecar version {data['version']}")
    try:        # exactly as change ids are written (ASCII digits, lower-case hex)
        cid = ChangeId.parse(data["change_id"])
    except StaleChangeIdError:
        cid = None
    if cid is None or str(cid) != data["change_id"] or not UUID_RE.match(data["tracking_id"]) or \
            str(_uuid.UUID(bytes=cid.tracking_uuid)) != data["tracking_id"]:
        raise CorruptImageError(f"{path}: change_id {data['change_id']!r} is not an id of tracking epoch "
                                f"{data['tracking_id']!r}")
    return data


def _write_sidecar(target: str, data: dict[str, Any]) -> None:
    """Atomically (fileio.atomic_output): a temporary file, fsync, rename over the sidecar, fsync the directory."""
    with atomic_output(sidecar_path(target), overwrite=True, what="tmp") as tmp:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())


def _sidecar(state: str, fmt: str, last: DeltaFile, target_info: dict[str, Any], applied: list[str]) -> dict[str, Any]:
    return {"format": CHAIN_FORMAT, "version": CHAIN_VERSION, "state": state, "target_format": fmt,
            "image_uuid": last.image_uuid, "tracking_id": last.tracking_id, "change_id": last.change_id,
            "virtual_size": last.virtual_size, "block_size": last.block_size, "target": target_info,
            "deltas": [os.path.basename(p) for p in applied], "updated": now_iso()}


def _raw_identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


# ---------------------------------------------------------------------------- restore
def restore(deltas: Deltas, target: PathArg, *, format: str | None = None,  # noqa: A002
            progress: Progress | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Restore a chain of deltas (a full backup, then its incrementals in order)
    into `target`, a vdisk image (format="vdisk") or a raw file ("raw").
    format None: "vdisk" for a new target; an earlier restore being advanced
    keeps the format its sidecar records.

    A new target (or any target with overwrite=True) is built from scratch
    under a temporary name and renamed into place.  An existing target
    restored earlier is advanced incrementally when its sidecar
    ``<target>.vdisk-chain`` is at the point the first delta starts from.
    Nothing is written to the target before the chain is validated,
    every block checksum included.  Returns a summary dict.
    """
    if format not in (None, "vdisk", "raw"):
        raise InvalidArgumentError(f"format {format!r}: expected 'vdisk' or 'raw'")
    paths = _delta_paths(deltas)
    target = os.fspath(target)
    if os.path.isdir(target):
        raise InvalidArgumentError(f"{target} is a directory")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise InvalidArgumentError(f"{target}: directory {directory} does not exist")
    files = _open_all(paths)
    try:
        exists = os.path.lexists(target)
        if exists and not overwrite:
            return _restore_onto(files, target, format, progress)
        check_chain(files)
        return _restore_fresh(files, target, format or "vdisk", progress, replace=exists)
    finally:
        for f in files:
            f.close()


def _restore_fresh(files: list[DeltaFile], target: str, fmt: str, progress: Progress | None,
                   replace: bool) -> dict[str, Any]:
    from .disk import create as create_disk
    plan = _Plan(files)
    unused = [plan.unused_rows(i) for i in range(len(files))]
    bs = plan.bs
    verify_bytes = sum((b - a) * bs for ranges in unused for a, b in ranges)
    prog = _Progress(progress, verify_bytes + plan.data_rows() * bs)
    # 1. every block checksum the copy will not read, before anything is written
    for f, ranges in zip(files, unused):
        f.verify_rows(ranges, prog.tick)
    if replace and fmt == "vdisk":
        refuse_if_in_use(target)
    # 2. build under a temporary name; the copy checks the rest of the checksums
    directory = os.path.dirname(os.path.abspath(target))
    sink: ImageSink
    info: dict[str, Any] | None
    with atomic_output(target, overwrite=replace, what="restoring") as tmp:
        if fmt == "vdisk":
            with create_disk(tmp, plan.size, block_size=bs) as d:
                sink = VdiskSink(d, fresh=True)
                plan.copy(_ToSink(sink), prog.tick)
                sink.finish()
                info = {"uuid": str(d.uuid), "change_id": d.checkpoint()}
        else:
            fio = FileIO(tmp, writable=True, create=True)
            try:
                fio.truncate(plan.size)
                sink = RawSink(fio, fresh=True, granule=bs, writeback=RangeWriteback(fio.fd))
                plan.copy(_ToSink(sink), prog.tick)
                sink.finish()
            finally:
                fio.close()
            info = None
        # 3. into place (as the context ends): the old sidecar goes first, so a crash never pairs
        # it with the new image
        side = sidecar_path(target)
        if os.path.lexists(side):
            os.unlink(side)
            fsync_dir(directory)
    try:
        if info is None:
            info = _raw_identity(target)
        _write_sidecar(target, _sidecar("complete", fmt, files[-1], info, [f.path for f in files]))
    except BaseException:
        # a new target without its sidecar could not be advanced: a failed restore leaves
        # neither (a replaced one stays, complete; without a sidecar it is never advanced)
        if not replace:
            for path in (side, target):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        raise
    prog.finish()
    return {"target": target, "format": fmt, "change_id": files[-1].change_id, "virtual_size": plan.size,
            "deltas": len(files), "incremental": False, "bytes_written": plan.data_rows() * bs}


def _restore_onto(files: list[DeltaFile], target: str, fmt: str | None, progress: Progress | None) -> dict[str, Any]:
    """Advance an earlier restore by the given incrementals."""
    from .disk import open as open_disk
    side = _read_sidecar(target)
    first = files[0]
    where = f"target {target} (per {sidecar_path(target)})"
    if side is None:
        raise InvalidArgumentError.naming(
            f"{target} exists and has no chain sidecar {sidecar_path(target)}: it was not restored by vdisk, "
            f"so its position in a chain is unknown (", *FROM_SCRATCH, ")")
    if side["state"] != "complete":
        raise BackupChainError.naming(f"{where}: an earlier restore up to {side['change_id']} was interrupted; "
                                      f"the target is inconsistent (", *FROM_SCRATCH, ")")
    if fmt is None:
        fmt = side["target_format"]
    if side["target_format"] != fmt:
        raise InvalidArgumentError(f"{where}: the target is a {side['target_format']} image, not {fmt}")
    if first.image_uuid != side["image_uuid"]:
        raise BackupChainError(f"foreign delta: {first.path} is a backup of image {first.image_uuid}, {where} "
                               f"holds image {side['image_uuid']}")
    if first.tracking_id != side["tracking_id"]:
        raise BackupChainError.naming(
            f"tracking epoch changed: {first.path} is of tracking epoch {first.tracking_id}, {where} of "
            f"{side['tracking_id']} (restore a new full backup with ", Param("overwrite", True), ")")
    if first.full:
        raise BackupChainError.naming(f"{where} is at {side['change_id']}, and {first.path} is a full backup: ",
                                      *FROM_SCRATCH, f", or give the incrementals after {side['change_id']}")
    check_chain(files, base=side["change_id"], base_what=where)
    if first.block_size != side["block_size"]:
        raise BackupChainError(f"{where}: block size {side['block_size']}, {first.path} has {first.block_size}")
    plan = _Plan(files)
    bs = plan.bs
    total_rows = sum(f.rows for f in files)
    prog = _Progress(progress, (total_rows + plan.data_rows()) * bs)
    disk: Disk | None = None
    fio: FileIO | None = None
    sink: ImageSink
    try:
        if fmt == "vdisk":
            disk = open_disk(target, "r+")
            if str(disk.uuid) != side["target"].get("uuid") or disk.size != side["virtual_size"]:
                raise BackupChainError.naming(f"{where}: the image is not the one that restore wrote (uuid "
                                              f"{disk.uuid}, size {disk.size}); ", *FROM_SCRATCH)
            try:
                changed = disk.changes_since(side["target"].get("change_id"))
            except StaleChangeIdError as exc:
                raise BackupChainError(f"{where}: cannot tell whether the target changed since the restore: "
                                       f"{exc}") from None
            if changed:
                raise BackupChainError.naming(f"{where}: the target was modified after it was restored "
                                              f"({changed.nbytes} bytes changed); ", *FROM_SCRATCH)
        else:
            ident = _raw_identity(target)
            if any(ident[k] != side["target"].get(k) for k in ("size", "mtime_ns", "inode")):
                raise BackupChainError.naming(f"{where}: the raw file changed after it was restored (size, mtime "
                                              f"or inode differ); ", *FROM_SCRATCH)
            fio = FileIO(target, writable=True)
            fio.lock(exclusive=True)
        # 1. every delta, every checksum, before the first write
        for f in files:
            f.verify_rows(None, prog.tick)
        # 2. the sidecar says "restoring" while the target is between two points
        _write_sidecar(target, dict(side, state="restoring", change_id_to=files[-1].change_id, updated=now_iso()))
        base = min(side["virtual_size"], int(plan.limits[0]))
        if disk is not None:            # fmt "vdisk" (the other format opened fio, above)
            if base < disk.size:
                disk.resize(base)
            if plan.size != disk.size:
                disk.resize(plan.size)
            sink = VdiskSink(disk, fresh=False)
            plan.copy(_ToSink(sink), prog.tick)
            sink.finish()
            info = {"uuid": str(disk.uuid), "change_id": disk.checkpoint()}
            disk.close()
            disk = None
        elif fio is not None:           # fmt "raw"
            if base < fio.size():
                fio.truncate(base)
            fio.truncate(plan.size)
            sink = RawSink(fio, fresh=False, granule=bs, writeback=RangeWriteback(fio.fd))
            plan.copy(_ToSink(sink), prog.tick)
            sink.finish()
            fio.close()
            fio = None
            info = _raw_identity(target)
        _write_sidecar(target, _sidecar("complete", fmt, files[-1], info,
                                        list(side.get("deltas", [])) + [f.path for f in files]))
    finally:
        if disk is not None:
            disk.close()
        if fio is not None:
            fio.close()
    prog.finish()
    return {"target": target, "format": fmt, "change_id": files[-1].change_id, "virtual_size": plan.size,
            "deltas": len(files), "incremental": True, "bytes_written": plan.data_rows() * bs}


# ---------------------------------------------------------------------------- merge
class _DeltaSink:
    """Appends the plan's data runs, in order, as the rows of a new delta, in
    whole batches (whole chunks when compressed)."""

    def __init__(self, writer: DeltaWriter, block_size: int):
        self.w, self.row, self.fill = writer, 0, 0
        self.buf = np.empty((batch_rows_for(block_size), block_size), dtype=np.uint8)

    def data(self, offset: int, rows: npt.NDArray[np.uint8], length: int) -> None:
        i = 0
        while i < len(rows):
            k = min(len(rows) - i, len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + k] = rows[i:i + k]
            self.fill += k
            i += k
            if self.fill == len(self.buf):
                self.flush()

    def zero(self, offset: int, length: int) -> None:
        pass                          # a full backup starts from zeros

    def flush(self) -> None:
        if self.fill:
            self.w.write_rows(self.row, self.buf[:self.fill])
            self.row += self.fill
            self.fill = 0


def merge(deltas: Deltas, dest: PathArg, *, progress: Progress | None = None) -> BackupResult:
    """Write one full delta equal to restoring the chain `deltas` (a synthetic
    full backup at the last delta's point).  The chain is validated and every
    delta verified first; dest must not exist.  The new delta uses the
    compression of the newest delta.  progress(done_bytes, total_bytes): called
    as the deltas are verified and copied, finally with done == total.
    Partial deltas of killed backups and merges in dest's directory are
    removed first (those whose writer is dead, as backup does)."""
    from . import __version__
    dest = check_dest(dest)
    remove_abandoned_partials(os.path.dirname(os.path.abspath(dest)))    # a killed backup's or merge's leftovers
    files = _open_all(_delta_paths(deltas))
    try:
        check_chain(files)
        plan = _Plan(files)
        prog = _Progress(progress, sum(f.rows * f.block_size for f in files) + plan.data_rows() * plan.bs)
        for f in files:
            f.verify_rows(tick=prog.tick)
        bs, size, last = plan.bs, plan.size, files[-1]
        data = ~plan.zero
        b0, b1 = plan.b0[data], plan.b1[data]
        starts = _merge_runs(b0, b1)
        idx = np.flatnonzero(starts)
        lastm = np.append(idx[1:] - 1, len(b0) - 1) if len(idx) else idx
        offsets = (b0[idx] * bs).astype(np.uint64)
        lengths = (np.minimum(b1[lastm] * bs, size) - b0[idx] * bs).astype(np.uint64)
        flags = np.zeros(len(offsets), np.uint8)
        rows = int((b1 - b0).sum())
        data_bytes = int(lengths.sum())
        attrs: dict[str, Any] = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "image_uuid": last.image_uuid,
            "tracking_id": last.tracking_id, "since": ANY, "change_id": last.change_id, "block_size": bs,
            "virtual_size": size, "data_blocks": rows, "data_bytes": data_bytes, "zero_bytes": 0,
            "created": now_iso(), "vdisk_version": __version__,
        }
        writer = DeltaWriter(dest, attrs, offsets, lengths, flags, last.compression)
        try:
            sink = _DeltaSink(writer, bs)
            plan.copy(sink, prog.tick)
            sink.flush()
            file_bytes = writer.commit()
            prog.finish()
        except BaseException:
            writer.abort()
            raise
    finally:
        for f in files:
            f.close()
    return BackupResult(change_id=last.change_id, since=ANY, extents=Extents(offsets, lengths),
                        bytes_copied=data_bytes, zero_bytes=0, dest=dest, image_uuid=last.image_uuid,
                        tracking_id=last.tracking_id, virtual_size=size, block_size=bs, file_bytes=file_bytes)
