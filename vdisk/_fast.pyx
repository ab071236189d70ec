# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Data-oriented kernels for vdisk: zero detection, run building, counter
folds and scans, table walks.

Every function takes typed memoryviews and returns arrays or scalars.  The
Python callers check index ranges before calling in (these kernels run with
bounds checking off), and each loop releases the GIL.  Three helpers of the
NBD server sit at the end: Segments (block status replies), empty_bytearray
(read buffers) and spin_until_ready (the spin after replies, polling.py).
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int64_t, uint64_t
from libc.string cimport memcmp
from libc.stdlib cimport calloc, malloc, realloc, free
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.bytearray cimport PyByteArray_FromStringAndSize

cnp.import_array()


# ---------------------------------------------------------------------------
# growable run buffer (start, length) pairs in C memory
cdef struct RunBuf:
    int64_t *starts
    int64_t *lengths
    Py_ssize_t n
    Py_ssize_t cap


cdef int runbuf_push(RunBuf *rb, int64_t start, int64_t length) noexcept nogil:
    cdef Py_ssize_t newcap
    cdef int64_t *s
    cdef int64_t *l
    if rb.n > 0 and rb.starts[rb.n - 1] + rb.lengths[rb.n - 1] == start:
        rb.lengths[rb.n - 1] += length
        return 0
    if rb.n == rb.cap:
        newcap = rb.cap * 2 if rb.cap else 256
        s = <int64_t *> realloc(rb.starts, newcap * sizeof(int64_t))
        if s == NULL:
            return -1
        rb.starts = s
        l = <int64_t *> realloc(rb.lengths, newcap * sizeof(int64_t))
        if l == NULL:
            return -1
        rb.lengths = l
        rb.cap = newcap
    rb.starts[rb.n] = start
    rb.lengths[rb.n] = length
    rb.n += 1
    return 0


cdef inline int run_add(RunBuf *rb, Py_ssize_t *run, Py_ssize_t *run_end, Py_ssize_t i) noexcept nogil:
    """Block i belongs to the answer: extend the pending run [run, run_end)
    or push it and start a new one (run < 0: none pending).  -1 on no memory."""
    if run[0] >= 0 and run_end[0] == i:
        run_end[0] = i + 1
        return 0
    if run[0] >= 0 and runbuf_push(rb, run[0], run_end[0] - run[0]):
        return -1
    run[0] = i
    run_end[0] = i + 1
    return 0


cdef object runbuf_finish(RunBuf *rb, int failed):
    cdef Py_ssize_t i
    cdef cnp.ndarray[int64_t, ndim=1] starts
    cdef cnp.ndarray[int64_t, ndim=1] lengths
    try:
        if failed:
            raise MemoryError("vdisk._fast: out of memory building runs")
        starts = np.empty(rb.n, dtype=np.int64)
        lengths = np.empty(rb.n, dtype=np.int64)
        for i in range(rb.n):
            starts[i] = rb.starts[i]
            lengths[i] = rb.lengths[i]
        return starts, lengths
    finally:
        free(rb.starts)
        free(rb.lengths)
        rb.starts = NULL
        rb.lengths = NULL


# ---------------------------------------------------------------------------
def is_zero(const uint8_t[::1] buf) -> bool:
    """True when every byte of buf is zero."""
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t i, head
    cdef const uint8_t *p
    cdef bint result = True
    if n == 0:
        return True
    p = &buf[0]
    with nogil:
        head = 16 if n >= 16 else n
        for i in range(head):
            if p[i]:
                result = False
                break
        if result and n > 16:
            result = memcmp(p, p + 16, n - 16) == 0
    return result


