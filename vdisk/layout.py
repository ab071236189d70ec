"""The vdisk on-disk layout, declared once.

docs/FORMAT.md mirrors this module table for table.  Everything here is
pure description: constants, limits, the header record and how to pack,
unpack and validate it.  Nothing here does I/O.

File map (all integers little-endian, every region block-aligned)::

    0x0000  header slot 0 (4 KiB)      \\ two slots, the valid one with the
    0x1000  header slot 1 (4 KiB)      / highest sequence number wins
    0x2000  coarse change bitmap       (bitmap_length bytes, at most 64 KiB)
    ...     block table                uint32 per virtual block (physical block number, 0 = unallocated)
    ...     change counters            uint32 per virtual block (generation of its last change)
    ...     refcounts                  uint16 per physical block
    ...     snapshot table, frozen snapshot tables, data blocks: allocated on demand
"""
from __future__ import annotations

import dataclasses
import re
import struct
import uuid as _uuid

import typing

import crc32c as _crc32c

if typing.TYPE_CHECKING:
    from _typeshed import ReadableBuffer

from .errors import CorruptImageError, FormatError, InvalidArgumentError, OutOfRangeError

MAGIC = b"\x89VDISK\r\n"
VERSION = 1

SLOT_SIZE = 4096
SLOT_OFFSETS = (0, SLOT_SIZE)
HEADER_LENGTH = 256            # bytes of a slot covered by the CRC (the rest is zero)
BITMAP_OFFSET = 2 * SLOT_SIZE  # the coarse bitmap follows the two header slots
MAX_BITMAP_LENGTH = 64 * 1024  # reserved space for the bitmap; regions coarsen beyond it
HEADER_AREA = BITMAP_OFFSET + MAX_BITMAP_LENGTH  # the first region starts at the next block boundary

SECTOR = 512
MIN_BLOCK_SHIFT = 12           # 4 KiB
MAX_BLOCK_SHIFT = 22           # 4 MiB
DEFAULT_BLOCK_SHIFT = 16       # 64 KiB
DEFAULT_COARSE_SHIFT = 25      # 32 MiB coarse regions: 1 TiB -> 32768 bits = one 4 KiB page
MAX_COARSE_SHIFT = 40

MAX_BLOCKS = 1 << 28           # virtual blocks: 16 TiB at 64 KiB, 1 TiB at 4 KiB
DATA_ALIGN = 2 << 20          # create() starts the data area at a multiple of this file offset (large folios)
DATA_ALIGN_MIN_SIZE = 64 << 20  # ... for disks of at least this size (smaller ones stay packed)
MAX_PHYS_BLOCKS = (1 << 32) - 1  # physical block numbers are uint32; 0 is the header block
MAX_GENERATION = (1 << 32) - 2   # counters are uint32
MAX_REFCOUNT = (1 << 16) - 1
# header commits: a reader takes sequences 1..MAX_SEQUENCE; a writer never
# writes a slot past it, and opens for writing only with SEQUENCE_HEADROOM
# commits left (2^32: years of commits at any rate an fsync allows).  Real
# images never come near: 2^62 commits would take millennia.
MAX_SEQUENCE = (1 << 62) - 1
SEQUENCE_HEADROOM = 1 << 32
# snapshot ids come from snapshot_next_id, one per header commit at most:
# a value past MAX_SEQUENCE + 1 can only be damage
MAX_SNAPSHOT_ID = 1 << 62
REFCOUNT_BYTES = 2
TABLE_ENTRY_BYTES = 4
COUNTER_BYTES = 4

MAX_SNAPSHOTS = 1024
SNAPSHOT_ENTRY_SIZE = 256
MAX_SNAPSHOT_NAME = 120        # bytes of UTF-8

MAX_CONSUMERS = 1024
CONSUMER_ENTRY_SIZE = 256
MAX_CONSUMER_NAME = 120        # bytes of UTF-8

SUMMARY_SHIFT = 5              # in memory only: one max-generation per 32 blocks (measured: benchmarks/)

# checkpoint log (docs/FORMAT.md, "Checkpoint log"): a ring of (generation, token) entries
LOG_ENTRY_SIZE = 16
LOG_MIN_CAPACITY = 4096        # entries: ids of the last 4096 closed generations stay answerable
LOG_MAX_CAPACITY = 1 << 20     # a header may not ask for more (4 MiB blocks give 262144)
LOG_ENTRY = struct.Struct("<QQ")   # generation, token (0: no entry)

