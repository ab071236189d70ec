# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The Disk's hot path: ``pread`` and in-place ``pwrite`` with no Python frame
between the caller and the system calls, and the Disk's lock (``DiskLock``).

The layer under vdisk/disk.py, one way: this module knows arrays, a file
descriptor, sizes, flags and the callables it is given, never the Disk
(tests/test_parts.py checks it).  The data kernels are in vdisk/_fast.pyx.
Every index is checked against the bound arrays' lengths before use.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int64_t
from libc.string cimport memcmp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memset
from libc.errno cimport errno, EINTR
from posix.unistd cimport pread as c_pread, pwrite as c_pwrite
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.pystate cimport (PyInterpreterState, PyInterpreterState_Head, PyInterpreterState_Next,
                              PyInterpreterState_ThreadHead, PyThreadState_Next)

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


# No pwrite crosses a WRITE_PIECE boundary of the file (vdisk/fileio.py says why: page-cache folios).
cdef enum:
    WRITE_PIECE = 256 << 10
WRITE_PIECE_BYTES = WRITE_PIECE     # for the test that both layers agree


cdef int write_full(int fd, const char *buf, Py_ssize_t n, int64_t off) noexcept nogil:
    """pwrite all n bytes, one call per WRITE_PIECE of the file; 0 or an errno."""
    cdef Py_ssize_t done = 0, put, piece
    while done < n:
        piece = WRITE_PIECE - ((off + done) & (WRITE_PIECE - 1))
        if piece > n - done:
            piece = n - done
        put = c_pwrite(fd, buf + done, piece, off + done)
        if put < 0:
            if errno == EINTR:
                continue
            return errno
        done += put
    return 0


cdef int read_table_runs(int fd, const uint32_t *table, int shift, char *buf, int64_t off,
                         int64_t n) noexcept nogil:
    """Read n bytes at virtual offset off into buf through table (blocks
    off >> shift .. (off + n - 1) >> shift, all within it): physically
    contiguous blocks in one pread, unmapped ones as zeros.  0 or an errno."""
    cdef int64_t mask = (1 << shift) - 1
    cdef int64_t pos = off, end = off + n, piece, p, phys
    cdef int64_t run_phys = -1, run_at = 0, run_len = 0
    cdef int err
    while pos < end:
        piece = (mask + 1) - (pos & mask)
        if piece > end - pos:
            piece = end - pos
        p = table[pos >> shift]
        phys = (p << shift) | (pos & mask) if p else -1
        if run_len and ((phys < 0 and run_phys < 0) or (phys >= 0 and run_phys >= 0
                                                       and run_phys + run_len == phys)):
            run_len += piece
        else:
            if run_len:
                err = read_run(fd, buf + run_at, run_len, run_phys)
                if err:
                    return err
            run_phys, run_at, run_len = phys, pos - off, piece
        pos += piece
    return read_run(fd, buf + run_at, run_len, run_phys) if run_len else 0


cdef inline int read_run(int fd, char *buf, int64_t n, int64_t phys) noexcept nogil:
    if phys < 0:
        memset(buf, 0, n)
        return 0
    return read_full(fd, buf, n, phys)


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, int64_t offset, int flags)

cdef extern from *:
    """
    #include <errno.h>
    #ifndef RWF_NOWAIT
    #define RWF_NOWAIT 0x00000008
    #endif
    """
    int RWF_NOWAIT
    int EOPNOTSUPP, EINVAL, ENOSYS

# Who holds the GIL while a system call of the hot path runs.  Alone (the
# only thread state of the only interpreter), nobody could take it: the call
# keeps it, as releasing and taking it back would only cost.  Beside other
# threads, reads of at most NOWAIT_MAX bytes first try the page cache with
# the GIL held (preadv2 with RWF_NOWAIT: EAGAIN rather than wait for the
# disk) and release it only for the read that must wait; writes release it.
# Which costs less, a GIL round trip or preadv2's extra kernel work (the
# iovec import), differs by machine (benchmarks/README.md, "Alone with the
# GIL").
cdef enum:
    NOWAIT_MAX = 64 * 1024