def zero_blocks(const uint8_t[::1] buf, Py_ssize_t block_size):
    """uint8 array, one entry per block_size chunk of buf: 1 where the chunk is all zeros."""
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t nb = (n + block_size - 1) // block_size if block_size > 0 else 0
    cdef cnp.ndarray[uint8_t, ndim=1] out = np.zeros(nb, dtype=np.uint8)
    cdef uint8_t *o = <uint8_t *> out.data
    cdef const uint8_t *p
    cdef Py_ssize_t b, i, lo, ln
    cdef bint z
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if n == 0:
        return out
    p = &buf[0]
    with nogil:
        for b in range(nb):
            lo = b * block_size
            ln = block_size if lo + block_size <= n else n - lo
            z = True
            for i in range(16 if ln >= 16 else ln):
                if p[lo + i]:
                    z = False
                    break
            if z and ln > 16:
                z = memcmp(p + lo, p + lo + 16, ln - 16) == 0
            o[b] = z
    return out


def nonzero_runs(const uint32_t[::1] a, Py_ssize_t start, Py_ssize_t stop):
    """Runs (starts, lengths) of indices in [start, stop) where a[i] != 0."""
    return runs_above(a, 0, start, stop)


# ---------------------------------------------------------------------------
# change tracking
cdef uint8_t group_sole(const uint32_t *c, Py_ssize_t n) noexcept nogil:
    """1 + the index of the only nonzero of c[:n]; 0 when none or several are."""
    cdef Py_ssize_t i
    cdef uint8_t found = 0
    for i in range(n):
        if c[i]:
            if found:
                return 0
            found = <uint8_t> (i + 1)
    return found


def build_summary(const uint32_t[::1] counters, uint32_t[::1] summary, uint8_t[::1] sole, int group_shift,
                  Py_ssize_t nblocks):
    """For the groups of the first nblocks counters: summary[g] = the group's
    largest counter; sole[g] = 1 + the index in the group of its only nonzero
    counter, or 0 when it has none or several (queries then need not read
    the counters of a group that changed once)."""
    cdef Py_ssize_t ng = (nblocks + (1 << group_shift) - 1) >> group_shift
    cdef Py_ssize_t g, i, lo, hi
    cdef uint32_t m
    if nblocks > counters.shape[0] or ng > summary.shape[0] or ng > sole.shape[0] or group_shift > 7:
        raise IndexError("build_summary: arrays too short")
    with nogil:
        for g in range(ng):
            m = 0
            lo = g << group_shift
            hi = lo + (1 << group_shift)
            if hi > nblocks:
                hi = nblocks
            for i in range(lo, hi):
                if counters[i] > m:
                    m = counters[i]
            summary[g] = m
            sole[g] = group_sole(&counters[lo], hi - lo)
    return None


def fold(uint8_t[::1] dirty, uint8_t[::1] dirty_groups, uint32_t[::1] counters, uint32_t[::1] summary,
         uint8_t[::1] sole, const int64_t[::1] groups, uint32_t generation, int group_shift, Py_ssize_t nblocks):
    """Fold the fine dirty bits of the listed groups into the counters.

    For every block i of those groups with dirty[i] set: counters[i] =
    generation, dirty[i] cleared; the group's summary becomes at least
    generation, its sole entry is recomputed (over the whole group, as far
    as the counters go) and its dirty_groups flag is cleared.  Returns the
    number of blocks folded.
    """
    cdef Py_ssize_t k, g, i, lo, hi, count = 0
    cdef Py_ssize_t ngroups = groups.shape[0]
    cdef Py_ssize_t nsum = summary.shape[0]
    cdef Py_ssize_t ncount = counters.shape[0]
    if nblocks > dirty.shape[0] or nblocks > ncount or group_shift > 7:
        raise IndexError("fold: arrays shorter than nblocks")
    for k in range(ngroups):
        if groups[k] < 0 or groups[k] >= nsum or groups[k] >= dirty_groups.shape[0] or groups[k] >= sole.shape[0]:
            raise IndexError(f"fold: group {groups[k]} out of range")
    with nogil:
        for k in range(ngroups):
            g = groups[k]
            hi = (g + 1) << group_shift
            if hi > nblocks:
                hi = nblocks
            for i in range(g << group_shift, hi):
                if dirty[i]:
                    dirty[i] = 0
                    counters[i] = generation
                    count += 1
            if summary[g] < generation:
                summary[g] = generation
            lo = g << group_shift
            hi = lo + (1 << group_shift)
            if hi > ncount:
                hi = ncount
            sole[g] = group_sole(&counters[lo], hi - lo) if hi > lo else 0
            dirty_groups[g] = 0
    return count


