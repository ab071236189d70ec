"""vdisk.convert / vdisk.compare against qemu-img, over real images made by
qemu-img and qemu-io (a feature matrix), and the raw and vdisk paths."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import importlib
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import vdisk
from vdisk.cli import main
from vdisk_testkit.helpers import pattern
from vdisk_testkit.qemu_helpers import (HAVE_QEMU, KiB, MiB, compressible, make_qcow2, needs_qemu, patch_header,
                                        qemu_check, qemu_compare, qemu_img, qemu_io, read_header, to_raw,
                                        zstd_supported)

C = importlib.import_module("vdisk.convert")     # the module: vdisk.convert is the function
BS = 64 * KiB


# ---------------------------------------------------------------------------- helpers
class Recorder:
    """A progress callback that remembers every call."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done, total):
        self.calls.append((done, total))

    def check(self, total):
        assert self.calls, "progress was never called"
        dones = [d for d, _ in self.calls]
        assert all(t == total for _, t in self.calls)
        assert dones == sorted(dones) and len(set(dones)) == len(dones), dones
        assert dones[-1] == total


def read_vdisk(path) -> bytes:
    with vdisk.open(path) as d:
        return d.pread(d.size, 0)


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_only_nonzero_blocks_mapped(path, content: bytes):
    """Every mapped block holds a nonzero byte; every nonzero block is mapped."""
    with vdisk.open(path) as d:
        bs = d.block_size
        mapped = set()
        for off, length in d.map():
            mapped.update(range(off // bs, -(-(off + length) // bs)))
    arr = np.frombuffer(content, dtype=np.uint8)
    nb = -(-len(arr) // bs)
    padded = np.zeros(nb * bs, dtype=np.uint8)
    padded[:len(arr)] = arr
    nonzero = set(np.flatnonzero(padded.reshape(nb, bs).any(axis=1)).tolist())
    assert mapped == nonzero, (sorted(mapped ^ nonzero)[:10])


def assert_clean_qcow2(path):
    r = qemu_check(path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout
    assert "leaked" not in r.stdout


def no_leftovers(directory):
    return not glob.glob(os.path.join(str(directory), ".*.converting")) and \
        not glob.glob(os.path.join(str(directory), ".*.creating"))


# ---------------------------------------------------------------------------- the qcow2 feature matrix
SIZE = 40 * MiB + 1536          # not cluster-aligned: the last cluster is partial

WRITES = [
    "write -P 0x11 0 4k",
    "write -P 0x22 12345 3000",              # unaligned
    "write -P 0x33 1M 1M",
    "write -P 0x44 3M 512",                  # one sector
    "write -P 0x66 8M 2k",                   # one subcluster (64 KiB extended L2)
    "write -P 0x67 8198k 2k",                # another subcluster of the same cluster, with a gap
    "write -P 0x77 20M 4M",
    f"write -P 0x55 {SIZE - 1000} 1000",     # up to the unaligned end
    "write -z 1M 512k",                      # zeroes over data: zero flag, allocation kept (v3)
    "write -z -u 1536k 512k",                # zeroes, unmapped
    "write -z 30M 2M",                       # zeroes over nothing
    "write -z -u 20M 2M",                    # unmap part of a 2 MiB cluster run
]

MATRIX = [
    ("v2-512", "compat=0.10,cluster_size=512"),
    ("v2-64k", "compat=0.10,cluster_size=64k"),
    ("v3-512-rb1", "compat=1.1,cluster_size=512,refcount_bits=1"),
    ("v3-4k-rb64", "compat=1.1,cluster_size=4k,refcount_bits=64"),
    ("v3-64k-rb16", "compat=1.1,cluster_size=64k,refcount_bits=16"),
    ("v3-2m-rb1", "compat=1.1,cluster_size=2M,refcount_bits=1"),
    ("v3-2m-rb64", "compat=1.1,cluster_size=2M,refcount_bits=64"),
    ("v3-16k-extl2", "compat=1.1,cluster_size=16k,extended_l2=on"),
    ("v3-64k-extl2", "compat=1.1,cluster_size=64k,extended_l2=on"),
    ("v3-2m-extl2", "compat=1.1,cluster_size=2M,extended_l2=on"),
    ("v3-64k-prealloc-metadata", "compat=1.1,cluster_size=64k,preallocation=metadata"),
    ("v3-4k-prealloc-full", "compat=1.1,cluster_size=4k,preallocation=full"),
    ("v3-2m-prealloc-metadata", "compat=1.1,cluster_size=2M,preallocation=metadata"),
    ("v3-64k-lazy-refcounts", "compat=1.1,cluster_size=64k,lazy_refcounts=on"),
]


@needs_qemu
@pytest.mark.parametrize("options", [m[1] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_qcow2_matrix_to_vdisk_and_back(tmp_path, options):
    img = make_qcow2(tmp_path / "src.qcow2", SIZE, options, WRITES)
    ref = file_bytes(to_raw(img, tmp_path / "ref.raw"))
    assert len(ref) == SIZE

    out = tmp_path / "out.vdk"
    rec = Recorder()
    vdisk.convert(img, out, progress=rec)
    rec.check(SIZE)
    assert read_vdisk(out) == ref
    assert_only_nonzero_blocks_mapped(out, ref)
    assert vdisk.compare(img, out) is None

    # vdisk -> qcow2: clean for qemu-img check, identical for qemu-img compare
    q = tmp_path / "back.qcow2"
    vdisk.convert(out, q, dst_format="qcow2")
    assert_clean_qcow2(q)
    r = qemu_compare(img, q)
    assert r.returncode == 0, r.stdout + r.stderr

    # vdisk -> raw: sparse and identical
    raw = tmp_path / "back.raw"
    vdisk.convert(out, raw, dst_format="raw")
    assert file_bytes(raw) == ref
    data = sum(1 for b in range(0, SIZE, 4096) if any(ref[b:b + 4096]))
    assert os.stat(raw).st_blocks * 512 <= data * 4096 + 64 * KiB
    assert no_leftovers(tmp_path)


@needs_qemu
def test_qcow2_direct_to_raw_and_qcow2(tmp_path):
    img = make_qcow2(tmp_path / "src.qcow2", SIZE, "cluster_size=4k", WRITES)
    ref = file_bytes(to_raw(img, tmp_path / "ref.raw"))
    vdisk.convert(img, tmp_path / "o.raw", dst_format="raw")
    assert file_bytes(tmp_path / "o.raw") == ref
    vdisk.convert(img, tmp_path / "o.qcow2", dst_format="qcow2", block_size="2MiB")
    assert_clean_qcow2(tmp_path / "o.qcow2")
    assert qemu_compare(img, tmp_path / "o.qcow2").returncode == 0
    assert read_header(tmp_path / "o.qcow2")["cluster_bits"] == 21


@needs_qemu
def test_zero_clusters_are_not_allocated(tmp_path):
    """ZERO_ALLOC (write -z) and ZERO_PLAIN (write -z -u) clusters read as
    zeros and allocate nothing in the vdisk image."""
    img = make_qcow2(tmp_path / "z.qcow2", 4 * MiB, "cluster_size=64k",
                     ["write -P 0x5a 0 1M", "write -z 0 256k", "write -z -u 256k 256k", "write -z 2M 256k"])
    m = qemu_img("map", "--output=json", img).stdout
    assert '"zero": true, "data": false, "offset"' in m       # a zero cluster with an allocation
    out = tmp_path / "z.vdk"
    vdisk.convert(img, out)
    with vdisk.open(out) as d:
        assert [tuple(e) for e in d.map()] == [(512 * KiB, 512 * KiB)]
        assert d.pread(MiB, 0) == bytes(512 * KiB) + b"\x5a" * (512 * KiB)


@needs_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", ["4k", "64k", "2M"])
def test_compressed_clusters(tmp_path, ctype, cluster):
    if ctype == "zstd" and not zstd_supported(str(tmp_path)):
        pytest.skip("qemu-img without zstd, or the zstandard package is missing")
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(12 * MiB)
        f.seek(0)
        f.write(compressible(1, 3 * MiB))
        f.seek(5 * MiB + 777)
        f.write(pattern(2, 100 * KiB))          # incompressible: stored uncompressed
        f.seek(9 * MiB)
        f.write(compressible(3, 3 * MiB - 512))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster},compression_type={ctype}",
             raw, img)
    check = qemu_check(img).stdout
    compressed = re.search(r"([\d.]+)% compressed clusters", check)
    assert compressed and float(compressed.group(1)) > 50, check
    out = tmp_path / "c.vdk"
    vdisk.convert(img, out)
    assert read_vdisk(out) == file_bytes(raw)
    assert vdisk.compare(img, raw) is None


@needs_qemu
def test_zstd_without_the_zstandard_package(tmp_path, monkeypatch):
    probe = qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", tmp_path / "z.qcow2", "1M",
                     check=False)
    if probe.returncode:
        pytest.skip("qemu-img without zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)      # import zstandard now raises ImportError
    with pytest.raises(vdisk.UnsupportedFeatureError, match=r"qcow2 zstd compression \(install zstandard\)"):
        vdisk.convert(tmp_path / "z.qcow2", tmp_path / "z.vdk")
    assert no_leftovers(tmp_path)


@needs_qemu
def test_internal_snapshots_convert_the_active_layer(tmp_path):
    img = make_qcow2(tmp_path / "s.qcow2", 16 * MiB, "cluster_size=64k",
                     ["write -P 0x01 0 2M", "write -P 0x02 8M 1M"])
    qemu_img("snapshot", "-c", "first", img)
    qemu_io(img, "write -P 0x03 512k 64k", "write -P 0x04 10M 3M", "write -z -u 8M 512k")
    qemu_img("snapshot", "-c", "second", img)
    qemu_io(img, "write -P 0x05 12345 100", "discard 1M 1M")
    assert "second" in qemu_img("snapshot", "-l", img).stdout
    ref = file_bytes(to_raw(img, tmp_path / "ref.raw"))
    out = tmp_path / "s.vdk"
    vdisk.convert(img, out)
    assert read_vdisk(out) == ref


@needs_qemu
def test_a_snapshot_table_ending_the_file_unpadded_is_read(tmp_path):
    """qemu-img snapshot -c appends the table last and leaves its last entry
    unpadded (here 67 bytes, 72 with the 8-byte alignment between entries):
    the reader once refused such a file as running past its end."""
    img = make_qcow2(tmp_path / "u.qcow2", 4 * MiB, "cluster_size=64k", ["write -P 0x07 0 1M"])
    qemu_img("snapshot", "-c", "s1", img)
    assert os.path.getsize(img) % 8, "the table no longer ends the file unpadded: the test proves nothing"
    ref = file_bytes(to_raw(img, tmp_path / "ref.raw"))
    vdisk.convert(img, tmp_path / "u.vdk")
    assert read_vdisk(tmp_path / "u.vdk") == ref
    with vdisk.open(tmp_path / "u.vdk") as d:
        assert [s.name for s in d.snapshots] == ["s1"]


@needs_qemu
def test_dirty_image_is_read(tmp_path):
    img = make_qcow2(tmp_path / "d.qcow2", 4 * MiB, "cluster_size=64k,lazy_refcounts=on", ["write -P 9 0 300k"])
    ref = file_bytes(to_raw(img, tmp_path / "ref.raw"))
    patch_header(img, incompatible_features=1)          # the dirty bit: refcounts may be stale
    vdisk.convert(img, tmp_path / "d.vdk")
    assert read_vdisk(tmp_path / "d.vdk") == ref


@needs_qemu
def test_l2_table_boundary_64k(tmp_path):
    """An L2 table of 64 KiB clusters maps 512 MiB: a write across that boundary."""
    size = 1 << 30
    img = make_qcow2(tmp_path / "b.qcow2", size, "cluster_size=64k",
                     ["write -P 0x31 511M 2M", f"write -P 0x32 {size - 512} 512"])
    out = tmp_path / "b.vdk"
    vdisk.convert(img, out)
    with vdisk.open(out) as d:
        assert [tuple(e) for e in d.map()] == [(511 * MiB, 2 * MiB), (size - BS, BS)]
        assert d.pread(2 * MiB + 2, 511 * MiB - 1) == b"\0" + b"\x31" * (2 * MiB) + b"\0"
        assert d.pread(BS, size - BS) == bytes(BS - 512) + b"\x32" * 512
    q = tmp_path / "b2.qcow2"
    vdisk.convert(out, q, dst_format="qcow2")
    assert_clean_qcow2(q)
    assert qemu_compare(img, q).returncode == 0


# ---------------------------------------------------------------------------- backing files
@needs_qemu
def test_backing_chain(tmp_path):
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(6 * MiB)                   # smaller than the images on top of it
        f.seek(0)
        f.write(pattern(10, 6 * MiB))
    make_qcow2(tmp_path / "mid.qcow2", 8 * MiB, "cluster_size=4k", ["write -P 0x21 1M 100k"],
                     backing="base.raw", backing_fmt="raw")
    top = make_qcow2(tmp_path / "top.qcow2", 12 * MiB, "cluster_size=64k,extended_l2=on",
                     ["write -P 0x31 2M 2k", "write -z 3M 64k", "write -P 0x32 7M 2M"],
                     backing="mid.qcow2", backing_fmt="qcow2")
    ref = file_bytes(to_raw(top, tmp_path / "ref.raw"))
    with pytest.raises(vdisk.UnsupportedFeatureError, match="backing file"):
        vdisk.convert(top, tmp_path / "x.vdk")
    assert no_leftovers(tmp_path) and not os.path.exists(tmp_path / "x.vdk")
    vdisk.convert(top, tmp_path / "top.vdk", allow_backing=True)
    assert read_vdisk(tmp_path / "top.vdk") == ref
    assert vdisk.compare(top, tmp_path / "ref.raw", allow_backing=True) is None


@needs_qemu
def test_backing_given_by_path(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base = make_qcow2(elsewhere / "base.qcow2", 4 * MiB, "", ["write -P 0x41 0 4M"])
    imgdir = tmp_path / "img"
    imgdir.mkdir()
    top = make_qcow2(imgdir / "top.qcow2", 4 * MiB, "", ["write -P 0x42 1M 64k"],
                     backing=str(base), backing_fmt="qcow2")     # an absolute name
    ref = file_bytes(to_raw(top, tmp_path / "ref.raw"))
    with pytest.raises(vdisk.UnsupportedFeatureError, match="absolute"):
        vdisk.convert(top, tmp_path / "x.vdk", allow_backing=True)
    vdisk.convert(top, tmp_path / "t.vdk", allow_backing=str(base))
    assert read_vdisk(tmp_path / "t.vdk") == ref


# ---------------------------------------------------------------------------- raw
def _raw_with_holes(path, size):
    """Data at a few places, explicit zero blocks, and holes; returns its content."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in ((0, pattern(1, 5000)), (3 * MiB, bytes(2 * MiB)), (3 * MiB + 200 * KiB, pattern(2, 100)),
                          (9 * MiB + 7, pattern(3, 70 * KiB)), (size - 10, pattern(4, 10))):
            f.seek(off)
            f.write(data)
            content[off:off + len(data)] = data
    return bytes(content)


def test_raw_to_vdisk_allocates_only_nonzero_and_skips_holes(tmp_path, monkeypatch):
    size = 16 * MiB
    raw = tmp_path / "a.raw"
    content = _raw_with_holes(raw, size)
    reads = []
    orig = C.RawImage.readinto

    def spy(self, buf, offset):
        reads.append((offset, len(memoryview(buf).cast("B"))))
        return orig(self, buf, offset)

    monkeypatch.setattr(C.RawImage, "readinto", spy)
    out = tmp_path / "a.vdk"
    vdisk.convert(raw, out)
    assert read_vdisk(out) == content
    assert_only_nonzero_blocks_mapped(out, content)
    # the hole from 5 MiB to 9 MiB (and most of the file) is never read
    assert all(off + n <= 5 * MiB or off >= 9 * MiB for off, n in reads), reads
    assert sum(n for _, n in reads) <= 4 * MiB


def test_raw_export_is_sparse(tmp_path):
    size = 64 * MiB
    src = tmp_path / "a.vdk"
    with vdisk.create(src, size) as d:
        d.pwrite(pattern(5, 100 * KiB), 10 * MiB + 3)
        d.pwrite(bytes(BS) + pattern(6, 10), 30 * MiB)      # a zero block then data
    out = tmp_path / "a.raw"
    vdisk.convert(src, out, dst_format="raw")
    assert os.path.getsize(out) == size
    assert os.stat(out).st_blocks * 512 <= 200 * KiB
    assert file_bytes(out) == read_vdisk(src)


def test_raw_that_looks_like_qcow2(tmp_path):
    raw = tmp_path / "disk.raw"
    data = b"QFI\xfb" + pattern(7, 100 * KiB)        # a guest that wrote qcow2 magic at sector 0
    raw.write_bytes(data + bytes(1 * MiB - len(data)))
    with pytest.raises(vdisk.VdiskError):
        vdisk.convert(raw, tmp_path / "x.vdk")          # detected as qcow2: refused as garbage
    vdisk.convert(raw, tmp_path / "y.vdk", src_format="raw")
    assert read_vdisk(tmp_path / "y.vdk") == raw.read_bytes()


def test_raw_size_rounded_up_to_512(tmp_path):
    raw = tmp_path / "odd.raw"
    raw.write_bytes(pattern(8, 1000))
    vdisk.convert(raw, tmp_path / "odd.vdk")
    with vdisk.open(tmp_path / "odd.vdk") as d:
        assert d.size == 1024
        assert d.pread(1024, 0) == raw.read_bytes() + bytes(24)
    vdisk.convert(raw, tmp_path / "odd.raw2", dst_format="raw")
    assert (tmp_path / "odd.raw2").read_bytes() == raw.read_bytes()
    if HAVE_QEMU:
        vdisk.convert(raw, tmp_path / "odd.qcow2", dst_format="qcow2")
        assert_clean_qcow2(tmp_path / "odd.qcow2")
        assert qemu_compare(raw, tmp_path / "odd.qcow2", "raw").returncode == 0


def test_empty_and_tiny_images(tmp_path):
    raw = tmp_path / "empty.raw"
    raw.write_bytes(b"")
    vdisk.convert(raw, tmp_path / "e.vdk")
    with vdisk.open(tmp_path / "e.vdk") as d:
        assert d.size == 0
    rec = Recorder()
    vdisk.convert(tmp_path / "e.vdk", tmp_path / "e.qcow2", dst_format="qcow2", progress=rec)
    assert rec.calls == [(0, 0)]
    if HAVE_QEMU:
        assert_clean_qcow2(tmp_path / "e.qcow2")
    vdisk.convert(tmp_path / "e.qcow2", tmp_path / "e2.vdk")


# ---------------------------------------------------------------------------- vdisk
@pytest.mark.parametrize("src_bs,dst_bs", [("4KiB", "64KiB"), ("64KiB", "4KiB"), ("1MiB", "64KiB")])
def test_vdisk_to_vdisk(tmp_path, src_bs, dst_bs):
    src = tmp_path / "a.vdk"
    with vdisk.create(src, 8 * MiB, block_size=src_bs) as d:
        d.pwrite(pattern(1, 300 * KiB), 4096 * 3)
        d.pwrite(pattern(2, 10), 8 * MiB - 10)
        d.pwrite(bytes(200 * KiB), 2 * MiB)                 # zeros over nothing
        d.pwrite(pattern(3, 4096), 5 * MiB)
        d.pwrite(bytes(4096), 5 * MiB)                      # zeros over data: a zero block stays mapped
    out = tmp_path / "b.vdk"
    vdisk.convert(src, out, block_size=dst_bs)
    content = read_vdisk(src)
    assert read_vdisk(out) == content
    with vdisk.open(out) as d:
        assert d.block_size == vdisk.parse_size(dst_bs)
    assert_only_nonzero_blocks_mapped(out, content)


@needs_qemu
@pytest.mark.parametrize("cluster", [512, 4096, 2 * MiB])
def test_vdisk_to_qcow2_cluster_sizes(tmp_path, cluster):
    src = tmp_path / "a.vdk"
    with vdisk.create(src, 5 * MiB + 512) as d:
        d.pwrite(pattern(1, 100 * KiB), 7)
        d.pwrite(pattern(2, 512), 5 * MiB)
    out = tmp_path / "a.qcow2"
    vdisk.convert(src, out, dst_format="qcow2", block_size=cluster)
    assert_clean_qcow2(out)
    ref = tmp_path / "ref.raw"
    vdisk.convert(src, ref, dst_format="raw")
    assert qemu_compare(ref, out, "raw", "qcow2").returncode == 0
    assert read_header(out)["cluster_bits"] == cluster.bit_length() - 1


def test_vdisk_snapshot_source(tmp_path):
    src = tmp_path / "a.vdk"
    with vdisk.create(src, 4 * MiB) as d:
        d.pwrite(pattern(1, 100 * KiB), 0)
        if not hasattr(vdisk.Disk, "open_snapshot"):
            d.close()
            with pytest.raises(vdisk.UnsupportedFeatureError, match="snapshots"):
                vdisk.convert(src, tmp_path / "s.vdk", snapshot="s1")
            return
        d.snapshot("s1")
        then = d.pread(d.size, 0)
        d.pwrite(pattern(2, 200 * KiB), 50 * KiB)
        now = d.pread(d.size, 0)
    vdisk.convert(src, tmp_path / "s.vdk", snapshot="s1")
    vdisk.convert(src, tmp_path / "n.vdk")
    assert read_vdisk(tmp_path / "s.vdk") == then
    assert read_vdisk(tmp_path / "n.vdk") == now


def test_snapshot_needs_a_vdisk_source(tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(vdisk.InvalidArgumentError, match="snapshot"):
        vdisk.convert(raw, tmp_path / "x.vdk", snapshot="s1")


# ---------------------------------------------------------------------------- safety of the output
def test_existing_destination(tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(pattern(1, 8192))
    dst = tmp_path / "out.vdk"
    dst.write_bytes(b"precious")
    with pytest.raises(vdisk.InvalidArgumentError, match="exists"):
        vdisk.convert(raw, dst)
    assert dst.read_bytes() == b"precious"
    vdisk.convert(raw, dst, overwrite=True)
    assert read_vdisk(dst) == raw.read_bytes()
    with pytest.raises(vdisk.InvalidArgumentError, match="source image itself"):
        vdisk.convert(dst, dst, overwrite=True)
    assert no_leftovers(tmp_path)


def test_destination_in_use_is_not_replaced(tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(pattern(1, 8192))
    dst = tmp_path / "busy.vdk"
    vdisk.create(dst, MiB).close()
    with vdisk.open(dst, "r+"):
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.convert(raw, dst, overwrite=True)
    assert no_leftovers(tmp_path)


@needs_qemu
def test_failed_conversion_leaves_nothing(tmp_path):
    """A corruption found mid-copy (a data cluster past EOF in a late L2
    table) aborts; no dst, no temporary file."""
    img = make_qcow2(tmp_path / "bad.qcow2", 8 * MiB, "cluster_size=4k", ["write -P 1 0 1M", "write -P 2 6M 4k"])
    h = read_header(img)
    l1 = h["l1_table_offset"]
    with open(img, "rb") as f:
        f.seek(l1 + 8 * 3)                      # the L2 table mapping 6 MiB (4 KiB clusters: 2 MiB per table)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
    assert l2
    with open(img, "r+b") as f:
        f.seek(l2)
        f.write(((1 << 40) | (1 << 63)).to_bytes(8, "big"))
    for fmt in ("vdisk", "raw", "qcow2"):
        with pytest.raises(vdisk.CorruptImageError, match="past the end of the file"):
            vdisk.convert(img, tmp_path / f"out.{fmt}", dst_format=fmt)
        assert not os.path.exists(tmp_path / f"out.{fmt}")
    assert no_leftovers(tmp_path)


def test_argument_errors(tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(vdisk.InvalidArgumentError, match="target format"):
        vdisk.convert(raw, tmp_path / "x", dst_format="vmdk")
    with pytest.raises(vdisk.InvalidArgumentError, match="source format"):
        vdisk.convert(raw, tmp_path / "x", src_format="vhd")
    with pytest.raises(vdisk.InvalidArgumentError, match="raw"):
        vdisk.convert(raw, tmp_path / "x", dst_format="raw", block_size="64KiB")
    with pytest.raises(vdisk.InvalidArgumentError, match="cluster size"):
        vdisk.convert(raw, tmp_path / "x", dst_format="qcow2", block_size=4 * MiB)
    with pytest.raises(vdisk.InvalidArgumentError, match="no such file"):
        vdisk.convert(tmp_path / "missing", tmp_path / "x")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(vdisk.InvalidArgumentError, match="regular file"):
        vdisk.convert(tmp_path / "fifo", tmp_path / "x", src_format="raw")
    assert not os.path.exists(tmp_path / "x")


def test_progress(tmp_path):
    src = tmp_path / "a.vdk"
    size = 64 * MiB
    with vdisk.create(src, size) as d:
        for off in range(0, size, 4 * MiB):
            d.pwrite(pattern(off, 1 * MiB), off)
    rec = Recorder()
    vdisk.convert(src, tmp_path / "b.vdk", progress=rec)
    rec.check(size)
    assert len(rec.calls) >= 4
    rec = Recorder()
    assert vdisk.compare(src, tmp_path / "b.vdk", progress=rec) is None
    rec.check(size)


# ---------------------------------------------------------------------------- compare
def test_compare_sizes_and_offsets(tmp_path):
    a, b, c = tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "c.raw"
    with open(a, "wb") as f:
        f.truncate(4 * MiB)
    with open(b, "wb") as f:
        f.truncate(8 * MiB)                                 # larger, zero past a's end
    assert vdisk.compare(a, b) is None
    with open(b, "r+b") as f:
        f.seek(5 * MiB + 1)
        f.write(b"x")
    assert vdisk.compare(a, b) == 5 * MiB + 1               # extra that is not zero
    assert vdisk.compare(b, a) == 5 * MiB + 1
    c.write_bytes(bytes(1000) + b"y")
    assert vdisk.compare(a, c) == 1000
    d = tmp_path / "d.vdk"
    vdisk.convert(b, d)
    assert vdisk.compare(b, d) is None and vdisk.compare(d, b) is None


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@needs_qemu
def test_cli_compare_matches_qemu_img(tmp_path):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    with open(a, "wb") as f:
        f.truncate(4 * MiB)
    with open(b, "wb") as f:
        f.truncate(6 * MiB)
    same = run_cli("compare", a, b)
    assert same.exit_code == 0
    assert same.stdout == qemu_compare(a, b, "raw", "raw").stdout == \
        "Warning: Image size mismatch!\nImages are identical.\n"
    for where in (1000, 3 * MiB + 777, 5 * MiB + 3):        # inside both, and in the extra
        with open(b, "r+b") as f:
            f.seek(where)
            f.write(b"z")
        r = run_cli("compare", "-f", "raw", "-F", "raw", a, b)
        q = qemu_compare(a, b, "raw", "raw")
        assert (r.exit_code, r.stdout) == (q.returncode, q.stdout) == (1, q.stdout)
        assert f"Content mismatch at offset {where - where % 512}!" in r.stdout
        with open(b, "r+b") as f:
            f.seek(where)
            f.write(b"\0")
    q2 = tmp_path / "b.qcow2"
    vdisk.convert(b, q2, dst_format="qcow2")
    r = run_cli("compare", b, q2)
    assert r.exit_code == 0 and r.stdout.endswith("Images are identical.\n")


def test_cli_compare_errors_exit_2(tmp_path):
    a = tmp_path / "a.raw"
    a.write_bytes(bytes(512))
    r = run_cli("compare", "-f", "raw", a, tmp_path / "missing")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [f"vdisk: error: {tmp_path / 'missing'}: no such file"]
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(200))
    r = run_cli("compare", "-f", "raw", a, bad)
    assert r.exit_code == 2 and r.stderr.startswith("vdisk: error: ") and len(r.stderr.splitlines()) == 1


def test_cli_convert(tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(pattern(1, 3 * MiB))
    r = run_cli("convert", "-f", "raw", "-O", "vdisk", "--block-size", "4KiB", raw, tmp_path / "a.vdk")
    assert r.exit_code == 0, r.stderr
    with vdisk.open(tmp_path / "a.vdk") as d:
        assert d.block_size == 4096 and d.pread(d.size, 0) == raw.read_bytes()
    r = run_cli("convert", raw, tmp_path / "a.vdk")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [f"vdisk: error: {tmp_path / 'a.vdk'} exists (pass --overwrite to replace it)"]
    r = run_cli("convert", "-O", "qcow2", "--overwrite", "-p", tmp_path / "a.vdk", tmp_path / "a.qcow2")
    assert r.exit_code == 0, r.stderr
    assert "100%" in r.stderr                              # the tqdm bar, on stderr
    assert run_cli("compare", raw, tmp_path / "a.qcow2").exit_code == 0
    r = run_cli("convert", "-O", "vmdk", raw, tmp_path / "x")
    assert r.exit_code == 1 and "vdisk: error:" in r.stderr           # a usage error, as qemu-img


@needs_qemu
def test_cli_convert_backing(tmp_path):
    make_qcow2(tmp_path / "base.qcow2", 2 * MiB, "", ["write -P 0x71 0 2M"])
    top = make_qcow2(tmp_path / "top.qcow2", 2 * MiB, "", ["write -P 0x72 64k 64k"], backing="base.qcow2",
                     backing_fmt="qcow2")
    ref = file_bytes(to_raw(top, tmp_path / "ref.raw"))
    r = run_cli("convert", top, tmp_path / "a.vdk")
    assert r.exit_code == 1 and "backing file" in r.stderr
    assert run_cli("convert", "--allow-backing", top, tmp_path / "a.vdk").exit_code == 0
    assert read_vdisk(tmp_path / "a.vdk") == ref
    other = tmp_path / "other.raw"
    other.write_bytes(bytes(2 * MiB))
    assert run_cli("convert", "--backing", other, top, tmp_path / "b.vdk").exit_code == 0
    assert read_vdisk(tmp_path / "b.vdk") == bytes(64 * KiB) + b"\x72" * (64 * KiB) + bytes(2 * MiB - 128 * KiB)
    assert run_cli("compare", "--allow-backing", top, tmp_path / "a.vdk").exit_code == 0
    assert run_cli("compare", top, tmp_path / "a.vdk").exit_code == 2


def test_cli_convert_subprocess_no_traceback(tmp_path):
    """The installed entry point: an unsupported input is one error line."""
    img = tmp_path / "v1.qcow2"
    img.write_bytes(b"QFI\xfb" + (1).to_bytes(4, "big") + bytes(200))
    r = subprocess.run([sys.executable, "-m", "vdisk.cli", "convert", str(img), str(tmp_path / "o.vdk")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"vdisk: error: {img}: qcow2 version 1 (only versions 2 and 3)"]


# ---------------------------------------------------------------------------- source read errors
@pytest.mark.parametrize("src_format", ["raw", "qcow2"])
@pytest.mark.parametrize("call", ["pread", "preadv"])
def test_source_read_error_is_vdisk_io_error(tmp_path, monkeypatch, src_format, call):
    """A failing read of a raw or qcow2 source raises VdiskIOError naming the
    source (the readers read by descriptor through fileio), never a bare
    OSError, and leaves no output behind."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(7, 2 * MiB))
    src = raw
    if src_format == "qcow2":
        src = tmp_path / "src.qcow2"
        vdisk.convert(raw, src, src_format="raw", dst_format="qcow2")
    real = getattr(os, call)
    failed = []

    def failing(fd, *args):
        if os.readlink(f"/proc/self/fd/{fd}") == str(src):
            failed.append(fd)
            raise OSError(5, "Input/output error")
        return real(fd, *args)

    monkeypatch.setattr(os, call, failing)
    out = tmp_path / "out.raw"
    try:
        vdisk.convert(src, out, src_format=src_format, dst_format="raw")
    except vdisk.VdiskIOError as exc:
        assert str(src) in str(exc) and exc.errno == 5
    else:
        assert not failed, "a failed read went unnoticed"
        return                     # this reader does not use this call
    assert failed
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in {raw, src})


# ---------------------------------------------------------------------------- the reader and sink protocols
@needs_qemu
@pytest.mark.parametrize("src_format", ["raw", "qcow2", "vdisk"])
def test_an_input_is_opened_once_and_readers_follow_the_protocol(tmp_path, monkeypatch, src_format):
    """convert opens its source once (one os.open of the path: probe, format
    check and read all use that descriptor), and every reader is an
    ImageReader (vdisk.protocols)."""
    from vdisk.protocols import ImageReader
    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(3, 256 * KiB) + bytes(256 * KiB))
    src = {"raw": raw, "qcow2": tmp_path / "src.qcow2", "vdisk": tmp_path / "src.vdk"}[src_format]
    if src_format != "raw":
        vdisk.convert(raw, src, src_format="raw", dst_format=src_format)
    real = os.open
    opened = []

    def spy(path, *args, **kwargs):
        if os.fspath(path) == str(src):
            opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    fmt = None if src_format != "raw" else "raw"
    vdisk.convert(src, tmp_path / "out.raw", src_format=fmt, dst_format="raw")
    assert len(opened) == 1, opened
    opened.clear()
    with pytest.warns(C.RawProbeWarning) if fmt is None and src_format == "raw" else contextlib.nullcontext():
        image = C.open_image(src, fmt)
    try:
        assert len(opened) == 1 and isinstance(image, ImageReader) and image.format == src_format
    finally:
        image.close()
    monkeypatch.undo()
    assert file_bytes(tmp_path / "out.raw") == file_bytes(raw)


def test_the_sinks_follow_the_protocol(tmp_path):
    from vdisk.fileio import FileIO
    from vdisk.protocols import ImageSink
    from vdisk.sinks import Qcow2Sink, RawSink, VdiskSink
    out = FileIO(str(tmp_path / "o"), writable=True, create=True)
    try:
        with vdisk.create(tmp_path / "d.vdk", MiB) as d:
            for sink in (RawSink(out, fresh=True), Qcow2Sink(out, MiB, 64 * KiB), VdiskSink(d, fresh=True)):
                assert isinstance(sink, ImageSink)
    finally:
        out.close()


# ---------------------------------------------------------------------------- output I/O errors
@pytest.mark.parametrize("dst_format", ["raw", "qcow2"])
@pytest.mark.parametrize("kind,err", [("pwrite", errno.EIO), ("pwrite", errno.ENOSPC), ("fsync", errno.EIO)])
def test_output_io_errors_go_through_fileio_and_name_the_users_path(tmp_path, monkeypatch, dst_format, kind, err):
    """Every write and sync of a raw or qcow2 output goes through FileIO (the
    fault-injecting vdisk.testing.FaultyIO sees and fails it): the error is a
    VdiskIOError with the injected errno, worded with the user's path (not
    the temporary file), nothing reaches the file after a failed fsync, and
    no file is left behind."""
    from vdisk.testing import FaultPlan, FaultyIO
    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(5, MiB) + bytes(MiB) + pattern(6, MiB))
    plan = FaultPlan(kind, 0, err)
    monkeypatch.setattr(C, "FileIO", FaultyIO.factory(plan))
    dst = tmp_path / f"out.{dst_format}"
    with pytest.raises(vdisk.VdiskIOError) as info:
        vdisk.convert(raw, dst, src_format="raw", dst_format=dst_format)
    assert plan.fired == (kind, 0, err)
    assert info.value.errno == err
    message = str(info.value)
    assert f"{dst}: writing the converted image failed: " in message and ".converting" not in message
    if kind == "fsync":
        assert plan.landed_after == 0
    assert sorted(os.listdir(tmp_path)) == ["src.raw"]
    monkeypatch.undo()
    vdisk.convert(raw, dst, src_format="raw", dst_format=dst_format)      # and without the fault: fine
    assert C.compare(raw, dst, a_format="raw") is None


# ---------------------------------------------------------------------------- info, map, compare on raw and qcow2
def _runs(entries):
    """(start, length, data) runs of a map --output json list, adjacent runs of a kind merged."""
    out: list[list] = []
    for e in entries:
        if out and out[-1][2] == e["data"] and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], e["data"]])
    return [tuple(r) for r in out]


