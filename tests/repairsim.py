"""Lost header commits, repaired: a random history with header commits lost
at random points, each followed by ``check --repair`` (issue #13).

The history runs writes (in place and remapping), zero writes, discards,
flushes, checkpoints, resizes (inside the table's capacity: a commit that
moves a region cannot be lost without losing what the region held), and
reopens.  At random points the image is closed and its newest header slot
damaged (one flipped byte): the image then opens at the commit before,
while the data and the change counters of what came after are durable.
``check --repair`` runs; then every id ever handed out is asked of the
repaired image: it must be refused (StaleChangeIdError) or answered with
every block that differs from the content at its point (never an
under-report), and the history goes on.  An id string is never handed out
twice (a re-issued id would name two contents).  Losses repeat over the
history, so the commit lost is in turn a checkpoint's, a resize's or
another's, at every age of the image.

Used by tests/test_repair_campaign.py and tools/campaign_repair.py.
"""
from __future__ import annotations

import dataclasses
import os
import random
import struct
import tempfile

import vdisk
from vdisk import layout as L
from helpers import differing_blocks, extent_blocks, pattern

BS = 4096


@dataclasses.dataclass
class RepairStats:
    losses: int = 0            # header commits lost and repaired
    repairs_moved: int = 0     # repairs that found counters past the header (a lost generation)
    ids: int = 0               # ids handed out
    checks: int = 0            # (id, repaired image) pairs checked
    stale: int = 0             # of those, refused


def newest_slot(path: str) -> int:
    with open(path, "rb") as f:
        raw = f.read(2 * L.SLOT_SIZE)
    seq = [struct.unpack_from("<Q", raw, i * L.SLOT_SIZE + L.FIELD_OFFSETS["sequence"])[0] for i in (0, 1)]
    return 0 if seq[0] > seq[1] else 1


def older_slot_valid(path: str) -> bool:
    """A commit can be lost only when the slot before it holds a header (not so
    for a new image, whose second slot was never written)."""
    with open(path, "rb") as f:
        raw = f.read(2 * L.SLOT_SIZE)
    i = 1 - newest_slot(path)
    try:
        L.Header.unpack(raw[i * L.SLOT_SIZE:(i + 1) * L.SLOT_SIZE])
    except vdisk.VdiskError:
        return False
    return True


def lose_newest_commit(path: str, rng: random.Random) -> None:
    """Flip one bit of the newest header slot's record (its CRC then fails)."""
    off = L.SLOT_OFFSETS[newest_slot(path)] + rng.randrange(L.HEADER_LENGTH)
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ (1 << rng.randrange(8))]))


def run(seed: int, ops: int = 120, loss_rate: float = 0.08, workdir: str | None = None) -> RepairStats:
    rng = random.Random(seed)
    stats = RepairStats()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, "r.vdk")
        d = vdisk.create(path, rng.randint(8, 64) * BS, block_size=BS)
        d.fold_interval = rng.randint(1, 20)
        issued: dict[str, bytes] = {}        # every id ever handed out -> content at its point

        def hand_out(cid: str) -> None:
            assert cid not in issued, f"seed {seed}: id {cid} handed out twice"
            issued[cid] = d.pread(d.size, 0)
            stats.ids += 1

        for step in range(ops):
            kind = rng.choices(["write", "zero", "discard", "flush", "checkpoint", "resize", "reopen"],
                               [40, 6, 8, 8, 20, 6, 6])[0]
            size = d.size
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
            if rng.random() < loss_rate:
                d.close()
                if not older_slot_valid(path):
                    d = vdisk.open(path, "r+")
                    continue
                lose_newest_commit(path, rng)
                stats.losses += 1
                found = vdisk.check(path)
                stats.repairs_moved += any("is newer than generation" in c for c in found.corruptions)
                res = vdisk.check(path, repair=True)
                assert not res.corruptions, f"seed {seed} step {step}: after repair: {res.corruptions}"
                d = vdisk.open(path, "r+")
                now = d.pread(d.size, 0)
                for cid, then in issued.items():
                    stats.checks += 1
                    try:
                        got = extent_blocks(d.changes_since(cid), BS)
                    except vdisk.StaleChangeIdError:
                        stats.stale += 1
                        continue
                    missing = differing_blocks(now, then, BS) - got
                    assert not missing, (f"seed {seed} step {step}: after a lost commit and repair, "
                                         f"{cid} misses changed blocks {sorted(missing)[:8]}")
        d.close()
    return stats
