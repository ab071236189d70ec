"""Fuzz target (b): the qcow2 reader (vdisk/qcow2/reader.py) on hostile images.

One input is one qcow2 file.  It is opened with :class:`vdisk.qcow2.Qcow2Image`,
its extents listed, a few windows read (``readinto`` and ``readv``, which
decompresses), and with the CONVERT flag converted to a raw file with
:func:`vdisk.convert`.  Only VdiskError may escape.

Input encoding::

    byte 0      flags: ALLOW_BACKING (follow a backing file inside the
                scratch folder, where base.raw and base.qcow2 exist), CONVERT
    bytes 1..   the qcow2 file

Seeds are small images made by qemu-img and qemu-io (:func:`build_seeds`;
copies are kept in tests/fuzz_regressions/qcow2/ so the tests need no qemu).
"""
from __future__ import annotations

import itertools
import os
import random
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

import vdisk
from vdisk import qcow2 as Q
from vdisk.fileio import FileIO
from vdisk.convert import open_backing  # how vdisk.convert opens backing files

from vdisk_testkit.fuzz.common import INTERESTING, KiB, MiB, guard, havoc, put_int, remove, scratch_path, write_sparse

NAME = "qcow2"
ALLOW_BACKING = 1 << 0
CONVERT = 1 << 1
MAX_READ = 1 * MiB
MAX_CONVERT = 64 * MiB          # convert only images up to this virtual size (the copy is the cost)
MAX_EXTENTS = 4096

# header fields: name -> (offset, struct code), big-endian (docs/interop/qcow2.txt)
HEADER_FIELDS = {
    "magic": (0, "4s"), "version": (4, "I"), "backing_file_offset": (8, "Q"), "backing_file_size": (16, "I"),
    "cluster_bits": (20, "I"), "size": (24, "Q"), "crypt_method": (32, "I"), "l1_size": (36, "I"),
    "l1_table_offset": (40, "Q"), "refcount_table_offset": (48, "Q"), "refcount_table_clusters": (56, "I"),
    "nb_snapshots": (60, "I"), "snapshots_offset": (64, "Q"), "incompatible_features": (72, "Q"),
    "compatible_features": (80, "Q"), "autoclear_features": (88, "Q"), "refcount_order": (96, "I"),
    "header_length": (100, "I"), "compression_type": (104, "B"),
}


# ---------------------------------------------------------------------------- one input
def _backing_files() -> None:
    """base.raw and base.qcow2 in the scratch folder: what a fuzzed backing name can reach."""
    raw = scratch_path("base.raw")
    if not os.path.exists(raw):
        with open(raw, "wb") as f:
            f.write(random.Random(7).randbytes(16 * KiB))
    qc = scratch_path("base.qcow2")
    if not os.path.exists(qc):
        with open(qc, "wb") as f:
            f.write(_minimal_qcow2(16 * KiB))


def _minimal_qcow2(size: int) -> bytes:
    """An empty version 3 image of 512-byte clusters, written by vdisk's own writer."""
    path = scratch_path("minimal.tmp")
    out = FileIO(path, writable=True, create=True, overwrite=True)
    try:
        w = Q.Qcow2Writer(out, size, cluster_size=512)
        w.write(memoryview(b"\x5a" * 512), 0)
        w.finish()
        with open(path, "rb") as f:
            return f.read()
    finally:
        out.close()
        remove(path)


