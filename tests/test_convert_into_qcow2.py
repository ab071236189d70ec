"""convert -n into an existing qcow2 image (vdisk/qcow2/updater.py), judged by qemu-img:
qemu-img check clean, qemu's reading of the result equal to SRC over SRC's range and to the old
DST past it, qemu-io writing it afterwards; every refusal; qemu's locks; and a crash at every
write and fsync of the updater (tests/test_convert_into_qcow2.py::test_crash_*)."""
from __future__ import annotations

import json
import os
import random
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

import vdisk
from vdisk.cli import main
from vdisk_testkit.helpers import pattern
from vdisk_testkit.qemu_helpers import (QEMU_IO, KiB, MiB, compressible, l1_entry_offset, make_qcow2, needs_qemu,
                                        patch_header, qemu_check, qemu_img, qemu_io, read_header, read_u64, to_raw,
                                        write_u64)

pytestmark = needs_qemu


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def raw_of(path, tmp_path, name="read.raw") -> bytes:
    out = tmp_path / name
    if out.exists():
        out.unlink()
    to_raw(path, out, "qcow2")
    data = out.read_bytes()
    out.unlink()
    return data


def assert_clean(path):
    r = qemu_check(path)
    assert r.returncode == 0 and "No errors were found" in r.stdout and "leaked" not in r.stdout, r.stdout + r.stderr


