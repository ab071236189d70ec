"""Image inputs: format detection and the readers of raw, qcow2 and vdisk images.

Every reader here is a :class:`vdisk.protocols.ImageReader` (the contract
is stated there).  :func:`open_image` opens the input once, by descriptor
(:func:`vdisk.fileio.open_input`: checked with fstat on that descriptor,
a FIFO or socket refused without a wait), probes its format on that
descriptor when none is given, and hands the descriptor to the reader:
:class:`RawImage`, :class:`VdiskImage` (a Disk opened "r" over it) or
:class:`vdisk.qcow2.Qcow2Image`.  A qcow2 reader opens backing files only
through the opener it is given, :func:`open_backing`, which applies the
same rules down the chain.

Formats qemu-img reads and vdisk does not are known by their magic and
refused (UnsupportedFeatureError naming the format and the way out); an
unrecognised input of unspecified format is read as raw with a
:class:`RawProbeWarning`, as qemu-img warns.
"""
from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Iterator, Sequence

from . import layout as L
from . import qcow2 as Q
from .disk import open as _open
from .errors import InvalidArgumentError, UnsupportedFeatureError, VdiskWarning
from .errors import Param, Part
from .fileio import FileIO, HostMap, open_input
from ._types import PathArg

if TYPE_CHECKING:
    from ._types import BytesOut
    from .disk import Disk
    from .protocols import ImageReader
    from .snapshots import Snapshot

SOURCE_FORMATS = ("raw", "qcow2", "vdisk")


# ---------------------------------------------------------------------------- format detection
PROBE_SIZE = 512                 # BLOCK_PROBE_BUF_SIZE: how much of a file qemu's probes see


class RawProbeWarning(VdiskWarning):
    """A source of unspecified format read as raw because nothing else matched (as qemu-img warns)."""


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


def probe_format(path: PathArg) -> tuple[str, str]:
    """(format name, what it is) of the file at path, by its magic: "qcow2",
    "vdisk" (its magic in either header slot), one of the formats of
    :data:`FOREIGN_FORMATS` that qemu-img reads and vdisk does not, or
    "raw" when nothing matches."""
    path = os.fspath(path)
    fio = FileIO.adopt(open_input(path), path)
    try:
        return _probe(fio)
    finally:
        fio.close()


def _probe(fio: FileIO) -> tuple[str, str]:
    """probe_format of an open input."""
    head = fio.pread(max(PROBE_SIZE, L.SLOT_OFFSETS[1] + len(L.MAGIC)), 0)
    size = os.lseek(fio.fd, 0, os.SEEK_END)
    tail = fio.pread(512, size - 512) if size >= 1024 else b""
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


def detect_format(path: PathArg) -> str:
    """"qcow2", "vdisk", "raw", or the name of a foreign format (see :func:`probe_format`)."""
    return probe_format(path)[0]


def _detect_source(fio: FileIO, *, warn: bool = True, format_param: str | None = "src_format") -> str:
    """The format of an open source whose format was not given: qcow2,
    vdisk or raw (then a RawProbeWarning when warn, as qemu-img warns); a
    foreign format is refused with UnsupportedFeatureError naming it and
    the ways out (format_param: the caller's parameter that insists on raw,
    named as a Param so that the command line says its flag; None for a
    backing file, whose format the overlay records)."""
    path = fio.path
    name, what = _probe(fio)
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


# ---------------------------------------------------------------------------- readers
class RawImage:
    """A raw image (regular file or block device), read-only.

    ``extents`` reports SEEK_HOLE holes as zeros, so they are never read.
    fd: the input opened by the caller (open_input), owned from here on.
    """

    format = "raw"

    def __init__(self, path: PathArg, fd: int | None = None):
        self.path = os.fspath(path)
        self._io = FileIO.adopt(open_input(self.path) if fd is None else fd, self.path)
        self.size = os.lseek(self._io.fd, 0, os.SEEK_END)     # st_size is 0 for a block device
        self._host = HostMap(self._io.fd, self.size)

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        end = self.size if end is None else min(end, self.size)
        pos = start
        while pos < end:
            is_data, until = self._host.segment(pos)
            n = min(end, until) - pos
            yield pos, n, is_data
            pos += n

    def readinto(self, buf: BytesOut, offset: int) -> int:
        return self._io.preadinto(buf, offset)     # the file shrank under us: zeros

    def readv(self, pieces: Sequence[tuple[BytesOut, int]]) -> None:
        for buf, offset in pieces:
            self.readinto(buf, offset)

    def close(self) -> None:
        self._io.close()


