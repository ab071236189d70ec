"""qcow2: the on-disk structures, a reader that treats every image as hostile, and a writer.

One module per concern, as dissect.hypervisor splits its qcow2 support:
:mod:`~vdisk.qcow2.structures` (the on-disk records and constants, no I/O),
:mod:`~vdisk.qcow2.backing` (which backing file may be followed),
:mod:`~vdisk.qcow2.compressed` (compressed clusters),
:mod:`~vdisk.qcow2.reader` (:class:`Qcow2Image`),
:mod:`~vdisk.qcow2.writer` (:class:`Qcow2Writer`) and
:mod:`~vdisk.qcow2.updater` (:class:`~vdisk.qcow2.updater.Qcow2Updater`:
writing into an existing image, ``convert -n``; its contract, the write
order that keeps a crash to leaked clusters, is its module docstring).  Every name is
also importable from the package, as from the one module it was.

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

from .structures import (  # noqa: F401 - the package's names
    BACKING as BACKING, COMPRESSED as COMPRESSED, COMPRESSED_SECTOR_SIZE as COMPRESSED_SECTOR_SIZE,
    COMPRESSION_NAMES as COMPRESSION_NAMES, COMPRESSION_ZLIB as COMPRESSION_ZLIB,
    COMPRESSION_ZSTD as COMPRESSION_ZSTD, CRYPT_AES as CRYPT_AES, CRYPT_LUKS as CRYPT_LUKS,
    CRYPT_NONE as CRYPT_NONE, DATA as DATA, EXTENSION as EXTENSION,
    EXTL2_MIN_CLUSTER_BITS as EXTL2_MIN_CLUSTER_BITS, EXT_BACKING_FORMAT as EXT_BACKING_FORMAT,
    EXT_BITMAPS as EXT_BITMAPS, EXT_CRYPTO as EXT_CRYPTO, EXT_DATA_FILE as EXT_DATA_FILE, EXT_END as EXT_END,
    EXT_FEATURE_TABLE as EXT_FEATURE_TABLE, FEATURE_ENTRY as FEATURE_ENTRY, Geometry as Geometry,
    HEADER_V2 as HEADER_V2, HEADER_V3 as HEADER_V3, INCOMPAT_COMPRESSION as INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT as INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE as INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY as INCOMPAT_DIRTY, INCOMPAT_EXTL2 as INCOMPAT_EXTL2, INCOMPAT_KNOWN as INCOMPAT_KNOWN,
    INCOMPAT_NAMES as INCOMPAT_NAMES, INT_MAX as INT_MAX, KiB as KiB, L1E_OFFSET_MASK as L1E_OFFSET_MASK,
    L1E_RESERVED_MASK as L1E_RESERVED_MASK, L1_WINDOW as L1_WINDOW, L2E_OFFSET_MASK as L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK as L2E_STD_RESERVED_MASK, L2_CACHE as L2_CACHE, MAGIC as MAGIC,
    MAX_BACKING_DEPTH as MAX_BACKING_DEPTH, MAX_BACKING_FILE_NAME as MAX_BACKING_FILE_NAME,
    MAX_BACKING_FORMAT_NAME as MAX_BACKING_FORMAT_NAME, MAX_CLUSTER_BITS as MAX_CLUSTER_BITS,
    MAX_CLUSTER_OFFSET as MAX_CLUSTER_OFFSET, MAX_L1_SIZE as MAX_L1_SIZE,
    MAX_REFCOUNT_ORDER as MAX_REFCOUNT_ORDER, MAX_REFTABLE_SIZE as MAX_REFTABLE_SIZE,
    MAX_SNAPSHOTS as MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE as MAX_SNAPSHOTS_SIZE,
    MAX_SNAPSHOT_EXTRA_DATA as MAX_SNAPSHOT_EXTRA_DATA, MIN_CLUSTER_BITS as MIN_CLUSTER_BITS, MiB as MiB,
    QCOW_OFLAG_COMPRESSED as QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED as QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO as QCOW_OFLAG_ZERO, Qcow2Header as Qcow2Header, Qcow2Snapshot as Qcow2Snapshot,
    REFTABLE_WINDOW as REFTABLE_WINDOW,
    REFT_OFFSET_MASK as REFT_OFFSET_MASK, REFT_RESERVED_MASK as REFT_RESERVED_MASK,
    SECTOR_SIZE as SECTOR_SIZE, SNAPSHOT_ENTRY as SNAPSHOT_ENTRY,
    SUBCLUSTERS_PER_CLUSTER as SUBCLUSTERS_PER_CLUSTER, V2_HEADER_LENGTH as V2_HEADER_LENGTH,
    V3_HEADER_LENGTH as V3_HEADER_LENGTH, V3_MIN_HEADER_LENGTH as V3_MIN_HEADER_LENGTH, ZERO as ZERO,
    _round_up as _round_up, offset_to_l1_index as offset_to_l1_index,
    offset_to_l2_index as offset_to_l2_index, parse_compressed_l2_entry as parse_compressed_l2_entry,
    probe as probe, size_to_l1 as size_to_l1)
from .backing import (  # noqa: F401 - the package's names
    _check_regular as _check_regular, has_protocol as has_protocol, resolve_backing as resolve_backing)
from .compressed import (  # noqa: F401 - the package's names
    BadCompressedCluster as BadCompressedCluster, ZSTD_MAGIC as ZSTD_MAGIC,
    ZSTD_MAX_WINDOW as ZSTD_MAX_WINDOW, ZSTD_SKIPPABLE_MAGIC as ZSTD_SKIPPABLE_MAGIC,
    ZSTD_SKIPPABLE_MASK as ZSTD_SKIPPABLE_MASK, _decompress as _decompress,
    _decompress_one as _decompress_one, _map_decompress as _map_decompress, _pool as _pool,
    _zstd_decompress as _zstd_decompress, _zstd_decompressor as _zstd_decompressor,
    _zstd_frame_end as _zstd_frame_end, zstd_piece_budget as zstd_piece_budget)
from .reader import (  # noqa: F401 - the package's names
    Qcow2Image as Qcow2Image)
from .writer import (  # noqa: F401 - the package's names
    Qcow2Writer as Qcow2Writer)
