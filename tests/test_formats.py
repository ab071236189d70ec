"""Input formats as qemu-img sees them: foreign formats detected and refused,
qcow2 edge cases (sizes, zstd frames, backing files) read as qemu reads
them, and image_info / image_map beside qemu-img info / map.  qemu-img is
the oracle wherever it can make or read the image."""
from __future__ import annotations

import glob
import importlib
import json
import os
import struct
import subprocess
import warnings

import numpy as np
import pytest

import vdisk
from click.testing import CliRunner

from vdisk.cli import main
from vdisk_testkit.helpers import pattern
from vdisk_testkit.qemu_helpers import (QEMU_IO, KiB, MiB, compressible, l2_table_offset, make_qcow2,
                                        needs_qemu, patch_header, qemu_compare, qemu_img, qemu_io, read_u64,
                                        to_raw, write_u64)

pytestmark = needs_qemu

C = importlib.import_module("vdisk.convert")     # the module: vdisk.convert is the function

COMPRESSED = 1 << 62


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def vdisk_bytes(path) -> bytes:
    with vdisk.open(path) as d:
        return d.pread(d.size, 0)


def no_leftovers(folder) -> bool:
    return not glob.glob(os.path.join(str(folder), ".*.converting"))


def qemu_reads(path, fmt=None) -> bool:
    """Whether qemu-img can read the whole image (convert it to raw)."""
    out = str(path) + ".qemu.raw"
    r = qemu_img("convert", *(["-f", fmt] if fmt else []), "-O", "raw", path, out, check=False)
    if os.path.exists(out):
        os.unlink(out)
    return r.returncode == 0


# ---------------------------------------------------------------------------- zstd clusters
zstandard = pytest.importorskip("zstandard")


def _zstd_image(tmp_path, cluster=64 * KiB):
    """A qemu-made zstd image, 1 MiB: every cluster compressed."""
    raw = tmp_path / "z.raw"
    raw.write_bytes(compressible(5, MiB))
    img = tmp_path / "z.qcow2"
    r = qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compression_type=zstd,cluster_size={cluster}", raw, img, check=False)
    if r.returncode:
        pytest.skip("qemu-img without zstd")
    return str(img), str(raw)


