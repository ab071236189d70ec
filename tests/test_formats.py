"""Input formats as qemu-img sees them: foreign formats detected and refused,
qcow2 edge cases (sizes, zstd frames, backing files) read as qemu reads
them, and image_info / image_map beside qemu-img info / map.  qemu-img is
the oracle wherever it can make or read the image."""
from __future__ import annotations

import glob
import json
import os
import struct
import warnings

import numpy as np
import pytest

import vdisk
from click.testing import CliRunner

from vdisk import convert as C
from vdisk.cli import main
from helpers import pattern
from qemu_helpers import (KiB, MiB, compressible, l2_table_offset, make_qcow2, needs_qemu, patch_header, qemu_compare,
                          qemu_img, qemu_io, read_u64, to_raw, write_u64)

pytestmark = needs_qemu

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
    assert vdisk.compare(img, qraw) is None
