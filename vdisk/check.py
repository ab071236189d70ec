"""Consistency check and repair (``vdisk check``), after ``qemu-img check``.

Recomputes every reference from the header and the block table and
compares it with the stored refcounts:

* corruption: a pointer outside the data area or into metadata, a block
  referenced more often than its refcount says (it could be handed out
  again), a block mapped twice by one table (live or snapshot), a table
  entry past the virtual size, a change counter newer than the image's
  generation, a change counter region sharing blocks with data (the
  region of a lost commit's older header, reused by code that released it
  too early), a damaged consumer table, a damaged snapshot record, a
  header sequence too near its limit for a writer;
* leak: a block whose refcount is higher than its references (space that
  a crash left allocated; harmless, reclaimed by repair);
* unreferenced data: blocks holding file data past the last block any
  table, metadata region or nonzero refcount references (a killed writer's
  appended, never committed blocks); repair truncates the file after them,
  once the rewritten refcounts are durable.

``repair=True`` clears bad pointers and the later of two entries mapping
one block (their blocks read as zeros and count as changed), rewrites the
refcounts from the references, moves the generation past counters newer
than the header (a lost header commit: the ids that commit issued become
stale; a counter is never lowered), starts a new tracking epoch over
counters that share blocks with data (every id stale), clears checkpoint log entries out of
their slot, drops a damaged consumer table and each damaged snapshot record
(the blocks only it referenced become leaks, reclaimed; a block another
table maps is never freed), renumbers a header sequence near its limit,
commits the repaired header into the other slot too when that slot names
other regions (before the refcounts free them), and syncs.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import numpy.typing as npt

from . import _fast
from . import consumers as consumer_table
from . import layout as L
from ._types import Progress
from .arrays import lazy_zeros, load_array as _load_array, nonzero_entries as _nonzero_entries, page_runs
from .header import older_slot_regions, read_header as _read_header, write_slot
from .snapshots import SnapshotRecord, parse_table
from .tracking import CheckpointLog, counters_kept
from .errors import CorruptImageError, FormatError, ImageLockedError
from .fileio import FileIO
from .results import CheckResult as CheckResult

MAX_LISTED = 20   # corruptions listed one by one; the rest are counted

#: entry indices (np.flatnonzero's and the like)
Indices = npt.NDArray[np.integer[Any]]
#: [start, stop) entry ranges of an array that were loaded (outside them it is zero)
Runs = list[tuple[int, int]]


class _Report:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.extra = 0

    def add(self, msg: str) -> None:
        if len(self.items) < MAX_LISTED:
            self.items.append(msg)
        else:
            self.extra += 1

    def add_each(self, indices: Indices, message: Callable[[int], str]) -> None:
        """message(i) for the first MAX_LISTED of indices; the rest are counted."""
        for i in indices[:MAX_LISTED].tolist():
            self.add(message(i))
        self.extra += max(0, len(indices) - MAX_LISTED)

    @property
    def count(self) -> int:
        """Every finding, listed or not."""
        return len(self.items) + self.extra


def check(path: str | os.PathLike[str], repair: bool = False, *, io_factory: Callable[..., Any] = FileIO,
          progress: Progress | None = None) -> CheckResult:
    """Check (and with repair=True, repair) the image at path.
    progress(done_passes, total_passes): called after each whole pass over the
    image (the check; with repair of a damaged image, the repair and the check after it)."""
    fio: FileIO = io_factory(path, writable=repair)
    tick = progress or (lambda done, total: None)
    try:
        try:
            fio.lock(exclusive=repair)
        except ImageLockedError:             # served by `vdisk serve`: a read-only check in the server
            from . import live
            served = live.find_server(path)
            if served is None:
                raise
            if repair:
                served.close()
                raise ImageLockedError(f"{fio.path} is served by vdisk serve: check --repair cannot run on a "
                                       f"served image; stop the server first") from None
            with live.LiveDisk(fio.path, served) as remote:
                return remote.check()
        tick(0, 1)
        result = _check(fio, repair=False)
        if repair and not result.ok:
            tick(1, 3)
            _check(fio, repair=True)
            tick(2, 3)
            result2 = _check(fio, repair=False)
            result2.repaired = True
            tick(3, 3)
            return result2
        tick(1, 1)
        return result
    finally:
        fio.close()


def _check(fio: FileIO, repair: bool) -> CheckResult:
    if fio.size() < 2 * L.SLOT_SIZE and fio.pread(8, 0) != L.MAGIC:
        raise FormatError(f"{fio.path}: not a vdisk image")
    hdr, _slot = _read_header(fio)
    file_size = fio.size()
    snapshots: list[SnapshotRecord] = []
    snap_damage: list[str] = []
    if hdr.snapshot_count:     # a damaged record is left out (and reported below); the others are checked
        raw = fio.pread(hdr.snapshot_count * L.SNAPSHOT_ENTRY_SIZE, hdr.snapshot_offset)
        if len(raw) < hdr.snapshot_count * L.SNAPSHOT_ENTRY_SIZE:
            raise CorruptImageError(f"{fio.path}: snapshot table truncated")
        snapshots = parse_table(raw, hdr.snapshot_count, hdr, file_size, damaged=snap_damage)
    bs = hdr.block_size
    nb = hdr.nblocks
    end_block = -(-file_size // bs)
    report = _Report()
    if hdr.sequence > L.MAX_SEQUENCE - L.SEQUENCE_HEADROOM:     # writers refuse it: no room for commits
        report.add(f"header sequence {hdr.sequence} leaves fewer than {L.SEQUENCE_HEADROOM} commits before the "
                   f"format's limit {L.MAX_SEQUENCE} (repair renumbers it)")
        if repair:
            _renumber_sequence(fio, hdr, _slot)
    for msg in snap_damage:     # its references become leaks below: repair reclaims what no table maps
        report.add(f"{msg} (repair drops the damaged snapshot record)")
    if snap_damage and repair:
        _drop_snapshot_records(fio, hdr, snapshots)
    damage = _consumer_damage(fio, hdr)
    if damage:      # data never depends on it: repair drops the table (its blocks are freed below)
        report.add(f"{damage} (repair drops the consumer table)")
        if repair:
            hdr.consumer_offset = hdr.consumer_count = hdr.consumer_capacity = 0
            _commit(fio, hdr)
    t_ranges: Runs = []
    table = _load_array(fio, hdr.table_offset, hdr.table_capacity, np.uint32, file_size, keep=nb, ranges=t_ranges)
    t_runs = _clip(t_ranges, nb)        # entries outside these are zero: never scanned, never paged in
    r_ranges: Runs = []
    refcounts = _load_array(fio, hdr.refcount_offset, hdr.refcount_capacity, np.uint16, file_size,
                            keep=end_block, ranges=r_ranges)
    table_dirty = False

    # entries past the virtual size must be zero
    n_beyond, beyond = _nonzero_entries(fio, hdr.table_offset, nb, hdr.table_capacity, np.uint32, file_size)
    for i in beyond:
        report.add(f"block table entry {i} past the virtual size ({nb} blocks) is set")
    report.extra += max(0, n_beyond - len(beyond))
    if n_beyond and repair:
        table_dirty = True          # rewriting the table region writes zeros past nb

    # pointers inside the data area: a data block lies wholly inside the file
    meta_end = L.round_up(L.HEADER_AREA, bs) // bs
    hi = min(file_size // bs, hdr.refcount_capacity)
    live = table[:nb]
    bad = _out_of_area(live, t_runs, meta_end, hi)
    report.add_each(bad, lambda i: f"block {i}: points to physical block {int(live[i])} outside the data area "
                                   f"[{meta_end}, {hi})")
    cleared = list(bad.tolist())

    # snapshot tables: the same bounds; they may share blocks with anything
    frozen_tables = []
    for rec in snapshots:
        n_s = L.blocks_for(rec.virtual_size, hdr.block_shift)
        f_ranges: Runs = []
        frozen = _load_array(fio, rec.table_offset, max(n_s, 1), np.uint32, file_size, ranges=f_ranges)
        f_runs = _clip(f_ranges, n_s)
        bad_s = _out_of_area(frozen, f_runs, meta_end, hi)
        report.add_each(bad_s, lambda i: f"snapshot {rec.name!r} block {i}: points to physical block "
                                         f"{int(frozen[i])} outside the data area [{meta_end}, {hi})")
        frozen[bad_s] = 0
        # a snapshot is a copy of a live table: no block mapped twice (a revert
        # would take one reference for two virtual blocks)
        twice = _mapped_twice(frozen, f_runs)
        report.add_each(twice, lambda i: f"snapshot {rec.name!r} block {i}: maps physical block {int(frozen[i])}, "
                                         f"which an earlier block of the same snapshot maps")
        if repair and (len(bad_s) or len(twice)):
            frozen[twice] = 0
            _write_all(fio, frozen, rec.table_offset)
            _mark_frozen_changed(fio, hdr, rec, n_s, twice, file_size)
        frozen_tables.append((frozen, n_s, f_runs, rec))

    # reference counts.  Dense arrays cover the blocks the tables reference
    # (data); metadata regions are checked range by range and the rest of the
    # refcount table in chunks, so a huge sparse file costs no memory.
    valid = live                # the table's own copy in memory: bad pointers dropped in place
    valid[bad] = 0
    size = max([_max_of(valid, t_runs) + 1] + [_max_of(f, r) + 1 for f, _n, r, _rec in frozen_tables])
    regions = list(hdr.regions())
    for rec in snapshots:
        regions += rec.regions(bs)
    L.check_no_overlap(regions, fio.path)
    meta_ranges = [(off // bs, min((off + length) // bs, hi)) for _n, off, length in regions]
    # [0, size) can span a huge sparse file: lazy arrays (pages only where
    # written), and the elementwise passes visit only the chunks where a
    # table points, a metadata region lies or the file holds refcounts
    # (everywhere else all four arrays are zero), so time and memory follow
    # what the file holds, not the highest block it names
    chunks = _chunks_holding(size, [valid] + [f for f, _n, _r, _rec in frozen_tables],
                             [t_runs] + [r for _f, _n, r, _rec in frozen_tables], meta_ranges + r_ranges)
    meta = lazy_zeros(size, np.uint8)
    for lo_b, hi_b in meta_ranges:
        meta[lo_b:hi_b] = 1
    live_refs = lazy_zeros(size, np.uint32)
    _count_refs(valid, t_runs, live_refs)
    dup = _chunked(size, chunks, lambda a, b: np.flatnonzero(live_refs[a:b] > 1))
    report.add_each(dup, lambda p: f"physical block {p} is mapped by {int(live_refs[p])} virtual blocks")
    snap_refs = lazy_zeros(size, np.uint32)
    for frozen, _n, f_runs, _rec in frozen_tables:
        _count_refs(frozen, f_runs, snap_refs)
    into_meta = _chunked(size, chunks, lambda a, b: np.flatnonzero((meta[a:b] != 0)
                                                         & ((live_refs[a:b] + snap_refs[a:b]) > 0)))
    report.add_each(into_meta, lambda p: f"physical block {p} belongs to a metadata region but is mapped as data")
    if repair and (len(dup) or len(into_meta)):
        # keep the first mapping of a shared block, drop the others and any into metadata
        seen: set[int] = set()
        for i in _concat([np.flatnonzero(valid[a:b]) + a for a, b in t_runs]).tolist():
            p = int(valid[i])
            if meta[p] or p in seen:
                cleared.append(i)
                valid[i] = 0
            else:
                seen.add(p)
        live_refs = lazy_zeros(size, np.uint32)
        _count_refs(valid, t_runs, live_refs)
        # snapshot tables: drop their entries into metadata (shared data blocks are theirs to share)
        snap_refs = lazy_zeros(size, np.uint32)
        for frozen, _n, f_runs, rec in frozen_tables:
            into = _concat([np.flatnonzero((frozen[a:b] != 0) & meta[frozen[a:b]]) + a for a, b in f_runs])
            if len(into):
                frozen[into] = 0
                _write_all(fio, frozen, rec.table_offset)
                _mark_frozen_changed(fio, hdr, rec, _n, into, file_size)
            _count_refs(frozen, f_runs, snap_refs)
    def refs(a: int, b: int) -> npt.NDArray[np.uint32]:      # expected references of blocks [a, b)
        expected: npt.NDArray[np.uint32] = live_refs[a:b] + snap_refs[a:b] + meta[a:b]
        return expected

    under = _chunked(size, chunks, lambda a, b: np.flatnonzero(refs(a, b) > refcounts[a:b]))
    for p in under[:MAX_LISTED].tolist():
        if not meta[p] or live_refs[p] == 0:
            report.add(f"physical block {p}: refcount {int(refcounts[p])}, but {int(refs(p, p + 1)[0])} references")
    report.extra += max(0, len(under) - MAX_LISTED)
    leaked = int(_chunked(size, chunks, lambda a, b: np.flatnonzero(refs(a, b) < refcounts[a:b])).size)
    # past the data: metadata blocks hold exactly 1, everything else 0
    n_past, _ = _nonzero_entries(fio, hdr.refcount_offset, size, hdr.refcount_capacity, np.uint16, file_size)
    meta_nonzero = 0
    for lo_b, hi_b in meta_ranges:
        lo_b = max(lo_b, size)
        if hi_b <= lo_b:
            continue
        stored_m = refcounts[lo_b:hi_b]
        zero = np.flatnonzero(stored_m == 0)
        report.add_each(zero, lambda p: f"physical block {lo_b + p} (metadata): refcount 0, but 1 reference")
        meta_nonzero += len(stored_m) - len(zero)
        leaked += int(np.count_nonzero(stored_m > 1))
    leaked += n_past - meta_nonzero

    # past the end of what anything references (the tables, the metadata
    # regions, a nonzero refcount): blocks a killed writer appended but
    # never committed.  Only blocks holding file data count (SEEK_DATA):
    # the holes creation leaves inside the file cost nothing.
    kept_end = max([size, meta_end] + [-(-(off + length) // bs) for _n, off, length in regions])
    ref_end = max([kept_end] + [int(np.flatnonzero(refcounts[lo:hi_r])[-1]) + lo + 1
                     for lo, hi_r in _clip(r_ranges, end_block) if refcounts[lo:hi_r].any()])
    tail: set[int] = set()
    for off, length in fio.data_extents(ref_end * bs, file_size):
        tail.update(range(off // bs, -(-(off + length) // bs)))
    unreferenced = len(tail)

    # the checkpoint log: every entry empty or in its slot
    log = CheckpointLog.load(fio, hdr)
    if log is not None:
        bad_log = log.bad_entries()
        report.add_each(bad_log, lambda i: f"checkpoint log entry {i}: generation {int(log.entries[i, 0])} "
                                           f"token {int(log.entries[i, 1]):#x} does not belong in slot {i}")
        if repair and len(bad_log):
            log.clear_bad()         # ids of those generations become stale: full backups, never less
            fio.fsync()

    # tracking counters
    if hdr.tracking:
        c_ranges: Runs = []
        counters = _load_array(fio, hdr.counter_offset, hdr.table_capacity, np.uint32, file_size,
                               keep=counters_kept(hdr),
                               ranges=c_ranges)
        # counters in blocks a table maps as data: the region of a header whose newer commit was
        # lost, released and reused (older code released it before the other slot stopped naming
        # it): what it holds is data, not counters, and no id of this epoch can be trusted
        c_lo = hdr.counter_offset // bs
        c_hi = c_lo + L.round_up(hdr.table_capacity * L.COUNTER_BYTES, bs) // bs
        reused = int(np.count_nonzero((into_meta >= c_lo) & (into_meta < c_hi)))
        if reused:
            report.add(f"the change counters share {reused} blocks with data (the region of a lost commit's "
                       f"older header, reused): repair starts a new tracking epoch, every id stale")
        future = _concat([np.flatnonzero(counters[lo:hi_c] > hdr.generation) + lo
                          for lo, hi_c in _clip(c_ranges, nb)])
        report.add_each(future, lambda i: f"block {i}: change counter {int(counters[i])} is newer than "
                                          f"generation {hdr.generation} (a lost header commit: repair moves "
                                          f"the generation past it)")
        if repair and reused:
            _new_epoch(fio, hdr, len(counters))     # the data mapped there is dropped above: zeros are safe
        elif repair:
            if cleared:
                # their content changed: report them, in the generation open after the repair
                counters[cleared] = max(hdr.generation, int(counters[future].max()) + 1 if len(future) else 0)
                _write_all(fio, counters, hdr.counter_offset)
            if len(future):
                _past_lost_commits(fio, hdr, log, counters, c_ranges, int(counters[future].max()))

    if repair:
        if cleared:
            table[cleared] = 0
            table_dirty = True
        if table_dirty:
            _write_all(fio, table, hdr.table_offset)
        new_refs = lazy_zeros(hdr.refcount_capacity, np.uint16)
        for a, b in _spans(size, chunks):     # only the nonzero counts: zeros would page in the array
            counts = np.minimum(refs(a, b), L.MAX_REFCOUNT)
            nz = np.flatnonzero(counts)
            new_refs[nz + a] = counts[nz]
        for lo_b, hi_b in meta_ranges:
            new_refs[lo_b:hi_b] = 1
        # order: the cleared table durable before the refcounts drop
        fio.fsync()
        # and no header slot naming what they free (a dropped table, the region of a lost commit's
        # older slot): the repaired header into the other slot too (docs/FORMAT.md, "Write order")
        if older_slot_regions(fio, hdr.sequence % 2) not in (None, hdr.regions()):
            _commit(fio, hdr)
        _write_all(fio, new_refs, hdr.refcount_offset)
        fio.fsync()
        if kept_end * bs < file_size:    # the refcounts durable first: then nothing names the tail
            fio.truncate(kept_end * bs)
            fio.fsync()

    return CheckResult(
        ok=report.count == 0 and leaked == 0 and unreferenced == 0, corruptions=report.items,
        corruption_count=report.count, leaked_blocks=leaked, unreferenced_data_blocks=unreferenced,
        allocated_blocks=sum(int(np.count_nonzero(valid[lo:hi_v])) for lo, hi_v in t_runs), total_blocks=nb,
        image_end_offset=file_size)


def _past_lost_commits(fio: FileIO, hdr: L.Header, log: CheckpointLog | None, counters: npt.NDArray[np.uint32],
                       c_ranges: Runs, newest: int) -> None:
    """Counters newer than the header are changes made after commits the
    header lost.  Never lower them (an under-report): move the generation
    past the newest, and make every id of the lost commits stale (drop the
    log's entries from the surviving header's generation on), so that no id
    is re-issued with another meaning.  Past the generation limit, start a
    new tracking epoch instead (every id stale, consumers dropped)."""
    if newest + 1 <= L.MAX_GENERATION:
        if log is not None and log.clear_from(hdr.generation):
            fio.fsync()             # the entries gone before the header moves past them
        hdr.generation = newest + 1
        _commit(fio, hdr)
        return
    _new_epoch(fio, hdr, len(counters))


def _new_epoch(fio: FileIO, hdr: L.Header, n: int) -> None:
    """A new tracking epoch (every id stale, consumers dropped) with n zeroed counters."""
    # the new epoch first (every old id dead), then its counters cleared: a crash
    # in between leaves an epoch that has issued no id yet
    hdr.tracking_uuid = L.new_uuid()
    hdr.generation = 1
    if hdr.has_log:
        hdr.legacy_generation = 1
    hdr.consumer_offset = hdr.consumer_count = hdr.consumer_capacity = 0
    _commit(fio, hdr)
    _write_all(fio, lazy_zeros(n, np.uint32), hdr.counter_offset)
    fio.fsync()


def _commit(fio: FileIO, hdr: L.Header) -> None:
    """Commit hdr: the next sequence into its slot, synced."""
    hdr.sequence += 1
    write_slot(fio, hdr.pack(), hdr.sequence)


_CHUNK_SHIFT = 20          # passes over [0, size) go 1 Mi blocks at a time


def _mapped_twice(table: npt.NDArray[np.uint32], runs: Runs) -> npt.NDArray[np.int64]:
    """Indices of the nonzero entries whose value an earlier entry holds."""
    idx = _concat([np.flatnonzero(table[a:b]) + a for a, b in runs])
    if len(idx) < 2:
        return idx[:0]
    vals = table[idx]
    order = np.argsort(vals, kind="stable")       # equal values keep their index order
    same = vals[order[1:]] == vals[order[:-1]]
    return np.sort(idx[order[1:][same]])


def _mark_frozen_changed(fio: FileIO, hdr: L.Header, rec: SnapshotRecord, n: int, entries: Indices,
                         file_size: int) -> None:
    """Repair cleared entries of a snapshot: its content changed there (now
    zeros), so its frozen counters say so."""
    if hdr.tracking and len(entries):
        f_counters = _load_array(fio, rec.counter_offset, max(n, 1), np.uint32, file_size)
        f_counters[entries] = rec.generation
        _write_all(fio, f_counters, rec.counter_offset)


def _renumber_sequence(fio: FileIO, hdr: L.Header, slot: int) -> None:
    """Start the header's sequence again low, atomically: the same header
    with a small sequence into the other slot first, then (once that is
    durable) with the next one into its own slot.  A crash in between
    leaves the old slot winning (or, torn, the new low copy): the same
    header either way.  hdr.sequence becomes the new value."""
    other = 1 - slot
    low = 2 if other == 0 else 1                # a sequence belongs in slot sequence % 2
    fio.pwrite(dataclasses.replace(hdr, sequence=low).pack(), L.SLOT_OFFSETS[other])
    fio.fsync()
    hdr.sequence = low + 1
    fio.pwrite(hdr.pack(), L.SLOT_OFFSETS[slot])
    fio.fsync()


def _drop_snapshot_records(fio: FileIO, hdr: L.Header, kept: Sequence[SnapshotRecord]) -> None:
    """Leave only the intact records (kept, in table order) in the snapshot
    table, then commit the header with their count.  In place, one record
    at a time, each synced: position j takes the j-th kept record, which
    lies at j or later, so at any crash every kept record is at its new
    place or its old one (a record at both is a duplicate, which the next
    check drops as such); the commit names only the first len(kept).  The
    records' own table and counter regions do not move."""
    base = hdr.snapshot_offset
    raw = fio.pread(hdr.snapshot_count * L.SNAPSHOT_ENTRY_SIZE, base)
    for j, rec in enumerate(kept):
        packed = rec.pack()
        at = base + j * L.SNAPSHOT_ENTRY_SIZE
        if raw[j * L.SNAPSHOT_ENTRY_SIZE:(j + 1) * L.SNAPSHOT_ENTRY_SIZE] != packed:
            fio.pwrite(packed, at)
            fio.fsync()
    hdr.snapshot_count = len(kept)
    if not kept:
        hdr.snapshot_offset = hdr.snapshot_capacity = 0      # the region becomes a leak: reclaimed below
    _commit(fio, hdr)