def _point_at(img, data: bytes, index: int = 0, cluster_bits: int = 16, sectors: int | None = None) -> None:
    """Append data at the next sector of img and make L2 entry index a compressed cluster of it."""
    at = -(-os.path.getsize(img) // 512) * 512
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(data)
    nsect = (-(-len(data) // 512) if sectors is None else sectors) - 1
    write_u64(img, l2_table_offset(img) + 8 * index, COMPRESSED | (nsect << (62 - (cluster_bits - 8))) | at)


@pytest.mark.parametrize("content_size", [True, False])
def test_zstd_cluster_that_decompresses_to_more_than_a_cluster(tmp_path, content_size):
    """qemu refuses (EIO: the frame still has output); so does vdisk, naming the cluster."""
    img, _raw = _zstd_image(tmp_path)
    cctx = zstandard.ZstdCompressor(write_content_size=content_size)
    _point_at(img, cctx.compress(compressible(9, 64 * KiB + 4 * KiB)))
    assert not qemu_reads(img)
    with pytest.raises(vdisk.CorruptImageError, match=r"guest offset 0x0\).*more than one cluster"):
        vdisk.convert(img, tmp_path / "out.vdk")
    assert not os.path.exists(tmp_path / "out.vdk") and no_leftovers(tmp_path)


def test_zstd_frame_cut_short(tmp_path):
    """The descriptor's sectors end inside the frame: qemu and vdisk refuse."""
    img, _raw = _zstd_image(tmp_path)
    frame = zstandard.ZstdCompressor().compress(pattern(3, 64 * KiB))     # incompressible: ~64 KiB
    _point_at(img, frame, sectors=len(frame) // 512 - 1)
    assert not qemu_reads(img)
    with pytest.raises(vdisk.CorruptImageError, match="cut short"):
        vdisk.convert(img, tmp_path / "out.vdk")


def test_zstd_cluster_in_two_frames_reads_as_qemu(tmp_path):
    """Two frames of half a cluster each: qemu decodes on into the second frame; so does vdisk."""
    img, _raw = _zstd_image(tmp_path)
    half = 32 * KiB
    body = compressible(11, 2 * half)
    cctx = zstandard.ZstdCompressor()
    _point_at(img, cctx.compress(body[:half]) + cctx.compress(body[half:]))
    assert qemu_reads(img)
    expect = file_bytes(to_raw(img, tmp_path / "q.raw"))
    assert expect[:2 * half] == body
    vdisk.convert(img, tmp_path / "out.vdk")
    assert vdisk_bytes(tmp_path / "out.vdk") == expect


def _frame_of_raw_blocks(body: bytes, empty_blocks: int) -> bytes:
    """A zstd frame (no content size, 1 MiB window): empty raw blocks, then body as the last raw block."""
    return (struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x50]) + bytes(3) * empty_blocks
            + (1 | len(body) << 3).to_bytes(3, "little") + body)


@pytest.mark.parametrize("empty", [100, 200])
def test_zstd_blocks_per_cluster_are_capped(tmp_path, empty):
    """At most one zstd block per 512 bytes of the cluster, plus 16 (144 for
    64 KiB; ours, qemu has no cap): 100 empty blocks before the data read as
    qemu reads them, 200 are refused, in microseconds (a hostile stream of
    4 MiB of empty blocks took 0.47 s a cluster to walk without the cap)."""
    img, _raw = _zstd_image(tmp_path)
    body = compressible(13, 64 * KiB)
    _point_at(img, _frame_of_raw_blocks(body, empty))
    assert qemu_reads(img)
    if empty > 144:
        with pytest.raises(vdisk.CorruptImageError, match="too many blocks"):
            vdisk.convert(img, tmp_path / "out.vdk")
        return
    vdisk.convert(img, tmp_path / "out.vdk")
    assert vdisk_bytes(tmp_path / "out.vdk") == file_bytes(to_raw(img, tmp_path / "q.raw"))
    assert vdisk_bytes(tmp_path / "out.vdk")[:64 * KiB] == body


def test_zstd_descriptor_covering_the_next_frame(tmp_path):
    """A descriptor whose sectors also hold the next cluster's frame (qemu packs
    compressed clusters back to back): the bytes after the frame are not parsed."""
    img, raw = _zstd_image(tmp_path)
    entry = read_u64(img, l2_table_offset(img))
    write_u64(img, l2_table_offset(img), entry | (0xFF << (62 - 8)))     # 256 sectors: far past the frame
    assert qemu_reads(img)
    vdisk.convert(img, tmp_path / "out.vdk")
    assert vdisk_bytes(tmp_path / "out.vdk") == file_bytes(raw)


# ---------------------------------------------------------------------------- virtual size
def test_qcow2_size_not_a_multiple_of_512_is_rounded_down_as_qemu(tmp_path):
    """A header size of 1 MiB + 100 with data in the tail: qemu shows 1 MiB
    (bs->total_sectors = header.size / 512), and so does vdisk; vdisk compare
    agrees with qemu-img compare on the same pair."""
    img = make_qcow2(tmp_path / "odd.qcow2", 2 * MiB, "cluster_size=64k",
                     ["write -P 0x61 0 64k", "write -P 0x55 1M 64k"])
    patch_header(img, size=MiB + 100)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == MiB
    qraw = to_raw(img, tmp_path / "q.raw")
    assert os.path.getsize(qraw) == MiB
    vdisk.convert(img, tmp_path / "odd.vdk")
    assert vdisk_bytes(tmp_path / "odd.vdk") == file_bytes(qraw)
    vdisk.convert(img, tmp_path / "odd.raw", dst_format="raw")
    assert file_bytes(tmp_path / "odd.raw") == file_bytes(qraw)
    # vdisk compare says what qemu-img compare says, pair by pair (exit code and output)
    tail = tmp_path / "tail.raw"              # the 100 bytes qemu never shows, as a raw file shows them
    tail.write_bytes(file_bytes(qraw) + b"\x55" * 100)
    diff = tmp_path / "diff.raw"              # one byte off in the last visible sector
    diff.write_bytes(file_bytes(qraw)[:-1] + b"\x00")
    for other in (qraw, tail, diff):
        q = qemu_compare(img, other, "qcow2", "raw")
        v = CliRunner().invoke(main, ["compare", "-f", "qcow2", "-F", "raw", img, str(other)])
        assert (v.exit_code, v.output) == (q.returncode, q.stdout), other
    assert vdisk.compare(img, qraw, b_format="raw") is None


# ---------------------------------------------------------------------------- foreign formats
def _qemu_create(tmp_path, fmt, name, options=(), extra=()):
    path = tmp_path / name
    args = ["create", "-q", *extra, "-f", fmt]
    for o in options:
        args += ["-o", o]
    r = qemu_img(*args, path, "4M", check=False)      # (it retries luks's flaky PBKDF timing probe)
    assert r.returncode == 0, f"qemu-img create -f {fmt}: {r.stderr}"
    return str(path)


QEMU_MADE = [
    ("vmdk", "a.vmdk", (), ()),                                     # monolithicSparse: KDMV
    ("vmdk", "flat.vmdk", ("subformat=monolithicFlat",), ()),        # a descriptor + flat.vmdk's -flat extent
    ("vpc", "a.vhd", (), ()),                                        # dynamic: the footer copy at 0
    ("vhdx", "a.vhdx", (), ()),
    ("vdi", "a.vdi", (), ()),
    ("qed", "a.qed", (), ()),
    ("luks", "a.luks", ("key-secret=s0",), ("--object", "secret,id=s0,data=x")),
    ("parallels", "a.hds", (), ()),
]


@pytest.mark.parametrize("fmt,name,options,extra", QEMU_MADE, ids=[n for _f, n, _o, _e in QEMU_MADE])
def test_foreign_formats_made_by_qemu_img_are_refused(tmp_path, fmt, name, options, extra):
    """qemu-img's own probe names the format; vdisk refuses it by that name,
    with the way out, and reads the bytes only when told src_format='raw'."""
    img = _qemu_create(tmp_path, fmt, name, options, extra)
    info = qemu_img("info", "--output=json", img, check=False)
    if fmt != "luks":                      # qemu-img info of luks needs the secret; the probe is in the error
        assert json.loads(info.stdout)["format"] == fmt
    assert C.detect_format(img) == fmt
    with pytest.raises(vdisk.UnsupportedFeatureError) as exc:
        vdisk.convert(img, tmp_path / "out.vdk")
    msg = str(exc.value)
    assert f"(format {fmt})" in msg and f"qemu-img convert -f {fmt} -O qcow2" in msg and "src_format='raw'" in msg
    assert not os.path.exists(tmp_path / "out.vdk") and no_leftovers(tmp_path)
    with pytest.raises(vdisk.UnsupportedFeatureError, match=fmt):
        vdisk.compare(img, img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # an explicit format: no probe, no warning
        vdisk.convert(img, tmp_path / "bytes.vdk", src_format="raw")
    assert vdisk_bytes(tmp_path / "bytes.vdk")[:os.path.getsize(img)] == file_bytes(img)


def test_vmdk_flat_extent_and_fixed_vhd(tmp_path):
    """A monolithicFlat VMDK's extent is plain data (qemu probes it raw, and
    so does vdisk, with qemu-img's warning); a fixed VHD is known by its
    footer at the end (qemu probes it raw: vdisk refuses, naming vpc)."""
    _qemu_create(tmp_path, "vmdk", "flat.vmdk", ("subformat=monolithicFlat",))
    extent = tmp_path / "flat-flat.vmdk"
    with pytest.warns(C.RawProbeWarning, match=r"Image format was not specified for '.*flat-flat.vmdk' and "
                                               r"probing guessed raw\."):
        vdisk.convert(extent, tmp_path / "extent.vdk")
    fixed = _qemu_create(tmp_path, "vpc", "fixed.vhd", ("subformat=fixed",))
    assert file_bytes(fixed)[-512:].startswith(b"conectix")
    assert C.detect_format(fixed) == "vpc"
    with pytest.raises(vdisk.UnsupportedFeatureError, match=r"fixed VHD .*\(format vpc\)"):
        vdisk.convert(fixed, tmp_path / "out.vdk")


def _bochs_header() -> bytes:
    h = bytearray(512)
    h[0:23] = b"Bochs Virtual HD Image\0"
    h[32:40] = b"Redolog\0"
    h[48:56] = b"Growing\0"
    struct.pack_into("<IIIIIIQ", h, 64, 0x00020000, 512, 64, 1, 64 * KiB, 0, 4 * MiB)
    return bytes(h) + b"\xff" * (64 * 4)


def _cloop_image() -> bytes:
    import zlib
    magic = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
    block = zlib.compress(b"\x42" * 512)
    head = magic.ljust(128, b"\0") + struct.pack(">II", 512, 1)
    first = len(head) + 16
    return head + struct.pack(">QQ", first, first + len(block)) + block


def _dmg_image() -> bytes:
    trailer = bytearray(512)
    trailer[0:4] = b"koly"
    return bytes(64 * KiB) + bytes(trailer)


@pytest.mark.parametrize("fmt,make", [("bochs", _bochs_header), ("cloop", _cloop_image), ("dmg", _dmg_image)])
def test_crafted_foreign_magic_is_refused(tmp_path, fmt, make):
    """Formats qemu-img cannot create, made by their bytes (bochs: qemu-img info agrees)."""
    img = tmp_path / f"x.{fmt}"
    img.write_bytes(make())
    if fmt in ("bochs", "cloop"):
        assert json.loads(qemu_img("info", "--output=json", img).stdout)["format"] == fmt
    assert C.detect_format(img) == fmt
    with pytest.raises(vdisk.UnsupportedFeatureError, match=rf"\(format {fmt}\).*qemu-img convert -f {fmt}"):
        vdisk.convert(img, tmp_path / "out.vdk")


def test_raw_probe_warns_as_qemu_img(tmp_path):
    """An unrecognised file is read as raw with qemu-img's warning text; an
    explicit src_format='raw' gives no warning (as qemu-img -f raw)."""
    raw = tmp_path / "plain.img"
    raw.write_bytes(pattern(1, 64 * KiB))
    # qemu's block layer says it when it probes raw for a writable open (qemu-io opens read-write)
    q = subprocess.run([QEMU_IO, "-c", "read 0 512", str(raw)], capture_output=True, text=True, timeout=60)
    assert f"WARNING: Image format was not specified for '{raw}' and probing guessed raw." in q.stdout + q.stderr
    with pytest.warns(C.RawProbeWarning) as got:
        vdisk.convert(raw, tmp_path / "a.vdk")
    assert [str(w.message) for w in got] == [f"Image format was not specified for '{raw}' and probing guessed raw."]
    assert issubclass(C.RawProbeWarning, vdisk.errors.VdiskWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vdisk.convert(raw, tmp_path / "b.vdk", src_format="raw")


# ---------------------------------------------------------------------------- backing files as qemu opens them
def _set_backing(path, name: bytes, offset: int = 2048) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(name)
    patch_header(path, backing_file_offset=offset, backing_file_size=len(name))


def _drop_backing_format(path) -> None:
    """Turn the backing format extension into an unknown one (qemu ignores unknown extensions)."""
    with open(path, "r+b") as f:
        data = f.read(4096)
        at = data.index(struct.pack(">I", 0xE2792ACA))
        f.seek(at)
        f.write(struct.pack(">I", 0x12345678))


@pytest.mark.parametrize("name", [b"base.qcow2/", b"base.qcow2/.", b"b_x:base.qcow2", b"1:base.qcow2"])
def test_backing_names_qemu_refuses(tmp_path, name):
    """A trailing '/' (or '/.') and a ':' before any '/' (qemu: a protocol
    name) make qemu refuse the backing file; vdisk refuses them too, even
    when a file of that literal name exists."""
    make_qcow2(tmp_path / "base.qcow2", MiB, "", ["write -P 0x33 0 64k"])
    if b":" in name:
        make_qcow2(tmp_path / name.decode(), MiB, "", ["write -P 0x33 0 64k"])
    top = make_qcow2(tmp_path / "top.qcow2", MiB)
    _set_backing(top, name)
    assert not qemu_reads(top)
    with pytest.raises(vdisk.VdiskError, match="protocol|ends with '/'|Not a directory"):
        vdisk.convert(top, tmp_path / "out.vdk", allow_backing=True)
    assert no_leftovers(tmp_path)


def test_colon_after_a_slash_is_a_file_name(tmp_path):
    """'./b:x.qcow2' has its ':' after a '/': a file name for qemu and for vdisk."""
    make_qcow2(tmp_path / "b:x.qcow2", MiB, "", ["write -P 0x33 0 64k"])
    top = make_qcow2(tmp_path / "top.qcow2", MiB)
    _set_backing(top, b"./b:x.qcow2")
    assert qemu_reads(top)
    vdisk.convert(top, tmp_path / "out.vdk", allow_backing=True)
    assert vdisk_bytes(tmp_path / "out.vdk") == file_bytes(to_raw(top, tmp_path / "q.raw"))


def test_vdisk_backing_file_without_a_backing_format(tmp_path):
    """qemu probes a vdisk backing file as raw (it does not know vdisk):
    without a backing format extension vdisk refuses rather than read it
    otherwise than qemu; with 'raw' recorded both read its bytes; given by
    path (--backing) the caller's vdisk image is read as vdisk."""
    with vdisk.create(tmp_path / "base.vdk", 4 * MiB) as d:
        d.pwrite(b"\x77" * (64 * KiB), 0)
    top = make_qcow2(tmp_path / "top.qcow2", 4 * MiB, "", (), backing="base.vdk", backing_fmt="raw")
    qemu_io(top, "write -P 0x11 1M 64k")
    # 'raw' recorded: the bytes of the vdisk file, as qemu reads them
    expect = file_bytes(to_raw(top, tmp_path / "q.raw"))
    assert expect[:4] == file_bytes(tmp_path / "base.vdk")[:4]
    vdisk.convert(top, tmp_path / "raw-backed.vdk", allow_backing=True)
    assert vdisk_bytes(tmp_path / "raw-backed.vdk") == expect
    # no backing format: qemu probes raw (the same bytes); vdisk refuses
    _drop_backing_format(top)
    assert file_bytes(to_raw(top, tmp_path / "q2.raw")) == expect
    with pytest.raises(vdisk.UnsupportedFeatureError, match="vdisk image, but the overlay records no backing format"):
        vdisk.convert(top, tmp_path / "out.vdk", allow_backing=True)
    # the caller's choice: read as vdisk
    vdisk.convert(top, tmp_path / "chosen.vdk", allow_backing=str(tmp_path / "base.vdk"))
    got = vdisk_bytes(tmp_path / "chosen.vdk")
    assert got[:64 * KiB] == b"\x77" * (64 * KiB) and got[MiB:MiB + 64 * KiB] == b"\x11" * (64 * KiB)


def test_qcow2_reader_without_an_opener_refuses_backing_files(tmp_path):
    """vdisk.qcow2 opens no backing file by itself (the opener is injected; it imports nothing above it)."""
    from vdisk import qcow2 as Q
    make_qcow2(tmp_path / "b.qcow2", MiB)
    top = make_qcow2(tmp_path / "t.qcow2", MiB, "", (), backing="b.qcow2", backing_fmt="qcow2")
    with pytest.raises(vdisk.UnsupportedFeatureError, match="no way to open one"):
        Q.Qcow2Image(top, allow_backing=True)
    src = open(Q.__file__).read()
    assert "from .convert" not in src and "import convert" not in src


# ---------------------------------------------------------------------------- info and map, beside qemu-img's
def _qemu_map(path, fmt) -> list[tuple[int, int, bool]]:
    """qemu-img map --output=json as merged (start, length, data) runs."""
    runs: list[list] = []
    for e in json.loads(qemu_img("map", "-f", fmt, "--output=json", path).stdout):
        if runs and runs[-1][2] == e["data"] and runs[-1][0] + runs[-1][1] == e["start"]:
            runs[-1][1] += e["length"]
        else:
            runs.append([e["start"], e["length"], e["data"]])
    return [tuple(r) for r in runs]


def _our_map(path, fmt=None):
    got = C.image_map(path, fmt)
    assert all(e["zero"] is (not e["data"]) for e in got)
    assert sum(e["length"] for e in got) == C.image_info(path, fmt)["virtual_size"]
    return [(e["start"], e["length"], e["data"]) for e in got]


@pytest.mark.parametrize("options", ["cluster_size=64k", "cluster_size=4k,compression_type=zlib",
                                     "cluster_size=64k,extended_l2=on"])
def test_qcow2_info_and_map_agree_with_qemu_img(tmp_path, options):
    img = make_qcow2(tmp_path / "i.qcow2", 8 * MiB, options,
                     ["write -P 0x61 0 128k", "write -z 1M 64k", "write -P 0x62 3M 64k", "write -c -P 0x63 6M 64k"])
    q = json.loads(qemu_img("info", "-f", "qcow2", "--output=json", img).stdout)
    info = C.image_info(img)
    assert (info["format"], info["virtual_size"], info["actual_size"], info["cluster_size"]) == \
        (q["format"], q["virtual-size"], q["actual-size"], q["cluster-size"])
    assert info["qcow2"]["version"] == 3 and info["qcow2"]["extended_l2"] == ("extended_l2=on" in options)
    assert _our_map(img) == _qemu_map(img, "qcow2")
    assert info["data_bytes"] == sum(n for _o, n, d in _qemu_map(img, "qcow2") if d)
    # a partly written new cluster: qemu leaves the rest a host hole, which vdisk maps as zeros
    # (qemu-img map says data): vdisk's map is a refinement of qemu's, never more data
    qemu_io(img, "write -P 0x64 7M 16k")
    content = np.frombuffer(file_bytes(to_raw(img, tmp_path / "q.raw")), dtype=np.uint8)
    ours = np.zeros(len(content), dtype=bool)
    for o, n, d in _our_map(img):
        ours[o:o + n] = d
    theirs = np.zeros(len(content), dtype=bool)
    for o, n, d in _qemu_map(img, "qcow2"):
        theirs[o:o + n] = d
    assert not (ours & ~theirs).any()
    assert not content[theirs & ~ours].any()
    assert ours[7 * MiB:7 * MiB + 16 * KiB].all()


def test_raw_and_vdisk_info_and_map(tmp_path):
    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(pattern(4, 256 * KiB))
        f.seek(5 * MiB)
        f.write(pattern(5, 64 * KiB))
    q = json.loads(qemu_img("info", "-f", "raw", "--output=json", raw).stdout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # info and map name the format: no probe warning
        info = C.image_info(raw)
        assert (info["format"], info["virtual_size"], info["actual_size"], info["cluster_size"]) == \
            ("raw", q["virtual-size"], q["actual-size"], None)
        assert _our_map(raw) == _qemu_map(raw, "raw")
    vdisk.convert(raw, tmp_path / "s.vdk", src_format="raw")
    info = C.image_info(tmp_path / "s.vdk")
    assert (info["format"], info["virtual_size"], info["cluster_size"]) == ("vdisk", 8 * MiB, 64 * KiB)
    assert info["actual_size"] == os.stat(tmp_path / "s.vdk").st_blocks * 512
    assert _our_map(tmp_path / "s.vdk") == [(0, MiB, False), (MiB, 256 * KiB, True), (MiB + 256 * KiB,
                                            4 * MiB - 256 * KiB, False), (5 * MiB, 64 * KiB, True),
                                            (5 * MiB + 64 * KiB, 3 * MiB - 64 * KiB, False)]
    with pytest.raises(vdisk.UnsupportedFeatureError, match="vmdk"):
        C.image_info(_qemu_create(tmp_path, "vmdk", "x.vmdk"))


def test_qcow2_and_vdisk_are_never_taken_for_a_foreign_format(tmp_path):
    """qcow2's magic and vdisk's first slot win over a foreign trailer (a
    koly or conectix last sector) and over vdi's signature at offset 64."""
    img = make_qcow2(tmp_path / "a.qcow2", MiB)
    with vdisk.create(tmp_path / "a.vdk", MiB):
        pass
    for path in (img, str(tmp_path / "a.vdk")):
        fmt = C.detect_format(path)
        for patch in ((64, b"\x7f\x10\xda\xbe"), (-512, b"koly"), (-512, b"conectix")):
            copy = tmp_path / "copy"
            data = bytearray(file_bytes(path)) + bytes(1024)
            at = patch[0] % len(data)
            data[at:at + len(patch[1])] = patch[1]
            copy.write_bytes(data)
            assert C.detect_format(copy) == fmt, patch