# feature bits
INCOMPAT_CHECKPOINT_LOG = 1 << 0   # change ids carry tokens checked against the checkpoint log
INCOMPAT_KNOWN = INCOMPAT_CHECKPOINT_LOG
COMPAT_KNOWN = 0
FLAG_TRACKING = 1 << 0         # change tracking is on
FLAGS_KNOWN = FLAG_TRACKING

# header record: (name, struct code); offsets follow from the order
_FIELDS = [
    ("magic", "8s"),
    ("version", "I"),
    ("header_length", "I"),
    ("sequence", "Q"),
    ("incompatible_features", "Q"),
    ("compatible_features", "Q"),
    ("virtual_size", "Q"),
    ("block_shift", "B"),
    ("coarse_shift", "B"),
    ("reserved0", "H"),
    ("flags", "I"),
    ("image_uuid", "16s"),
    ("tracking_uuid", "16s"),
    ("generation", "Q"),
    ("bitmap_offset", "Q"),
    ("bitmap_length", "Q"),
    ("table_offset", "Q"),
    ("table_capacity", "Q"),
    ("counter_offset", "Q"),
    ("refcount_offset", "Q"),
    ("refcount_capacity", "Q"),
    ("snapshot_offset", "Q"),
    ("snapshot_count", "I"),
    ("snapshot_capacity", "I"),
    ("snapshot_next_id", "Q"),
    ("consumer_offset", "Q"),
    ("consumer_count", "I"),
    ("consumer_capacity", "I"),
    ("created_ns", "Q"),
    ("log_offset", "Q"),           # checkpoint log region, 0 = none (a legacy image)
    ("log_capacity", "I"),         # entries of the ring
    ("reserved1", "I"),
    ("legacy_generation", "Q"),    # tokenless ids of a generation below this stay valid
]
HEADER_STRUCT = struct.Struct("<" + "".join(code for _, code in _FIELDS))
CRC_OFFSET = HEADER_LENGTH - 4
assert HEADER_STRUCT.size <= CRC_OFFSET
FIELD_OFFSETS = {}
_off = 0
for _name, _code in _FIELDS:
    FIELD_OFFSETS[_name] = _off
    _off += struct.calcsize("<" + _code)
del _off, _name, _code


# snapshot table entry (SNAPSHOT_ENTRY_SIZE bytes each, CRC32C in the last 4)
SNAPSHOT_FIELDS = [
    ("snapshot_id", "Q"),          # unique, from header.snapshot_next_id
    ("generation", "Q"),           # the generation the snapshot closed: its change id
    ("virtual_size", "Q"),         # the snapshot's own size
    ("created_ns", "Q"),
    ("table_offset", "Q"),         # frozen block table: uint32 per block of virtual_size
    ("counter_offset", "Q"),       # frozen change counters: uint32 per block
    ("tracking_uuid", "16s"),      # tracking epoch at the snapshot
    ("name_length", "H"),
    ("token", "Q"),                # checkpoint token of its generation (0: a legacy, tokenless id)
    ("reserved", "54s"),
    ("name", "120s"),              # UTF-8, name_length bytes used
    ("reserved2", "4s"),
]
SNAPSHOT_STRUCT = struct.Struct("<" + "".join(code for _, code in SNAPSHOT_FIELDS))
assert SNAPSHOT_STRUCT.size == SNAPSHOT_ENTRY_SIZE - 4

# consumer table entry (CONSUMER_ENTRY_SIZE bytes each, CRC32C in the last 4)
CONSUMER_FIELDS = [
    ("generation", "Q"),           # generation of its last recorded backup's id; 0 = none yet
    ("tracking_uuid", "16s"),      # that id's tracking epoch (zero when generation is 0)
    ("created_ns", "Q"),
    ("updated_ns", "Q"),
    ("name_length", "H"),
    ("token", "Q"),                # that id's checkpoint token (0: a tokenless id)
    ("reserved", "82s"),
    ("name", "120s"),              # UTF-8, name_length bytes used, zero padded
]
CONSUMER_STRUCT = struct.Struct("<" + "".join(code for _, code in CONSUMER_FIELDS))
assert CONSUMER_STRUCT.size == CONSUMER_ENTRY_SIZE - 4