def _consumer_damage(fio: FileIO, hdr: L.Header) -> str | None:
    """What is wrong with the consumer table, or None."""
    if not hdr.consumer_count:
        return None
    raw = fio.pread(hdr.consumer_count * L.CONSUMER_ENTRY_SIZE, hdr.consumer_offset)
    if len(raw) < hdr.consumer_count * L.CONSUMER_ENTRY_SIZE:
        return "consumer table truncated"
    try:
        consumer_table.parse_table(raw, hdr.consumer_count, hdr)
    except CorruptImageError as exc:
        return str(exc)
    return None


def _chunks_holding(n: int, tables: Sequence[npt.NDArray[np.uint32]], table_runs: Sequence[Runs],
                    block_ranges: Iterable[tuple[int, int]]) -> list[int]:
    """The chunks of [0, n) (numbers, sorted) that hold a block some table
    entry points to, or a block of block_ranges ((lo, hi) pairs)."""
    found: set[int] = set()
    for table, runs in zip(tables, table_runs):
        for a, b in runs:
            part = table[a:b]
            found.update(np.unique(part[np.flatnonzero(part)] >> _CHUNK_SHIFT).tolist())
    for lo, hi in block_ranges:
        hi = min(hi, n)
        if lo < hi:
            found.update(range(lo >> _CHUNK_SHIFT, ((hi - 1) >> _CHUNK_SHIFT) + 1))
    return sorted(c for c in found if c << _CHUNK_SHIFT < n)


