"""Changed-block tracking (after VMware's US patent 8443166).

The contract
------------
* ``changes_since(id)`` never under-reports: every block whose content may
  differ from its content at the id's point is in the answer, after clean
  closes, crashes and power loss alike.  Without a crash it is exact, up to
  whole blocks.
* The write path only sets bits: a fine dirty byte per block and a dirty
  flag per 64-block group.  An overwrite in place of durably mapped data
  also needs its coarse region's bit durable (written and synced) before
  the data write is issued: the write-ahead rule (written once, in
  ``HotPath.write_ahead``, vdisk/_hotpath.pyx; ``arm`` makes the bit durable).
  Writes that remap a block (allocation, copy-on-write, unmap) need no
  bit: the flush makes the folded counters durable before the block table
  that exposes them; nor do in-place writes into such a block before that
  flush (a *fresh* block: its mapping is not durable yet).
* Arming costs one sync per region per interval, at most ``arm_budget``
  of them: past that, every region is armed in one sync (a crash in that
  interval then reports the whole disk: more, never less).
* A fold (at flush, checkpoint, close, and every ``fold_interval`` writes)
  turns dirty bits into per-block counters holding the current generation,
  writes the counter pages, and, once the caller has synced them, clears
  the coarse bits of the regions that were idle during the interval.
* After a crash, every block of every region whose coarse bit is set counts
  as changed in the current generation: the over-report is bounded by the
  regions written since the last fold, and no tracking state is reset.

Change ids are ``"<tracking-uuid>/<generation>.<token>"``: the state at the
end of that generation, ``token`` the 16 hex digits of the random 64-bit
token the image drew when it closed the generation and kept in its
checkpoint log (docs/FORMAT.md, "Checkpoint log").  An image answers an id
only if the log still holds that token for that generation: two copies of
an image that diverged, or a file put back from an older copy, drew other
tokens for the same generation, so neither answers the other's ids.  Legacy
ids ``"<tracking-uuid>/<generation>"`` (issued before the image had a log)
stay valid below the header's ``legacy_generation``.  An id from another
image or tracking epoch, a generation not yet closed, a token the log does
not hold, or a malformed string raises StaleChangeIdError.  The value type
(ChangeId, the ANY sentinel) is vdisk/changeid.py's: resolve takes an id
parsed once where it entered, or a string it parses.
"""
from __future__ import annotations

import secrets
import typing

import numpy as np
import numpy.typing as npt

from . import _fast
from . import layout as L
from .changeid import ANY as ANY, ChangeId as ChangeId, format_change_id as format_change_id  # re-exported,
from .changeid import parse_change_id as parse_change_id                                      # as before
from .changeid import _check_epoch, issued_id
from .errors import StaleChangeIdError
from .extents import Extents
from .arrays import distinct, lazy_zeros, page_runs as _page_runs
from .layout import SECTOR, SUMMARY_SHIFT, regions_for

if typing.TYPE_CHECKING:
    from .fileio import FileIO

_S = typing.TypeVar("_S", bound=np.generic)
#: (starts, lengths) of block runs, as the kernels return them
BlockRuns = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]

PAGE = 4096
DEFAULT_ARM_BUDGET = 16     # write-ahead syncs per interval before arming every region at once
COUNTERS_PER_PAGE = PAGE // 4


def new_token() -> int:
    """A random nonzero 64-bit checkpoint token."""
    while True:
        t = secrets.randbits(64)
        if t:
            return t