def crc32c(data: ReadableBuffer) -> int:
    return _crc32c.crc32c(data)


@dataclasses.dataclass
class Header:
    virtual_size: int
    block_shift: int
    coarse_shift: int
    image_uuid: bytes
    tracking_uuid: bytes
    generation: int
    table_offset: int
    table_capacity: int
    counter_offset: int
    refcount_offset: int
    refcount_capacity: int
    bitmap_length: int
    flags: int = FLAG_TRACKING
    sequence: int = 1
    bitmap_offset: int = BITMAP_OFFSET
    snapshot_offset: int = 0
    snapshot_count: int = 0
    snapshot_capacity: int = 0
    snapshot_next_id: int = 1
    consumer_offset: int = 0
    consumer_count: int = 0
    consumer_capacity: int = 0
    created_ns: int = 0
    log_offset: int = 0
    log_capacity: int = 0
    legacy_generation: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    version: int = VERSION

    # --- derived geometry -------------------------------------------------
    @property
    def block_size(self) -> int:
        return 1 << self.block_shift

    @property
    def nblocks(self) -> int:
        return blocks_for(self.virtual_size, self.block_shift)

    @property
    def blocks_per_region(self) -> int:
        return 1 << (self.coarse_shift - self.block_shift)

    @property
    def tracking(self) -> bool:
        return bool(self.flags & FLAG_TRACKING)

    def regions(self) -> list[tuple[str, int, int]]:
        """(name, offset, length) of every fixed metadata region, in file order."""
        bs = self.block_size
        out = [
            ("header", 0, round_up(HEADER_AREA, bs)),
            ("table", self.table_offset, round_up(self.table_capacity * TABLE_ENTRY_BYTES, bs)),
            ("counters", self.counter_offset, round_up(self.table_capacity * COUNTER_BYTES, bs)),
            ("refcounts", self.refcount_offset, round_up(self.refcount_capacity * REFCOUNT_BYTES, bs)),
        ]
        if self.snapshot_offset:
            out.append(("snapshots", self.snapshot_offset,
                        round_up(self.snapshot_capacity * SNAPSHOT_ENTRY_SIZE, bs)))
        if self.consumer_offset:
            out.append(("consumers", self.consumer_offset,
                        round_up(self.consumer_capacity * CONSUMER_ENTRY_SIZE, bs)))
        if self.log_offset:
            out.append(("checkpoint log", self.log_offset, round_up(self.log_capacity * LOG_ENTRY_SIZE, bs)))
        return out

    @property
    def has_log(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CHECKPOINT_LOG)

    # --- bytes --------------------------------------------------------------
    def pack(self) -> bytes:
        values: list[bytes | int] = []
        for name, _ in _FIELDS:
            if name == "magic":
                values.append(MAGIC)
            elif name == "header_length":
                values.append(HEADER_LENGTH)
            elif name in ("reserved0", "reserved1"):
                values.append(0)
            else:
                values.append(getattr(self, name))
        body = HEADER_STRUCT.pack(*values).ljust(CRC_OFFSET, b"\0")
        return (body + struct.pack("<I", crc32c(body))).ljust(SLOT_SIZE, b"\0")

    @classmethod
    def unpack(cls, slot: bytes) -> "Header":
        """Parse one slot.  Raises FormatError (no magic, unknown version or
        feature) or CorruptImageError (bad CRC or field)."""
        if len(slot) < HEADER_LENGTH:
            raise CorruptImageError(f"header slot truncated: {len(slot)} of {HEADER_LENGTH} bytes")
        if slot[:8] != MAGIC:
            raise FormatError("not a vdisk image: magic mismatch")
        body = slot[:CRC_OFFSET]
        (stored,) = struct.unpack_from("<I", slot, CRC_OFFSET)
        if crc32c(body) != stored:
            raise CorruptImageError(f"header CRC mismatch: stored {stored:#010x}, computed {crc32c(body):#010x}")
        raw = dict(zip((n for n, _ in _FIELDS), HEADER_STRUCT.unpack_from(slot)))
        if raw["version"] != VERSION:
            raise FormatError(f"unsupported vdisk version {raw['version']} (this build reads version {VERSION})")
        if raw["header_length"] != HEADER_LENGTH:
            raise CorruptImageError(f"header_length {raw['header_length']}, expected {HEADER_LENGTH}")
        unknown = raw["incompatible_features"] & ~INCOMPAT_KNOWN
        if unknown:
            raise FormatError(f"image uses unknown incompatible features {unknown:#x}; refusing to open")
        if raw["reserved0"] or raw["reserved1"] or slot[HEADER_STRUCT.size:CRC_OFFSET].strip(b"\0"):
            raise CorruptImageError("header: reserved bytes are not zero")
        for k in ("magic", "header_length", "reserved0", "reserved1"):
            del raw[k]
        return cls(**raw)

    def validate(self, file_size: int | None = None) -> None:
        """Check every field against the format's limits (and the file size).

        Raises CorruptImageError naming the field.  Run on every header read
        from disk before any size or offset in it is used.
        """
        def bad(msg: str) -> typing.NoReturn:
            raise CorruptImageError(f"header: {msg}")

        if not MIN_BLOCK_SHIFT <= self.block_shift <= MAX_BLOCK_SHIFT:
            bad(f"block_shift {self.block_shift} outside {MIN_BLOCK_SHIFT}..{MAX_BLOCK_SHIFT}")
        bs = self.block_size
        if self.virtual_size % SECTOR:
            bad(f"virtual_size {self.virtual_size} is not a multiple of {SECTOR}")
        if self.nblocks > MAX_BLOCKS:
            bad(f"virtual_size {self.virtual_size} needs {self.nblocks} blocks, limit {MAX_BLOCKS}")
        if not self.block_shift <= self.coarse_shift <= MAX_COARSE_SHIFT:
            bad(f"coarse_shift {self.coarse_shift} outside {self.block_shift}..{MAX_COARSE_SHIFT}")
        if not 1 <= self.sequence <= MAX_SEQUENCE:
            bad(f"sequence {self.sequence} outside 1..{MAX_SEQUENCE} (2^62 - 1)")
        if not 1 <= self.snapshot_next_id <= MAX_SNAPSHOT_ID:
            bad(f"snapshot_next_id {self.snapshot_next_id} outside 1..{MAX_SNAPSHOT_ID} (2^62)")
        if self.flags & ~FLAGS_KNOWN:
            bad(f"unknown flags {self.flags:#x}")
        if self.bitmap_offset != BITMAP_OFFSET:
            bad(f"bitmap_offset {self.bitmap_offset}, expected {BITMAP_OFFSET}")
        if not 0 <= self.bitmap_length <= MAX_BITMAP_LENGTH or self.bitmap_length % SECTOR:
            bad(f"bitmap_length {self.bitmap_length} outside 0..{MAX_BITMAP_LENGTH} or unaligned")
        if self.bitmap_length * 8 < regions_for(self.table_capacity, self.coarse_shift - self.block_shift):
            bad(f"bitmap of {self.bitmap_length} bytes cannot cover {self.table_capacity} blocks")
        if not self.nblocks <= self.table_capacity <= MAX_BLOCKS:
            bad(f"table_capacity {self.table_capacity} outside {self.nblocks}..{MAX_BLOCKS}")
        if not 1 <= self.refcount_capacity <= MAX_PHYS_BLOCKS:
            bad(f"refcount_capacity {self.refcount_capacity} outside 1..{MAX_PHYS_BLOCKS}")
        if not 1 <= self.generation <= MAX_GENERATION:
            bad(f"generation {self.generation} outside 1..{MAX_GENERATION}")
        if self.snapshot_count > self.snapshot_capacity or self.snapshot_capacity > MAX_SNAPSHOTS:
            bad(f"snapshot_count {self.snapshot_count} / capacity {self.snapshot_capacity} (limit {MAX_SNAPSHOTS})")
        if (self.snapshot_offset == 0) != (self.snapshot_capacity == 0):
            bad("snapshot_offset and snapshot_capacity disagree")
        if self.consumer_count > self.consumer_capacity or self.consumer_capacity > MAX_CONSUMERS:
            bad(f"consumer_count {self.consumer_count} / capacity {self.consumer_capacity} (limit {MAX_CONSUMERS})")
        if (self.consumer_offset == 0) != (self.consumer_capacity == 0):
            bad("consumer_offset and consumer_capacity disagree")
        if self.consumer_count and not self.tracking:
            bad("consumers registered in an image without change tracking")
        if self.has_log:
            if not self.log_offset or not LOG_MIN_CAPACITY <= self.log_capacity <= LOG_MAX_CAPACITY:
                bad(f"checkpoint log at {self.log_offset} with {self.log_capacity} entries "
                    f"(expected a region of {LOG_MIN_CAPACITY}..{LOG_MAX_CAPACITY} entries)")
            if not 1 <= self.legacy_generation <= self.generation:
                bad(f"legacy_generation {self.legacy_generation} outside 1..generation {self.generation}")
        elif self.log_offset or self.log_capacity or self.legacy_generation:
            bad("checkpoint log fields set, but the checkpoint_log feature bit is not")
        regions = self.regions()
        end_limit = (MAX_PHYS_BLOCKS + 1) * bs
        for name, off, length in regions:
            if off % bs:
                bad(f"{name} region offset {off} is not aligned to the block size {bs}")
            if off + length > end_limit:
                bad(f"{name} region [{off}, {off + length}) beyond the format's limit")
            if file_size is not None and off + length > file_size:
                raise CorruptImageError(
                    f"image truncated: {name} region ends at {off + length}, file has {file_size} bytes")
        check_no_overlap(regions, "header")
        if self.refcount_capacity * bs < max(off + length for _, off, length in regions):
            bad("refcount table does not cover the metadata regions")


