"""Convert images between raw, qcow2 and vdisk; compare two images.

The contract
------------
:func:`convert` copies the guest-visible content of one image into a new
one and :func:`compare` tells whether two images read the same.  Both
treat every input as hostile (qcow2 through :mod:`vdisk.qcow2`, which
bounds every table and pointer) and keep memory bounded: data moves in
batches of at most :data:`BATCH` bytes, read straight into one reused
buffer.

Only data is read or written.  Holes of a raw file (SEEK_DATA/SEEK_HOLE),
unallocated and zero clusters of a qcow2 image, unallocated blocks of a
vdisk image are never read; blocks that read as all zeros are never
written (they stay unallocated in vdisk and qcow2 output, holes in raw
output).

A conversion never leaves a half-written image under the destination
name: the output is built under a temporary name in the destination's
folder, synced, and renamed into place; on any error the temporary file
is removed.  An existing destination is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import heapq
import os
import queue
import stat
import threading
import warnings
from typing import Callable, Iterator

import numpy as np

from . import _fast
from . import layout as L
from . import qcow2 as Q
from .disk import Disk
from .disk import create as _create
from .disk import open as _open
from .snapshot_table import is_backup_snapshot
from .errors import InvalidArgumentError, UnsupportedFeatureError, VdiskWarning
from .errors import TO_REPLACE, NoSuchFileError, Param, Part, VdiskIOError
from ._types import PathArg, SizeArg
from .fileio import atomic_output, pread_fd, preadinto_fd, pwrite_all

KiB, MiB = 1 << 10, 1 << 20
BATCH = 8 * MiB                  # bytes read and written per step
RAW_GRANULE = 4 * KiB            # zero blocks of this size become holes in a raw output
SOURCE_FORMATS = ("raw", "qcow2", "vdisk")
TARGET_FORMATS = ("vdisk", "raw", "qcow2")
DEFAULT_QCOW2_CLUSTER = 64 * KiB

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------- format detection
PROBE_SIZE = 512                 # BLOCK_PROBE_BUF_SIZE: how much of a file qemu's probes see


class RawProbeWarning(VdiskWarning):
    """A source of unspecified format read as raw because nothing else matched (as qemu-img warns)."""


class NotCarriedOverWarning(VdiskWarning):
    """convert copied a vdisk image's content but not its snapshots or consumers (vdisk.clone keeps snapshots)."""


