"""Snapshot operations: take, delete, revert and open a snapshot.

The way qemu's qcow2-snapshot.c sits beside qcow2-refcount.c and
qcow2-cluster.c: the operations work on the parts (the header, the
allocator, the block table, the tracker) and call back into the Disk only
for what commits or orders writes, through ``SnapshotHost``: the flush
(the write order), the header commit, the relocation of the tables, the
checkpoint token and the commit of a new snapshot table.  The Disk keeps
the lock, the poisoning, the open views and the thin public methods.

Each operation keeps the commit order of docs/FORMAT.md ("Snapshots"):
new tables in fresh blocks and their references counted, durable, then the
header commit names them; references the old state held are dropped only
after it (``Allocator.release_*``, applied by the next flush).
"""
from __future__ import annotations

import time
import typing

import numpy as np

from . import _fast
from . import layout as L
from .arrays import lazy_zeros, load_array, write_nonzero_pages
from .errors import OutOfRangeError
from .snapshots import SnapshotRecord, check_name

if typing.TYPE_CHECKING:
    from .allocator import Allocator
    from .blocktable import BlockTable
    from .fileio import FileIO
    from .tracking import ChangeTracker


class SnapshotHost(typing.NamedTuple):
    """What the operations call back in the Disk (under its lock):

    flush(): the Disk's flush (the write order);
    commit_header(): the header commit (poisons on failure);
    grow_tables(n): relocate the table and counters for n entries;
    issue_token(): the token of the generation about to close (written, not synced);
    commit_table(records, advance): a new snapshot table, committed (advance:
        the generation and the snapshot id move on with it);
    alloc_run(count): count new blocks at the end of the file (poisons on failure);
    validate_table(table, n, what, allow_shared): the checks of a table at open;
    refresh_meta(): the metadata ranges after the header named new regions."""
    flush: typing.Callable[[], None]
    commit_header: typing.Callable[[], None]
    grow_tables: typing.Callable[[int], None]
    issue_token: typing.Callable[[], int]
    commit_table: typing.Callable[..., None]
    alloc_run: typing.Callable[[int], int]
    validate_table: typing.Callable[..., None]
    refresh_meta: typing.Callable[[], None]


