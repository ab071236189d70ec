"""qemu-img / qemu-io helpers shared by the conversion and qcow2 tests."""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

HAVE_QEMU = bool(QEMU_IMG and QEMU_IO)
needs_qemu = pytest.mark.skipif(not HAVE_QEMU,
                                reason="qemu-img and qemu-io are not installed (apt-get install qemu-utils)")

KiB, MiB = 1 << 10, 1 << 20


PBKDF_FLAKE = "Unable to get accurate CPU usage"     # qemu's LUKS PBKDF timing probe, now and then on a VM


def qemu_img(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run qemu-img; a LUKS create whose PBKDF timing probe failed is run again (up to 8 times)."""
    for _attempt in range(8):
        r = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True, timeout=120)
        if r.returncode == 0 or PBKDF_FLAKE not in r.stderr:
            break
    if check:
        r.check_returncode()
    return r


def qemu_io(path, *commands: str, fmt: str = "qcow2") -> None:
    args = [QEMU_IO, "-f", fmt]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "error" not in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr


def make_qcow2(path, size, options: str = "", commands=(), backing=None, backing_fmt=None) -> str:
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    qemu_img(*args, path, size)
    if commands:
        qemu_io(path, *commands)
    return str(path)


def to_raw(image, raw, fmt: str | None = None) -> str:
    """qemu-img's own reading of an image, as a raw file."""
    args = ["convert"] + (["-f", fmt] if fmt else []) + ["-O", "raw", image, raw]
    qemu_img(*args)
    return str(raw)


def qemu_compare(a, b, fmt_a: str | None = None, fmt_b: str | None = None) -> subprocess.CompletedProcess:
    args = ["compare"] + (["-f", fmt_a] if fmt_a else []) + (["-F", fmt_b] if fmt_b else []) + [a, b]
    return qemu_img(*args, check=False)


def qemu_check(path) -> subprocess.CompletedProcess:
    return qemu_img("check", path, check=False)


@functools.lru_cache(maxsize=None)
def zstd_supported(tmpdir: str) -> bool:
    """qemu-img can create zstd-compressed images, and the zstandard package is there to read them."""
    if importlib.util.find_spec("zstandard") is None:
        return False
    probe = os.path.join(tmpdir, "zstd-probe.qcow2")
    ok = qemu_img("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", probe, "1M",
                  check=False).returncode == 0
    if os.path.exists(probe):
        os.unlink(probe)
    return ok


def compressible(seed: int, length: int) -> bytes:
    """Data that deflate shrinks (so qemu really stores compressed clusters) and never all-zero."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 4, length, dtype=np.uint8) * 17 + 65).astype(np.uint8).tobytes()


# ---------------------------------------------------------------------------- header surgery
HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
FIELDS = ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
          "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters",
          "nb_snapshots", "snapshots_offset")
V3_FIELDS = {"incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
             "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
             "compression_type": (104, ">B")}


def read_header(path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(112)
    h = dict(zip(FIELDS, HEADER.unpack_from(raw)))
    for name, (off, fmt) in V3_FIELDS.items():
        h[name] = struct.unpack_from(fmt, raw, off)[0]
    return h


def patch_header(path, **fields) -> None:
    """Overwrite header fields in place (by name, big-endian)."""
    offsets = {}
    pos = 0
    codes = ("4s", "I", "Q", "I", "I", "Q", "I", "I", "Q", "Q", "I", "I", "Q")
    for name, code in zip(FIELDS, codes):
        offsets[name] = (pos, ">" + code)
        pos += struct.calcsize(">" + code)
    offsets.update(V3_FIELDS)
    with open(path, "r+b") as f:
        for name, value in fields.items():
            off, fmt = offsets[name]
            f.seek(off)
            f.write(struct.pack(fmt, value))


def read_u64(path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def l1_entry_offset(path, index: int = 0) -> int:
    return read_header(path)["l1_table_offset"] + 8 * index


def l2_table_offset(path, l1_index: int = 0) -> int:
    return read_u64(path, l1_entry_offset(path, l1_index)) & 0x00FFFFFFFFFFFE00
