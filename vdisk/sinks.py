"""Image outputs: the raw, qcow2 and vdisk sinks of convert and restore.

Every sink here is a :class:`vdisk.protocols.ImageSink` (the contract is
stated there).  A sink writes into a file it is handed open, a
:class:`vdisk.fileio.FileIO` (raw, qcow2) or a :class:`vdisk.Disk`, so
every host write and sync goes through the one I/O layer and its errors
are :class:`vdisk.VdiskIOError`; where the output lives (a temporary name
under :func:`vdisk.fileio.atomic_output`, or an existing target) is the
caller's business, and so is closing it.

A *fresh* sink writes a new, empty output: granules of zeros are never
allocated (holes in a raw file, unallocated qcow2 clusters and vdisk
blocks), and ``zero`` has nothing to do.  A sink that is not fresh writes
into an existing image (restore onto an earlier restore, ``convert -n``):
every byte handed over is written, and ``zero`` punches or zeroes (a
qcow2 image, :class:`Qcow2UpdateSink`: zero clusters).
"""
from __future__ import annotations

import os
import queue
import threading
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import _fast
from . import qcow2 as Q
from .fileio import FileIO, readable_buffer, start_writeback
from .qcow2.updater import Qcow2Updater

if TYPE_CHECKING:
    from ._types import ByteBuffer
    from .disk import Disk

KiB, MiB = 1 << 10, 1 << 20
RAW_GRANULE = 4 * KiB            # zero blocks of this size become holes in a fresh raw output
ZERO_CHUNK = 8 * MiB             # zeros written at a time where a hole cannot be punched


def nonzero_runs(view: ByteBuffer, granule: int) -> list[tuple[int, int]]:
    """Byte ranges [a, b) of view made of granules that are not all zeros."""
    flat = np.frombuffer(memoryview(readable_buffer(view)).cast("B"), dtype=np.uint8)
    zero = _fast.zero_blocks(flat, granule)
    if not len(zero):
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([1], zero, [1])).astype(np.int8)))
    n = len(flat)
    return [(int(a) * granule, min(int(b) * granule, n)) for a, b in zip(edges[0::2], edges[1::2])]


# ---------------------------------------------------------------------------- writeback
class WritebackPolicy(Protocol):
    """What a sink tells of its writes (Writeback, RangeWriteback, NoWriteback)."""
    def wrote(self, offset: int, nbytes: int) -> None: ...
    def close(self) -> None: ...


class Writeback:
    """Start writeback of an output while it is being written (convert).

    Every STEP bytes, POSIX_FADV_DONTNEED on the part written since the
    previous call (and the step before it, now written back) starts
    asynchronous writeback of its dirty pages and drops those already
    clean: the device works while the copy goes on, the final fsync has
    little left to do, and a large conversion does not flood the page
    cache.  It changes no ordering: the sink's own fsyncs still decide what
    is durable when.  fd is the output's descriptor (not owned).

    ``appending``: the output grows at its end (vdisk, qcow2), so the file
    size tells how far it was written; else (raw) the guest offsets do.
    """

    STEP = 32 * MiB

    def __init__(self, fd: int, appending: bool):
        self.fd = fd
        self.appending = appending
        self.pending = 0
        self.high = 0            # how far the output is written
        self.done_to = 0         # DONTNEED was asked for up to here
        # the call itself submits the I/O (milliseconds): a thread makes it, off the copy's path
        self._ranges: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
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


class RangeWriteback:
    """Start writeback of each range as it is written (sync_file_range; restore)."""

    def __init__(self, fd: int):
        self.fd = fd

    def wrote(self, offset: int, nbytes: int) -> None:
        start_writeback(self.fd, offset, nbytes)

    def close(self) -> None:
        pass


