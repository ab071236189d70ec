"""The one small I/O layer every byte of an image goes through.

:class:`FileIO` wraps a file descriptor with the four calls the format
needs (pread, pwrite, fsync, truncate) plus locking.  Tests replace it with
:class:`vdisk.testing.RecordingIO`, which simulates power loss by dropping
any subset of the writes issued since the last fsync, so the write order
that docs/FORMAT.md promises is what the tests check.

OSErrors become :class:`vdisk.VdiskIOError`.  A failed fsync poisons the
file: the kernel may already have dropped the dirty pages, so every later
write or fsync raises instead of pretending to succeed (the fsyncgate
lesson), and the owner hears of it at once through ``on_poison`` (the Disk
stops using the file, reads included).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
import uuid as _uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, cast

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from ._types import ByteBuffer, BytesOut

from .errors import ImageLockedError, InvalidArgumentError, VdiskIOError
from .errors import TO_REPLACE, NoSuchFileError, Part


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# No write system call crosses a WRITE_PIECE boundary of the file.  A
# buffered write makes page-cache folios as large as the write (up to its
# alignment), and on ext4 every later small write into a folio walks all of
# its buffer heads: a random 4 KiB overwrite cost 2.7 us of CPU in a file
# written with 64 KiB writes, 5.3 us with 256 KiB, 10.6 us with 1 MiB and
# 25 us with 2 MiB writes (benchmarks/README.md, "Page-cache folios"), while
# sequential 1 MiB reads cost the same in all of them and fresh sequential
# writes in 256 KiB pieces cost about 2% more CPU than in 1 MiB ones.
# vdisk/_hotpath.pyx splits its writes at the same boundaries.
WRITE_PIECE = 256 << 10

def _libc(name: str, *argtypes: type[Any]) -> ctypes._NamedFuncPointer | None:
    """A libc function through ctypes (int result, errno kept), or None where it is missing."""
    try:
        fn: ctypes._NamedFuncPointer = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


# fallocate(2) for hole punching: Python's os module has no mode argument
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_fallocate = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _io_error(op: str, path: str, exc: OSError) -> VdiskIOError:
    return VdiskIOError(exc.errno, f"{op} failed on {path}: {exc.strerror or exc}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str, flags: int, mode: int = 0o644, *, block_device: bool = False) -> int:
    """os.open(path, flags) for a file vdisk reads or writes: opened with
    O_NONBLOCK (opening a FIFO never waits for a writer) and checked with
    fstat on that descriptor, before any read, to be a regular file (or a
    block device where block_device allows it); O_NONBLOCK is cleared again.
    A FIFO, socket, character device or directory raises
    InvalidArgumentError naming the path and what it is.  OSErrors pass
    through (FileNotFoundError included): callers word them."""
    flags |= os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EISDIR):    # a FIFO without reader (write-only), a socket; a directory
            try:
                kind = _kind(os.stat(path).st_mode)
            except OSError:
                raise exc from None
            raise InvalidArgumentError(f"{path}: {kind}, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or (block_device and stat.S_ISBLK(st.st_mode))):
            want = "a regular file or block device" if block_device else "a regular file"
            raise InvalidArgumentError(f"{path}: {_kind(st.st_mode)}, not {want}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def readable_buffer(data: ByteBuffer) -> ReadableBuffer:
    """data as the os functions are typed to take it.  Nothing to convert: a numpy
    array is a buffer; numpy's stubs declare it one only from Python 3.12 (where
    collections.abc.Buffer exists), so the type is said here."""
    return cast("ReadableBuffer", data)


def writable_buffer(buf: BytesOut) -> WriteableBuffer:
    """buf as a writable buffer (see readable_buffer)."""
    return cast("WriteableBuffer", buf)


class FileIO:
    """Positional I/O on one host file."""

    def __init__(self, path: str, writable: bool, create: bool = False, overwrite: bool = False):
        self.path = os.fspath(path)
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            self.fd = open_regular(self.path, flags)
        except FileExistsError:
            raise
        except FileNotFoundError:
            raise NoSuchFileError(self.path) from None
        except OSError as exc:
            raise _io_error("open", self.path, exc) from exc
        self.poisoned: VdiskIOError | None = None
        self.on_poison: Callable[[VdiskIOError], None] | None = None    # called with the error when an fsync fails (the Disk's _poison)

    @classmethod
    def adopt(cls, fd: int, path: str, writable: bool = False) -> "FileIO":
        """A FileIO over a descriptor already opened and checked (open_input,
        open_regular); it owns fd from now on (close() closes it).  Errors
        name path."""
        self = cls.__new__(cls)
        self.path, self.writable, self.fd = os.fspath(path), writable, fd
        self.poisoned = None
        self.on_poison = None
        return self

    # --- locking ------------------------------------------------------------
    def lock(self, exclusive: bool) -> None:
        """flock the file: exclusive for a writer, shared for readers; never waits."""
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if exclusive:
                raise ImageLockedError(
                    f"{self.path} is in use: another process (or Disk object) has it open; "
                    f"a writer needs it alone") from None
            raise ImageLockedError(
                f"{self.path} is open for writing by another process (or Disk object); "
                f"a reader can open it once the writer has closed it") from None
        except OSError as exc:
            raise _io_error("flock", self.path, exc) from exc

    # --- I/O ----------------------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise _io_error("pread", self.path, exc) from exc

    def preadinto(self, buf: BytesOut, offset: int) -> int:
        """Fill buf (a writable buffer) from offset; bytes past EOF read as zeros."""
        mv = memoryview(writable_buffer(buf)).cast("B")
        done = 0
        total = len(mv)
        try:
            while done < total:
                n = os.preadv(self.fd, [mv[done:]], offset + done)
                if n == 0:
                    mv[done:] = bytes(total - done)
                    break
                done += n
        except OSError as exc:
            raise _io_error("pread", self.path, exc) from exc
        return total

    def pwrite(self, data: ByteBuffer, offset: int) -> None:
        """Write all of data (a buffer of bytes: len() counts bytes) at offset
        (one system call per WRITE_PIECE of the file it spans)."""
        if self.poisoned is not None:
            self._check_poison()
        try:
            if offset % WRITE_PIECE + len(data) <= WRITE_PIECE:
                n = os.pwrite(self.fd, readable_buffer(data), offset)
                if n == len(data):
                    return
            else:
                n = 0
            _pwrite_pieces(self.fd, memoryview(readable_buffer(data)).cast("B")[n:], offset + n)
        except OSError as exc:
            raise _io_error("pwrite", self.path, exc) from exc

    def pwritev(self, buffers: Sequence[ByteBuffer], offset: int) -> None:
        """Write a list of buffers back to back at offset (one system call per
        WRITE_PIECE of the file they span, when it can)."""
        if len(buffers) == 1:
            return self.pwrite(buffers[0], offset)
        self._check_poison()
        batch: list[memoryview] = []
        room = WRITE_PIECE - offset % WRITE_PIECE       # bytes to the next piece boundary
        for b in buffers:
            mv = memoryview(readable_buffer(b)).cast("B")
            while len(mv):
                take = min(len(mv), room)
                batch.append(mv[:take] if take < len(mv) else mv)
                mv = mv[take:]
                room -= take
                if not room or len(batch) == IOV_MAX:
                    offset = self._pwritev_batch(batch, offset)
                    batch = []
                    room = WRITE_PIECE - offset % WRITE_PIECE
        if batch:
            self._pwritev_batch(batch, offset)

    def _pwritev_batch(self, batch: list[memoryview], offset: int) -> int:
        """One pwritev of batch (within one piece) at offset; the offset after it."""
        total = sum(len(b) for b in batch)
        try:
            n = os.pwritev(self.fd, batch, offset)
            if n != total:  # short write: finish the rest plainly
                _pwrite_pieces(self.fd, memoryview(b"".join(batch)[n:]), offset + n)
        except OSError as exc:
            raise _io_error("pwrite", self.path, exc) from exc
        return offset + total

    def fsync(self) -> None:
        self._check_poison()
        try:
            os.fdatasync(self.fd)   # data and the size needed to read it; not the timestamps
        except OSError as exc:
            raise self._poison(_io_error("fsync", self.path, exc)) from exc

    def _poison(self, err: VdiskIOError) -> VdiskIOError:
        """A failed fsync: what it covered may be lost whatever a retry says, so
        every later write and fsync raises; tell the owner.  Returns err."""
        if self.poisoned is None:
            self.poisoned = err
        if self.on_poison is not None:
            self.on_poison(err)
        return err

    def truncate(self, size: int) -> None:
        self._check_poison()
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _io_error("truncate", self.path, exc) from exc

    def punch_hole(self, offset: int, length: int) -> bool:
        """Give [offset, offset+length) back to the file system (reads as zeros).

        Returns False where the file system cannot punch holes; the caller
        then writes zeros or leaves the space allocated.
        """
        self._check_poison()
        if _fallocate is None or length <= 0:
            return False
        if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                      ctypes.c_int64(offset), ctypes.c_int64(length)) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise _io_error("fallocate", self.path, OSError(err, os.strerror(err)))

    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as exc:
            raise _io_error("fstat", self.path, exc) from exc

    def data_extents(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) of the data (non-hole) ranges in [start, end)."""
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                if exc.errno == errno.EINVAL:  # no SEEK_DATA: treat all as data
                    yield pos, end - pos
                    return
                raise _io_error("lseek", self.path, exc) from exc
            if data >= end:
                return
            try:
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            except OSError as exc:
                raise _io_error("lseek", self.path, exc) from exc
            hole = min(hole, end)
            yield data, hole - data
            pos = hole

    def _check_poison(self) -> None:
        if self.poisoned is not None:
            raise VdiskIOError(self.poisoned.errno,
                               f"{self.path}: an earlier fsync failed; refusing further writes "
                               f"(reopen the image to recover)")

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1


