"""Damaged images: a truncated, zeroed or scribbled image gets a VdiskError
(or opens with the damage reported by check) -- never a segfault, a hang,
a huge allocation, or an exception outside the VdiskError hierarchy.

One small base image (4 MiB virtual, 4 KiB blocks, data in a handful of
blocks, one checkpoint, one freed block) is built once; every test damages
a private copy of its bytes.

The rule most tests apply (:func:`assert_refused_reported_or_harmless`):
damage must be refused at open (a VdiskError), or reported by ``check``
(``ok`` False), or be harmless (the image opens and reads back exactly the
original content).  Silent wrong content is the failure.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import struct
import zlib

import numpy as np
import pytest

import vdisk
from vdisk import layout as L
from vdisk_testkit.helpers import measure_in_child, pattern

KiB = 1 << 10
MiB = 1 << 20
BS = 4 * KiB
VSIZE = 4 * MiB
NB = VSIZE // BS

FIELD_SIZES = {name: struct.calcsize("<" + code) for name, code in L._FIELDS}
FIELDS = list(L.FIELD_OFFSETS)


@pytest.fixture(autouse=True)
def _no_hang():
    """Fail (instead of hanging the run) if one test takes more than 60 s."""
    def on_alarm(signum, frame):
        raise TimeoutError("damage test took more than 60 s: a hang?")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ============================================================================ the base image
@dataclasses.dataclass(frozen=True)
class Base:
    raw: bytes               # the image file's bytes
    content: bytes           # the virtual disk's content
    header: L.Header         # the active header
    active: int              # its slot
    other: int               # the slot holding the previous (valid) header
    other_sequence: int
    table: np.ndarray        # the block table (uint32[capacity])
    freed_phys: int          # a physical block inside the file with refcount 0
    mapped: tuple            # virtual blocks that hold data


@functools.lru_cache(maxsize=None)
def base_image(tmpdir_factory_path: str) -> Base:
    path = os.path.join(tmpdir_factory_path, "base.vdk")
    model = bytearray(VSIZE)

    def write(d, data, off):
        d.pwrite(data, off)
        model[off:off + len(data)] = data

    with vdisk.create(path, VSIZE, block_size=BS) as d:
        write(d, pattern(1, 4 * BS), 0)                       # blocks 0-3
        write(d, pattern(2, BS), 10 * BS)
        write(d, pattern(3, 2 * BS - 100), 100 * BS + 50)     # blocks 100-101, partial
        write(d, pattern(4, BS), 500 * BS)
        write(d, pattern(5, BS), (NB - 1) * BS)               # the last block (its last byte too)
        d.checkpoint()
        write(d, pattern(6, BS), 200 * BS)
        write(d, pattern(7, 300), 10 * BS + 1000)
        freed_phys = int(d._table[2])
        d.discard(2 * BS, BS)
        model[2 * BS:3 * BS] = bytes(BS)
        d.flush()
        assert int(d._refcounts[freed_phys]) == 0
    with open(path, "rb") as f:
        raw = f.read()
    with vdisk.open(path) as d:
        assert d.pread(VSIZE, 0) == model
        hdr, active = dataclasses.replace(d._hdr), d._slot
        table = d._table.copy()
        mapped = tuple(int(b) for b in np.flatnonzero(table[:NB]))
    other = 1 - active
    other_hdr = L.Header.unpack(raw[L.SLOT_OFFSETS[other]:L.SLOT_OFFSETS[other] + L.SLOT_SIZE])
    assert other_hdr.sequence < hdr.sequence
    assert vdisk.check(path).ok
    assert raw[-1] != 0                  # the file ends in data: truncating its last byte loses data
    return Base(raw, bytes(model), hdr, active, other, other_hdr.sequence, table, freed_phys, mapped)


@pytest.fixture
def base(tmp_path_factory) -> Base:
    return base_image(str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def damaged(img, base):
    """A writable bytearray copy of the base image; call save() to write it to img."""
    buf = bytearray(base.raw)

    def save(data=None):
        with open(img, "wb") as f:
            f.write(buf if data is None else data)
        return img
    return buf, save


# ============================================================================ helpers
def fix_crc(buf: bytearray, slot: int) -> None:
    """Recompute the header CRC of a slot, so field damage passes the checksum."""
    base = L.SLOT_OFFSETS[slot]
    crc = L.crc32c(bytes(buf[base:base + L.CRC_OFFSET]))
    buf[base + L.CRC_OFFSET:base + L.CRC_OFFSET + 4] = struct.pack("<I", crc)


def damage_value(field: str, kind: str, current: bytes) -> bytes:
    n = FIELD_SIZES[field]
    if kind == "zero":
        return bytes(n)
    if kind == "ff":
        return b"\xff" * n
    rng = np.random.default_rng(zlib.crc32(field.encode()))
    while True:
        v = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if v != current:
            return v


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def not_vdisk_error(what: str, exc: BaseException):
    pytest.fail(f"{what} raised {type(exc).__name__} (not a VdiskError): {exc!r}")


@dataclasses.dataclass
class Outcome:
    open_error: BaseException | None = None
    content: bytes | None = None           # None: reading raised a VdiskError
    read_error: BaseException | None = None
    check: vdisk.CheckResult | None = None
    check_error: BaseException | None = None
    size: int | None = None


def probe(path, mode="r", read_limit=64 * MiB) -> Outcome:
    """Open, read everything, close, check: only VdiskErrors are tolerated."""
    out = Outcome()
    try:
        d = vdisk.open(path, mode)
    except vdisk.VdiskError as exc:
        out.open_error = exc
    except Exception as exc:  # noqa: BLE001
        not_vdisk_error("open", exc)
    else:
        try:
            out.size = d.size
            chunks = []
            try:
                for off in range(0, min(d.size, read_limit), MiB):
                    chunks.append(d.pread(min(MiB, d.size - off), off))
                out.content = b"".join(chunks)
            except vdisk.VdiskError as exc:
                out.read_error = exc
            try:
                d.map()
                if d.track_changes:
                    d.changes_since("*")
            except vdisk.VdiskError:
                pass
        except Exception as exc:  # noqa: BLE001
            not_vdisk_error("reading", exc)
        finally:
            try:
                d.close()
            except vdisk.VdiskError:
                pass
    try:
        out.check = vdisk.check(path)
    except vdisk.VdiskError as exc:
        out.check_error = exc
    except Exception as exc:  # noqa: BLE001
        not_vdisk_error("check", exc)
    return out


def assert_refused_reported_or_harmless(out: Outcome, original: bytes, what: str = "") -> None:
    if out.open_error is not None:
        assert isinstance(out.open_error, (vdisk.FormatError, vdisk.CorruptImageError,
                                           vdisk.UnsupportedFeatureError, vdisk.VdiskIOError)), out.open_error
        return
    if out.check is not None and not out.check.ok:
        return                                        # reported
    if out.check_error is not None:
        return                                        # check refuses the image: reported
    assert out.read_error is None, f"{what}: check says ok, but reading fails: {out.read_error}"
    assert out.content == original, (f"{what}: the image opens, check says ok, but the content differs "
                                      f"(silent corruption); check: {out.check}")


def assert_repairable(path, original: bytes | None = None) -> tuple[vdisk.CheckResult, bytes]:
    """check(repair=True) leaves an image that checks clean, opens and takes
    writes; returns the repair's result and the content right after repair."""
    try:
        r = vdisk.check(path, repair=True)
    except vdisk.VdiskError:
        raise
    except Exception as exc:  # noqa: BLE001
        not_vdisk_error("check(repair=True)", exc)
    assert r.ok, r
    r2 = vdisk.check(path)
    assert r2.ok and r2.corruptions == [] and r2.leaked_blocks == 0, r2
    with vdisk.open(path) as d:
        content = d.pread(d.size, 0)
    with vdisk.open(path, "r+") as d:                 # and stays usable for writing
        d.pwrite(b"after repair", 3 * BS)
        d.flush()
    assert vdisk.check(path).ok
    if original is not None:
        assert content == original
    return r, content