def source(tmp_path, size, seed=1) -> tuple[str, bytes]:
    """A raw SRC: data, zeros (which must land as zeros over DST's data), data cut mid-cluster at the end."""
    rng = np.random.default_rng(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        n = int(rng.integers(1, 48)) * 4 * KiB
        if rng.random() < 0.55:
            buf[pos:pos + n] = pattern(int(rng.integers(1, 1 << 30)), min(n, size - pos))
        pos += n
    del buf[size:]
    path = tmp_path / "src.raw"
    path.write_bytes(bytes(buf))
    return str(path), bytes(buf)


def dst_image(tmp_path, size, options, name="dst.qcow2") -> str:
    """A DST made and written by qemu: data over the whole range, zero clusters, discards, and
    compressed clusters (copied in with qemu-img convert -c)."""
    comp = tmp_path / "comp.qcow2"
    c_opts = ",".join(o for o in options.split(",") if o.startswith("cluster_size"))
    make_qcow2(comp, size, c_opts)
    (tmp_path / "comp.raw").write_bytes(compressible(5, 256 * KiB))
    qemu_io(comp, "write -P 0x41 0 64k")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", options, comp, tmp_path / name)
    path = str(tmp_path / name)
    qemu_io(path, f"write -P 0x5a 128k {size // 2}", "write -z 256k 128k", "discard 512k 64k",
            f"write -P 0x6b {size - 256 * 1024} 192k")
    os.unlink(comp)
    return path


# ---------------------------------------------------------------------------- the result, as qemu reads it
@pytest.mark.parametrize("cluster,options", [
    (512, "cluster_size=512,refcount_bits=16"),
    (4 * KiB, "cluster_size=4k,lazy_refcounts=on,refcount_bits=1"),
    (64 * KiB, "cluster_size=64k"),
    (64 * KiB, "cluster_size=64k,lazy_refcounts=on,refcount_bits=64"),
    (2 * MiB, "cluster_size=2M,refcount_bits=8"),
])
def test_convert_n_into_qcow2_reads_as_src_and_checks_clean(tmp_path, cluster, options):
    """After convert -n SRC DST.qcow2 (DST larger, with data, zero, discarded and compressed
    clusters), qemu-img check finds no error and no leak, qemu reads SRC over SRC's range and the
    old DST past it, the options stay, and qemu-io writes and reads it afterwards."""
    size = 6 * MiB
    dst = dst_image(tmp_path, size, options)
    before = raw_of(dst, tmp_path)
    opts_before = {k: v for k, v in read_header(dst).items() if k in ("cluster_bits", "refcount_order",
                                                                      "compatible_features", "size")}
    src_size = 4 * MiB + 3 * 512           # ends inside a cluster of DST: that cluster is read, patched, rewritten
    src, src_bytes = source(tmp_path, src_size)
    r = run_cli("convert", "-n", "-f", "raw", src, dst)
    assert r.exit_code == 0, r.output
    assert_clean(dst)
    after = raw_of(dst, tmp_path)
    assert after[:src_size] == src_bytes
    assert after[src_size:] == before[src_size:]
    assert {k: read_header(dst)[k] for k in opts_before} == opts_before
    # whole clusters of zeros in SRC are zero clusters (or unallocated): nothing qemu has to read
    qmap = json.loads(qemu_img("map", "--output=json", dst).stdout)
    zero_clusters = [c for c in range(0, src_size - cluster + 1, cluster) if not src_bytes[c:c + cluster].strip(b"\0")]
    for c in zero_clusters:
        e = next(e for e in qmap if e["start"] <= c < e["start"] + e["length"])
        assert not e["data"] and e["zero"], (c, e)
    assert zero_clusters or cluster == 2 * MiB
    # qemu can go on writing it
    qemu_io(dst, "write -P 0x77 0 8k", f"write -P 0x78 {size - 8192} 8k", "read -P 0x77 0 8k")
    assert_clean(dst)


def test_convert_n_into_qcow2_python_api_and_a_qcow2_src(tmp_path):
    """vdisk.convert(src, dst, dst_format="qcow2", existing=True) with a qcow2 SRC holding zero and
    compressed clusters; the same size as DST: qemu-img compare says identical."""
    src = make_qcow2(tmp_path / "s.qcow2", 3 * MiB, "cluster_size=4k",
                     ["write -P 0x21 0 1M", "write -z 64k 64k", "write -P 0x22 2M 256k"])
    dst = make_qcow2(tmp_path / "d.qcow2", 3 * MiB, "cluster_size=64k", ["write -P 0x99 0 3M"])
    vdisk.convert(src, dst, dst_format="qcow2", existing=True)
    assert_clean(dst)
    r = qemu_img("compare", src, dst, check=False)
    assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
    # the 3 MiB of old data were given back: the file holds about what SRC holds
    assert os.stat(dst).st_blocks * 512 < 2 * MiB


def test_convert_n_into_qcow2_grows_the_refcount_table(tmp_path):
    """512-byte clusters: one refcount table cluster covers 8 MiB of file, so writing 12 MiB makes the
    updater allocate refcount blocks and move the refcount table (the header switches to it);
    qemu-img check clean."""
    dst = make_qcow2(tmp_path / "d.qcow2", 16 * MiB, "cluster_size=512")
    h0 = read_header(dst)
    src = tmp_path / "s.raw"
    src.write_bytes(pattern(3, 12 * MiB))
    vdisk.convert(src, dst, src_format="raw", dst_format="qcow2", existing=True)
    h1 = read_header(dst)
    assert h1["refcount_table_offset"] != h0["refcount_table_offset"]
    assert h1["refcount_table_clusters"] > h0["refcount_table_clusters"]
    assert_clean(dst)
    assert raw_of(dst, tmp_path)[:12 * MiB] == src.read_bytes()


def test_convert_n_into_qcow2_keeps_internal_snapshots(tmp_path):
    """A DST with an internal snapshot: its L2 tables and clusters are shared (refcount 2), so they
    are copied, not written; the snapshot reads as before, the active layer as SRC, check is clean,
    and deleting the snapshot afterwards leaves no leak (the refcounts are exact)."""
    dst = make_qcow2(tmp_path / "d.qcow2", 4 * MiB, "cluster_size=64k",
                     ["write -P 0x31 0 2M", "write -P 0x32 3M 512k"])
    qemu_img("snapshot", "-c", "snap1", dst)
    snap_before = tmp_path / "snap_before.raw"
    qemu_img("convert", "-l", "snapshot.name=snap1", "-O", "raw", dst, snap_before)
    src, src_bytes = source(tmp_path, 4 * MiB, seed=7)
    vdisk.convert(src, dst, src_format="raw", dst_format="qcow2", existing=True)
    assert_clean(dst)
    assert raw_of(dst, tmp_path) == src_bytes
    snap_after = tmp_path / "snap_after.raw"
    qemu_img("convert", "-l", "snapshot.name=snap1", "-O", "raw", dst, snap_after)
    assert snap_after.read_bytes() == snap_before.read_bytes()
    qemu_img("snapshot", "-d", "snap1", dst)
    assert_clean(dst)
    assert raw_of(dst, tmp_path) == src_bytes


def test_convert_n_into_qcow2_twice_and_a_zstd_dst(tmp_path):
    """Writing the same DST again (clusters of the first run freed, no leak), into a zstd image whose
    compressed cluster is patched by a partial write."""
    try:
        dst = make_qcow2(tmp_path / "z.qcow2", 2 * MiB, "cluster_size=64k,compression_type=zstd")
    except subprocess.CalledProcessError:
        pytest.skip("qemu-img without zstd")
    (tmp_path / "c.raw").write_bytes(compressible(9, 2 * MiB))
    os.unlink(dst)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", tmp_path / "c.raw", dst)
    for seed in (1, 2):
        src = tmp_path / "s.raw"
        src.write_bytes(pattern(seed, MiB + 1536))
        vdisk.convert(src, dst, src_format="raw", dst_format="qcow2", existing=True)
        assert_clean(dst)
        got = raw_of(dst, tmp_path)
        assert got[:MiB + 1536] == src.read_bytes()
        assert got[MiB + 1536:] == (tmp_path / "c.raw").read_bytes()[MiB + 1536:]


# ---------------------------------------------------------------------------- refusals
def _set_incompat(path, bit):
    h = read_header(path)
    patch_header(path, incompatible_features=h["incompatible_features"] | bit)


REFUSALS = {
    "version 2": (lambda p, t: make_qcow2(p, MiB, "compat=0.10"), "qemu-img amend"),
    "backing file": (lambda p, t: (make_qcow2(t / "base.qcow2", MiB), make_qcow2(p, MiB, backing="base.qcow2"))[1],
                     "backing file"),
    "external data file": (lambda p, t: make_qcow2(p, MiB, f"data_file={t / 'data.raw'}"), "external data file"),
    "extended L2": (lambda p, t: make_qcow2(p, MiB, "extended_l2=on"), "extended L2"),
    "dirty bitmaps": (lambda p, t: (make_qcow2(p, MiB), qemu_img("bitmap", "--add", p, "b0"))[0],
                      "persistent dirty bitmaps"),
    "dirty bit": (lambda p, t: (make_qcow2(p, MiB), _set_incompat(p, 1))[0], "dirty bit"),
    "corrupt bit": (lambda p, t: (make_qcow2(p, MiB), _set_incompat(p, 2))[0], "marked corrupt"),
    "encryption": (lambda p, t: (qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                                          "-o", "encrypt.format=luks,encrypt.key-secret=s0", p, "1M"), str(p))[1],
                   "encrypted"),
    "smaller": (lambda p, t: make_qcow2(p, 512 * KiB), "smaller than the source"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_convert_n_into_qcow2_refusals(tmp_path, case):
    """Each image the updater does not write is refused with one line naming DST and the feature,
    and left byte for byte as it was."""
    make, words = REFUSALS[case]
    dst = str(make(tmp_path / "d.qcow2", tmp_path))
    before = open(dst, "rb").read()
    src = tmp_path / "s.raw"
    src.write_bytes(pattern(1, MiB))
    r = run_cli("convert", "-n", "-f", "raw", src, dst)
    assert r.exit_code == 1, r.output
    assert words in r.stderr and dst in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert open(dst, "rb").read() == before
    err = vdisk.UnsupportedFeatureError if case not in ("corrupt bit", "smaller") else vdisk.VdiskError
    with pytest.raises(err):
        vdisk.convert(src, dst, src_format="raw", dst_format="qcow2", existing=True)


def test_convert_n_into_qcow2_refuses_inconsistent_tables_and_itself(tmp_path):
    """An L1 entry whose COPIED flag says refcount 1 while the L2 table is shared (qemu-img check's
    "ERROR OFLAG_COPIED"): CorruptImageError before anything is written; SRC as its own DST: refused."""
    dst = make_qcow2(tmp_path / "d.qcow2", MiB, "", ["write -P 1 0 64k"])
    qemu_img("snapshot", "-c", "s", dst)           # the L2 table is shared: refcount 2, COPIED clear
    entry = l1_entry_offset(dst, 0)
    write_u64(dst, entry, read_u64(dst, entry) | (1 << 63))
    before = open(dst, "rb").read()
    src = tmp_path / "s.raw"
    src.write_bytes(pattern(1, MiB))
    with pytest.raises(vdisk.CorruptImageError, match="COPIED"):
        vdisk.convert(src, dst, src_format="raw", dst_format="qcow2", existing=True)
    assert open(dst, "rb").read() == before
    same = make_qcow2(tmp_path / "same.qcow2", MiB, "", ["write -P 1 0 64k"])
    r = run_cli("convert", "-n", same, same)
    assert r.exit_code == 1 and "is the source image itself" in r.stderr


def test_convert_n_into_qcow2_refuses_an_image_qemu_writes(tmp_path):
    """qemu-io holding DST open read-write (qemu's OFD lock bytes 101, 201): refused, DST untouched;
    and while vdisk writes DST, qemu-img refuses to open it (vdisk holds the same bytes)."""
    dst = make_qcow2(tmp_path / "d.qcow2", MiB)
    src = tmp_path / "s.raw"
    src.write_bytes(pattern(1, MiB))
    proc = subprocess.Popen([QEMU_IO, "-f", "qcow2", dst], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()                       # qemu-io has the image open
        before = open(dst, "rb").read()
        r = run_cli("convert", "-n", "-f", "raw", src, dst)
        assert r.exit_code == 1 and "in use" in r.stderr and "'write'" in r.stderr, r.stderr
        assert open(dst, "rb").read() == before
    finally:
        proc.communicate("quit\n", timeout=30)
    # the other way round: qemu-img sees vdisk's locks while the updater holds the image
    from vdisk.fileio import QEMU_PERM_ALL, QEMU_PERM_RESIZE, QEMU_PERM_WRITE, FileIO, qemu_lock
    io = FileIO(dst, writable=True)
    try:
        qemu_lock(io, QEMU_PERM_ALL, QEMU_PERM_WRITE | QEMU_PERM_RESIZE)
        r = qemu_img("info", dst, check=False)
        assert r.returncode != 0 and "lock" in r.stderr, r.stdout + r.stderr
    finally:
        io.close()
    assert qemu_img("info", dst, check=False).returncode == 0


# ---------------------------------------------------------------------------- crashes
def _crash_states(rec, rng, n_random):
    """Crash images now: the writes since the last fsync kept as every prefix (a process killed at
    each write), none, all, random subsets, and torn at sector granularity."""
    pending = len(rec.pending)
    out = [rec.crash_image(keep=[i < k for i in range(pending)]) for k in range(pending + 1)]
    for _ in range(n_random):
        out.append(rec.crash_image(rng=rng))
        out.append(rec.crash_image(rng=rng, torn=True))
    return out


@pytest.mark.parametrize("options,src_size,batch", [("cluster_size=512,refcount_bits=64", 3 * MiB + 1024, MiB),
                                                    ("cluster_size=4k", 1536 * KiB + 512, 384 * KiB)])
def test_crash_at_every_write_and_fsync_of_the_updater(tmp_path, options, src_size, batch):
    """A power loss or a kill at every write and fsync of a convert -n into qcow2 (RecordingIO: each
    crash state keeps any subset of the writes since the last fsync, or a prefix of them, or
    sector-torn writes): qemu-img check finds no corruption (leaks allowed) and every guest cluster
    reads as before or as after, never anything else.  512-byte clusters also grow the refcount
    table (64-bit refcounts: every 2 MiB of file); the DST has an internal snapshot (shared
    clusters), which must read as before too."""
    from vdisk.qcow2.updater import Qcow2Updater
    from vdisk.testing import RecordingIO
    import vdisk.qcow2.updater as U
    size = 4 * MiB if "512" in options else 2 * MiB
    dst = dst_image(tmp_path, size, options)
    table_before = read_header(dst)["refcount_table_offset"]
    qemu_img("snapshot", "-c", "s0", dst)
    qemu_io(dst, "write -P 0x3c 0 64k")
    old = raw_of(dst, tmp_path)
    snap_old = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=s0", "-O", "raw", dst, snap_old)
    src, src_bytes = source(tmp_path, src_size, seed=11)
    new = src_bytes + old[src_size:]
    C = 1 << read_header(dst)["cluster_bits"]
    rng = random.Random(5)
    states: list[bytes] = []
    rec = RecordingIO(dst, writable=True)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(U, "COMMIT_DATA", batch)        # several batches
    try:
        up = Qcow2Updater(rec)
        up.fsync_hook = lambda phase: states.extend(_crash_states(rec, rng, 2))
        with open(src, "rb") as f:
            pos = 0
            while pos < src_size:
                chunk = f.read(min(MiB, src_size - pos))
                if chunk.count(0) == len(chunk):
                    up.zero(pos, len(chunk))
                else:
                    up.write(chunk, pos)
                pos += len(chunk)
        up.commit()
        states.extend(_crash_states(rec, rng, 0))
        up.close()
    finally:
        monkey.undo()
        rec.close()
    assert_clean(dst)
    assert raw_of(dst, tmp_path) == new
    if "512" in options:       # 64-bit refcounts of 512-byte clusters: a table cluster covers 2 MiB of file
        assert read_header(dst)["refcount_table_offset"] != table_before
    assert len(states) >= 40, len(states)
    print(f"{len(states)} crash states")
    crash = tmp_path / "crash.qcow2"
    for k, state in enumerate(states):
        crash.write_bytes(state)
        r = qemu_check(crash)
        assert r.returncode in (0, 3), f"state {k}: {r.stdout}{r.stderr}"
        assert "ERROR" not in r.stdout and "corrupt" not in r.stdout.lower(), f"state {k}: {r.stdout}"
        got = raw_of(crash, tmp_path)
        for c in range(0, size, C):
            piece = got[c:c + C]
            assert piece == old[c:c + C] or piece == new[c:c + C], f"state {k}: cluster at {c:#x} is neither"
        if k % 7 == 0:
            snap = tmp_path / "snap_crash.raw"
            if snap.exists():
                snap.unlink()
            qemu_img("convert", "-l", "snapshot.name=s0", "-O", "raw", crash, snap)
            assert snap.read_bytes() == snap_old.read_bytes(), f"state {k}: the snapshot changed"


def test_convert_n_into_qcow2_interrupted_then_run_again(tmp_path, monkeypatch):
    """A conversion stopped halfway (an exception from the progress callback, after some batches
    were committed): qemu-img check finds no corruption (leaks at most), each cluster reads as
    before or as after; running it again completes it."""
    import vdisk.qcow2.updater as U
    monkeypatch.setattr(U, "COMMIT_DATA", 256 * KiB)
    dst = make_qcow2(tmp_path / "d.qcow2", 4 * MiB, "cluster_size=4k", ["write -P 0x44 0 4M"])
    old = raw_of(dst, tmp_path)
    src = tmp_path / "s.raw"
    src.write_bytes(pattern(4, 4 * MiB))

    class Stop(Exception):
        pass

    def progress(done, total):
        if done >= 2 * MiB:
            raise Stop

    import importlib
    monkeypatch.setattr(importlib.import_module("vdisk.convert"), "BATCH", 512 * KiB)   # progress: per batch
    with pytest.raises(Stop):
        vdisk.convert(src, dst, src_format="raw", dst_format="qcow2", existing=True, progress=progress)
    r = qemu_check(dst)
    assert r.returncode in (0, 3) and "ERROR" not in r.stdout, r.stdout
    got, new = raw_of(dst, tmp_path), src.read_bytes()
    assert got != old and got != new
    assert all(got[c:c + 4096] in (old[c:c + 4096], new[c:c + 4096]) for c in range(0, 4 * MiB, 4096))
    vdisk.convert(src, dst, src_format="raw", dst_format="qcow2", existing=True)
    r = qemu_check(dst)
    assert r.returncode in (0, 3) and "ERROR" not in r.stdout, r.stdout
    assert raw_of(dst, tmp_path) == new
