"""The glue between NBD exports and one vdisk image.

An :class:`Image` owns one open Disk and names its exports:

* ``""`` and ``NAME``: the live image (read-write unless the server is
  read-only);
* ``NAME@S`` for each snapshot ``S``: the frozen view, read-only.

Each export offers meta contexts (doc/proto.md, "Metadata querying"):

* ``base:allocation``: unallocated ranges are ``NBD_STATE_HOLE | NBD_STATE_ZERO``,
  allocated ones 0;
* ``qemu:dirty-bitmap:C`` for every named consumer ``C`` of the image: the
  blocks changed since C's last recorded id (every allocated block when
  it has none), on a snapshot export up to the snapshot's point;
* ``qemu:dirty-bitmap:ID`` for any change id the export can answer.  An
  id it cannot answer (stale, foreign, newer than a snapshot) is not
  offered: the client sees the context refused, never a partial answer.

Every answer comes from Disk.map_range / Snapshot.map and Disk.changes_in /
Snapshot.changes_since (the tracking kernels), never from reading data; on
the live disk a query costs what its range's blocks cost.  Change ids are opaque strings.

Reuse (:class:`Window`): a context keeps its last answer, over a window of
WINDOW_FACTOR times the request's range (a snapshot's: the whole view), and
answers the next requests inside it from there.  The window is kept by the
export, under what the context asks (allocation, or changes since one
change id), the last WINDOWS_PER_QUESTION of them, so every connection
asking the same question shares them: a second map of an unchanged disk
(another connection, another backup tool) asks the Disk nothing.  A window that starts where
the last one ended spans WINDOW_GROWTH times more (if the last one held at
most WINDOW_GROW_SEGMENTS segments), so a client mapping a 1 TiB disk with
few changes in 4 GiB requests costs 3 queries (64 GiB, 256 GiB, the rest),
and each window is built and answered by the kernel _fast.Segments.  On the live disk that
is sound only while nothing else changes the Disk: the server owns it
(Image.sole_writer), tells the Image what it wrote (Image.wrote: NBD
writes, trims and zeroings, the byte range rounded out to blocks) and
calls Image.touch() for every other change (every control operation, a
write or flush that failed); a window computed at another version is
computed anew, and a kept window asks the Disk anew about the blocks
written since it was computed, and only those (Window.patch: a map right
after a 4 KiB write asks about one block, not 1 TiB).  A flush changes no
answer (its fold turns dirty bits into counters of the open generation,
changed since every id as before).  A Disk a program passes to the server
may change behind its back: its answers are never reused (each request is
queried, as before).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Union

import numpy as np
import numpy.typing as npt

from .. import _fast, errors
from ..changeid import ANY
from ..disk import Disk
from . import protocol as P

if TYPE_CHECKING:
    from ..extents import Extents
    from ..snapshots import Snapshot

#: byte offsets (numpy uint64)
Offsets = npt.NDArray[np.uint64]
#: runs [offsets, ends) of bytes, sorted and disjoint
Runs = tuple[Offsets, Offsets]
#: a context's question: (offset, length) -> the runs its flag is set on that meet the range
Query = Callable[[int, int], Runs]
#: what an export reads: the live Disk or a Snapshot of it
View = Union[Disk, "Snapshot"]


class Context:
    """One selectable meta context of one export: the runs its flag is set on."""

    __slots__ = ("name", "export", "set_flags", "clear_flags", "_query", "key")

    def __init__(self, name: str, export: "Export", set_flags: int, clear_flags: int, query: Query,
                 key: object):
        self.name = name
        self.export = export
        self.set_flags = set_flags          # the flags of the runs query() returns
        self.clear_flags = clear_flags      # the flags elsewhere
        self._query = query                 # (offset, length) -> (offsets, ends) uint64 arrays
        # what query() answers ("allocated", or ("changed", change id)): the export keeps its
        # last windows under it, shared by every context asking the same (Export.windows)
        self.key = key

    def descriptors(self, offset: int, length: int, limit: int) -> npt.NDArray[np.uint64]:
        """(length, flags) rows from offset, covering at most length bytes and
        at most limit rows; never a zero length (see describe)."""
        offsets, ends = self._query(offset, length)
        return describe(offsets, ends, offset, offset + length, self.set_flags, self.clear_flags, limit)

    def window(self, start: int, stop: int) -> "Window":
        """A Window answering [start, stop) (its chunk() is the reply): one the
        export keeps, or a new one, kept.  On an export whose answers can be
        reused (Export.reusable), one query answers the requests of the next
        WINDOW_FACTOR times the range, as long as the image's version stays."""
        export = self.export
        image = export.image
        version = image.version
        kept = export.windows.get(self.key, ())
        for w in kept:
            if w.answers(start, stop, version):
                if export.live and w.seen < len(image.written):     # the server wrote since: ask those blocks
                    w.patch(image.written[w.seen:], self._query)
                    w.seen = len(image.written)
                return w
        w = self._compute(start, stop - start, version, kept[-1] if kept else None)
        w.seen = len(image.written)
        export.keep_window(self.key, w)
        return w

    def _compute(self, offset: int, length: int, version: int, last: "Window | None") -> "Window":
        """A new window from offset (last: the one it replaces, whose end a walk starts from)."""
        export = self.export
        if not export.live:                     # a snapshot's whole answer (cached by the export)
            offsets, ends = self._query(0, export.size)
            return Window(offsets, ends, 0, export.size, self.set_flags, self.clear_flags, version)
        stop = offset + length
        if export.reusable:
            span = max(WINDOW_FACTOR * length, WINDOW_MIN)
            w = last
            if w is not None and w.stop == offset and len(w.segments) <= WINDOW_GROW_SEGMENTS:
                span = max(span, WINDOW_GROWTH * (w.stop - w.start))    # a walk: fewer, larger windows
            stop = min(export.size, offset + span)
        offsets, ends = self._query(offset, stop - offset)
        return Window(offsets, ends, offset, stop, self.set_flags, self.clear_flags,
                      version if export.reusable else None)