cdef inline bint alone() noexcept:
    """True when the caller (holding the GIL) is the only thread state of the
    only interpreter.  A thread started later is counted from the moment its
    start is asked for (its state exists before it runs)."""
    cdef PyInterpreterState *interp = PyInterpreterState_Head()
    return (PyInterpreterState_Next(interp) == NULL
            and PyThreadState_Next(PyInterpreterState_ThreadHead(interp)) == NULL)


def alone_now():
    """alone() as the hot path sees it now (for the tests)."""
    return alone()


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC

cdef extern from *:
    """
    #include <pthread.h>
    #include <time.h>
    /* Wait up to ns for the mutex: 0 when taken, else an errno (ETIMEDOUT).  On the
       monotonic clock where the C library has pthread_mutex_clocklock (glibc 2.30),
       so a step of the wall clock neither stretches nor cuts the wait. */
    static int vdisk_mutex_wait(pthread_mutex_t *m, long long ns) {
        struct timespec t;
    #if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
        clockid_t clk = CLOCK_MONOTONIC;
    #else
        clockid_t clk = CLOCK_REALTIME;
    #endif
        clock_gettime(clk, &t);
        ns += t.tv_nsec;
        t.tv_sec += (time_t) (ns / 1000000000LL);
        t.tv_nsec = (long) (ns % 1000000000LL);
    #if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
        return pthread_mutex_clocklock(m, clk, &t);
    #else
        return pthread_mutex_timedlock(m, &t);
    #endif
    }
    """
    int vdisk_mutex_wait(pthread_mutex_t *m, long long ns) nogil


cdef enum:
    WAIT_SLICE_NS = 20 * 1000 * 1000     # a waiter wakes this often to run signal handlers


cdef int64_t clock_ns(int clk) noexcept nogil:
    cdef timespec ts
    clock_gettime(clk, &ts)
    return <int64_t> ts.tv_sec * 1000000000 + ts.tv_nsec


