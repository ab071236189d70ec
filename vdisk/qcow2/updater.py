"""Writing into an existing qcow2 image: :class:`Qcow2Updater` (``vdisk
convert -n SRC DST.qcow2``, as ``qemu-img convert -n``).

The contract
------------
The updater writes guest ranges of an existing version 3 image (made by
``qemu-img create``, written by qemu, or by vdisk) in place of what they
held; every other guest range, the internal snapshots and the header
extensions are left as they are.  It follows qemu's rules for the tables
(docs/interop/qcow2.txt; block/qcow2-refcount.c, qcow2-cluster.c):

* Nothing a table references is ever overwritten.  Every cluster of new
  data goes to a new host cluster at the end of the file; an L2 table
  shared with an internal snapshot (refcount > 1) is copied first, as
  qemu's ``l2_allocate``; an L2 table of the active layer alone is updated
  in place, one 8-byte entry per cluster (sector writes cannot tear an
  entry).  The old clusters lose their reference afterwards; those whose
  refcount drops to 0 are handed back to the host (a punched hole).
* Zero ranges become v3 zero clusters (``QCOW_OFLAG_ZERO``, no host
  cluster; an unallocated cluster, which reads as zeros without a backing
  file, stays unallocated), as ``qemu-img convert -n`` leaves them.
* Every entry of new data carries the COPIED flag (bit 63: refcount 1);
  so does the L1 entry of every new L2 table.
* Writes are gathered into batches, each committed in this order (an
  fsync between phases, so a crash at any point leaves each guest cluster
  reading as before or as after, and ``qemu-img check`` finding at most
  leaked clusters, never a refcount too low or an entry pointing at
  unwritten data):

  1. data clusters, new L2 tables, new refcount blocks, the increments of
     existing refcount blocks, a grown refcount table: nothing references
     any of it yet -- fsync;
  2. the refcount table entries of the new blocks (or the header's
     refcount table pointer, when the table grew) -- fsync;
  3. the L2 entries updated in place and the L1 entries of new L2 tables:
     now the new clusters are referenced -- fsync;
  4. the decrements of the clusters that lost their reference -- fsync;
     then the clusters now at refcount 0 are punched.

  Phases 1 and 2 are apart because a refcount table entry must not point
  at a refcount block before the block is on disk; 3 needs 1 and 2; 4
  must follow 3 (a decrement before the reference is gone could make a
  refcount too low).  A crash before 3 leaks the new clusters, one
  between 3 and 4 leaves the old ones with a refcount too high (a leak).

Refused (the image is not touched): a version 2 image, encryption, an
external data file, extended L2 entries, a backing file, persistent dirty
bitmaps (writing without updating them would make qemu under-report
changes), the dirty bit (refcounts not up to date: lazy refcounts after a
crash) and the corrupt bit; and everything the reader refuses.  Unknown
autoclear feature bits are cleared before the first write, as the spec
asks of a writer that does not know them.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from .. import _fast
from ..errors import CorruptImageError, OutOfRangeError, UnsupportedFeatureError
from ..fileio import FileIO
from .compressed import _decompress, _zstd_decompressor
from .reader import Qcow2Image
from .structures import (COMPRESSED_SECTOR_SIZE, COMPRESSION_ZSTD, CRYPT_NONE, EXT_BITMAPS, INCOMPAT_CORRUPT,
                         INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, L1E_OFFSET_MASK, L1_WINDOW,
                         L2E_OFFSET_MASK, MAX_REFTABLE_SIZE, MiB, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                         QCOW_OFLAG_ZERO, REFT_OFFSET_MASK, Qcow2Header, decode_refcounts, encode_refcounts,
                         offset_to_l1_index,
                         parse_compressed_l2_entry)

HEADER_REFTABLE = struct.Struct(">QI")     # refcount_table_offset, refcount_table_clusters: bytes 48..59
HEADER_REFTABLE_AT = 48
HEADER_AUTOCLEAR_AT = 88
COMMIT_DATA = 256 * MiB          # new data per batch
COMMIT_TABLES = 16 * MiB         # L2 tables held per batch (bytes)
u64 = np.uint64


class _Table:
    """One L2 table of the batch: its entries, where it lives (0: not yet
    allocated), the table it copies (an L2 table shared with a snapshot)."""

    __slots__ = ("entries", "offset", "cow_from", "dirty")

    def __init__(self, entries: np.ndarray, offset: int, cow_from: int = 0):
        self.entries, self.offset, self.cow_from, self.dirty = entries, offset, cow_from, False


class Qcow2Updater:
    """Write guest ranges into the existing qcow2 image open in io (see the module docstring).

    io: a writable :class:`vdisk.fileio.FileIO` (the caller took the locks
    and closes it).  :meth:`write` and :meth:`zero` take any range inside
    the virtual size; :meth:`commit` makes what was handed over durable
    (it runs by itself when a batch is full).  ``fsync_hook`` (tests) is
    called before each fsync of a commit with the phase's name.
    """

    def __init__(self, io: FileIO):
        self.io = io
        self.path = io.path
        head = io.pread(4096, 0)
        h = Qcow2Header.unpack(head) if len(head) >= 104 else None
        if h is not None and head[:4] == b"QFI\xfb":
            self._refuse(h)
        self.reader = Qcow2Image(self.path, fd=os.dup(io.fd))     # validates the rest, as for any input
        try:
            self._open()
        except BaseException:
            self.reader.close()          # its descriptor shares io's open file (and so its locks)
            raise

    def _open(self) -> None:
        io, r = self.io, self.reader
        if r.backing_file is not None:      # pragma: no cover - refused above from the header
            raise UnsupportedFeatureError(f"{self.path}: has a backing file")
        if EXT_BITMAPS in r.extension_types:
            raise UnsupportedFeatureError(
                f"{self.path}: the image has persistent dirty bitmaps, which writing into it without updating "
                f"them would leave reporting too few changes; remove them first ('qemu-img bitmap --remove "
                f"{self.path} NAME', names in 'qemu-img info') or convert into a new image")
        self.header = h = r.header
        self.geometry = g = r.geometry
        self.C = C = r.cluster_size
        self.size = r.size
        self.order = h.refcount_order
        self.rbe = C * 8 >> self.order                 # refcount block entries
        self._zstd = _zstd_decompressor() if r.compression_type == COMPRESSION_ZSTD else None
        # the active L1 table, validated by the reader window by window
        need = r._l1_needed
        parts = [r._l1_entries(first)[1] for first in range(0, need, L1_WINDOW)]
        self.l1 = np.concatenate(parts).astype(u64) if parts else np.zeros(0, u64)
        self.l1_offset = h.l1_table_offset
        # the refcount table (at most 8 MiB, the reader checked its entries)
        self.rt_offset, self.rt_clusters = h.refcount_table_offset, h.refcount_table_clusters
        raw = io.pread(self.rt_clusters * C, self.rt_offset)
        self.reftable = np.frombuffer(raw, dtype=">u8").astype(u64) & u64(REFT_OFFSET_MASK)
        self._blocks: dict[int, np.ndarray] = {}        # refcount blocks read so far, decoded
        self.fsync_hook = None
        if h.autoclear_features:
            # bits 0 (bitmaps) and 1 (raw external data) were refused above; any other is unknown to us
            io.pwrite(struct.pack(">Q", 0), HEADER_AUTOCLEAR_AT)
            self._fsync("autoclear")
        self._new_batch()

    # ------------------------------------------------------------------ refusals
    def _refuse(self, h: Qcow2Header) -> None:
        p = self.path
        if h.version != 3:
            raise UnsupportedFeatureError(
                f"{p}: a qcow2 version {h.version} image (compat=0.10): writing into it is supported for version 3 "
                f"only; upgrade it with 'qemu-img amend -f qcow2 -o compat=1.1 {p}'")
        if h.crypt_method != CRYPT_NONE:
            raise UnsupportedFeatureError(f"{p}: an encrypted qcow2 image (crypt_method {h.crypt_method}); vdisk "
                                          f"does not write encrypted images (use qemu-img convert -n)")
        inc = h.incompatible_features
        if inc & INCOMPAT_CORRUPT:
            raise CorruptImageError(f"{p}: the image is marked corrupt (incompatible bit 1); repair it with "
                                    f"'qemu-img check -r all {p}' first")
        if inc & INCOMPAT_DIRTY:
            raise UnsupportedFeatureError(
                f"{p}: the dirty bit is set (qemu did not close the image cleanly, with lazy refcounts its "
                f"refcounts are not up to date); run 'qemu-img check -r all {p}' first")
        if inc & INCOMPAT_DATA_FILE:
            raise UnsupportedFeatureError(f"{p}: an external data file (incompatible bit 2): vdisk does not write "
                                          f"images whose data lives in another file (use qemu-img convert -n)")
        if inc & INCOMPAT_EXTL2:
            raise UnsupportedFeatureError(
                f"{p}: extended L2 entries (subclusters, extended_l2=on): vdisk does not write them; use "
                f"qemu-img convert -n, or create the target without extended_l2")
        if h.backing_file_offset:
            raise UnsupportedFeatureError(
                f"{p}: the image has a backing file: vdisk does not write into images with one (what SRC reads "
                f"as zeros would have to hide the backing data); use qemu-img convert -n, or drop the backing file "
                f"first ('qemu-img rebase -b \"\" {p}' keeps the content)")

    def _corrupt(self, msg: str) -> CorruptImageError:
        return CorruptImageError(f"{self.path}: {msg} (repair it with 'qemu-img check -r all {self.path}')")

    # ------------------------------------------------------------------ refcounts (reference: qcow2-refcount.c)
    def _decode(self, raw: bytes) -> np.ndarray:
        return decode_refcounts(raw, self.order)

    def _encode(self, arr: np.ndarray) -> bytes:
        return encode_refcounts(arr, self.order)

    def _block_offset(self, b: int) -> int:
        if b in self._new_blocks:
            return self._new_blocks[b]
        return int(self.reftable[b]) if b < len(self.reftable) else 0

    def _block(self, b: int) -> np.ndarray | None:
        """Refcount block b, decoded; None when it does not exist (every refcount 0)."""
        arr = self._blocks.get(b)
        if arr is None:
            off = self._block_offset(b)
            if not off:
                return None
            arr = self._decode(self.io.pread(self.C, off))
            if len(arr) != self.rbe:
                raise self._corrupt(f"refcount block {b} at offset {off:#x} runs past the end of the file")
            self._blocks[b] = arr
        return arr

    def refcount(self, cluster: int) -> int:
        arr = self._block(cluster // self.rbe)
        return 0 if arr is None else int(arr[cluster % self.rbe])

    def _alloc(self, n: int) -> int:
        """n contiguous free clusters at the end of the file (their refcounts checked to be 0); their host
        offset.  The caller records them in self._inc."""
        while True:
            start = self._next
            busy = self._first_used(start, start + n)
            self._next = start + n if busy is None else busy + 1
            if busy is None:
                return start * self.C

    def _first_used(self, lo: int, hi: int) -> int | None:
        """The first cluster of [lo, hi) with a refcount, or None."""
        rbe = self.rbe
        c = lo
        while c < hi:
            b = c // rbe
            stop = min(hi, (b + 1) * rbe)
            arr = self._block(b)
            if arr is not None:
                nz = np.flatnonzero(arr[c - b * rbe:stop - b * rbe])
                if len(nz):
                    return c + int(nz[0])
            c = stop
        return None

    # ------------------------------------------------------------------ L2 tables (reference: qcow2-cluster.c)
    def _table(self, l1i: int) -> _Table:
        t = self._tables.get(l1i)
        if t is not None:
            return t
        g, C = self.geometry, self.C
        e1 = int(self.l1[l1i])
        off = e1 & L1E_OFFSET_MASK
        if not off:
            t = _Table(np.zeros(g.l2_entries, u64), 0)
        else:
            self.reader.file_size = os.lseek(self.io.fd, 0, os.SEEK_END)
            entries = np.frombuffer(self.io.pread(C, off), dtype=">u8").astype(u64)
            if len(entries) != g.l2_entries:
                raise self._corrupt(f"the L2 table of L1 entry {l1i} at {off:#x} runs past the end of the file")
            n = min(g.l2_entries, -(-self.size // C) - l1i * g.l2_entries)
            self.reader._validate_l2(entries[:n], None, l1i, off)
            rc = self.refcount(off // C)
            copied = bool(e1 & QCOW_OFLAG_COPIED)
            if rc == 0 or copied != (rc == 1):
                raise self._corrupt(f"L1 entry {l1i}: its L2 table at {off:#x} has refcount {rc}, and the COPIED "
                                    f"flag is {'set' if copied else 'clear'}")
            # shared with an internal snapshot: write a copy (qemu's l2_allocate); the entries' clusters keep
            # their refcounts (each L1 table counts its own reference)
            t = _Table(entries, off, cow_from=0) if rc == 1 else _Table(entries.copy(), 0, cow_from=off)
        self._tables[l1i] = t
        return t

    def _read_cluster(self, c: int) -> bytearray:
        """The guest content of cluster c as it is now (for a partial write)."""
        g, C = self.geometry, self.C
        t = self._table(c >> g.l2_bits)
        e = int(t.entries[c & (g.l2_entries - 1)])
        buf = bytearray(C)
        if e & QCOW_OFLAG_COMPRESSED:
            coff, csize = parse_compressed_l2_entry(g, e)
            try:
                out = _decompress(self.io.pread(csize, coff), C, self.reader.compression_type, self._zstd)
            except Exception as exc:
                raise self._corrupt(f"compressed cluster at {coff:#x} (guest offset {c * C:#x}) does not "
                                    f"decompress ({exc})") from None
            buf[:len(out)] = out
        elif not e & QCOW_OFLAG_ZERO and e & L2E_OFFSET_MASK:
            self.io.preadinto(buf, e & L2E_OFFSET_MASK)
        return buf

    # ------------------------------------------------------------------ the batch
    def _new_batch(self) -> None:
        self._tables: dict[int, _Table] = {}
        self._new_blocks: dict[int, int] = {}
        self._next = -(-os.lseek(self.io.fd, 0, os.SEEK_END) // self.C)      # the first cluster past the end
        self._batch_start = self._next            # data clusters of this batch lie at or past it
        self._inc: list[np.ndarray] = []          # clusters allocated in the batch
        self._unref: set[int] = set()             # ... and no longer used by it
        self._dec: list[np.ndarray] = []          # clusters losing one reference
        self._data = 0

    def _release(self, old: np.ndarray) -> None:
        """The clusters referenced by L2 entries old (not of this batch) lose one reference each."""
        g, C = self.geometry, self.C
        comp = (old & u64(QCOW_OFLAG_COMPRESSED)) != 0
        host = old & u64(L2E_OFFSET_MASK)
        std = ~comp & (host != 0)
        if std.any():
            self._dec.append((host[std] // u64(C)).astype(np.int64))
        for e in old[comp].tolist():
            # reference: qcow2_free_any_cluster: every host cluster the compressed bytes touch
            coff, csize = parse_compressed_l2_entry(g, e)
            lo = coff - coff % COMPRESSED_SECTOR_SIZE
            self._dec.append(np.arange(lo // C, (coff + csize - 1) // C + 1, dtype=np.int64))

    def write(self, data, offset: int) -> None:
        """[offset, offset + len(data)) reads as data."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        self._check_range(offset, n)
        C = self.C
        pos, end = offset, offset + n
        while pos < end:
            c = pos // C
            k = self._covered(pos, end)
            if k:                                 # whole clusters from here
                stop = min(end, pos + k * C)
                self._store(c, mv[pos - offset:stop - offset])
                pos = stop
                continue
            # a partial cluster: read, overlay, store
            buf = self._read_cluster(c)
            stop = min(end, (c + 1) * C)
            buf[pos - c * C:stop - c * C] = mv[pos - offset:stop - offset]
            self._store(c, memoryview(buf))
            pos = stop
        self._maybe_commit()

    def zero(self, offset: int, length: int) -> None:
        """[offset, offset + length) reads as zeros."""
        self._check_range(offset, length)
        C = self.C
        pos, end = offset, offset + length
        while pos < end:
            c = pos // C
            k = self._covered(pos, end)
            if k:
                self._zero_clusters(c, k)
                pos = min(end, pos + k * C)
                continue
            buf = self._read_cluster(c)
            stop = min(end, (c + 1) * C)
            buf[pos - c * C:stop - c * C] = bytes(stop - pos)
            self._store(c, memoryview(buf))
            pos = stop
        self._maybe_commit()

    def _covered(self, pos: int, end: int) -> int:
        """How many clusters from pos on [pos, end) covers whole (the last, shorter cluster of a disk whose
        size is no multiple of the cluster size counts when end is the disk's end)."""
        C = self.C
        if pos % C:
            return 0
        k = (end - pos) // C
        if end >= self.size and pos + k * C < self.size:
            k += 1
        return k

    def _check_range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise OutOfRangeError(f"{self.path}: {n} bytes at {offset} outside the virtual size {self.size}")

    def _store(self, c: int, mv: memoryview) -> None:
        """Clusters c, c+1, ... take the content mv (whole clusters; the last may be the short one at the
        end of the disk)."""
        g, C = self.geometry, self.C
        k = -(-len(mv) // C)
        flat = np.frombuffer(mv, dtype=np.uint8)
        zero_mask = _fast.zero_blocks(flat, C).astype(bool)
        done = 0
        while done < k:
            cl = c + done
            l1i = offset_to_l1_index(g, cl * C)
            t = self._table(l1i)
            i0 = cl & (g.l2_entries - 1)
            m = min(k - done, g.l2_entries - i0)
            old = t.entries[i0:i0 + m].copy()
            zeros = zero_mask[done:done + m]
            comp = (old & u64(QCOW_OFLAG_COMPRESSED)) != 0
            host = np.where(comp, u64(0), old & u64(L2E_OFFSET_MASK))
            reads_zero = (old == 0) | (~comp & ((old & u64(QCOW_OFLAG_ZERO)) != 0))
            fresh = ~comp & (host >= u64(self._batch_start * C)) & (host != 0)
            new = old.copy()
            # zero clusters: a zero entry, unless the cluster reads as zeros already
            z = zeros & ~reads_zero
            if z.any():
                self._release(old[z & ~fresh])
                for h in host[z & fresh].tolist():
                    self._unref.add(h // C)
                new[z] = u64(QCOW_OFLAG_ZERO)
            # clusters of this batch: overwritten where they are (nothing durable references them)
            inplace = ~zeros & fresh
            for j in np.flatnonzero(inplace).tolist():
                self.io.pwrite(mv[(done + j) * C:(done + j) * C + C], int(host[j]))
            # the rest: new clusters at the end of the file, in guest order
            alloc = ~zeros & ~fresh
            idx = np.flatnonzero(alloc)
            if len(idx):
                self._release(old[alloc])
                base = self._alloc(len(idx))
                self._inc.append(np.arange(base // C, base // C + len(idx), dtype=np.int64))
                new[idx] = (u64(base) + np.arange(len(idx), dtype=u64) * u64(C)) | u64(QCOW_OFLAG_COPIED)
                pieces = []
                for a, b in _runs(idx):
                    first, last = int(idx[a]), int(idx[b - 1]) + 1     # clusters first..last-1 of the chunk
                    lo_b, hi_b = (done + first) * C, min((done + last) * C, len(mv))
                    pieces.append(mv[lo_b:hi_b])
                    if hi_b - lo_b < (last - first) * C:      # the short last cluster: pad to a whole one
                        pieces.append(bytes((last - first) * C - (hi_b - lo_b)))
                self.io.pwritev(pieces, base)
                self._data += len(idx) * C
            if (new != old).any():
                t.entries[i0:i0 + m] = new
                t.dirty = True
            done += m

    def _zero_clusters(self, c: int, k: int) -> None:
        g, C = self.geometry, self.C
        done = 0
        while done < k:
            cl = c + done
            t = self._table(offset_to_l1_index(g, cl * C))
            i0 = cl & (g.l2_entries - 1)
            m = min(k - done, g.l2_entries - i0)
            old = t.entries[i0:i0 + m]
            comp = (old & u64(QCOW_OFLAG_COMPRESSED)) != 0
            reads_zero = (old == 0) | (~comp & ((old & u64(QCOW_OFLAG_ZERO)) != 0))
            z = ~reads_zero
            if z.any():
                host = np.where(comp, u64(0), old & u64(L2E_OFFSET_MASK))
                fresh = ~comp & (host >= u64(self._batch_start * C)) & (host != 0)
                self._release(old[z & ~fresh])
                for h in host[z & fresh].tolist():
                    self._unref.add(h // C)
                old[z] = u64(QCOW_OFLAG_ZERO)
                t.dirty = True
            done += m

    def _maybe_commit(self) -> None:
        if self._data >= COMMIT_DATA or len(self._tables) * self.C >= COMMIT_TABLES:
            self.commit()

    # ------------------------------------------------------------------ the commit
    def _fsync(self, phase: str) -> None:
        if self.fsync_hook is not None:
            self.fsync_hook(phase)
        self.io.fsync()

    def commit(self) -> None:
        """Make everything handed over durable, in the order of the module docstring."""
        C, io = self.C, self.io
        dirty = {l1i: t for l1i, t in self._tables.items() if t.dirty}
        fresh_tables = {l1i for l1i, t in dirty.items() if not t.offset}
        if not dirty and not self._inc and not self._dec:
            self._fsync("nothing to commit")
            self._new_batch()
            return
        # new L2 tables (unallocated L1 entries, copies of shared tables)
        for t in dirty.values():
            if not t.offset:
                t.offset = self._alloc(1)
                self._inc.append(np.array([t.offset // C], dtype=np.int64))
                if t.cow_from:
                    self._dec.append(np.array([t.cow_from // C], dtype=np.int64))
        inc = np.concatenate(self._inc) if self._inc else np.zeros(0, np.int64)
        if self._unref:
            inc = inc[~np.isin(inc, np.fromiter(self._unref, dtype=np.int64))]
        inc, new_table = self._settle(inc)
        dec = np.concatenate(self._dec) if self._dec else np.zeros(0, np.int64)
        if new_table is not None:
            dec = np.concatenate((dec, np.arange(self.rt_offset // C, self.rt_offset // C + self.rt_clusters,
                                                 dtype=np.int64)))
        # the refcounts, in memory first: every decrement checked before anything is written
        inc_blocks = self._apply(inc, +1)
        after_inc = {b: self._encode(self._blocks[b]) for b in inc_blocks}
        dec_blocks = self._apply(dec, -1)
        # phase 1: unreferenced new things
        for l1i in sorted(fresh_tables):
            io.pwrite(dirty[l1i].entries.astype(">u8").tobytes(), dirty[l1i].offset)
        for b, raw in sorted(after_inc.items()):
            io.pwrite(raw, self._block_offset(b))
        table = self.reftable
        if self._new_blocks:
            table = self.reftable.copy()
            top = max(self._new_blocks) + 1
            if new_table is not None:
                table = np.zeros(new_table[1] * C // 8, u64)
                table[:len(self.reftable)] = self.reftable
            for b, off in self._new_blocks.items():
                table[b] = u64(off)
            assert top <= len(table)
        if new_table is not None:
            io.pwrite(table.astype(">u8").tobytes(), new_table[0])
        self._fsync("data and refcounts")
        # phase 2: the refcount table references the new blocks
        if new_table is not None:
            io.pwrite(HEADER_REFTABLE.pack(*new_table), HEADER_REFTABLE_AT)
            self.rt_offset, self.rt_clusters = new_table
            self._fsync("refcount table")
        elif self._new_blocks:
            lo, hi = min(self._new_blocks), max(self._new_blocks) + 1
            io.pwrite(table[lo:hi].astype(">u8").tobytes(), self.rt_offset + lo * 8)
            self._fsync("refcount table")
        self.reftable = table
        self._new_blocks = {}
        # phase 3: the L2 and L1 tables reference them
        l1_changed = []
        for l1i, t in sorted(dirty.items()):
            if l1i not in fresh_tables:
                io.pwrite(t.entries.astype(">u8").tobytes(), t.offset)       # in place: entries are atomic
            else:
                self.l1[l1i] = u64(t.offset | QCOW_OFLAG_COPIED)
                l1_changed.append(l1i)
        if l1_changed:
            lo, hi = min(l1_changed), max(l1_changed) + 1
            io.pwrite(self.l1[lo:hi].astype(">u8").tobytes(), self.l1_offset + lo * 8)
        self._fsync("L2 and L1 tables")
        # phase 4: the old clusters lose their references
        if dec_blocks:
            for b in sorted(dec_blocks):
                io.pwrite(self._encode(self._blocks[b]), self._block_offset(b))
            self._fsync("decrements")
            freed = np.unique(dec)
            freed = freed[np.array([self.refcount(int(c)) == 0 for c in freed.tolist()], dtype=bool)] \
                if len(freed) else freed
            for a, b in _runs(freed):
                io.punch_hole(int(freed[a]) * C, (b - a) * C)
        self.reader.file_size = os.lseek(io.fd, 0, os.SEEK_END)
        if len(self._blocks) * C > COMMIT_TABLES:
            self._blocks.clear()
        self._new_batch()

    def _settle(self, inc: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
        """Refcount blocks for every cluster of inc, and a larger refcount table when the blocks' indices
        outgrow it; those clusters need refcounts too, so until nothing more is needed
        (reference: alloc_refcount_block).  (inc with the new clusters, (new table offset, clusters) or None)."""
        C, rbe = self.C, self.rbe
        capacity = len(self.reftable)
        new_table = None
        while True:
            blocks = np.unique(inc // rbe).tolist() if len(inc) else []
            if new_table is not None:
                blocks = sorted(set(blocks) | set(range(new_table[0] // C // rbe,
                                                        (new_table[0] // C + new_table[1] - 1) // rbe + 1)))
            missing = [b for b in blocks if not self._block_offset(b)]
            top = max(blocks) + 1 if blocks else 0
            if not missing and top <= (capacity if new_table is None else new_table[1] * C // 8):
                if new_table is not None:
                    inc = np.concatenate((inc, np.arange(new_table[0] // C, new_table[0] // C + new_table[1],
                                                         dtype=np.int64)))
                return inc, new_table
            for b in missing:
                off = self._alloc(1)
                self._new_blocks[b] = off
                self._blocks[b] = np.zeros(rbe, u64)
                inc = np.concatenate((inc, np.array([off // C], dtype=np.int64)))
            if top > (capacity if new_table is None else new_table[1] * C // 8):
                entries = max(top + top // 2 + 1, capacity)
                clusters = -(-entries * 8 // C)
                if clusters * C > MAX_REFTABLE_SIZE:
                    raise UnsupportedFeatureError(
                        f"{self.path}: the image would need a refcount table of {clusters * C} bytes, over qemu's "
                        f"limit of {MAX_REFTABLE_SIZE}")
                new_table = (self._alloc(clusters), clusters)      # an earlier plan's clusters stay free

    def _apply(self, clusters: np.ndarray, delta: int) -> set[int]:
        """Add delta to the refcount of every cluster in clusters (in memory); the blocks touched."""
        touched: set[int] = set()
        if not len(clusters):
            return touched
        limit = (1 << (1 << self.order)) - 1
        for b in np.unique(clusters // self.rbe).tolist():
            arr = self._block(b)
            idx = (clusters[clusters // self.rbe == b] % self.rbe).astype(np.int64)
            if arr is None:
                raise self._corrupt(f"cluster {int(idx[0]) + b * self.rbe} is referenced but has no refcount block")
            work = arr.astype(np.int64)
            np.add.at(work, idx, delta)
            if delta < 0 and (work < 0).any():
                bad = int(np.flatnonzero(work < 0)[0]) + b * self.rbe
                raise self._corrupt(f"cluster {bad} (offset {bad * self.C:#x}) is referenced by the active L2 "
                                    f"tables more often than its refcount says")
            if delta > 0 and (work > limit).any():
                raise self._corrupt(f"a refcount in block {b} would overflow {1 << self.order} bits")
            arr[:] = work.astype(u64)
            touched.add(b)
        return touched

    def close(self) -> None:
        self.reader.close()


def _runs(sorted_idx: np.ndarray):
    """[a, b) positions of runs of consecutive values in a sorted index array."""
    if not len(sorted_idx):
        return []
    brk = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    starts = np.concatenate(([0], brk))
    stops = np.append(brk, len(sorted_idx))
    return list(zip(starts.tolist(), stops.tolist()))
