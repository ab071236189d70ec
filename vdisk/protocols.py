"""The two interfaces of whole-image operations: an image read, an image written.

Every operation that copies or compares guest content (convert, compare,
info, map, restore) speaks to its input through :class:`ImageReader` and
to its output through :class:`ImageSink`, whatever the format: raw and
qcow2 readers and sinks live in :mod:`vdisk.sources` and :mod:`vdisk.sinks`
(the qcow2 structures in :mod:`vdisk.qcow2`), the vdisk ones wrap a
:class:`vdisk.Disk`.  The operation owns the policy (what to copy, in what
order, progress); the reader and the sink own the format and the host I/O.

The contract of a reader
------------------------
* It is opened once, by descriptor, and that descriptor is checked with
  fstat to be a regular file or block device before anything is read
  (:func:`vdisk.fileio.open_regular`): a FIFO, socket or directory is
  refused without a wait.  A vdisk input is a Disk opened "r" (shared lock).
* ``size`` is the virtual size in bytes, fixed while the reader is open.
* ``extents(start, end)`` yields ``(offset, length, data)`` runs covering
  ``[start, min(end, size))`` in order, without gaps: ``data`` False
  promises the run reads as zeros (a hole, an unallocated or zero
  cluster or block), so it is never read; True means it may hold data.
* ``readinto(buf, offset)`` fills all of ``buf`` with the guest bytes at
  ``offset`` (the range inside ``size``) and returns ``len(buf)``;
  ``readv(pieces)`` does the same for several ``(buf, offset)`` pieces at
  once (a qcow2 reader decompresses their clusters together, in threads).
* Host I/O errors raise :class:`vdisk.VdiskIOError` naming the input's
  path; a damaged or hostile input raises :class:`vdisk.CorruptImageError`
  (or another :class:`vdisk.VdiskError`) naming the path and the place.
  Memory stays bounded whatever the input claims.
* ``close()`` releases the descriptor (and a backing chain); it may be
  called twice.

The contract of a sink
----------------------
* It writes into a file it was handed open (a :class:`vdisk.fileio.FileIO`
  or a Disk): it never opens, renames or removes files itself, so the
  caller decides where the output lives (a temporary name under
  :func:`vdisk.fileio.atomic_output`, or an existing target).
* ``granule``: the unit the sink allocates in (a raw file's 4 KiB, a qcow2
  cluster, a vdisk block); the caller hands over data in runs whose ends
  are multiples of it (except at the end of the disk).
* ``write(data, offset)`` makes ``[offset, offset + len(data))`` read as
  data.  A *fresh* sink (a new, empty output) allocates nothing for a
  granule of zeros: it stays a hole, an unallocated cluster or block.
  A fresh qcow2 sink takes writes in increasing offset order only (the
  sink writing into an existing qcow2 image takes them in any order).
* ``zero(offset, length)`` makes the range read as zeros (nothing to do
  on a fresh sink).
* ``finish()`` writes what the format writes last and syncs the output
  (``fsync``): once it returns, the content is durable.  ``abort()``
  stops without syncing (the caller removes or keeps the file).
* Host I/O errors raise :class:`vdisk.VdiskIOError` (through FileIO: a
  failed fsync poisons the file, nothing later pretends to succeed).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from ._types import ByteBuffer, BytesOut

Extent = tuple[int, int, bool]          # (offset, length, data)


@runtime_checkable
class ImageReader(Protocol):
    """An input image, read-only (see the module docstring)."""

    format: str        #: "raw", "qcow2" or "vdisk"
    path: str          #: the path the user named
    size: int          #: the virtual size in bytes

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """(offset, length, data) runs covering [start, end) in order; data False reads as zeros."""
        ...

    def readinto(self, buf: BytesOut, offset: int) -> int:
        """Fill buf with the guest bytes at offset; returns len(buf)."""
        ...

    def readv(self, pieces: Sequence[tuple[BytesOut, int]]) -> None:
        """readinto for each (buf, offset) piece, in one go."""
        ...

    def close(self) -> None:
        """Release the input (twice is harmless)."""
        ...


@runtime_checkable
class ImageSink(Protocol):
    """An output image being written (see the module docstring)."""

    granule: int       #: the allocation unit in bytes

    def write(self, data: ByteBuffer, offset: int) -> None:
        """The range reads as data (zero granules of a fresh sink stay unallocated)."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """The range reads as zeros."""
        ...

    def finish(self) -> None:
        """Complete the format and fsync: the output is durable."""
        ...

    def abort(self) -> None:
        """Stop without syncing; the caller disposes of the file."""
        ...
