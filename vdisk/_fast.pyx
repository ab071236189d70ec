# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Data-oriented kernels for vdisk: zero detection, run building, counter
folds and scans, table walks.

Every function takes typed memoryviews and returns arrays or scalars.  The
Python callers check index ranges before calling in (these kernels run with
bounds checking off), and each loop releases the GIL.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int64_t, uint64_t
from libc.string cimport memcmp
from libc.stdlib cimport calloc, malloc, realloc, free

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
# The Disk's single-block hot path
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memset
from libc.errno cimport errno, EINTR
from posix.unistd cimport pread as c_pread, pwrite as c_pwrite
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock, PyThread_acquire_lock,
                               PyThread_release_lock, PyThread_get_thread_ident, NOWAIT_LOCK, PyLockStatus,
                               PY_LOCK_ACQUIRED, PY_LOCK_INTR)

cdef bint all_zero(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(16 if n >= 16 else n):
        if p[i]:
            return False
    return n <= 16 or memcmp(p, p + 16, n - 16) == 0


cdef int read_full(int fd, char *buf, Py_ssize_t n, int64_t off) noexcept nogil:
    """pread all n bytes (zeros past EOF); 0 or an errno."""
    cdef Py_ssize_t done = 0, got
    while done < n:
        got = c_pread(fd, buf + done, n - done, off + done)
        if got < 0:
            if errno == EINTR:
                continue
            return errno
        if got == 0:
            memset(buf + done, 0, n - done)
            return 0
        done += got
    return 0


cdef int write_full(int fd, const char *buf, Py_ssize_t n, int64_t off) noexcept nogil:
    """pwrite all n bytes; 0 or an errno."""
    cdef Py_ssize_t done = 0, put
    while done < n:
        put = c_pwrite(fd, buf + done, n - done, off + done)
        if put < 0:
            if errno == EINTR:
                continue
            return errno
        done += put
    return 0


cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock, long long microseconds, int intr_flag) nogil


cdef class DiskLock:
    """A reentrant lock in C: the Disk's lock, shared with its HotPath.

    The same semantics as ``threading.RLock`` (acquire, release, ``with``;
    the owning thread may take it again), but the hot path takes and drops
    it with a C call, not two Python method calls per request.  The owner
    and count change only with the GIL held; a thread that must wait
    releases the GIL and can be interrupted by signals, as RLock can.
    """
    cdef PyThread_type_lock lock
    cdef unsigned long owner
    cdef Py_ssize_t count

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError("vdisk._fast: no memory for a lock")
        self.count = 0

    def __dealloc__(self):
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    cdef int enter(self, bint blocking=True, long long timeout_us=-1) except -1:
        """1 when acquired, 0 when not (non-blocking, or timed out)."""
        cdef unsigned long me = <unsigned long> PyThread_get_thread_ident()
        cdef PyLockStatus st
        if self.count and self.owner == me:
            self.count += 1
            return 1
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            if not blocking:
                return 0
            while True:
                with nogil:
                    st = PyThread_acquire_lock_timed(self.lock, timeout_us, 1)
                if st == PY_LOCK_ACQUIRED:
                    break
                if st == PY_LOCK_INTR:
                    PyErr_CheckSignals()        # a KeyboardInterrupt raises here
                    continue
                return 0                        # timed out
        self.owner = me
        self.count = 1
        return 1

    cdef inline void leave(self) noexcept:
        self.count -= 1
        if self.count == 0:
            self.owner = 0
            PyThread_release_lock(self.lock)

    def acquire(self, bint blocking=True, double timeout=-1) -> bool:
        """Take the lock (again, if this thread holds it); False on a timeout."""
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        return self.enter(blocking, <long long> (timeout * 1e6) if timeout >= 0 else -1) == 1

    def release(self) -> None:
        if self.count == 0 or self.owner != <unsigned long> PyThread_get_thread_ident():
            raise RuntimeError("cannot release un-acquired lock")
        self.leave()

    def __enter__(self):
        self.enter()
        return True

    def __exit__(self, *exc):
        self.release()

    def _is_owned(self) -> bool:
        return self.count > 0 and self.owner == <unsigned long> PyThread_get_thread_ident()

    def _release_save(self):
        """Release the lock however deep this thread holds it; the state for
        _acquire_restore (what threading.Condition.wait does with an RLock)."""
        if not self._is_owned():
            raise RuntimeError("cannot release un-acquired lock")
        state = (self.count, self.owner)
        self.count = 0
        self.owner = 0
        PyThread_release_lock(self.lock)
        return state

    def _acquire_restore(self, state) -> None:
        """Take the lock back as deep as _release_save found it."""
        count, owner = state
        self.enter()
        self.count = count
        self.owner = owner

    def __repr__(self):
        return f"<vdisk._fast.DiskLock {'locked' if self.count else 'unlocked'} count={self.count}>"