# ============================================================================ header fields
@pytest.mark.parametrize("kind", ["zero", "ff", "random"])
@pytest.mark.parametrize("field", FIELDS)
def test_header_field_damage_without_crc_falls_back_to_other_slot(damaged, base, field, kind):
    """Without a fixed CRC the damaged active slot fails its checksum: the
    other slot (the previous header) is used, and the data is intact."""
    buf, save = damaged
    slot = base.active
    off = L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS[field]
    n = FIELD_SIZES[field]
    value = damage_value(field, kind, bytes(buf[off:off + n]))
    changed = bytes(buf[off:off + n]) != value
    buf[off:off + n] = value
    path = save()
    try:
        d = vdisk.open(path)
    except vdisk.VdiskError as exc:
        pytest.fail(f"the other header slot is valid, yet open raised {type(exc).__name__}: {exc}")
    with d:
        if changed:
            assert d._slot == base.other
            assert d._hdr.sequence == base.other_sequence
        else:
            assert d._slot == base.active
        assert d.size == VSIZE and d.block_size == BS
        assert d.uuid.bytes == base.header.image_uuid
        assert d.pread(VSIZE, 0) == base.content
    if not changed:
        assert vdisk.check(path).ok


@pytest.mark.parametrize("kind", ["zero", "ff", "random"])
@pytest.mark.parametrize("field", FIELDS)
def test_header_field_damage_in_both_slots_without_crc(damaged, base, field, kind):
    buf, save = damaged
    changed = []
    for slot in (0, 1):
        off = L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS[field]
        n = FIELD_SIZES[field]
        value = damage_value(field, kind, bytes(buf[off:off + n]))
        changed.append(bytes(buf[off:off + n]) != value)
        buf[off:off + n] = value
    path = save()
    if all(changed):
        with pytest.raises((vdisk.FormatError, vdisk.CorruptImageError)) as ei:
            vdisk.open(path)
        if field == "magic":
            assert isinstance(ei.value, vdisk.FormatError)
        else:
            assert isinstance(ei.value, vdisk.CorruptImageError)
            assert "CRC" in str(ei.value)
        with pytest.raises((vdisk.FormatError, vdisk.CorruptImageError)):
            vdisk.check(path)
        with pytest.raises((vdisk.FormatError, vdisk.CorruptImageError)):
            vdisk.check(path, repair=True)
    else:
        assert_refused_reported_or_harmless(probe(path), base.content, field)


