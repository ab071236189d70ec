"""What the page cache holds of a file: the sizes of its folios (Linux, root).

A page of the file is resident when mincore(2) says so; its physical frame
comes from /proc/self/pagemap and the frame's flags from /proc/kpageflags
(KPF_COMPOUND_HEAD and KPF_COMPOUND_TAIL mark the pages of a large folio).
Only resident pages are looked at, so the measurement brings nothing into
the cache itself.  Both /proc files need CAP_SYS_ADMIN to show frame numbers.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct

import numpy as np

import vdisk
from vdisk_testkit.helpers import pattern

PAGE = mmap.PAGESIZE
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63


class Unavailable(Exception):
    """The kernel does not show page frames to this process."""


def folios(path: str) -> list[tuple[int, int]]:
    """(file offset, bytes) of every resident folio of the file, in order."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        npages = -(-os.fstat(fd).st_size // PAGE)
        if not npages:
            return []
        m = mmap.mmap(fd, npages * PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
        pages = np.frombuffer(m, dtype=np.uint8)
        try:
            base = pages.ctypes.data
            vec = ctypes.create_string_buffer(npages)
            if libc.mincore(ctypes.c_void_p(base), npages * PAGE, vec) != 0:
                raise Unavailable(f"mincore: {os.strerror(ctypes.get_errno())}")
            resident = [i for i, v in enumerate(vec.raw[:npages]) if v & 1]
            flags = {}
            with open("/proc/self/pagemap", "rb", buffering=0) as pm, open("/proc/kpageflags", "rb", buffering=0) as kf:
                for i in resident:
                    int(pages[i * PAGE])    # resident already: maps the page, reads nothing in
                    pm.seek((base // PAGE + i) * 8)
                    (entry,) = struct.unpack("<Q", pm.read(8))
                    pfn = entry & PFN_MASK
                    if not entry & PRESENT or not pfn:
                        raise Unavailable("/proc/self/pagemap shows no frame numbers (needs CAP_SYS_ADMIN)")
                    kf.seek(pfn * 8)
                    (flags[i],) = struct.unpack("<Q", kf.read(8))
        finally:
            del pages
            m.close()
    except PermissionError as exc:
        raise Unavailable(str(exc)) from exc
    finally:
        os.close(fd)
    out: list[tuple[int, int]] = []
    for i in resident:
        if flags[i] & KPF_COMPOUND_TAIL and out and out[-1][0] + out[-1][1] == i * PAGE:
            out[-1] = (out[-1][0], out[-1][1] + PAGE)
        else:
            out.append((i * PAGE, PAGE))
    return out


def evict(path: str) -> None:
    """Write the file back and drop its clean pages from the cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def reads_agree(img: str) -> None:
    """Create img (8 MiB, 64 KiB blocks), write blocks, and read them back
    cached, evicted, partly cached, never written and across two blocks:
    every read must return what was written (AssertionError otherwise)."""
    bs = 64 << 10
    with vdisk.create(img, 8 << 20, block_size=bs) as d:
        data = {i: pattern(i, bs) for i in range(0, 128, 3)}
        for i, block in data.items():
            d.pwrite(block, i * bs)
        d.flush()
        for i, block in data.items():           # cached
            assert d.pread(bs, i * bs) == block
            assert d.pread(4096, i * bs + 8192) == block[8192:12288]
        evict(img)                              # nothing cached: EAGAIN, then the blocking read
        for i, block in list(data.items())[:10]:
            assert d.pread(4096, i * bs + 4096) == block[4096:8192]
        evict(img)
        for i, block in list(data.items())[:10]:    # part of the block cached: a short cached read
            assert d.pread(4096, i * bs) == block[:4096]
            assert d.pread(bs, i * bs) == block
        assert d.pread(bs, 1 * bs) == bytes(bs)     # never written: zeros, no read at all
        assert d.pread(100, 4 * bs - 50) == data[3][-50:] + bytes(50)     # two blocks: the plain path