class CheckpointLog:
    """The ring of (generation, token) the image keeps for the generations it
    closed (docs/FORMAT.md, "Checkpoint log").  Entry g mod capacity holds
    generation g's token once it is closed; an entry whose generation does
    not fit its slot is ignored (reads as no entry)."""

    def __init__(self, io: FileIO, offset: int, capacity: int):
        """An empty log (a new region: all holes)."""
        self.io = io
        self.offset = offset
        self.capacity = capacity
        self.entries = np.zeros((capacity, 2), dtype="<u8")     # (generation, token) per slot

    @classmethod
    def load(cls, io: FileIO, hdr: L.Header) -> "CheckpointLog | None":
        if not hdr.has_log:
            return None
        n = hdr.log_capacity * L.LOG_ENTRY_SIZE
        # only the parts the file holds: a fresh log is one hole
        entries = cls(io, hdr.log_offset, hdr.log_capacity)
        for off, length in io.data_extents(hdr.log_offset, hdr.log_offset + n):
            lo, hi = max(off, hdr.log_offset), min(off + length, hdr.log_offset + n)
            lo -= (lo - hdr.log_offset) % L.LOG_ENTRY_SIZE
            data = io.pread(hi - lo, lo)
            k = (lo - hdr.log_offset) // L.LOG_ENTRY_SIZE
            m = len(data) // L.LOG_ENTRY_SIZE
            entries.entries[k:k + m] = np.frombuffer(data[:m * L.LOG_ENTRY_SIZE], dtype="<u8").reshape(m, 2)
        return entries

    def bad_entries(self) -> np.ndarray:
        """Indices of entries that are neither empty nor in their slot (check reports them)."""
        g, t = self.entries[:, 0], self.entries[:, 1]
        idx = np.arange(self.capacity, dtype=np.uint64)
        empty = (g == 0) & (t == 0)
        ok = (g != 0) & (t != 0) & (g % np.uint64(self.capacity) == idx)
        return np.flatnonzero(~(empty | ok))

    def token(self, generation: int) -> int:
        """Generation's token, or 0 when the log does not hold it."""
        g, t = (int(x) for x in self.entries[generation % self.capacity])
        return t if g == generation else 0

    def write(self, generation: int, token: int) -> None:
        """Record generation's token (the caller syncs before the header commit
        that closes the generation): one sector."""
        i = generation % self.capacity
        self.entries[i] = (generation, token)
        self._write_sectors(i, i + 1)

    def clear_from(self, generation: int) -> bool:
        """Drop every entry of generation >= generation (repair of lost commits);
        True if anything changed (the caller syncs)."""
        hit = np.flatnonzero(self.entries[:, 0] >= np.uint64(generation))
        if not len(hit):
            return False
        self.entries[hit] = 0
        for i in hit.tolist():
            self._write_sectors(i, i + 1)
        return True

    def clear_bad(self) -> None:
        bad = self.bad_entries()
        self.entries[bad] = 0
        for i in bad.tolist():
            self._write_sectors(i, i + 1)

    def _write_sectors(self, i0: int, i1: int) -> None:
        per = SECTOR // L.LOG_ENTRY_SIZE
        s0, s1 = i0 // per, -(-i1 // per)
        raw = self.entries.view(np.uint8).reshape(-1)
        self.io.pwrite(raw[s0 * SECTOR:s1 * SECTOR].tobytes(), self.offset + s0 * SECTOR)

    def change_id(self, hdr: L.Header, generation: int) -> str | None:
        """The id of closed generation `generation` as this image issues it."""
        return issued_id(hdr, generation, self.token(generation))


class Epoch(typing.Protocol):
    """What resolve reads of a header: the epoch, the open generation, the
    first generation that was closed with a token (an L.Header, or an EpochOf)."""
    @property
    def tracking_uuid(self) -> bytes: ...
    @property
    def generation(self) -> int: ...
    @property
    def legacy_generation(self) -> int: ...


class EpochOf(typing.NamedTuple):
    """An Epoch that is no header's (a snapshot's of an earlier epoch)."""
    tracking_uuid: bytes
    generation: int
    legacy_generation: int


def counters_kept(hdr: L.Header) -> int:
    """How many counters an open (and check) loads: up to the end of the page
    holding the last block.  A fold rewrites that page, and the counters past
    the end must survive it (they report the blocks a shrink cut if its
    commit is lost later)."""
    return min(hdr.table_capacity, L.round_up(hdr.nblocks, COUNTERS_PER_PAGE))


def id_of(hdr: L.Header, log: "CheckpointLog | None", generation: int) -> str | None:
    """The id of closed generation `generation` (None if the image cannot name it)."""
    if generation < 1:
        return None
    if log is None:
        return format_change_id(hdr.tracking_uuid, generation)
    return log.change_id(hdr, generation)