def read_windows(size: int, extents) -> list[tuple[int, int]]:
    if size <= MAX_READ:
        return [(0, size)] if size else []
    out = [(0, 256 * KiB), (size - 64 * KiB, 64 * KiB), (size // 2 // 512 * 512, 64 * KiB), (size - 1, 1)]
    for off, length, data in (extents or [])[:32]:
        if data:
            out.append((off, min(length, 64 * KiB, size - off)))
    return out


def exercise(path: str, allow_backing: bool) -> int | None:
    """Open, list, read; returns the virtual size (None if refused)."""
    img = guard(Q.Qcow2Image, path, allow_backing=allow_backing, open_backing=open_backing)
    if img is None:
        return None
    try:
        guard(img.info)
        size = img.size
        ext = guard(lambda: list(itertools.islice(img.extents(), MAX_EXTENTS)))
        windows = read_windows(size, ext)
        for off, n in windows:
            buf = bytearray(n)
            guard(img.readinto, buf, off)
        if len(windows) > 1:            # several pieces at once: the parallel decompression path
            guard(img.readv, [(np.empty(n, np.uint8), off) for off, n in windows[:8]])
        return size
    finally:
        img.close()


def one_input(data: bytes) -> None:
    flags = data[0] if data else 0
    path = scratch_path("fuzz.qcow2")
    write_sparse(path, data[1:])
    out = scratch_path("fuzz-out.raw")
    try:
        if flags & ALLOW_BACKING:
            _backing_files()
        size = exercise(path, bool(flags & ALLOW_BACKING))
        if flags & CONVERT and size is not None and size <= MAX_CONVERT:
            guard(vdisk.convert, path, out, src_format="qcow2", dst_format="raw",
                  allow_backing=bool(flags & ALLOW_BACKING), overwrite=True)
    finally:
        remove(path, out)


# ---------------------------------------------------------------------------- seeds
SEED_RECIPES = [
    # name, size, create options, qemu-io commands
    ("v3-512", "64K", "cluster_size=512",
     ["write -P 0x61 0 1k", "write -z 4k 1k", "write -P 0x62 60k 512", "discard 0 512"]),
    ("v2-1k", "64K", "compat=0.10,cluster_size=1k", ["write -P 0x31 1k 3k", "write -P 0x32 40k 1k"]),
    ("zlib-1k", "64K", "cluster_size=1k", ["write -c -P 0x41 0 1k", "write -c -P 0x42 2k 1k", "write -P 9 16k 1k"]),
    ("zstd-1k", "64K", "cluster_size=1k,compression_type=zstd", ["write -c -P 0x41 0 1k", "write -c -P 0x43 3k 1k"]),
    ("extl2-16k", "128K", "cluster_size=16k,extended_l2=on",
     ["write -P 1 0 2k", "write -z 4k 2k", "write -P 3 100k 1k"]),
    ("refcount64-512", "32K", "cluster_size=512,refcount_bits=64", ["write -P 5 0 2k"]),
    ("refcount1-512", "32K", "cluster_size=512,refcount_bits=1", ["write -P 6 512 1k"]),
]


def _qemu(*args) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def build_seed_files(directory: str) -> dict[str, bytes]:
    """Seed images made by qemu-img/qemu-io (needs qemu-utils)."""
    out = {}
    for name, size, opts, cmds in SEED_RECIPES:
        p = os.path.join(directory, name + ".qcow2")
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, size)
        if cmds:
            _qemu("qemu-io", "-f", "qcow2", *itertools.chain.from_iterable(("-c", c) for c in cmds), p)
        out[name] = Path(p).read_bytes()
    # an internal snapshot, then more writes
    p = os.path.join(directory, "snap.qcow2")
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "32K")
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1k", p)
    _qemu("qemu-img", "snapshot", "-c", "one", p)
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 8 512 1k", p)
    out["snap-512"] = Path(p).read_bytes()
    # a backing file named relative to the image (reachable with ALLOW_BACKING: base.raw, base.qcow2)
    for fmt in ("raw", "qcow2"):
        base = os.path.join(directory, "base." + fmt)
        if fmt == "raw":
            with open(base, "wb") as f:
                f.write(bytes(16 * KiB))
        else:
            _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", base, "16K")
        p = os.path.join(directory, f"backing-{fmt}.qcow2")
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base." + fmt,
              "-F", fmt, p, "16K")
        _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 4 1k 1k", p)
        out[f"backing-{fmt}"] = Path(p).read_bytes()
    return out


