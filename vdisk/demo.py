"""End-to-end demo: ``python -m vdisk.demo [DIR]``.

Creates an image, writes, reads back, tracks changes across a checkpoint,
shows info and map, and checks the image.  Then backs it up for two
consumers, each with its own chain of HDF5 deltas (a full backup, then
incrementals) taken while the disk changes, restores each chain (to a vdisk
image, advanced incrementally, and to a raw file), and compares the
results with the disk's content at those points.  Exits non-zero if
anything does not hold.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Iterable

import vdisk
from vdisk.results import BackupResult
from vdisk.changeid import ANY
from vdisk.fileio import FileIO


def _blocks(chunks: Iterable[tuple[int, bytes]], block_size: int) -> dict[int, bytes]:
    """{block number: bytes} of the non-zero blocks in (offset, bytes) chunks."""
    out: dict[int, bytes] = {}
    for off, data in chunks:
        for pos in range(0, len(data), block_size):
            piece = data[pos:pos + block_size]
            if piece.strip(b"\0"):
                out[(off + pos) // block_size] = piece
    return out


def disk_state(d: vdisk.Disk) -> tuple[int, dict[int, bytes]]:
    """A disk's content, compactly: its size and its non-zero blocks (the rest reads as zeros)."""
    return d.size, _blocks(((off, d.pread(n, off)) for off, n in d.map()), d.block_size)


def image_state(path: str, block_size: int) -> tuple[int, dict[int, bytes]]:
    with vdisk.open(path) as d:
        return disk_state(d)


def raw_state(path: str, block_size: int) -> tuple[int, dict[int, bytes]]:
    """The same for a sparse raw file: only its data (non-hole) ranges are read."""
    fio = FileIO(path, writable=False)
    try:
        chunks = []
        for off, n in fio.data_extents(0, fio.size()):
            lo = off // block_size * block_size
            chunks.append((lo, fio.pread(off + n - lo, lo)))
        return fio.size(), _blocks(chunks, block_size)
    finally:
        fio.close()


def basics(path: str) -> bool:
    print(f"create {path}: 10 GiB virtual, 64 KiB blocks")
    with vdisk.create(path, "10GiB", block_size="64KiB", overwrite=True) as d:
        d.pwrite(b"boot sector".ljust(512, b"\0"), 0)
        d.pwrite(os.urandom(1 << 20), 1 << 30)          # 1 MiB at 1 GiB
        d.pwrite(bytes(1 << 20), 2 << 30)               # zeros: allocates nothing
        d.flush()
        assert d.pread(11, 0) == b"boot sector"
        print(f"wrote 3 regions; allocated {d.map().nbytes} bytes of 10 GiB (zeros took no space)")
        cid = d.checkpoint()
        print(f"checkpoint -> change id {cid}")
        d.pwrite(b"changed", (1 << 30) + 70000)
        d.pwrite(b"new data", 5 << 30)
        changed = d.changes_since(cid)
        print(f"changes since it: {[(o, n) for o, n in changed]} ({changed.nbytes} bytes to back up)")
        assert changed.nbytes == 2 * d.block_size
    with vdisk.open(path) as d:
        info = d.info()
        print("info:", json.dumps({k: info[k] for k in ("virtual_size", "block_size", "allocated_bytes",
                                                         "file_size", "generation", "change_id")}))
        assert d.pread(7, (1 << 30) + 70000) == b"changed"
    result = vdisk.check(path)
    print(f"check: ok={result.ok} corruptions={result.corruption_count} leaks={result.leaked_blocks}")
    print(f"image file: {os.path.getsize(path)} bytes apparent, {os.stat(path).st_blocks * 512} bytes on disk")
    return result.ok


