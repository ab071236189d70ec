"""qcow2: the on-disk structures, a reader that treats every image as hostile, and a writer.

The layout follows qemu's docs/interop/qcow2.txt; helper names follow
qemu's block/qcow2*.c (``offset_to_l1_index``, ``get_cluster_type``, ...)
so code and spec can be read side by side.

Reader contract
---------------
:class:`Qcow2Image` reads the *active layer* of a version 2 or 3 image:
cluster sizes 512 B to 2 MiB; any refcount width (refcounts are never read:
a reader does not need them, and they are not trusted, dirty bit or not);
standard, zero (with or without an allocation), unallocated and compressed
clusters, deflate (raw zlib, window bits -12, as qemu) or zstd (with the
``zstandard`` package); extended L2 entries (32 subclusters per cluster);
preallocated images (host holes are found with SEEK_DATA and never read);
internal snapshots (the table is bounds-checked, then ignored); backing
files on request (see :func:`resolve_backing`).

Refused, each with an error naming the problem (table, index, offset):

* :class:`~vdisk.FormatError`: not qcow2 (no magic).
* :class:`~vdisk.UnsupportedFeatureError`: version other than 2 and 3,
  clusters over 2 MiB (``cluster_bits`` > 21), encryption (``crypt_method``
  != 0), an external data file (incompatible bit 2), unknown incompatible
  bits, a compression type other than zlib and zstd, zstd without the
  ``zstandard`` package, a backing file unless asked for, a backing chain
  deeper than :data:`MAX_BACKING_DEPTH`.
* :class:`~vdisk.CorruptImageError`: the corrupt bit (incompatible bit 1:
  qemu itself only opens such an image read-only for repair; this reader
  refuses it, there is no override), ``cluster_bits`` < 9, a header field
  out of range, a table larger than qemu's caps, a table or cluster that
  is unaligned, runs past the end of the file or overlaps the header, the
  L1 table, the refcount table or the snapshot table (those four are also
  checked pairwise), reserved bits set in an L1 or L2 entry, an invalid
  extended L2 bitmap, a compressed cluster that runs past the end of the
  file or decompresses to less than one cluster, a zstd cluster whose frame
  does not end where the cluster ends (more than one cluster of output, or
  cut short; qemu refuses both).

Caps (qemu's, block/qcow2.h): L1 table at most 32 MiB (``QCOW_MAX_L1_SIZE``,
4 Mi entries), refcount table at most 8 MiB (``QCOW_MAX_REFTABLE_SIZE``),
at most 65536 snapshots (``QCOW_MAX_SNAPSHOTS``) in a snapshot table of at
most 64 MiB (``QCOW_MAX_SNAPSHOTS_SIZE``) with at most 1024 bytes of extra
data per entry, a backing file name of at most 1023 bytes, host offsets
below 2**56.  A compressed cluster is read as at most two clusters of input
(the descriptor cannot say more) and decompressed to at most one cluster.

Memory stays bounded whatever the header says: the L1 table is read in
windows of :data:`L1_WINDOW` entries, at most :data:`L2_CACHE` L2 tables
are held at a time, and reads go through the caller's buffer.  The L1
table is walked once, front to back, so shared or cyclic L2 pointers cost
no more than distinct ones.  Not checked: that L2 tables and data clusters
do not alias each other (a hostile image can make them; the result is
data that looks wrong, never an out-of-bounds read or a hang).

Writer contract
---------------
:class:`Qcow2Writer` streams a version 3 image (refcount width 16, no
extensions) into an open file: cluster 0 the header, then the L1 table,
then data clusters in guest order with each L2 table appended after the
data it maps, and at the end the refcount table and refcount blocks.
Every cluster of the file is used exactly once, so every refcount is 1:
``qemu-img check`` finds no leak and no error.  Only the clusters the
caller hands over are allocated (the caller skips zero clusters).
"""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import struct
import zlib
from collections import OrderedDict
from typing import Callable, Iterator

import numpy as np

from .errors import CorruptImageError, FormatError, InvalidArgumentError, OutOfRangeError, UnsupportedFeatureError
from .errors import NoSuchFileError, Param
from .fileio import FileIO, HostMap, open_input

KiB, MiB = 1 << 10, 1 << 20

# ---------------------------------------------------------------------------- constants (block/qcow2.h)
MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112                 # what the writer emits: up to compression_type, padded to 8
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
EXTL2_MIN_CLUSTER_BITS = 14
SUBCLUSTERS_PER_CLUSTER = 32
MAX_REFCOUNT_ORDER = 6

MAX_L1_SIZE = 32 * MiB                 # QCOW_MAX_L1_SIZE, bytes
MAX_REFTABLE_SIZE = 8 * MiB            # QCOW_MAX_REFTABLE_SIZE, bytes
MAX_SNAPSHOTS = 65536                  # QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS   # QCOW_MAX_SNAPSHOTS_SIZE, bytes
MAX_SNAPSHOT_EXTRA_DATA = 1024         # QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_BACKING_FILE_NAME = 1023
MAX_BACKING_FORMAT_NAME = 15           # sizeof(bs->backing_format) - 1
MAX_CLUSTER_OFFSET = (1 << 56) - 1     # QCOW_MAX_CLUSTER_OFFSET
INT_MAX = (1 << 31) - 1
COMPRESSED_SECTOR_SIZE = 512           # QCOW2_COMPRESSED_SECTOR_SIZE
SECTOR_SIZE = 512                      # BDRV_SECTOR_SIZE: the virtual size is rounded down to it

MAX_BACKING_DEPTH = 16                 # backing files under one image (ours: qemu has no fixed cap)
L1_WINDOW = 8192                       # L1 entries read at a time (64 KiB)
L2_CACHE = 2                           # L2 tables held at a time (keyed by offset: shared tables hit)
REFTABLE_WINDOW = 8192                 # refcount table entries checked at a time

# header fields
CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type",
                  4: "extended L2 entries"}
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# header extensions
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# table entries
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# on-disk records, big-endian
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")         # 72 bytes
HEADER_V3 = struct.Struct(">QQQII")                   # bytes 72..103
EXTENSION = struct.Struct(">II")                      # type, length
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")          # 40 bytes, then extra data, id, name, padding
FEATURE_ENTRY = struct.Struct(">BB46s")

# what a guest range reads from (the reader's run kinds)
ZERO, DATA, COMPRESSED, BACKING = 0, 1, 2, 3


def probe(head: bytes) -> bool:
    """True when the first bytes of a file look like qcow2 (the magic)."""
    return head[:4] == MAGIC


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


