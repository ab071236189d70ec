"""Backups to HDF5 deltas: chains, restores, merges, damage, the CLI, and the
h5py-only restore example of docs/BACKUP_FORMAT.md."""
from __future__ import annotations

import importlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import tracemalloc

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import vdisk
from vdisk.cli import main as cli_main
from vdisk_testkit.helpers import pattern

BS = 4096
KiB, MiB = 1 << 10, 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
delta_mod = importlib.import_module("vdisk.delta")


# --------------------------------------------------------------------------- helpers
def content(d) -> bytes:
    return d.pread(d.size, 0)


def restored(tmp_path, chain, fmt="raw", name=None) -> bytes:
    """Restore a chain into a fresh target and read it back."""
    target = str(tmp_path / (name or f"r{random.getrandbits(40):x}.{fmt}"))
    vdisk.restore(chain, target, format=fmt)
    return read_target(target, fmt)


def read_target(target, fmt) -> bytes:
    if fmt == "raw":
        with open(target, "rb") as f:
            return f.read()
    with vdisk.open(target) as t:
        return content(t)


def assert_no_zero_blocks(path):
    """A restored vdisk image allocates no all-zero block."""
    with vdisk.open(path) as t:
        for off, n in t.map():
            data = np.frombuffer(t.pread(n, off), np.uint8)
            for b in range(0, n, t.block_size):
                assert data[b:b + t.block_size].any(), f"zero block allocated at {off + b}"