class SnapshotOps:
    def __init__(self, fio: FileIO, hdr: L.Header, alloc: Allocator, bt: BlockTable, tracker: ChangeTracker | None,
                 host: SnapshotHost):
        self._io = fio
        self._hdr = hdr
        self._alloc = alloc
        self._bt = bt
        self._tracker = tracker
        self._host = host

    def load_frozen(self, offset: int, size: int) -> np.ndarray:
        """A frozen array (a snapshot's table or counters) of a disk of size bytes at offset."""
        nb = L.blocks_for(size, self._hdr.block_shift)
        return load_array(self._io, offset, max(nb, 1), np.uint32, self._io.size())

    def open(self, rec: SnapshotRecord) -> np.ndarray:
        """The snapshot's frozen table, validated."""
        frozen = self.load_frozen(rec.table_offset, rec.virtual_size)
        self._host.validate_table(frozen, L.blocks_for(rec.virtual_size, self._hdr.block_shift),
                                  f"snapshot {rec.name!r} table", True)
        return frozen

    def create(self, name: str | None, records: list[SnapshotRecord]) -> tuple[SnapshotRecord, np.ndarray]:
        """Take a snapshot (no data copied); returns its record and frozen table.
        Folds tracking and closes the current generation."""
        h, fio, alloc = self._hdr, self._io, self._alloc
        if len(records) >= L.MAX_SNAPSHOTS:
            raise OutOfRangeError(f"{fio.path}: the image holds the maximum of {L.MAX_SNAPSHOTS} snapshots")
        taken = {rec.name for rec in records}
        if name is None:
            name = f"snap-{h.snapshot_next_id}"
            while name in taken:
                name += "-"
        name = check_name(name, taken)
        # every counter this commit advances, checked before anything is written
        if h.generation >= L.MAX_GENERATION:
            raise OutOfRangeError("the generation counter is exhausted; call reset_tracking()")
        if h.snapshot_next_id >= L.MAX_SNAPSHOT_ID:
            raise OutOfRangeError(f"{fio.path}: snapshot ids are exhausted (snapshot_next_id "
                                  f"{h.snapshot_next_id}, limit {L.MAX_SNAPSHOT_ID})")
        self._host.flush()
        bs, nb = h.block_size, h.nblocks
        frozen = lazy_zeros(max(nb, 1), np.uint32)      # copied where the live table may hold entries
        self._bt.copy_into(frozen, nb)
        used = _fast.nonzero_values(frozen, nb)
        alloc.check_headroom(used)          # before any block is allocated
        tbytes = L.round_up(max(nb, 1) * 4, bs)
        # 1. the frozen table and counters, in fresh blocks
        first = self._host.alloc_run(2 * (tbytes // bs))
        t_off, c_off = first * bs, first * bs + tbytes
        write_nonzero_pages(fio, frozen, t_off)
        if self._tracker:
            write_nonzero_pages(fio, self._tracker.counters[:max(nb, 1)], c_off)
        # 2. every block the live table maps gains a reference
        alloc.add_refs(used)
        token = self._host.issue_token()     # synced with the new table, before the commit
        rec = SnapshotRecord(snapshot_id=h.snapshot_next_id, generation=h.generation, virtual_size=h.virtual_size,
                             created_ns=time.time_ns(), table_offset=t_off, counter_offset=c_off,
                             tracking_uuid=h.tracking_uuid, name=name, token=token)
        # 3. a new snapshot table; everything durable before the header names it
        self._host.commit_table(records + [rec], True)
        return rec, frozen

    def delete(self, rec: SnapshotRecord, records: list[SnapshotRecord]) -> None:
        """Delete a snapshot: a table without it committed, then its references dropped
        (the caller's next flush frees the blocks no longer referenced)."""
        self._host.flush()
        frozen = self.load_frozen(rec.table_offset, rec.virtual_size)
        nb = L.blocks_for(rec.virtual_size, self._hdr.block_shift)
        self._host.commit_table([r for r in records if r is not rec], False)
        # after the commit: drop the references the snapshot held
        self._alloc.release_blocks(_fast.nonzero_values(frozen, nb).tolist())
        self._alloc.release_run(rec.table_offset, 2 * rec.table_bytes(self._hdr.block_size))

    def revert(self, rec: SnapshotRecord) -> None:
        """The live disk becomes the snapshot's content (and size).  Every block
        that differs is marked changed in the current generation, so every
        consumer's change id stays valid."""
        self._host.flush()
        h, alloc, tracker = self._hdr, self._alloc, self._tracker
        bs, shift = h.block_size, h.block_shift
        nb_s = L.blocks_for(rec.virtual_size, shift)
        frozen = self.load_frozen(rec.table_offset, rec.virtual_size)
        # it becomes the live table: each block mapped once (a snapshot is a copy of a live table;
        # a duplicate would take one reference for two entries below)
        self._host.validate_table(frozen, nb_s, f"snapshot {rec.name!r} table", False)
        used = _fast.nonzero_values(frozen, nb_s)
        # a refcount at the cap is allowed (a leak) but cannot take the new table's reference:
        # refused before anything changes (the table growth below included), as create() does
        # (uint16 would wrap to 0: a free block)
        alloc.check_headroom(used)
        if nb_s > h.table_capacity:
            self._host.grow_tables(nb_s)
        nb_old = h.nblocks
        table = lazy_zeros(h.table_capacity, np.uint32)
        table[:nb_s] = frozen[:nb_s]
        # 1. tracking: blocks whose mapping changes, and a grown area, changed now
        if tracker:
            tracker.mark_blocks(np.flatnonzero(table[:nb_s] != self._bt.table[:nb_s]))
            if nb_s > nb_old or rec.virtual_size > h.virtual_size:
                tracker.mark_run(h.virtual_size >> shift, nb_s)
            tracker.fold(h.generation, nblocks=nb_s)
        # 2. the new live table in fresh blocks, its references counted
        tbytes = L.round_up(h.table_capacity * 4, bs)
        first = self._host.alloc_run(tbytes // bs)
        write_nonzero_pages(self._io, table, first * bs)
        alloc.add_refs(used)
        alloc.write_pages()
        self._io.fsync()
        # 3. commit; then drop the old table's references
        old_off = h.table_offset
        old_used = self._bt.used(nb_old)
        h.table_offset, h.virtual_size = first * bs, rec.virtual_size
        self._host.commit_header()
        self._bt.replace(table, h.table_capacity, nb_s)
        self._host.refresh_meta()
        alloc.release_blocks(old_used.tolist())
        alloc.release_run(old_off, tbytes)