def _vmdk_descriptor(head: bytes) -> bool:
    """A VMDK text descriptor (reference: vmdk_probe): blank lines and '#'
    comments, then a line 'version=1', '2' or '3'."""
    p, end = 0, len(head)
    while p < end:
        c = head[p:p + 1]
        if c == b"#":
            nl = head.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if c == b" ":
            while p < end and head[p:p + 1] == b" ":
                p += 1
            if head[p:p + 1] == b"\r":
                p += 1
            if p == end or head[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        return any(head.startswith(b"version=%d%s" % (v, eol), p) for v in (1, 2, 3) for eol in (b"\n", b"\r\n"))
    return False


_CLOOP_V2 = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
_BOCHS_MAGIC = b"Bochs Virtual HD Image"

# formats qemu-img reads and vdisk does not, known by their first PROBE_SIZE bytes: (name, what it is, test)
# (references: the *_probe functions of qemu's block/*.c drivers)
FOREIGN_FORMATS = (
    ("vmdk", "a VMDK sparse extent", lambda h: h[:4] in (b"KDMV", b"COWD")),
    ("vmdk", "a VMDK descriptor file", _vmdk_descriptor),
    ("vpc", "a VHD (vpc) image", lambda h: h[:8] == b"conectix"),
    ("vhdx", "a VHDX image", lambda h: h[:8] == b"vhdxfile"),
    ("vdi", "a VirtualBox VDI image", lambda h: h[64:68] == b"\x7f\x10\xda\xbe"),
    ("qed", "a QED image", lambda h: h[:4] == b"QED\0"),
    ("luks", "a LUKS encrypted volume", lambda h: h[:6] == b"LUKS\xba\xbe"),
    ("parallels", "a Parallels image", lambda h: h[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt")
     and h[16:20] == b"\2\0\0\0"),
    ("bochs", "a Bochs image", lambda h: h[:len(_BOCHS_MAGIC) + 1] == _BOCHS_MAGIC + b"\0"
     and h[32:40] == b"Redolog\0"),
    ("cloop", "a cloop compressed image", lambda h: len(h) > 0 and h[:len(_CLOOP_V2)] == _CLOOP_V2[:len(h)]),
)
# ... and by their last 512 bytes (qemu probes neither: it reads a fixed VHD as raw, and a dmg by its name)
FOREIGN_TRAILERS = (
    ("vpc", "a fixed VHD (vpc) image (its footer ends the file)",
     lambda t: t[:8] == b"conectix" or t[1:9] == b"conectix"),
    ("dmg", "an Apple disk image (dmg: its koly trailer ends the file)", lambda t: t[:4] == b"koly"),
)


def probe_format(path) -> tuple[str, str]:
    """(format name, what it is) of the file at path, by its magic: "qcow2",
    "vdisk" (its magic in either header slot), one of the formats of
    :data:`FOREIGN_FORMATS` that qemu-img reads and vdisk does not, or
    "raw" when nothing matches."""
    path = os.fspath(path)
    fd = _open_source_fd(path)
    try:
        head = pread_fd(fd, max(PROBE_SIZE, L.SLOT_OFFSETS[1] + len(L.MAGIC)), 0, path)
        size = os.lseek(fd, 0, os.SEEK_END)
        tail = pread_fd(fd, 512, size - 512, path) if size >= 1024 else b""
    finally:
        os.close(fd)
    # qcow2 and vdisk first: vdi's signature (at 64) could sit in the body of their headers by chance
    if Q.probe(head):
        return "qcow2", "a qcow2 image"
    if any(head[o:o + len(L.MAGIC)] == L.MAGIC for o in L.SLOT_OFFSETS):
        return "vdisk", "a vdisk image"
    for name, what, test in FOREIGN_FORMATS:
        if test(head[:PROBE_SIZE]):
            return name, what
    # formats known by their last sector, tried after every magic at the start
    for name, what, test in FOREIGN_TRAILERS:
        if test(tail):
            return name, what
    return "raw", "a raw disk image"


def detect_format(path) -> str:
    """"qcow2", "vdisk", "raw", or the name of a foreign format (see :func:`probe_format`)."""
    return probe_format(path)[0]


def _detect_source(path: str, *, warn: bool = True, format_param: str | None = "src_format") -> str:
    """The format of a source whose format was not given: qcow2, vdisk or
    raw (then a RawProbeWarning when warn, as qemu-img warns); a foreign
    format is refused with UnsupportedFeatureError naming it and the ways out
    (format_param: the caller's parameter that insists on raw, named as a
    Param so that the command line says its flag; None for a backing file,
    whose format the overlay records)."""
    name, what = probe_format(path)
    if name not in SOURCE_FORMATS:
        insist: tuple[Part, ...] = (
            (", or record the backing format in the overlay (qemu-img rebase -u -F raw) to read the file's "
             "bytes as a raw disk",) if format_param is None else
            (", or pass ", Param(format_param, "raw"), " to read the file's bytes as a raw disk"))
        raise UnsupportedFeatureError.naming(
            f"{path}: {what} (format {name}), which vdisk does not read; convert it first with "
            f"'qemu-img convert -f {name} -O qcow2 {path} OUT.qcow2'", *insist)
    if name == "raw" and warn:
        warnings.warn(f"Image format was not specified for '{path}' and probing guessed raw.", RawProbeWarning,
                      stacklevel=4)
    return name


def _open_source_fd(path: str) -> int:
    """Open an input read-only: a regular file or a block device (never a
    FIFO or socket, whose open or read could block forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NoSuchFileError(path) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidArgumentError(f"{path}: not a regular file or block device")
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


# ---------------------------------------------------------------------------- sources
class RawImage:
    """A raw image (regular file or block device), read-only.

    ``extents`` reports SEEK_HOLE holes as zeros, so they are never read.
    """

    format = "raw"

    def __init__(self, path):
        self.path = os.fspath(path)
        self._fd = _open_source_fd(self.path)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)     # st_size is 0 for a block device
        self._host = Q._HostMap(self._fd, self.size)

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        end = self.size if end is None else min(end, self.size)
        pos = start
        while pos < end:
            is_data, until = self._host.segment(pos)
            n = min(end, until) - pos
            yield pos, n, is_data
            pos += n

    def readinto(self, buf, offset: int) -> int:
        return preadinto_fd(self._fd, buf, offset, self.path)     # the file shrank under us: zeros

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class VdiskImage:
    """A vdisk image, or one of its snapshots, read-only."""

    format = "vdisk"

    def __init__(self, path, snapshot: str | None = None):
        self.path = os.fspath(path)
        if snapshot is not None and not hasattr(Disk, "open_snapshot"):
            raise UnsupportedFeatureError(f"snapshots: this build of vdisk cannot read snapshots "
                                          f"(asked for snapshot {snapshot!r} of {self.path})")
        self._disk = _open(self.path, "r")
        self._snap = None
        try:
            if snapshot is not None:
                self._snap = self._disk.open_snapshot(snapshot)
        except BaseException:
            self._disk.close()
            raise
        view = self._snap if self._snap is not None else self._disk
        self._view = view
        #: what a copy of the content leaves behind: the image's snapshots (not backup's temporary ones)
        #: and consumers; nothing when the source is one snapshot
        self.not_carried = (0, 0) if self._snap is not None else (
            sum(not is_backup_snapshot(i.name) for i in self._disk.snapshots), len(self._disk.consumers))
        self.size = view.size
        self.block_size = view.block_size

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        end = self.size if end is None else min(end, self.size)
        pos = start
        for off, length in self._view.map():
            lo, hi = max(off, start), min(off + length, end)
            if hi <= lo:
                if off >= end:
                    break
                continue
            if lo > pos:
                yield pos, lo - pos, False
            yield lo, hi - lo, True
            pos = hi
        if pos < end:
            yield pos, end - pos, False

    def readinto(self, buf, offset: int) -> int:
        return self._view.preadinto(buf, offset)

    def close(self) -> None:
        if self._snap is not None and hasattr(self._snap, "close"):
            self._snap.close()
        self._snap = None
        self._disk.close()


def open_image(path, fmt: str | None = None, *, allow_backing=False, snapshot: str | None = None,
               chain: tuple[str, ...] = (), warn_raw: bool = True, format_param: str | None = "src_format"):
    """An image opened for reading: RawImage, VdiskImage or qcow2.Qcow2Image.

    fmt None detects qcow2 and vdisk by their magic and refuses the formats
    qemu-img reads and vdisk does not (UnsupportedFeatureError naming the
    format); anything else is raw, with a :class:`RawProbeWarning` unless
    warn_raw is False.
    """
    path = os.fspath(path)
    if fmt is not None and fmt not in SOURCE_FORMATS:
        raise InvalidArgumentError(f"unknown source format {fmt!r} (one of {', '.join(SOURCE_FORMATS)})")
    os.close(_open_source_fd(path))         # exists, and is not a FIFO or socket whose open would block
    fmt = fmt or _detect_source(path, warn=warn_raw, format_param=format_param)
    if snapshot is not None and fmt != "vdisk":
        raise InvalidArgumentError.naming(f"{path}: ", Param("snapshot", snapshot),
                                          f" picks a vdisk snapshot, but the image is {fmt}")
    if fmt == "vdisk":
        return VdiskImage(path, snapshot)
    if fmt == "qcow2":
        return Q.Qcow2Image(path, allow_backing=allow_backing, open_backing=open_backing, chain=chain)
    return RawImage(path)


def open_backing(path: str, fmt: str | None, chain: tuple[str, ...], named_by_image: bool):
    """A backing file in a chain (qcow2.Qcow2Image's open_backing): its own
    backing files follow the relative-name rule.

    fmt is the format the overlay records ("raw" or "qcow2"), or None.
    Without one, the file is probed as qemu probes it, except that a vdisk
    image the overlay names is refused: qemu, which does not know vdisk,
    would read its bytes as raw.  A backing file the caller chose
    (named_by_image False) is detected, vdisk included.
    """
    if fmt is None:
        fmt = _detect_source(path, warn=False, format_param=None)
        if fmt == "vdisk" and named_by_image:
            raise UnsupportedFeatureError(
                f"{path}: this backing file is a vdisk image, but the overlay records no backing format, so "
                f"qemu would read it as raw; record one (qemu-img rebase -u -F raw) or pass the backing file's "
                f"path explicitly (--backing) to read it as vdisk")
    return open_image(path, fmt, allow_backing=True, chain=chain)


# ---------------------------------------------------------------------------- runs
def _data_windows(extents, granule: int, size: int) -> Iterator[tuple[int, int]]:
    """The data runs of extents, widened to granule boundaries (clipped to
    size) and merged: whole output blocks, in order."""
    return _merge_runs((off - off % granule, min(size, -(-(off + length) // granule) * granule))
                       for off, length, data in extents if data and length > 0)


def _merge_runs(runs) -> Iterator[tuple[int, int]]:
    """Merge [lo, hi) runs sorted by lo: overlapping or touching runs become one."""
    cur_lo = cur_hi = -1
    for lo, hi in runs:
        if lo <= cur_hi:
            cur_hi = max(cur_hi, hi)
            continue
        if cur_hi > cur_lo:
            yield cur_lo, cur_hi
        cur_lo, cur_hi = lo, hi
    if cur_hi > cur_lo:
        yield cur_lo, cur_hi


def _nonzero_runs(view: np.ndarray, granule: int) -> list[tuple[int, int]]:
    """Byte ranges [a, b) of view made of granules that are not all zeros."""
    zero = _fast.zero_blocks(view, granule)
    if not len(zero):
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([1], zero, [1])).astype(np.int8)))
    n = len(view)
    return [(int(a) * granule, min(int(b) * granule, n)) for a, b in zip(edges[0::2], edges[1::2])]


class _Ticker:
    """Calls progress(done, total) as done grows; the last call is (total, total)."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total = progress, total
        self.step = max(BATCH, total // 4096)
        self.last = 0

    def __call__(self, done: int) -> None:
        if self.progress is not None and done - self.last >= self.step and done < self.total:
            self.last = done
            self.progress(done, self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total)


# ---------------------------------------------------------------------------- sinks
class _Writeback:
    """Start writeback of an output while it is being written.

    Every STEP bytes, POSIX_FADV_DONTNEED on the part written since the
    previous call (and the step before it, now written back) starts
    asynchronous writeback of its dirty pages and drops those already
    clean: the device works while the copy goes on, the final fsync has
    little left to do, and a large conversion does not flood the page
    cache.  It changes no ordering: the sink's own fsyncs still decide what
    is durable when.

    ``appending``: the output grows at its end (vdisk, qcow2), so the file
    size tells how far it was written; else (raw) the guest offsets do.
    """

    STEP = 32 * MiB

    def __init__(self, path: str, appending: bool):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.appending = appending
        self.pending = 0
        self.high = 0            # how far the output is written
        self.done_to = 0         # DONTNEED was asked for up to here
        # the call itself submits the I/O (milliseconds): a thread makes it, off the copy's path
        self._ranges: queue.Queue = queue.Queue()
        self._thread = None
        if hasattr(os, "posix_fadvise"):
            self._thread = threading.Thread(target=self._run, name="vdisk-convert-writeback", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._ranges.get()
            if item is None:
                return
            try:
                os.posix_fadvise(self.fd, item[0], item[1], os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def wrote(self, offset: int, nbytes: int) -> None:
        self.pending += nbytes
        if not self.appending:
            self.high = max(self.high, offset + nbytes)
        if self.pending >= self.STEP and self._thread is not None:
            self.pending = 0
            end = os.fstat(self.fd).st_size if self.appending else self.high
            start = max(0, self.done_to - self.STEP)
            if end > start:
                self._ranges.put((start, end - start))
            self.done_to = end

    def close(self) -> None:
        if self._thread is not None:
            self._ranges.put(None)
            self._thread.join()
            self._thread = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _VdiskSink:
    def __init__(self, path: str, size: int, block_size):
        self.disk = _create(path, size, block_size=block_size, overwrite=True)
        self.granule = self.disk.block_size
        self.writeback = _Writeback(path, appending=True)

    def write(self, view, offset: int) -> None:
        self.disk.pwrite(view, offset)
        self.writeback.wrote(offset, len(view))

    def finish(self) -> None:
        self.disk.close()             # flushes and syncs
        self.writeback.close()

    def abort(self) -> None:
        self.writeback.close()
        try:
            self.disk.close()
        except Exception:
            pass


class _FdSink:
    """A sink writing a new host file by descriptor, synced and closed at finish."""

    def __init__(self, path: str, appending: bool):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        self.writeback = _Writeback(path, appending=appending)

    def _complete(self) -> None:
        """Whatever the format writes last, before the sync."""

    def finish(self) -> None:
        self._complete()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.writeback.close()

    def abort(self) -> None:
        self.writeback.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _RawSink(_FdSink):
    def __init__(self, path: str, size: int):
        super().__init__(path, appending=False)
        os.ftruncate(self.fd, size)
        self.granule = RAW_GRANULE

    def write(self, view, offset: int) -> None:
        pwrite_all(self.fd, view, offset)
        self.writeback.wrote(offset, len(view))


class _Qcow2Sink(_FdSink):
    def __init__(self, path: str, size: int, cluster_size: int):
        super().__init__(path, appending=True)
        try:
            self.writer = Q.Qcow2Writer(self.fd, size, cluster_size)
        except BaseException:
            self.abort()
            raise
        self.granule = cluster_size

    def write(self, view, offset: int) -> None:
        self.writer.write(view, offset)
        self.writeback.wrote(offset, len(view))

    def _complete(self) -> None:
        self.writer.finish()


# ---------------------------------------------------------------------------- output errors
def _check_output_path(dst: str) -> None:
    """Refuse an output path that cannot be written, naming it (before any
    temporary file beside it is made)."""
    if os.path.isdir(dst):
        raise InvalidArgumentError(f"{dst} is a directory")
    directory = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.lexists(directory) else "does not exist"
        raise NoSuchFileError(dst, f"directory {directory} {what}")


def _output_error(dst: str, exc: OSError) -> VdiskIOError:
    """An I/O error of the output, said of the user's path dst (not of the
    temporary file it was building): ``dst: writing failed: <reason>``."""
    cause = exc.__cause__ if isinstance(exc, VdiskIOError) and isinstance(exc.__cause__, OSError) else exc
    return VdiskIOError(exc.errno, f"{dst}: writing the converted image failed: {cause.strerror or cause}")


class _NamedOutput:
    """A sink whose I/O errors name dst (see _output_error)."""

    def __init__(self, make, dst: str):
        self.dst = dst
        with self._naming():
            self.sink = make()
        self.granule = self.sink.granule

    @contextlib.contextmanager
    def _naming(self):
        try:
            yield
        except OSError as exc:
            raise _output_error(self.dst, exc) from exc

    def write(self, view, offset: int) -> None:
        with self._naming():
            self.sink.write(view, offset)

    def finish(self) -> None:
        with self._naming():
            self.sink.finish()

    def abort(self) -> None:
        self.sink.abort()


# ---------------------------------------------------------------------------- convert
def convert(src: PathArg, dst: PathArg, *, src_format: str | None = None, dst_format: str = "vdisk",
            block_size: SizeArg | None = None, snapshot: str | None = None,
            allow_backing: bool | PathArg = False, progress: Progress | None = None,
            overwrite: bool = False) -> None:
    """Copy the content of image src into a new image dst.

    A vdisk dst is a new image with its own identity (image uuid, tracking
    epoch): no change id of src is valid on it, and it holds no snapshots or
    consumers (vdisk.clone copies a vdisk image with its snapshots).

    src_format: "raw", "qcow2" or "vdisk"; None detects qcow2 and vdisk by
    their magic, refuses the formats qemu-img reads and vdisk does not
    (vmdk, vpc, vhdx, vdi, qed, luks, parallels, bochs, cloop, dmg:
    UnsupportedFeatureError naming the format and the way out) and reads
    anything else as raw, with a RawProbeWarning (so a raw disk whose first
    bytes look like another format's header is read as raw only when the
    caller says src_format="raw").

    dst_format: "vdisk" (default), "raw" or "qcow2".  block_size is the
    vdisk block size (default 64 KiB) or the qcow2 cluster size (default
    64 KiB, 512 B to 2 MiB); it must be None for raw output.  vdisk and
    qcow2 sizes are multiples of 512: a raw source whose size is not gets a
    virtual size rounded up to the next multiple of 512, the extra bytes
    reading as zeros (as qemu-img does); a qcow2 header size is rounded
    down, as qemu reads it.  A raw output has the source's
    exact size and is sparse: only non-zero 4 KiB blocks are written.  A
    qcow2 output is a version 3 image with 16-bit refcounts that
    ``qemu-img check`` finds clean (see vdisk.qcow2 and docs/CONVERT.md).

    snapshot: the name of a vdisk snapshot to convert instead of the
    image's current content (vdisk sources only; UnsupportedFeatureError
    when this build cannot read snapshots).

    allow_backing: a qcow2 source with a backing file is refused unless
    this is True (then only a relative name inside the image's folder is
    followed, down a chain of at most 16 images) or a path (that file is
    the backing file).  Images marked corrupt are always refused; there is
    no override.

    progress: a callable(done_bytes, total_bytes), called as the copy
    advances through the virtual size, last with done == total.

    overwrite: replace an existing dst (InvalidArgumentError otherwise).
    The output is built under a temporary name beside dst, synced, and
    renamed into place: a failed or interrupted conversion leaves dst as it
    was.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if dst_format not in TARGET_FORMATS:
        raise InvalidArgumentError(f"unknown target format {dst_format!r} (one of {', '.join(TARGET_FORMATS)})")
    if progress is not None and not callable(progress):
        raise InvalidArgumentError("progress must be a callable(done_bytes, total_bytes)")
    cluster_size = None
    if dst_format == "raw" and block_size is not None:
        raise InvalidArgumentError.naming(Param("block_size"), " applies to vdisk and qcow2 output, not raw")
    if dst_format == "qcow2":
        cluster_size = DEFAULT_QCOW2_CLUSTER if block_size is None else L.parse_size(block_size, "block_size")
        if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * MiB:
            raise InvalidArgumentError(f"qcow2 cluster size {cluster_size}: must be a power of two from 512 "
                                       f"bytes to 2 MiB")
    if os.path.lexists(dst):
        if not overwrite:
            raise InvalidArgumentError.naming(f"{dst} exists (", *TO_REPLACE, ")")
        if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
            raise InvalidArgumentError(f"{dst} is the source image itself")
    _check_output_path(dst)
    from .live import refused_if_served
    with refused_if_served("convert", src, allow_backing):
        image = open_image(src, src_format, allow_backing=allow_backing, snapshot=snapshot)
    try:
        size = image.size if dst_format == "raw" else L.round_up(image.size, L.SECTOR)
        with atomic_output(dst, overwrite=overwrite, what="converting",
                           placing_error=lambda exc: _output_error(dst, exc)) as tmp:
            _convert_into(image, tmp, dst, dst_format, size, block_size, cluster_size, progress)
        _warn_not_carried(image, src, dst_format)
    finally:
        image.close()


def _warn_not_carried(image, src: str, dst_format: str) -> None:
    """A NotCarriedOverWarning when a vdisk source had snapshots or consumers the output lacks."""
    nsnap, ncons = getattr(image, "not_carried", (0, 0))
    if not nsnap and not ncons:
        return
    what = " and ".join(f"{n} {word}{'' if n == 1 else 's'}"
                        for n, word in ((nsnap, "snapshot"), (ncons, "consumer")) if n)
    keep = " (clone copies a vdisk image with its snapshots)" if nsnap and dst_format == "vdisk" else ""
    warnings.warn(f"{src} has {what}, which convert does not carry over: the output holds the current "
                  f"content only{keep}", NotCarriedOverWarning, stacklevel=3)


def _convert_into(image, tmp: str, dst: str, dst_format: str, size: int, block_size, cluster_size, progress) -> None:
    """Copy image into a new file tmp of dst_format (synced at the end); errors name dst."""
    if dst_format == "vdisk":
        sink = _NamedOutput(lambda: _VdiskSink(tmp, size, "64KiB" if block_size is None else block_size),
                            dst)
    elif dst_format == "raw":
        sink = _NamedOutput(lambda: _RawSink(tmp, size), dst)
    else:
        sink = _NamedOutput(lambda: _Qcow2Sink(tmp, size, cluster_size), dst)
    try:
        _copy(image, sink, _Ticker(progress, image.size))
        sink.finish()
    except BaseException:
        sink.abort()
        raise


def _copy(image, sink, tick: _Ticker) -> None:
    """Stream the data of image into sink.

    A reader thread fills one of three batch buffers while this thread
    zero-checks and writes the previous one (reads and writes overlap;
    os.pread/os.pwrite release the GIL).  The queue holds one batch: when
    the reader fills buffer k, this thread has taken batch k-1, so it is
    done with batch k-3, which used the same buffer.
    """
    g = sink.granule
    batch = max(BATCH - BATCH % g, g)
    total = image.size
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            bufs = [np.empty(batch, dtype=np.uint8) for _ in range(3)]
            k, fill, segs = 0, 0, []
            readv = getattr(image, "readv", None)

            def send():
                if readv is not None:            # one call for the batch: parallel decompression
                    buf = bufs[k % 3]
                    readv([(buf[at:at + n], pos) for pos, at, n in segs])
                q.put((bufs[k % 3], segs))

            for lo, hi in _data_windows(image.extents(0, total), g, total):
                pos = lo
                while pos < hi:
                    if stop.is_set():
                        return
                    n = min(batch - fill, hi - pos)
                    if readv is None:
                        image.readinto(bufs[k % 3][fill:fill + n], pos)
                    segs.append((pos, fill, n))
                    fill += n
                    pos += n
                    if fill == batch or len(segs) >= 256:
                        send()
                        k, fill, segs = k + 1, 0, []
            if segs:
                send()
            q.put(None)
        except BaseException as exc:        # handed to the writing thread, raised there
            q.put(exc)

    reader = threading.Thread(target=produce, name="vdisk-convert-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            buf, segs = item
            for pos, at, n in segs:
                view = buf[at:at + n]
                for a, b in _nonzero_runs(view, g):
                    sink.write(view[a:b], pos + a)
                tick(pos + n)
    finally:
        stop.set()
        while reader.is_alive():            # unblock a reader waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            reader.join(0.05)
    tick.finish()


def compare(a: PathArg, b: PathArg, *, a_format: str | None = None, b_format: str | None = None,
            allow_backing: bool = False, progress: Progress | None = None) -> int | None:
    """The offset of the first byte where images a and b differ, or None
    when they read the same.

    Formats as for :func:`convert` (None detects).  Images of different
    sizes are identical when the larger one reads as zeros past the end of
    the smaller one (qemu-img compare without --strict).  Only the data
    runs of either image are read.  (``vdisk compare`` prints this offset
    rounded down to 512 bytes, as qemu-img compare does.)
    """
    from .live import refused_if_served
    with refused_if_served("compare", a, b):
        return compare_images(a, b, a_format=a_format, b_format=b_format, allow_backing=allow_backing,
                              progress=progress)[0]


def compare_images(a, b, *, a_format=None, b_format=None, allow_backing=False,
                   progress=None) -> tuple[int | None, int, int]:
    """(first differing offset or None, size of a, size of b)."""
    ia = open_image(a, a_format, allow_backing=allow_backing, format_param="a_format")
    try:
        ib = open_image(b, b_format, allow_backing=allow_backing, format_param="b_format")
        try:
            return _compare(ia, ib, progress), ia.size, ib.size
        finally:
            ib.close()
    finally:
        ia.close()


def _merged_data_runs(*images) -> Iterator[tuple[int, int]]:
    """[lo, hi) runs where any of images may hold data, in order, merged."""
    streams = [((off, off + n) for off, n, data in img.extents(0, img.size) if data) for img in images]
    return _merge_runs(heapq.merge(*streams))


def _compare(ia, ib, progress) -> int | None:
    total = max(ia.size, ib.size)
    tick = _Ticker(progress, total)
    bufa = np.empty(BATCH, dtype=np.uint8)
    bufb = np.empty(BATCH, dtype=np.uint8)
    for lo, hi in _merged_data_runs(ia, ib):
        tick(lo)
        pos = lo
        while pos < hi:
            n = min(BATCH, hi - pos)
            for img, buf in ((ia, bufa), (ib, bufb)):
                inside = max(0, min(n, img.size - pos))
                if inside:
                    img.readinto(buf[:inside], pos)
                buf[inside:n] = 0
            d = _fast.first_difference(bufa[:n], bufb[:n])
            if d >= 0:
                return pos + d
            pos += n
            tick(pos)
    tick.finish()
    return None


# ---------------------------------------------------------------------------- info and map
def image_info(path, fmt=None, *, allow_backing=False) -> dict:
    """What ``qemu-img info`` tells of a raw, qcow2 or vdisk image.

    Keys: ``filename``, ``format`` ("raw", "qcow2" or "vdisk"; detected
    when fmt is None, a foreign format refused as by :func:`convert`; no
    RawProbeWarning: the answer names the format), ``virtual_size`` (bytes,
    as the image is read: a qcow2 size rounded down to 512),
    ``actual_size`` (bytes the file occupies on the host, st_blocks * 512,
    qemu's "disk size"), ``cluster_size`` (qcow2 cluster, vdisk block, None
    for raw), ``data_bytes`` (bytes of the virtual disk that may hold data:
    the ``data`` extents of :func:`image_map`), and for qcow2 ``qcow2``:
    the reader's header summary (version, compression type, refcount bits,
    dirty, snapshots, extended L2, backing file).
    """
    path = os.fspath(path)
    image = open_image(path, fmt, allow_backing=allow_backing, warn_raw=False)
    try:
        st = os.stat(path)
        cluster = getattr(image, "cluster_size", None) or getattr(image, "block_size", None)
        out = {"filename": path, "format": image.format, "virtual_size": image.size,
               "actual_size": st.st_blocks * 512, "cluster_size": cluster,
               "data_bytes": sum(n for _o, n, data in image.extents(0, image.size) if data)}
        if image.format == "qcow2":
            q = image.info()
            out["qcow2"] = {k: q[k] for k in ("version", "compression_type", "refcount_bits", "dirty", "snapshots",
                                               "extended_l2", "backing_file")}
        return out
    finally:
        image.close()


def image_map(path, fmt=None, *, allow_backing=False) -> list[dict]:
    """The extents of an image, as ``qemu-img map --output=json`` lists
    them: ``{"start", "length", "data", "zero"}`` dicts covering the whole
    virtual size in order, adjacent extents of the same kind merged.
    ``data`` True: the range may hold data (a qcow2 data or compressed
    cluster whose host bytes are not a hole, a vdisk block that is
    allocated, a raw range that SEEK_DATA finds); False: it reads as zeros
    (``zero`` True) and is never read by convert or compare."""
    image = open_image(path, fmt, allow_backing=allow_backing, warn_raw=False)
    try:
        out: list[dict] = []
        for off, n, data in image.extents(0, image.size):
            if out and out[-1]["data"] == data and out[-1]["start"] + out[-1]["length"] == off:
                out[-1]["length"] += n
            else:
                out.append({"start": off, "length": n, "data": data, "zero": not data})
        return out
    finally:
        image.close()