cdef class HotPath:
    """A Disk's ``pread`` and in-place ``pwrite``, with no Python frame
    between the caller and the system calls: any request within the
    virtual size whose blocks are all mapped (reads: or unmapped, read as
    zeros) and, for writes, unshared; physically contiguous blocks go in one
    system call.

    One-way boundary: this object knows arrays, a descriptor, sizes, flags
    and callables, never the Disk.  It is given its fallbacks at construction
    (``read_slow(length, offset)``, ``write_slow(data, offset)``: the Python
    paths, which handle every case and raise the right errors; ``fold_due()``:
    called after ``fold_interval`` writes) and its state through one setter,
    :meth:`bind`, which the owner calls after any of that state is replaced
    (open, resize, revert, table relocation, refcount growth, tracking
    reset) and at close (:meth:`shut`).  Everything this path does not
    handle goes, unchanged, to the fallbacks:

    * reads that are empty or out of range;
    * writes that allocate (an unallocated or shared block among theirs),
      that span blocks through a non-FileIO layer (tests' fault layers),
      writes of a whole block of zeros (they unmap), writes into a coarse
      region whose bit is not yet durable (the write-ahead rule needs a
      sync first), and writes when the I/O layer is poisoned;
    * any system call error (the Python path repeats the call and raises
      the VdiskError).

    What it does do is exactly what the Python hot path did: under the
    owner's lock, look the block up, mark the block dirty in the tracker
    (fine bit and summary group) before issuing the data write, and count
    writes towards the automatic fold.

    The owner's ``pread``/``pwrite`` are the functions :func:`methods` makes
    (class attributes: bound like Python methods, so the call holds the
    owner for its whole length, even when nothing else does:
    ``vdisk.open(p).pread(10, 0)``); the fallbacks, held here, reach the
    owner only weakly (a dropped Disk still closes at once).
    """
    cdef uint32_t[::1] table
    cdef uint16_t[::1] refs
    cdef uint8_t[::1] dirty
    cdef uint8_t[::1] groups
    cdef uint8_t[::1] coarse
    cdef uint8_t[::1] fresh
    cdef Py_ssize_t nentries, nrefs, ndirty, ngroups, ncoarse, nfresh
    cdef int fd, shift, rel
    cdef int64_t vsize
    cdef int summary_shift      # vdisk.layout.SUMMARY_SHIFT, given by bind()
    cdef bint can_read, can_write, tracking, direct
    cdef DiskLock lock
    cdef object io, io_pwrite
    cdef object read_slow, write_slow, fold_due
    cdef public Py_ssize_t writes
    cdef public Py_ssize_t fold_interval

    def __init__(self, DiskLock lock not None, read_slow, write_slow, fold_due, Py_ssize_t fold_interval):
        self.lock = lock
        self.read_slow = read_slow
        self.write_slow = write_slow
        self.fold_due = fold_due
        self.fold_interval = fold_interval
        self.writes = 0
        self.can_read = self.can_write = False

    def bind(self, io, bint direct, int fd, table, refs, int shift, int64_t vsize, bint readable,
             bint writable, dirty=None, groups=None, coarse=None, fresh=None, int rel=0, int summary_shift=-1):
        """Point the hot path at the owner's current state (call under its lock).
        direct: write with pwrite(2) on fd rather than through io.pwrite.
        With tracking: the tracker's dirty, group and coarse bytes and its
        region shift (rel), and the table's fresh bytes (blocks remapped
        since the last flush), all read by the write-ahead rule."""
        if not 0 <= summary_shift < 32:
            raise ValueError(f"bind needs the summary shift (vdisk.layout.SUMMARY_SHIFT), got {summary_shift}")
        self.summary_shift = summary_shift
        self.io = io
        self.io_pwrite = io.pwrite
        self.direct = direct
        self.fd = fd
        self.table = table
        self.refs = refs
        self.nentries = self.table.shape[0]
        self.nrefs = self.refs.shape[0]
        self.shift = shift
        self.vsize = vsize
        self.tracking = dirty is not None
        if self.tracking:
            self.dirty = dirty
            self.groups = groups
            self.coarse = coarse
            self.fresh = fresh
            self.ndirty = self.dirty.shape[0]
            self.ngroups = self.groups.shape[0]
            self.ncoarse = self.coarse.shape[0]
            self.nfresh = self.fresh.shape[0]
            self.rel = rel
        self.can_read = readable
        self.can_write = writable

    def shut(self):
        """Hand every call to the Python path (closed, or no longer trusted)."""
        self.can_read = self.can_write = False
        self.table = None
        self.refs = None
        self.dirty = self.groups = self.coarse = self.fresh = None
        self.io = self.io_pwrite = None

    def describe(self):
        """What the path is bound to, for tests: (table, refs, vsize, dirty, groups, coarse, fresh, rel, can_read,
        can_write)."""
        return (self.table.base if self.table is not None else None,
                self.refs.base if self.refs is not None else None, self.vsize,
                self.dirty.base if self.tracking and self.dirty is not None else None,
                self.groups.base if self.tracking and self.groups is not None else None,
                self.coarse.base if self.tracking and self.coarse is not None else None,
                self.fresh.base if self.tracking and self.fresh is not None else None,
                self.rel if self.tracking else None, self.can_read, self.can_write)

    cdef int write_ahead(self, int64_t b) noexcept nogil:
        """The write-ahead rule of change tracking, the one place it is
        written (tracking.py's module docstring; the Python write paths ask
        it through mark_write).  Block b is about to be overwritten in place:

        * fresh (remapped since the last flush): its mapping is not durable,
          and the next flush folds b's counter before the table that makes
          the mapping durable (docs/FORMAT.md, "Write order"): mark it;
        * otherwise durable data is overwritten: its coarse region's bit
          must be durable before the data write is issued; when it is: mark.

        Marking sets b's fine dirty byte and its summary group's flag, before
        the data write is issued.  Returns 1: marked, the write may be issued;
        0: nothing marked, the region must be armed first (the caller makes
        its bit durable, then asks again); -1: b beyond the bound arrays."""
        cdef int64_t r = b >> self.rel
        if b < 0 or b >= self.ndirty or (b >> self.summary_shift) >= self.ngroups or r >= self.ncoarse:
            return -1
        if not ((b < self.nfresh and self.fresh[b]) or self.coarse[r]):
            return 0
        self.dirty[b] = 1
        self.groups[b >> self.summary_shift] = 1
        return 1

    def mark_write(self, int64_t b):
        """The write-ahead rule (write_ahead) for the Python write paths:
        True once block b is marked and may be written in place, False if
        its region must be armed first.  Raises if tracking is not bound or
        b is out of range: a write is never left unmarked."""
        cdef int r
        if not self.tracking:
            raise RuntimeError("HotPath.mark_write: no tracking arrays bound")
        r = self.write_ahead(b)
        if r < 0:
            raise IndexError(f"HotPath.mark_write: block {b} beyond the bound tracking arrays")
        return r == 1

    def pread(self, length, offset):
        """pread(length, offset) -> bytes: length bytes at offset; never-written areas read as zeros."""
        return self.read(length, offset)

    def pwrite(self, data, offset):
        """pwrite(data, offset) -> int: write data (any bytes-like) at offset; returns len(data)."""
        return self.write(data, offset)

    cdef int read_runs(self, char *buf, int64_t off, int64_t n) noexcept nogil:
        """Read n bytes at virtual offset off into buf through the table
        (blocks off >> shift .. (off + n - 1) >> shift, all < nentries):
        physically contiguous blocks in one pread, unmapped ones as zeros.
        0 or an errno."""
        cdef int64_t mask = (1 << self.shift) - 1
        cdef int64_t pos = off, end = off + n, piece, p, phys
        cdef int64_t run_phys = -1, run_at = 0, run_len = 0
        cdef int err
        while pos < end:
            piece = (mask + 1) - (pos & mask)
            if piece > end - pos:
                piece = end - pos
            p = self.table[pos >> self.shift]
            phys = (p << self.shift) | (pos & mask) if p else -1
            if run_len and ((phys < 0 and run_phys < 0) or (phys >= 0 and run_phys >= 0
                                                           and run_phys + run_len == phys)):
                run_len += piece
            else:
                if run_len:
                    err = self.read_run(buf + run_at, run_len, run_phys)
                    if err:
                        return err
                run_phys, run_at, run_len = phys, pos - off, piece
            pos += piece
        return self.read_run(buf + run_at, run_len, run_phys) if run_len else 0

    cdef int read_run(self, char *buf, int64_t n, int64_t phys) noexcept nogil:
        if phys < 0:
            memset(buf, 0, n)
            return 0
        return read_full(self.fd, buf, n, phys)

    cdef int write_runs(self, const char *buf, int64_t off, int64_t n) noexcept nogil:
        """Write n bytes at virtual offset off in place (every block mapped and
        checked by the caller): physically contiguous blocks in one pwrite.
        0 or an errno."""
        cdef int64_t mask = (1 << self.shift) - 1
        cdef int64_t pos = off, end = off + n, piece, phys
        cdef int64_t run_phys = -1, run_at = 0, run_len = 0
        cdef int err
        while pos < end:
            piece = (mask + 1) - (pos & mask)
            if piece > end - pos:
                piece = end - pos
            phys = (<int64_t> self.table[pos >> self.shift] << self.shift) | (pos & mask)
            if run_len and run_phys + run_len == phys:
                run_len += piece
            else:
                if run_len:
                    err = write_full(self.fd, buf + run_at, run_len, run_phys)
                    if err:
                        return err
                run_phys, run_at, run_len = phys, pos - off, piece
            pos += piece
        return write_full(self.fd, buf + run_at, run_len, run_phys) if run_len else 0

    cdef object read(self, length, offset):
        cdef int64_t n, off, b, b1
        cdef object out
        cdef int err = 0
        cdef char *buf
        try:
            n = length
            off = offset
        except (TypeError, OverflowError):
            return self.read_slow(length, offset)
        if not self.can_read or n <= 0 or off < 0 or off > self.vsize - n:
            return self.read_slow(length, offset)
        b = off >> self.shift
        b1 = (off + n - 1) >> self.shift
        if b1 >= self.nentries:
            return self.read_slow(length, offset)
        self.lock.enter()
        try:
            if not self.can_read or off > self.vsize - n or b1 >= self.nentries:   # bind() may have run
                return self.read_slow(length, offset)
            out = PyBytes_FromStringAndSize(NULL, n)
            buf = PyBytes_AS_STRING(out)
            if b == b1 and self.table[b] == 0:
                memset(buf, 0, n)
                return out
            with nogil:
                err = self.read_runs(buf, off, n)
            if err:
                return self.read_slow(length, offset)   # raises the VdiskIOError
            return out
        finally:
            self.lock.leave()

    cdef object write(self, data, offset):
        cdef Py_buffer view
        cdef int64_t n, off, b, b0, b1, p, pos, piece, mask
        cdef int err = 0
        cdef const char *src
        try:
            off = offset
        except (TypeError, OverflowError):
            return self.write_slow(data, offset)
        if not self.can_write:
            return self.write_slow(data, offset)
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except (TypeError, BufferError, ValueError):
            return self.write_slow(data, offset)   # not contiguous bytes: it says why
        try:
            n = view.len
            src = <const char *> view.buf
            if n <= 0 or off < 0 or off > self.vsize - n:
                return self.write_slow(data, offset)
            mask = (1 << self.shift) - 1
            b0 = off >> self.shift
            b1 = (off + n - 1) >> self.shift
            if b1 >= self.nentries or (b1 != b0 and not self.direct):
                return self.write_slow(data, offset)
            self.lock.enter()
            try:
                if (not self.can_write or self.io.poisoned is not None or off > self.vsize - n
                        or b1 >= self.nentries):      # bind() may have run since the checks above
                    return self.write_slow(data, offset)   # (past a shrink since the check: raises)
                # every block in place: mapped, unshared, and not a whole block of zeros (those unmap)
                pos = off
                for b in range(b0, b1 + 1):
                    p = self.table[b]
                    if p == 0 or p >= self.nrefs or self.refs[p] != 1:
                        return self.write_slow(data, offset)
                    piece = (mask + 1) - (pos & mask)
                    if piece > off + n - pos:
                        piece = off + n - pos
                    if piece == mask + 1 and all_zero(<const uint8_t *> src + (pos - off), piece):
                        return self.write_slow(data, offset)
                    pos += piece
                if self.tracking:
                    for b in range(b0, b1 + 1):
                        if self.write_ahead(b) != 1:
                            # a region to arm: Python does it (the blocks marked so far are written there too)
                            return self.write_slow(data, offset)
                if self.direct:
                    with nogil:
                        err = self.write_runs(src, off, n)
                    if err:
                        return self.write_slow(data, offset)   # repeats it; raises
                else:
                    self.io_pwrite(memoryview(data).cast("B"), (<int64_t> self.table[b0] << self.shift) | (off & mask))
                self.writes += 1
                if self.writes >= self.fold_interval:
                    self.fold_due()
                return n
            finally:
                self.lock.leave()
        finally:
            PyBuffer_Release(&view)


def methods(str attribute):
    """(pread, pwrite) for a class whose instances keep their HotPath in the
    named attribute: functions that bind like Python methods (the bound call
    holds the instance for its whole length) and go straight to the hot path.
    The owner names the attribute; this module never names the owner's state."""
    def pread(owner, length, offset):
        """pread(length, offset) -> bytes: length bytes at offset; never-written areas read as zeros."""
        return (<HotPath?>getattr(owner, attribute)).read(length, offset)

    def pwrite(owner, data, offset):
        """pwrite(data, offset) -> int: write data (any bytes-like) at offset; returns len(data)."""
        return (<HotPath?>getattr(owner, attribute)).write(data, offset)
    return pread, pwrite