def open_input(path: str) -> int:
    """The descriptor of an image to read: opened once, read-only, and
    checked with fstat on that descriptor to be a regular file or a block
    device (open_regular: a FIFO or socket never blocks the open).  A
    missing file raises NoSuchFileError, any other OSError VdiskIOError,
    both naming path."""
    try:
        return open_regular(path, os.O_RDONLY, block_device=True)
    except FileNotFoundError:
        raise NoSuchFileError(path) from None
    except OSError as exc:
        raise _io_error("open", path, exc) from exc


class HostMap:
    """Which parts of a host file are data and which are holes (SEEK_DATA),
    remembering the last answer so a sequential walk makes few syscalls.
    Where the file system cannot tell (no SEEK_DATA), everything is data."""

    def __init__(self, fd: int, file_size: int):
        self.fd, self.file_size = fd, file_size
        self.lo = self.hi = 0
        self.data = True

    def segment(self, off: int) -> tuple[bool, int]:
        """(is data, end of that state) for host offset off."""
        if not (self.lo <= off < self.hi):
            if off >= self.file_size:
                return False, 1 << 63
            try:
                d = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError as exc:
                # ENXIO: nothing but a hole up to EOF; anything else (EINVAL: no SEEK_DATA): all data
                d = self.file_size if exc.errno == errno.ENXIO else off
            if d > off:
                self.lo, self.hi, self.data = off, d, False
            else:
                try:
                    h = os.lseek(self.fd, off, os.SEEK_HOLE)
                except OSError:
                    h = self.file_size
                self.lo, self.hi, self.data = off, max(h, off + 1), True
        return self.data, self.hi