WINDOW_FACTOR = 16          # a live context's query covers this many times the request's range ...
WINDOW_MIN = 1 << 30        # ... and at least this much (both clipped to the export's size);
WINDOW_GROWTH = 4           # a query starting where the last window ended covers 4 times its span,
WINDOW_GROW_SEGMENTS = 1 << 14      # if that window had at most this many segments (its memory: 12 bytes each)
WINDOWS_KEPT = 16           # questions an export keeps windows for (more: it forgets them all) ...
WINDOWS_PER_QUESTION = 4    # ... and windows per question
CONTEXTS_KEPT = 64          # context names an export remembers its answer for (more: it forgets them all)


class Window:
    """The block status of one context over [start, stop), as segments:
    boundaries ``bounds`` (strictly increasing, from start to stop) and the
    flags of each segment between two of them, touching runs merged (built
    and read by the kernel _fast.Segments).  A
    request inside the window is answered by two binary searches and its
    descriptors written straight into the reply's bytes, so a client walking
    a disk costs one query per window, not one per request."""

    __slots__ = ("start", "stop", "version", "seen", "inside", "outside", "segments")

    def __init__(self, offsets: Offsets, ends: Offsets, start: int, stop: int, inside: int, outside: int,
                 version: int | None):
        self.start, self.stop = start, stop
        self.version = version              # the image's version it was computed at (None: never reused)
        self.seen = 0                       # how many of Image.written it reflects (the live disk's)
        self.inside, self.outside = inside, outside
        self.segments = self._segments(offsets, ends)

    def _segments(self, offsets: Offsets, ends: Offsets) -> _fast.Segments:
        return _fast.Segments(np.ascontiguousarray(offsets, dtype=np.uint64),
                              np.ascontiguousarray(ends, dtype=np.uint64), self.start, self.stop,
                              self.inside, self.outside)

    def answers(self, start: int, stop: int, version: int) -> bool:
        return self.version == version and self.start <= start and stop <= self.stop

    def patch(self, written: list[tuple[int, int]], query: Query) -> None:
        """Bring the window up to date after the server wrote the byte ranges
        written (Image.wrote): each range that meets the window is asked anew
        (query: the context's question, on those blocks only) and its answer
        replaces the window's there; the rest of the window stands, since
        nothing else changed the Disk (Image.touch() otherwise).  Past
        PATCH_RANGES ranges, the span covering them is asked once."""
        ranges = _merged([(max(a, self.start), min(b, self.stop)) for a, b in written
                          if a < self.stop and b > self.start])
        if not ranges:
            return
        if len(ranges) > PATCH_RANGES:
            ranges = [(ranges[0][0], ranges[-1][1])]
        seg = self.segments
        first = 0 if seg.flags[0] == self.inside else 1     # segments alternate: neighbours never equal
        offs, ends = seg.bounds[first:-1:2], seg.bounds[first + 1::2]   # the runs with `inside` (views)
        for a, b in ranges:
            new_o, new_e = query(a, b - a)
            new_o = np.maximum(np.asarray(new_o, dtype=np.uint64), np.uint64(a))
            new_e = np.minimum(np.asarray(new_e, dtype=np.uint64), np.uint64(b))
            keep = new_e > new_o
            # the old runs' pieces outside [a, b): those starting before a, those ending after b
            lo, hi = int(np.searchsorted(offs, a, "left")), int(np.searchsorted(ends, b, "right"))
            offs = np.concatenate([offs[:lo], new_o[keep], np.maximum(offs[hi:], np.uint64(b))])
            ends = np.concatenate([np.minimum(ends[:lo], np.uint64(a)), new_e[keep], ends[hi:]])
        self.segments = self._segments(offs, ends)

    def payload(self, start: int, stop: int, limit: int) -> bytes:
        """Descriptors of [start, stop) (inside the window, start < stop): the
        segments it meets, the first and last clipped to it, at most limit."""
        return self.segments.wire(start, stop, limit)

    def chunk(self, start: int, stop: int, limit: int, cookie: int, context_id: int, done: bool) -> bytes:
        """payload() as a whole NBD_REPLY_TYPE_BLOCK_STATUS chunk: header, context id, descriptors."""
        return self.segments.chunk(start, stop, limit, P.NBD_STRUCTURED_REPLY_MAGIC,
                                   P.NBD_REPLY_FLAG_DONE if done else 0, P.NBD_REPLY_TYPE_BLOCK_STATUS,
                                   cookie, context_id)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping or touching ranges joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