cdef extern from *:
    """
    #define VDISK_PREFETCH(p) __builtin_prefetch((const void *)(p))
    """
    void VDISK_PREFETCH(const void *p) nogil


cdef enum:
    CAND_CHUNK = 4096       # candidate groups collected per pass (bounded stack memory)
    PREFETCH_AHEAD = 32      # groups prefetched ahead of the scan


def changed_runs(const uint32_t[::1] counters, const uint8_t[::1] dirty, const uint32_t[::1] summary,
                 const uint8_t[::1] sole, const uint8_t[::1] dirty_groups, uint32_t since, int group_shift,
                 Py_ssize_t nblocks):
    """Runs (starts, lengths) of blocks i < nblocks with counters[i] > since or dirty[i].

    Two phases per chunk of groups: collect the candidate groups (summary >
    since, or a dirty flag) from the summary alone, then scan only their
    counters, prefetching a few groups ahead so the random accesses
    overlap.  Groups whose summary is <= since and whose dirty_groups flag
    is clear are never touched; nor are the counters of a clean group with
    a sole nonzero counter: that block is the group's change (its counter
    is the summary).
    """
    cdef RunBuf rb
    cdef Py_ssize_t ng = (nblocks + (1 << group_shift) - 1) >> group_shift
    cdef Py_ssize_t g0, g, k, nc, i, lo, hi, run = -1, run_end = -1
    cdef int failed = 0
    cdef Py_ssize_t cand[CAND_CHUNK]
    cdef bint any_dirty
    rb.starts = NULL; rb.lengths = NULL; rb.n = 0; rb.cap = 0
    if nblocks > counters.shape[0] or nblocks > dirty.shape[0] or ng > summary.shape[0] \
            or ng > dirty_groups.shape[0] or ng > sole.shape[0]:
        raise IndexError("changed_runs: arrays too short")
    with nogil:
        g0 = 0
        while g0 < ng and not failed:
            nc = 0
            g = g0
            while g < ng and nc < CAND_CHUNK:
                if summary[g] > since or dirty_groups[g]:
                    cand[nc] = g
                    nc += 1
                g += 1
            g0 = g
            for k in range(nc):
                if k + PREFETCH_AHEAD < nc and (sole[cand[k + PREFETCH_AHEAD]] == 0
                                                 or dirty_groups[cand[k + PREFETCH_AHEAD]]):
                    VDISK_PREFETCH(&counters[cand[k + PREFETCH_AHEAD] << group_shift])
                    VDISK_PREFETCH(&counters[(cand[k + PREFETCH_AHEAD] << group_shift) + 16])
                g = cand[k]
                lo = g << group_shift
                hi = lo + (1 << group_shift)
                if hi > nblocks:
                    hi = nblocks
                any_dirty = dirty_groups[g] != 0
                if not any_dirty and sole[g]:
                    i = lo + sole[g] - 1    # the group's only changed block; its counter is summary[g] > since
                    if i < hi and run_add(&rb, &run, &run_end, i):
                        failed = 1
                        break
                    continue
                for i in range(lo, hi):
                    if (counters[i] > since or (any_dirty and dirty[i])) and run_add(&rb, &run, &run_end, i):
                        failed = 1
                        break
                if failed:
                    break
        if not failed and run >= 0:
            failed = runbuf_push(&rb, run, run_end - run)
    return runbuf_finish(&rb, failed)


