"""``vdisk clone``: a copy of an image with a new identity.

The contract
------------
``clone(src, dst)`` writes a new image whose live content reads exactly as
``src``'s, with its own ``image_uuid`` and tracking epoch (a new
``tracking_uuid``, generation 1, a new checkpoint log): no change id of
``src`` is answered by the clone and no delta of one chains onto a delta of
the other (docs/FORMAT.md, "Checkpoint log").  Use it wherever a copy of
the file would otherwise be made (a VM template, a second disk from one
image): a plain file copy keeps the identity, and the two copies then
refuse each other's ids only once they diverge.

* ``snapshots=True`` recreates every snapshot of ``src`` (oldest first, same
  names and content; the internal snapshots of interrupted backups are
  skipped): each state is written as the blocks that differ from the state
  before it (by block table entry), so data the snapshots share in ``src``
  is shared in the clone too.  Their change ids are new, like every id.
* Consumers are dropped: they back up ``src``, not the clone.
* Sparse: only allocated blocks of ``src`` are read; blocks that read as
  zeros are not written.  Block size, tracking on or off and the coarse
  region size are ``src``'s.
* Crash-safe like convert: the clone is built under a temporary name in
  ``dst``'s folder, closed (flushed and synced), then moved into place
  (never over an existing file unless ``overwrite=True``, never over an
  image in use); on any error the temporary file is removed.
* Memory and I/O are bounded: data moves in runs of at most ``BATCH`` bytes.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from . import layout as L
from .disk import create as _create
from .disk import open as _open
from .errors import TO_REPLACE, InvalidArgumentError
from .fileio import atomic_output, refuse_if_in_use
from .snapshots import is_backup_snapshot
from ._types import PathArg

BATCH = 8 << 20


def clone(src: PathArg, dst: PathArg, *, snapshots: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Copy the vdisk image src into a new image dst with a new identity.

    Returns {"path", "uuid", "tracking_id", "snapshots", "source_uuid"}.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise InvalidArgumentError.naming(f"{dst} exists (", *TO_REPLACE, ")")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise InvalidArgumentError(f"{dst} is the source image {src}")
    if overwrite and os.path.exists(dst):
        refuse_if_in_use(dst)
    from .live import refused_if_served
    with refused_if_served("clone", src):      # a served image: the server's one-line refusal
        s = _open(src)
    with s:
        coarse = s.info()["coarse_region_size"]
        states = []
        if snapshots:
            for info in s.snapshots:
                if not is_backup_snapshot(info.name):
                    states.append(info.name)
        with atomic_output(dst, overwrite=overwrite, what="cloning") as tmp:
            out = _create(tmp, s.size, block_size=s.block_size, track_changes=s.track_changes,
                          coarse_region_size=coarse)
            try:
                prev: tuple[np.ndarray, int] | None = None
                for name in states:
                    with s.open_snapshot(name) as view:
                        prev = _write_state(out, view, _table_of(view), prev)
                    out.snapshot(name)
                _write_state(out, s, _table_of(s), prev)
                result = {"path": dst, "uuid": str(out.uuid), "tracking_id": out.tracking_id,
                          "snapshots": len(states), "source_uuid": str(s.uuid)}
            finally:
                out.close()         # flushed and synced
    return result


def _table_of(reader: Any) -> np.ndarray:
    """The physical block each block of reader (a Disk or a Snapshot) maps, 0
    where none, from its host_map: equal nonzero entries are shared data."""
    shift = reader.block_size.bit_length() - 1
    table = np.zeros(L.blocks_for(reader.size, shift), dtype=np.uint32)
    for off, length, phys in reader.host_map():
        b0 = off >> shift
        n = ((off + length - 1) >> shift) + 1 - b0
        table[b0:b0 + n] = np.arange(phys >> shift, (phys >> shift) + n, dtype=np.uint32)
    return table


def _write_state(out: Any, reader: Any, table: np.ndarray,
                 prev: tuple[np.ndarray, int] | None) -> tuple[np.ndarray, int]:
    """Make out read as reader: write the blocks whose table entry differs from
    the state before (prev: (table, size) or None for an empty image)."""
    size = reader.size
    bs = out.block_size
    nb = L.blocks_for(size, bs.bit_length() - 1)
    if out.size != size:
        out.resize(size)
    cur = np.asarray(table[:nb], dtype=np.uint32)
    if prev is None:
        old = np.zeros(nb, dtype=np.uint32)
    else:
        old_table, old_size = prev
        old = np.zeros(nb, dtype=np.uint32)
        n_old = min(nb, L.blocks_for(old_size, bs.bit_length() - 1))
        old[:n_old] = old_table[:n_old]
        if size > old_size and n_old:      # a grown state: the old last block was cut at old_size
            old[n_old - 1] = np.uint32(0xFFFFFFFF) if old[n_old - 1] else 0
    changed = cur != old
    write = np.flatnonzero(changed & (cur != 0))
    drop = np.flatnonzero(changed & (cur == 0))
    per = max(1, BATCH // bs)
    for b0, b1 in _runs(write, per):
        lo, hi = b0 * bs, min(b1 * bs, size)
        out.pwrite(reader.pread(hi - lo, lo), lo)
    for b0, b1 in _runs(drop, per):
        lo, hi = b0 * bs, min(b1 * bs, size)
        out.discard(lo, hi - lo)
    out.flush()
    return (cur, size)


def _runs(blocks: np.ndarray, limit: int) -> Iterator[tuple[int, int]]:
    """Runs [b0, b1) of consecutive block numbers, at most limit long."""
    if not len(blocks):
        return
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    for part in np.split(blocks, breaks):
        start, stop = int(part[0]), int(part[-1]) + 1
        for b in range(start, stop, limit):
            yield b, min(b + limit, stop)


__all__ = ["clone"]
