"""The on-disk format: docs/FORMAT.md against vdisk/layout.py, header slots, feature bits."""
import os
import re
import struct

import pytest

import vdisk
from vdisk import layout as L
from vdisk.testing import RecordingIO

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")


def doc_table(heading: str):
    text = open(DOC).read()
    section = text[text.index(heading):]
    end = section.find("\n## ", 1)          # up to the next heading
    section = section if end < 0 else section[:end]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| `(\w+)`", section, re.M)
    return [(int(o), int(s), n) for o, s, n in rows]


def test_header_table_matches_layout():
    rows = doc_table("## Header slot")
    fields = [(L.FIELD_OFFSETS[n], struct.calcsize("<" + c), n) for n, c in L._FIELDS]
    assert rows[:len(fields)] == fields


@pytest.mark.parametrize("heading, fields, entry_size", [
    ("## Snapshot table", L.SNAPSHOT_FIELDS, L.SNAPSHOT_ENTRY_SIZE),
    ("## Consumer table", L.CONSUMER_FIELDS, L.CONSUMER_ENTRY_SIZE),
])
def test_entry_tables_match_layout(heading, fields, entry_size):
    rows = doc_table(heading)
    off, documented = 0, []
    for n, c in fields:
        size = struct.calcsize("<" + c)
        if not n.startswith("reserved"):
            documented.append((off, size, n))
        off += size
    assert rows == documented
    assert off + 4 == entry_size


def test_magic_documented():
    assert " ".join(f"{b:02X}" for b in L.MAGIC) in open(DOC).read()


def test_header_roundtrip_and_crc():
    h = L.Header(virtual_size=1 << 20, block_shift=12, coarse_shift=25, image_uuid=b"a" * 16,
                 tracking_uuid=b"b" * 16, generation=3, table_offset=77824, table_capacity=1024,
                 counter_offset=81920, refcount_offset=86016, refcount_capacity=2048, bitmap_length=512)
    raw = h.pack()
    assert len(raw) == L.SLOT_SIZE and raw[L.HEADER_LENGTH:] == bytes(L.SLOT_SIZE - L.HEADER_LENGTH)
    assert L.Header.unpack(raw) == h
    bad = bytearray(raw)
    bad[40] ^= 1
    with pytest.raises(vdisk.CorruptImageError, match="CRC"):
        L.Header.unpack(bytes(bad))


def _rewrite_active_header(path, **changes):
    with vdisk.open(path) as d:
        h, slot = d._hdr, d._slot
    for k, v in changes.items():
        setattr(h, k, v)
    with open(path, "r+b") as f:
        f.seek(L.SLOT_OFFSETS[slot])
        f.write(h.pack())


def test_unknown_incompatible_feature_refused(img):
    vdisk.create(img, "1MiB").close()
    _rewrite_active_header(img, incompatible_features=1 << 5)
    with pytest.raises(vdisk.FormatError, match="incompatible"):
        vdisk.open(img)


def test_unknown_compatible_feature_ignored(img):
    with vdisk.create(img, "1MiB") as d:
        d.pwrite(b"x" * 100, 0)
    _rewrite_active_header(img, compatible_features=1 << 7)
    with vdisk.open(img) as d:
        assert d.pread(100, 0) == b"x" * 100


def test_newer_version_refused(img):
    vdisk.create(img, "1MiB").close()
    _rewrite_active_header(img, version=2)
    with pytest.raises(vdisk.FormatError, match="version 2"):
        vdisk.open(img)


def test_commit_alternates_slots_and_highest_sequence_wins(img):
    with vdisk.create(img, "1MiB", block_size="4KiB") as d:
        seqs = []
        for _ in range(3):
            d.checkpoint()
            seqs.append((d._hdr.sequence, d._slot))
    assert [s % 2 for s, _ in seqs] == [slot for _, slot in seqs]
    assert len({slot for _, slot in seqs}) == 2
    with vdisk.open(img) as d:
        assert d.generation == 4


@pytest.mark.parametrize("torn_bytes", [0, 128, 251])
def test_torn_header_commit_keeps_previous_state(img, torn_bytes):
    """A checkpoint whose header write is lost or torn: the image opens at the previous generation."""
    d = vdisk.create(img, "1MiB", block_size="4KiB", io_factory=RecordingIO)
    d.pwrite(b"a" * 4096, 0)
    first = d.checkpoint()
    rec = d._io
    captured = {}

    def grab(r):
        # the header write is the last pending op before the commit's sync
        if r.pending and r.pending[-1][0] == "w" and r.pending[-1][1] in L.SLOT_OFFSETS:
            op = r.pending[-1]
            torn = op[2][:torn_bytes]        # the record and its CRC are the first 256 bytes
            keep = [True] * (len(r.pending) - 1) + [False]
            image = bytearray(r.crash_image(keep=keep))
            image[op[1]:op[1] + len(torn)] = torn
            captured["image"] = bytes(image)
    rec.on_fsync = grab
    d.checkpoint()
    rec.on_fsync = None
    d.close()
    with open(img, "wb") as f:
        f.write(captured["image"])
    with vdisk.open(img) as d2:
        assert d2.generation == 2 and d2.change_id == first
        assert d2.pread(4096, 0) == b"a" * 4096


def test_not_a_vdisk_image(tmp_path):
    p = tmp_path / "raw.img"
    p.write_bytes(b"\0" * 100000)
    with pytest.raises(vdisk.FormatError, match="not a vdisk image"):
        vdisk.open(str(p))
    p.write_bytes(b"")
    with pytest.raises(vdisk.FormatError):
        vdisk.open(str(p))


def test_header_validation_limits():
    base = dict(virtual_size=1 << 20, block_shift=12, coarse_shift=25, image_uuid=b"a" * 16,
                tracking_uuid=b"b" * 16, generation=3, table_offset=77824, table_capacity=256,
                counter_offset=81920, refcount_offset=86016, refcount_capacity=2048, bitmap_length=512)
    L.Header(**base).validate()
    for change in [dict(block_shift=11), dict(block_shift=23), dict(virtual_size=1000),
                   dict(coarse_shift=11), dict(generation=0), dict(table_capacity=10),
                   dict(table_offset=77825), dict(counter_offset=77824), dict(flags=2),
                   dict(snapshot_count=1), dict(consumer_offset=4096), dict(bitmap_length=70000)]:
        with pytest.raises(vdisk.CorruptImageError):
            L.Header(**{**base, **change}).validate()
    with pytest.raises(vdisk.CorruptImageError, match="truncated"):
        L.Header(**base).validate(file_size=80000)


@pytest.mark.parametrize("text,value", [("512", 512), ("64KiB", 65536), ("10GiB", 10 << 30), ("1TiB", 1 << 40),
                                        ("4k", 4096), (1234, 1234)])
def test_parse_size(text, value):
    assert vdisk.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "12XB", "-5", "1.1K", None, 2.0, True])
def test_parse_size_rejects(bad):
    with pytest.raises(vdisk.VdiskError):
        vdisk.parse_size(bad)