class NoWriteback:
    def wrote(self, offset: int, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- sinks
class RawSink:
    """A raw file (regular or block device), written through FileIO."""

    def __init__(self, out: FileIO, *, fresh: bool, granule: int = RAW_GRANULE,
                 writeback: WritebackPolicy | None = None):
        self.out, self.fresh, self.granule = out, fresh, granule
        self.writeback = writeback or NoWriteback()

    def write(self, data: ByteBuffer, offset: int) -> None:
        if not self.fresh:
            self.out.pwrite(data, offset)
            self.writeback.wrote(offset, len(memoryview(readable_buffer(data)).cast("B")))
            return
        mv = memoryview(readable_buffer(data)).cast("B")
        for a, b in nonzero_runs(mv, self.granule):
            self.out.pwrite(mv[a:b], offset + a)
            self.writeback.wrote(offset + a, b - a)

    def zero(self, offset: int, length: int) -> None:
        if self.fresh or length <= 0:
            return
        if not self.out.punch_hole(offset, length):
            chunk = np.zeros(min(length, ZERO_CHUNK), np.uint8)
            for pos in range(offset, offset + length, len(chunk)):
                self.out.pwrite(chunk[:min(len(chunk), offset + length - pos)], pos)

    def finish(self) -> None:
        self.writeback.close()
        self.out.fsync()

    def abort(self) -> None:
        self.writeback.close()


class Qcow2Sink:
    """A new qcow2 image (vdisk.qcow2.Qcow2Writer) streamed into an empty FileIO, always fresh."""

    fresh = True

    def __init__(self, out: FileIO, size: int, cluster_size: int, writeback: WritebackPolicy | None = None):
        self.out = out
        self.writer = Q.Qcow2Writer(out, size, cluster_size)
        self.granule = cluster_size
        self.writeback = writeback or NoWriteback()

    def write(self, data: ByteBuffer, offset: int) -> None:
        mv = memoryview(readable_buffer(data)).cast("B")
        for a, b in nonzero_runs(mv, self.granule):
            self.writer.write(mv[a:b], offset + a)
            self.writeback.wrote(offset + a, b - a)

    def zero(self, offset: int, length: int) -> None:
        """Nothing to do: what is never written reads as zeros."""

    def finish(self) -> None:
        self.writer.finish()
        self.writeback.close()
        self.out.fsync()

    def abort(self) -> None:
        self.writeback.close()


class Qcow2UpdateSink:
    """An existing qcow2 image written in place (convert -n), through
    :class:`vdisk.qcow2.updater.Qcow2Updater`: never fresh, any write order;
    each range handed over is written into new clusters, zero ranges become
    zero clusters, and :meth:`finish` commits the tables in the updater's
    crash-safe order (its last step an fsync).  The caller opened out
    read-write and took the locks; it closes out after :meth:`close`."""

    fresh = False

    def __init__(self, out: FileIO, writeback: WritebackPolicy | None = None):
        self.out = out
        self.updater = Qcow2Updater(out)
        self.size = self.updater.size
        self.granule = self.updater.C
        self.writeback: WritebackPolicy = writeback or NoWriteback()

    def write(self, data: ByteBuffer, offset: int) -> None:
        self.updater.write(data, offset)
        self.writeback.wrote(offset, len(memoryview(readable_buffer(data)).cast("B")))

    def zero(self, offset: int, length: int) -> None:
        if length > 0:
            self.updater.zero(offset, length)

    def finish(self) -> None:
        self.updater.commit()
        self.writeback.close()

    def abort(self) -> None:
        """Stop: what was not committed stays unreferenced (leaked clusters, which qemu-img check -r leaks
        reclaims); every guest cluster reads as before or as after."""
        self.writeback.close()

    def close(self) -> None:
        self.updater.close()


class VdiskSink:
    """A vdisk image, written through its Disk (opened "r+" by the caller)."""

    def __init__(self, disk: Disk, *, fresh: bool, writeback: WritebackPolicy | None = None):
        self.disk, self.fresh = disk, fresh
        self.granule = disk.block_size
        self.writeback = writeback or NoWriteback()

    def write(self, data: ByteBuffer, offset: int) -> None:
        mv = memoryview(readable_buffer(data)).cast("B")
        runs = nonzero_runs(mv, self.granule) if self.fresh else [(0, len(mv))]
        for a, b in runs:
            self.disk.pwrite(mv[a:b], offset + a)
            self.writeback.wrote(offset + a, b - a)

    def zero(self, offset: int, length: int) -> None:
        if not self.fresh and length > 0:
            self.disk.discard(offset, length)

    def finish(self) -> None:
        self.writeback.close()
        self.disk.flush()

    def abort(self) -> None:
        self.writeback.close()
