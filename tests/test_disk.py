"""The Disk API: create/open, positional and file-like I/O, discard, flush,
resize, map, the closed and read-only states, threads, and check on healthy
images.

Images are small (4 KiB - 64 KiB blocks, a few MiB) so the whole file runs in
seconds; every test compares against a bytearray model of the content.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import threading
import uuid

import numpy as np
import pytest

import vdisk
import vdisk.disk
from vdisk_testkit.helpers import differing_blocks, pattern, read_all

KiB = 1 << 10
MiB = 1 << 20
BS = 4 * KiB


def new(img, size="1MiB", block_size=BS, **kw):
    return vdisk.create(img, size, block_size=block_size, **kw)


def file_size(path) -> int:
    return os.stat(path).st_size


def disk_usage(path) -> int:
    """Bytes the file really occupies (sparse files use less than st_size)."""
    return os.stat(path).st_blocks * 512


# ============================================================================ create
class TestCreate:
    @pytest.mark.parametrize("size, expected", [
        (512, 512), ("512", 512), ("64KiB", 64 * KiB), ("10GiB", 10 << 30), ("1TiB", 1 << 40),
        (3 * MiB + 512, 3 * MiB + 512),
    ])
    def test_sizes(self, img, size, expected):
        with vdisk.create(img, size) as d:
            assert d.size == expected
            assert d.block_size == 64 * KiB
            assert d.map() == vdisk.Extents()
            assert d.pread(512, expected - 512) == bytes(512)
        with vdisk.open(img) as d:
            assert d.size == expected

    @pytest.mark.parametrize("bs", [4 * KiB, 8 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, "4KiB", "4MiB"])
    def test_valid_block_sizes(self, img, bs):
        with vdisk.create(img, "8MiB", block_size=bs) as d:
            expected = vdisk.parse_size(bs)
            assert d.block_size == expected
            d.pwrite(b"\x01" * 3, expected - 1)       # straddles the first block boundary
            assert d.pread(5, expected - 2) == b"\0\x01\x01\x01\0"
            assert len(d.map()) == 1 and d.map().nbytes == 2 * expected
        with vdisk.open(img) as d:
            assert d.block_size == vdisk.parse_size(bs)

    @pytest.mark.parametrize("bs", [0, 512, 2 * KiB, 3 * KiB, 4 * KiB + 1, 12 * KiB, 8 * MiB, 1 << 30, "huge", -4096])
    def test_invalid_block_sizes(self, img, bs):
        with pytest.raises(vdisk.VdiskError):
            vdisk.create(img, "8MiB", block_size=bs)
        assert not os.path.exists(img)
        assert os.listdir(os.path.dirname(img)) == []      # no temporary file left behind

    @pytest.mark.parametrize("size", [1, 511, 513, 4097, "1000", 64 * KiB - 1])
    def test_size_not_multiple_of_512(self, img, size):
        with pytest.raises(vdisk.OutOfRangeError) as ei:
            vdisk.create(img, size)
        assert isinstance(ei.value, ValueError)
        assert isinstance(ei.value, vdisk.VdiskError)
        assert not os.path.exists(img)

    @pytest.mark.parametrize("size", ["abc", "12 parsecs", "1.1KiB", None, 1.0, True, -512])
    def test_bad_size_values(self, img, size):
        with pytest.raises(vdisk.VdiskError):
            vdisk.create(img, size)
        assert not os.path.exists(img)

    def test_size_beyond_format_limit(self, img):
        # 1 TiB is the limit at 4 KiB blocks (2**28 blocks)
        with pytest.raises(vdisk.OutOfRangeError):
            vdisk.create(img, "2TiB", block_size="4KiB")
        assert not os.path.exists(img)

    def test_refuses_existing_file(self, img):
        with open(img, "wb") as f:
            f.write(b"precious data")
        with pytest.raises(vdisk.InvalidArgumentError) as ei:
            vdisk.create(img, "1MiB")
        assert isinstance(ei.value, vdisk.VdiskError)
        assert "exists" in str(ei.value)
        with open(img, "rb") as f:
            assert f.read() == b"precious data"
        assert sorted(os.listdir(os.path.dirname(img))) == ["disk.vdk"]

    def test_refuses_existing_image(self, img):
        with new(img) as d:
            d.pwrite(b"keep", 0)
        with pytest.raises(vdisk.InvalidArgumentError):
            vdisk.create(img, "2MiB")
        with vdisk.open(img) as d:
            assert d.size == MiB and d.pread(4, 0) == b"keep"

    def test_overwrite(self, img):
        with new(img) as d:
            d.pwrite(b"old", 0)
            old_uuid = d.uuid
        with vdisk.create(img, "2MiB", block_size=BS, overwrite=True) as d:
            assert d.size == 2 * MiB
            assert d.pread(3, 0) == bytes(3)
            assert d.uuid != old_uuid
        assert sorted(os.listdir(os.path.dirname(img))) == ["disk.vdk"]

    def test_overwrite_replaces_non_image(self, img):
        with open(img, "wb") as f:
            f.write(b"x" * 100)
        with vdisk.create(img, "1MiB", overwrite=True) as d:
            assert d.pread(100, 0) == bytes(100)

    def test_one_tib_is_quick_and_sparse(self, img):
        with vdisk.create(img, "1TiB") as d:
            assert d.size == 1 << 40
            d.pwrite(b"end", (1 << 40) - 3)
            d.pwrite(b"start", 0)
            d.flush()
            assert d.pread(3, (1 << 40) - 3) == b"end"
            assert d.map().nbytes == 2 * 64 * KiB
        assert disk_usage(img) < 8 * MiB
        with vdisk.open(img) as d:
            assert d.pread(5, 0) == b"start"
            assert d.pread(3, (1 << 40) - 3) == b"end"
            assert d.pread(64 * KiB, 1 << 39) == bytes(64 * KiB)
        r = vdisk.check(img)
        assert r.ok and r.allocated_blocks == 2 and r.total_blocks == 1 << 24

    def test_new_image_file_is_small(self, img):
        new(img, "64MiB").close()
        assert file_size(img) <= 2 * MiB        # the data area starts at 2 MiB: the rest is a hole
        assert disk_usage(img) < 2 * MiB

    @pytest.mark.parametrize("block_size", ["4KiB", "64KiB", "1MiB"])
    def test_sequential_data_is_2MiB_aligned_in_the_file(self, img, block_size):
        """A fresh image filled in order from 0 keeps file offset = virtual offset mod 2 MiB,
        so the page cache can use large folios for it (FORMAT.md, "Data alignment")."""
        with new(img, "64MiB", block_size=block_size) as d:
            chunk = bytes(range(1, 256)) * (MiB // 255) + b"\1" * (MiB % 255)
            for off in range(0, 8 * MiB, MiB):
                d.pwrite(chunk, off)
            d.flush()
            runs = d.host_map()
        assert runs and runs[0][0] == 0
        assert all((offset - host) % (2 * MiB) == 0 for offset, _, host in runs)
        assert vdisk.check(img).ok

    def test_small_disks_stay_packed(self, img):
        """Below layout.DATA_ALIGN_MIN_SIZE no padding: the data area follows the refcounts."""
        with new(img, "1MiB", block_size="64KiB") as d:
            d.pwrite(b"\1" * BS, 0)
            d.flush()
            (_, _, host), = d.host_map()
        assert host < 2 * MiB and host % (2 * MiB)

    def test_track_changes_off(self, img):
        with new(img, track_changes=False) as d:
            assert not d.track_changes
            d.pwrite(b"abc", 10)
        with vdisk.open(img) as d:
            assert not d.track_changes
            assert d.pread(3, 10) == b"abc"
        assert vdisk.check(img).ok

    def test_pathlike(self, tmp_path):
        p = tmp_path / "p.vdk"
        with vdisk.create(p, "1MiB") as d:
            d.pwrite(b"x", 0)
        with vdisk.open(p) as d:
            assert d.pread(1, 0) == b"x"
            assert d.path == str(p)


# ============================================================================ open
class TestOpen:
    @pytest.mark.parametrize("mode", ["x", "w", "rw", "a", "", "R", "r+b"])
    def test_bad_mode(self, img, mode):
        new(img).close()
        with pytest.raises(vdisk.VdiskError):
            vdisk.open(img, mode=mode)

    def test_missing_file(self, tmp_path):
        with pytest.raises(vdisk.VdiskError):
            vdisk.open(tmp_path / "nope.vdk")

    def test_modes(self, img):
        new(img).close()
        with vdisk.open(img) as d:
            assert d.mode == "r" and d.readable() and not d.writable() and d.seekable()
        with vdisk.open(img, "r+") as d:
            assert d.mode == "r+" and d.writable()

    def test_uuid_stable_across_reopen(self, img, tmp_path):
        with new(img) as d:
            u = d.uuid
            assert isinstance(u, uuid.UUID)
            d.pwrite(b"x", 0)
            d.checkpoint()
        for mode in ("r", "r+"):
            with vdisk.open(img, mode) as d:
                assert d.uuid == u
        with new(tmp_path / "other.vdk") as other:
            assert other.uuid != u

    def test_read_only_refuses_writes(self, img):
        with new(img) as d:
            d.pwrite(b"data", 0)
        with vdisk.open(img, "r") as d:
            for op in (lambda: d.pwrite(b"x", 0), lambda: d.write(b"x"), lambda: d.discard(0, BS),
                       lambda: d.resize("2MiB"), lambda: d.checkpoint(), lambda: d.reset_tracking()):
                with pytest.raises(vdisk.ReadOnlyError):
                    op()
            d.flush()            # a no-op on a read-only disk
            assert d.pread(4, 0) == b"data"
            assert d.size == MiB
        with vdisk.open(img) as d:
            assert d.pread(5, 0) == b"data\0"


# ============================================================================ pwrite / pread
class TestReadWrite:
    def test_never_written_reads_zeros(self, img):
        with new(img, "2MiB") as d:
            assert read_all(d) == bytes(2 * MiB)
            assert d.pread(0, 0) == b""
            assert d.pread(0, 2 * MiB) == b""

    @pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "np_uint8", "np_uint32",
                                      "np_noncontig", "np_2d", "np_transposed", "mv_slice", "mv_strided"])
    def test_write_buffer_types(self, img, kind):
        raw = pattern(1, 3 * BS + 100)
        arr8 = np.frombuffer(raw, dtype=np.uint8)
        if kind == "bytes":
            data, expect = raw, raw
        elif kind == "bytearray":
            data, expect = bytearray(raw), raw
        elif kind == "memoryview":
            data, expect = memoryview(raw), raw
        elif kind == "np_uint8":
            data, expect = arr8.copy(), raw
        elif kind == "np_uint32":
            data = np.arange(1000, 2000, dtype=np.uint32) * np.uint32(2654435761)
            expect = data.tobytes()
        elif kind == "np_noncontig":
            data = np.arange(4000, dtype=np.uint32)[::3]
            assert not data.flags.c_contiguous
            expect = data.tobytes()
        elif kind == "np_2d":
            data = np.arange(64 * 100, dtype=np.uint16).reshape(64, 100)
            expect = data.tobytes()
        elif kind == "np_transposed":
            data = np.arange(64 * 100, dtype=np.uint16).reshape(64, 100).T
            expect = data.tobytes()          # C order of the logical array
        elif kind == "mv_slice":
            data, expect = memoryview(raw)[7:5000], raw[7:5000]
        else:
            data, expect = memoryview(raw)[::2], raw[::2]
        off = BS - 17
        with new(img) as d:
            assert d.pwrite(data, off) == len(expect)
            assert d.pread(len(expect), off) == expect
            assert d.pread(off, 0) == bytes(off)
            end = off + len(expect)
            assert d.pread(BS, end) == bytes(BS)
        with vdisk.open(img) as d:
            assert d.pread(len(expect), off) == expect

    def test_pwrite_returns_length(self, img):
        with new(img) as d:
            assert d.pwrite(b"", 0) == 0
            assert d.pwrite(b"", MiB) == 0            # empty write at the very end is fine
            assert d.pwrite(b"a" * 12345, 999) == 12345
            assert d.pwrite(np.ones(10, np.uint64), 0) == 80

    def test_pread_returns_bytes(self, img):
        with new(img) as d:
            d.pwrite(b"xyz", 5)
            out = d.pread(10, 0)
            assert type(out) is bytes and out == b"\0" * 5 + b"xyz" + b"\0\0"

    def test_preadinto(self, img):
        raw = pattern(2, 3 * BS)
        with new(img) as d:
            d.pwrite(raw, BS // 2)
            buf = bytearray(2 * BS)
            assert d.preadinto(buf, BS // 2 + 10) == 2 * BS
            assert bytes(buf) == raw[10:10 + 2 * BS]
            arr = np.zeros(BS // 4, dtype=np.uint32)
            assert d.preadinto(arr, BS // 2) == BS
            assert arr.tobytes() == raw[:BS]
            arr8 = np.full(100, 7, dtype=np.uint8)
            assert d.preadinto(arr8, 0) == 100
            assert not arr8.any()
            mv = memoryview(bytearray(50))
            assert d.preadinto(mv[10:20], BS // 2) == 10
            assert bytes(mv[10:20]) == raw[:10]
            assert bytes(mv[:10]) == bytes(10)
            assert d.preadinto(bytearray(), MiB) == 0

    def test_preadinto_readonly_buffer(self, img):
        with new(img) as d:
            with pytest.raises(vdisk.VdiskError):
                d.preadinto(b"immutable", 0)
            ro = np.zeros(10, np.uint8)
            ro.flags.writeable = False
            with pytest.raises(vdisk.VdiskError):
                d.preadinto(ro, 0)

    def test_preadinto_noncontiguous_numpy(self, img):
        with new(img) as d:
            d.pwrite(b"\x01" * 64, 0)
            base = np.zeros(128, dtype=np.uint8)
            view = base[::2]
            try:
                n = d.preadinto(view, 0)
            except (vdisk.VdiskError, ValueError, TypeError):
                return                      # refusing is acceptable; silently dropping the data is not
            assert n == 64
            assert view.tobytes() == b"\x01" * 64

    def test_bad_buffer_types(self, img):
        with new(img) as d:
            for bad in ("text", 123, None, [1, 2, 3]):
                with pytest.raises(vdisk.VdiskError):
                    d.pwrite(bad, 0)
            assert d.map() == vdisk.Extents()

    def test_overwrite_and_partial_blocks(self, img):
        model = bytearray(MiB)
        with new(img) as d:
            for seed, (off, n) in enumerate([(0, 10), (5, BS), (BS * 3 - 1, 2), (BS * 10, 5 * BS + 7),
                                             (BS * 11 + 3, 100), (MiB - 1, 1), (MiB - 3 * BS, 3 * BS)]):
                data = pattern(seed + 10, n)
                assert d.pwrite(data, off) == n
                model[off:off + n] = data
                assert read_all(d) == model
            d.flush()
        with vdisk.open(img) as d:
            assert read_all(d) == model
        assert vdisk.check(img).ok

    def test_write_spanning_many_blocks_in_chunks(self, img):
        data = pattern(3, 2 * MiB)
        with new(img, "4MiB") as d:
            for i in range(0, len(data), 256 * KiB):
                d.pwrite(data[i:i + 256 * KiB], MiB + i)
            assert d.pread(2 * MiB, MiB) == data
            assert d.map() == vdisk.Extents([MiB], [2 * MiB])

    @pytest.mark.parametrize("nblocks", [1025, 2500])
    def test_single_write_of_more_than_1024_blocks(self, img, nblocks):
        """Regression: one pwrite over more than IOV_MAX (1024) physically
        contiguous blocks failed with EINVAL from os.pwritev, after the block
        table had been updated (leaving a pointer past the end of the file)."""
        data = pattern(4, nblocks * BS)
        with new(img, "16MiB") as d:
            assert d.pwrite(data, 0) == len(data)                 # all new blocks
            assert d.pread(len(data), 0) == data
            again = pattern(5, (nblocks + 3) * BS)
            assert d.pwrite(again, 0) == len(again)               # in place, then 3 new blocks
            assert d.pread(len(again), 0) == again
        r = vdisk.check(img)
        assert r.ok and r.allocated_blocks == nblocks + 3, r
        with vdisk.open(img) as d:
            assert d.pread(len(again), 0) == again

    def test_zero_writes_allocate_nothing(self, img):
        with new(img, "2MiB") as d:
            d.flush()
            size0 = file_size(img)
            assert d.pwrite(bytes(MiB), 0) == MiB
            assert d.pwrite(bytearray(100), MiB + 17) == 100
            assert d.pwrite(np.zeros(3 * BS, dtype=np.uint32), MiB + BS) == 12 * BS
            assert d.map() == vdisk.Extents()
            assert len(d.map()) == 0 and d.map().nbytes == 0
            d.flush()
            assert file_size(img) == size0
            assert read_all(d) == bytes(2 * MiB)

    def test_whole_block_of_zeros_frees_the_block(self, img):
        with new(img) as d:
            d.pwrite(b"\xff" * (2 * BS), 0)
            assert d.map().nbytes == 2 * BS
            d.pwrite(bytes(BS), 0)
            assert d.map() == vdisk.Extents([BS], [BS])
            assert d.pread(2 * BS, 0) == bytes(BS) + b"\xff" * BS
            d.pwrite(bytes(10), BS)        # partial zeros keep the block
            assert d.map() == vdisk.Extents([BS], [BS])
            assert d.pread(BS, BS) == bytes(10) + b"\xff" * (BS - 10)

    @pytest.mark.parametrize("offset, length", [
        (MiB - 1, 2), (MiB, 1), (0, MiB + 1), (MiB - BS, BS + 512), (MiB + 4096, 10), (2 ** 63, 1),
        (2 ** 64 + 10, 4)])
    def test_past_end_raises_and_writes_nothing(self, img, offset, length):
        with new(img) as d:
            d.pwrite(pattern(5, 3 * BS), MiB - 3 * BS)
            d.pwrite(b"head", 0)
            d.flush()
            before, map_before, fsize = read_all(d), d.map(), file_size(img)
            with pytest.raises(vdisk.OutOfRangeError):
                d.pwrite(b"\xab" * length, offset)
            with pytest.raises(vdisk.OutOfRangeError):
                d.pread(length, offset)
            with pytest.raises(vdisk.OutOfRangeError):
                d.preadinto(bytearray(length), offset)
            with pytest.raises(vdisk.OutOfRangeError):
                d.discard(offset, length)
            assert read_all(d) == before
            assert d.map() == map_before
            d.flush()
            assert file_size(img) == fsize
        with vdisk.open(img) as d:
            assert read_all(d) == before

    def test_write_past_end_into_unallocated_area_writes_nothing(self, img):
        with new(img) as d:
            with pytest.raises(vdisk.OutOfRangeError):
                d.pwrite(b"\x01" * (2 * BS), MiB - BS)
            assert d.map() == vdisk.Extents()
            assert d.pread(BS, MiB - BS) == bytes(BS)

    @pytest.mark.parametrize("offset, length", [(-1, 1), (-BS, 10), (0, -1), (-1, 0)])
    def test_negative_offsets_raise(self, img, offset, length):
        with new(img) as d:
            with pytest.raises(vdisk.OutOfRangeError):
                d.pread(length, offset)
            with pytest.raises(vdisk.OutOfRangeError):
                d.discard(offset, length)
            if length >= 0:
                with pytest.raises(vdisk.OutOfRangeError):
                    d.pwrite(b"\x01" * length, offset)
                with pytest.raises(vdisk.OutOfRangeError):
                    d.preadinto(bytearray(length), offset)
            assert d.map() == vdisk.Extents()


# ============================================================================ discard
class TestDiscard:
    def test_whole_blocks_are_freed(self, img):
        with new(img) as d:
            d.pwrite(pattern(1, 8 * BS), 0)
            d.discard(2 * BS, 3 * BS)
            assert d.map() == vdisk.Extents([0, 5 * BS], [2 * BS, 3 * BS])
            assert d.pread(3 * BS, 2 * BS) == bytes(3 * BS)
            assert d.pread(2 * BS, 0) == pattern(1, 8 * BS)[:2 * BS]

    def test_partial_blocks_keep_other_bytes(self, img):
        raw = pattern(2, 4 * BS)
        model = bytearray(MiB)
        model[0:4 * BS] = raw
        with new(img) as d:
            d.pwrite(raw, 0)
            d.discard(100, 2 * BS)              # partial block 0, whole block 1? no: 100..2BS+100
            model[100:100 + 2 * BS] = bytes(2 * BS)
            assert read_all(d) == model
            # block 1 [BS, 2BS) is wholly inside the range: freed; blocks 0 and 2 stay
            assert d.map() == vdisk.Extents([0, 2 * BS], [BS, 2 * BS])
            d.discard(3 * BS + 5, 10)
            model[3 * BS + 5:3 * BS + 15] = bytes(10)
            assert read_all(d) == model
            assert d.map().nbytes == 3 * BS
        with vdisk.open(img) as d:
            assert read_all(d) == model
        assert vdisk.check(img).ok

    def test_discard_unallocated_and_empty(self, img):
        with new(img) as d:
            d.discard(0, MiB)
            d.discard(5, 0)
            d.discard(MiB, 0)
            assert d.map() == vdisk.Extents()
            assert read_all(d) == bytes(MiB)

    def test_discard_everything(self, img):
        with new(img) as d:
            d.pwrite(pattern(3, MiB), 0)
            assert d.map() == vdisk.Extents([0], [MiB])
            d.discard(0, MiB)
            assert d.map() == vdisk.Extents()
            assert read_all(d) == bytes(MiB)
        r = vdisk.check(img)
        assert r.ok and r.allocated_blocks == 0

    def test_discard_partial_last_block(self, img):
        size = 10 * BS + 1024
        with new(img, size) as d:
            d.pwrite(b"\x07" * size, 0)
            d.discard(10 * BS, 1024)            # the whole (short) last block: freed
            assert d.map() == vdisk.Extents([0], [10 * BS])
            d.discard(9 * BS + 1, BS - 1)
            assert d.pread(BS, 9 * BS) == b"\x07" + bytes(BS - 1)
            assert d.map() == vdisk.Extents([0], [10 * BS])

    @pytest.mark.parametrize("bs", [4 * KiB, 64 * KiB])
    def test_freed_blocks_are_reused(self, img, bs):
        n = 16
        with new(img, "16MiB", block_size=bs) as d:
            d.pwrite(pattern(4, n * bs), 0)
            d.flush()
            size0 = file_size(img)
            d.discard(0, n * bs)
            d.flush()
            assert d.map() == vdisk.Extents()
            d.pwrite(pattern(5, n * bs), 8 * MiB)
            d.flush()
            assert file_size(img) == size0
            assert d.pread(n * bs, 8 * MiB) == pattern(5, n * bs)
            assert d.pread(n * bs, 0) == bytes(n * bs)
        assert file_size(img) == size0
        r = vdisk.check(img)
        assert r.ok and r.leaked_blocks == 0 and r.allocated_blocks == n


# ============================================================================ flush / resize
class TestResize:
    def test_grow_reads_zeros(self, img):
        raw = pattern(1, 64 * KiB)
        with new(img, "64KiB") as d:
            d.pwrite(raw, 0)
            d.resize("1MiB")
            assert d.size == MiB
            assert d.pread(64 * KiB, 0) == raw
            assert d.pread(MiB - 64 * KiB, 64 * KiB) == bytes(MiB - 64 * KiB)
            d.pwrite(b"tail", MiB - 4)
        with vdisk.open(img) as d:
            assert d.size == MiB
            assert d.pread(64 * KiB, 0) == raw
            assert d.pread(4, MiB - 4) == b"tail"
        assert vdisk.check(img).ok

    def test_grow_relocates_tables(self, img):
        # 64 KiB at 4 KiB blocks has a one-page table (1024 entries): 8 MiB needs 2048
        raw = pattern(2, 64 * KiB)
        with new(img, "64KiB") as d:
            d.pwrite(raw, 0)
            d.resize("8MiB")
            d.pwrite(b"far", 8 * MiB - 3)
            assert d.pread(64 * KiB, 0) == raw
            assert d.map() == vdisk.Extents([0, 8 * MiB - BS], [64 * KiB, BS])
        with vdisk.open(img) as d:
            assert d.size == 8 * MiB
            assert d.pread(64 * KiB, 0) == raw
            assert d.pread(3, 8 * MiB - 3) == b"far"
            assert d.pread(MiB, MiB) == bytes(MiB)
        r = vdisk.check(img)
        assert r.ok and r.leaked_blocks == 0, r

    def test_grow_refcount_table(self, img):
        # writing more blocks than the first refcount table covers relocates it
        data = pattern(3, 12 * MiB)
        with new(img, "64KiB") as d:
            d.resize("12MiB")
            for i in range(0, len(data), MiB):
                d.pwrite(data[i:i + MiB], i)
            d.flush()
            assert read_all(d) == data
        with vdisk.open(img) as d:
            assert read_all(d) == data
        r = vdisk.check(img)
        assert r.ok and r.leaked_blocks == 0, r

    def test_shrink_drops_data(self, img):
        raw = pattern(4, MiB)
        with new(img) as d:
            d.pwrite(raw, 0)
            d.resize(256 * KiB)
            assert d.size == 256 * KiB
            assert read_all(d) == raw[:256 * KiB]
            assert d.map() == vdisk.Extents([0], [256 * KiB])
            with pytest.raises(vdisk.OutOfRangeError):
                d.pread(1, 256 * KiB)
            d.resize(MiB)
            assert read_all(d) == raw[:256 * KiB] + bytes(MiB - 256 * KiB)
        with vdisk.open(img) as d:
            assert read_all(d) == raw[:256 * KiB] + bytes(MiB - 256 * KiB)
        r = vdisk.check(img)
        assert r.ok and r.leaked_blocks == 0

    @pytest.mark.parametrize("new_size", [BS + 512, 3 * BS - 512, 512])
    def test_shrink_into_a_block_then_grow_reads_zero_tail(self, img, new_size):
        raw = pattern(5, 4 * BS)
        with new(img, 4 * BS) as d:
            d.pwrite(raw, 0)
            d.resize(new_size)
            assert read_all(d) == raw[:new_size]
            d.resize(4 * BS)
            assert read_all(d) == raw[:new_size] + bytes(4 * BS - new_size)
            assert d.map().nbytes == -(-new_size // BS) * BS
        with vdisk.open(img) as d:
            assert read_all(d) == raw[:new_size] + bytes(4 * BS - new_size)
        assert vdisk.check(img).ok

    def test_shrink_to_zero_and_back(self, img):
        with new(img) as d:
            d.pwrite(pattern(6, MiB), 0)
            d.resize(0)
            assert d.size == 0 and d.map() == vdisk.Extents() and d.pread(0, 0) == b""
            d.resize(MiB)
            assert read_all(d) == bytes(MiB)
        assert vdisk.check(img).ok

    def test_resize_bad_sizes(self, img):
        with new(img) as d:
            d.pwrite(b"x", 0)
            for bad in (1000, -512, "1.1KiB", "nope"):
                with pytest.raises(vdisk.VdiskError):
                    d.resize(bad)
            with pytest.raises(vdisk.OutOfRangeError):
                d.resize("2TiB")                   # beyond 2**28 blocks of 4 KiB
            assert d.size == MiB and d.pread(1, 0) == b"x"

    def test_resize_clamps_position(self, img):
        with new(img) as d:
            d.seek(MiB - 10)
            d.resize(512 * KiB)
            assert d.tell() <= 512 * KiB
            assert d.read(10) == b""

    def test_shrink_large_sparse_disk_stays_sparse(self, img):
        """Regression: shrinking wrote zero-filled counter pages over the whole
        dropped range (64 GiB at 4 KiB blocks: 64 MiB written to the file)."""
        with vdisk.create(img, "64GiB", block_size="4KiB") as d:
            d.pwrite(b"x", 0)
            d.flush()
            before = disk_usage(img)
            d.resize("4MiB")
            assert d.pread(1, 0) == b"x"
        assert disk_usage(img) < before + 8 * MiB

    def test_flush_is_durable_to_a_new_open(self, img):
        with new(img) as d:
            d.pwrite(b"flushed", 100)
            d.flush()
            with open(img, "rb") as f:
                raw = f.read()
            assert b"flushed" in raw


# ============================================================================ map / Extents
class TestHotPath:
    """Single-block reads and in-place writes run in _fast.HotPath; whatever
    it does not handle goes to the Python methods.  Both must agree."""

    def test_every_single_block_case_matches_the_model(self, img):
        d = new(img, "256KiB", block_size=BS, coarse_region_size="64KiB")
        model = bytearray(d.size)
        rng = np.random.default_rng(7)
        for step in range(600):
            b = int(rng.integers(0, d.size // BS))
            lo = int(rng.integers(0, BS))
            n = int(rng.integers(1, BS - lo + 1))
            off = b * BS + lo
            if step % 97 == 0:
                d.snapshot(f"s{step}").close()    # shared blocks: copy-on-write goes to Python
            if step % 41 == 0:
                d.flush()                           # disarms idle regions: the next write re-arms
            if rng.random() < 0.5:
                data = bytes(n) if rng.random() < 0.1 else pattern(step, n)
                assert d.pwrite(data, np.int64(off)) == n
                model[off:off + n] = data
            else:
                assert d.pread(n, np.uint32(off)) == bytes(model[off:off + n])
        assert d.pwrite(bytes(BS), 0) == BS          # a whole block of zeros still unmaps
        model[0:BS] = bytes(BS)
        assert all(o >= BS for o, _ in d.map())    # (even when a snapshot shares it)
        assert read_all(d) == bytes(model)
        d.close()
        assert vdisk.check(img).ok

    def test_wrong_argument_types_go_to_the_python_checks(self, img):
        d = new(img)
        d.pwrite(b"x" * 10, 0)
        with pytest.raises(vdisk.InvalidArgumentError):
            d.pwrite("text", 0)
        with pytest.raises(vdisk.OutOfRangeError):
            d.pread(10, 2 ** 70)
        with pytest.raises(vdisk.OutOfRangeError):
            d.pwrite(b"x", 2 ** 70)
        with pytest.raises(vdisk.OutOfRangeError):
            d.pread(-1, 0)
        strided = np.arange(64, dtype=np.uint8)[::2]
        assert d.pwrite(strided, 100) == 32
        assert d.pread(32, 100) == strided.tobytes()
        assert d.pread(0, 5) == b""
        d.close()
        with pytest.raises(vdisk.ClosedError):
            d.pread(1, 0)
        with pytest.raises(vdisk.ClosedError):
            d.pwrite(b"x", 0)

    def test_system_call_errors_raise_vdisk_io_errors(self, img, tmp_path):
        """An error in the hot path's own pread/pwrite surfaces as the Python
        path's VdiskIOError, never as a silent short read or write."""
        d = new(img)
        d.pwrite(b"a" * BS, 0)
        d.flush()
        d.pwrite(b"b", 1)          # armed region: the next write is on the hot path
        other = tmp_path / "other"
        other.write_bytes(b"")
        saved = os.dup(d._io.fd)
        ro = os.open(other, os.O_RDONLY)
        wo = os.open(other, os.O_WRONLY)
        try:
            os.dup2(ro, d._io.fd)      # writes now fail with EBADF
            with pytest.raises(vdisk.VdiskIOError):
                d.pwrite(b"c", 2)
            os.dup2(wo, d._io.fd)      # reads now fail with EBADF
            with pytest.raises(vdisk.VdiskIOError):
                d.pread(1, 0)
        finally:
            os.dup2(saved, d._io.fd)
            for fd in (saved, ro, wo):
                os.close(fd)
        assert d.pread(2, 0) == b"ab"
        d.close()

    def test_writes_into_fresh_blocks_stay_on_the_hot_path_with_tracking(self, img, monkeypatch):
        """A block allocated since the last flush is overwritten in place in
        Cython (its mapping is not durable: no coarse bit is needed) with
        tracking on: the Python fallback is never called, nothing is armed,
        and every such block is marked changed."""
        slow = []
        real = vdisk.disk.Disk._pwrite_slow

        def counting(self, data, offset):
            slow.append(offset)
            return real(self, data, offset)
        monkeypatch.setattr(vdisk.disk.Disk, "_pwrite_slow", counting)
        d = new(img, "1MiB", block_size="64KiB", coarse_region_size="64KiB")
        c = d.checkpoint()
        d.pwrite(pattern(1, 256 * KiB), 0)         # four fresh blocks, one run
        slow.clear()
        for off in (4 * KiB, 70 * KiB, 130 * KiB, 200 * KiB, 8 * KiB):
            assert d.pwrite(b"x" * 512, off) == 512
        assert slow == [], f"fresh in-place writes fell back to Python at {slow}"
        assert d._tracker.armings == 0 and not d._tracker.coarse.any()
        assert d._tracker.dirty[:4].all()
        d.flush()                                   # the mapping is durable: no block is fresh
        assert not d._bt.fresh.any()
        d.pwrite(b"y", 4 * KiB)                     # now the write-ahead rule arms the region
        assert d._tracker.armings == 1 and d._tracker.coarse[0] == 1
        assert d.pread(1, 4 * KiB) == b"y" and d.pread(1, 70 * KiB) == b"x"
        assert {o // (64 * KiB) for o in d.changes_since(c).offsets} >= {0}
        assert d.changes_since(c).nbytes == 256 * KiB
        d.close()
        assert vdisk.check(img).ok

    def test_multi_block_requests_run_in_cython(self, img, monkeypatch):
        """Reads and in-place writes of contiguous runs of blocks (1 MiB and
        4 MiB over 64 KiB blocks, aligned or not, holes included for reads)
        go through the hot path, and agree with a model; a run with an
        unallocated block in it goes to Python and is right too."""
        slow = []
        for name in ("_pread_slow", "_pwrite_slow"):
            real = getattr(vdisk.disk.Disk, name)

            def counting(self, a, offset, real=real, name=name):
                slow.append((name, offset))
                return real(self, a, offset)
            monkeypatch.setattr(vdisk.disk.Disk, name, counting)
        size = 8 * MiB
        d = new(img, size, block_size="64KiB")
        model = bytearray(size)
        for off in range(0, 6 * MiB, MiB):            # the last 2 MiB stay holes
            data = pattern(off, MiB)
            d.pwrite(data, off)
            model[off:off + MiB] = data
        d.flush()
        c = d.checkpoint()
        then = bytes(model)
        slow.clear()
        rng = np.random.default_rng(3)
        for step in range(60):
            n = int(rng.choice([MiB, 4 * MiB, 200 * KiB + 7]))
            off = int(rng.integers(0, 6 * MiB - n)) if step % 2 else int(rng.integers(0, size - n))
            if step % 2:
                data = pattern(1000 + step, n)
                assert d.pwrite(data, off) == n
                model[off:off + n] = data
            else:
                assert d.pread(n, off) == bytes(model[off:off + n])
        assert [s for s in slow if s[0] == "_pread_slow"] == [], slow
        writes = [s for s in slow if s[0] == "_pwrite_slow"]
        assert len(writes) <= 6, writes             # only arming the regions, once each
        slow.clear()
        d.pwrite(b"z" * (128 * KiB), 6 * MiB - 64 * KiB)   # reaches an unallocated block: Python
        model[6 * MiB - 64 * KiB:6 * MiB + 64 * KiB] = b"z" * (128 * KiB)
        assert slow == [("_pwrite_slow", 6 * MiB - 64 * KiB)]
        assert read_all(d) == bytes(model)
        changed = {o // (64 * KiB) + k for o, n in d.changes_since(c) for k in range(-(-n // (64 * KiB)))}
        assert differing_blocks(bytes(model), then, 64 * KiB) <= changed
        d.close()
        assert vdisk.check(img).ok

    def test_automatic_fold_counts_hot_writes(self, img):
        d = new(img)
        d.pwrite(b"a" * BS, 0)
        c = d.checkpoint()
        d.pwrite(b"b", 0)          # arms the region (Python path)
        d.fold_interval = 4        # 1 write since the checkpoint's fold
        for i in range(2):
            d.pwrite(b"c", i + 1)  # hot path: 2 and 3
        assert d._tracker.dirty[0] == 1
        d.pwrite(b"d", 9)          # the 4th write since the fold folds
        assert d._tracker.dirty[0] == 0 and d._tracker.counters[0] == d.generation
        assert 0 in {o // BS for o in d.changes_since(c).offsets}
        with pytest.raises(vdisk.InvalidArgumentError):
            d.fold_interval = 0
        d.close()


class TestMap:
    def test_map_sorted_and_merged(self, img):
        with new(img) as d:
            for b in (7, 3, 4, 5, 0, 1, 20):
                d.pwrite(b"\x01", b * BS + 10)
            m = d.map()
            assert isinstance(m, vdisk.Extents)
            assert list(m) == [(0, 2 * BS), (3 * BS, 3 * BS), (7 * BS, BS), (20 * BS, BS)]
            assert len(m) == 4
            assert m.nbytes == 7 * BS
            assert m.offsets.dtype == np.uint64 and m.lengths.dtype == np.uint64
            assert m.offsets.tolist() == [0, 3 * BS, 7 * BS, 20 * BS]
            assert m.lengths.tolist() == [2 * BS, 3 * BS, BS, BS]
            assert all(type(o) is int and type(n) is int for o, n in m)
            d.pwrite(b"\x01", 2 * BS)
            d.pwrite(b"\x01", 6 * BS)
            assert list(d.map()) == [(0, 8 * BS), (20 * BS, BS)]

    def test_map_clips_the_last_partial_block(self, img):
        size = 10 * BS + 512
        with new(img, size) as d:
            d.pwrite(b"\x02", size - 1)
            assert list(d.map()) == [(10 * BS, 512)]
            d.pwrite(b"\x02", 9 * BS)
            assert list(d.map()) == [(9 * BS, BS + 512)]
            assert d.map().nbytes == BS + 512

    def test_map_matches_content(self, img):
        rng = np.random.default_rng(7)
        with new(img, "2MiB") as d:
            for _ in range(40):
                off = int(rng.integers(0, 2 * MiB - 3 * BS))
                d.pwrite(pattern(int(rng.integers(1 << 30)), int(rng.integers(1, 3 * BS))), off)
            for _ in range(10):
                off = int(rng.integers(0, 2 * MiB - 8 * BS))
                d.discard(off, int(rng.integers(1, 8 * BS)))
            content = read_all(d)
            m = d.map()
            covered = np.zeros(2 * MiB, dtype=bool)
            for o, n in m:
                covered[o:o + n] = True
            arr = np.frombuffer(content, dtype=np.uint8)
            assert not arr[~covered].any()         # everything outside the map reads zeros
            offs = m.offsets.astype(np.int64)
            assert (np.diff(offs) > 0).all()
            assert (offs[1:] > (m.offsets + m.lengths)[:-1].astype(np.int64)).all()   # merged: gaps between

    def test_extents_api(self):
        a = vdisk.Extents([0, 100], [10, 5])
        b = vdisk.Extents(np.array([0, 100], dtype=np.uint64), np.array([10, 5], dtype=np.uint64))
        assert a == b
        assert not (a != b)
        assert a != vdisk.Extents([0], [10])
        assert a != vdisk.Extents([0, 100], [10, 6])
        assert (a == "x") is False
        assert vdisk.Extents() == vdisk.Extents([], [])
        assert not vdisk.Extents() and a
        assert len(a) == 2 and a.nbytes == 15 and list(a) == [(0, 10), (100, 5)]
        assert "Extents" in repr(a) and "15" in repr(a)
        many = vdisk.Extents(np.arange(10) * 100, np.ones(10))
        assert "more" in repr(many)
        assert repr(vdisk.Extents())
        assert a.to_list() == [{"offset": 0, "length": 10}, {"offset": 100, "length": 5}]
        with pytest.raises(ValueError):
            vdisk.Extents([1, 2], [3])


# ============================================================================ closed state, context manager
class TestClose:
    def test_close_idempotent(self, img):
        d = new(img)
        d.pwrite(b"x", 0)
        assert not d.closed
        d.close()
        assert d.closed
        d.close()
        d.close()
        assert d.closed
        with vdisk.open(img) as d2:
            assert d2.pread(1, 0) == b"x"

    def test_context_manager(self, img):
        with new(img) as d:
            assert not d.closed
            d.pwrite(b"ctx", 0)
        assert d.closed
        with pytest.raises(RuntimeError):
            with vdisk.open(img, "r+") as d:
                d.pwrite(b"CTX", 0)
                raise RuntimeError("boom")
        assert d.closed
        with vdisk.open(img) as d:
            assert d.pread(3, 0) == b"CTX"

    def test_operations_on_closed_disk(self, img):
        d = new(img)
        d.pwrite(b"abc", 0)
        d.close()
        ops = {
            "pread": lambda: d.pread(1, 0),
            "preadinto": lambda: d.preadinto(bytearray(4), 0),
            "pwrite": lambda: d.pwrite(b"x", 0),
            "discard": lambda: d.discard(0, BS),
            "resize": lambda: d.resize(2 * MiB),
            "map": lambda: d.map(),
            "read": lambda: d.read(3),
            "readinto": lambda: d.readinto(bytearray(3)),
            "write": lambda: d.write(b"x"),
            "seek": lambda: d.seek(0),
            "tell": lambda: d.tell(),
            "checkpoint": lambda: d.checkpoint(),
            "info": lambda: d.info(),
            "enter": lambda: d.__enter__(),
        }
        for name, op in ops.items():
            with pytest.raises(vdisk.ClosedError) as ei:
                op()
            assert isinstance(ei.value, vdisk.VdiskError), name
        with vdisk.open(img) as d2:
            assert d2.pread(3, 0) == b"abc"

    def test_closed_read_only_disk(self, img):
        new(img).close()
        d = vdisk.open(img)
        d.close()
        with pytest.raises(vdisk.ClosedError):
            d.pread(1, 0)
        with pytest.raises(vdisk.VdiskError):
            d.pwrite(b"x", 0)

    def test_repr(self, img):
        d = new(img)
        assert "disk.vdk" in repr(d)
        d.close()
        assert "closed" in repr(d)


# ============================================================================ io.RawIOBase
class TestFileLike:
    def test_is_raw_io(self, img):
        with new(img) as d:
            assert isinstance(d, io.RawIOBase)
            assert isinstance(d, io.IOBase)

    def test_read_write_seek_tell(self, img):
        with new(img) as d:
            assert d.tell() == 0
            assert d.write(b"hello") == 5
            assert d.tell() == 5
            assert d.write(bytearray(b" world")) == 6
            assert d.tell() == 11
            assert d.seek(0) == 0
            assert d.read(11) == b"hello world"
            assert d.seek(-5, io.SEEK_CUR) == 6
            assert d.read(5) == b"world"
            assert d.seek(-3, io.SEEK_END) == MiB - 3
            assert d.write(b"END") == 3
            assert d.tell() == MiB
            assert d.read(10) == b""
            d.seek(MiB - 3)
            assert d.read(100) == b"END"            # short read at the end
            buf = bytearray(5)
            d.seek(0)
            assert d.readinto(buf) == 5 and bytes(buf) == b"hello"
            arr = np.zeros(6, np.uint8)
            assert d.readinto(arr) == 6 and arr.tobytes() == b" world"
            assert d.tell() == 11
            with pytest.raises(vdisk.VdiskError):
                d.seek(-1)
            with pytest.raises(vdisk.VdiskError):
                d.seek(0, 7)
            assert d.tell() == 11

    def test_seek_past_end(self, img):
        with new(img) as d:
            assert d.seek(MiB + 1000) == MiB + 1000
            assert d.read(10) == b""
            assert d.readinto(bytearray(10)) == 0
            with pytest.raises(vdisk.OutOfRangeError):
                d.write(b"x")
            assert d.map() == vdisk.Extents()

    def test_write_at_end_raises(self, img):
        with new(img) as d:
            d.seek(MiB - 2)
            with pytest.raises(vdisk.OutOfRangeError):
                d.write(b"abc")
            assert d.tell() == MiB - 2
            assert d.pread(2, MiB - 2) == b"\0\0"

    def test_readall(self, img):
        raw = pattern(9, 300 * KiB)
        with new(img, "512KiB") as d:
            d.pwrite(raw, 0)
            d.seek(0)
            assert d.read() == raw + bytes(212 * KiB)
            assert d.read() == b""

    def test_copy_out_with_copyfileobj(self, img, tmp_path):
        model = bytearray(2 * MiB)
        with new(img, "2MiB") as d:
            for seed, off in enumerate((0, 5000, MiB - 7, 2 * MiB - 100)):
                data = pattern(seed, 100)
                d.pwrite(data, off)
                model[off:off + 100] = data
            raw = tmp_path / "out.raw"
            d.seek(0)
            with open(raw, "wb") as f:
                shutil.copyfileobj(d, f)
            assert raw.read_bytes() == model
            assert d.tell() == 2 * MiB

    def test_copy_in_with_copyfileobj(self, img, tmp_path):
        raw = tmp_path / "in.raw"
        data = bytearray(pattern(11, 2 * MiB))
        data[MiB:MiB + 256 * KiB] = bytes(256 * KiB)     # a zero run stays unallocated
        raw.write_bytes(data)
        with new(img, "2MiB") as d:
            with open(raw, "rb") as f:
                shutil.copyfileobj(f, d)
            assert d.tell() == 2 * MiB
            assert read_all(d) == data
            assert d.map() == vdisk.Extents([0, MiB + 256 * KiB], [MiB, MiB - 256 * KiB])
        with vdisk.open(img) as d:
            assert read_all(d) == data
        assert vdisk.check(img).ok

    def test_buffered_reader(self, img):
        raw = pattern(12, 200 * KiB)
        with new(img, "256KiB") as d:
            d.pwrite(raw, 0)
        with vdisk.open(img) as d:
            r = io.BufferedReader(d, buffer_size=8192)
            assert r.read(100) == raw[:100]
            r.seek(150 * KiB)
            assert r.read(50 * KiB) == raw[150 * KiB:]
            assert r.read() == bytes(56 * KiB)


# ============================================================================ I/O failures
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_failed_data_write_leaves_the_image_consistent(img, err):
    from vdisk.testing import FaultPlan, FaultyIO

    plan = FaultPlan()                                  # fails nothing yet: counts
    vdisk.create(img, "1MiB", block_size=BS).close()
    d = vdisk.open(img, "r+", io_factory=FaultyIO.factory(plan))
    d.pwrite(b"a" * BS, 0)
    d.flush()
    plan.kind, plan.nth, plan.err = "pwrite", plan.counts["pwrite"], err      # the next pwrite
    with pytest.raises(vdisk.VdiskIOError):
        d.pwrite(b"b" * BS, 2 * BS)                    # a new block: its data write fails
    assert plan.fired == ("pwrite", plan.nth, err)     # once: nothing fails after it
    try:
        d.close()
    except vdisk.VdiskError:
        pass
    with vdisk.open(img) as d:                          # the image still opens ...
        assert d.pread(BS, 0) == b"a" * BS
        assert d.pread(BS, 2 * BS) in (bytes(BS), b"b" * BS)
    r = vdisk.check(img)
    assert not r.corruptions, r                         # ... and has no corruption (a leak is fine)


# ============================================================================ threads
def test_threads_disjoint_writes_and_concurrent_reads(img):
    nthreads, chunk, rounds = 6, 64 * KiB, 12
    size = nthreads * chunk * 2
    expected = bytearray(size)
    errors = []
    stop = threading.Event()
    with new(img, size, block_size=BS) as d:
        def writer(t):
            try:
                base = t * 2 * chunk
                for r in range(rounds):
                    data = pattern(t * 1000 + r, chunk)
                    off = base + (r % 2) * chunk // 2 + (r * 512) % (chunk // 2)
                    assert d.pwrite(data, off) == chunk
                    assert d.pread(chunk, off) == data
                    expected[off:off + chunk] = data       # own range: no other thread touches it
                    if r % 4 == 3:
                        d.flush()
            except BaseException as exc:  # noqa: BLE001 - report in the main thread
                errors.append(exc)

        def reader():
            try:
                rng = np.random.default_rng(99)
                buf = bytearray(3 * BS)
                while not stop.is_set():
                    off = int(rng.integers(0, size - len(buf)))
                    assert len(d.pread(len(buf), off)) == len(buf)
                    assert d.preadinto(buf, off) == len(buf)
                    d.map()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        writers = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
        for th in readers + writers:
            th.start()
        for th in writers:
            th.join(60)
        stop.set()
        for th in readers:
            th.join(60)
        assert not errors, errors
        assert read_all(d) == expected
    with vdisk.open(img) as d:
        assert read_all(d) == expected
    r = vdisk.check(img)
    assert r.ok and r.leaked_blocks == 0


# ============================================================================ check on healthy images
class TestCheckHealthy:
    def test_fresh_image(self, img):
        new(img, "4MiB").close()
        r = vdisk.check(img)
        assert isinstance(r, vdisk.CheckResult)
        assert r.ok and r.corruptions == [] and r.leaked_blocks == 0
        assert r.allocated_blocks == 0 and r.total_blocks == 1024
        assert r.image_end_offset == file_size(img)

    def test_used_image(self, img):
        with new(img, "4MiB") as d:
            d.pwrite(pattern(1, MiB), 0)
            d.checkpoint()
            d.pwrite(pattern(2, 3 * BS + 7), 2 * MiB + 5)
            d.discard(BS, 10 * BS)
            d.pwrite(bytes(BS), 20 * BS)
            d.resize("8MiB")
            d.pwrite(b"x", 8 * MiB - 1)
            d.resize(6 * MiB + 512)
        r = vdisk.check(img)
        assert r.ok, r
        assert r.corruptions == [] and r.leaked_blocks == 0
        assert r.allocated_blocks == 256 - 10 - 1 + 4
        # repair on a clean image changes nothing
        r2 = vdisk.check(img, repair=True)
        assert r2.ok and not r2.repaired

    def test_check_while_open_for_reading(self, img):
        with new(img) as d:
            d.pwrite(b"x", 0)
        with vdisk.open(img) as d:
            assert vdisk.check(img).ok
            assert d.pread(1, 0) == b"x"


def test_write_zeros_keeps_blocks_allocated_and_spares_snapshots(tmp_path):
    """Disk.write_zeros: zeros read back, every touched block stays or becomes allocated (a
    shared block is copied, the snapshot keeps its data), and the blocks count as changed."""
    bs = 64 << 10
    path = str(tmp_path / "z.vdk")
    with vdisk.create(path, 16 * bs, block_size=bs) as d:
        d.pwrite(b"\x07" * (2 * bs), 0)
        d.snapshot("s")
        cid = d.checkpoint()
        d.write_zeros(bs // 2, 4 * bs)              # shared blocks 0-1, unallocated 2-4 (4 partly)
        assert d.pread(5 * bs, 0) == b"\x07" * (bs // 2) + bytes(4 * bs) + bytes(bs // 2)
        ext = d.map_range(0, 16 * bs)
        assert list(zip(ext.offsets.tolist(), ext.lengths.tolist())) == [(0, 5 * bs)]
        ch = d.changes_since(cid)
        assert sum(ch.lengths.tolist()) >= 5 * bs and int(ch.offsets[0]) == 0
        with d.open_snapshot("s") as s:
            assert s.pread(2 * bs, 0) == b"\x07" * (2 * bs)
    with vdisk.open(path) as d:
        assert d.pread(5 * bs, 0) == b"\x07" * (bs // 2) + bytes(5 * bs - bs // 2)
    assert not vdisk.check(path).corruptions


def test_preadinto_runs_in_cython_and_reads_what_was_written(tmp_path, monkeypatch):
    """Disk.preadinto reads the live table with the hot path's read_through (the Python plan only
    when it hands the read back): every range across holes and discontiguous runs is right,
    and the Python plan is not asked."""
    rng = np.random.default_rng(7)
    bs = 4096
    size = 64 * bs
    with vdisk.create(str(tmp_path / "pi.vdk"), size, block_size=bs) as d:
        model = bytearray(size)
        for _ in range(40):
            off, n = int(rng.integers(0, size - 3 * bs)), int(rng.integers(1, 3 * bs))
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            d.pwrite(data, off)
            model[off:off + n] = data
        d.discard(8 * bs, 4 * bs)
        model[8 * bs:12 * bs] = bytes(4 * bs)

        def no_plan(*a):
            raise AssertionError("the Python read plan was asked")
        monkeypatch.setattr(d, "_read_plan", no_plan)
        for _ in range(200):
            off = int(rng.integers(0, size))
            n = int(rng.integers(0, size - off + 1))
            buf = np.empty(n, np.uint8)
            assert d.preadinto(buf, off) == n and buf.tobytes() == model[off:off + n]


def test_a_callback_into_a_dropped_disk_raises_closed_error():
    """A part's weak callback (_weakly) into a Disk that is gone says so (ClosedError),
    not "'NoneType' object is not callable"."""
    import gc
    from vdisk.disk import _weakly

    class Owner:
        def method(self, x: int) -> int:
            return x + 1

    owner = Owner()
    call = _weakly(owner.method)
    assert call(1) == 2
    del owner
    gc.collect()
    with pytest.raises(vdisk.ClosedError, match="method of a disk that is gone"):
        call(1)