# ---------------------------------------------------------------------------
# table walks
def check_table(const uint32_t[::1] table, Py_ssize_t n, uint64_t lo, uint64_t hi) -> int:
    """Index of the first entry of table[:n] that is nonzero and outside [lo, hi), or -1."""
    cdef Py_ssize_t i, bad = -1
    cdef uint32_t v
    if n > table.shape[0]:
        raise IndexError("check_table: n beyond the table")
    with nogil:
        for i in range(n):
            v = table[i]
            if v != 0 and (v < lo or v >= hi):
                bad = i
                break
    return bad


def count_refs(const uint32_t[::1] table, Py_ssize_t n, uint32_t[::1] refs) -> int:
    """refs[table[i]] += 1 for every nonzero entry of table[:n]; returns the number counted.

    Entries >= len(refs) raise IndexError (validate with check_table first).
    """
    cdef Py_ssize_t i, count = 0, bad = -1
    cdef uint32_t v
    cdef Py_ssize_t nrefs = refs.shape[0]
    if n > table.shape[0]:
        raise IndexError("count_refs: n beyond the table")
    with nogil:
        for i in range(n):
            v = table[i]
            if v:
                if v >= nrefs:
                    bad = i
                    break
                refs[v] += 1
                count += 1
    if bad >= 0:
        raise IndexError(f"count_refs: entry {bad} points past the refcount array")
    return count


def count_refs_within(const uint32_t[::1] table, Py_ssize_t n, uint64_t lo, uint64_t hi,
                      const int64_t[::1] meta_starts, const int64_t[::1] meta_stops,
                      const uint8_t[::1] meta_cells, int cell_shift,
                      uint16_t[::1] counts, const uint16_t[::1] refcounts):
    """One walk over table[:n] that checks and counts every nonzero entry v:
    v must lie in [lo, hi) and outside the ranges [meta_starts[k],
    meta_stops[k]) (sorted, disjoint), and counts[v] += 1 must not exceed
    refcounts[v] (so counts never overflows).  meta_cells[v >> cell_shift]
    is nonzero where a range may hold v: only there is a range searched
    (binary search).

    Returns (index, problem) for the first entry that fails, problem 1:
    outside [lo, hi), 2: inside a range, 3: more references than
    refcounts[v]; (-1, 0) when every entry passes.  hi may not exceed
    len(counts) nor len(refcounts), nor (hi - 1) >> cell_shift the cells.
    """
    cdef Py_ssize_t i, a, b, mid, bad = -1
    cdef int problem = 0
    cdef Py_ssize_t m = meta_starts.shape[0]
    cdef uint32_t v
    if n > table.shape[0]:
        raise IndexError("count_refs_within: n beyond the table")
    if hi > <uint64_t> counts.shape[0] or hi > <uint64_t> refcounts.shape[0]:
        raise IndexError("count_refs_within: hi beyond counts or refcounts")
    if meta_stops.shape[0] != m:
        raise ValueError("count_refs_within: meta_starts and meta_stops differ in length")
    if not 0 <= cell_shift < 64:
        raise ValueError("count_refs_within: cell_shift outside 0..63")
    if hi and ((hi - 1) >> cell_shift) >= <uint64_t> meta_cells.shape[0]:
        raise IndexError("count_refs_within: hi beyond the meta cells")
    with nogil:
        for i in range(n):
            v = table[i]
            if v == 0:
                continue
            if v < lo or v >= hi:
                problem = 1
            elif m and meta_cells[v >> cell_shift]:
                a = 0                   # the last range starting at or before v
                b = m
                while b - a > 1:
                    mid = (a + b) >> 1
                    if meta_starts[mid] <= v:
                        a = mid
                    else:
                        b = mid
                if meta_starts[a] <= v < meta_stops[a]:
                    problem = 2
            if problem == 0 and counts[v] >= refcounts[v]:
                problem = 3
            if problem:
                bad = i
                break
            counts[v] += 1
    return bad, problem


