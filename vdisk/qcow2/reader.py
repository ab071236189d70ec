"""The qcow2 reader, :class:`Qcow2Image`: the active layer of a version 2 or
3 image, every table and pointer bounded and checked first (the contract is
the docstring of the vdisk.qcow2 package)."""
from __future__ import annotations

import dataclasses
import os
import struct
from collections import OrderedDict
from typing import Callable, Iterator

import numpy as np

from ..errors import CorruptImageError, FormatError, OutOfRangeError, SnapshotNotFoundError, UnsupportedFeatureError
from ..fileio import FileIO, HostMap, open_input
from .backing import resolve_backing
from .compressed import _map_decompress, _zstd_decompressor
from .structures import (BACKING, COMPRESSED, COMPRESSED_SECTOR_SIZE, COMPRESSION_NAMES, COMPRESSION_ZLIB,
                         COMPRESSION_ZSTD, CRYPT_AES, CRYPT_LUKS, CRYPT_NONE, DATA, EXTENSION,
                         EXTL2_MIN_CLUSTER_BITS, EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_END, EXT_FEATURE_TABLE,
                         FEATURE_ENTRY, Geometry, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE,
                         INCOMPAT_DIRTY, INCOMPAT_EXTL2, INCOMPAT_KNOWN, INT_MAX, KiB, L1E_OFFSET_MASK,
                         L1E_RESERVED_MASK, L1_WINDOW, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, L2_CACHE,
                         MAX_BACKING_DEPTH, MAX_BACKING_FILE_NAME, MAX_BACKING_FORMAT_NAME, MAX_CLUSTER_BITS,
                         MAX_CLUSTER_OFFSET, MAX_L1_SIZE, MAX_REFCOUNT_ORDER, MAX_REFTABLE_SIZE,
                         MAX_SNAPSHOTS, MAX_SNAPSHOTS_SIZE, MAX_SNAPSHOT_EXTRA_DATA, MIN_CLUSTER_BITS, MiB,
                         QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, Qcow2Header, Qcow2Snapshot,
                         REFTABLE_WINDOW, REFT_OFFSET_MASK, REFT_RESERVED_MASK, SECTOR_SIZE, SNAPSHOT_ENTRY,
                         SUBCLUSTERS_PER_CLUSTER, V2_HEADER_LENGTH, V3_MIN_HEADER_LENGTH, ZERO, _round_up,
                         offset_to_l1_index, parse_compressed_l2_entry, probe, size_to_l1)
from .structures import COMPAT_LAZY_REFCOUNTS, decode_refcounts


# qemu's subcluster types (QCow2SubclusterType), and qemu-img map's flags for each:
# (present, zero, data); MAP_NORMAL_HOLE: a data cluster whose host bytes are a hole, as qemu
# sees it when it asks the host file (metadata preallocation)
MAP_UNALLOCATED_PLAIN, MAP_UNALLOCATED_ALLOC, MAP_ZERO_PLAIN, MAP_ZERO_ALLOC, MAP_NORMAL, MAP_COMPRESSED, \
    MAP_NORMAL_HOLE = range(7)
MAP_FLAGS = {MAP_UNALLOCATED_PLAIN: (False, True, False), MAP_UNALLOCATED_ALLOC: (False, True, False),
             MAP_ZERO_PLAIN: (True, True, False), MAP_ZERO_ALLOC: (True, True, False),
             MAP_NORMAL: (True, False, True), MAP_COMPRESSED: (True, False, True), MAP_NORMAL_HOLE: (True, True, True)}
