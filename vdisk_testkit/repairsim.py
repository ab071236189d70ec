"""Lost header commits, repaired: a random history with header commits lost
at random points, each followed by ``check --repair`` (issue #13).

The history runs writes (in place and remapping), zero writes, discards,
flushes, checkpoints, resizes inside the table's capacity, and reopens.
At random points the image is closed and its newest header slot damaged
(one flipped byte): the image then opens at the commit before, while the
data and the change counters of what came after are durable.
``check --repair`` runs; then every id ever handed out is asked of the
repaired image: it must be refused (StaleChangeIdError) or answered with
every block that differs from the content at its point (never an
under-report), every snapshot the image holds (one whose delete was lost
too) must read the content it was taken with, and the history goes on.  An id string is never handed out
twice (a re-issued id would name two contents).  Losses repeat over the
history, so the commit lost is in turn a checkpoint's, a resize's or
another's, at every age of the image.

With ``regions=True`` the history also runs every operation whose commit
moves a metadata region: resizes past the table's capacity (a new table and
counter region), snapshot create and delete (a new snapshot table; a
delete releases the frozen table and the blocks only it held), revert (a
new live table), reset_tracking (a new counter region and consumer table)
and consumer register / update / forget (a new consumer table).  A lost
commit of one of these is the case the write order must survive: the slot
before it names the old region, so nothing that slot names may have been
reused (docs/FORMAT.md, "The older slot").  ``layout_losses`` counts the
losses where the damaged slot named other regions than the surviving one
(the move itself lost); with the rule, a move is followed by a second copy
of its commit before anything is released, so most losses after a move
lose that copy.

Used by tests/test_repair_campaign.py and tools/campaign_repair.py.
"""
from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import zlib

import vdisk
from vdisk import layout as L
from vdisk_testkit.helpers import differing_blocks, extent_blocks, pattern

BS = 4096


@dataclasses.dataclass
class RepairStats:
    losses: int = 0            # header commits lost and repaired
    repairs_moved: int = 0     # repairs that found counters past the header (a lost generation)
    ids: int = 0               # ids handed out
    checks: int = 0            # (id, repaired image) pairs checked
    stale: int = 0             # of those, refused
    region_ops: int = 0        # operations whose commit moves a metadata region
    region_losses: int = 0     # losses whose newest commit was a region-moving operation's
    layout_losses: int = 0     # losses where the damaged slot named other regions than the surviving one
    snapshot_checks: int = 0   # (snapshot, repaired image) pairs read back whole


REGION_OPS = ("grow", "snapshot", "delete_snapshot", "revert", "reset_tracking", "consumer")


def _slot_headers(path: str) -> list:
    """The header of each slot, None where it does not parse (damaged, never written)."""
    with open(path, "rb") as f:
        raw = f.read(2 * L.SLOT_SIZE)
    out = []
    for i in (0, 1):
        try:
            h = L.Header.unpack(raw[i * L.SLOT_SIZE:(i + 1) * L.SLOT_SIZE])
        except vdisk.VdiskError:
            h = None
        out.append(h if h is not None and h.sequence % 2 == i else None)
    return out


def newest_slot(path: str) -> int:
    """The slot an open reads: the valid one with the highest sequence (a slot
    damaged by an earlier loss and not written since may hold a higher raw
    sequence; damaging it again would lose nothing)."""
    hs = _slot_headers(path)
    valid = [i for i in (0, 1) if hs[i] is not None]
    return max(valid, key=lambda i: hs[i].sequence) if valid else 0


def older_slot_valid(path: str) -> bool:
    """A commit can be lost only when the slot before it holds a header (not so
    for a new image, whose second slot was never written)."""
    return _slot_headers(path)[1 - newest_slot(path)] is not None


def layouts_differ(path: str) -> bool:
    """Whether the two slots name different metadata regions (the newest commit moved one)."""
    a, b = _slot_headers(path)
    return a is not None and b is not None and a.regions() != b.regions()


def lose_newest_commit(path: str, rng: random.Random) -> None:
    """Flip one bit of the newest header slot's record (its CRC then fails)."""
    off = L.SLOT_OFFSETS[newest_slot(path)] + rng.randrange(L.HEADER_LENGTH)
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ (1 << rng.randrange(8))]))