# ---------------------------------------------------------------------------- the header
@dataclasses.dataclass
class Qcow2Header:
    """The header fields (version 2 fields, then the version 3 ones)."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    @classmethod
    def unpack(cls, raw: bytes) -> "Qcow2Header":
        """Fields from the first bytes of the file (at least 72; 104 for v3).
        Only unpacks: :meth:`Qcow2Image` validates."""
        (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = HEADER_V2.unpack_from(raw, 0)
        h = cls(version=version, backing_file_offset=bfo, backing_file_size=bfs, cluster_bits=cbits, size=size,
                crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_off, refcount_table_offset=rt_off,
                refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap, snapshots_offset=snap_off)
        if version >= 3 and len(raw) >= V3_MIN_HEADER_LENGTH:
            (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
             h.header_length) = HEADER_V3.unpack_from(raw, V2_HEADER_LENGTH)
            h.compression_type = raw[V3_MIN_HEADER_LENGTH] if h.header_length > V3_MIN_HEADER_LENGTH and \
                len(raw) > V3_MIN_HEADER_LENGTH else COMPRESSION_ZLIB
        else:
            h.refcount_order, h.header_length = 4, V2_HEADER_LENGTH
        return h

    def pack(self) -> bytes:
        """A version 3 header of header_length bytes (the writer's)."""
        raw = HEADER_V2.pack(MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
                             self.cluster_bits, self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
                             self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
                             self.snapshots_offset)
        raw += HEADER_V3.pack(self.incompatible_features, self.compatible_features, self.autoclear_features,
                              self.refcount_order, self.header_length)
        raw += bytes([self.compression_type])
        return raw.ljust(self.header_length, b"\0")


# ---------------------------------------------------------------------------- geometry helpers (qcow2.h)
@dataclasses.dataclass(frozen=True)
class Geometry:
    cluster_bits: int
    extended_l2: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def unit_bits(self) -> int:
        """Bits of the read unit: the subcluster with extended L2 entries, else the cluster."""
        return self.cluster_bits - 5 if self.extended_l2 else self.cluster_bits

    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def cluster_offset_mask(self) -> int:
        return (1 << self.csize_shift) - 1


def size_to_l1(g: Geometry, size: int) -> int:
    shift = g.cluster_bits + g.l2_bits
    return (size + (1 << shift) - 1) >> shift


def offset_to_l1_index(g: Geometry, offset: int) -> int:
    return offset >> (g.l2_bits + g.cluster_bits)


def offset_to_l2_index(g: Geometry, offset: int) -> int:
    return (offset >> g.cluster_bits) & (g.l2_entries - 1)


def parse_compressed_l2_entry(g: Geometry, entry):
    """(host offset, bytes to read) of a compressed cluster descriptor
    (reference: qcow2_parse_compressed_l2_entry); works on numpy arrays too."""
    if isinstance(entry, np.ndarray):
        u64 = np.uint64
        coffset = entry & u64(g.cluster_offset_mask)
        nb_csectors = ((entry >> u64(g.csize_shift)) & u64(g.csize_mask)) + u64(1)
        csize = nb_csectors * u64(COMPRESSED_SECTOR_SIZE) - (coffset & u64(COMPRESSED_SECTOR_SIZE - 1))
        return coffset, csize
    coffset = entry & g.cluster_offset_mask
    nb_csectors = ((entry >> g.csize_shift) & g.csize_mask) + 1
    csize = nb_csectors * COMPRESSED_SECTOR_SIZE - (coffset & (COMPRESSED_SECTOR_SIZE - 1))
    return coffset, csize


# ---------------------------------------------------------------------------- backing files
def has_protocol(name: str) -> bool:
    """qemu's path_has_protocol: a ':' before any '/' (so 'nbd://x',
    'json:{...}', but also 'a_b:c' and '1:x') makes the part before it a
    protocol name; qemu opens no such name as a file."""
    colon, slash = name.find(":"), name.find("/")
    return colon >= 0 and (slash < 0 or colon < slash)


def resolve_backing(image_path: str, name: str, allow_backing) -> str:
    """The host path of the backing file ``name`` of the image at image_path.

    * ``allow_backing`` false: refused (UnsupportedFeatureError naming the
      backing file).
    * a path (str or PathLike): that file, whatever the image names.
    * True: ``name`` must be relative, free of ``..``, not a qemu protocol
      or ``json:`` name (no ':' before the first '/', as qemu's
      path_has_protocol), not end with '/', name a regular file as the
      kernel resolves it, and resolve (symlinks followed, with
      os.path.realpath) to a regular file inside the folder that really
      holds the image.
    """
    if not allow_backing:
        raise UnsupportedFeatureError.naming(
            f"{image_path}: the image has a backing file ({name!r}); backing files are read only when asked "
            f"(pass ", Param("allow_backing", True), ", or ", Param("allow_backing", placeholder="the backing file's path"),
            ")")
    if allow_backing is not True:
        path = os.fspath(allow_backing)
        _check_regular(path, f"{image_path}: backing file {path!r}")
        return path
    if not name or "\0" in name:
        raise CorruptImageError(f"{image_path}: the backing file name {name!r} is empty or holds a NUL byte")
    if os.path.isabs(name):
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} is an absolute path; only a name relative to the image's "
            f"folder is followed (pass the backing path explicitly to use it)")
    if ".." in re.split(r"[/\\]", name):
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} leaves the image's folder ('..'); pass the backing path "
            f"explicitly to use it")
    if has_protocol(name):
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} names a protocol or json: description, not a file (a ':' "
            f"before any '/'; qemu reads the part before it as a protocol name)")
    if name.endswith("/"):
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} ends with '/': it names a directory, which qemu cannot open "
            f"as an image (ENOTDIR)")
    folder = os.path.dirname(os.path.realpath(image_path))
    # the name as the kernel resolves it (as qemu opens it): 'file/.' is not 'file'
    _check_regular(os.path.join(folder, name), f"{image_path}: backing file {name!r}")
    real = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([folder, real]) != folder or real == folder:
        raise UnsupportedFeatureError(
            f"{image_path}: backing file {name!r} resolves to {real!r}, outside the image's folder {folder!r} "
            f"(a symlink escaping it); pass the backing path explicitly to use it")
    _check_regular(real, f"{image_path}: backing file {name!r}")
    return real