def leftovers(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def reseal(path):
    """Recompute the preamble's checksum of the HDF5 structure, as if the damage
    had been there when the delta was written: the checks behind it must
    still catch it (and h5py errors must come out wrapped)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        _, _, skips = delta_mod.unpack_preamble(os.pread(fd, delta_mod.PREAMBLE_SIZE, 0), path)
        os.pwrite(fd, delta_mod.pack_preamble(size, delta_mod.metadata_crc(fd, size, skips, path), skips), 0)
    finally:
        os.close(fd)


def data_offset(path) -> int:
    with h5py.File(path, "r") as f:
        return f["data"].id.get_offset()


@pytest.fixture
def disk(tmp_path):
    d = vdisk.create(tmp_path / "src.vdk", 256 * KiB, block_size=BS)
    yield d
    d.close()


@pytest.fixture
def chain(tmp_path, disk):
    """A full backup and three incrementals of one disk, with the content at each point."""
    d = disk
    out, expect = [], []
    d.pwrite(pattern(1, 100 * KiB), 3 * KiB)
    d.pwrite(pattern(2, BS), 200 * KiB)
    cid = None
    for i, step in enumerate([None, "write", "discard", "grow"]):
        if step == "write":
            d.pwrite(pattern(3, 5 * KiB), 50 * KiB + 100)
        elif step == "discard":
            d.discard(8 * KiB, 16 * KiB)
            d.pwrite(bytes(BS), 200 * KiB)
        elif step == "grow":
            d.resize(300 * KiB + 512)
            d.pwrite(b"tail", 300 * KiB)
        path = str(tmp_path / f"d{i}.h5")
        cid = vdisk.backup(d, path, since=cid, compression=[None, "gzip", "lzf"][i % 3]).change_id
        out.append(path)
        expect.append(content(d))
    return out, expect


# --------------------------------------------------------------------------- the model test
class Consumer:
    def __init__(self, name):
        self.name = name
        self.chains: list[list[tuple[str, bytes]]] = []
        self.last_id = None


def _backup_with_writer(d, model, dest, since, compression, seed):
    """backup(d, ...) while a thread writes to the same Disk.  The writer starts
    once the copy has begun (the first progress call, after the temporary
    snapshot): the backup's content is the model as it was before."""
    expected = bytes(model)
    size = len(model)
    go, wrote, stop = threading.Event(), threading.Event(), threading.Event()
    errors = []

    def writer():
        go.wait(10)
        r = random.Random(seed)
        try:
            for i in range(40):
                if stop.is_set():
                    break
                off = r.randrange(0, size - 1)
                n = r.randint(1, min(2 * BS, size - off))
                buf = pattern(r.getrandbits(31), n, zero=r.random() < 0.2)
                d.pwrite(buf, off)
                model[off:off + n] = buf
                if i == 2:
                    wrote.set()
        except Exception as exc:      # pragma: no cover - reported below
            errors.append(exc)
        wrote.set()

    calls = []

    def progress(done, total):
        calls.append((done, total))
        if not go.is_set():
            go.set()
            wrote.wait(10)            # the rest of the copy runs after live writes

    t = threading.Thread(target=writer)
    t.start()
    try:
        res = vdisk.backup(d, dest, since=since, compression=compression, progress=progress)
    finally:
        go.set()
        stop.set()
        t.join()
    assert not errors, errors
    assert calls and calls[-1][0] == calls[-1][1] == res.bytes_copied
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:])), calls
    assert d.snapshots == []
    return res, expected


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_model_consumers_with_live_writer(tmp_path, monkeypatch, seed):
    """Several consumers back up at different times, each with its own id and
    chain, while a thread writes to the disk during every copy.  Every prefix
    of every chain restores (raw and vdisk, from scratch and incrementally,
    and merged) to the disk's content at that point."""
    monkeypatch.setattr(delta_mod, "BATCH_BYTES", 4 * BS)     # many batches: progress between them
    rng = random.Random(seed)
    size = 96 * BS
    d = vdisk.create(tmp_path / "live.vdk", size, block_size=BS)
    model = bytearray(size)
    consumers = [Consumer(c) for c in "ABC"]
    n = 0
    for step in range(14):
        for _ in range(rng.randint(1, 6)):              # the main thread's changes between backups
            op = rng.random()
            cur = len(model)
            if op < 0.6:
                off = rng.randrange(0, cur - 1)
                k = rng.randint(1, min(5 * BS, cur - off))
                buf = pattern(rng.getrandbits(31), k, zero=rng.random() < 0.15)
                d.pwrite(buf, off)
                model[off:off + k] = buf
            elif op < 0.8:
                off = rng.randrange(0, cur - 1)
                k = rng.randint(1, min(8 * BS, cur - off))
                d.discard(off, k)
                model[off:off + k] = bytes(k)
            else:
                new = rng.randint(40, 140) * 2 * 512 + rng.choice([0, 512])
                d.resize(new)
                model = model[:new] + bytearray(max(0, new - len(model)))
        c = rng.choice(consumers)
        full = c.last_id is None or rng.random() < 0.1
        dest = str(tmp_path / f"{c.name}{n}.h5")
        n += 1
        res, expected = _backup_with_writer(d, model, dest, None if full else c.last_id,
                                            rng.choice(["gzip", "lzf", None]), seed * 100 + step)
        assert res.since == ("*" if full else c.last_id)
        c.last_id = res.change_id
        if full:
            c.chains.append([])
        c.chains[-1].append((dest, expected))
    d.close()
    assert vdisk.check(d.path).ok

    checked = 0
    for c in consumers:
        for chain in c.chains:
            paths = [p for p, _ in chain]
            for k in range(1, len(chain) + 1):           # every prefix, from scratch, raw
                assert restored(tmp_path, paths[:k], "raw") == chain[k - 1][1], (c.name, k)
                checked += 1
            tag = os.path.basename(paths[0])[:-3]
            target = str(tmp_path / f"{tag}-restored.vdk")
            raw = target + ".raw"
            vdisk.restore(paths[:1], target)
            vdisk.restore(paths[:1], raw, format="raw")
            for k in range(1, len(chain)):               # advancing restored targets one delta at a time
                vdisk.restore(paths[k:k + 1], target)
                vdisk.restore(paths[k:k + 1], raw, format="raw")
                assert read_target(target, "vdisk") == chain[k][1], (c.name, k)
                assert read_target(raw, "raw") == chain[k][1], (c.name, k)
            assert read_target(target, "vdisk") == chain[-1][1]
            assert_no_zero_blocks(target)
            assert vdisk.check(target).ok
            merged = str(tmp_path / f"{tag}-merged.h5")
            m = vdisk.merge(paths, merged)
            assert m.change_id == vdisk.verify(paths[-1])["change_id"] and m.since == "*"
            assert restored(tmp_path, [merged], "vdisk") == chain[-1][1]
    assert checked >= 10


# --------------------------------------------------------------------------- restores
def test_chain_restores_raw_and_vdisk(tmp_path, chain):
    paths, expect = chain
    for k in range(1, len(paths) + 1):
        assert restored(tmp_path, paths[:k], "raw") == expect[k - 1]
        assert restored(tmp_path, paths[:k], "vdisk", name=f"v{k}.vdk") == expect[k - 1]
        assert_no_zero_blocks(str(tmp_path / f"v{k}.vdk"))
    side = json.loads(open(tmp_path / "v4.vdk.vdisk-chain").read())
    last = vdisk.verify(paths[-1])
    assert side["change_id"] == last["change_id"] and side["state"] == "complete"
    assert side["image_uuid"] == last["image_uuid"] and side["target_format"] == "vdisk"