PATCH_RANGES = 8            # a window patched for more ranges than this asks the span covering them once
WRITES_KEPT = 4096          # writes Image.written holds; one more: every answer is computed anew (touch)


def describe(offsets: Offsets, ends: Offsets, start: int, stop: int, inside: int, outside: int,
             limit: int) -> npt.NDArray[np.uint64]:
    """Descriptors of [start, stop) given sorted, disjoint runs [offsets, ends):
    an (n, 2) uint64 array of (length, flags), touching runs merged, at most
    limit rows, never a zero length.  Vectorized: a reply may hold 65536."""
    lo = int(np.searchsorted(ends, start, side="right"))
    hi = int(np.searchsorted(offsets, stop, side="left"))
    if hi - lo > limit:                             # more runs than descriptors: stop at a run's end
        hi = lo + limit
        stop = min(stop, int(ends[hi - 1]))
    o = np.maximum(offsets[lo:hi], np.uint64(start))
    e = np.minimum(ends[lo:hi], np.uint64(stop))
    keep = e > o
    o, e = o[keep], e[keep]
    if len(o) > 1:                                  # touching runs: one
        new = np.empty(len(o), dtype=bool)
        new[0] = True
        new[1:] = o[1:] > e[:-1]
        first = np.flatnonzero(new)
        last = np.append(first[1:] - 1, len(o) - 1)
        o, e = o[first], e[last]
    k = len(o)
    lengths = np.empty(2 * k + 1, dtype=np.uint64)
    flags = np.empty(2 * k + 1, dtype=np.uint64)
    prev = np.empty(k, dtype=np.uint64)
    if k:
        prev[0] = start
        prev[1:] = e[:-1]
        lengths[0:2 * k:2] = o - prev
        lengths[1:2 * k:2] = e - o
        lengths[2 * k] = stop - int(e[-1])
    else:
        lengths[0] = stop - start
    flags[0::2] = outside
    flags[1::2] = inside
    nz = lengths > 0
    out = np.stack([lengths[nz], flags[nz]], axis=1)
    return out[:limit]


def _arrays(extents: Extents) -> Runs:
    offs = extents.offsets
    return offs, offs + extents.lengths


