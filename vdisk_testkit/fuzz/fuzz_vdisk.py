"""Fuzz target (a): opening a vdisk image and reading its metadata.

One input is one image, damaged: the header slots, the coarse bitmap, the
block table, the counters, the refcounts, the snapshot table and the
frozen snapshot tables all come from it.  Each input is opened, read
(``info``, ``map``, a few ``pread``, ``changes_since('*')`` and the ids
the image names, every snapshot opened and read), optionally written
(and a snapshot taken, written over, read and deleted), closed, then
checked with ``vdisk.check`` (and with REPAIR repaired, then opened and
read again).  Only VdiskError may escape.

``check`` and ``check --repair`` run on every file, the 128 GiB sparse ones
of EXTEND included: their memory and time follow the blocks the file holds,
not the highest one a table names (docs/RELIABILITY.md, "Fuzzing").
VDISK_FUZZ_CHECK_MAX (bytes) skips them on files larger than that, for a
quicker run that does not need them.

A writable open also takes a snapshot, writes (copy on write), reads the
snapshot back and deletes it, on the damaged image as opened.

The structure-aware mutator also sets counters to their limits (0, max,
max - 1, 2^62, 2^63, 2^64 - 1, every declared limit +-1): the header's
sequence, generation, snapshot_next_id, counts and capacities, a snapshot
record's id, generation, size and time, a mapped block's refcount at the
cap; seeds hold the snapshots image with its generation, snapshot_next_id
or sequence one step from the limit (issue #13).

Input encoding (so that mutations get past the checksums and land on bytes
that matter)::

    byte 0      flags: FIX_HEADER_CRC, FIX_SNAPSHOT_CRC (recompute those
                CRC32Cs after the damage), WRITE (open "r+", write, flush),
                bits 3-5: EXTEND (grow the file, sparse, to 2**(16 + 3e)),
                REPAIR (bit 6: check(repair=True), then open and read again)
    bytes 1..   the image with its reserved bytes [PACK_FROM, HEADER_AREA)
                left out (zeros; the harness puts them back)

Run it: ``python3 tools/fuzz/run.py --targets vdisk`` (or directly,
``python3 -m vdisk_testkit.fuzz.fuzz_vdisk CORPUS_DIR -runs=N`` with libFuzzer flags).
"""
from __future__ import annotations

import os
import random
import struct
import tempfile
from pathlib import Path

import vdisk
from vdisk import layout as L

from vdisk_testkit.fuzz.common import INTERESTING, KiB, MiB, guard, havoc, put_int, remove, scratch_path, write_sparse

NAME = "vdisk"
FIX_HEADER_CRC = 1 << 0
FIX_SNAPSHOT_CRC = 1 << 1
WRITE = 1 << 2
EXTEND_SHIFT = 3
EXTEND_MASK = 7 << EXTEND_SHIFT
REPAIR = 1 << 6
CHECK_MAX_FILE = int(os.environ.get("VDISK_FUZZ_CHECK_MAX", 0)) or None   # bytes (None: check every file)
SNAPSHOT_NAME = "fuzz-harness"
PACK_FROM = L.BITMAP_OFFSET + 4096      # the first 4 KiB of the bitmap area stay in the input
MAX_READ = 1 * MiB                      # bytes read per pread call
SNAPSHOT_FIELD_OFFSETS = {name: struct.calcsize("<" + "".join(c for _, c in L.SNAPSHOT_FIELDS[:i]))
                          for i, (name, _) in enumerate(L.SNAPSHOT_FIELDS)}
# counters and capacities: the fields an operation advances or allocates from (issue #13: a counter at its
# limit must get a VdiskError before anything is written, never a struct.error or a slot readers refuse)
HEADER_COUNTERS = ("sequence", "generation", "snapshot_next_id", "snapshot_count", "snapshot_capacity",
                   "consumer_count", "consumer_capacity", "table_capacity", "refcount_capacity", "created_ns",
                   "virtual_size", "bitmap_length")