def test_incremental_apply_and_refusals(tmp_path, chain):
    paths, expect = chain
    for fmt in ("vdisk", "raw"):
        t = str(tmp_path / f"t.{fmt}")
        vdisk.restore(paths[:2], t, format=fmt)
        before = read_target(t, fmt)
        with pytest.raises(vdisk.BackupChainError, match="applied already"):
            vdisk.restore(paths[1:2], t, format=fmt)
        with pytest.raises(vdisk.BackupChainError, match="missing"):
            vdisk.restore(paths[3:], t, format=fmt)          # skips d2
        with pytest.raises(vdisk.BackupChainError, match="full backup"):
            vdisk.restore(paths[:1], t, format=fmt)          # a full onto a restored target
        with pytest.raises(vdisk.InvalidArgumentError):
            vdisk.restore(paths[2:], t, format="raw" if fmt == "vdisk" else "vdisk")
        assert read_target(t, fmt) == before
        res = vdisk.restore(paths[2:], t, format=fmt)       # d2 and d3 onto the target at d1
        assert res["incremental"] and read_target(t, fmt) == expect[3]
        res = vdisk.restore(paths[:3], t, format=fmt, overwrite=True)
        assert not res["incremental"] and read_target(t, fmt) == expect[2]
    # a target that is not vdisk's, or was changed after the restore
    other = tmp_path / "other.raw"
    other.write_bytes(b"x" * 4096)
    with pytest.raises(vdisk.InvalidArgumentError, match="no chain sidecar"):
        vdisk.restore(paths[1:], str(other), format="raw")
    assert other.read_bytes() == b"x" * 4096
    t = str(tmp_path / "t.vdisk")
    with vdisk.open(t, "r+") as tv:
        tv.pwrite(b"local change", 0)
    with pytest.raises(vdisk.BackupChainError, match="modified after"):
        vdisk.restore(paths[3:], t)
    t = str(tmp_path / "t.raw")
    with open(t, "r+b") as f:
        f.write(b"local change")
    os.utime(t, ns=(1, 1))
    with pytest.raises(vdisk.BackupChainError, match="changed after"):
        vdisk.restore(paths[3:], t, format="raw")


def test_interrupted_apply_is_refused(tmp_path, chain):
    paths, expect = chain
    t = str(tmp_path / "t.vdk")
    vdisk.restore(paths[:1], t)

    def fail_at_end(done, total):        # the last batch is written, the sidecar not yet updated
        if done == total:
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        vdisk.restore(paths[1:], t, progress=fail_at_end)
    side = json.loads(open(t + ".vdisk-chain").read())
    assert side["state"] == "restoring"
    with pytest.raises(vdisk.BackupChainError, match="interrupted"):
        vdisk.restore(paths[1:], t)
    vdisk.restore(paths, t, overwrite=True)
    assert read_target(t, "vdisk") == expect[-1]


def test_resize_grow_and_shrink_between_backups(tmp_path):
    d = vdisk.create(tmp_path / "s.vdk", 64 * KiB, block_size=BS)
    paths, expect, cid = [], [], None
    steps = [
        lambda: d.pwrite(pattern(1, 64 * KiB), 0),
        lambda: d.resize(200 * KiB + 512),                      # grow, unaligned
        lambda: d.pwrite(pattern(2, 30 * KiB), 150 * KiB),
        lambda: d.resize(20 * KiB + 1024),                      # shrink into a block
        lambda: (d.resize(40 * KiB), d.resize(100 * KiB)),      # shrink and grow in one interval
        lambda: d.resize(12 * KiB),
    ]
    for i, step in enumerate(steps):
        step()
        p = str(tmp_path / f"s{i}.h5")
        cid = vdisk.backup(d, p, since=cid).change_id
        paths.append(p)
        expect.append(content(d))
        assert vdisk.verify(p)["virtual_size"] == d.size
    d.close()
    t = str(tmp_path / "inc.vdk")
    r = str(tmp_path / "inc.raw")
    for k in range(len(paths)):
        assert restored(tmp_path, paths[:k + 1], "raw") == expect[k]
        vdisk.restore(paths[k:k + 1], t) if k else vdisk.restore(paths[:1], t)
        vdisk.restore(paths[k:k + 1], r, format="raw") if k else vdisk.restore(paths[:1], r, format="raw")
        assert read_target(t, "vdisk") == expect[k]
        assert read_target(r, "raw") == expect[k]
    for k in range(2, len(paths) + 1):
        m = str(tmp_path / f"m{k}.h5")
        vdisk.merge(paths[:k], m)
        assert restored(tmp_path, [m], "raw") == expect[k - 1]


