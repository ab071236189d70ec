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
from vdisk import convert as C
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