def resolve(change_id: str | ChangeId | None, hdr: Epoch, log: "CheckpointLog | None", limit: int | None = None,
            own: tuple[int, int] | None = None) -> int:
    """The generation a change id names, if this image may answer it.

    limit: the exclusive generation bound (default the header's generation);
    own: (generation, token) of a snapshot, whose id is its own record's.
    Raises StaleChangeIdError otherwise: another epoch, an open generation,
    a token the checkpoint log does not hold for that generation (another
    copy's, a lost commit's, or one the ring has overwritten), a tokenless id
    at or past legacy_generation.
    """
    cid = ChangeId.parse(change_id)     # None (any non-id) raises StaleChangeIdError
    change_id = cid.given           # the messages quote it as given
    _check_epoch(cid, hdr.tracking_uuid, hdr.generation if limit is None else limit)
    g = cid.generation
    if own is not None and g == own[0]:
        if cid.token == own[1]:
            return g
        raise StaleChangeIdError(_diverged(change_id, g))
    if log is None:                 # a legacy image: every id is tokenless
        if cid.token:
            raise StaleChangeIdError(f"change id {change_id!r} carries a checkpoint token, but this image "
                                     f"has no checkpoint log (an older copy of the image?): take a full backup")
        return g
    if cid.token == 0:
        if g < hdr.legacy_generation:
            return g
        raise StaleChangeIdError(f"change id {change_id!r} has no checkpoint token, but generation {g} was "
                                 f"closed with one (this image issued legacy ids below generation "
                                 f"{hdr.legacy_generation} only): take a full backup")
    if log.token(g) != cid.token:
        raise StaleChangeIdError(_diverged(change_id, g))
    return g


def _diverged(change_id: str, g: int) -> str:
    return (f"change id {change_id!r}: this image did not issue it (its generation {g} has another checkpoint "
            f"token, or none any more): the id is from a copy of this image that diverged from it, from a "
            f"newer file this one was put back over, from a lost header commit, or older than the "
            f"checkpoint log reaches: take a full backup")