def run(seed: int, ops: int = 120, loss_rate: float = 0.08, workdir: str | None = None,
        regions: bool = False) -> RepairStats:
    rng = random.Random(seed)
    stats = RepairStats()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, "r.vdk")
        d = vdisk.create(path, rng.randint(8, 64) * BS, block_size=BS)
        d.fold_interval = rng.randint(1, 20)
        issued: dict[str, bytes] = {}        # every id ever handed out -> content at its point (compressed)
        last_commit = None                   # the kind of the newest operation that committed the header
        snap_content: dict[str, bytes] = {}  # every snapshot ever taken -> its content (compressed)

        def hand_out(cid: str) -> None:
            assert cid not in issued, f"seed {seed}: id {cid} handed out twice"
            issued[cid] = zlib.compress(d.pread(d.size, 0), 1)
            stats.ids += 1

        kinds = ["write", "zero", "discard", "flush", "checkpoint", "resize", "reopen"]
        weights = [40, 6, 8, 8, 20, 6, 6]
        if regions:
            kinds += list(REGION_OPS)
            weights += [3, 5, 3, 3, 2, 5]
        for step in range(ops):
            kind = rng.choices(kinds, weights)[0]
            size = d.size
            snaps = [s.name for s in d.snapshots]
            if kind in ("delete_snapshot", "revert") and not snaps:
                kind = "snapshot"
            if kind == "snapshot" and len(snaps) >= 4:
                kind = "delete_snapshot"
            if kind in REGION_OPS or kind in ("checkpoint", "resize"):
                stats.region_ops += kind in REGION_OPS
                last_commit = kind
            if kind in ("write", "zero"):
                off = rng.randrange(size)
                n = rng.randint(1, min(size - off, 3 * BS))
                d.pwrite(pattern(rng.randrange(2**31), n, zero=kind == "zero"), off)
            elif kind == "discard":
                off = rng.randrange(size)
                d.discard(off, rng.randint(1, min(size - off, 4 * BS)))
            elif kind == "flush":
                d.flush()
            elif kind == "checkpoint":
                hand_out(d.checkpoint())
            elif kind == "resize":
                d.resize(rng.randint(1, 200) * BS - rng.choice([0, 0, 512]))
            elif kind == "reopen":
                d.close()
                d = vdisk.open(path, "r+")
            elif kind == "grow":        # past the table's capacity: a new table and counter region
                cap = d._hdr.table_capacity      # (kept small: every id holds the content at its point)
                d.resize((cap + rng.randint(1, 600) if cap < 4096 else rng.randint(1, cap)) * BS)
            elif kind == "snapshot":
                name = f"s{len(snap_content)}"      # never reused: a name names one content
                snap = d.snapshot(name)
                hand_out(snap.change_id)
                snap_content[name] = issued[snap.change_id]
                snap.close()
            elif kind == "delete_snapshot":
                d.delete_snapshot(rng.choice(snaps))
            elif kind == "revert":
                d.revert(rng.choice(snaps))
            elif kind == "reset_tracking":
                d.reset_tracking()
            elif kind == "consumer":
                names = [c.name for c in d.consumers.values()]
                ids = [cid for cid in issued if d._hdr.tracking_uuid.hex() in cid.replace("-", "")]
                op = rng.choice(["register", "update", "forget"] if names else ["register"])
                try:
                    if op == "register":
                        d.consumers.register(f"c{step}", rng.choice(ids) if ids and rng.random() < 0.7 else None)
                    elif op == "update" and ids:
                        d.consumers.update(rng.choice(names), rng.choice(ids))
                    else:
                        d.consumers.forget(rng.choice(names))
                except vdisk.StaleChangeIdError:    # an id a repair made stale: refused, nothing committed
                    stats.region_ops -= 1
            if rng.random() < loss_rate:
                d.close()
                if not older_slot_valid(path):
                    d = vdisk.open(path, "r+")
                    continue
                stats.layout_losses += layouts_differ(path)
                stats.region_losses += last_commit in REGION_OPS
                lost = last_commit
                lose_newest_commit(path, rng)
                stats.losses += 1
                found = vdisk.check(path)
                stats.repairs_moved += any("is newer than generation" in c for c in found.corruptions)
                res = vdisk.check(path, repair=True)
                assert not res.corruptions, (f"seed {seed} step {step}: after repair (newest op that committed: "
                                             f"{lost}): {res.corruptions}")
                d = vdisk.open(path, "r+")
                last_commit = "repair"
                for info in d.snapshots:     # every snapshot it holds (a deleted one back too) reads its content
                    with d.open_snapshot(info.name) as view:
                        got_snap = view.pread(view.size, 0)
                    stats.snapshot_checks += 1
                    assert got_snap == zlib.decompress(snap_content[info.name]), (
                        f"seed {seed} step {step}: after a lost commit (newest op that committed: {lost}) and "
                        f"repair, snapshot {info.name} reads other content")
                now = d.pread(d.size, 0)
                for cid, packed in issued.items():
                    then = zlib.decompress(packed)
                    stats.checks += 1
                    try:
                        got = extent_blocks(d.changes_since(cid), BS)
                    except vdisk.StaleChangeIdError:
                        stats.stale += 1
                        continue
                    missing = differing_blocks(now, then, BS) - got
                    assert not missing, (f"seed {seed} step {step}: after a lost commit (newest op that "
                                         f"committed: {lost}) and repair, "
                                         f"{cid} misses changed blocks {sorted(missing)[:8]}")
        d.close()
    return stats
