"""Hostile qcow2 input: crafted headers and tables, each refused cleanly with
a VdiskError that names the problem, in bounded memory and time."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import zlib

import pytest

import vdisk
from vdisk_testkit.qemu_helpers import (KiB, MiB, l1_entry_offset, l2_table_offset, make_qcow2, needs_qemu,
                                        patch_header, qemu_img, read_header, read_u64, to_raw, write_u64)

pytestmark = needs_qemu

COPIED = 1 << 63
COMPRESSED = 1 << 62


@pytest.fixture
def base(tmp_path):
    """A small, valid v3 image with 64 KiB clusters: data at 0 and at 1 MiB."""
    return make_qcow2(tmp_path / "base.qcow2", 4 * MiB, "cluster_size=64k",
                      ["write -P 0x61 0 64k", "write -P 0x62 1M 128k"])


def refused(path, exc=vdisk.VdiskError, match=None, **kwargs):
    """The conversion fails with exc (matching match); nothing is left behind."""
    out = os.path.join(os.path.dirname(str(path)), "out.vdk")
    with pytest.raises(exc, match=match) as info:
        vdisk.convert(path, out, src_format="qcow2", **kwargs)
    assert isinstance(info.value, vdisk.VdiskError)
    assert not os.path.exists(out)
    assert not glob.glob(os.path.join(os.path.dirname(str(path)), ".*.converting"))
    return str(info.value)


def set_backing(path, name: bytes, offset: int = 2048) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(name)
    patch_header(path, backing_file_offset=offset, backing_file_size=len(name))


# ---------------------------------------------------------------------------- header fields
def test_huge_l1_size(base):
    patch_header(base, l1_size=2 ** 31)
    assert "active L1 table too large" in refused(base, vdisk.CorruptImageError)


def test_l1_table_too_small_for_the_size(base):
    patch_header(base, size=1 << 40)
    assert "L1 table is too small" in refused(base, vdisk.CorruptImageError)


def test_l1_table_past_eof(base):
    patch_header(base, l1_table_offset=1 << 40)
    msg = refused(base, vdisk.CorruptImageError)
    assert "active L1 table" in msg and "past the end of the file" in msg


def test_unaligned_l1_table(base):
    patch_header(base, l1_table_offset=read_header(base)["l1_table_offset"] + 512)
    assert "not aligned" in refused(base, vdisk.CorruptImageError)


@pytest.mark.parametrize("bits,exc,text", [(8, vdisk.CorruptImageError, "cluster_bits is 8"),
                                           (22, vdisk.UnsupportedFeatureError, "cluster_bits 22"),
                                           (63, vdisk.UnsupportedFeatureError, "cluster_bits 63")])
def test_cluster_bits_out_of_range(base, bits, exc, text):
    patch_header(base, cluster_bits=bits)
    assert text in refused(base, exc)


@pytest.mark.parametrize("size,text", [(2 ** 63, "does not fit"), (2 ** 64 - 1, "does not fit"),
                                       (2 ** 62, "too big")])
def test_absurd_virtual_size(base, size, text):
    patch_header(base, size=size)
    assert text in refused(base, vdisk.CorruptImageError)


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_unknown_version(base, version):
    patch_header(base, version=version)
    assert f"version {version}" in refused(base, vdisk.UnsupportedFeatureError)


@pytest.mark.parametrize("length", [100, 105, 64 * KiB + 8])
def test_bad_header_length(base, length):
    patch_header(base, header_length=length)
    assert "header_length" in refused(base, vdisk.CorruptImageError)


@pytest.mark.parametrize("bit", [5, 31, 63])
def test_unknown_incompatible_bit(base, bit):
    patch_header(base, incompatible_features=1 << bit)
    assert f"bit {bit}" in refused(base, vdisk.UnsupportedFeatureError)


def test_corrupt_bit(base):
    patch_header(base, incompatible_features=2)
    assert "marked corrupt" in refused(base, vdisk.CorruptImageError)


def test_external_data_file_bit(base):
    patch_header(base, incompatible_features=4)
    assert "external data file" in refused(base, vdisk.UnsupportedFeatureError)


@pytest.mark.parametrize("method,name", [(1, "AES"), (2, "LUKS"), (7, "unknown")])
def test_encryption(base, method, name):
    patch_header(base, crypt_method=method)
    msg = refused(base, vdisk.UnsupportedFeatureError)
    assert "encryption" in msg and name in msg


@pytest.mark.parametrize("fmt", ["aes", "luks"])
def test_real_encrypted_images(tmp_path, fmt):
    img = tmp_path / f"{fmt}.qcow2"
    opts = f"encrypt.format={fmt},encrypt.key-secret=sec0" + (",encrypt.iter-time=100" if fmt == "luks" else "")
    r = qemu_img("create", "-q", "--object", "secret,id=sec0,data=123456", "-f", "qcow2", "-o", opts, img, "1M",
                 check=False)                   # (it retries luks's flaky PBKDF timing probe)
    if r.returncode:
        pytest.skip(f"qemu-img cannot create {fmt} images here: {r.stderr.strip()}")
    assert "encryption" in refused(img, vdisk.UnsupportedFeatureError)


@pytest.mark.parametrize("order", [7, 255])
def test_refcount_order(base, order):
    patch_header(base, refcount_order=order)
    assert "refcount_order" in refused(base, vdisk.CorruptImageError)


def test_refcount_table_too_large_or_missing(base):
    patch_header(base, refcount_table_clusters=200)        # 200 x 64 KiB > 8 MiB
    assert "refcount table too large" in refused(base, vdisk.CorruptImageError)
    patch_header(base, refcount_table_clusters=0)
    assert "no refcount table" in refused(base, vdisk.CorruptImageError)


@pytest.mark.parametrize("incompat,ctype,text", [(8, 0, "compression type bit"), (0, 1, "without the compression"),
                                                 (8, 2, "compression type 2")])
def test_compression_type_fields(base, incompat, ctype, text):
    patch_header(base, incompatible_features=incompat, compression_type=ctype)
    assert text in refused(base)


# ---------------------------------------------------------------------------- overlapping metadata
def test_l1_overlaps_header(base):
    patch_header(base, l1_table_offset=0)
    assert "the active L1 table (offset 0x0" in refused(base, vdisk.CorruptImageError, match="overlaps the header")


def test_refcount_table_in_the_header(base):
    patch_header(base, refcount_table_offset=0)
    assert "the refcount table" in refused(base, vdisk.CorruptImageError, match="overlaps the header")


def test_l1_overlaps_refcount_table(base):
    patch_header(base, l1_table_offset=read_header(base)["refcount_table_offset"])
    refused(base, vdisk.CorruptImageError, match="overlaps the active L1 table")


def test_snapshot_table_overlaps_l1(base):
    h = read_header(base)
    patch_header(base, nb_snapshots=1, snapshots_offset=h["l1_table_offset"])
    refused(base, vdisk.CorruptImageError, match="snapshot table")


def test_refcount_block_in_the_l1_table(base):
    h = read_header(base)
    write_u64(base, h["refcount_table_offset"], h["l1_table_offset"])
    refused(base, vdisk.CorruptImageError, match="refcount table entry 0.*overlaps the active L1 table")


def test_refcount_block_past_eof(base):
    write_u64(base, read_header(base)["refcount_table_offset"] + 8, 1 << 40)
    refused(base, vdisk.CorruptImageError, match="refcount table entry 1.*past the end")


def test_l2_table_in_the_refcount_table(base):
    write_u64(base, l1_entry_offset(base), read_header(base)["refcount_table_offset"] | COPIED)
    refused(base, vdisk.CorruptImageError, match="active L1 table entry 0: L2 table offset .* overlaps the refcount")


def test_data_cluster_in_the_header(base):
    l2 = l2_table_offset(base)
    write_u64(base, l2 + 8 * 40, COPIED | 0)                  # offset 0 with COPIED: not "unallocated"
    refused(base, vdisk.CorruptImageError, match="entry 40 .*COPIED")
    write_u64(base, l2 + 8 * 40, 0)                           # a plain unallocated entry again
    write_u64(base, l2 + 8 * 41, COPIED | read_header(base)["l1_table_offset"])
    refused(base, vdisk.CorruptImageError,
            match=r"L2 table 0 .* entry 41 \(guest offset 0x290000\).*overlaps the active L1")


# ---------------------------------------------------------------------------- table entries
def test_l2_offset_past_eof(base):
    write_u64(base, l1_entry_offset(base), (1 << 40) | COPIED)
    msg = refused(base, vdisk.CorruptImageError)
    assert "active L1 table entry 0" in msg and "past the end of the file" in msg


def test_data_cluster_past_eof(base):
    write_u64(base, l2_table_offset(base) + 8 * 3, (1 << 40) | COPIED)
    msg = refused(base, vdisk.CorruptImageError)
    assert "entry 3 (guest offset 0x30000)" in msg and "past the end of the file" in msg


def test_last_entry_of_l2_table(base):
    """The last entry in use (index 63 for a 4 MiB disk) is checked; one past it is not read."""
    l2 = l2_table_offset(base)
    write_u64(base, l2 + 8 * 64, (1 << 40) | COPIED)        # past the virtual size: ignored
    ref = to_raw(base, os.path.join(os.path.dirname(base), "ref.raw"))
    out = os.path.join(os.path.dirname(base), "ok.vdk")
    vdisk.convert(base, out)
    assert vdisk.compare(out, ref) is None
    write_u64(base, l2 + 8 * 63, (1 << 40) | COPIED)
    refused(base, vdisk.CorruptImageError, match="entry 63")


@pytest.mark.parametrize("bits,text", [(1, "reserved bits"), (1 << 60, "reserved bits")])
def test_reserved_bits_in_l1_entry(base, bits, text):
    off = l1_entry_offset(base)
    write_u64(base, off, read_u64(base, off) | bits)
    assert text in refused(base, vdisk.CorruptImageError, match="active L1 table entry 0")


@pytest.mark.parametrize("bits", [1 << 1, 1 << 8, 1 << 56, 1 << 61])
def test_reserved_bits_in_l2_entry(base, bits):
    off = l2_table_offset(base)
    write_u64(base, off, read_u64(base, off) | bits)
    refused(base, vdisk.CorruptImageError, match="entry 0 .*reserved bits")


def test_unaligned_l2_table_and_cluster(base):
    off = l1_entry_offset(base)
    good = read_u64(base, off)
    write_u64(base, off, good + 512)
    refused(base, vdisk.CorruptImageError, match="not cluster-aligned")
    write_u64(base, off, good)
    l2 = l2_table_offset(base)
    write_u64(base, l2, read_u64(base, l2) + 4096)
    refused(base, vdisk.CorruptImageError, match="entry 0 .*not cluster-aligned")


def test_zero_flag_in_a_version_2_image(tmp_path):
    img = make_qcow2(tmp_path / "v2.qcow2", MiB, "compat=0.10", ["write -P 1 0 64k"])
    l2 = l2_table_offset(img)
    write_u64(img, l2, read_u64(img, l2) | 1)
    refused(img, vdisk.CorruptImageError, match="zero flag .* version 2")


def test_extended_l2_bad_bitmaps(tmp_path):
    img = make_qcow2(tmp_path / "e.qcow2", 4 * MiB, "cluster_size=64k,extended_l2=on", ["write -P 1 0 4k"])
    l2 = l2_table_offset(img)
    bitmap = read_u64(img, l2 + 8)
    write_u64(img, l2 + 8, bitmap | (bitmap << 32))           # allocated and zero at once
    refused(img, vdisk.CorruptImageError, match="both allocated and zero")
    write_u64(img, l2 + 8, bitmap)
    write_u64(img, l2 + 16 + 8, 1)                            # an unallocated cluster with an allocated subcluster
    refused(img, vdisk.CorruptImageError, match="entry 1 .*unallocated cluster")


# ---------------------------------------------------------------------------- compressed clusters
@pytest.fixture
def compressed(tmp_path):
    raw = tmp_path / "c.raw"
    raw.write_bytes(b"abcd" * (256 * KiB))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
    return str(img)


def _compressed_entry(img, index=0):
    return read_u64(img, l2_table_offset(img) + 8 * index)


def test_compressed_cluster_runs_past_eof(compressed):
    size = os.path.getsize(compressed)
    entry = COMPRESSED | (0xFF << (62 - 8)) | (size - 100)    # 256 sectors starting 100 bytes before EOF
    write_u64(compressed, l2_table_offset(compressed), entry)
    refused(compressed, vdisk.CorruptImageError, match="compressed cluster at offset .* past the end of the file")


def test_compressed_cluster_with_copied_bit(compressed):
    write_u64(compressed, l2_table_offset(compressed), _compressed_entry(compressed) | COPIED)
    refused(compressed, vdisk.CorruptImageError, match="COPIED")


def test_compressed_garbage(compressed):
    coff = _compressed_entry(compressed) & ((1 << 54) - 1)
    with open(compressed, "r+b") as f:
        f.seek(coff)
        f.write(b"\xff" * 64)
    refused(compressed, vdisk.CorruptImageError, match="compressed cluster at host offset .* does not decompress")


def test_compressed_stream_too_short(compressed):
    """A stream that ends before a whole cluster is refused (qemu needs a full cluster)."""
    short = zlib.compressobj(9, zlib.DEFLATED, -12)
    data = short.compress(b"x" * 1000) + short.flush()
    size = os.path.getsize(compressed)
    at = -(-size // 512) * 512
    with open(compressed, "r+b") as f:
        f.seek(at)
        f.write(data)
    write_u64(compressed, l2_table_offset(compressed), COMPRESSED | at)
    refused(compressed, vdisk.CorruptImageError, match="decompresses to 1000 bytes")


def test_decompression_output_is_capped(compressed):
    """A deflate bomb (64 MiB of output) as one 64 KiB cluster: capped to the cluster, not an error."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, -12)
    data = bomb.compress(b"\x07" * (64 * MiB)) + bomb.flush()
    size = os.path.getsize(compressed)
    at = -(-size // 512) * 512
    with open(compressed, "r+b") as f:
        f.seek(at)
        f.write(data)
    nsect = -(-len(data) // 512) - 1
    write_u64(compressed, l2_table_offset(compressed), COMPRESSED | (nsect << (62 - 8)) | at)
    out = os.path.join(os.path.dirname(compressed), "bomb.vdk")
    vdisk.convert(compressed, out)
    with vdisk.open(out) as d:
        assert d.pread(64 * KiB, 0) == b"\x07" * (64 * KiB)


# ---------------------------------------------------------------------------- backing files
def test_backing_host_file_refused(base):
    set_backing(base, b"/etc/passwd")
    assert "backing file" in refused(base, vdisk.UnsupportedFeatureError)
    assert "absolute" in refused(base, vdisk.UnsupportedFeatureError, allow_backing=True)


@pytest.mark.parametrize("name", [b"../x", b"sub/../../x", b"..", b"sub/..\\..\\x"])
def test_backing_dotdot_refused(base, name):
    os.makedirs(os.path.join(os.path.dirname(base), "sub"), exist_ok=True)
    set_backing(base, name)
    assert ".." in refused(base, vdisk.UnsupportedFeatureError, allow_backing=True)


def test_backing_symlink_escape_refused(base, tmp_path):
    os.symlink("/etc", tmp_path / "etc-link")
    os.symlink("/etc/passwd", tmp_path / "passwd-link")
    for name in (b"etc-link/passwd", b"passwd-link"):
        set_backing(base, name)
        assert "outside the image's folder" in refused(base, vdisk.UnsupportedFeatureError, allow_backing=True)


@pytest.mark.parametrize("name", [b"nbd://example.com/x", b"json:{\"file\": {\"filename\": \"/etc/passwd\"}}",
                                  b"file:/etc/passwd"])
def test_backing_protocols_refused(base, name):
    set_backing(base, name)
    assert "protocol" in refused(base, vdisk.UnsupportedFeatureError, allow_backing=True)


def test_backing_fifo_and_directory_refused(base, tmp_path):
    os.mkfifo(tmp_path / "fifo")                   # opening it would block forever
    set_backing(base, b"fifo")
    assert "not a regular file" in refused(base, vdisk.UnsupportedFeatureError, allow_backing=True)
    (tmp_path / "dir").mkdir()
    set_backing(base, b"dir")
    assert "not a regular file" in refused(base, vdisk.UnsupportedFeatureError, allow_backing=True)
    set_backing(base, b"missing.qcow2")
    assert "no such file" in refused(base, vdisk.InvalidArgumentError, allow_backing=True)


def test_backing_name_too_long_or_outside_the_header(base):
    patch_header(base, backing_file_offset=2048, backing_file_size=2000)
    assert "backing file name of 2000 bytes" in refused(base, vdisk.CorruptImageError)
    patch_header(base, backing_file_offset=64 * KiB - 10, backing_file_size=20)
    assert "not inside the header cluster" in refused(base, vdisk.CorruptImageError)


def test_backing_loop_and_depth(tmp_path):
    loop = make_qcow2(tmp_path / "loop.qcow2", MiB)
    set_backing(loop, b"loop.qcow2")
    assert "loops" in refused(loop, vdisk.CorruptImageError, allow_backing=True)
    prev = None
    for i in range(18):
        prev = make_qcow2(tmp_path / f"c{i}.qcow2", MiB, "", [f"write -P {i + 1} {i * 4096} 4096"],
                          backing=None if prev is None else os.path.basename(prev), backing_fmt="qcow2")
    assert "deeper than 16" in refused(prev, vdisk.UnsupportedFeatureError, allow_backing=True)
    # an image on 16 backing files is fine
    ok = tmp_path / "c16.qcow2"
    vdisk.convert(ok, tmp_path / "c16.vdk", allow_backing=True)
    with vdisk.open(tmp_path / "c16.vdk") as d:
        assert [d.pread(1, i * 4096)[0] for i in range(17)] == list(range(1, 18))


def test_unsupported_backing_format(tmp_path):
    make_qcow2(tmp_path / "b.qcow2", MiB)
    top = make_qcow2(tmp_path / "t.qcow2", MiB, "", (), backing="b.qcow2", backing_fmt="qcow2")
    with open(top, "r+b") as f:
        data = f.read(4096)
        at = data.index(b"qcow2", 112)          # the backing format header extension
        f.seek(at)
        f.write(b"vmdk\0")
    refused(top, vdisk.UnsupportedFeatureError, match="backing file format", allow_backing=True)


# ---------------------------------------------------------------------------- snapshots and extensions
def test_snapshot_table_bounds(tmp_path):
    img = make_qcow2(tmp_path / "s.qcow2", MiB, "", ["write -P 1 0 4k"])
    qemu_img("snapshot", "-c", "one", img)
    h = read_header(img)
    assert h["nb_snapshots"] == 1
    patch_header(img, nb_snapshots=70000)
    assert "70000 snapshots" in refused(img, vdisk.CorruptImageError)
    patch_header(img, nb_snapshots=2000)                  # entries past the end of the file
    refused(img, vdisk.CorruptImageError, match="snapshot table")
    patch_header(img, nb_snapshots=1)
    so = h["snapshots_offset"]
    with open(img, "r+b") as f:                            # extra data size field
        f.seek(so + 36)
        f.write((5000).to_bytes(4, "big"))
    refused(img, vdisk.CorruptImageError, match="extra data")
    with open(img, "r+b") as f:
        f.seek(so + 36)
        f.write((16).to_bytes(4, "big"))
        f.seek(so + 8)
        f.write((5 * MiB).to_bytes(4, "big"))              # the snapshot's L1 size
    refused(img, vdisk.CorruptImageError, match="snapshot table entry 0's L1 table|over qemu's limit")


def test_header_extension_too_long(base):
    with open(base, "r+b") as f:
        f.seek(112)
        f.write((0x6803F857).to_bytes(4, "big") + (1 << 20).to_bytes(4, "big"))
    refused(base, vdisk.CorruptImageError, match="header extension")


# ---------------------------------------------------------------------------- truncation
def test_truncation_at_many_points(base, tmp_path):
    """Cut the file anywhere: refused cleanly, or (where the cut spares
    everything referenced) read exactly as before.  Never wrong data."""
    ref = open(to_raw(base, tmp_path / "ref.raw"), "rb").read()
    size = os.path.getsize(base)
    points = sorted({0, 1, 3, 4, 8, 71, 72, 100, 103, 104, 111, 112, 4095, 64 * KiB - 1, 64 * KiB, 64 * KiB + 8,
                     size - 1, size - 512} | set(range(0, size, 16 * KiB)))
    cut = tmp_path / "cut.qcow2"
    outcomes = {"refused": 0, "same": 0}
    for p in points:
        shutil.copyfile(base, cut)
        os.truncate(cut, p)
        out = tmp_path / "cut.vdk"
        try:
            vdisk.convert(cut, out, src_format="qcow2", overwrite=True)
        except vdisk.VdiskError:
            outcomes["refused"] += 1
            continue
        with vdisk.open(out) as d:
            assert d.pread(d.size, 0) == ref, f"truncated at {p}: converted to different content"
        outcomes["same"] += 1
    # every cut into a structure the image uses is refused: data ends the file
    assert outcomes["refused"] >= len(points) - 2, outcomes


# ---------------------------------------------------------------------------- bounded memory
MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import vdisk
    kind, src, dst = sys.argv[1:4]
    try:
        vdisk.convert(src, dst, src_format="qcow2", allow_backing=True)
        result = "ok"
    except vdisk.VdiskError as exc:
        result = type(exc).__name__
    with open("/proc/self/status") as f:
        hwm = [line for line in f if line.startswith("VmHWM")][0].split()[1]
    print(result, hwm)
""")


def _peak_kib(tmp_path, img) -> tuple[str, int]:
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    out = tmp_path / (os.path.basename(str(img)) + ".vdk")
    r = subprocess.run([sys.executable, str(script), "x", str(img), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result, hwm = r.stdout.split()
    return result, int(hwm)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_memory_bounded_decompression_bombs(tmp_path):
    """Sixteen 2 MiB clusters, each a deflate stream of 256 MiB: capped output, bounded memory."""
    img = make_qcow2(tmp_path / "bomb.qcow2", 32 * MiB, "cluster_size=2M", ["write -P 1 0 4k"])
    bomb = zlib.compressobj(9, zlib.DEFLATED, -12)
    data = bomb.compress(bytes(256 * MiB)) + bomb.flush()
    at = -(-os.path.getsize(img) // 512) * 512
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(data)
    nsect = -(-len(data) // 512) - 1
    l2 = l2_table_offset(img)
    for i in range(16):
        write_u64(img, l2 + 8 * i, COMPRESSED | (nsect << (62 - 13)) | at)
    result, peak = _peak_kib(tmp_path, img)
    assert result == "ok"
    assert peak < 200 * 1024, f"VmHWM {peak} KiB"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_memory_bounded_largest_l1_and_deep_chain(tmp_path):
    """The largest L1 table qemu allows (32 MiB: 512-byte clusters, 128 GiB),
    then a 16-deep chain of 2 MiB-cluster images: both in bounded memory."""
    img = make_qcow2(tmp_path / "big.qcow2", "128G", "cluster_size=512",
                     ["write -P 1 0 4k", "write -P 2 100G 4k"])
    assert read_header(img)["l1_size"] == 4 * MiB
    result, peak = _peak_kib(tmp_path, img)
    assert result == "ok" and peak < 200 * 1024, (result, peak)
    prev = None
    for i in range(16):
        prev = make_qcow2(tmp_path / f"d{i}.qcow2", 64 * MiB, "cluster_size=2M",
                          [f"write -P {i + 1} {i * 2}M 2M"],
                          backing=None if prev is None else os.path.basename(prev), backing_fmt="qcow2")
    result, peak = _peak_kib(tmp_path, prev)
    assert result == "ok" and peak < 200 * 1024, (result, peak)