def _valid_crc_params():
    for field in FIELDS:
        for kind in ("zero", "ff", "random"):
            for slots in ("active", "both"):
                yield pytest.param(field, kind, slots, id=f"{field}-{kind}-{slots}")


@pytest.mark.parametrize("field, kind, slots", list(_valid_crc_params()))
def test_header_field_damage_with_valid_crc(damaged, base, field, kind, slots):
    """Damage that passes the checksum: refused by validation, or the image
    opens, reads and checks with nothing but VdiskErrors, and any change
    of content is reported by check."""
    buf, save = damaged
    for slot in ((base.active,) if slots == "active" else (0, 1)):
        off = L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS[field]
        n = FIELD_SIZES[field]
        buf[off:off + n] = damage_value(field, kind, bytes(buf[off:off + n]))
        fix_crc(buf, slot)
    path = save()
    out = probe(path)
    if field in ("version", "incompatible_features") and kind != "zero":
        assert isinstance(out.open_error, vdisk.FormatError), out
    if field in ("bitmap_offset", "table_capacity", "refcount_capacity") and kind != "random":
        if slots == "both":     # no valid slot left
            assert isinstance(out.open_error, vdisk.CorruptImageError), out
        else:                   # the newest slot fails validation: the older one is used
            assert out.open_error is None and out.content == base.content, out
    if field == "header_length" and kind != "random" and slots == "both":
        assert isinstance(out.open_error, vdisk.CorruptImageError), out
    assert_refused_reported_or_harmless(out, base.content, f"{field}/{kind}/{slots}")
    if out.open_error is None:
        # a writer on the damaged header: only VdiskErrors, and the result checks (or is reported)
        try:
            with vdisk.open(path, "r+") as d:
                d.pwrite(pattern(99, BS), 0)
                d.flush()
                assert d.pread(BS, 0) == pattern(99, BS)
                if d.track_changes:
                    d.checkpoint()                    # a header commit
        except vdisk.VdiskError:
            pass
        except Exception as exc:  # noqa: BLE001
            not_vdisk_error("writing", exc)
        try:
            vdisk.check(path)
        except vdisk.VdiskError:
            pass