def find_duplicate(const uint32_t[::1] table, Py_ssize_t n, uint64_t nphys) -> int:
    """Index of the first entry of table[:n] whose nonzero value appeared
    earlier, or -1.  Values must be < nphys (validate with check_table)."""
    cdef uint8_t *seen = <uint8_t *> calloc((nphys >> 3) + 1, 1)
    cdef Py_ssize_t i, dup = -1
    cdef uint32_t v
    if seen == NULL:
        raise MemoryError("find_duplicate: out of memory")
    if n > table.shape[0]:
        free(seen)
        raise IndexError("find_duplicate: n beyond the table")
    with nogil:
        for i in range(n):
            v = table[i]
            if v == 0:
                continue
            if v >= nphys:
                dup = -2
                break
            if seen[v >> 3] & (1 << (v & 7)):
                dup = i
                break
            seen[v >> 3] |= 1 << (v & 7)
    free(seen)
    if dup == -2:
        raise IndexError("find_duplicate: entry beyond nphys")
    return dup


def runs_above(const uint32_t[::1] a, uint32_t threshold, Py_ssize_t start, Py_ssize_t stop):
    """Runs (starts, lengths) of indices in [start, stop) where a[i] > threshold."""
    cdef RunBuf rb
    cdef Py_ssize_t i, run = -1
    cdef int failed = 0
    rb.starts = NULL; rb.lengths = NULL; rb.n = 0; rb.cap = 0
    if not 0 <= start <= stop <= a.shape[0]:
        raise IndexError(f"range [{start}, {stop}) outside 0..{a.shape[0]}")
    with nogil:
        for i in range(start, stop):
            if a[i] > threshold:
                if run < 0:
                    run = i
            elif run >= 0:
                if runbuf_push(&rb, run, i - run):
                    failed = 1
                    break
                run = -1
        if not failed and run >= 0:
            failed = runbuf_push(&rb, run, stop - run)
    return runbuf_finish(&rb, failed)


def nonzero_values(const uint32_t[::1] a, Py_ssize_t n):
    """The nonzero entries of a[:n], in order (no n-sized temporary)."""
    cdef Py_ssize_t i, k = 0, count = 0
    cdef cnp.ndarray[uint32_t, ndim=1] out
    cdef uint32_t *o
    if not 0 <= n <= a.shape[0]:
        raise IndexError("nonzero_values: n beyond the array")
    with nogil:
        for i in range(n):
            if a[i]:
                count += 1
    out = np.empty(count, dtype=np.uint32)
    o = <uint32_t *> out.data
    with nogil:
        for i in range(n):
            if a[i]:
                o[k] = a[i]
                k += 1
    return out


# ---------------------------------------------------------------------------
def first_difference(const uint8_t[::1] a, const uint8_t[::1] b) -> int:
    """Index of the first byte where a and b differ (over the shorter of the two), or -1."""
    cdef Py_ssize_t n = a.shape[0] if a.shape[0] < b.shape[0] else b.shape[0]
    cdef Py_ssize_t lo = 0, step, i
    cdef Py_ssize_t result = -1
    cdef const uint8_t *pa
    cdef const uint8_t *pb
    if n == 0:
        return -1
    pa = &a[0]
    pb = &b[0]
    with nogil:
        while lo < n:
            step = 65536 if n - lo > 65536 else n - lo
            if memcmp(pa + lo, pb + lo, step) != 0:
                for i in range(lo, lo + step):
                    if pa[i] != pb[i]:
                        result = i
                        break
                break
            lo += step
    return result