MAP_HAS_OFFSET = np.array([False, True, False, True, True, False, True])


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
                 chain: tuple[str, ...] = (), snapshot: str | None = None):
        self.path = os.fspath(path)
        self.snapshots: list[Qcow2Snapshot] = []      # the internal snapshots, in table order
        self.snapshot: Qcow2Snapshot | None = None   # the one read in place of the active layer
        self.backing = None
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        self.extension_types: list[int] = []        # the header extensions present, in order
        self._io: FileIO | None = None
        # fd: the image opened by the caller (fileio.open_input), owned from here on
        self._io = FileIO.adopt(open_input(self.path) if fd is None else fd, self.path)
        try:
            self.file_size = os.lseek(self._io.fd, 0, os.SEEK_END)     # st_size is 0 for a block device
            self._open()
            self._active = (self.header, self.size, self._l1_needed)
            if snapshot is not None:
                self._select_snapshot(snapshot)
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
            (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, clock, vm_state, extra) = SNAPSHOT_ENTRY.unpack(
                read(SNAPSHOT_ENTRY.size, pos, what))
            if extra > MAX_SNAPSHOT_EXTRA_DATA:
                raise self._corrupt(f"{what} (offset {pos:#x}) has {extra} bytes of extra data; at most "
                                    f"{MAX_SNAPSHOT_EXTRA_DATA}")
            used = SNAPSHOT_ENTRY.size + extra + id_len + name_len
            length = _round_up(used, 8)     # entries are 8-aligned; qemu leaves the last one unpadded in the file
            if pos + length - start > MAX_SNAPSHOTS_SIZE:
                raise self._corrupt(f"the snapshot table is larger than qemu's limit of "
                                    f"{MAX_SNAPSHOTS_SIZE // MiB} MiB (at entry {i})")
            if pos + used > self.file_size:
                raise self._corrupt(f"{what} at offset {pos:#x} ({used} bytes) runs past the end of the file")
            if l1_size > MAX_L1_SIZE // 8:
                raise self._corrupt(f"{what}: its L1 table has {l1_size} entries, over qemu's limit of "
                                    f"{MAX_L1_SIZE // 8}")
            if l1_size:
                self._check_table(l1_off, l1_size * 8, f"{what}'s L1 table")
            body = read(used - SNAPSHOT_ENTRY.size, pos + SNAPSHOT_ENTRY.size, what) if used > SNAPSHOT_ENTRY.size \
                else b""
            ext = body[:extra]
            vm_large = int.from_bytes(ext[0:8], "big") if extra >= 8 else vm_state
            disk_size = int.from_bytes(ext[8:16], "big") if extra >= 16 else None
            icount = int.from_bytes(ext[16:24], "big") if extra >= 24 else None
            ident = body[extra:extra + id_len].decode("utf-8", "replace")
            name = body[extra + id_len:extra + id_len + name_len].decode("utf-8", "replace")
            self.snapshots.append(Qcow2Snapshot(ident, name, l1_off, l1_size, date_sec, date_nsec, clock, vm_large,
                                                disk_size, icount))
            pos += length
        return pos - start

    def _select_snapshot(self, which: str) -> None:
        """Read internal snapshot `which` (its name, else its id) in place of
        the active layer: its L1 table and its virtual size (reference:
        qcow2_snapshot_load_tmp, which qemu-img convert -l uses)."""
        rec = next((s for s in self.snapshots if s.name == which), None) or \
            next((s for s in self.snapshots if s.id == which), None)
        if rec is None:
            names = ", ".join(s.name for s in self.snapshots) or "none"
            raise SnapshotNotFoundError(f"{self.path}: no internal snapshot {which!r} (snapshots: {names})")
        size = self._active[0].size if rec.disk_size is None else rec.disk_size
        need = size_to_l1(self.geometry, size)
        if size > (1 << 63) - 1 or need > MAX_L1_SIZE // 8:
            raise self._corrupt(f"snapshot {rec.name!r}: virtual size {size} is too big for its clusters")
        if rec.l1_size < need:
            raise self._corrupt(f"snapshot {rec.name!r}: its L1 table has {rec.l1_size} entries for a virtual "
                                f"size of {size} bytes, which needs {need}")
        h = self._active[0]
        self.header = dataclasses.replace(h, l1_table_offset=rec.l1_table_offset, l1_size=rec.l1_size)
        self.size = size - size % SECTOR_SIZE
        self._l1_needed = need
        self.snapshot = rec

    def select(self, which: str | None) -> None:
        """Read internal snapshot `which` (name, else id) from now on, or the
        active layer again (None); ``size`` follows."""
        if which is None:
            self.header, self.size, self._l1_needed = self._active
            self.snapshot = None
        else:
            self._select_snapshot(which)
        self._l1_cache = None
        self._l2_cache.clear()
        self._last_compressed = None

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
            self.extension_types.append(typ)
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

    # ------------------------------------------------------------------ qemu-img map
    def _subcluster_types(self, l1_index: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Per read unit of clusters [c0, c1) of one L2 table: (qemu's subcluster type, host offset),
        the types as MAP_* (reference: qcow2_get_subcluster_type)."""
        g = self.geometry
        per = SUBCLUSTERS_PER_CLUSTER if g.extended_l2 else 1
        entries, bitmaps, _ = self._l2_table(l1_index)
        if entries is None:
            n = (c1 - c0) * per
            return np.full(n, MAP_UNALLOCATED_PLAIN, np.uint8), np.zeros(n, np.uint64)
        u64 = np.uint64
        e = entries[c0:c1]
        comp = (e & u64(QCOW_OFLAG_COMPRESSED)) != 0
        host = np.where(comp, u64(0), e & u64(L2E_OFFSET_MASK))
        if not g.extended_l2:
            zero = ~comp & ((e & u64(QCOW_OFLAG_ZERO)) != 0)
            t = np.where(zero, np.where(host != 0, MAP_ZERO_ALLOC, MAP_ZERO_PLAIN),
                         np.where(host != 0, MAP_NORMAL, MAP_UNALLOCATED_PLAIN))
            t = np.where(comp, MAP_COMPRESSED, t).astype(np.uint8)
            return t, host
        k = np.arange(SUBCLUSTERS_PER_CLUSTER, dtype=u64)
        bm = bitmaps[c0:c1][:, None]
        alloc = ((bm >> k) & u64(1)) != 0
        zero = ((bm >> (k + u64(32))) & u64(1)) != 0
        has = (host != 0)[:, None]
        t = np.where(zero, np.where(has, MAP_ZERO_ALLOC, MAP_ZERO_PLAIN),
                     np.where(alloc, MAP_NORMAL, np.where(has, MAP_UNALLOCATED_ALLOC, MAP_UNALLOCATED_PLAIN)))
        t = np.where(comp[:, None], MAP_COMPRESSED, t).astype(np.uint8)
        hosts = np.where(has, host[:, None] + (k << u64(g.unit_bits))[None, :], u64(0))
        return t.reshape(-1), hosts.reshape(-1)

    def _map_runs(self) -> Iterator[tuple[int, int, int, int]]:
        """(guest offset, length, MAP_* type, host offset) runs over the virtual size, merged where the
        type is the same and, for the types with a host offset, the host offsets run on."""
        g = self.geometry
        C = self.cluster_size
        U = 1 << g.unit_bits
        per_table = g.l2_entries * C
        step = (1 << 16) // (SUBCLUSTERS_PER_CLUSTER if g.extended_l2 else 1)
        pending = None
        pos = 0
        while pos < self.size:
            l1i = offset_to_l1_index(g, pos)
            base_t = l1i * per_table
            c0 = (pos - base_t) // C
            c1 = min(g.l2_entries, c0 + step, -(-(self.size - base_t) // C))
            t, hosts = self._subcluster_types(l1i, c0, c1)
            base = base_t + c0 * C
            if len(t) > 1:
                brk = (t[1:] != t[:-1]) | (MAP_HAS_OFFSET[t[1:]] & (np.diff(hosts.astype(np.int64)) != U))
                starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
            else:
                starts = np.zeros(1, dtype=np.int64)
            stops = np.append(starts[1:], len(t))
            for a, b, typ, host in zip(starts.tolist(), stops.tolist(), t[starts].tolist(), hosts[starts].tolist()):
                lo, hi = base + a * U, min(base + b * U, self.size)
                if lo >= hi:
                    continue
                if pending is not None:
                    p_off, p_len, p_typ, p_host = pending
                    if p_typ == typ and p_off + p_len == lo and (not MAP_HAS_OFFSET[typ] or p_host + p_len == host):
                        pending = (p_off, p_len + hi - lo, typ, p_host)
                        continue
                    yield pending
                pending = (lo, hi - lo, typ, host)
            pos = base + (c1 - c0) * C
        if pending is not None:
            yield pending

    def metadata_preallocation(self) -> bool:
        """qemu's guess that the image is preallocated with metadata only: more clusters have a refcount
        than the host file has clusters allocated (reference: qcow2_detect_metadata_preallocation).  Then
        qemu asks the host file where an allocated cluster is a hole (it reads as zeros)."""
        C = self.cluster_size
        h = self._active[0]
        real_clusters = os.fstat(self._io.fd).st_blocks * 512 // C
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-self.file_size // C)
        rbe = C * 8 >> h.refcount_order
        n = h.refcount_table_clusters * C // 8
        count = 0
        for first in range(0, min(n, -(-end_cluster // rbe)), REFTABLE_WINDOW):
            k = min(REFTABLE_WINDOW, n - first)
            table = np.frombuffer(self._io.pread(k * 8, h.refcount_table_offset + first * 8), ">u8") \
                & np.uint64(REFT_OFFSET_MASK)
            for i, off in enumerate(table.tolist()):
                b = first + i
                if not off or b * rbe >= end_cluster:
                    continue
                rc = decode_refcounts(self._io.pread(C, off), h.refcount_order)[:end_cluster - b * rbe]
                count += int(np.count_nonzero(rc))
                if count >= threshold:
                    return True
        return False

    def qemu_map(self) -> list[dict]:
        """What ``qemu-img map --output=json`` lists for this image (no backing file): every range of the
        virtual size as ``{"start", "length", "depth", "present", "zero", "data"}`` and ``"offset"``
        (the host offset) where qemu knows one, adjacent ranges merged when their flags agree and their
        host offsets run on (reference: qemu-img.c img_map, qcow2_co_block_status)."""
        if self.backing is not None:
            raise UnsupportedFeatureError(f"{self.path}: qemu-img's map of an image with a backing file")
        recurse = self.metadata_preallocation()
        out: list[dict] = []

        def add(off: int, length: int, typ: int, host: int) -> None:
            if out and out[-1]["_t"] == typ and out[-1]["start"] + out[-1]["length"] == off and \
                    (not MAP_HAS_OFFSET[typ] or out[-1]["offset"] + out[-1]["length"] == host):
                out[-1]["length"] += length
                return
            present, zero, data = MAP_FLAGS[typ]
            e = {"start": off, "length": length, "depth": 0, "present": present, "zero": zero, "data": data,
                 "_t": typ}
            if MAP_HAS_OFFSET[typ]:
                e["offset"] = host
            out.append(e)

        for off, length, typ, host in self._map_runs():
            if typ == MAP_NORMAL and recurse:        # qemu asks the host file (BDRV_BLOCK_RECURSE)
                pos, h = off, host
                while pos < off + length:
                    is_data, until = self._host.segment(h)
                    n = min(off + length - pos, until - h)
                    add(pos, n, MAP_NORMAL if is_data else MAP_NORMAL_HOLE, h)
                    pos += n
                    h += n
            else:
                add(off, length, typ, host)
        for e in out:
            del e["_t"]
        return out

    def format_specific(self) -> dict:
        """qemu-img info's "format-specific" data of the image (reference: qcow2_get_specific_info)."""
        h = self._active[0]
        if self.version == 2:
            return {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 1 << h.refcount_order}
        return {"compat": "1.1", "compression-type": COMPRESSION_NAMES[self.compression_type],
                "lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": 1 << h.refcount_order,
                "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
                "extended-l2": self.geometry.extended_l2}

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