class ChangeTracker:
    """In-memory tracking state of one image and the writes that persist it.

    The owner (Disk) holds the lock and decides when to call fold() and
    clear_coarse(); this class knows where its regions are and what to write.
    """

    def __init__(self, io: FileIO, header: L.Header, counters: npt.NDArray[np.uint32], bitmap: bytes, writable: bool,
                 loaded: list[tuple[int, int]] | None = None):
        """loaded: the (start, stop) ranges of counters read from the file
        (zero elsewhere); None means all of them."""
        self.io = io
        self.hdr = header
        self.writable = writable
        self.rel_shift = header.coarse_shift - header.block_shift   # blocks -> coarse region
        self.counters = counters                      # uint32[capacity]
        cap = len(counters)
        self.dirty = lazy_zeros(cap, np.uint8)
        ngroups = (cap >> SUMMARY_SHIFT) + 1
        self.dirty_groups = lazy_zeros(ngroups, np.uint8)
        self.summary = lazy_zeros(ngroups, np.uint32)
        self.sole = lazy_zeros(ngroups, np.uint8)       # 1 + index of a group's only nonzero counter
        for lo, hi in ([(0, header.nblocks)] if loaded is None else loaded):
            lo, hi = lo >> SUMMARY_SHIFT << SUMMARY_SHIFT, min(hi, header.nblocks)
            if hi > lo:     # only what was read: the rest is zero, its pages untouched
                _fast.build_summary(self.counters[lo:hi], self.summary[lo >> SUMMARY_SHIFT:],
                                    self.sole[lo >> SUMMARY_SHIFT:], SUMMARY_SHIFT,
                                    hi - lo)
        self.bitmap = bytearray(bitmap.ljust(header.bitmap_length, b"\0"))
        self._coarse = np.zeros(regions_for(cap, self.rel_shift) + 1, dtype=np.uint8)
        self._touched = np.zeros_like(self._coarse)      # regions written during this interval
        self._rebind()
        self.armings = 0                  # write-ahead syncs in this interval
        self.arm_budget = DEFAULT_ARM_BUDGET
        self.recovered_regions = self._recover()


    # --- crash recovery ---------------------------------------------------------
    def _recover(self) -> int:
        """Regions whose coarse bit is set were written since the last fold:
        count all their blocks as changed in the current generation."""
        bits = np.unpackbits(np.frombuffer(bytes(self.bitmap), dtype=np.uint8), bitorder="little")
        nregions = regions_for(self.hdr.nblocks, self.rel_shift)
        set_regions = np.flatnonzero(bits[:nregions])
        bpr = 1 << self.rel_shift
        nb = self.hdr.nblocks
        for r in set_regions.tolist():
            lo, hi = r * bpr, min((r + 1) * bpr, nb)
            self.dirty[lo:hi] = 1
            self.dirty_groups[lo >> SUMMARY_SHIFT:((hi - 1) >> SUMMARY_SHIFT) + 1] = 1
            self._coarse[r] = 1
        # bits past the virtual size carry nothing; the next clear drops them
        if len(bits) > nregions and bits[nregions:].any():
            self._coarse[nregions:len(self._coarse)] = 0
        return len(set_regions)

    @property
    def dirty_regions(self) -> int:
        """Coarse regions whose bit is set on disk (written since the last fold)."""
        return int(self._coarse.sum())

    # --- the write path ---------------------------------------------------------
    def mark(self, b: int) -> None:
        """Block b is about to change through a remap (new block, copy-on-write,
        unmap): the flush makes its counter durable before the mapping."""
        self._dirty_mv[b] = 1
        self._groups_mv[b >> SUMMARY_SHIFT] = 1

    def mark_run(self, b0: int, b1: int) -> None:
        """mark() for blocks [b0, b1) (a run of fresh allocations)."""
        self.dirty[b0:b1] = 1
        self.dirty_groups[b0 >> SUMMARY_SHIFT:((b1 - 1) >> SUMMARY_SHIFT) + 1] = 1

    def mark_blocks(self, blocks: np.ndarray) -> None:
        """mark() for every block of an array of block numbers (revert: the
        blocks whose mapping changes)."""
        self.dirty[blocks] = 1
        self.dirty_groups[blocks >> SUMMARY_SHIFT] = 1

    @property
    def coarse(self) -> np.ndarray:
        """The in-memory coarse bits, one byte per region (the hot path reads them)."""
        return self._coarse

    def arm(self, b: int) -> None:
        """Block b's durable data is about to be overwritten in place and its
        region's coarse bit is not set: make it durable (write-ahead arming).
        The rule itself, which decides this and marks the block, is the hot
        path's write_ahead (vdisk/_hotpath.pyx): the Disk asks it first."""
        r = b >> self.rel_shift
        if not self._coarse_mv[r]:
            self._arm(r)

    def _rebind(self) -> None:
        """Refresh the views mark and the arming check write through (after arrays change)."""
        self._dirty_mv = self.dirty.data            # memoryview(self.dirty)
        self._groups_mv = self.dirty_groups.data
        self._coarse_mv = self._coarse.data

    def _arm(self, r: int) -> None:
        """Make region r's bit durable; past the interval's arming budget, arm
        every region at once (one sync; a crash then reports the whole disk)."""
        if self.armings < self.arm_budget:
            self.armings += 1
            self._persist_regions([r])
        else:
            nregions = regions_for(self.hdr.nblocks, self.rel_shift)
            self._persist_regions(range(nregions))

    def mark_range(self, b0: int, b1: int, dirty: bool = True) -> None:
        """Blocks [b0, b1) are about to change (resize, revert, import): arm
        their regions (durably) and, with dirty, mark the blocks."""
        if b1 <= b0:
            return
        if dirty:
            self.dirty[b0:b1] = 1
            self.dirty_groups[b0 >> SUMMARY_SHIFT:((b1 - 1) >> SUMMARY_SHIFT) + 1] = 1
        r0, r1 = b0 >> self.rel_shift, ((b1 - 1) >> self.rel_shift) + 1
        self._touched[r0:r1] = 1
        todo = np.flatnonzero(self._coarse[r0:r1] == 0) + r0
        if len(todo):
            self._persist_regions(todo)

    def _persist_regions(self, regions: npt.ArrayLike) -> None:
        regions = np.asarray(regions, dtype=np.int64)
        coarse = self._coarse.copy()
        coarse[regions] = 1
        bits = np.packbits(coarse[:len(self.bitmap) * 8], bitorder="little").tobytes()
        self.bitmap[:] = bits.ljust(len(self.bitmap), b"\0")
        lo = (int(regions.min()) >> 3) // SECTOR * SECTOR
        hi = -(-((int(regions.max()) >> 3) + 1) // SECTOR) * SECTOR
        self.io.pwrite(memoryview(self.bitmap)[lo:hi], self.hdr.bitmap_offset + lo)
        self.io.fsync()
        self._coarse[regions] = 1       # only once durable

    # --- folds -----------------------------------------------------------------
    def fold(self, generation: int, nblocks: int | None = None) -> bool:
        """Fold dirty bits into counters = generation and write the counter pages
        (not synced: the caller syncs, then calls clear_idle_regions).
        nblocks: fold this many blocks (a revert folds for the size it commits)."""
        nblocks = self.hdr.nblocks if nblocks is None else nblocks
        ngroups = -(-nblocks >> SUMMARY_SHIFT)
        groups = np.flatnonzero(self.dirty_groups[:ngroups]).astype(np.int64)
        if len(groups) == 0:
            return False
        self._touch_regions_of(groups)
        _fast.fold(self.dirty, self.dirty_groups, self.counters, self.summary, self.sole, groups,
                   generation, SUMMARY_SHIFT, nblocks)
        pages = distinct(groups >> (10 - SUMMARY_SHIFT))   # 1024 counters per 4 KiB page
        self.write_counter_pages(pages)
        return True

    def _touch_regions_of(self, groups: np.ndarray) -> None:
        """Regions written during the interval (derived here, off the write path):
        their coarse bits stay set at this fold."""
        rel = self.rel_shift
        if rel >= SUMMARY_SHIFT:
            self._touched[groups >> (rel - SUMMARY_SHIFT)] = 1
        else:
            first = groups << (SUMMARY_SHIFT - rel)
            for k in range(1 << (SUMMARY_SHIFT - rel)):
                r = first + k
                self._touched[r[r < len(self._touched)]] = 1

    def write_counter_pages(self, pages: npt.ArrayLike) -> None:
        raw = self.counters.view(np.uint8)
        base = self.hdr.counter_offset
        for start, stop in _page_runs(pages):
            self.io.pwrite(raw[start * PAGE:stop * PAGE], base + start * PAGE)

    def clear_idle_regions(self, everything: bool = False, since_fold: bool = False) -> None:
        """After the folded counters are durable: clear the coarse bits of the
        regions not written during the interval (see fold).  Regions that were
        stay set, so a steady workload pays no re-arming fsync; after a crash
        the over-report is bounded by the regions written in the last two
        intervals.  everything=True clears all bits (clean close).

        since_fold: writes may have come after the fold (a flush whose syncs
        ran without the Disk's lock): the regions of blocks dirty now keep
        their bits too, since their counters are not durable yet (an
        in-place write there relied on the bit being set)."""
        if everything:      # a clean close: the counters say it all
            self._touched[:] = 0
        elif since_fold:
            ngroups = -(-self.hdr.nblocks >> SUMMARY_SHIFT)
            dirty = np.flatnonzero(self.dirty_groups[:ngroups]).astype(np.int64)
            if len(dirty):
                self._touch_regions_of(dirty)
        idle = np.flatnonzero(self._coarse[:len(self._touched)] & (self._touched == 0))
        self._touched[:] = 0
        self.armings = 0
        if len(idle) == 0:
            return
        self._coarse[idle] = 0
        bits = np.packbits(self._coarse[:self.hdr.bitmap_length * 8], bitorder="little")
        self.bitmap[:] = bits.tobytes().ljust(len(self.bitmap), b"\0")
        lo = (int(idle[0]) >> 3) // SECTOR * SECTOR
        hi = -(-((int(idle[-1]) >> 3) + 1) // SECTOR) * SECTOR
        self.io.pwrite(memoryview(self.bitmap)[lo:hi], self.hdr.bitmap_offset + lo)

    # --- queries -----------------------------------------------------------------
    def changed_blocks(self, since: int) -> BlockRuns:
        """Block runs (starts, lengths) changed after generation `since`."""
        return _fast.changed_runs(self.counters, self.dirty, self.summary, self.sole, self.dirty_groups,
                                  since, SUMMARY_SHIFT, self.hdr.nblocks)

    def changed_blocks_in(self, since: int, b0: int, b1: int) -> BlockRuns:
        """The runs of changed_blocks(since) that meet blocks [b0, b1), clipped
        to them: the kernel runs on the summary groups of the range only (one
        max-generation per 32 blocks), so the cost follows the range."""
        b1 = min(b1, self.hdr.nblocks)
        if b0 >= b1:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        g0, g1 = b0 >> SUMMARY_SHIFT, -(-b1 >> SUMMARY_SHIFT)
        base = g0 << SUMMARY_SHIFT
        # views of whole groups: `sole` is relative to its group and a group's dirty flag and
        # summary cover its 32 blocks, so the kernel sees the groups exactly as in the whole query
        stop = min(g1 << SUMMARY_SHIFT, self.hdr.nblocks)
        starts, lengths = _fast.changed_runs(self.counters[base:stop], self.dirty[base:stop],
                                             self.summary[g0:g1], self.sole[g0:g1], self.dirty_groups[g0:g1],
                                             since, SUMMARY_SHIFT, stop - base)
        starts = np.asarray(starts, dtype=np.int64) + base
        ends = np.minimum(starts + np.asarray(lengths, dtype=np.int64), b1)
        starts = np.maximum(starts, b0)
        keep = ends > starts
        return starts[keep], (ends - starts)[keep]

    def changes_since(self, since: int) -> Extents:
        starts, lengths = self.changed_blocks(since)
        return Extents.from_block_runs(starts, lengths, self.hdr.block_shift, self.hdr.virtual_size)

    # --- geometry changes ---------------------------------------------------------
    def grow_arrays(self, capacity: int) -> None:
        """Reallocate the per-block arrays for a larger table capacity."""
        def grown(a: npt.NDArray[_S], n: int) -> npt.NDArray[_S]:
            b = lazy_zeros(n, a.dtype)
            b[:len(a)] = a
            return b
        self.counters = grown(self.counters, capacity)
        self.dirty = grown(self.dirty, capacity)
        ngroups = (capacity >> SUMMARY_SHIFT) + 1
        self.dirty_groups = grown(self.dirty_groups, ngroups)
        self.summary = grown(self.summary, ngroups)
        self.sole = grown(self.sole, ngroups)
        self._coarse = grown(self._coarse, regions_for(capacity, self.rel_shift) + 1)
        self._touched = grown(self._touched, len(self._coarse))
        self._rebind()

    def recoarsen(self) -> None:
        """After the header's coarse_shift or bitmap_length changed (all bits clear)."""
        self.rel_shift = self.hdr.coarse_shift - self.hdr.block_shift
        self.bitmap = bytearray(self.hdr.bitmap_length)
        self._coarse = np.zeros(regions_for(len(self.counters), self.rel_shift) + 1, dtype=np.uint8)
        self._touched = np.zeros_like(self._coarse)
        self._rebind()

    def reset(self) -> None:
        """A new tracking epoch: every counter and dirty bit cleared."""
        self.counters = lazy_zeros(len(self.counters), np.uint32)
        self.dirty = lazy_zeros(len(self.dirty), np.uint8)
        self.dirty_groups = lazy_zeros(len(self.dirty_groups), np.uint8)
        self.summary = lazy_zeros(len(self.summary), np.uint32)
        self.sole = lazy_zeros(len(self.sole), np.uint8)
        self._rebind()