SNAPSHOT_COUNTERS = ("snapshot_id", "generation", "created_ns", "virtual_size")
_WIDTH = {"B": 1, "H": 2, "I": 4, "Q": 8}


def limit_values(width: int) -> list[int]:
    """0, the field's max and max - 1, 2^62, 2^63, 2^64 - 1 and their
    neighbours, and every limit the format declares (+-1), that fit in width bytes."""
    top = (1 << 8 * width) - 1
    vals = {0, 1, 2, top, top - 1}
    for v in (1 << 31, 1 << 32, 1 << 62, 1 << 63, L.MAX_SEQUENCE, L.MAX_SEQUENCE - L.SEQUENCE_HEADROOM,
              L.MAX_SNAPSHOT_ID, L.MAX_GENERATION, L.MAX_REFCOUNT, L.MAX_SNAPSHOTS, L.MAX_CONSUMERS, L.MAX_BLOCKS,
              L.MAX_PHYS_BLOCKS, (1 << 64) - 1):
        vals.update((v - 1, v, v + 1))
    return sorted(v for v in vals if 0 <= v <= top)


# ---------------------------------------------------------------------------- the encoding
def encode(image: bytes, flags: int = 0) -> bytes:
    if len(image) > L.HEADER_AREA:
        assert not image[PACK_FROM:L.HEADER_AREA].strip(b"\0"), "reserved bytes must be zero to pack"
        image = image[:PACK_FROM] + image[L.HEADER_AREA:]
    return bytes([flags & 0xFF]) + image


def decode(data: bytes) -> tuple[int, bytearray, int | None]:
    """(flags, image bytes, file size or None)."""
    if not data:
        return 0, bytearray(), None
    flags, packed = data[0], data[1:]
    if len(packed) > PACK_FROM:
        image = bytearray(packed[:PACK_FROM]) + bytes(L.HEADER_AREA - PACK_FROM) + packed[PACK_FROM:]
    else:
        image = bytearray(packed)
    e = (flags & EXTEND_MASK) >> EXTEND_SHIFT
    size = max(len(image), 1 << (16 + 3 * e)) if e else None
    return flags, image, size


def slot_fields(image, slot: int) -> dict | None:
    """The raw header fields of a slot (no checks), or None if the slot is cut off."""
    base = L.SLOT_OFFSETS[slot]
    if len(image) < base + L.HEADER_STRUCT.size:
        return None
    return dict(zip((n for n, _ in L._FIELDS), L.HEADER_STRUCT.unpack_from(image, base)))


def fix_header_crc(image: bytearray) -> None:
    for base in L.SLOT_OFFSETS:
        if len(image) >= base + L.HEADER_LENGTH:
            crc = L.crc32c(bytes(image[base:base + L.CRC_OFFSET]))
            image[base + L.CRC_OFFSET:base + L.CRC_OFFSET + 4] = struct.pack("<I", crc)


def fix_snapshot_crcs(image: bytearray) -> None:
    """Recompute the CRC of every snapshot entry either slot points at."""
    for slot in (0, 1):
        h = slot_fields(image, slot)
        if h is None:
            continue
        off, count = h["snapshot_offset"], min(h["snapshot_count"], L.MAX_SNAPSHOTS)
        for i in range(count):
            at = off + i * L.SNAPSHOT_ENTRY_SIZE
            if at + L.SNAPSHOT_ENTRY_SIZE > len(image):
                break
            crc = L.crc32c(bytes(image[at:at + L.SNAPSHOT_ENTRY_SIZE - 4]))
            image[at + L.SNAPSHOT_ENTRY_SIZE - 4:at + L.SNAPSHOT_ENTRY_SIZE] = struct.pack("<I", crc)