# ---------------------------------------------------------------------------- files into place
def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:      # O_DIRECTORY: anything else (a FIFO) fails at once, never waits
        raise _io_error("open", directory, exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _io_error("fsync", directory, exc) from exc
    finally:
        os.close(fd)


def refuse_if_in_use(path: str) -> None:
    """Never replace an image another process (or Disk) holds open, nor
    anything but a regular file (a FIFO, device or socket is refused: never
    opened in a way that waits, never replaced by a file)."""
    if not os.path.exists(path):      # nothing to protect (a dangling symlink neither)
        return
    try:
        probe = FileIO(path, writable=False)
    except InvalidArgumentError as exc:
        if not os.path.exists(path):   # gone meanwhile: nothing to protect
            return
        raise InvalidArgumentError(f"{exc}: refusing to replace it") from None
    try:
        probe.lock(exclusive=True)
    finally:
        probe.close()


def place(tmp: str, dest: str, why: str | tuple[Part, ...]) -> None:
    """Move tmp to dest, never over an existing file (a hard link, then unlink;
    a rename where the file system has no hard links).  why: the end of the
    error when dest exists (text, or parts naming parameters: errors.Param)."""
    why = (why,) if isinstance(why, str) else why
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise InvalidArgumentError.naming(f"{dest} exists (", *why, ")") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(dest):
            raise InvalidArgumentError.naming(f"{dest} exists (", *why, ")") from None
        os.rename(tmp, dest)
        return
    os.unlink(tmp)


def place_synced(tmp: str, dest: str, why: str | tuple[Part, ...]) -> None:
    """place(), then fsync the directory.  If that fsync fails, dest is removed
    again (nothing was there before) and the error raised: an operation that
    fails leaves no file under dest."""
    place(tmp, dest, why)
    try:
        fsync_dir(os.path.dirname(os.path.abspath(dest)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise


@contextlib.contextmanager
def atomic_output(dest: str, *, overwrite: bool = False, what: str = "partial",
                  why: str | tuple[Part, ...] = TO_REPLACE,
                  placing_error: Callable[[OSError], BaseException] | None = None) -> Iterator[str]:
    """Build a new file for dest under a temporary name beside it, then put it in place.

    Yields the temporary path (``.NAME.<8 hex digits>.<what>`` in dest's directory).
    The body writes the file there, syncs and closes it.  On a clean exit the
    file goes to dest: over an existing one with overwrite=True (never over an
    image in use; a rename, then the directory synced), else only where nothing
    is (place_synced: dest exists -> InvalidArgumentError ending with why).  On
    an exception in the body or the placing, the temporary file is removed and
    dest is as it was.  placing_error(exc), if given, is what an OSError of the
    placing itself (rename, directory sync) is raised as.
    """
    directory = os.path.dirname(os.path.abspath(dest))
    tmp = os.path.join(directory, f".{os.path.basename(dest)}.{_uuid.uuid4().hex[:8]}.{what}")
    try:
        yield tmp
        try:
            if overwrite:
                refuse_if_in_use(dest)
                os.replace(tmp, dest)
                fsync_dir(directory)
            else:
                place_synced(tmp, dest, why)
        except OSError as exc:
            if placing_error is None:
                raise
            raise placing_error(exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# sync_file_range(2): start writing dirty pages back without waiting, so the
# final fsync finds most of the data on its way (the copy and the device work
# at once).  Linux only, best effort; durability still comes from fsync.
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def start_writeback(fd: int, offset: int, length: int) -> None:
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def pwrite_all(fd: int, data: ByteBuffer, offset: int) -> None:
    """os.pwrite until all of data is written (for files written outside FileIO)."""
    _pwrite_pieces(fd, memoryview(readable_buffer(data)).cast("B"), offset)


def _pwrite_pieces(fd: int, mv: memoryview, offset: int) -> None:
    """os.pwrite all of mv at offset, no call crossing a WRITE_PIECE boundary."""
    while len(mv):
        n = os.pwrite(fd, mv[:WRITE_PIECE - offset % WRITE_PIECE], offset)
        mv = mv[n:]
        offset += n


# ---------------------------------------------------------------------------- qemu's image locks
# qemu (block/file-posix.c) locks single bytes of an image it opens with open
# file description locks (F_OFD_SETLK): byte QEMU_LOCK_PERM_BASE + i (a read
# lock) while it holds permission bit i, byte QEMU_LOCK_SHARED_BASE + i while
# it does not let others take permission i.  A second opener tests those
# bytes (F_OFD_GETLK) before it takes its own: that is how qemu-img refuses
# an image a running VM writes ("Failed to get "write" lock").
QEMU_LOCK_PERM_BASE = 100
QEMU_LOCK_SHARED_BASE = 200
QEMU_PERM_CONSISTENT_READ, QEMU_PERM_WRITE, QEMU_PERM_WRITE_UNCHANGED, QEMU_PERM_RESIZE = 0x1, 0x2, 0x4, 0x8
QEMU_PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
QEMU_PERM_ALL = 0xF
_FLOCK = "hhqqi4x"        # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)


def _ofd(fd: int, cmd: int, kind: int, offset: int) -> int:
    raw = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0))
    return int(struct.unpack(_FLOCK, raw)[0])


def qemu_lock(io: FileIO, perm: int, unshared: int) -> None:
    """Take qemu's image locks on io as a qemu block node holding permissions
    perm and sharing everything but unshared, after checking that no other
    opener (qemu or vdisk) conflicts: ImageLockedError naming the path and
    the permission, as qemu's "Failed to get ... lock".  Where the host has
    no OFD locks (not Linux) nothing is taken."""
    getlk, setlk = getattr(fcntl, "F_OFD_GETLK", None), getattr(fcntl, "F_OFD_SETLK", None)
    if getlk is None or setlk is None:      # pragma: no cover - not Linux
        return
    try:
        for i, name in QEMU_PERM_NAMES.items():
            # we want permission i: nobody may hold "not shared" on it; we refuse to share it: nobody may hold it
            for want, base, what in ((perm, QEMU_LOCK_SHARED_BASE, "another process does not share"),
                                     (unshared, QEMU_LOCK_PERM_BASE, "another process holds")):
                if want >> i & 1 and _ofd(io.fd, getlk, fcntl.F_WRLCK, base + i) != fcntl.F_UNLCK:
                    raise ImageLockedError(f"{io.path} is in use: {what} its {name!r} permission (qemu's lock "
                                           f"byte {base + i}; is a VM or qemu-img using the image?)")
        for i in QEMU_PERM_NAMES:
            if perm >> i & 1:
                _ofd(io.fd, setlk, fcntl.F_RDLCK, QEMU_LOCK_PERM_BASE + i)
            if unshared >> i & 1:
                _ofd(io.fd, setlk, fcntl.F_RDLCK, QEMU_LOCK_SHARED_BASE + i)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(f"{io.path} is in use: another process took qemu's locks on it meanwhile") \
                from None
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):     # a file system without them
            return
        raise _io_error("fcntl(F_OFD_SETLK)", io.path, exc) from exc