def backups(path: str, directory: str) -> bool:
    """Two consumers with their own chains: A keeps its change id itself, B
    is a named consumer whose last id the image keeps."""
    def delta(name: str) -> str:
        return os.path.join(directory, name)

    def said(res: BackupResult, who: str) -> None:
        kind = "full" if res.since == ANY else "incremental"
        n = len(res.extents)
        print(f"  {who}: {kind:<11} -> {os.path.basename(res.dest)}: {n} extent{'s' if n != 1 else ''}, "
              f"{res.bytes_copied} bytes of data, {res.zero_bytes} bytes zeroed; file {res.file_bytes} bytes; "
              f"keeps {res.change_id}")

    points: dict[str, tuple[int, dict[int, bytes]]] = {}
    print("backups (HDF5 deltas, gzip):")
    with vdisk.open(path, "r+") as d:
        a0 = vdisk.backup(d, delta("a0.h5"))                         # A: full backup
        points["a0"] = disk_state(d)
        said(a0, "A")
        d.pwrite(os.urandom(200_000), (1 << 30) + (3 << 20))         # more writes ...
        d.discard(1 << 30, 128 << 10)                                # ... and a discard: zeros to restore
        a1 = vdisk.backup(d, delta("a1.h5"), since=a0.change_id)     # A: incremental
        points["a1"] = disk_state(d)
        said(a1, "A")
        d.pwrite(b"B starts here", 7 << 30)
        d.consumers.register("B")                                    # B: the image remembers its id
        b0 = vdisk.backup(d, delta("b0.h5"), consumer="B")           # B: its own chain, full first
        points["b0"] = disk_state(d)
        said(b0, "B")
        d.pwrite(os.urandom(100_000), 3 << 30)
        d.resize("11GiB")                                            # grown: restores follow the size
        d.pwrite(b"past the old end", (10 << 30) + 4096)
        a2 = vdisk.backup(d, delta("a2.h5"), since=a1.change_id)     # A: only what changed since a1
        b1 = vdisk.backup(d, delta("b1.h5"), consumer="B")           # B: only what changed since b0
        points["a2"] = points["b1"] = disk_state(d)
        said(a2, "A")
        said(b1, "B")
        assert d.snapshots == []                                     # the temporary snapshots are gone
        assert b1.since == b0.change_id and d.consumers["B"].change_id == b1.change_id
        print(f"  consumers kept in the image: {[(c.name, c.change_id) for c in d.consumers.values()]}")
    bs = a0.block_size
    ok = True

    def compare(what: str, got: tuple[int, dict[int, bytes]], want: tuple[int, dict[int, bytes]]) -> None:
        nonlocal ok
        same = got == want
        ok &= same
        print(f"  {what}: {'identical to the disk at that point' if same else 'DIFFERS'}")

    print("restores:")
    a_img = os.path.join(directory, "restored-a.vdk")
    vdisk.restore([delta("a0.h5"), delta("a1.h5")], a_img)
    compare("A chain a0+a1 -> vdisk image", image_state(a_img, bs), points["a1"])
    vdisk.restore([delta("a2.h5")], a_img)                           # advance it by one incremental
    compare("A's image advanced by a2", image_state(a_img, bs), points["a2"])
    b_raw = os.path.join(directory, "restored-b.raw")
    vdisk.restore([delta("b0.h5"), delta("b1.h5")], b_raw, format="raw")
    compare("B chain b0+b1 -> raw file", raw_state(b_raw, bs), points["b1"])
    vdisk.merge([delta("b0.h5"), delta("b1.h5")], delta("b-merged.h5"))
    merged = vdisk.verify(delta("b-merged.h5"))
    print(f"  merged B's chain into one full backup at {merged['change_id']} ({merged['bytes']} bytes of data)")
    b_img = os.path.join(directory, "restored-b.vdk")
    vdisk.restore([delta("b-merged.h5")], b_img)
    compare("B merged -> vdisk image", image_state(b_img, bs), points["b1"])
    try:
        vdisk.restore([delta("a0.h5"), delta("a2.h5")], os.path.join(directory, "never.vdk"))
        print("  a chain with a gap was NOT refused")
        ok = False
    except vdisk.BackupChainError as exc:
        print(f"  a chain with a gap is refused: {exc}")
    ok &= vdisk.check(a_img).ok and vdisk.check(b_img).ok
    return ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        directory = argv[0] if argv else tmp
        path = os.path.join(directory, "demo.vdk")
        for name in os.listdir(directory):           # a rerun into the same DIR starts clean
            if name.endswith((".h5", ".vdisk-chain")) or name.startswith("restored-"):
                os.unlink(os.path.join(directory, name))
        try:
            ok = basics(path) and backups(path, directory)
        except (AssertionError, vdisk.VdiskError) as exc:
            print(f"demo FAILED: {type(exc).__name__}: {exc}")
            return 1
        if not ok:
            print("demo FAILED")
            return 1
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