class Export:
    """One export: a name, a view (the Disk or a Snapshot), and whether it is writable."""

    def __init__(self, image: "Image", name: str, view: View, read_only: bool, snapshot: str | None = None):
        self.image = image
        self.name = name
        self.view = view
        self.read_only = read_only
        self.snapshot = snapshot
        self._cache: dict[object, Runs] = {}     # a snapshot's answers, by question
        self._contexts: dict[str, tuple[int, Context | None]] = {}    # name -> (image version, context)
        # the last windows of each question (Context.key), oldest first
        self.windows: dict[object, list[Window]] = {}

    def keep_window(self, key: object, window: "Window") -> None:
        """Keep window among the answers to key's question: the last
        WINDOWS_PER_QUESTION of the image's version (a walk of a 1 TiB disk
        makes 3), for at most WINDOWS_KEPT questions."""
        windows = self.windows
        if key not in windows and len(windows) >= WINDOWS_KEPT:
            windows.clear()
        kept = [w for w in windows.get(key, ()) if w.version == window.version][-(WINDOWS_PER_QUESTION - 1):]
        windows[key] = kept + [window]

    @property
    def reusable(self) -> bool:
        """Whether an answer may be reused while image.version stays: a snapshot's
        never change; the live disk's only change through the server when it
        owns the Disk (Image.sole_writer)."""
        return not self.live or self.image.sole_writer

    @property
    def size(self) -> int:
        return self.view.size

    @property
    def live(self) -> bool:
        return self.snapshot is None

    @property
    def description(self) -> str | None:
        """NBD_INFO_DESCRIPTION: a snapshot export's change id (what a pull backup records)."""
        return None if self.live else self.view.change_id

    def transmission_flags(self) -> int:
        f = (P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_DF
             | P.NBD_FLAG_SEND_CACHE | P.NBD_FLAG_CAN_MULTI_CONN)
        # CAN_MULTI_CONN: every connection writes through the one Disk, whose flush makes every
        # write acknowledged before it durable, whichever connection wrote it
        if self.read_only:
            f |= P.NBD_FLAG_READ_ONLY
        else:
            f |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO
        return f

    # --- answers (a snapshot's never change: cached; the live disk's are asked each time,
    #     since a program serving its own Disk may write to it behind the server's back)
    def _cached(self, key: object, compute: Callable[[], Runs]) -> Runs:
        if self.live:
            return compute()
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 64:
                self._cache.clear()
            hit = self._cache[key] = compute()
        return hit

    def allocated(self, offset: int, length: int) -> Runs:
        """Runs [offsets, ends) of allocated data that meet [offset, offset + length)."""
        view = self.view
        if isinstance(view, Disk):              # the live export (a snapshot export's view is a Snapshot)
            return _arrays(view.map_range(offset, length))
        return self._cached("map", lambda: _arrays(view.map()))

    def changed(self, change_id: str, offset: int = 0, length: int | None = None) -> Runs:
        """Runs changed after change_id that meet [offset, offset + length) (all of
        them when length is None; raises StaleChangeIdError if the view cannot
        answer).  The live disk answers the range alone (Disk.changes_in: the
        cost follows the range, not the disk); a snapshot's whole answer is cached."""
        view = self.view
        if isinstance(view, Disk):              # the live export
            if length is None:
                return _arrays(view.changes_since(change_id))
            return _arrays(view.changes_in(change_id, offset, length))
        return self._cached(("changes", change_id), lambda: _arrays(view.changes_since(change_id)))

    def answers(self, change_id: str) -> bool:
        """Whether this view can answer change_id (without computing the answer on the live disk)."""
        try:
            if isinstance(self.view, Disk):     # the live export
                self.view.changes_in(change_id, 0, 0)
            else:
                self.changed(change_id)
        except (errors.StaleChangeIdError, errors.UnsupportedFeatureError):
            return False
        return True

    # --- meta contexts --------------------------------------------------------------------
    def _consumer_ids(self) -> dict[str, str]:
        """Consumer name -> the change id its bitmap starts from ('*': everything allocated)."""
        if not self.image.disk.track_changes:
            return {}
        return {info.name: info.change_id or ANY for info in self.image.disk.consumers.values()}

    def _context_for(self, name: str) -> Context | None:
        """The context of that name (None: not offered), reused while the
        image's version stays, as answers are (a handshake asks for each)."""
        if not self.reusable:
            return self._new_context(name)
        version = self.image.version
        hit = self._contexts.get(name)
        if hit is not None and hit[0] == version:
            return hit[1]
        ctx = self._new_context(name)
        if len(self._contexts) >= CONTEXTS_KEPT:
            self._contexts.clear()
        self._contexts[name] = (version, ctx)
        return ctx

    def _new_context(self, name: str) -> Context | None:
        if name == P.BASE_ALLOCATION:
            return Context(name, self, 0, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO, self.allocated, "allocated")
        if not name.startswith(P.QEMU_DIRTY_BITMAP) or not self.image.disk.track_changes:
            return None
        key = name[len(P.QEMU_DIRTY_BITMAP):]
        if not key:
            return None
        cid = self._consumer_ids().get(key, key)
        if not self.answers(cid):           # an id this view cannot answer is not offered
            return None
        return Context(name, self, P.NBD_STATE_DIRTY, 0, lambda off, n: self.changed(cid, off, n),
                       ("changed", cid))

    def list_contexts(self, queries: list[str]) -> list[str]:
        """Names answering NBD_OPT_LIST_META_CONTEXT: an empty list or a leaf-less
        namespace (``base:``, ``qemu:``, ``qemu:dirty-bitmap:``) lists all it covers."""
        bitmaps = [P.QEMU_DIRTY_BITMAP + c for c in self._consumer_ids()]
        bitmaps = [b for b in bitmaps if self._context_for(b) is not None]
        everything = [P.BASE_ALLOCATION] + bitmaps
        if not queries:
            return everything
        out: list[str] = []
        for q in queries:
            if q == "base:":
                names = [P.BASE_ALLOCATION]
            elif q in (P.QEMU_NAMESPACE, P.QEMU_DIRTY_BITMAP):
                names = bitmaps
            else:
                names = [q] if self._context_for(q) is not None else []
            out += [n for n in names if n not in out]
        return out

    def select_contexts(self, queries: list[str]) -> list[Context]:
        """Contexts for NBD_OPT_SET_META_CONTEXT: exact names only; unknown or
        unanswerable ones are left out."""
        out: list[Context] = []
        for q in queries:
            if any(c.name == q for c in out):
                continue
            ctx = self._context_for(q)
            if ctx is not None:
                out.append(ctx)
        return out