def test_discards_restore_as_holes(tmp_path, disk):
    d = disk
    d.pwrite(pattern(5, 128 * KiB), 0)
    full = vdisk.backup(d, tmp_path / "f.h5")
    t = str(tmp_path / "t.vdk")
    vdisk.restore([tmp_path / "f.h5"], t)
    d.discard(16 * KiB, 64 * KiB)
    d.pwrite(bytes(BS), 100 * KiB)                   # a whole zero block: unmapped
    inc = vdisk.backup(d, tmp_path / "i.h5", since=full.change_id)
    assert inc.zero_bytes == 17 * BS and inc.bytes_copied == 0
    s = vdisk.verify(tmp_path / "i.h5")
    assert s["blocks"] == 0 and s["zero_extents"] == 2
    vdisk.restore([tmp_path / "i.h5"], t)
    with vdisk.open(t) as tv:
        assert content(tv) == content(d)
        assert tv.map().nbytes == 128 * KiB - 17 * BS
    assert_no_zero_blocks(t)
    r = str(tmp_path / "t.raw")
    vdisk.restore([tmp_path / "f.h5", tmp_path / "i.h5"], r, format="raw")
    assert open(r, "rb").read() == content(d)


def test_snapshot_and_path_sources(tmp_path):
    path = str(tmp_path / "p.vdk")
    with vdisk.create(path, 128 * KiB, block_size=BS) as d:
        d.pwrite(pattern(7, 40 * KiB), 0)
        snap = d.snapshot("nightly")
        at_snap = content(d)
        d.pwrite(pattern(8, 8 * KiB), 0)
        res = vdisk.backup(snap, tmp_path / "snap.h5", compression="lzf")
        assert res.change_id == snap.change_id
        assert [i.name for i in d.snapshots] == ["nightly"]       # the caller's snapshot stays
        assert restored(tmp_path, [tmp_path / "snap.h5"]) == at_snap
        now = content(d)
    res2 = vdisk.backup(path, tmp_path / "inc.h5", since=res.change_id)   # a path: opened r+
    assert res2.since == res.change_id
    with vdisk.open(path) as d:
        assert [i.name for i in d.snapshots] == ["nightly"]
    assert restored(tmp_path, [tmp_path / "snap.h5", tmp_path / "inc.h5"]) == now


def test_failed_copy_deletes_snapshot_and_leaves_no_file(tmp_path, disk):
    d = disk
    d.pwrite(pattern(9, 100 * KiB), 0)

    def boom(done, total):
        raise RuntimeError("injected failure")
    for comp in (None, "gzip"):
        with pytest.raises(RuntimeError, match="injected"):
            vdisk.backup(d, tmp_path / "x.h5", compression=comp, progress=boom)
        assert d.snapshots == []
        assert not os.path.exists(tmp_path / "x.h5")
        assert leftovers(tmp_path) == []
    # a stale id: refused before anything is written, not even the snapshot
    gen = d.generation
    with pytest.raises(vdisk.StaleChangeIdError):
        vdisk.backup(d, tmp_path / "x.h5", since=f"{d.tracking_id}/{gen + 5}")
    with pytest.raises(vdisk.StaleChangeIdError):
        vdisk.backup(d, tmp_path / "x.h5", since="00000000-0000-0000-0000-000000000000/1")
    assert d.generation == gen and d.snapshots == [] and not os.path.exists(tmp_path / "x.h5")
    snap = d.snapshot("s")
    with pytest.raises(vdisk.StaleChangeIdError):
        vdisk.backup(snap, tmp_path / "x.h5", since="garbage")
    assert sorted(os.listdir(tmp_path)) == ["src.vdk"]
    # dest exists; bad arguments
    (tmp_path / "exists.h5").write_bytes(b"keep")
    with pytest.raises(vdisk.InvalidArgumentError, match="exists"):
        vdisk.backup(d, tmp_path / "exists.h5")
    assert (tmp_path / "exists.h5").read_bytes() == b"keep"
    with pytest.raises(vdisk.InvalidArgumentError):
        vdisk.backup(d, tmp_path / "y.h5", compression="zstd")
    with pytest.raises(vdisk.InvalidArgumentError):
        vdisk.backup(42, tmp_path / "y.h5")
    with pytest.raises(vdisk.InvalidArgumentError):
        vdisk.restore([tmp_path / "exists.h5"], tmp_path / "t", format="qcow2")
    assert [i.name for i in d.snapshots] == ["s"]


