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
import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Union

import numpy as np

from . import _fast
from . import layout as L
from .disk import create as _create
from .disk import open as _open
from .errors import InvalidArgumentError, VdiskWarning
from .errors import TO_REPLACE, NoSuchFileError, Param, VdiskIOError
from ._types import PathArg, SizeArg
from .fileio import QEMU_PERM_ALL, QEMU_PERM_RESIZE, QEMU_PERM_WRITE, FileIO, atomic_output, open_regular, qemu_lock
from .protocols import ImageReader, ImageSink
from .snapshots import is_backup_snapshot
from .sinks import RAW_GRANULE as RAW_GRANULE, Qcow2Sink, Qcow2UpdateSink, RawSink, VdiskSink, Writeback
from .qcow2 import Qcow2Image
# convert's names since before sources.py (kept: the API is a contract)
from .sources import FOREIGN_FORMATS as FOREIGN_FORMATS, FOREIGN_TRAILERS as FOREIGN_TRAILERS
from .sources import PROBE_SIZE as PROBE_SIZE, SOURCE_FORMATS as SOURCE_FORMATS
from .sources import RawImage as RawImage, RawProbeWarning as RawProbeWarning, VdiskImage as VdiskImage
from .sources import detect_format as detect_format, open_backing as open_backing, open_image as open_image
from .sources import probe_format as probe_format

KiB, MiB = 1 << 10, 1 << 20
BATCH = 8 * MiB                  # bytes read and written per step
TARGET_FORMATS = ("vdisk", "raw", "qcow2")
DEFAULT_QCOW2_CLUSTER = 64 * KiB

Progress = Callable[[int, int], None]

if TYPE_CHECKING:
    from ._types import ByteBuffer
    from .disk import Disk
    from .protocols import Extent

#: what a batch of the copy holds: (guest offset, offset in the buffer or -1 for zeros, length)
Segment = tuple[int, int, int]
#: what the reader thread hands the writer: a filled batch, the end, or the reader's error
_Item = Union["tuple[np.ndarray[Any, np.dtype[np.uint8]], list[Segment]]", None, BaseException]