@pytest.mark.parametrize("op", ["checkpoint", "resize_grow", "resize_shrink", "reset_tracking"])
def test_max_sequence_then_header_commit(damaged, base, op):
    buf, save = damaged
    struct.pack_into("<Q", buf, L.SLOT_OFFSETS[base.active] + L.FIELD_OFFSETS["sequence"], 2 ** 64 - 1)
    fix_crc(buf, base.active)
    path = save()
    with vdisk.open(path, "r+") as d:
        assert d._slot == base.other            # a sequence past 2^62 fails validation: the older slot wins
        try:
            {"checkpoint": d.checkpoint, "resize_grow": lambda: d.resize(2 * VSIZE),
             "resize_shrink": lambda: d.resize(VSIZE // 2), "reset_tracking": d.reset_tracking}[op]()
        except vdisk.VdiskError:
            pass                                       # refusing the commit is fine; struct.error is not
    with vdisk.open(path) as d:
        assert d.pread(VSIZE // 2, 0) == base.content[:VSIZE // 2]


@pytest.mark.parametrize("field, value", [("table_capacity", 0), ("bitmap_offset", 0), ("generation", 0),
                                          ("refcount_capacity", 0), ("flags", 0x80)])
def test_field_invalid_newest_slot_falls_back_as_documented(damaged, base, field, value):
    buf, save = damaged
    off = L.SLOT_OFFSETS[base.active] + L.FIELD_OFFSETS[field]
    buf[off:off + FIELD_SIZES[field]] = value.to_bytes(FIELD_SIZES[field], "little")
    fix_crc(buf, base.active)
    with vdisk.open(save()) as d:
        assert d._slot == base.other
        assert d.pread(VSIZE, 0) == base.content


def test_crc_damage_falls_back(damaged, base):
    buf, save = damaged
    off = L.SLOT_OFFSETS[base.active] + L.CRC_OFFSET
    buf[off] ^= 0x01
    with vdisk.open(save()) as d:
        assert d._slot == base.other
        assert d.pread(VSIZE, 0) == base.content


def test_sequence_decides_between_valid_slots(damaged, base):
    """Both slots valid: the higher sequence wins, whichever slot holds it."""
    buf, save = damaged
    old = L.Header.unpack(bytes(buf[L.SLOT_OFFSETS[base.other]:][:L.SLOT_SIZE]))
    old.sequence = base.header.sequence + 5
    old.virtual_size = VSIZE - BS             # tell the two headers apart
    buf[L.SLOT_OFFSETS[base.other]:L.SLOT_OFFSETS[base.other] + L.SLOT_SIZE] = old.pack()
    with vdisk.open(save()) as d:
        assert d._slot == base.other and d.size == VSIZE - BS
        assert d.pread(VSIZE - BS, 0) == base.content[:VSIZE - BS]


# ============================================================================ torn header writes
@pytest.mark.parametrize("tear", [8, 16, 100, 128, 200, 248, 252, 255])
def test_torn_header_write_uses_the_other_slot(damaged, base, tear):
    """A new header (sequence + 1) written to the inactive slot and torn
    after `tear` bytes, before its CRC is complete (the rest garbage): the
    current slot wins."""
    buf, save = damaged
    new = dataclasses.replace(base.header, sequence=base.header.sequence + 1,
                              generation=base.header.generation + 1)
    packed = bytearray(new.pack())
    whole = bytes(packed)
    rng = np.random.default_rng(tear)
    packed[tear:] = rng.integers(0, 256, L.SLOT_SIZE - tear, dtype=np.uint8).tobytes()
    packed[tear] = whole[tear] ^ 0xFF     # torn means different: random bytes could match the CRC (1 in 256)
    start = L.SLOT_OFFSETS[base.other]
    buf[start:start + L.SLOT_SIZE] = packed
    path = save()
    with vdisk.open(path) as d:
        assert d._slot == base.active
        assert d._hdr.sequence == base.header.sequence
        assert d.generation == base.header.generation
        assert d.pread(VSIZE, 0) == base.content
    assert vdisk.check(path).ok


def test_new_header_with_garbage_slot_tail(damaged, base):
    """A complete new header followed by garbage in the rest of its slot
    (bytes 256.. should be zero): either header may win, the data is intact."""
    buf, save = damaged
    new = dataclasses.replace(base.header, sequence=base.header.sequence + 1,
                              generation=base.header.generation + 1)
    packed = bytearray(new.pack())
    packed[L.HEADER_LENGTH:] = b"\xa5" * (L.SLOT_SIZE - L.HEADER_LENGTH)
    start = L.SLOT_OFFSETS[base.other]
    buf[start:start + L.SLOT_SIZE] = packed
    path = save()
    with vdisk.open(path) as d:
        assert (d._slot, d.generation) in ((base.other, base.header.generation + 1),
                                           (base.active, base.header.generation))
        assert d.pread(VSIZE, 0) == base.content
    assert vdisk.check(path).ok


def test_torn_header_write_old_tail(damaged, base):
    """The new header's first sector landed, the rest of the slot still holds the old bytes."""
    buf, save = damaged
    new = dataclasses.replace(base.header, sequence=base.header.sequence + 1, virtual_size=VSIZE - BS)
    start = L.SLOT_OFFSETS[base.other]
    buf[start:start + 100] = new.pack()[:100]
    with vdisk.open(save()) as d:
        assert d._slot == base.active and d.size == VSIZE
        assert d.pread(VSIZE, 0) == base.content


# ============================================================================ feature bits
@pytest.mark.parametrize("bit", [1, 2, 17, 63])      # bit 0 is the checkpoint log
@pytest.mark.parametrize("slots", ["active", "both"])
def test_unknown_incompatible_feature_is_refused(damaged, base, bit, slots):
    buf, save = damaged
    for slot in ((base.active,) if slots == "active" else (0, 1)):
        off = L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS["incompatible_features"]
        struct.pack_into("<Q", buf, off, L.INCOMPAT_KNOWN | 1 << bit)
        fix_crc(buf, slot)
    path = save()
    for mode in ("r", "r+"):
        with pytest.raises(vdisk.FormatError) as ei:
            vdisk.open(path, mode)
        assert "incompatible" in str(ei.value)
    with pytest.raises(vdisk.FormatError):
        vdisk.check(path)
    with pytest.raises(vdisk.FormatError):
        vdisk.check(path, repair=True)
    assert bytes(buf) == file_bytes(path)             # nothing was written


@pytest.mark.parametrize("bit", [0, 5, 63])
def test_unknown_compatible_feature_opens(damaged, base, bit):
    buf, save = damaged
    off = L.SLOT_OFFSETS[base.active] + L.FIELD_OFFSETS["compatible_features"]
    struct.pack_into("<Q", buf, off, 1 << bit)
    fix_crc(buf, base.active)
    path = save()
    with vdisk.open(path) as d:
        assert d._slot == base.active
        assert d.pread(VSIZE, 0) == base.content
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"still writable", 0)
    assert vdisk.check(path).ok
    with vdisk.open(path) as d:
        assert d.pread(14, 0) == b"still writable"


def test_unknown_version_is_refused(damaged, base):
    buf, save = damaged
    for slot in (0, 1):
        struct.pack_into("<I", buf, L.SLOT_OFFSETS[slot] + L.FIELD_OFFSETS["version"], 2)
        fix_crc(buf, slot)
    with pytest.raises(vdisk.FormatError) as ei:
        vdisk.open(save())
    assert "version" in str(ei.value)


# ============================================================================ not a vdisk file
@pytest.mark.parametrize("kind", ["empty", "one_byte", "text", "random_small", "random_large", "zeros",
                                  "magic_only", "other_magic", "qcow2_like"])
def test_not_a_vdisk_file(img, kind):
    rng = np.random.default_rng(42)
    data = {
        "empty": b"",
        "one_byte": b"\x89",
        "text": b"This is just a text file.\nIt is not a disk image.\n" * 50,
        "random_small": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "random_large": rng.integers(0, 256, 200 * KiB, dtype=np.uint8).tobytes(),
        "zeros": bytes(128 * KiB),
        "magic_only": L.MAGIC,
        "other_magic": b"\x89VDISK\r\x00" + bytes(100 * KiB),
        "qcow2_like": b"QFI\xfb" + bytes(100 * KiB),
    }[kind]
    with open(img, "wb") as f:
        f.write(data)
    for mode in ("r", "r+"):
        with pytest.raises(vdisk.VdiskError) as ei:
            vdisk.open(img, mode)
        assert isinstance(ei.value, (vdisk.FormatError, vdisk.CorruptImageError)), ei.value
        if kind != "magic_only":
            assert isinstance(ei.value, vdisk.FormatError), ei.value
    with pytest.raises((vdisk.FormatError, vdisk.CorruptImageError)):
        vdisk.check(img)
    with pytest.raises((vdisk.FormatError, vdisk.CorruptImageError)):
        vdisk.check(img, repair=True)
    assert file_bytes(img) == data                     # untouched


def test_directory_is_not_an_image(tmp_path):
    for mode in ("r", "r+"):
        with pytest.raises(vdisk.VdiskError):
            vdisk.open(tmp_path, mode)


# ============================================================================ truncation
def _truncation_points(base: Base) -> dict:
    h = base.header
    size = len(base.raw)
    data_start = h.refcount_offset + L.round_up(h.refcount_capacity * 2, BS)
    return {
        "0": 0, "1": 1, "100": 100, "4095": 4095, "4096": 4096, "4097": 4097, "8191": 8191, "8192": 8192,
        "in_bitmap": L.BITMAP_OFFSET + 100, "header_area_end": L.HEADER_AREA,
        "mid_table": h.table_offset + 2048, "table_end": h.table_offset + BS, "mid_counters": h.counter_offset + 100,
        "mid_refcounts": h.refcount_offset + 1000, "data_start": data_start,
        "mid_data_aligned": data_start + 3 * BS, "mid_data_unaligned": data_start + 3 * BS + 1000,
        "last_block": size - BS, "size-512": size - 512, "size-1": size - 1,
    }


@pytest.mark.parametrize("point", [
    "0", "1", "100", "4095", "4096", "4097", "8191", "8192", "in_bitmap", "header_area_end", "mid_table",
    "table_end", "mid_counters", "mid_refcounts", "data_start", "mid_data_aligned",
    "mid_data_unaligned", "last_block", "size-512", "size-1"])
def test_truncated_image(damaged, base, point):
    """Regression: a cut inside the last data block (file size no longer a
    multiple of the block size) used to open and check clean, the lost bytes
    reading as zeros; now the block counts as outside the file."""
    buf, save = damaged
    at = _truncation_points(base)[point]
    path = save(bytes(buf[:at]))
    out = probe(path)
    if at < 2 * L.SLOT_SIZE:
        assert isinstance(out.open_error, (vdisk.FormatError, vdisk.CorruptImageError)), out
    if at < L.HEADER_AREA + 3 * BS:                   # any metadata region cut: refused at open
        assert isinstance(out.open_error, vdisk.CorruptImageError) or at < 2 * L.SLOT_SIZE, out
    assert_refused_reported_or_harmless(out, base.content, f"truncated at {at}")
    if out.check is not None and not out.check.ok:
        assert_repairable(path)


def test_truncated_then_extended_with_zeros(damaged, base):
    """Data blocks replaced by a hole of zeros (truncate + extend): the table
    still points at them, content changes silently -- unavoidable without
    data checksums, but open/check must not crash and the metadata is fine."""
    buf, save = damaged
    path = save()
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.truncate(size - 3 * BS)
        f.truncate(size)
    out = probe(path)
    assert out.open_error is None and out.check is not None
    assert out.content[:BS] == base.content[:BS]


# ============================================================================ metadata regions
def _regions(base: Base) -> dict:
    out = {name: (off, length) for name, off, length in base.header.regions()}
    out["bitmap"] = (base.header.bitmap_offset, base.header.bitmap_length)
    out["slot_tail"] = (L.HEADER_LENGTH, L.SLOT_SIZE - L.HEADER_LENGTH)    # the unused rest of slot 0
    out["reserved_area"] = (L.BITMAP_OFFSET + base.header.bitmap_length,
                            L.HEADER_AREA - L.BITMAP_OFFSET - base.header.bitmap_length)
    return out


REGIONS = ["header", "table", "counters", "refcounts", "bitmap", "slot_tail", "reserved_area"]
REGION_EXPECT = {
    ("bitmap", "*"): "harmless", ("slot_tail", "*"): "harmless", ("reserved_area", "*"): "harmless",
    ("counters", "zero"): "harmless", ("counters", "*"): "counters",
    ("table", "zero"): "leaks", ("table", "*"): "refused",
    ("refcounts", "zero"): "refused", ("refcounts", "ones"): "leaks", ("refcounts", "scribble"): None,
    ("header", "*"): None,
}


@pytest.mark.parametrize("kind", ["zero", "scribble", "ones"])
@pytest.mark.parametrize("region", REGIONS)
def test_metadata_region_damage(damaged, base, region, kind):
    buf, save = damaged
    off, length = _regions(base)[region]
    if kind == "zero":
        buf[off:off + length] = bytes(length)
    elif kind == "ones":
        buf[off:off + length] = b"\xff" * length
    else:
        buf[off:off + length] = np.random.default_rng(zlib.crc32(region.encode())).integers(
            0, 256, length, dtype=np.uint8).tobytes()
    path = save()
    out = probe(path)
    assert_refused_reported_or_harmless(out, base.content, f"{region}/{kind}")
    if region == "header":
        assert isinstance(out.open_error, (vdisk.FormatError, vdisk.CorruptImageError))
        assert out.check_error is not None
        return
    expect = REGION_EXPECT.get((region, kind), REGION_EXPECT.get((region, "*")))
    if expect == "harmless":            # carries no data: opens, reads the original, checks clean
        assert out.open_error is None and out.content == base.content, out
        assert out.check.ok, out.check
    elif expect == "refused":
        assert isinstance(out.open_error, vdisk.CorruptImageError), out
        assert not out.check.ok and out.check.corruptions, out.check
    elif expect == "leaks":             # blocks still allocated but no longer referenced
        assert out.open_error is None and not out.check.ok and out.check.leaked_blocks > 0, out
    elif expect == "counters":          # tracking damage: data intact, check reports the bad counters
        assert out.open_error is None and out.content == base.content, out
        assert not out.check.ok and any("change counter" in c for c in out.check.corruptions), out.check
    if region == "table" and kind == "zero":
        assert out.content == bytes(VSIZE)
        assert out.check.leaked_blocks >= len(base.mapped)
    if out.check is not None and not out.check.ok:
        assert out.check.corruptions or out.check.leaked_blocks
        assert_repairable(path)


def test_scribbled_counters_reported_and_clamped(damaged, base):
    buf, save = damaged
    h = base.header
    counters = np.frombuffer(bytes(buf[h.counter_offset:h.counter_offset + NB * 4]), dtype=np.uint32).copy()
    counters[[5, 77, 500]] = [h.generation + 1, 0xFFFFFFFF, 123456]
    buf[h.counter_offset:h.counter_offset + NB * 4] = counters.tobytes()
    path = save()
    r = vdisk.check(path)
    assert not r.ok and len(r.corruptions) == 3
    assert any("block 77" in c for c in r.corruptions)
    assert_repairable(path, base.content)


# ============================================================================ block table entries
def _table_entry_offset(base: Base, vblock: int) -> int:
    return base.header.table_offset + 4 * vblock


TABLE_CASES = ["past_eof", "at_eof", "far_past_eof", "header", "header_area", "into_table", "into_counters",
               "into_refcounts", "duplicate", "all_ones", "freed_block", "slot0"]


@pytest.mark.parametrize("case", TABLE_CASES)
def test_table_entry_damage(damaged, base, case):
    buf, save = damaged
    h = base.header
    victim = 500
    end_block = len(base.raw) // BS
    value = {
        "past_eof": end_block + 10,
        "at_eof": end_block,
        "far_past_eof": h.refcount_capacity + 5,
        "header": 1,
        "slot0": 0x0,                          # not damage: 0 means unallocated (handled below)
        "header_area": L.HEADER_AREA // BS - 1,
        "into_table": h.table_offset // BS,
        "into_counters": h.counter_offset // BS,
        "into_refcounts": h.refcount_offset // BS,
        "duplicate": int(base.table[100]),
        "all_ones": 0xFFFFFFFF,
        "freed_block": base.freed_phys,
    }[case]
    struct.pack_into("<I", buf, _table_entry_offset(base, victim), value)
    path = save()
    out = probe(path)
    expected = bytearray(base.content)
    expected[victim * BS:(victim + 1) * BS] = bytes(BS)
    if case == "slot0":                        # the entry now says "unallocated": a leak, reported
        assert out.open_error is None and out.content == expected
        assert not out.check.ok and out.check.leaked_blocks == 1 and not out.check.corruptions
        assert_repairable(path, bytes(expected))
        return
    if case != "duplicate":
        assert isinstance(out.open_error, vdisk.CorruptImageError), out
        assert "block" in str(out.open_error)
    assert out.check is not None, out.check_error
    assert not out.check.ok and out.check.corruptions, out.check
    assert_refused_reported_or_harmless(out, base.content, case)
    r, content = assert_repairable(path)
    assert r.repaired
    # every other block is intact
    for b in base.mapped:
        if b != victim:
            assert content[b * BS:(b + 1) * BS] == base.content[b * BS:(b + 1) * BS], b
    if case not in ("freed_block",):
        assert content[victim * BS:(victim + 1) * BS] == bytes(BS)     # the bad pointer was cleared


def test_duplicate_table_entry_refused_then_repaired(damaged, base):
    """Two virtual blocks sharing one physical block (refcount 1): a write
    through one would change the other, so open refuses; check reports it
    and repair keeps the first mapping."""
    buf, save = damaged
    struct.pack_into("<I", buf, _table_entry_offset(base, 500), int(base.table[100]))
    path = save()
    with pytest.raises(vdisk.CorruptImageError, match="earlier entry maps"):
        vdisk.open(path)
    r = vdisk.check(path)
    assert not r.ok and any("mapped by 2" in c for c in r.corruptions), r
    assert vdisk.check(path, repair=True).ok
    with vdisk.open(path) as d:
        assert d.pread(BS, 100 * BS) == base.content[100 * BS:101 * BS]
        assert d.pread(BS, 500 * BS) == bytes(BS)


def test_table_entry_past_virtual_size(tmp_path):
    """Entries past the virtual size (inside the table capacity) must be zero."""
    path = str(tmp_path / "short.vdk")
    with vdisk.create(path, 3 * MiB, block_size=BS) as d:        # 768 blocks, capacity 1024
        d.pwrite(pattern(1, BS), 0)
        table_offset, phys = d._hdr.table_offset, int(d._table[0])
        original = d.pread(3 * MiB, 0)
    with open(path, "r+b") as f:
        f.seek(table_offset + 4 * 900)
        f.write(struct.pack("<I", phys))
    out = probe(path)
    assert_refused_reported_or_harmless(out, original)
    assert out.check is not None and not out.check.ok
    assert any("past the virtual size" in c for c in out.check.corruptions)
    assert_repairable(path, original)


# ============================================================================ refcounts of metadata blocks
def test_zeroed_metadata_refcounts_never_hand_out_metadata_blocks(damaged, base):
    """Regression: the free list was built from the refcounts alone, so metadata
    blocks whose refcounts were damaged to 0 were handed out for data: the
    write landed inside the block table and was lost."""
    buf, save = damaged
    h = base.header
    meta_blocks = (h.refcount_offset + BS) // BS       # header area + table + counters + refcounts
    buf[h.refcount_offset:h.refcount_offset + 2 * meta_blocks] = bytes(2 * meta_blocks)
    path = save()
    assert not vdisk.check(path).ok                   # check sees it
    try:
        d = vdisk.open(path, "r+")                    # refusing the image is fine too
    except vdisk.CorruptImageError:
        return
    with d:
        data = pattern(77, BS)
        d.pwrite(data, 700 * BS)                      # an unallocated block: needs a new physical block
        d.flush()
        phys = int(d._table[700])
        metadata = {off // BS + i for _, off, n in h.regions() for i in range(n // BS)}
        assert phys not in metadata, f"allocated metadata block {phys}"
        assert d.pread(BS, 700 * BS) == data
    with vdisk.open(path) as d:
        assert d.pread(BS, 700 * BS) == data


# ============================================================================ hostile headers: memory
_HOSTILE_OPEN = """
    path, what = args
    if what == "open":
        d = vdisk.open(path)
        d.pread(4096, 0)
        d.close()
    else:
        vdisk.check(path)
"""


def _hostile_open(path, what="open") -> dict:
    return measure_in_child(_HOSTILE_OPEN, path, what, timeout=120)


def _write_hostile(path, base: Base, **fields) -> L.Header:
    """The base image with a new header (in the inactive slot, higher sequence)
    whose regions are moved as given; the old table/refcount pages are copied
    to the new places and the file is extended (sparse) so every region fits."""
    h = dataclasses.replace(base.header, sequence=base.header.sequence + 1, **fields)
    h.coarse_shift = L.coarse_shift_for(h.table_capacity, h.block_shift)
    h.bitmap_length = L.bitmap_length_for(h.table_capacity, h.block_shift, h.coarse_shift)
    end = max(off + n for _, off, n in h.regions())
    h.validate(end)
    old = base.header
    with open(path, "wb") as f:
        f.write(base.raw)
        f.truncate(max(end, len(base.raw)))
        f.seek(h.table_offset)
        f.write(base.raw[old.table_offset:old.table_offset + BS])
        f.seek(h.refcount_offset)
        f.write(base.raw[old.refcount_offset:old.refcount_offset + BS])
        f.seek(L.SLOT_OFFSETS[h.sequence % 2])
        f.write(h.pack())
    return h


def _refcount_capacity_for(refcount_offset: int, bs: int = BS) -> int:
    """The smallest refcount capacity whose table covers itself at refcount_offset."""
    cap = refcount_offset // bs + 1
    while cap * bs < refcount_offset + L.round_up(cap * L.REFCOUNT_BYTES, bs):
        cap = (refcount_offset + L.round_up(cap * L.REFCOUNT_BYTES, bs)) // bs + 1
    return cap


MEMORY_LIMIT = 200 * MiB


def test_hostile_max_table_capacity_bounded_memory(img, base):
    """Regression: open cleared entries past the virtual size with arr[nb:] = 0,
    faulting in the whole capacity-sized table and counters (~2 GiB RSS for a
    4 MiB disk claiming table_capacity 2**28)."""
    cap = L.MAX_BLOCKS
    tbytes = L.round_up(cap * 4, BS)
    t_off = 1 << 30
    c_off = t_off + tbytes
    r_off = c_off + tbytes
    _write_hostile(img, base, table_capacity=cap, table_offset=t_off, counter_offset=c_off,
                   refcount_offset=r_off, refcount_capacity=_refcount_capacity_for(r_off))
    assert os.stat(img).st_blocks * 512 < 4 * MiB      # sparse
    res = _hostile_open(img)
    assert res["growth"] < MEMORY_LIMIT, res


def test_hostile_huge_sparse_file_bounded_memory(img, base):
    fsize = 64 << 30
    rcap = fsize // BS
    r_off = fsize - L.round_up(rcap * 2, BS)
    _write_hostile(img, base, refcount_offset=r_off, refcount_capacity=rcap)
    assert os.path.getsize(img) == fsize
    res = _hostile_open(img)
    assert res["growth"] < MEMORY_LIMIT, res


def test_hostile_huge_sparse_file_check_bounded_memory(img, base):
    fsize = 256 << 30
    rcap = fsize // BS
    r_off = fsize - L.round_up(rcap * 2, BS)
    _write_hostile(img, base, refcount_offset=r_off, refcount_capacity=rcap)
    res = _hostile_open(img, "check")
    assert res["growth"] < MEMORY_LIMIT, res


@pytest.mark.parametrize("what", ["open", "check"])
def test_hostile_max_snapshot_and_bitmap_fields_bounded_memory(img, base, what):
    h = base.header
    end = len(base.raw)
    s_off = L.round_up(end, BS)
    _write_hostile(img, base, snapshot_offset=s_off, snapshot_capacity=L.MAX_SNAPSHOTS, snapshot_count=0,
                   refcount_capacity=max(h.refcount_capacity, (s_off + L.MAX_SNAPSHOTS * 256) // BS + 1))
    res = _hostile_open(img, what)
    assert res["growth"] < MEMORY_LIMIT, res


def test_hostile_large_table_check_bounded_memory(img, base):
    """check on the max-table-capacity image stays bounded (it loads arrays lazily)."""
    cap = L.MAX_BLOCKS
    tbytes = L.round_up(cap * 4, BS)
    t_off = 1 << 30
    r_off = t_off + 2 * tbytes
    _write_hostile(img, base, table_capacity=cap, table_offset=t_off, counter_offset=t_off + tbytes,
                   refcount_offset=r_off, refcount_capacity=_refcount_capacity_for(r_off))
    res = _hostile_open(img, "check")
    assert res["growth"] < MEMORY_LIMIT, res