cdef class DiskLock:
    """A reentrant lock in C: the Disk's lock, shared with its HotPath.

    The same semantics as ``threading.RLock`` (acquire, release, ``with``;
    the owning thread may take it again), but the hot path takes and drops
    it with a C call, not two Python method calls per request: an
    uncontended take is one pthread_mutex_trylock (a PyThread lock reads
    the clock on every take, even a non-blocking one, on CPython 3.11).
    The owner and count change only with the GIL held; a thread that must
    wait releases the GIL and runs signal handlers every WAIT_SLICE_NS
    (a KeyboardInterrupt ends the wait), as RLock can be interrupted.
    """
    cdef pthread_mutex_t mutex
    cdef unsigned long owner
    cdef Py_ssize_t count

    def __cinit__(self):
        if pthread_mutex_init(&self.mutex, NULL) != 0:
            raise MemoryError("vdisk._hotpath: no memory for a lock")
        self.count = 0

    def __dealloc__(self):
        pthread_mutex_destroy(&self.mutex)

    cdef int enter(self, bint blocking=True, long long timeout_us=-1) except -1:
        """1 when acquired, 0 when not (non-blocking, or timed out)."""
        cdef unsigned long me = <unsigned long> PyThread_get_thread_ident()
        cdef int64_t deadline = 0, now, wake
        cdef int rc
        if self.count and self.owner == me:
            self.count += 1
            return 1
        if pthread_mutex_trylock(&self.mutex) != 0:
            if not blocking or timeout_us == 0:
                return 0
            if timeout_us > 0:
                deadline = clock_ns(CLOCK_MONOTONIC) + timeout_us * 1000
            while True:
                with nogil:
                    wake = WAIT_SLICE_NS
                    if timeout_us > 0:
                        now = clock_ns(CLOCK_MONOTONIC)
                        if deadline - now < wake:
                            wake = deadline - now if deadline > now else 0
                    rc = vdisk_mutex_wait(&self.mutex, wake)
                if rc == 0:
                    break
                PyErr_CheckSignals()            # a KeyboardInterrupt raises here
                if timeout_us > 0 and clock_ns(CLOCK_MONOTONIC) >= deadline:
                    return 0                    # timed out
        self.owner = me
        self.count = 1
        return 1

    cdef inline void leave(self) noexcept:
        self.count -= 1
        if self.count == 0:
            self.owner = 0
            pthread_mutex_unlock(&self.mutex)

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
        pthread_mutex_unlock(&self.mutex)
        return state

    def _acquire_restore(self, state) -> None:
        """Take the lock back as deep as _release_save found it."""
        count, owner = state
        self.enter()
        self.count = count
        self.owner = owner

    def __repr__(self):
        return f"<vdisk._hotpath.DiskLock {'locked' if self.count else 'unlocked'} count={self.count}>"


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
    cdef bint nowait            # preadv2(RWF_NOWAIT) works on this file (until it says otherwise)
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
        self.nowait = True

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
        """Read n bytes at virtual offset off into buf through the live table
        (blocks off >> shift .. (off + n - 1) >> shift, all < nentries)."""
        return read_table_runs(self.fd, &self.table[0], self.shift, buf, off, n)

    cdef int read_table(self, const uint32_t[::1] table, char *buf, int64_t offset, int64_t n) except -1:
        """read_table_runs through another table, under the lock, the GIL
        released: 0 done; 1 the caller must take its Python path (not bound
        for reads, a range past the table, a system call error)."""
        cdef int err = 0
        if n == 0:
            return 0
        if not self.can_read or offset < 0 or table.shape[0] == 0 or (offset + n - 1) >> self.shift >= table.shape[0]:
            return 1
        self.lock.enter()
        try:
            if not self.can_read:
                return 1
            if alone():
                err = read_table_runs(self.fd, &table[0], self.shift, buf, offset, n)
            else:
                with nogil:
                    err = read_table_runs(self.fd, &table[0], self.shift, buf, offset, n)
        finally:
            self.lock.leave()
        return 1 if err else 0

    def read_through(self, const uint32_t[::1] table not None, buffer, int64_t offset):
        """Fill buffer (writable, contiguous) from virtual offset through another
        block table of the same file (a snapshot's frozen table), physically
        contiguous blocks in one pread, the GIL released.  True when done;
        False when the caller must take its Python path: not bound for reads,
        a range past the table, or a system call error (the Python path
        repeats the call and raises the VdiskIOError).  The caller holds the
        owner's lock and has checked the range against the view's size."""
        cdef Py_buffer view
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            return self.read_table(table, <char *> view.buf, offset, view.len) == 0
        finally:
            PyBuffer_Release(&view)

    def pread_through(self, const uint32_t[::1] table not None, int64_t length, int64_t offset):
        """read_through into a new bytes object of length bytes (no copy):
        the bytes, or None when the caller must take its Python path."""
        if length < 0:
            return None
        out = PyBytes_FromStringAndSize(NULL, length)
        return out if self.read_table(table, PyBytes_AS_STRING(out), offset, length) == 0 else None

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
            if alone():
                err = self.read_runs(buf, off, n)
            elif b == b1 and n <= NOWAIT_MAX and self.nowait and self.cached_read(buf, off, n):
                return out
            else:
                with nogil:
                    err = self.read_runs(buf, off, n)
            if err:
                return self.read_slow(length, offset)   # raises the VdiskIOError
            return out
        finally:
            self.lock.leave()

    cdef bint cached_read(self, char *buf, int64_t off, int64_t n) noexcept:
        """Read n bytes at virtual offset off (one mapped block) from the page
        cache without releasing the GIL: True when all of it was there."""
        cdef iovec iov
        cdef ssize_t got
        iov.iov_base = buf
        iov.iov_len = n
        got = preadv2(self.fd, &iov, 1, (<int64_t> self.table[off >> self.shift] << self.shift)
                      | (off & ((1 << self.shift) - 1)), RWF_NOWAIT)
        if got == n:
            return True
        if got < 0 and (errno == EOPNOTSUPP or errno == EINVAL or errno == ENOSYS):
            self.nowait = False     # not on this kernel or file system: the plain read from now on
        return False

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
                    if alone():
                        err = self.write_runs(src, off, n)
                    else:
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