class Image:
    """The exports of one open Disk."""

    def __init__(self, disk: Disk, name: str, read_only: bool, sole_writer: bool = False):
        self.disk = disk
        self.name = name
        self.read_only = read_only or not disk.writable()
        # sole_writer: every change to the Disk goes through the server (it opened the Disk
        # itself), which calls wrote() after each write and touch() for any other change;
        # else answers are never reused
        self.sole_writer = sole_writer
        self.version = 0
        # the block-aligned byte ranges the server wrote at this version, in order: a kept
        # window of the live export asks them anew, no more (Window.patch)
        self.written: list[tuple[int, int]] = []
        self._live = Export(self, name, disk, self.read_only)
        self._snapshots: dict[str, Export] = {}

    def touch(self) -> None:
        """The Disk changes (or may have changed): block status answers computed before are stale."""
        self.version += 1
        self.written = []

    def wrote(self, offset: int, length: int) -> None:
        """The server wrote, trimmed or zeroed [offset, offset + length) of the
        live Disk, and nothing else changed: answers computed before stand
        outside the range's blocks (the next request inside a kept window asks
        those blocks anew).  Only the server calls it, as the Disk's sole
        writer; any other change calls touch().  Nothing is kept while the
        live export holds no window (one computed later sees the write) or its
        answers are never reused."""
        if not self.sole_writer or not self._live.windows:
            return
        if len(self.written) >= WRITES_KEPT:
            self.touch()
            return
        bs = self.disk.block_size
        self.written.append((offset - offset % bs, -(-(offset + length) // bs) * bs))

    def names(self) -> list[str]:
        """The export names NBD_OPT_LIST shows: NAME, then NAME@S for each snapshot."""
        return [self.name] + [f"{self.name}@{s.name}" for s in self.disk.snapshots]

    def lookup(self, name: str) -> Export | None:
        if name in ("", self.name):
            return self._live
        prefix = self.name + "@"
        if not name.startswith(prefix):
            return None
        snap = name[len(prefix):]
        export = self._snapshots.get(snap)
        if export is not None and not export.view.closed:
            return export
        if snap not in {s.name for s in self.disk.snapshots}:
            return None
        export = Export(self, name, self.disk.open_snapshot(snap), True, snapshot=snap)
        self._snapshots[snap] = export
        return export

    def close(self) -> None:
        for export in self._snapshots.values():
            export.view.close()
        self._snapshots.clear()