# ---------------------------------------------------------------------------- one input
def read_windows(size: int, extents) -> list[tuple[int, int]]:
    """(offset, length) of the reads: all of a small disk, else its ends, its
    middle and the start of a few mapped extents; each at most MAX_READ."""
    if size <= MAX_READ:
        return [(0, size)] if size else []
    out = [(0, 256 * KiB), (size - 64 * KiB, 64 * KiB), (size // 2 // 512 * 512, 64 * KiB), (size - 1, 1)]
    for off, length in list(extents or [])[:16]:
        out.append((off, min(length, 64 * KiB, size - off)))
    return out


def exercise_view(view, ids) -> None:
    """Reads through a Disk or a Snapshot; VdiskErrors are the allowed outcome."""
    ext = guard(view.map)
    for off, n in read_windows(view.size, ext):
        guard(view.pread, n, off)
    for cid in ids:
        guard(view.changes_since, cid)


def exercise_snapshot(d) -> None:
    """On a writable Disk: take a snapshot, write over blocks it shares (copy
    on write), read it back, delete it."""
    s = guard(d.snapshot, SNAPSHOT_NAME)
    if s is None:
        return
    try:
        size = s.size
        if size:
            guard(d.pwrite, b"snap" * 8, max(0, min(size - 32, size // 3)))
            guard(d.pwrite, b"cow!" * 8, 0)
            for off, n in read_windows(size, None)[:2]:
                guard(s.pread, n, off)
    finally:
        guard(s.close)
    guard(d.delete_snapshot, SNAPSHOT_NAME)
    guard(d.flush)


def exercise(path: str, writable: bool, snapshot: bool = True) -> None:
    d = guard(vdisk.open, path, "r+" if writable else "r")
    if d is None:
        return
    try:
        guard(d.info)
        snaps = guard(lambda: d.snapshots) or []
        ids = ["*"]
        if d.track_changes:
            ids += [cid for cid in [d.change_id] + [s.change_id for s in snaps] if cid]
        exercise_view(d, ids)
        for info in snaps[:4]:
            s = guard(d.open_snapshot, info.name)
            if s is not None:
                exercise_view(s, ["*", info.change_id] + ids[1:2])
                s.close()
        if writable:
            size = d.size
            if size:
                guard(d.pwrite, b"fuzz" * 8, max(0, min(size - 32, size // 3)))   # allocates or overwrites
                guard(d.pwrite, bytes(min(size, 4096)), 0)                          # zeros: unmaps
            guard(d.flush)
            if snapshot:
                exercise_snapshot(d)
            if d.track_changes:
                guard(d.checkpoint)
    finally:
        guard(d.close)


def materialize(data: bytes, path: str) -> int:
    """Write the image an input describes to path; returns the input's flags."""
    flags, image, size = decode(data)
    if flags & FIX_HEADER_CRC:
        fix_header_crc(image)
    if flags & FIX_SNAPSHOT_CRC:
        fix_snapshot_crcs(image)
    write_sparse(path, image, size)
    return flags


def one_input(data: bytes) -> None:
    path = scratch_path("fuzz.img")
    flags = materialize(data, path)
    try:
        exercise(path, bool(flags & WRITE))
        if CHECK_MAX_FILE is not None and os.path.getsize(path) > CHECK_MAX_FILE:
            return
        guard(vdisk.check, path)
        if flags & REPAIR:
            guard(vdisk.check, path, repair=True)
            exercise(path, False)
    finally:
        remove(path)


# ---------------------------------------------------------------------------- seeds
def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def build_seed_images(directory: str) -> dict[str, bytes]:
    """Small real images (4 KiB blocks): snapshots, tracking state, a crash
    state with coarse bits set, tracking off, a grown (relocated) table, and
    the snapshots image with a counter one step from its limit."""
    out = {}
    bs = 4 * KiB
    p = os.path.join(directory, "snaps.img")
    with vdisk.create(p, 64 * KiB, block_size=bs) as d:
        d.pwrite(_pattern(1, 3 * bs), 0)
        d.pwrite(_pattern(2, 100), 9 * bs + 7)
        d.checkpoint()
        d.snapshot("first")
        d.pwrite(_pattern(3, bs), bs)
        d.pwrite(_pattern(4, bs), 15 * bs)
        d.snapshot("second")
        d.discard(0, bs)
        d.pwrite(_pattern(5, 50), 12 * bs)
        d.checkpoint()
        d.pwrite(_pattern(6, 200), bs + 10)
    out["snaps"] = Path(p).read_bytes()

    p = os.path.join(directory, "crash.img")
    with vdisk.create(p, 256 * KiB, block_size=bs, coarse_region_size=bs * 4) as d:
        d.pwrite(_pattern(7, 8 * bs), 0)
        d.checkpoint()
        d.pwrite(_pattern(8, 100), 2 * bs)           # in place: arms a coarse bit
        d.pwrite(_pattern(9, 100), 40 * bs)
        d.flush()
        out["crash"] = Path(p).read_bytes()            # as a power loss would leave it

    p = os.path.join(directory, "untracked.img")
    with vdisk.create(p, 32 * KiB, block_size=bs, track_changes=False) as d:
        d.pwrite(_pattern(10, 2 * bs), 3 * bs)
        d.snapshot("only")
        d.pwrite(_pattern(11, 10), 3 * bs)
    out["untracked"] = Path(p).read_bytes()

    p = os.path.join(directory, "grown.img")
    with vdisk.create(p, 16 * KiB, block_size=bs) as d:
        d.pwrite(_pattern(12, bs), 0)
        d.checkpoint()
        d.resize(5 * MiB)                              # past the table's capacity: relocated
        d.pwrite(_pattern(13, bs), 5 * MiB - bs)
        d.snapshot("after-grow")
        d.resize(8 * KiB)
    out["grown"] = Path(p).read_bytes()
    # counters one step from their limits: the next checkpoint, snapshot or commit meets the guard
    for name, fields in (("gen-limit", {"generation": L.MAX_GENERATION - 1}),
                         ("id-limit", {"snapshot_next_id": L.MAX_SNAPSHOT_ID - 1}),
                         ("seq-room", {"sequence": L.MAX_SEQUENCE - L.SEQUENCE_HEADROOM})):
        raw = bytearray(out["snaps"])
        slot = _newest_slot(raw)
        for field, v in fields.items():
            if field == "sequence" and v % 2 != slot:
                v -= 1
            put_int(raw, L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS[field], 8, v)
        fix_header_crc(raw)
        out[name] = bytes(raw)
    for name, raw in out.items():
        assert not raw[PACK_FROM:L.HEADER_AREA].strip(b"\0"), name
    return out


def build_seeds(directory: str | None = None) -> dict[str, bytes]:
    """Encoded seed inputs by name."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        images = build_seed_images(tmp)
    seeds = {}
    for name, raw in images.items():
        seeds[name] = encode(raw)
        seeds[name + "-write"] = encode(raw, WRITE)
    return seeds


# ---------------------------------------------------------------------------- a structure-aware mutator
def _newest_slot(image) -> int:
    seqs = [(h or {}).get("sequence", -1) for h in (slot_fields(image, 0), slot_fields(image, 1))]
    return 0 if seqs[0] >= seqs[1] else 1


def _value_for(image, h: dict, width: int, rng: random.Random) -> int:
    """An integer worth trying in a field: interesting constants, block and
    file-size arithmetic, another field's value, or small steps."""
    bs = 1 << min(max(h.get("block_shift", 12), 0), 40) if h else 4096
    choices = [
        lambda: rng.choice(INTERESTING),
        lambda: rng.randrange(0, 64),
        lambda: rng.randrange(0, max(1, len(image) // bs + 4)) * bs,
        lambda: len(image) + rng.choice((-bs, -1, 0, 1, bs)),
        lambda: (h or {}).get(rng.choice(list(h)), 0) if h else 0,
        lambda: rng.getrandbits(8 * width),
        lambda: rng.choice((L.MAX_BLOCKS, L.MAX_PHYS_BLOCKS, L.MAX_GENERATION, L.MAX_SNAPSHOTS, L.HEADER_AREA,
                            L.MAX_BITMAP_LENGTH)) + rng.choice((-1, 0, 1)),
        lambda: rng.choice(limit_values(width)),
    ]
    v = rng.choice(choices)()
    return v if isinstance(v, int) else 0


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A damaged variant of data, aimed at the image's structures."""
    flags, image, _ = decode(data)
    if not image:
        return havoc(data, rng)
    what = rng.randrange(11)
    slot = _newest_slot(image) if rng.random() < 0.8 else rng.randrange(2)
    h = slot_fields(image, slot)
    if what == 10 and h is not None:                  # counters at their limits
        limit_counters(image, h, slot, rng)
        flags |= (FIX_HEADER_CRC | FIX_SNAPSHOT_CRC) if rng.random() < 0.9 else 0
        flags |= WRITE if rng.random() < 0.6 else 0
    elif what <= 2 and h is not None:                  # header fields
        for _ in range(1 + int(rng.random() < 0.3)):
            name, code = rng.choice(L._FIELDS)
            width = {"B": 1, "H": 2, "I": 4, "Q": 8}.get(code)
            if width is None:                          # magic, uuids: bytes
                at = L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS[name]
                image[at + rng.randrange(8)] ^= 1 << rng.randrange(8)
            else:
                v = h[name] + rng.choice((-1, 1)) if rng.random() < 0.3 else _value_for(image, h, width, rng)
                put_int(image, L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS[name], width, v)
        flags |= FIX_HEADER_CRC if rng.random() < 0.9 else 0
    elif what == 3 and h is not None and h["snapshot_offset"] and h["snapshot_count"]:   # snapshot records
        i = rng.randrange(min(h["snapshot_count"], L.MAX_SNAPSHOTS))
        at = h["snapshot_offset"] + i * L.SNAPSHOT_ENTRY_SIZE
        name, code = rng.choice(L.SNAPSHOT_FIELDS)
        fo = SNAPSHOT_FIELD_OFFSETS[name]
        width = {"Q": 8, "H": 2}.get(code)
        if width:
            put_int(image, at + fo, width, _value_for(image, h, width, rng))
        else:
            image = bytearray(havoc(bytes(image), rng, at + fo, at + fo + struct.calcsize(code), rounds=1))
        flags |= FIX_SNAPSHOT_CRC if rng.random() < 0.9 else 0
    elif what in (4, 5) and h is not None:            # table, counters, refcounts, bitmap: entries
        region = rng.choice(("table_offset", "counter_offset", "refcount_offset", "bitmap_offset", "snapshot"))
        if region == "snapshot" and h["snapshot_offset"] and h["snapshot_count"]:
            rec = h["snapshot_offset"] + L.SNAPSHOT_ENTRY_SIZE * rng.randrange(min(h["snapshot_count"], 64))
            region_off = int.from_bytes(image[rec + 32:rec + 40], "little") if rec + 48 <= len(image) else 0
            if rng.random() < 0.5 and rec + 48 <= len(image):
                region_off = int.from_bytes(image[rec + 40:rec + 48], "little")
        else:
            region_off = h.get(region, 0) if region != "snapshot" else h["table_offset"]
        width = 2 if region == "refcount_offset" else 4
        n_entries = max(1, min(64, (h.get("virtual_size", 0) >> min(h.get("block_shift", 12), 40)) + 2))
        for _ in range(1 + int(min(rng.expovariate(0.5), 16))):
            at = region_off + width * rng.randrange(n_entries)
            if width == 4:
                v = rng.choice((0, 1, rng.randrange(len(image) // 4096 + 8), rng.choice(INTERESTING),
                                h.get("generation", 1) + rng.choice((-1, 0, 1)), (1 << 32) - 1))
            else:
                v = rng.choice((0, 1, 2, 0xFFFF, rng.randrange(4)))
            put_int(image, at, width, v)
        if region == "bitmap_offset" and rng.random() < 0.5:
            at = L.BITMAP_OFFSET + rng.randrange(PACK_FROM - L.BITMAP_OFFSET)
            put_int(image, at, 1, rng.randrange(256))
    elif what == 6:                                    # cut or grow the file
        if rng.random() < 0.6:
            cut = rng.choice((rng.randrange(len(image) + 1), len(image) - rng.choice((1, 512, 4096)),
                              rng.randrange(L.HEADER_AREA, max(L.HEADER_AREA + 1, len(image)))))
            del image[max(0, cut):]
        else:
            image += bytes(rng.choice((1, 512, 4096, 8192)))
    elif what == 7:                                    # mode and size flags
        flags ^= rng.choice((WRITE, FIX_HEADER_CRC, FIX_SNAPSHOT_CRC, 1 << EXTEND_SHIFT, 2 << EXTEND_SHIFT,
                             4 << EXTEND_SHIFT, REPAIR))
    else:                                              # anywhere, bytes
        lo, hi = (0, 2 * L.SLOT_SIZE) if rng.random() < 0.3 else (0, len(image))
        image = bytearray(havoc(bytes(image), rng, lo, hi))
        if rng.random() < 0.5:
            flags |= FIX_HEADER_CRC
    if len(image) > L.HEADER_AREA:
        image[PACK_FROM:L.HEADER_AREA] = bytes(L.HEADER_AREA - PACK_FROM)
    return encode(bytes(image), flags)


def limit_counters(image: bytearray, h: dict, slot: int, rng: random.Random) -> None:
    """One to three counters set to a limit value: header counters (a
    sequence mostly of the slot's parity, so the slot is not refused for
    that alone), a snapshot record's, or the refcount of a mapped block."""
    codes = dict(L._FIELDS)
    for _ in range(1 + int(rng.random() < 0.4) + int(rng.random() < 0.2)):
        where = rng.random()
        if where < 0.65:
            name = rng.choice(HEADER_COUNTERS)
            width = _WIDTH[codes[name]]
            v = rng.choice(limit_values(width))
            if name == "sequence" and rng.random() < 0.8 and v and v % 2 != slot:
                v -= 1
            put_int(image, L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS[name], width, v)
            h[name] = v
        elif where < 0.85 and h["snapshot_offset"] and h["snapshot_count"]:
            i = rng.randrange(min(h["snapshot_count"], L.MAX_SNAPSHOTS))
            name = rng.choice(SNAPSHOT_COUNTERS)
            width = _WIDTH[dict(L.SNAPSHOT_FIELDS)[name]]
            put_int(image, h["snapshot_offset"] + i * L.SNAPSHOT_ENTRY_SIZE + SNAPSHOT_FIELD_OFFSETS[name], width,
                    rng.choice(limit_values(width)))
        else:                                          # a mapped block's refcount at the cap (or just under)
            shift = min(max(h.get("block_shift", 12), 12), 22)
            n = min(64, max(1, h.get("virtual_size", 0) >> shift))
            at = h["table_offset"] + 4 * rng.randrange(n)
            if 0 <= at <= len(image) - 4:
                p = int.from_bytes(image[at:at + 4], "little")
                put_int(image, h["refcount_offset"] + 2 * p, 2, rng.choice((L.MAX_REFCOUNT, L.MAX_REFCOUNT - 1)))


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's mutator (atheris.Mutate) on the header bytes or the whole
    input a third of the time, the structure-aware one otherwise."""
    from vdisk_testkit.fuzz.common import atheris_mutate
    rng = random.Random(seed)
    if rng.random() < 0.33 and len(data) > 1:
        if rng.random() < 0.5 and len(data) > 1 + 2 * L.SLOT_SIZE:
            slot = 1 + rng.randrange(2) * L.SLOT_SIZE
            head = atheris_mutate(data[slot:slot + L.HEADER_LENGTH], L.HEADER_LENGTH)
            head = head[:L.HEADER_LENGTH].ljust(L.HEADER_LENGTH, b"\0")
            out = bytearray(data)
            out[slot:slot + L.HEADER_LENGTH] = head
            out[0] |= FIX_HEADER_CRC if rng.random() < 0.8 else 0
            return bytes(out)
        return atheris_mutate(data, max_size)
    return mutate(data, rng)[:max_size]


if __name__ == "__main__":
    from vdisk_testkit.fuzz.common import atheris_main
    atheris_main(one_input, custom_mutator)