@needs_qemu
def test_cli_info_map_compare_on_raw_and_qcow2_agree_with_qemu_img(tmp_path):
    """vdisk info, map and compare read raw and qcow2 images (through the reader
    protocol) and agree with qemu-img info, map and compare on the same files:
    qemu-img's JSON key names and values, internal snapshots included."""
    raw = tmp_path / "a.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(pattern(1, 192 * KiB))
        f.seek(6 * MiB)
        f.write(pattern(2, 64 * KiB))
    qc = make_qcow2(tmp_path / "a.qcow2", 8 * MiB, "", ["write -P 0x61 0 128k", "write -P 0x62 3M 64k"])
    qemu_img("snapshot", "-c", "before", qc)
    qemu_io(qc, "write -P 0x63 5M 64k")
    for path, fmt in ((str(raw), "raw"), (qc, "qcow2")):
        q = json.loads(qemu_img("info", "-f", fmt, "--output=json", path).stdout)
        r = run_cli("info", "--output", "json", path)
        assert r.exit_code == 0, r.output
        ours = json.loads(r.stdout)
        for key in ("format", "virtual-size", "actual-size", "cluster-size", "dirty-flag"):
            assert ours.get(key) == q.get(key), key
        assert [{k: s[k] for k in ("id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
                                    "vm-clock-nsec", "icount")} for s in ours.get("snapshots", [])] == \
            q.get("snapshots", [])
        r = run_cli("info", path)
        assert r.exit_code == 0 and "file format" in r.stdout and fmt in r.stdout
        r = run_cli("map", "--output", "json", path)
        assert r.exit_code == 0, r.output
        qmap = json.loads(qemu_img("map", "-f", fmt, "--output=json", path).stdout)
        assert _runs(json.loads(r.stdout)) == _runs(qmap)
        if fmt == "raw":
            assert json.loads(r.stdout) == qmap
    assert len(json.loads(run_cli("info", "--output", "json", qc).stdout)["snapshots"]) == 1
    # compare: identical and different, as qemu-img compare says
    same = tmp_path / "same.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(same))
    assert run_cli("compare", "-f", "raw", raw, same).exit_code == qemu_compare(str(raw), str(same), "raw").returncode == 0
    assert run_cli("compare", "-f", "raw", raw, qc).exit_code == qemu_compare(str(raw), qc, "raw").returncode == 1