# ---------------------------------------------------------------------------
# NBD block status (vdisk/nbd/exports.py, Window)
def segments(const uint64_t[::1] offsets, const uint64_t[::1] ends, uint64_t start, uint64_t stop,
             uint32_t inside, uint32_t outside):
    """The block status of [start, stop) as segments, from runs [offsets[i],
    ends[i]) (sorted, disjoint) with flags inside and the gaps between them
    with flags outside: (bounds, flags), bounds uint64[n + 1] strictly
    increasing from start to stop, flags uint32[n], neighbours never equal
    (touching runs merged, empty segments dropped).  start < stop."""
    cdef Py_ssize_t n = offsets.shape[0], i, k = 0
    cdef uint64_t pos = start, o, e
    cdef cnp.ndarray[uint64_t, ndim=1] bounds
    cdef cnp.ndarray[uint32_t, ndim=1] flags
    cdef uint64_t *b
    cdef uint32_t *f
    if ends.shape[0] != n:
        raise ValueError("segments: offsets and ends differ in length")
    if not start < stop:
        raise ValueError(f"segments: empty range [{start}, {stop})")
    bounds = np.empty(2 * n + 2, dtype=np.uint64)
    flags = np.empty(2 * n + 1, dtype=np.uint32)
    b = <uint64_t *> bounds.data
    f = <uint32_t *> flags.data
    with nogil:
        for i in range(n):
            o = offsets[i] if offsets[i] > pos else pos
            e = ends[i] if ends[i] < stop else stop
            if e <= o:
                continue
            if o > pos and not (k and f[k - 1] == outside):
                b[k] = pos
                f[k] = outside
                k += 1
            if not (k and f[k - 1] == inside):
                b[k] = o
                f[k] = inside
                k += 1
            pos = e
        if pos < stop and not (k and f[k - 1] == outside):
            b[k] = pos
            f[k] = outside
            k += 1
        b[k] = stop
    return bounds[:k + 1].copy(), flags[:k].copy()


cdef inline void put_be32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline void put_be16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


def block_status_wire(const uint64_t[::1] bounds, const uint32_t[::1] flags, uint64_t start, uint64_t stop,
                      Py_ssize_t limit) -> bytes:
    """NBD block status descriptors (big-endian u32 length, u32 flags) of
    [start, stop) from segments(): the segments it meets, the first and last
    clipped to it, at most limit of them (the last one then whole, as far as
    stop).  bounds[0] <= start < stop <= bounds[-1], stop - start < 2**32."""
    return _block_status(bounds, flags, start, stop, limit, 0, 0, 0, 0, 0, False)


cdef class Segments:
    """segments() of [start, stop) kept as typed views, answering requests
    inside it: wire() is block_status_wire, chunk() the same descriptors as
    a whole structured reply chunk (no buffer is taken from the arrays per
    request).  bounds and flags are the numpy arrays segments() made."""
    cdef readonly object bounds, flags
    cdef const uint64_t[::1] b
    cdef const uint32_t[::1] f

    def __init__(self, const uint64_t[::1] offsets, const uint64_t[::1] ends, uint64_t start, uint64_t stop,
                 uint32_t inside, uint32_t outside):
        self.bounds, self.flags = segments(offsets, ends, start, stop, inside, outside)
        self.b = self.bounds
        self.f = self.flags

    def __len__(self):
        return self.f.shape[0]

    def wire(self, uint64_t start, uint64_t stop, Py_ssize_t limit) -> bytes:
        """block_status_wire(bounds, flags, start, stop, limit)."""
        return _block_status(self.b, self.f, start, stop, limit, 0, 0, 0, 0, 0, False)

    def chunk(self, uint64_t start, uint64_t stop, Py_ssize_t limit, uint32_t magic, uint16_t reply_flags,
              uint16_t reply_type, uint64_t cookie, uint32_t context_id) -> bytes:
        """The chunk of wire()'s descriptors: its header (big-endian u32 magic,
        u16 reply_flags, u16 reply_type, u64 cookie, u32 length of what
        follows), context_id (u32), then the descriptors: one bytes object."""
        return _block_status(self.b, self.f, start, stop, limit, magic, reply_flags, reply_type, cookie,
                             context_id, True)


