"""The qcow2 writer, :class:`Qcow2Writer`: a version 3 image streamed into an
empty file (the contract is the docstring of the vdisk.qcow2 package)."""
from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError, OutOfRangeError
from ..fileio import FileIO
from .structures import (COMPRESSION_ZLIB, Geometry, KiB, MAX_CLUSTER_BITS, MAX_L1_SIZE, MAX_REFTABLE_SIZE,
                         MIN_CLUSTER_BITS, QCOW_OFLAG_COPIED, Qcow2Header, V3_HEADER_LENGTH, size_to_l1)


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