# ---------------------------------------------------------------------------- convert -n, -l, snapshots carried
def _blocks_changed(old: bytes, new: bytes, bs: int) -> set[int]:
    return {i // bs for i in range(0, len(old), bs) if old[i:i + bs] != new[i:i + bs]}


def test_convert_n_writes_into_an_existing_vdisk_and_raw_image(tmp_path):
    """convert -n (qemu-img's -n): the source's content lands in the existing
    target (what the source reads as zeros too), the rest of the target stays,
    a vdisk target keeps its identity and its tracking reports every block
    that changed; a qcow2 target too; a missing or smaller target is refused."""
    src = tmp_path / "src.raw"
    src_bytes = pattern(1, 256 * KiB) + bytes(512 * KiB) + pattern(2, 256 * KiB)        # 1 MiB
    src.write_bytes(src_bytes)
    old = pattern(9, 2 * MiB)
    with vdisk.create(tmp_path / "t.vdk", 2 * MiB) as d:
        d.pwrite(old, 0)
        uuid = d.uuid
        cid = d.checkpoint()
    r = run_cli("convert", "-n", "-f", "raw", src, tmp_path / "t.vdk")
    assert r.exit_code == 0, r.output
    new = src_bytes + old[MiB:]
    with vdisk.open(tmp_path / "t.vdk") as d:
        assert d.pread(d.size, 0) == new and d.uuid == uuid
        changed = d.changes_since(cid)
        reported = {b for off, n in changed for b in range(off // BS, -(-(off + n) // BS))}
        assert _blocks_changed(old, new, BS) <= reported and len(reported) <= MiB // BS
    (tmp_path / "t.raw").write_bytes(old)
    r = run_cli("convert", "-n", "-f", "raw", "-O", "raw", src, tmp_path / "t.raw")
    assert r.exit_code == 0, r.output
    assert file_bytes(tmp_path / "t.raw") == new
    # refusals, one line each, the target untouched
    (tmp_path / "small.raw").write_bytes(bytes(512 * KiB))
    r = run_cli("convert", "-n", "-f", "raw", "-O", "raw", src, tmp_path / "small.raw")
    assert r.exit_code == 1 and "smaller than the source" in r.stderr and str(tmp_path / "small.raw") in r.stderr
    assert file_bytes(tmp_path / "small.raw") == bytes(512 * KiB)
    r = run_cli("convert", "-n", "-f", "raw", "-O", "raw", src, tmp_path / "missing.raw")
    assert r.exit_code == 1 and "missing.raw" in r.stderr and not (tmp_path / "missing.raw").exists()
    # a qcow2 target too (tests/test_convert_into_qcow2.py has the rest)
    vdisk.convert(tmp_path / "t.raw", tmp_path / "t.qcow2", src_format="raw", dst_format="qcow2")
    r = run_cli("convert", "-n", "-f", "raw", src, tmp_path / "t.qcow2")
    assert r.exit_code == 0, r.output
    with C.open_image(tmp_path / "t.qcow2", "qcow2") as q:
        assert q.pread(q.size, 0) == new
    r = run_cli("convert", "-n", "--overwrite", "-f", "raw", src, tmp_path / "t.vdk")
    assert r.exit_code == 1


def _qcow2_with_snapshots(tmp_path):
    img = make_qcow2(tmp_path / "s.qcow2", 4 * MiB, "", ["write -P 0x11 0 192k", "write -P 0x12 2M 64k"])
    qemu_img("snapshot", "-c", "first", img)
    qemu_io(img, "write -P 0x21 64k 64k", "write -z 2M 64k")
    qemu_img("snapshot", "-c", "second", img)
    qemu_io(img, "write -P 0x31 1M 64k", "discard 0 64k")
    return img


def _qemu_layer(img, tmp_path, snapshot=None) -> bytes:
    out = tmp_path / f"layer-{snapshot}.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", *(["-l", f"snapshot.name={snapshot}"] if snapshot else []),
             img, out)
    return file_bytes(out)


@needs_qemu
def test_qcow2_internal_snapshots_become_vdisk_snapshots(tmp_path):
    """qcow2 -> vdk carries every internal snapshot over as a vdisk snapshot of
    the same name whose content is qemu-img convert -l's; `vdisk snapshot list`
    shows them; no warning then."""
    img = _qcow2_with_snapshots(tmp_path)
    r = run_cli("convert", img, tmp_path / "o.vdk")
    assert r.exit_code == 0, r.output
    assert "not carried" not in r.stderr
    listed = run_cli("snapshot", "list", tmp_path / "o.vdk").stdout
    assert "first" in listed and "second" in listed
    with vdisk.open(tmp_path / "o.vdk") as d:
        assert [s.name for s in d.snapshots] == ["first", "second"]
        for name in ("first", "second"):
            with d.open_snapshot(name) as snap:
                assert snap.pread(snap.size, 0) == _qemu_layer(img, tmp_path, name), name
        assert d.pread(d.size, 0) == _qemu_layer(img, tmp_path)
    assert vdisk.check(tmp_path / "o.vdk").ok


@needs_qemu
def test_convert_l_reads_a_qcow2_internal_snapshot_and_warns_what_is_left(tmp_path):
    """convert -l SNAPSHOT converts that internal snapshot (as qemu-img
    convert -l); whenever snapshots are not carried over (-l, a raw or qcow2
    output, a vdisk source with snapshots and consumers) a warning says so."""
    img = _qcow2_with_snapshots(tmp_path)
    warnings.simplefilter("always")            # each run here is a new process of the command line
    for spec in ("first", "snapshot.name=first", "snapshot.id=1"):
        out = tmp_path / "l.raw"
        r = run_cli("convert", "-l", spec, "-O", "raw", img, out)
        assert r.exit_code == 0, r.output
        assert file_bytes(out) == _qemu_layer(img, tmp_path, "first")
        assert "not carried over" in r.stderr and "first, second" in r.stderr
        out.unlink()
    r = run_cli("convert", "-l", "nope", "-O", "raw", img, tmp_path / "x.raw")
    assert r.exit_code == 1 and "no internal snapshot 'nope'" in r.stderr
    r = run_cli("convert", "-O", "qcow2", img, tmp_path / "x.qcow2")
    assert r.exit_code == 0 and "2 internal snapshots" in r.stderr
    with vdisk.create(tmp_path / "v.vdk", MiB) as d:
        d.snapshot("keep")
        d.consumers.register("nightly")
    r = run_cli("convert", "-O", "raw", tmp_path / "v.vdk", tmp_path / "v.raw")
    assert r.exit_code == 0 and "1 snapshot (keep) and 1 consumer are not carried over" in r.stderr
