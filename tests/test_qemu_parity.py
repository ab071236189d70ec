"""vdisk map and vdisk info of raw and qcow2 images against qemu-img's own answers: the JSON
lists and objects compared exactly (vdisk's own keys beside qemu's named), the human output line
for line."""
from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

import vdisk
from vdisk.cli import main
from vdisk_testkit.helpers import pattern
from vdisk_testkit.qemu_helpers import KiB, MiB, compressible, make_qcow2, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu
VDISK_KEYS = {"data-bytes"}          # what vdisk info adds beside qemu-img's keys


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _mixed(t):
    """Data, zero clusters (write -z), discards, compressed clusters."""
    (t / "c.raw").write_bytes(compressible(3, 512 * KiB) + bytes(3584 * KiB))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", t / "c.raw", t / "img.qcow2")
    qemu_io(t / "img.qcow2", "write -P 1 1M 256k", "write -z 1088k 64k", "discard 1216k 64k", "write -P 2 3M 64k",
            "write -P 3 192k 64k")
    return t / "img.qcow2"


def _plain(t):
    return make_qcow2(t / "img.qcow2", 4 * MiB, "", ["write -P 7 0 1M", "write -P 8 2M 4k"])


def _snapshots(t):
    img = make_qcow2(t / "img.qcow2", 4 * MiB, "", ["write -P 1 0 256k", "write -z 256k 64k", "write -P 2 1M 128k"])
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 5 64k 64k", "discard 1M 64k")
    qemu_img("snapshot", "-c", "s2", img)
    qemu_io(img, "write -P 6 2M 64k")
    return img


def _extended_l2(t):
    return make_qcow2(t / "img.qcow2", 2 * MiB, "extended_l2=on,cluster_size=64k",
                      ["write -P 1 0 4k", "write -z 8k 4k", "write -P 2 64k 64k", "write -z 64k 2k"])


def _preallocated(t):
    return make_qcow2(t / "img.qcow2", 2 * MiB, "preallocation=metadata", ["write -P 1 0 4k", "write -P 2 1M 8k"])


def _small_clusters(t):
    """512-byte clusters written out of order: host offsets that run on, and that do not."""
    return make_qcow2(t / "img.qcow2", 2 * MiB, "cluster_size=512",
                      ["write -P 1 64k 64k", "write -P 2 0 32k", "write -P 3 32k 32k", "write -z 40k 1k"])


def _after_convert_n(t):
    img = make_qcow2(t / "img.qcow2", 4 * MiB, "cluster_size=4k", ["write -P 9 0 4M"])
    src = t / "s.raw"
    src.write_bytes(pattern(1, 256 * KiB) + bytes(256 * KiB) + pattern(2, MiB))
    vdisk.convert(src, img, src_format="raw", dst_format="qcow2", existing=True)
    return img


def _vdisk_written(t):
    src = t / "s.raw"
    src.write_bytes(pattern(1, 256 * KiB) + bytes(256 * KiB) + pattern(2, 512 * KiB))
    vdisk.convert(src, t / "img.qcow2", src_format="raw", dst_format="qcow2")
    return t / "img.qcow2"


def _version2(t):
    return make_qcow2(t / "img.qcow2", MiB, "compat=0.10", ["write -P 1 0 64k"])


def _lazy(t):
    return make_qcow2(t / "img.qcow2", MiB, "lazy_refcounts=on,refcount_bits=64", ["write -P 1 0 64k"])


def _raw(t):
    with open(t / "img.raw", "wb") as f:
        f.truncate(3 * MiB)
        f.seek(MiB)
        f.write(pattern(1, 128 * KiB))
    return t / "img.raw"


IMAGES = {"mixed": _mixed, "plain": _plain, "snapshots": _snapshots, "extended_l2": _extended_l2,
          "preallocated": _preallocated, "small_clusters": _small_clusters, "after_convert_n": _after_convert_n,
          "vdisk_written": _vdisk_written, "version2": _version2, "lazy": _lazy, "raw": _raw}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_map_and_info_are_qemu_img_s(tmp_path, kind):
    """vdisk map --output json is qemu-img map --output=json (host offsets, merged only where they run
    on), the human map is qemu-img map's, vdisk info --output json holds every key of qemu-img info
    --output=json with its value (format-specific included) and the human info is qemu-img info's."""
    img = str(IMAGES[kind](tmp_path))
    fmt = "raw" if kind == "raw" else "qcow2"
    ours = run_cli("map", "-f", fmt, "--output", "json", img)
    assert ours.exit_code == 0, ours.output
    theirs = json.loads(qemu_img("map", "-f", fmt, "--output=json", img).stdout)
    assert json.loads(ours.stdout) == theirs
    ours = run_cli("map", "-f", fmt, img)
    theirs = subprocess.run(["qemu-img", "map", "-f", fmt, img], capture_output=True, text=True)
    if theirs.returncode:                       # compressed clusters: qemu-img refuses the human map
        assert "compressed clusters" in theirs.stderr and ours.exit_code == 1 and "compressed" in ours.stderr
    else:
        assert ours.exit_code == 0 and ours.stdout == theirs.stdout
    ours = run_cli("info", "-f", fmt, "--output", "json", img)
    assert ours.exit_code == 0, ours.output
    ours_info = json.loads(ours.stdout)
    theirs_info = json.loads(qemu_img("info", "-f", fmt, "--output=json", img).stdout)
    assert {k: ours_info.get(k) for k in theirs_info} == theirs_info
    assert set(ours_info) - set(theirs_info) <= VDISK_KEYS
    ours = run_cli("info", "-f", fmt, img)
    assert ours.exit_code == 0 and ours.stdout == qemu_img("info", "-f", fmt, img).stdout