class VdiskImage:
    """A vdisk image, or one of its snapshots, read-only.  fd: the input
    opened by the caller (open_input), owned from here on: the Disk reads
    through it."""

    format = "vdisk"

    def __init__(self, path: PathArg, snapshot: str | None = None, fd: int | None = None):
        self.path = os.fspath(path)
        if fd is None:
            fd = open_input(self.path)
        adopted: list[FileIO] = []
        given = fd

        def over_fd(p: str, writable: bool) -> FileIO:
            adopted.append(FileIO.adopt(given, p, writable))
            return adopted[0]
        try:
            self._disk = _open(self.path, "r", io_factory=over_fd)
        except BaseException:
            if not adopted:             # refused before the Disk took the descriptor
                os.close(fd)
            raise
        self._snap: Snapshot | None = None
        try:
            if snapshot is not None:
                self._snap = self._disk.open_snapshot(snapshot)
        except BaseException:
            self._disk.close()
            raise
        view: Disk | Snapshot = self._snap if self._snap is not None else self._disk
        self._view = view
        self.size = view.size
        self.block_size = view.block_size

    @property
    def disk(self) -> Disk:
        """The Disk read (snapshots, consumers: what a conversion may carry over)."""
        return self._disk

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

    def readinto(self, buf: BytesOut, offset: int) -> int:
        return self._view.preadinto(buf, offset)

    def readv(self, pieces: Sequence[tuple[BytesOut, int]]) -> None:
        for buf, offset in pieces:
            self.readinto(buf, offset)

    def close(self) -> None:
        if self._snap is not None:
            self._snap.close()
        self._snap = None
        self._disk.close()


def open_image(path: PathArg, fmt: str | None = None, *, allow_backing: bool | PathArg = False,
               snapshot: str | None = None, chain: tuple[str, ...] = (), warn_raw: bool = True,
               probed_vdisk_ok: bool = True, format_param: str | None = "src_format") -> ImageReader:
    """An image opened for reading (a :class:`vdisk.protocols.ImageReader`):
    RawImage, VdiskImage or qcow2.Qcow2Image, over one descriptor.

    fmt None detects qcow2 and vdisk by their magic and refuses the formats
    qemu-img reads and vdisk does not (UnsupportedFeatureError naming the
    format); anything else is raw, with a :class:`RawProbeWarning` unless
    warn_raw is False.  snapshot: a vdisk snapshot, or a qcow2 internal
    snapshot (its name, else its id), read in place of the current
    content.  probed_vdisk_ok False (a backing file an overlay
    names without a format) refuses a vdisk image found by probing.
    format_param: the caller's parameter a refusal of a foreign format names
    (None: a backing file, whose format its overlay records).
    """
    path = os.fspath(path)
    if fmt is not None and fmt not in SOURCE_FORMATS:
        raise InvalidArgumentError(f"unknown source format {fmt!r} (one of {', '.join(SOURCE_FORMATS)})")
    fd = open_input(path)
    try:
        if fmt is None:
            fmt = _detect_source(FileIO.adopt(fd, path), warn=warn_raw, format_param=format_param)
            if fmt == "vdisk" and not probed_vdisk_ok:
                raise UnsupportedFeatureError(
                    f"{path}: this backing file is a vdisk image, but the overlay records no backing format, so "
                    f"qemu would read it as raw; record one (qemu-img rebase -u -F raw) or pass the backing "
                    f"file's path explicitly (--backing) to read it as vdisk")
        if snapshot is not None and fmt == "raw":
            raise InvalidArgumentError.naming(f"{path}: ", Param("snapshot", snapshot),
                                              f" picks a vdisk snapshot, but the image is {fmt}")
    except BaseException:
        os.close(fd)
        raise
    # from here the reader owns fd (and closes it if it fails)
    if fmt == "vdisk":
        return VdiskImage(path, snapshot, fd=fd)
    if fmt == "qcow2":
        return Q.Qcow2Image(path, fd=fd, allow_backing=allow_backing, open_backing=open_backing, chain=chain,
                            snapshot=snapshot)
    return RawImage(path, fd=fd)


def open_backing(path: str, fmt: str | None, chain: tuple[str, ...], named_by_image: bool) -> ImageReader:
    """A backing file in a chain (qcow2.Qcow2Image's open_backing): its own
    backing files follow the relative-name rule.

    fmt is the format the overlay records ("raw" or "qcow2"), or None.
    Without one, the file is probed as qemu probes it, except that a vdisk
    image the overlay names is refused: qemu, which does not know vdisk,
    would read its bytes as raw.  A backing file the caller chose
    (named_by_image False) is detected, vdisk included.
    """
    return open_image(path, fmt, allow_backing=True, chain=chain, warn_raw=False,
                      probed_vdisk_ok=fmt is not None or not named_by_image, format_param=None)