def _check_regular(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NoSuchFileError(what) from None
    except OSError as exc:
        raise InvalidArgumentError(f"{what}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFeatureError(f"{what} is not a regular file")


# ---------------------------------------------------------------------------- decompression
ZSTD_MAX_WINDOW = 4 * MiB              # a cluster is at most 2 MiB: no honest frame needs a larger window
ZSTD_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE_MAGIC, ZSTD_SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0


class BadCompressedCluster(ValueError):
    """A compressed cluster that is not exactly one cluster of output (the message says how)."""


def _zstd_decompressor():
    """A zstandard decompression context (one per thread: they are not thread-safe)."""
    try:
        import zstandard
    except ImportError:
        raise UnsupportedFeatureError("qcow2 zstd compression (install zstandard)") from None
    return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)


def zstd_piece_budget(cluster_size: int) -> int:
    """How many zstd frames and blocks one cluster may be made of, together
    (ours: qemu has no cap).  qemu writes one frame of blocks of up to
    128 KiB; this allows one per 512 bytes of the cluster, plus 16, so a
    hostile stream of empty blocks costs microseconds, not half a second."""
    return cluster_size // 512 + 16


def _zstd_frame_end(mv: memoryview, pos: int, budget: int) -> tuple[int, int]:
    """(the offset just past the zstd frame that starts at pos, the budget
    left after its blocks) (reference: ZSTD_findFrameCompressedSize; the
    frame format is RFC 8878 section 3.1).

    Only the frame header and the 3-byte block headers are read, each
    block spending one unit of budget.  BadCompressedCluster when there is
    no frame at pos, it runs past the end of the data, or the budget runs out."""
    n = len(mv)
    budget -= 1
    if budget < 0:
        raise BadCompressedCluster("its zstd data has too many frames (more than one per 512 bytes of the cluster)")
    if pos + 5 > n:
        raise BadCompressedCluster("its zstd data ends before a complete frame header")
    magic = int.from_bytes(mv[pos:pos + 4], "little")
    if magic & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE_MAGIC:
        end = pos + 8 + int.from_bytes(mv[pos + 4:pos + 8], "little") if pos + 8 <= n else n + 1
        if end > n:
            raise BadCompressedCluster("a skippable zstd frame runs past the end of the compressed data")
        return end, budget
    if magic != ZSTD_MAGIC:
        raise BadCompressedCluster(f"no zstd frame at byte {pos} of the compressed data")
    fhd = mv[pos + 4]
    single_segment = fhd >> 5 & 1
    p = pos + 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + ((single_segment, 2, 4, 8)[fhd >> 6])
    while True:
        budget -= 1
        if budget < 0:
            raise BadCompressedCluster("its zstd data has too many blocks (more than one per 512 bytes of the "
                                       "cluster)")
        if p + 3 > n:
            raise BadCompressedCluster("its zstd frame is cut short (the data ends inside the frame)")
        b = mv[p] | mv[p + 1] << 8 | mv[p + 2] << 16
        block_type = b >> 1 & 3
        if block_type == 3:
            raise BadCompressedCluster(f"its zstd frame has a block of the reserved type 3 at byte {p}")
        p += 3 + (1 if block_type == 1 else b >> 3)
        if b & 1:
            break
    p += 4 if fhd & 0x04 else 0               # the content checksum
    if p > n:
        raise BadCompressedCluster("its zstd frame is cut short (the data ends inside the frame)")
    return p, budget


def _zstd_decompress(ctx, data, cluster_size: int) -> bytes:
    """One cluster from a zstd stream (reference: qcow2_zstd_decompress).

    As qemu: frames are decoded one after the other until the output holds
    one cluster; the frame that fills it must end there (qemu: EIO when
    ZSTD_decompressStream still has output to flush, i.e. the cluster
    decompresses to more than one cluster), and what follows that frame
    (the rest of its last 512-byte sector, often the next cluster's frame)
    is never parsed.  Output is capped at one cluster and the window at
    4 MiB, so a zstd bomb costs one cluster of memory.
    """
    mv = memoryview(data)
    parts, got, pos = [], 0, 0
    budget = zstd_piece_budget(cluster_size)
    while got < cluster_size:
        if pos >= len(mv):
            raise BadCompressedCluster(f"it decompresses to {got} bytes, not the cluster size {cluster_size}")
        end, budget = _zstd_frame_end(mv, pos, budget)
        reader = ctx.stream_reader(mv[pos:end], read_across_frames=False)
        while got < cluster_size:
            piece = reader.read(cluster_size - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        if got == cluster_size and reader.read(1):
            raise BadCompressedCluster(f"its zstd frame decompresses to more than one cluster ({cluster_size} "
                                       f"bytes)")
        pos = end
    return b"".join(parts)


def _decompress(data, cluster_size: int, compression_type: int, zstd_ctx=None) -> bytes:
    """One cluster from its compressed bytes, the output capped to cluster_size.

    Raises zlib.error / ZstdError / BadCompressedCluster on bad input; the
    caller turns them into CorruptImageError with the location.
    """
    if compression_type == COMPRESSION_ZLIB:
        # reference: qcow2_zlib_decompress (raw deflate, 4 KiB window; as qemu, a full
        # cluster of output is enough: the input is only known to the sector)
        d = zlib.decompressobj(-12)
        return d.decompress(data, cluster_size)
    return _zstd_decompress(zstd_ctx, data, cluster_size)


# ---------------------------------------------------------------------------- the reader
class Qcow2Image:
    """The active layer of a qcow2 image, read-only; see the module docstring.

    ``extents(start, end)`` yields ``(offset, length, data)`` runs covering
    the range: ``data`` False means the run certainly reads as zeros.
    ``readinto(buf, offset)`` fills buf with the guest bytes at offset.

    ``allow_backing``: False (refuse backing files), True (follow a
    relative name inside the image's folder, and so on down the chain), or
    a path: the backing file of this image (its own backing files then
    follow the True rule).  ``open_backing(path, format_name, chain,
    named_by_image=...)`` opens a backing file: format_name is what the
    backing format extension records (None without one, or when the caller
    chose the file), chain the real paths of this image and those above it,
    named_by_image False when the caller chose the file.  Without an
    open_backing a backing file is refused (vdisk.convert.open_image passes
    vdisk.convert.open_backing), so this module needs nothing from the layers above it.
    """

    format = "qcow2"

    def __init__(self, path, *, fd: int | None = None, allow_backing=False, open_backing: Callable | None = None,
                 chain: tuple[str, ...] = ()):
        self.path = os.fspath(path)
        self.backing = None
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        self._io: FileIO | None = None
        # fd: the image opened by the caller (fileio.open_input), owned from here on
        self._io = FileIO.adopt(open_input(self.path) if fd is None else fd, self.path)
        try:
            self.file_size = os.lseek(self._io.fd, 0, os.SEEK_END)     # st_size is 0 for a block device
            self._open()
            self._host = HostMap(self._io.fd, self.file_size)
            self._l1_cache: tuple[int, np.ndarray] | None = None
            self._l2_cache: OrderedDict[int, tuple] = OrderedDict()
            self._last_compressed: tuple[int, bytes] | None = None
            self._zstd = _zstd_decompressor() if self.compression_type == COMPRESSION_ZSTD else None
            if self.backing_file is not None:
                self._open_backing(allow_backing, open_backing, chain)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ header and tables
    def _corrupt(self, msg: str) -> CorruptImageError:
        return CorruptImageError(f"{self.path}: {msg}")

    def _pread_exact(self, n: int, off: int, what: str) -> bytes:
        if off < 0 or off + n > self.file_size:
            raise self._corrupt(f"{what} at offset {off:#x} ({n} bytes) runs past the end of the file "
                                f"({self.file_size} bytes)")
        data = self._io.pread(n, off)
        if len(data) != n:
            raise self._corrupt(f"{what} at offset {off:#x}: short read ({len(data)} of {n} bytes; "
                                f"the file shrank?)")
        return data

    def _open(self) -> None:
        fs = self.file_size
        head = self._io.pread(4096, 0)
        if not probe(head):
            raise FormatError(f"{self.path}: not a qcow2 image (no QFI\\xfb magic)")
        if fs < V2_HEADER_LENGTH:
            raise self._corrupt(f"truncated to {fs} bytes, shorter than the {V2_HEADER_LENGTH}-byte qcow2 header")
        h = Qcow2Header.unpack(head)
        if h.version not in (2, 3):
            raise UnsupportedFeatureError(f"{self.path}: qcow2 version {h.version} (only versions 2 and 3)")
        if h.version == 3 and fs < V3_MIN_HEADER_LENGTH:
            raise self._corrupt(f"truncated to {fs} bytes, shorter than the {V3_MIN_HEADER_LENGTH}-byte "
                                f"version 3 header")
        # cluster size (reference: qcow2_do_open)
        if h.cluster_bits < MIN_CLUSTER_BITS:
            raise self._corrupt(f"header field cluster_bits is {h.cluster_bits}; the minimum is "
                                f"{MIN_CLUSTER_BITS} (512-byte clusters)")
        if h.cluster_bits > MAX_CLUSTER_BITS:
            raise UnsupportedFeatureError(
                f"{self.path}: cluster_bits {h.cluster_bits} (clusters of 2**{h.cluster_bits} bytes); at most "
                f"{MAX_CLUSTER_BITS} (2 MiB clusters) is supported, as in qemu")
        C = 1 << h.cluster_bits
        if h.version == 3:
            if h.header_length < V3_MIN_HEADER_LENGTH or h.header_length % 8 or h.header_length > C:
                raise self._corrupt(f"header_length {h.header_length}: must be a multiple of 8 from "
                                    f"{V3_MIN_HEADER_LENGTH} to the cluster size {C}")
            if fs < h.header_length:
                raise self._corrupt(f"truncated to {fs} bytes, shorter than its {h.header_length}-byte header")
            if h.header_length > V3_MIN_HEADER_LENGTH:
                h.compression_type = self._io.pread(1, V3_MIN_HEADER_LENGTH)[0]
        # features
        incompat = h.incompatible_features
        if incompat & ~INCOMPAT_KNOWN:
            self._raise_unknown_features(h, incompat & ~INCOMPAT_KNOWN)
        if incompat & INCOMPAT_CORRUPT:
            raise self._corrupt("the image is marked corrupt (incompatible feature bit 1, set by qemu when it "
                                "found an inconsistency); refusing to read it (repair it with 'qemu-img check -r "
                                "all' first)")
        if incompat & INCOMPAT_DATA_FILE:
            raise UnsupportedFeatureError(f"{self.path}: external data file (incompatible feature bit 2): the "
                                          f"guest data lives in another file")
        if h.crypt_method != CRYPT_NONE:
            kind = {CRYPT_AES: "AES", CRYPT_LUKS: "LUKS"}.get(h.crypt_method, "unknown")
            raise UnsupportedFeatureError(f"{self.path}: encryption (crypt_method {h.crypt_method}, {kind})")
        if incompat & INCOMPAT_COMPRESSION:
            if h.compression_type == COMPRESSION_ZLIB:
                raise self._corrupt("the compression type bit (incompatible bit 3) is set but the "
                                    "compression_type field is zlib or absent")
        elif h.compression_type != COMPRESSION_ZLIB:
            raise self._corrupt(f"compression_type {h.compression_type} without the compression type bit "
                                f"(incompatible bit 3)")
        if h.compression_type not in COMPRESSION_NAMES:
            raise UnsupportedFeatureError(f"{self.path}: qcow2 compression type {h.compression_type} "
                                          f"(only zlib and zstd)")
        extl2 = bool(incompat & INCOMPAT_EXTL2)
        if extl2 and h.cluster_bits < EXTL2_MIN_CLUSTER_BITS:
            raise self._corrupt(f"extended L2 entries need clusters of at least 16 KiB; cluster_bits is "
                                f"{h.cluster_bits}")
        if h.refcount_order > MAX_REFCOUNT_ORDER:
            raise self._corrupt(f"refcount_order {h.refcount_order}: at most {MAX_REFCOUNT_ORDER} (64-bit refcounts)")
        self.header = h
        self.geometry = g = Geometry(h.cluster_bits, extl2)
        self.cluster_size = C
        # qemu exposes whole sectors only (reference: qcow2_do_open,
        # bs->total_sectors = header.size / BDRV_SECTOR_SIZE): a tail under 512 bytes is never read
        self.size = h.size - h.size % SECTOR_SIZE
        self.compression_type = h.compression_type
        self.version = h.version
        self.dirty = bool(incompat & INCOMPAT_DIRTY)
        # the active L1 table (reference: qcow2_do_open, qcow2_validate_table)
        if h.l1_size > MAX_L1_SIZE // 8:
            raise self._corrupt(f"active L1 table too large: l1_size {h.l1_size} entries; qemu's limit is "
                                f"{MAX_L1_SIZE // 8} ({MAX_L1_SIZE // MiB} MiB)")
        if h.size > (1 << 63) - 1:
            raise self._corrupt(f"virtual size {h.size} does not fit in a signed 64-bit integer")
        need = size_to_l1(g, h.size)
        if need > INT_MAX or need > MAX_L1_SIZE // 8:
            raise self._corrupt(f"virtual size {h.size} is too big for {C}-byte clusters: it needs {need} L1 "
                                f"entries, over qemu's limit of {MAX_L1_SIZE // 8}")
        if h.l1_size < need:
            raise self._corrupt(f"the active L1 table is too small: {h.l1_size} entries for a virtual size of "
                                f"{h.size} bytes, which needs {need}")
        self._l1_needed = need
        regions = [("the header", 0, C)]
        if h.l1_size:
            self._check_table(h.l1_table_offset, h.l1_size * 8, "the active L1 table")
            regions.append(("the active L1 table", h.l1_table_offset, h.l1_size * 8))
        # the refcount table: never read, but it must be where the header says
        if h.refcount_table_clusters == 0:
            raise self._corrupt("the image has no refcount table (refcount_table_clusters is 0)")
        if h.refcount_table_clusters > MAX_REFTABLE_SIZE // C:
            raise self._corrupt(f"refcount table too large: {h.refcount_table_clusters} clusters; qemu's limit "
                                f"is {MAX_REFTABLE_SIZE // MiB} MiB ({MAX_REFTABLE_SIZE // C} clusters)")
        self._check_table(h.refcount_table_offset, h.refcount_table_clusters * C, "the refcount table")
        regions.append(("the refcount table", h.refcount_table_offset, h.refcount_table_clusters * C))
        # snapshots: bounds only, the active layer is what is read
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise self._corrupt(f"{h.nb_snapshots} snapshots; qemu's limit is {MAX_SNAPSHOTS}")
        if h.nb_snapshots:
            length = self._walk_snapshot_table(h)
            regions.append(("the snapshot table", h.snapshots_offset, length))
        # pairwise overlap of the fixed metadata
        for i, (na, a0, alen) in enumerate(regions):
            for nb, b0, blen in regions[i + 1:]:
                if a0 < b0 + blen and b0 < a0 + alen:
                    raise self._corrupt(f"{nb} (offset {b0:#x}, {blen} bytes) overlaps {na} "
                                        f"(offset {a0:#x}, {alen} bytes)")
        self._regions = regions
        self._check_refcount_table(h)
        # backing file name and header extensions
        ext_end = C
        if h.backing_file_offset:
            if h.backing_file_size > MAX_BACKING_FILE_NAME:
                raise self._corrupt(f"backing file name of {h.backing_file_size} bytes; at most "
                                    f"{MAX_BACKING_FILE_NAME}")
            if h.backing_file_offset > C or h.backing_file_offset + h.backing_file_size > C:
                raise self._corrupt(f"backing file name at offset {h.backing_file_offset:#x} "
                                    f"({h.backing_file_size} bytes) is not inside the header cluster")
            if h.backing_file_offset < h.header_length:
                raise self._corrupt(f"backing file name at offset {h.backing_file_offset:#x} overlaps the "
                                    f"{h.header_length}-byte header")
            raw = self._pread_exact(h.backing_file_size, h.backing_file_offset, "the backing file name")
            try:
                self.backing_file = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self._corrupt(f"the backing file name {raw!r} is not UTF-8") from None
            ext_end = h.backing_file_offset
        self._read_extensions(h.header_length, ext_end)

    def _raise_unknown_features(self, h: Qcow2Header, bits: int) -> None:
        names = {}
        try:
            end = h.backing_file_offset or (1 << h.cluster_bits)
            for typ, data in self._extensions(h.header_length, end):
                if typ == EXT_FEATURE_TABLE:
                    for k in range(len(data) // FEATURE_ENTRY.size):
                        ftype, bit, name = FEATURE_ENTRY.unpack_from(data, k * FEATURE_ENTRY.size)
                        if ftype == 0:
                            names[bit] = name.rstrip(b"\0").decode("utf-8", "replace")
        except (CorruptImageError, struct.error):
            pass
        listed = ", ".join(f"bit {b}" + (f" ({names[b]})" if b in names else "")
                           for b in range(64) if bits >> b & 1)
        raise UnsupportedFeatureError(f"{self.path}: unknown qcow2 incompatible feature {listed}")

    def _check_table(self, offset: int, nbytes: int, what: str) -> None:
        """A contiguous table: cluster-aligned, inside the file, below 2**56."""
        if offset % self.cluster_size:
            raise self._corrupt(f"{what} offset {offset:#x} is not aligned to the {self.cluster_size}-byte "
                                f"cluster size")
        if offset + nbytes > self.file_size:
            raise self._corrupt(f"{what} at offset {offset:#x} ({nbytes} bytes) runs past the end of the file "
                                f"({self.file_size} bytes)")

    def _check_refcount_table(self, h: Qcow2Header) -> None:
        """Every refcount table entry: no reserved bits, and a refcount block
        that is cluster-aligned, inside the file and clear of the fixed
        metadata.  The refcounts themselves are never read."""
        C = self.cluster_size
        n = h.refcount_table_clusters * C // 8
        u64 = np.uint64
        for first in range(0, n, REFTABLE_WINDOW):
            count = min(REFTABLE_WINDOW, n - first)
            raw = self._pread_exact(count * 8, h.refcount_table_offset + first * 8, "the refcount table")
            e = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            off = e & u64(REFT_OFFSET_MASK)
            used = off != 0
            bad = []
            for mask, what in (
                    ((e & u64(REFT_RESERVED_MASK)) != 0, "reserved bits set"),
                    (used & (off % u64(C) != 0), "refcount block offset is not cluster-aligned"),
                    (used & (off + u64(C) > u64(self.file_size)),
                     f"refcount block runs past the end of the file ({self.file_size} bytes)")):
                idx = np.flatnonzero(mask)
                if len(idx):
                    bad.append((int(idx[0]), what))
            for name, lo, length in self._regions:
                idx = np.flatnonzero(used & (off < u64(lo + length)) & (off + u64(C) > u64(lo)))
                if len(idx):
                    bad.append((int(idx[0]), f"refcount block overlaps {name}"))
            if bad:
                i, what = min(bad)
                raise self._corrupt(f"refcount table entry {first + i} ({int(e[i]):#018x}): {what}")

    def _walk_snapshot_table(self, h: Qcow2Header) -> int:
        """Bounds-check every entry of the snapshot table; return its length.
        (reference: qcow2_read_snapshots)"""
        C = self.cluster_size
        start = h.snapshots_offset
        if start % C:
            raise self._corrupt(f"the snapshot table offset {start:#x} is not cluster-aligned")
        window = b""
        wstart = start
        pos = start

        def read(n: int, at: int, what: str) -> bytes:
            nonlocal window, wstart
            if not (wstart <= at and at + n <= wstart + len(window)):
                if at + n > self.file_size:
                    raise self._corrupt(f"{what} at offset {at:#x} runs past the end of the file "
                                        f"({self.file_size} bytes)")
                wstart = at
                window = self._io.pread(max(n, min(1 * MiB, self.file_size - at)), at)
                if len(window) < n:
                    raise self._corrupt(f"{what} at offset {at:#x}: short read")
            return window[at - wstart:at - wstart + n]

        for i in range(h.nb_snapshots):
            what = f"snapshot table entry {i}"
            (l1_off, l1_size, id_len, name_len, _s, _ns, _clock, _vm, extra) = SNAPSHOT_ENTRY.unpack(
                read(SNAPSHOT_ENTRY.size, pos, what))
            if extra > MAX_SNAPSHOT_EXTRA_DATA:
                raise self._corrupt(f"{what} (offset {pos:#x}) has {extra} bytes of extra data; at most "
                                    f"{MAX_SNAPSHOT_EXTRA_DATA}")
            length = _round_up(SNAPSHOT_ENTRY.size + extra + id_len + name_len, 8)
            if pos + length - start > MAX_SNAPSHOTS_SIZE:
                raise self._corrupt(f"the snapshot table is larger than qemu's limit of "
                                    f"{MAX_SNAPSHOTS_SIZE // MiB} MiB (at entry {i})")
            if pos + length > self.file_size:
                raise self._corrupt(f"{what} at offset {pos:#x} ({length} bytes) runs past the end of the file")
            if l1_size > MAX_L1_SIZE // 8:
                raise self._corrupt(f"{what}: its L1 table has {l1_size} entries, over qemu's limit of "
                                    f"{MAX_L1_SIZE // 8}")
            if l1_size:
                self._check_table(l1_off, l1_size * 8, f"{what}'s L1 table")
            pos += length
        return pos - start

    def _extensions(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(type, data) of each header extension in [start, end) (reference: qcow2_read_extensions)."""
        end = min(end, self.file_size)
        if end <= start:
            return
        raw = self._io.pread(end - start, start)
        pos = 0
        while pos + EXTENSION.size <= len(raw):
            typ, length = EXTENSION.unpack_from(raw, pos)
            if typ == EXT_END:
                return
            pos += EXTENSION.size
            if length > len(raw) - pos:
                raise self._corrupt(f"header extension {typ:#010x} at offset {start + pos - 8:#x} claims {length} "
                                    f"bytes, past the end of the extension area ({end:#x})")
            yield typ, raw[pos:pos + length]
            pos += _round_up(length, 8)

    def _read_extensions(self, start: int, end: int) -> None:
        for typ, data in self._extensions(start, end):
            if typ == EXT_BACKING_FORMAT:
                if len(data) > MAX_BACKING_FORMAT_NAME:
                    raise self._corrupt(f"backing format name of {len(data)} bytes; at most "
                                        f"{MAX_BACKING_FORMAT_NAME}")
                self.backing_format = data.decode("ascii", "replace")
            elif typ == EXT_CRYPTO:
                raise UnsupportedFeatureError(f"{self.path}: encryption (a full disk encryption header)")

    # ------------------------------------------------------------------ backing
    def _open_backing(self, allow_backing, open_backing, chain) -> None:
        here = os.path.realpath(self.path)
        chain = chain + (here,)
        if len(chain) > MAX_BACKING_DEPTH:      # chain: this image and those above it
            raise UnsupportedFeatureError(f"{self.path}: a backing chain deeper than {MAX_BACKING_DEPTH} backing "
                                          f"files")
        path = resolve_backing(self.path, self.backing_file, allow_backing)
        if os.path.realpath(path) in chain:
            raise self._corrupt(f"the backing chain loops: {path!r} is already in it")
        # the format the image records describes the file it names; a file the caller chose is detected
        fmt = self.backing_format if allow_backing is True else None
        if fmt not in (None, "", "raw", "qcow2"):
            raise UnsupportedFeatureError(f"{self.path}: backing file format {fmt!r} (only raw and qcow2)")
        if open_backing is None:
            raise UnsupportedFeatureError(
                f"{self.path}: the image has a backing file ({self.backing_file!r}), and this reader was given "
                f"no way to open one (open_backing; vdisk.convert.open_backing is one)")
        self.backing = open_backing(path, fmt or None, chain, named_by_image=allow_backing is True)

    # ------------------------------------------------------------------ L1 and L2
    def _l1_entries(self, index: int) -> tuple[int, np.ndarray]:
        """(first index, validated L1 entries) of the window holding index."""
        cache = self._l1_cache
        if cache is not None and cache[0] <= index < cache[0] + len(cache[1]):
            return cache
        first = index - index % L1_WINDOW
        n = min(L1_WINDOW, self._l1_needed - first)
        off = self.header.l1_table_offset + first * 8
        raw = self._pread_exact(n * 8, off, "the active L1 table")
        entries = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self._validate_l1(entries, first)
        self._l1_cache = (first, entries)
        return self._l1_cache

    def _validate_l1(self, e: np.ndarray, first: int) -> None:
        C = self.cluster_size
        off = e & np.uint64(L1E_OFFSET_MASK)
        bad = []
        m = np.flatnonzero(e & np.uint64(L1E_RESERVED_MASK))
        if len(m):
            bad.append((m[0], f"reserved bits set ({int(e[m[0]]):#018x})"))
        m = np.flatnonzero(off % np.uint64(C))
        if len(m):
            bad.append((m[0], f"L2 table offset {int(off[m[0]]):#x} is not cluster-aligned"))
        used = off != 0
        m = np.flatnonzero(used & (off + np.uint64(C) > np.uint64(self.file_size)))
        if len(m):
            bad.append((m[0], f"L2 table offset {int(off[m[0]]):#x} runs past the end of the file "
                              f"({self.file_size} bytes)"))
        for name, lo, length in self._regions:
            m = np.flatnonzero(used & (off < np.uint64(lo + length)) & (off + np.uint64(C) > np.uint64(lo)))
            if len(m):
                bad.append((m[0], f"L2 table offset {int(off[m[0]]):#x} overlaps {name}"))
        if bad:
            i, what = min(bad, key=lambda b: b[0])
            raise self._corrupt(f"active L1 table entry {first + int(i)}: {what}")

    def _l1_entry(self, l1_index: int) -> int:
        first, l1 = self._l1_entries(l1_index)
        return int(l1[l1_index - first]) & L1E_OFFSET_MASK

    def _l2_table(self, l1_index: int):
        """(entries, bitmaps or None, l2 offset) of the L2 table at l1_index,
        validated; (None, None, 0) when the L1 entry is unallocated.

        Cached by (offset, entries in use): a table that several L1 entries
        share (only a hostile image does that) is read and checked once."""
        l2_off = self._l1_entry(l1_index)
        if not l2_off:
            return None, None, 0
        g = self.geometry
        # entries past the virtual size are never read: not checked either
        clusters = -(-self.size // self.cluster_size)
        n = min(g.l2_entries, clusters - l1_index * g.l2_entries)
        last = n < g.l2_entries or (l1_index + 1) * g.l2_entries == clusters
        key = (l2_off, n, last)
        hit = self._l2_cache.get(key)
        if hit is not None:
            self._l2_cache.move_to_end(key)
            return hit
        raw = self._pread_exact(self.cluster_size, l2_off, f"the L2 table of L1 entry {l1_index}")
        arr = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        if g.extended_l2:
            entries, bitmaps = arr[0::2][:n].copy(), arr[1::2][:n].copy()
        else:
            entries, bitmaps = arr[:n], None
        del arr, raw
        self._validate_l2(entries, bitmaps, l1_index, l2_off)
        table = (entries, bitmaps, l2_off)
        self._l2_cache[key] = table
        if len(self._l2_cache) > L2_CACHE:
            self._l2_cache.popitem(last=False)
        return table

    def _validate_l2(self, e: np.ndarray, bm, l1_index: int, l2_off: int) -> None:
        """Every entry of an L2 table within the virtual size, vectorised
        (reference: qcow2_get_subcluster_type, check_refcounts_l2)."""
        g = self.geometry
        C = self.cluster_size
        u64 = np.uint64
        bad: list[tuple[int, str]] = []

        def first(mask, what):
            idx = np.flatnonzero(mask)
            if len(idx):
                bad.append((int(idx[0]), what(int(idx[0]))))

        comp = (e & u64(QCOW_OFLAG_COMPRESSED)) != 0
        std = ~comp
        # compressed clusters
        if comp.any():
            coff, csize = parse_compressed_l2_entry(g, e)
            first(comp & ((e & u64(QCOW_OFLAG_COPIED)) != 0),
                  lambda i: f"compressed cluster with the COPIED bit (63) set ({int(e[i]):#018x})")
            first(comp & (coff > u64(MAX_CLUSTER_OFFSET)),
                  lambda i: f"compressed cluster offset {int(coff[i]):#x} above 2**56")
            limit = u64(_round_up(self.file_size, COMPRESSED_SECTOR_SIZE))
            first(comp & (coff + csize > limit),
                  lambda i: f"compressed cluster at offset {int(coff[i]):#x} ({int(csize[i])} bytes) runs past "
                            f"the end of the file ({self.file_size} bytes)")
            for name, lo, length in self._regions:
                first(comp & (coff < u64(lo + length)) & (coff + csize > u64(lo)),
                      lambda i, name=name: f"compressed cluster at offset {int(coff[i]):#x} overlaps {name}")
            if bm is not None:
                first(comp & (bm != 0), lambda i: f"compressed cluster with a nonzero subcluster bitmap "
                                                  f"({int(bm[i]):#018x}, reserved)")
        # standard clusters
        host = e & u64(L2E_OFFSET_MASK)
        first(std & ((e & u64(L2E_STD_RESERVED_MASK)) != 0),
              lambda i: f"reserved bits set ({int(e[i]):#018x})")
        if self.version == 2 or g.extended_l2:
            first(std & ((e & u64(QCOW_OFLAG_ZERO)) != 0),
                  lambda i: f"the zero flag (bit 0) is set, reserved in "
                            f"{'version 2 images' if self.version == 2 else 'images with extended L2 entries'}")
        first(std & (host % u64(C) != 0), lambda i: f"cluster offset {int(host[i]):#x} is not cluster-aligned")
        first(std & (host == 0) & ((e & u64(QCOW_OFLAG_COPIED)) != 0),
              lambda i: "an unallocated cluster with the COPIED bit (63) set")
        alloc = std & (host != 0)
        # which units of an allocated cluster are read from it
        guest0 = l1_index * g.l2_entries * C
        idx = np.arange(len(e), dtype=np.uint64)
        visible = np.minimum(u64(C), u64(self.size) - (u64(guest0) + idx * u64(C)))
        if bm is not None:
            sub_alloc = bm & u64(0xFFFFFFFF)
            sub_zero = bm >> u64(32)
            first(std & ((sub_alloc & sub_zero) != 0),
                  lambda i: f"subcluster bitmap {int(bm[i]):#018x} marks subclusters both allocated and zero")
            first(std & (host == 0) & (sub_alloc != 0),
                  lambda i: f"subcluster bitmap {int(bm[i]):#018x} allocates subclusters of an unallocated cluster")
            # the last allocated subcluster bounds what must be in the file
            top = np.zeros(len(e), dtype=np.uint64)
            for k in range(SUBCLUSTERS_PER_CLUSTER):
                top = np.where((sub_alloc >> u64(k)) & u64(1) != 0, u64(k + 1), top)
            need = np.minimum(top << u64(g.unit_bits), visible)
            data = alloc & (top != 0)
        else:
            zero = (e & u64(QCOW_OFLAG_ZERO)) != 0
            need = visible
            data = alloc & ~zero
        first(alloc & (host > u64(MAX_CLUSTER_OFFSET)), lambda i: f"cluster offset {int(host[i]):#x} above 2**56")
        first(data & (host + need > u64(self.file_size)),
              lambda i: f"data cluster offset {int(host[i]):#x} runs past the end of the file "
                        f"({self.file_size} bytes)")
        for name, lo, length in self._regions:
            first(alloc & (host < u64(lo + length)) & (host + u64(C) > u64(lo)),
                  lambda i, name=name: f"cluster offset {int(host[i]):#x} overlaps {name}")
        if bad:
            i, what = min(bad, key=lambda b: b[0])
            raise self._corrupt(f"L2 table {l1_index} (offset {l2_off:#x}) entry {i} (guest offset "
                                f"{guest0 + i * C:#x}): {what}")

    def _units(self, l1_index: int, c0: int, c1: int):
        """Per read unit of clusters [c0, c1) of one L2 table: (kinds, hosts).

        hosts: the host offset of a DATA unit; the L2 index of a COMPRESSED
        one; 0 otherwise."""
        g = self.geometry
        entries, bitmaps, _ = self._l2_table(l1_index)
        per = SUBCLUSTERS_PER_CLUSTER if g.extended_l2 else 1
        n = (c1 - c0) * per
        unallocated = BACKING if self.backing is not None else ZERO
        if entries is None:
            return np.full(n, unallocated, dtype=np.uint8), np.zeros(n, dtype=np.uint64)
        e = entries[c0:c1]
        u64 = np.uint64
        gbase = l1_index << g.l2_bits          # COMPRESSED units carry the global guest cluster index
        comp = (e & u64(QCOW_OFLAG_COMPRESSED)) != 0
        host = np.where(comp, u64(0), e & u64(L2E_OFFSET_MASK))
        if not g.extended_l2:
            kinds = np.full(len(e), unallocated, dtype=np.uint8)
            kinds[host != 0] = DATA
            kinds[~comp & ((e & u64(QCOW_OFLAG_ZERO)) != 0)] = ZERO
            kinds[comp] = COMPRESSED
            hosts = np.where(kinds == DATA, host, u64(0))
            hosts[comp] = np.arange(gbase + c0, gbase + c1, dtype=np.uint64)[comp]
            return kinds, hosts
        bm = bitmaps[c0:c1]
        k = np.arange(SUBCLUSTERS_PER_CLUSTER, dtype=np.uint64)
        alloc = ((bm[:, None] >> k) & u64(1)) != 0
        zero = ((bm[:, None] >> (k + u64(32))) & u64(1)) != 0
        kinds = np.full((len(e), SUBCLUSTERS_PER_CLUSTER), unallocated, dtype=np.uint8)
        kinds[alloc & (host != 0)[:, None]] = DATA
        kinds[zero] = ZERO
        kinds[comp] = COMPRESSED
        hosts = host[:, None] + (k << u64(g.unit_bits))[None, :]
        hosts = np.where(kinds == DATA, hosts, u64(0))
        hosts[comp] = np.arange(gbase + c0, gbase + c1, dtype=np.uint64)[comp][:, None]
        return kinds.reshape(-1), hosts.reshape(-1)

    def _walk(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Runs (guest offset, length, kind, host) covering [start, end):
        host is the host offset of the run's first byte for DATA, the guest
        cluster index for COMPRESSED.  Contiguous DATA runs are merged."""
        g = self.geometry
        C = self.cluster_size
        ub = g.unit_bits
        U = 1 << ub
        end = min(end, self.size)
        if start >= end:
            return
        pending = None
        per_table = g.l2_entries * C
        # bounded work per step: at most 64 Ki read units
        clusters_per_step = (1 << 16) // SUBCLUSTERS_PER_CLUSTER if g.extended_l2 else 1 << 16
        unallocated = BACKING if self.backing is not None else ZERO
        pos = start
        while pos < end:
            l1i = offset_to_l1_index(g, pos)
            table_base = l1i * per_table
            first, l1 = self._l1_entries(l1i)
            if not int(l1[l1i - first]) & L1E_OFFSET_MASK:
                # a run of unallocated L1 entries: one step, however long
                nz = np.flatnonzero(l1[l1i - first:] & np.uint64(L1E_OFFSET_MASK))
                nxt = l1i + int(nz[0]) if len(nz) else first + len(l1)
                lo, hi = pos, min(nxt * per_table, end)
                if pending is not None:
                    if pending[2] == unallocated and pending[0] + pending[1] == lo:
                        pending = (pending[0], pending[1] + hi - lo, unallocated, 0)
                        pos = hi
                        continue
                    yield pending
                pending = (lo, hi - lo, unallocated, 0)
                pos = hi
                continue
            c0 = (pos - table_base) >> g.cluster_bits
            table_end = min(table_base + per_table, end)
            c1 = min((table_end - table_base + C - 1) >> g.cluster_bits, c0 + clusters_per_step)
            kinds, hosts = self._units(l1i, c0, c1)
            base = table_base + (c0 << g.cluster_bits)
            if len(kinds) > 1:
                step = np.diff(hosts.astype(np.int64))
                brk = (kinds[1:] != kinds[:-1]) | ((kinds[1:] == DATA) & (step != U)) | \
                      ((kinds[1:] == COMPRESSED) & (step != 0))
                starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
            else:
                starts = np.zeros(1, dtype=np.int64)
            stops = np.append(starts[1:], len(kinds))
            for s, t, kind, host in zip(starts.tolist(), stops.tolist(), kinds[starts].tolist(),
                                        hosts[starts].tolist()):
                lo = max(base + (s << ub), pos)
                hi = min(base + (t << ub), end)
                if lo >= hi:
                    continue
                if kind == DATA:
                    host += lo - (base + (s << ub))
                if pending is not None:
                    p_off, p_len, p_kind, p_host = pending
                    if p_kind == kind and p_off + p_len == lo and kind != COMPRESSED and \
                            (kind != DATA or p_host + p_len == host):
                        pending = (p_off, p_len + hi - lo, kind, p_host)
                        continue
                    yield pending
                pending = (lo, hi - lo, kind, host)
            pos = min(base + ((c1 - c0) << g.cluster_bits), end)
        if pending is not None:
            yield pending

    # ------------------------------------------------------------------ the reading API
    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, data) runs covering [start, end); data False reads as zeros."""
        end = self.size if end is None else min(end, self.size)
        pending = None

        def emit(off, length, data):
            nonlocal pending
            if length <= 0:
                return None
            if pending is not None and pending[2] == data and pending[0] + pending[1] == off:
                pending = (pending[0], pending[1] + length, data)
                return None
            out, pending = pending, (off, length, data)
            return out

        for off, length, kind, host in self._walk(start, end):
            pieces: list[tuple[int, int, bool]]
            if kind == ZERO:
                pieces = [(off, length, False)]
            elif kind == COMPRESSED:
                pieces = [(off, length, True)]
            elif kind == DATA:
                pieces = []
                pos, h = off, host
                while pos < off + length:       # host holes (preallocation) read as zeros: skip them
                    is_data, until = self._host.segment(h)
                    n = min(off + length - pos, until - h)
                    pieces.append((pos, n, is_data))
                    pos += n
                    h += n
            else:
                pieces = []
                bsize = self.backing.size
                if off < bsize:
                    pieces.extend(self.backing.extents(off, min(off + length, bsize)))
                if off + length > bsize:
                    lo = max(off, bsize)
                    pieces.append((lo, off + length - lo, False))
            for piece in pieces:
                out = emit(*piece)
                if out is not None:
                    yield out
        if pending is not None:
            yield pending

    def readinto(self, buf, offset: int) -> int:
        """Fill buf with the guest bytes at offset (which must lie inside the virtual size)."""
        mv = memoryview(buf).cast("B")
        self.readv([(mv, offset)])
        return len(mv)

    def readv(self, pieces) -> None:
        """Fill several (buffer, offset) pieces: like readinto on each, but the
        compressed clusters of all pieces are decompressed together (in
        parallel), which keeps the decompression threads busy."""
        compressed: list[tuple[memoryview, int, int]] = []   # (target, offset in cluster, guest cluster)
        C = self.cluster_size
        for buf, offset in pieces:
            mv = memoryview(buf).cast("B")
            n = len(mv)
            if offset < 0 or offset + n > self.size:
                raise OutOfRangeError(f"{self.path}: read of {n} bytes at {offset} outside the virtual size "
                                      f"{self.size}")
            arr = np.frombuffer(mv, dtype=np.uint8)
            for off, length, kind, host in self._walk(offset, offset + n):
                at = off - offset
                if kind == ZERO:
                    arr[at:at + length] = 0
                elif kind == DATA:
                    self._pread_into(mv[at:at + length], host)
                elif kind == COMPRESSED:
                    compressed.append((mv[at:at + length], off - host * C, host))
                else:
                    bsize = self.backing.size
                    inside = max(0, min(off + length, bsize) - off)
                    if inside:
                        self.backing.readinto(mv[at:at + inside], off)
                    arr[at + inside:at + length] = 0
        if compressed:
            self._read_compressed(compressed)

    def pread(self, n: int, offset: int) -> bytes:
        buf = bytearray(n)
        self.readinto(buf, offset)
        return bytes(buf)

    def _pread_into(self, mv: memoryview, host: int) -> None:
        self._io.preadinto(mv, host)     # past EOF (a shrinking file): zeros

    def _read_compressed(self, runs: list[tuple[memoryview, int, int]]) -> None:
        """Fill the targets of runs (target, offset in cluster, guest cluster)
        from their compressed clusters: clusters that lie close together in
        the file are read with one pread, then decompressed in threads."""
        g = self.geometry
        C = self.cluster_size
        descs = {}
        last = self._last_compressed
        for _t, _w, cl in runs:
            if cl not in descs and not (last is not None and last[0] == cl):
                l1i, l2i = cl >> g.l2_bits, cl & (g.l2_entries - 1)
                entry = int(self._l2_table(l1i)[0][l2i])
                descs[cl] = parse_compressed_l2_entry(g, entry)
        clusters: dict[int, bytes] = {}
        if last is not None:
            clusters[last[0]] = last[1]
        order = sorted(descs.items(), key=lambda kv: kv[1][0])
        i = 0
        jobs = []
        while i < len(order):           # group into spans of at most 16 MiB with small gaps
            j = i
            lo = order[i][1][0]
            hi = lo + order[i][1][1]
            while j + 1 < len(order):
                co, cs = order[j + 1][1]
                if co - hi > 64 * KiB or max(hi, co + cs) - lo > 16 * MiB:
                    break
                hi = max(hi, co + cs)
                j += 1
            span = self._io.pread(hi - lo, lo)
            for cl, (co, cs) in order[i:j + 1]:
                jobs.append((cl, co, memoryview(span)[co - lo:co - lo + cs]))
            i = j + 1
        results = _map_decompress(jobs, C, self.compression_type, self._zstd_ctx_factory)
        for (cl, co, _data), (out, err) in zip(jobs, results):
            if err is not None or len(out) != C:
                reason = err if err is not None else f"it decompresses to {len(out)} bytes, not the cluster size {C}"
                raise self._corrupt(f"compressed cluster at host offset {co:#x} (guest offset {cl * C:#x}): "
                                    f"{reason}")
            clusters[cl] = out
        for target, within, cl in runs:
            target[:] = clusters[cl][within:within + len(target)]
        tail = runs[-1][2]
        self._last_compressed = (tail, clusters[tail])

    @staticmethod
    def _zstd_ctx_factory():
        return _zstd_decompressor()       # one context per thread: they are not thread-safe

    # ------------------------------------------------------------------ info, close
    def info(self) -> dict:
        return {"format": "qcow2", "version": self.version, "virtual_size": self.size,
                "cluster_size": self.cluster_size, "extended_l2": self.geometry.extended_l2,
                "compression_type": COMPRESSION_NAMES[self.compression_type],
                "refcount_bits": 1 << self.header.refcount_order, "dirty": self.dirty,
                "snapshots": self.header.nb_snapshots, "backing_file": self.backing_file}

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self._io is not None:
            self._io.close()
            self._io = None

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------- parallel decompression
_POOL = None
_POOL_WORKERS = 1


def _pool():
    """The decompression threads: one per usable core, at most 8."""
    global _POOL, _POOL_WORKERS
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _POOL_WORKERS = max(1, min(8, cores))
        _POOL = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="vdisk-qcow2")
    return _POOL


def _decompress_one(job, cluster_size, compression_type, ctx):
    try:
        return _decompress(job[2], cluster_size, compression_type, ctx), None
    except BadCompressedCluster as exc:
        return b"", str(exc)
    except Exception as exc:         # zlib.error, ZstdError, ...: reported with the location
        return b"", f"it does not decompress ({type(exc).__name__}: {exc})"


def _map_decompress(jobs, cluster_size: int, compression_type: int, ctx_factory):
    """Decompress jobs (cluster, host offset, data), in threads when there
    are enough to pay for them (zlib and zstd release the GIL)."""
    if len(jobs) < 4:
        ctx = ctx_factory() if compression_type == COMPRESSION_ZSTD else None
        return [_decompress_one(j, cluster_size, compression_type, ctx) for j in jobs]
    pool = _pool()
    workers = _POOL_WORKERS
    chunks = [jobs[i::workers] for i in range(workers)]

    def work(chunk):
        ctx = ctx_factory() if compression_type == COMPRESSION_ZSTD else None
        return [_decompress_one(j, cluster_size, compression_type, ctx) for j in chunk]

    parts = list(pool.map(work, chunks))
    out = [None] * len(jobs)
    for w, part in enumerate(parts):
        out[w::workers] = part
    return out


# ---------------------------------------------------------------------------- the writer
class Qcow2Writer:
    """Stream a version 3 qcow2 image into an open, empty file, a FileIO (see the module docstring).

    Call :meth:`write` with cluster-aligned pieces in increasing guest
    order, holding only clusters to allocate (the caller drops zero
    clusters), then :meth:`finish`.  The caller syncs and renames the file.
    """

    REFCOUNT_ORDER = 4

    def __init__(self, out: FileIO, size: int, cluster_size: int = 64 * KiB):
        if cluster_size & (cluster_size - 1) or not (1 << MIN_CLUSTER_BITS) <= cluster_size <= (1 << MAX_CLUSTER_BITS):
            raise InvalidArgumentError(f"qcow2 cluster size {cluster_size}: must be a power of two from 512 bytes "
                                       f"to 2 MiB")
        if size % 512:
            raise InvalidArgumentError(f"qcow2 virtual size {size} is not a multiple of 512")
        self.out = out           # the output file: its pwrite and truncate (FileIO: errors name its path)
        self.size = size
        self.geometry = g = Geometry(cluster_size.bit_length() - 1, False)
        self.cluster_size = C = cluster_size
        self.l1_size = size_to_l1(g, size)
        if self.l1_size * 8 > MAX_L1_SIZE:
            raise OutOfRangeError(f"a qcow2 image of {size} bytes with {C}-byte clusters needs an L1 table of "
                                  f"{self.l1_size * 8} bytes, over qemu's limit of {MAX_L1_SIZE}; use larger clusters")
        self.l1 = np.zeros(self.l1_size, dtype=np.uint64)
        self.l1_offset = C
        self.l1_clusters = -(-self.l1_size * 8 // C)        # none for an empty disk: nothing to refcount
        self.next_cluster = 1 + self.l1_clusters
        self._l2_index = -1
        self._l2: np.ndarray | None = None
        self._last_guest = -1
        self.data_clusters = 0

    def write(self, view, guest_offset: int) -> None:
        """Allocate and write the clusters of view (cluster-aligned, whole
        clusters except the last one of the disk, which is zero-padded)."""
        mv = memoryview(view).cast("B")
        C = self.cluster_size
        g = self.geometry
        if guest_offset % C or guest_offset <= self._last_guest and len(mv):
            raise InvalidArgumentError(f"qcow2 writer: piece at {guest_offset} is unaligned or out of order")
        if guest_offset + len(mv) > self.size:
            raise OutOfRangeError(f"qcow2 writer: piece at {guest_offset} of {len(mv)} bytes past the size {self.size}")
        n = -(-len(mv) // C)
        pos = 0
        while pos < n:
            gc = (guest_offset >> g.cluster_bits) + pos
            l1i = gc >> g.l2_bits
            if l1i != self._l2_index:
                self._flush_l2()
                self._l2_index = l1i
                self._l2 = np.zeros(g.l2_entries, dtype=np.uint64)
            # clusters up to the end of this L2 table are contiguous in the file
            stop = min(n, pos + (((l1i + 1) << g.l2_bits) - gc))
            host = self.next_cluster * C
            piece = mv[pos * C:stop * C]
            if len(piece) % C:
                piece = bytes(piece) + bytes(C - len(piece) % C)
            self.out.pwrite(piece, host)
            count = stop - pos
            first = gc & (g.l2_entries - 1)
            self._l2[first:first + count] = (np.arange(count, dtype=np.uint64) * np.uint64(C)
                                             + np.uint64(host)) | np.uint64(QCOW_OFLAG_COPIED)
            self.next_cluster += count
            self.data_clusters += count
            pos = stop
        self._last_guest = guest_offset + (n - 1) * C

    def _flush_l2(self) -> None:
        if self._l2 is None:
            return
        host = self.next_cluster * self.cluster_size
        self.out.pwrite(self._l2.astype(">u8").tobytes(), host)
        self.l1[self._l2_index] = np.uint64(host) | np.uint64(QCOW_OFLAG_COPIED)
        self.next_cluster += 1
        self._l2 = None
        self._l2_index = -1

    def finish(self) -> int:
        """Write the L1 table, the refcounts and the header; returns the file size."""
        self._flush_l2()
        C = self.cluster_size
        entries = C * 8 // (1 << self.REFCOUNT_ORDER)       # refcounts per refcount block
        m = self.next_cluster
        blocks, rt_clusters = 0, 0
        while True:                                          # refcount metadata covers itself
            total = m + rt_clusters + blocks
            need_blocks = -(-total // entries)
            need_rt = max(1, -(-need_blocks * 8 // C))
            if (need_blocks, need_rt) == (blocks, rt_clusters):
                break
            blocks, rt_clusters = need_blocks, need_rt
        if rt_clusters * C > MAX_REFTABLE_SIZE:
            raise OutOfRangeError(f"the qcow2 refcount table would need {rt_clusters * C} bytes, over qemu's "
                                  f"limit of {MAX_REFTABLE_SIZE}; use larger clusters")
        total = m + rt_clusters + blocks
        rt_offset = m * C
        rb_first = m + rt_clusters
        reftable = np.zeros(rt_clusters * C // 8, dtype=">u8")
        reftable[:blocks] = (np.arange(blocks, dtype=np.uint64) + np.uint64(rb_first)) * np.uint64(C)
        self.out.pwrite(reftable.tobytes(), rt_offset)
        full = np.ones(entries, dtype=">u2").tobytes()
        for b in range(blocks):
            covered = min(entries, total - b * entries)
            if covered == entries:
                block = full
            else:
                partial = np.zeros(entries, dtype=">u2")
                partial[:covered] = 1
                block = partial.tobytes()
            self.out.pwrite(block, (rb_first + b) * C)
        if self.l1_clusters:
            l1_bytes = self.l1.astype(">u8").tobytes()
            self.out.pwrite(l1_bytes.ljust(self.l1_clusters * C, b"\0"), self.l1_offset)
        h = Qcow2Header(version=3, cluster_bits=self.geometry.cluster_bits, size=self.size, l1_size=self.l1_size,
                        l1_table_offset=self.l1_offset, refcount_table_offset=rt_offset,
                        refcount_table_clusters=rt_clusters, refcount_order=self.REFCOUNT_ORDER,
                        header_length=V3_HEADER_LENGTH, compression_type=COMPRESSION_ZLIB)
        self.out.pwrite(h.pack().ljust(C, b"\0"), 0)
        self.out.truncate(total * C)
        return total * C
