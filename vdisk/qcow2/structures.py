"""qcow2's on-disk structures and constants (reference: qemu's block/qcow2.h
and docs/interop/qcow2.txt), and the geometry helpers named as qemu names
them.  No I/O: the reader and the writer walk what is declared here."""
from __future__ import annotations

import dataclasses
import struct

import numpy as np


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
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
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
class Qcow2Snapshot:
    """One internal snapshot, as its snapshot table entry records it
    (reference: QCowSnapshotHeader and QCowSnapshotExtraData)."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None        # the extra data's virtual size (None: older entries; the image's size)
    icount: int | None


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


def decode_refcounts(raw: bytes, order: int) -> np.ndarray:
    """The refcounts of one refcount block (2**order bits each, big-endian; under 8 bits the lowest
    bits of each byte first, as qemu's get_refcount_ro0..ro2), as uint64."""
    if order >= 3:
        return np.frombuffer(raw, dtype=f">u{1 << (order - 3)}").astype(np.uint64)
    bits, per = 1 << order, 8 >> order
    b = np.frombuffer(raw, dtype=np.uint8).astype(np.uint64)
    shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
    return ((b[:, None] >> shifts) & np.uint64((1 << bits) - 1)).reshape(-1)


def encode_refcounts(arr: np.ndarray, order: int) -> bytes:
    """The bytes of a refcount block holding arr (the inverse of decode_refcounts)."""
    if order >= 3:
        return arr.astype(f">u{1 << (order - 3)}").tobytes()
    bits, per = 1 << order, 8 >> order
    shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
    return (arr.reshape(-1, per) << shifts).sum(axis=1).astype(np.uint8).tobytes()


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