def _spans(n: int, chunks: Iterable[int]) -> list[tuple[int, int]]:
    return [(c << _CHUNK_SHIFT, min(n, (c + 1) << _CHUNK_SHIFT)) for c in chunks]


def _chunked(n: int, chunks: Iterable[int], find: Callable[[int, int], Indices]) -> npt.NDArray[np.int64]:
    """find(a, b) -> indices relative to a, over the given chunks of [0, n); absolute indices."""
    return _concat([find(a, b) + a for a, b in _spans(n, chunks)])


def _clip(ranges: Iterable[tuple[int, int]], n: int) -> Runs:
    """The loaded entry ranges of an array, cut at n entries."""
    return [(lo, min(hi, n)) for lo, hi in ranges if lo < n]


def _concat(parts: Sequence[Indices]) -> npt.NDArray[np.int64]:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _out_of_area(table: npt.NDArray[np.uint32], runs: Runs, lo: int, hi: int) -> npt.NDArray[np.int64]:
    """Indices of the nonzero entries outside [lo, hi), scanning only runs."""
    out: list[Indices] = []
    for start, stop in runs:
        part = table[start:stop]
        out.append(np.flatnonzero((part != 0) & ((part < lo) | (part >= hi))) + start)
    return _concat(out)


def _count_refs(table: npt.NDArray[np.uint32], runs: Runs, refs: npt.NDArray[np.uint32]) -> None:
    """Add each nonzero entry of table's runs to refs[entry]."""
    for a, b in runs:
        _fast.count_refs(table[a:b], b - a, refs)


def _max_of(table: npt.NDArray[np.uint32], runs: Runs) -> int:
    return max([int(table[a:b].max(initial=0)) for a, b in runs], default=0)


def _write_all(fio: FileIO, arr: npt.NDArray[Any], base: int) -> None:
    """Make the on-disk region equal arr: its nonzero pages, and zeros over
    any page the file holds data for where arr is zero."""
    raw = arr.view(np.uint8)
    page = 4096
    npages = -(-raw.nbytes // page)
    full = raw[:raw.nbytes // page * page].reshape(-1, page)
    pages = set(np.flatnonzero(full.any(axis=1)).tolist())
    if raw.nbytes % page and raw[len(full) * page:].any():
        pages.add(len(full))
    for off, length in fio.data_extents(base, base + raw.nbytes):
        pages.update(range((off - base) // page, min(npages, -(-(off + length - base) // page))))
    for start, stop in page_runs(sorted(pages)):
        fio.pwrite(raw[start * page:stop * page], base + start * page)


__all__ = ["check", "CheckResult", "CorruptImageError"]