def build_seeds(directory: str | None = None) -> dict[str, bytes]:
    """Encoded seed inputs by name: qemu-made images when qemu-img is there,
    else the copies kept under tests/fuzz_regressions/qcow2/."""
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            files = build_seed_files(tmp)
    else:
        files = {}
        kept = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "tests", "fuzz_regressions", "qcow2")
        for name in sorted(os.listdir(kept)) if os.path.isdir(kept) else []:
            if name.startswith("seed-"):
                with open(os.path.join(kept, name), "rb") as f:
                    files[name[5:].rsplit(".", 1)[0]] = f.read()[1:]
    seeds = {}
    for name, raw in files.items():
        flags = ALLOW_BACKING if name.startswith("backing") else 0
        seeds[name] = bytes([flags | CONVERT]) + raw
    return seeds


# ---------------------------------------------------------------------------- a structure-aware mutator
def _u64(buf, at: int) -> int:
    return struct.unpack_from(">Q", buf, at)[0] if 0 <= at and at + 8 <= len(buf) else 0


def _field(buf, name: str) -> int:
    off, code = HEADER_FIELDS[name]
    if off + struct.calcsize(">" + code) > len(buf) or code == "4s":
        return 0
    return struct.unpack_from(">" + code, buf, off)[0]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A damaged variant of data, aimed at the header, the tables and the descriptors."""
    if len(data) < 2:
        return havoc(data, rng)
    flags, img = data[0], bytearray(data[1:])
    cbits = _field(img, "cluster_bits")
    C = 1 << cbits if 9 <= cbits <= 21 else 512
    what = rng.randrange(9)
    if what <= 1:                                        # a header field
        name = rng.choice(list(HEADER_FIELDS))
        off, code = HEADER_FIELDS[name]
        width = struct.calcsize(">" + code)
        if code == "4s":
            put_int(img, off + rng.randrange(4), 1, rng.randrange(256))
        else:
            cur = _field(img, name)
            v = rng.choice((cur + rng.choice((-1, 1)), rng.choice(INTERESTING), rng.randrange(len(img) + C),
                            rng.randrange(0, 64) * C, cur << 1, cur >> 1, rng.getrandbits(8 * width)))
            put_int(img, off, width, v, big=True)
    elif what <= 4:                                      # L1 / L2 / refcount table / snapshot table entries
        l1 = _field(img, "l1_table_offset")
        tables = [l1, _field(img, "refcount_table_offset"), _field(img, "snapshots_offset")]
        l2 = _u64(img, l1) & Q.L1E_OFFSET_MASK
        tables += [l2, l2, l2]                           # L2 entries matter most
        at = rng.choice(tables) + 8 * rng.randrange(16)
        cur = _u64(img, at)
        flag_bits = (Q.QCOW_OFLAG_COPIED, Q.QCOW_OFLAG_COMPRESSED, Q.QCOW_OFLAG_ZERO, 1 << 61, 0x1FE)
        v = rng.choice((cur ^ rng.choice(flag_bits), cur + rng.choice((-C, C, 512, -512, 1)),
                        (cur & ~0x00FFFFFFFFFFFE00) | (rng.randrange(len(img) // C + 4) * C),
                        rng.choice(INTERESTING), 0, cur ^ (1 << rng.randrange(64)),
                        Q.QCOW_OFLAG_COMPRESSED | rng.getrandbits(62)))
        put_int(img, at, 8, v, big=True)
    elif what == 5:                                      # header extensions and the backing name
        img = bytearray(havoc(bytes(img), rng, 72, min(len(img), C), big_endian=True))
    elif what == 6:
        if rng.random() < 0.5:
            del img[rng.randrange(len(img) + 1):]
        else:
            img += bytes(rng.choice((1, 512, C)))
    elif what == 7:
        flags ^= rng.choice((ALLOW_BACKING, CONVERT))
    else:
        img = bytearray(havoc(bytes(img), rng, big_endian=rng.random() < 0.7))
    return bytes([flags]) + bytes(img)


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    from vdisk_testkit.fuzz.common import mixed_mutator
    return mixed_mutator(mutate)(data, max_size, seed)


if __name__ == "__main__":
    from vdisk_testkit.fuzz.common import atheris_main
    atheris_main(one_input, custom_mutator)