def test_untracked_image_is_refused(tmp_path):
    with vdisk.create(tmp_path / "u.vdk", 64 * KiB, block_size=BS, track_changes=False) as d:
        d.pwrite(b"data", 0)
        with pytest.raises(vdisk.UnsupportedFeatureError, match="tracking is off"):
            vdisk.backup(d, tmp_path / "u.h5")
        snap = d.snapshot("s")
        with pytest.raises(vdisk.UnsupportedFeatureError, match="tracking is off"):
            vdisk.backup(snap, tmp_path / "u.h5")
        assert [i.name for i in d.snapshots] == ["s"]
    assert sorted(os.listdir(tmp_path)) == ["u.vdk"]


def test_tracking_reset_needs_a_full_backup(tmp_path, disk):
    d = disk
    d.pwrite(pattern(1, BS), 0)
    f = vdisk.backup(d, tmp_path / "f.h5")
    d.reset_tracking()
    with pytest.raises(vdisk.StaleChangeIdError):
        vdisk.backup(d, tmp_path / "i.h5", since=f.change_id)
    assert not os.path.exists(tmp_path / "i.h5")


def test_progress_and_memory_bound(tmp_path):
    """48 MiB through backup and restore with a bounded peak of traced memory."""
    d = vdisk.create(tmp_path / "big.vdk", 64 * MiB, block_size="64KiB")
    chunk = np.random.default_rng(3).integers(1, 256, 4 * MiB, dtype=np.uint8)
    for off in range(0, 48 * MiB, 4 * MiB):
        d.pwrite(chunk, off)
    d.flush()
    back, rest = [], []
    tracemalloc.start()
    try:
        res = vdisk.backup(d, tmp_path / "big.h5", compression=None, progress=lambda a, b: back.append((a, b)))
        vdisk.restore([tmp_path / "big.h5"], tmp_path / "big.raw", format="raw",
                      progress=lambda a, b: rest.append((a, b)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * MiB, peak
    assert res.bytes_copied == 48 * MiB
    for calls in (back, rest):
        assert len(calls) > 2 and calls[-1] == (48 * MiB, 48 * MiB)
        assert all(t == 48 * MiB for _, t in calls)
        assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    with open(tmp_path / "big.raw", "rb") as f:
        assert f.read(4 * MiB) == chunk.tobytes()
        f.seek(48 * MiB)
        assert f.read() == bytes(16 * MiB)
    d.close()


# --------------------------------------------------------------------------- damage
def test_truncated_deltas(tmp_path, chain):
    paths, _ = chain
    for p in paths[:3]:                                  # uncompressed, gzip, lzf
        size = os.path.getsize(p)
        raw = open(p, "rb").read()
        for cut in sorted({4, 100, 1000, 2048, size // 3, size // 2, size - 4096, size - 100, size - 1}):
            if cut <= 0 or cut >= size:
                continue
            bad = str(tmp_path / f"cut{cut}.h5")
            with open(bad, "wb") as f:
                f.write(raw[:cut])
            with pytest.raises(vdisk.CorruptImageError) as ei:
                vdisk.verify(bad)
            assert bad in str(ei.value)
            target = str(tmp_path / "never.raw")
            with pytest.raises((vdisk.CorruptImageError, vdisk.FormatError)):
                vdisk.restore([bad], target, format="raw")
            assert not os.path.exists(target)
            os.unlink(bad)
        assert leftovers(tmp_path) == []


def test_flipped_data_byte_names_the_block(tmp_path, chain):
    paths, _ = chain
    p = paths[0]                                          # the uncompressed full backup
    s = vdisk.verify(p)
    row = s["blocks"] - 2
    flip(p, data_offset(p) + row * BS + 77)
    with pytest.raises(vdisk.ChecksumError, match=rf"block row {row} \(virtual block \d+"):
        vdisk.verify(p)
    # nothing written: not a new target, not a restored one, not a merge
    target = str(tmp_path / "t.vdk")
    with pytest.raises(vdisk.ChecksumError):
        vdisk.restore(paths, target)
    assert not os.path.exists(target) and not os.path.exists(target + ".vdisk-chain")
    with pytest.raises(vdisk.ChecksumError):
        vdisk.merge(paths, tmp_path / "m.h5")
    assert not os.path.exists(tmp_path / "m.h5")
    assert leftovers(tmp_path) == []


def test_flipped_byte_in_compressed_and_in_applied_delta(tmp_path, chain):
    paths, expect = chain
    t = str(tmp_path / "t.vdk")
    vdisk.restore(paths[:2], t)
    before = read_target(t, "vdisk")
    side = open(t + ".vdisk-chain").read()
    p = paths[3]                                          # uncompressed incremental
    with h5py.File(p, "r") as f:
        rows = f["data"].shape[0]
    flip(p, data_offset(p) + (rows - 1) * BS + 5)
    with pytest.raises(vdisk.ChecksumError):
        vdisk.restore(paths[2:], t)                       # d2 is fine, d3 damaged: nothing applied
    assert read_target(t, "vdisk") == before and open(t + ".vdisk-chain").read() == side
    # damage inside a gzip chunk: a CRC mismatch or a decompression error, named
    g = paths[1]
    with h5py.File(g, "r") as f:
        info = f["data"].id.get_chunk_info(0)
    flip(g, info.byte_offset + info.size // 2)
    with pytest.raises(vdisk.CorruptImageError) as ei:
        vdisk.verify(g)
    assert g in str(ei.value)


@pytest.mark.parametrize("resealed", [False, True])
@pytest.mark.parametrize("edit", ["virtual_size", "since", "change_id", "block_size", "created",
                                  "delete:data_bytes", "offsets", "flags", "format_version", "type:block_size"])
def test_edited_attributes_and_extents(tmp_path, chain, edit, resealed):
    paths, _ = chain
    p = paths[1]
    with h5py.File(p, "r+") as f:
        if edit.startswith("delete:"):
            del f.attrs[edit[7:]]
        elif edit.startswith("type:"):
            f.attrs[edit[5:]] = "4096"
        elif edit in ("offsets", "flags"):
            a = f[edit][()]
            a[0] = a[0] + (BS if edit == "offsets" else 1)
            f[edit][...] = a
        elif edit in ("since", "change_id", "created"):
            v = f.attrs[edit]
            f.attrs[edit] = v[:-1] + ("9" if v[-1] != "9" else "8")
        else:
            f.attrs[edit] = np.uint64(int(f.attrs[edit]) + (512 if edit == "virtual_size" else 1))
    if resealed:
        reseal(p)
    with pytest.raises((vdisk.CorruptImageError, vdisk.UnsupportedFeatureError)) as ei:
        vdisk.verify(p)
    assert p in str(ei.value)
    if not resealed:             # the preamble sees any change to the HDF5 structure (or the file's size)
        assert re.search(r"structure checksum mismatch|the preamble says", str(ei.value)), ei.value
    target = str(tmp_path / "t.raw")
    with pytest.raises(vdisk.VdiskError):
        vdisk.restore(paths, target, format="raw")
    assert not os.path.exists(target)


def test_damaged_structure_never_reaches_hdf5(tmp_path, chain):
    """libhdf5 may crash or loop on damaged metadata: every byte outside the
    block rows is checked (the preamble's CRC) before HDF5 parses the file."""
    paths, _ = chain
    for p in (paths[0], paths[1]):                     # uncompressed, gzip
        raw = open(p, "rb").read()
        with h5py.File(p, "r") as f:
            ds = f["data"]
            rows = ([(ds.id.get_offset(), ds.size)] if ds.chunks is None else
                    [(c.byte_offset, c.size) for c in map(ds.id.get_chunk_info, range(ds.id.get_num_chunks()))])
        rng = random.Random(5)
        bad = str(tmp_path / "bad.h5")
        for _ in range(60):
            i = rng.randrange(len(raw))
            if any(o <= i < o + n for o, n in rows):
                continue
            b = bytearray(raw)
            b[i] ^= 1 << rng.randrange(8)
            with open(bad, "wb") as f:
                f.write(b)
            with pytest.raises(vdisk.CorruptImageError, match="preamble|structure"):
                vdisk.verify(bad)
    # behind a valid preamble, HDF5's own errors come out wrapped, naming the file
    p = paths[2]
    with h5py.File(p, "r+") as f:
        del f["flags"]
    reseal(p)
    with pytest.raises(vdisk.CorruptImageError, match=r"d2\.h5: dataset 'flags' missing"):
        vdisk.verify(p)
    p = paths[3]
    b = bytearray(open(p, "rb").read())
    b[delta_mod.PREAMBLE_SIZE + 60:delta_mod.PREAMBLE_SIZE + 400] = bytes(340)   # past the superblock
    with open(p, "wb") as f:
        f.write(b)
    reseal(p)
    with pytest.raises(vdisk.CorruptImageError, match=r"d3\.h5"):
        vdisk.verify(p)


def test_foreign_files_are_refused(tmp_path):
    p = tmp_path / "plain.h5"
    with h5py.File(p, "w") as f:
        f.attrs["format"] = "vdisk-delta"
    with pytest.raises(vdisk.FormatError, match="HDF5 file, but not a vdisk delta"):
        vdisk.verify(p)
    (tmp_path / "text.h5").write_bytes(b"hello world, not hdf5" * 300)
    with pytest.raises(vdisk.FormatError, match="text.h5"):
        vdisk.verify(tmp_path / "text.h5")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(vdisk.CorruptImageError, match="truncated"):
        vdisk.verify(tmp_path / "empty.h5")
    with pytest.raises(vdisk.InvalidArgumentError):
        vdisk.verify(tmp_path / "absent.h5")


# --------------------------------------------------------------------------- broken chains
@pytest.fixture
def chains(tmp_path):
    """Consumer A: full + 3 incrementals; another image's incrementals; a later tracking epoch."""
    d = vdisk.create(tmp_path / "a.vdk", 64 * KiB, block_size=BS)
    a, cid = [], None
    for i in range(4):
        d.pwrite(pattern(i, 3 * KiB), i * 5 * KiB)
        p = str(tmp_path / f"a{i}.h5")
        cid = vdisk.backup(d, p, since=cid).change_id
        a.append(p)
    d.reset_tracking()
    d.pwrite(b"epoch 2", 0)
    e0 = vdisk.backup(d, tmp_path / "e0.h5")
    d.pwrite(b"epoch 2 again", 0)
    vdisk.backup(d, tmp_path / "e1.h5", since=e0.change_id)
    d.close()
    x = vdisk.create(tmp_path / "x.vdk", 64 * KiB, block_size=BS)
    x.pwrite(b"other", 0)
    x0 = vdisk.backup(x, tmp_path / "x0.h5")
    x.pwrite(b"other 2", 0)
    vdisk.backup(x, tmp_path / "x1.h5", since=x0.change_id)
    x.close()
    return a, [str(tmp_path / "e0.h5"), str(tmp_path / "e1.h5")], [str(tmp_path / "x0.h5"), str(tmp_path / "x1.h5")]


def test_broken_chains_are_refused_before_any_write(tmp_path, chains):
    a, e, x = chains
    cases = {
        "gap": ([a[0], a[1], a[3]], r"gap: .*a3\.h5.*a1\.h5"),
        "reorder": ([a[0], a[2], a[1]], r"out of order: .*a0\.h5, .*a1\.h5, .*a2\.h5"),
        "duplicate": ([a[0], a[1], a[1]], r"duplicate: .*a1\.h5"),
        "foreign": ([a[0], x[1]], r"foreign delta: .*x1\.h5"),
        "missing full": ([a[1], a[2]], r"missing full backup: .*a1\.h5"),
        "second full": ([a[0], a[0]], r"a0\.h5 is a full backup"),
        "tracking epoch": ([a[0], e[1]], r"tracking epoch changed: .*e1\.h5"),
        "other epoch full": ([e[0], a[1]], r"tracking epoch changed|link 1"),
    }
    restored_t = str(tmp_path / "t.raw")
    vdisk.restore(a[:2], restored_t, format="raw")
    before = open(restored_t, "rb").read(), open(restored_t + ".vdisk-chain").read()
    for name, (deltas, msg) in cases.items():
        target = str(tmp_path / "new.vdk")
        with pytest.raises(vdisk.BackupChainError, match=msg):
            vdisk.restore(deltas, target)
        assert not os.path.exists(target), name
        with pytest.raises(vdisk.BackupChainError):
            vdisk.merge(deltas, tmp_path / "m.h5")
        assert not os.path.exists(tmp_path / "m.h5"), name
    # against an already restored target (at a1): foreign, other epoch, gaps
    for deltas, msg in [([x[1]], "foreign delta"), ([e[1]], "tracking epoch"), ([a[3]], "missing"),
                        ([a[2], a[1]], "out of order|before"), ([a[2], a[2]], "duplicate")]:
        with pytest.raises(vdisk.BackupChainError, match=msg):
            vdisk.restore(deltas, restored_t, format="raw")
        assert (open(restored_t, "rb").read(), open(restored_t + ".vdisk-chain").read()) == before
    assert isinstance(vdisk.BackupChainError("x"), vdisk.VdiskError)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the documented h5py-only restore
def test_h5py_only_example_from_the_format_doc(tmp_path, chain):
    paths, expect = chain
    doc = open(os.path.join(ROOT, "docs", "BACKUP_FORMAT.md"), encoding="utf-8").read()
    m = re.search(r"<!-- restore-example:begin -->\n```python\n(.*?)```\n<!-- restore-example:end -->", doc, re.S)
    assert m, "the example block is missing from docs/BACKUP_FORMAT.md"
    code = m.group(1)
    assert "vdisk" not in code.replace("vdisk verify", "")
    out = str(tmp_path / "example.raw")
    script = code + f"""
import sys
restore_raw({paths!r}, {out!r})
assert not any(m == "vdisk" or m.startswith("vdisk.") for m in sys.modules), "vdisk was imported"
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert open(out, "rb").read() == expect[-1]
    # the memory-map recipe reads the uncompressed delta's rows
    with h5py.File(paths[0], "r") as f:
        ds = f["data"]
        rows = np.memmap(paths[0], dtype=np.uint8, mode="r", offset=ds.id.get_offset(), shape=ds.shape)
        assert np.array_equal(rows, ds[()])


# --------------------------------------------------------------------------- the command line
def run(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)


def test_cli_backup_restore_verify_merge(tmp_path):
    img = tmp_path / "c.vdk"
    with vdisk.create(img, 128 * KiB, block_size=BS) as d:
        d.pwrite(pattern(1, 20 * KiB), 0)
    r = run("backup", img, tmp_path / "f.h5", "--output", "json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["since"] == "*" and out["extents"] == 1 and out["bytes_copied"] == 20 * KiB
    assert out["dest"] == str(tmp_path / "f.h5")
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"more", 64 * KiB)
    r = run("backup", img, tmp_path / "i.h5", "--since", out["change_id"], "--compression", "none", "-p")
    assert r.exit_code == 0, r.stderr
    cid = r.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}/\d+\.[0-9a-f]{16}", cid)
    r = run("verify", tmp_path / "f.h5", tmp_path / "i.h5")
    assert r.exit_code == 0 and r.stdout.count(": ok") == 2
    r = run("restore", tmp_path / "t.raw", tmp_path / "f.h5", tmp_path / "i.h5", "-O", "raw", "-p")
    assert r.exit_code == 0, r.stderr
    with vdisk.open(img) as d:
        assert (tmp_path / "t.raw").read_bytes() == content(d)
    r = run("restore", tmp_path / "t.raw", tmp_path / "i.h5", "-O", "raw")
    assert r.exit_code == 1
    assert r.stderr.startswith("vdisk: error: ") and len(r.stderr.splitlines()) == 1
    assert run("restore", tmp_path / "t.raw", tmp_path / "f.h5", tmp_path / "i.h5", "-O", "raw",
               "--overwrite").exit_code == 0
    r = run("merge", tmp_path / "m.h5", tmp_path / "f.h5", tmp_path / "i.h5")
    assert r.exit_code == 0 and r.stdout.strip() == cid
    # verify: one line per bad file, exit 1
    (tmp_path / "bad.h5").write_bytes((tmp_path / "i.h5").read_bytes()[:3000])
    r = run("verify", tmp_path / "f.h5", tmp_path / "bad.h5", tmp_path / "nope.h5")
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and all(x.startswith("vdisk: error: ") for x in lines)
    assert "bad.h5" in lines[0] and "nope.h5" in lines[1]
    r = run("backup", img, tmp_path / "f.h5")
    assert r.exit_code == 1 and "exists" in r.stderr


# ---------------------------------------------------------------------------- interrupted backups
def test_next_backup_deletes_an_interrupted_backups_snapshot(tmp_path):
    """A crash (or a failed delete) in the middle of a backup leaves its temporary
    snapshot, which pins space; the next backup deletes it, and nothing else."""
    import uuid
    path = str(tmp_path / "i.vdk")
    with vdisk.create(path, 1 << 20, block_size=4096) as d:
        d.pwrite(b"a" * 4096, 0)
        orphan = f"vdisk-backup-{uuid.uuid4().hex}"
        d.snapshot(orphan).close()                       # what an interrupted backup leaves
        reading = f"vdisk-backup-{uuid.uuid4().hex}"
        view = d.snapshot(reading)                       # a backup of this process still reads this one
        d.snapshot("vdisk-backup-monday").close()        # a user's snapshot: not the pattern
        d.pwrite(b"b" * 4096, 4096)
        res = vdisk.backup(d, str(tmp_path / "f.h5"))
        names = [s.name for s in d.snapshots]
        assert orphan not in names and reading in names and "vdisk-backup-monday" in names
        assert view.pread(4096, 4096) == bytes(4096)      # the open view still reads its content
        assert res.extents.nbytes == 2 * 4096
    assert vdisk.check(path).ok