cdef bytes _block_status(const uint64_t[::1] bounds, const uint32_t[::1] flags, uint64_t start, uint64_t stop,
                         Py_ssize_t limit, uint32_t magic, uint16_t reply_flags, uint16_t reply_type,
                         uint64_t cookie, uint32_t context_id, bint chunk):
    cdef Py_ssize_t n = flags.shape[0], lo, hi, mid, i, j, cnt, s
    cdef Py_ssize_t head = 24 if chunk else 0       # chunk header (20) and context id (4)
    cdef uint64_t a, z
    cdef uint8_t *p
    if bounds.shape[0] != n + 1 or n == 0 or limit < 1:
        raise ValueError("block_status_wire: bounds must be one longer than flags, limit >= 1")
    if not (bounds[0] <= start < stop <= bounds[n]) or stop - start > 0xFFFFFFFF:
        raise ValueError(f"block_status_wire: [{start}, {stop}) outside [{bounds[0]}, {bounds[n]}) or too long")
    with nogil:
        lo, hi = 0, n                   # i: the segment holding start (last bound <= start)
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if bounds[mid] <= start:
                lo = mid
            else:
                hi = mid
        i = lo
        lo, hi = i, n                   # j: the first bound >= stop (segments i .. j - 1 meet the range)
        while lo < hi:
            mid = (lo + hi) >> 1
            if bounds[mid] < stop:
                lo = mid + 1
            else:
                hi = mid
        j = lo
        cnt = j - i if j - i < limit else limit
    out = PyBytes_FromStringAndSize(NULL, head + cnt * 8)
    p = <uint8_t *> PyBytes_AS_STRING(out)
    if chunk:
        put_be32(p, magic)
        put_be16(p + 4, reply_flags)
        put_be16(p + 6, reply_type)
        put_be32(p + 8, <uint32_t> (cookie >> 32))
        put_be32(p + 12, <uint32_t> cookie)
        put_be32(p + 16, <uint32_t> (4 + cnt * 8))
        put_be32(p + 20, context_id)
        p += 24
    with nogil:
        for s in range(cnt):
            a = bounds[i + s] if bounds[i + s] > start else start
            z = bounds[i + s + 1] if bounds[i + s + 1] < stop else stop
            put_be32(p + 8 * s, <uint32_t> (z - a))
            put_be32(p + 8 * s + 4, flags[i + s])
    return out


# ---------------------------------------------------------------------------
def empty_bytearray(Py_ssize_t n):
    """A bytearray of n bytes whose content is not set (bytearray(n) zero-fills
    it: a memset as costly as the read that then overwrites it), for a buffer
    the caller fills completely before anything reads it."""
    if n < 0:
        raise ValueError("empty_bytearray: negative size")
    return PyByteArray_FromStringAndSize(NULL, n)


# ---------------------------------------------------------------------------
cdef extern from "<sys/epoll.h>" nogil:
    cdef struct epoll_event:
        uint32_t events
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC

cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <int64_t> t.tv_sec * 1000000000 + t.tv_nsec


def spin_until_ready(int epfd, int64_t budget_ns) -> int:
    """Busy-poll the epoll set epfd (epoll_wait with timeout 0, without the
    GIL) until one of its descriptors is ready or budget_ns passed: the
    nanoseconds it took, or -1 when the budget ran out (or epoll_wait failed,
    which the caller's next real wait reports)."""
    cdef epoll_event ev
    cdef int n
    cdef int64_t start, now, took = -1
    with nogil:
        start = monotonic_ns()
        while True:
            n = epoll_wait(epfd, &ev, 1, 0)
            now = monotonic_ns()
            if n > 0:
                took = now - start
                break
            if n < 0 or now - start >= budget_ns:
                break
            sched_yield()           # a task waiting for this CPU (the client, maybe) runs first
    return took