def check_no_overlap(regions: typing.Iterable[tuple[str, int, int]], where: str) -> None:
    """Raise CorruptImageError if any two (name, offset, length) regions overlap."""
    spans = sorted((off, off + length, name) for name, off, length in regions)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CorruptImageError(f"{where}: regions {an} [{a0}, {a1}) and {bn} [{b0}, {b1}) overlap")


def log_capacity_for(block_size: int) -> int:
    """Entries of a new checkpoint log: at least LOG_MIN_CAPACITY, filling whole blocks."""
    return max(LOG_MIN_CAPACITY, block_size // LOG_ENTRY_SIZE)


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def blocks_for(size: int, block_shift: int) -> int:
    return -(-size >> block_shift) if size else 0


def regions_for(nblocks: int, rel_shift: int) -> int:
    return -(-nblocks >> rel_shift) if nblocks else 0


def coarse_shift_for(capacity_blocks: int, block_shift: int) -> int:
    """Smallest coarse shift >= the default whose bitmap covers the capacity in MAX_BITMAP_LENGTH."""
    shift = max(DEFAULT_COARSE_SHIFT, block_shift)
    while regions_for(capacity_blocks, shift - block_shift) > MAX_BITMAP_LENGTH * 8:
        shift += 1
    return shift


def bitmap_length_for(capacity_blocks: int, block_shift: int, coarse_shift: int) -> int:
    nbits = regions_for(capacity_blocks, coarse_shift - block_shift)
    return max(SECTOR, round_up(-(-nbits // 8), SECTOR))


# --- sizes as users write them ----------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1 << 40,
          "tb": 1000 ** 4, "tib": 1 << 40, "p": 1 << 50, "pib": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, what: str = "size") -> int:
    """An int, or a string like "512", "64KiB", "1.5G", "10TiB" (K/M/G/T are binary,
    KB/MB/GB/TB decimal); a fraction must come to a whole number of bytes."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise InvalidArgumentError(f"{what}: cannot parse {value!r} (examples: 512, 64KiB, 1.5G, 10T)")
        whole, _, frac = m.group(1).partition(".")
        unit = _UNITS[m.group(2).lower()]
        n, rest = divmod((int(whole) * 10 ** len(frac) + int(frac or 0)) * unit, 10 ** len(frac))
        if rest:
            raise InvalidArgumentError(f"{what}: {value!r} is not a whole number of bytes")
    else:
        raise InvalidArgumentError(f"{what}: expected int or str, got {type(value).__name__}")
    if n < 0:
        raise OutOfRangeError(f"{what}: negative value {n}")
    return n


def format_size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 10 if shift > 10 else 0)) == 0:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def new_uuid() -> bytes:
    return _uuid.uuid4().bytes
