"""No write system call of vdisk crosses a WRITE_PIECE boundary of the file,
so the page cache never holds the image's data in folios larger than
WRITE_PIECE: on ext4 every small overwrite walks all of a folio's buffer
heads, and random 4 KiB writes into 1 MiB folios cost twice the CPU of
256 KiB ones, into 2 MiB folios five times (vdisk/fileio.py,
benchmarks/README.md "Page-cache folios")."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import threading

import pytest

import vdisk
import vdisk._hotpath
from vdisk import fileio
from vdisk_testkit import pagecache
from vdisk_testkit.helpers import pattern

MiB = 1 << 20
PIECE = fileio.WRITE_PIECE


def test_the_hot_path_and_fileio_split_at_the_same_boundary():
    assert vdisk._hotpath.WRITE_PIECE_BYTES == PIECE
    assert PIECE & (PIECE - 1) == 0 and PIECE >= 64 << 10


def _calls(monkeypatch):
    """Record (offset, length) of every os.pwrite/os.pwritev call."""
    calls = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwrite(fd, data, offset):
        calls.append((offset, len(memoryview(data).cast("B"))))
        return real_pwrite(fd, data, offset)

    def pwritev(fd, buffers, offset):
        calls.append((offset, sum(len(memoryview(b).cast("B")) for b in buffers)))
        return real_pwritev(fd, buffers, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    return calls


def test_fileio_writes_land_whole_and_never_cross_a_piece(tmp_path, monkeypatch):
    path = str(tmp_path / "f")
    io = fileio.FileIO(path, writable=True, create=True)
    model = bytearray(4 * MiB)
    rng = random.Random(7)
    calls = _calls(monkeypatch)
    try:
        for i in range(300):
            offset = rng.choice([0, PIECE, rng.randrange(0, 3 * MiB)])
            if rng.random() < 0.5:
                data = pattern(i, rng.choice([1, 4096, PIECE, PIECE + 1, MiB, rng.randrange(1, MiB)]))
                io.pwrite(data, offset)
            else:
                parts = [pattern(i * 31 + k, rng.randrange(1, 300 << 10)) for k in range(rng.randrange(2, 6))]
                data = b"".join(parts)
                if offset + len(data) > len(model):
                    continue
                io.pwritev([memoryview(p) for p in parts], offset)
            model[offset:offset + len(data)] = data
    finally:
        io.close()
    with open(path, "rb") as f:
        assert f.read() == bytes(model[:os.path.getsize(path)])
    assert calls
    assert all(off // PIECE == (off + n - 1) // PIECE for off, n in calls if n), \
        [c for c in calls if c[1] and c[0] // PIECE != (c[0] + c[1] - 1) // PIECE][:5]


def _large_folios_here(tmp_path) -> None:
    """Skip unless this kernel and file system give a file written in 1 MiB
    writes folios larger than a piece (the raw file beside vdisk's image)."""
    control = str(tmp_path / "control.raw")
    fd = os.open(control, os.O_RDWR | os.O_CREAT)
    try:
        for i in range(8):
            os.pwrite(fd, pattern(i, MiB), i * MiB)
    finally:
        os.close(fd)
    try:
        sizes = [n for _, n in pagecache.folios(control)]
    except pagecache.Unavailable as exc:
        pytest.skip(f"page frames not visible: {exc}")
    if max(sizes, default=0) <= PIECE:
        pytest.skip(f"no folio above {PIECE} bytes in a file written in 1 MiB writes here (largest {max(sizes)})")


def test_an_image_written_in_1mib_writes_has_no_folio_above_a_piece(tmp_path):
    _large_folios_here(tmp_path)
    img = str(tmp_path / "a.vdk")
    with vdisk.create(img, 32 * MiB, block_size=64 << 10) as d:
        for i in range(32):                     # fresh blocks: the Python remap path (FileIO)
            d.pwrite(pattern(i, MiB), i * MiB)
        d.flush()
        fresh = pagecache.folios(img)
        assert fresh and max(n for _, n in fresh) <= PIECE, sorted({n for _, n in fresh})
        pagecache.evict(img)
        for i in range(32):                     # in place: the Cython hot path (write_full)
            d.pwrite(pattern(100 + i, MiB), i * MiB)
        inplace = pagecache.folios(img)
        assert sum(n for _, n in inplace) >= 32 * MiB
        assert max(n for _, n in inplace) <= PIECE, sorted({n for _, n in inplace})
        for i in range(32):
            assert d.pread(MiB, i * MiB) == pattern(100 + i, MiB)


def test_a_converted_image_has_no_folio_above_a_piece(tmp_path):
    _large_folios_here(tmp_path)
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"".join(pattern(i, MiB) for i in range(16)))
    out = str(tmp_path / "c.vdk")
    vdisk.convert(raw, out)
    sizes = [n for _, n in pagecache.folios(out)]
    assert sizes and max(sizes) <= PIECE, sorted(set(sizes))


@pytest.mark.parametrize("beside", ["alone", "beside a thread"])
def test_reads_from_the_cache_and_from_the_disk_agree(tmp_path, beside):
    """Alone (the only thread of the process), the hot path reads with the
    GIL held.  Beside another thread, reads of at most 64 KiB within one
    block first try the page cache with the GIL held (preadv2 with
    RWF_NOWAIT) and fall back to the plain read, the GIL released, when the
    pages are not all there.  Either way every case reads what was written
    (pagecache.reads_agree).  The alone case runs in a fresh interpreter:
    this one may hold threads that earlier tests left (a pool's workers)."""
    img = str(tmp_path / "r.vdk")
    if beside == "alone":
        subprocess.run([sys.executable, "-c", "import sys, vdisk._hotpath as h, vdisk_testkit.pagecache as p\n"
                        "assert h.alone_now()\np.reads_agree(sys.argv[1])\nassert h.alone_now()", img],
                       check=True, timeout=120)
        return
    stop = threading.Event()
    parked = threading.Thread(target=stop.wait)
    parked.start()
    try:
        assert not vdisk._hotpath.alone_now()
        pagecache.reads_agree(img)
    finally:
        stop.set()
        parked.join()