# ---------------------------------------------------------------------------- runs
def _data_windows(extents: Iterable[Extent], granule: int, size: int) -> Iterator[tuple[int, int]]:
    """The data runs of extents, widened to granule boundaries (clipped to
    size) and merged: whole output blocks, in order."""
    return _merge_runs((off - off % granule, min(size, -(-(off + length) // granule) * granule))
                       for off, length, data in extents if data and length > 0)


def _merge_runs(runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
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


@contextlib.contextmanager
def _output_errors(dst: str) -> Iterator[None]:
    """OSErrors (VdiskIOError included) of the output, said of dst."""
    try:
        yield
    except OSError as exc:
        raise _output_error(dst, exc) from exc


class _NamedOutput:
    """A sink whose I/O errors name dst (see _output_error); the source's
    errors, raised by the reader, keep naming the source."""

    def __init__(self, sink: ImageSink, dst: str):
        self.sink, self.dst = sink, dst
        self.granule = sink.granule

    def write(self, view: ByteBuffer, offset: int) -> None:
        with _output_errors(self.dst):
            self.sink.write(view, offset)

    def zero(self, offset: int, length: int) -> None:
        with _output_errors(self.dst):
            self.sink.zero(offset, length)

    def finish(self) -> None:
        with _output_errors(self.dst):
            self.sink.finish()

    def abort(self) -> None:
        self.sink.abort()


# ---------------------------------------------------------------------------- convert
def convert(src: PathArg, dst: PathArg, *, src_format: str | None = None, dst_format: str = "vdisk",
            block_size: SizeArg | None = None, snapshot: str | None = None,
            allow_backing: bool | PathArg = False, progress: Progress | None = None,
            overwrite: bool = False, existing: bool = False) -> None:
    """Copy the content of image src into a new image dst.

    A vdisk dst is a new image with its own identity (image uuid, tracking
    epoch): no change id of src is valid on it, and it holds no consumers
    (vdisk.clone copies a vdisk image with its snapshots).  A qcow2 src's
    internal snapshots become vdisk snapshots of the same names, each with
    the snapshot's content, oldest first, when dst is a new vdisk image and
    no snapshot is picked; otherwise, and for a vdisk src's snapshots and
    consumers, a :class:`NotCarriedWarning` says what is left behind.

    existing=True (``convert -n``, as qemu-img's -n): dst is an existing
    raw, qcow2 (version 3) or vdisk image (dst_format says which), at least
    as large as src, written in place: every range of src is written into
    it (what src reads as zeros is discarded or zeroed; zero clusters in a
    qcow2 dst), the rest of dst is left as it is.  A vdisk dst keeps its
    identity and its change tracking marks every block written.  A qcow2
    dst keeps its internal snapshots and options; one with a backing file,
    an external data file, encryption, extended L2 entries, persistent
    dirty bitmaps, the dirty or corrupt bit, or version 2 is refused
    (vdisk.qcow2.updater).  No temporary file: an interrupted conversion
    leaves dst part written (a qcow2 dst: each cluster old or new, and at
    most leaked clusters).

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
    if os.path.lexists(dst) and not existing:
        if not overwrite:
            raise InvalidArgumentError.naming(f"{dst} exists (", *TO_REPLACE, ")")
        if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
            raise InvalidArgumentError(f"{dst} is the source image itself")
    _check_output_path(dst)
    from .live import refused_if_served
    with refused_if_served("convert", src):
        image = open_image(src, src_format, allow_backing=allow_backing, snapshot=snapshot)
    try:
        carry = dst_format == "vdisk" and not existing and image.format == "qcow2" and snapshot is None
        if existing:
            _convert_onto(image, dst, dst_format, progress)
        else:
            size = image.size if dst_format == "raw" else L.round_up(image.size, L.SECTOR)
            with atomic_output(dst, overwrite=overwrite, what="converting",
                               placing_error=lambda exc: _output_error(dst, exc)) as tmp:
                _convert_into(image, tmp, dst, dst_format, size, block_size, cluster_size, progress, carry)
        _warn_not_carried(image, carry, one_snapshot=snapshot is not None)      # once the conversion is done (a failure says only what failed)
    finally:
        image.close()


class NotCarriedWarning(VdiskWarning):
    """A conversion leaves snapshots (or consumers) of its source behind."""


NotCarriedOverWarning = NotCarriedWarning       # the name it had first


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _warn_not_carried(image: ImageReader, carry: bool, one_snapshot: bool) -> None:
    """What the output leaves behind, one warning line each (none for a vdisk source read at one
    chosen snapshot: the output is that snapshot)."""
    if isinstance(image, Qcow2Image) and image.snapshots and not carry:     # (format "qcow2")
        names = ", ".join(s.name for s in image.snapshots)
        warnings.warn(f"{image.path}: its {_count(len(image.snapshots), 'internal snapshot')} ({names}) "
                      f"{'is' if len(image.snapshots) == 1 else 'are'} not carried over (only a conversion of "
                      f"the whole image into a new vdisk image carries them)", NotCarriedWarning, stacklevel=3)
    if isinstance(image, VdiskImage) and not one_snapshot:                 # (format "vdisk")
        disk = image.disk
        snaps = [s.name for s in disk.snapshots if not is_backup_snapshot(s.name)]
        consumers = list(disk.consumers) if disk.track_changes else []
        if snaps or consumers:
            what = " and ".join(x for x in (f"{_count(len(snaps), 'snapshot')} ({', '.join(snaps)})" if snaps
                                            else "", _count(len(consumers), "consumer") if consumers else "") if x)
            warnings.warn(f"{image.path}: its {what} {'is' if len(snaps) + len(consumers) == 1 else 'are'} not "
                          f"carried over ('vdisk clone --snapshots' keeps the snapshots)", NotCarriedWarning,
                          stacklevel=3)


def _convert_onto(image: ImageReader, dst: str, dst_format: str, progress: Progress | None) -> None:
    """convert -n: write image into the existing raw, qcow2 or vdisk image dst."""
    if not os.path.lexists(dst):
        raise NoSuchFileError(dst, "no such file (writing into an existing image needs one)")
    if os.path.exists(dst) and os.path.samefile(image.path, dst):
        raise InvalidArgumentError(f"{dst} is the source image itself")
    if dst_format == "qcow2":
        _convert_onto_qcow2(image, dst, progress)
        return
    if dst_format == "vdisk":
        disk = _open(dst, "r+")
        try:
            _check_large_enough(dst, disk.size, image)
            sink: ImageSink = VdiskSink(disk, fresh=False)
            _copy_named(image, sink, dst, progress)
        finally:
            disk.close()
        return
    out = FileIO(dst, writable=True)
    try:
        out.lock(exclusive=True)
        _check_large_enough(dst, out.size(), image)
        _copy_named(image, RawSink(out, fresh=False, granule=RAW_GRANULE), dst, progress)
    finally:
        out.close()


def _convert_onto_qcow2(image: ImageReader, dst: str, progress: Progress | None) -> None:
    """convert -n into an existing qcow2 v3 image (vdisk.qcow2.updater; the write order in docs/CONVERT.md).
    The image is locked as qemu locks an image it writes (and flock'ed as vdisk's writers): a VM or
    qemu-img using it makes this fail, and qemu refuses it while it is being written."""
    out = FileIO(dst, writable=True)
    try:
        out.lock(exclusive=True)
        qemu_lock(out, QEMU_PERM_ALL, QEMU_PERM_WRITE | QEMU_PERM_RESIZE)
        sink = Qcow2UpdateSink(out)
        try:
            _check_large_enough(dst, sink.size, image)
            _copy_named(image, sink, dst, progress)
        finally:
            sink.close()
    finally:
        out.close()


def _check_large_enough(dst: str, size: int, image: ImageReader) -> None:
    if size < image.size:
        raise InvalidArgumentError(f"{dst}: {size} bytes, smaller than the source {image.path} ({image.size} bytes); "
                                   f"the target must be at least as large")


def _copy_named(image: ImageReader, sink: ImageSink, dst: str, progress: Progress | None) -> None:
    named = _NamedOutput(sink, dst)
    try:
        _copy(image, named, _Ticker(progress, image.size), fresh=False)
        named.finish()
    except BaseException:
        named.abort()
        raise


def _convert_into(image: ImageReader, tmp: str, dst: str, dst_format: str, size: int, block_size: SizeArg | None,
                  cluster_size: int | None, progress: Progress | None, carry: bool = False) -> None:
    """Copy image into a new file tmp of dst_format (synced at the end); errors name dst.
    carry: the qcow2 image's internal snapshots first, each a vdisk snapshot."""
    out: FileIO | None = None
    disk: Disk | None = None
    vsink: VdiskSink | None = None      # the sink of a vdisk output
    watch = -1                   # a descriptor of a vdisk output, for its writeback
    try:
        with _output_errors(dst):
            if dst_format == "vdisk":
                disk = _create(tmp, size, block_size="64KiB" if block_size is None else block_size, overwrite=True)
                watch = open_regular(tmp, os.O_RDONLY)
                vsink = VdiskSink(disk, fresh=True, writeback=Writeback(watch, appending=True))
                sink: ImageSink = vsink
            else:
                out = FileIO(tmp, writable=True, create=True)
                if dst_format == "raw":
                    out.truncate(size)
                    sink = RawSink(out, fresh=True, granule=RAW_GRANULE, writeback=Writeback(out.fd, appending=False))
                else:
                    sink = Qcow2Sink(out, size, DEFAULT_QCOW2_CLUSTER if cluster_size is None else cluster_size,  # (convert set it)
                                     writeback=Writeback(out.fd, appending=True))
        named = _NamedOutput(sink, dst)
        try:
            # carry: a qcow2 source (format "qcow2") into a vdisk output (disk and vsink)
            carrying = carry and isinstance(image, Qcow2Image) and bool(image.snapshots)
            if carrying and isinstance(image, Qcow2Image) and disk is not None and vsink is not None:
                _carry_snapshots(image, disk, vsink, named, dst)
            _copy(image, named, _Ticker(progress, image.size), fresh=not carrying)
            named.finish()
        except BaseException:
            named.abort()
            raise
        with _output_errors(dst):
            if disk is not None:
                d, disk = disk, None
                d.close()
    finally:
        with contextlib.suppress(Exception):
            if disk is not None:
                disk.close()
        if out is not None:
            out.close()
        if watch >= 0:
            os.close(watch)


def _carry_snapshots(image: Qcow2Image, disk: Disk, vsink: VdiskSink, sink: _NamedOutput, dst: str) -> None:
    """Each internal snapshot of the qcow2 image, oldest first, copied into
    disk and taken as a vdisk snapshot of its name; then the active layer
    is selected again (the caller copies it over, not fresh)."""
    active = L.round_up(image.size, L.SECTOR)
    for i, rec in enumerate(list(image.snapshots)):
        image.select(rec.id)
        with _output_errors(dst):
            size = L.round_up(image.size, L.SECTOR)
            if size != disk.size:
                disk.resize(size)
        vsink.fresh = i == 0             # the first layer goes into the empty image (vsink is sink.sink)
        _copy(image, sink, _Ticker(None, image.size), fresh=i == 0)
        with _output_errors(dst):
            disk.snapshot(rec.name)
    image.select(None)
    vsink.fresh = False
    with _output_errors(dst):
        if disk.size != active:
            disk.resize(active)


def _copy(image: ImageReader, sink: ImageSink | _NamedOutput, tick: _Ticker, fresh: bool = True) -> None:
    """Stream the data of image into sink; a sink that is not fresh also
    gets the ranges that read as zeros (sink.zero).

    A reader thread fills one of three batch buffers while this thread
    writes the previous one (reads and writes overlap; os.pread/os.pwrite
    release the GIL; the sink skips zero granules).  The queue holds one
    batch: when the reader fills buffer k, this thread has taken batch
    k-1, so it is done with batch k-3, which used the same buffer.
    """
    g = sink.granule
    batch = max(BATCH - BATCH % g, g)
    total = image.size
    q: queue.Queue[_Item] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            bufs = [np.empty(batch, dtype=np.uint8) for _ in range(3)]
            k, fill = 0, 0
            segs: list[Segment] = []
            done = 0                     # the copy has covered [0, done)

            def send() -> None:
                buf = bufs[k % 3]       # one call for the batch: parallel decompression
                image.readv([(buf[at:at + n], pos) for pos, at, n in segs if at >= 0])
                q.put((buf, segs))

            for lo, hi in _data_windows(image.extents(0, total), g, total):
                if not fresh and lo > done:
                    segs.append((done, -1, lo - done))       # reads as zeros
                pos = lo
                while pos < hi:
                    if stop.is_set():
                        return
                    n = min(batch - fill, hi - pos)
                    segs.append((pos, fill, n))
                    fill += n
                    pos += n
                    if fill == batch or len(segs) >= 256:
                        send()
                        k, fill, segs = k + 1, 0, []
                done = hi
            if not fresh and total > done:
                segs.append((done, -1, total - done))
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
                if at < 0:
                    sink.zero(pos, n)
                else:
                    sink.write(buf[at:at + n], pos)
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


def compare_images(a: PathArg, b: PathArg, *, a_format: str | None = None, b_format: str | None = None,
                   allow_backing: bool = False, progress: Progress | None = None) -> tuple[int | None, int, int]:
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


def _merged_data_runs(*images: ImageReader) -> Iterator[tuple[int, int]]:
    """[lo, hi) runs where any of images may hold data, in order, merged."""
    streams = [((off, off + n) for off, n, data in img.extents(0, img.size) if data) for img in images]
    return _merge_runs(heapq.merge(*streams))


def _compare(ia: ImageReader, ib: ImageReader, progress: Progress | None) -> int | None:
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
def image_info(path: PathArg, fmt: str | None = None, *, allow_backing: bool | PathArg = False) -> dict[str, Any]:
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
        out: dict[str, Any] = {"filename": path, "format": image.format, "virtual_size": image.size,
               "actual_size": st.st_blocks * 512, "cluster_size": cluster,
               "data_bytes": sum(n for _o, n, data in image.extents(0, image.size) if data)}
        if isinstance(image, Qcow2Image):          # (format "qcow2")
            q = image.info()
            out["qcow2"] = {k: q[k] for k in ("version", "compression_type", "refcount_bits", "dirty", "snapshots",
                                               "extended_l2", "backing_file")}
        return out
    finally:
        image.close()


def image_map(path: PathArg, fmt: str | None = None, *, allow_backing: bool | PathArg = False) -> list[dict[str, Any]]:
    """The extents of an image, as ``qemu-img map --output=json`` lists
    them: ``{"start", "length", "data", "zero"}`` dicts covering the whole
    virtual size in order, adjacent extents of the same kind merged.
    ``data`` True: the range may hold data (a qcow2 data or compressed
    cluster whose host bytes are not a hole, a vdisk block that is
    allocated, a raw range that SEEK_DATA finds); False: it reads as zeros
    (``zero`` True) and is never read by convert or compare."""
    image = open_image(path, fmt, allow_backing=allow_backing, warn_raw=False)
    try:
        out: list[dict[str, Any]] = []
        for off, n, data in image.extents(0, image.size):
            if out and out[-1]["data"] == data and out[-1]["start"] + out[-1]["length"] == off:
                out[-1]["length"] += n
            else:
                out.append({"start": off, "length": n, "data": data, "zero": not data})
        return out
    finally:
        image.close()
