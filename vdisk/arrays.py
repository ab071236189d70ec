"""In-memory metadata arrays: allocated lazily, loaded from the file's data extents.

The block table, counters and refcounts of an image are numpy arrays sized
by capacities a header (possibly hostile) declares.  They are allocated so
that untouched pages cost no memory and filled only where the file holds
data, so memory follows what an image uses, not what it claims.
"""
from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from .fileio import FileIO


def lazy_zeros(count: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """A zeroed array whose pages cost memory only once written.

    A private anonymous mmap in 4 KiB pages: numpy's own large allocations
    ask for transparent huge pages, which turn a few scattered writes into
    whole 2 MiB pages (a sparse 1 TiB image's tables would cost 100+ MiB).
    Private, not shared (mmap's default): reading a page never written maps
    the kernel's zero page, so a scan of the whole array costs no memory; a
    shared anonymous mapping allocates every page it reads.
    """
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes < (1 << 20):
        return np.zeros(count, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=dtype)


def distinct(a: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.integer[Any]]:
    """The distinct values of an integer array, ascending: np.unique's answer
    without its cost on first use (numpy 2's np.unique imports numpy.ma, 8-15
    ms here, which every process's first flush would pay)."""
    a = np.sort(a)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def load_array(fio: FileIO, offset: int, count: int, dtype: npt.DTypeLike, file_size: int, keep: int | None = None,
               ranges: list[tuple[int, int]] | None = None) -> npt.NDArray[Any]:
    """An array of count entries, filled from the file at offset.

    Only the data (non-hole) parts of the file are read, and only the first
    `keep` entries (default: all): the rest of the array is never touched,
    so its pages stay unallocated and a hostile capacity costs address
    space, not memory.  `ranges`, if given, receives the (start, stop)
    entry ranges that were read: everything outside them is zero, so scans
    can skip it without touching its pages.
    """
    arr = lazy_zeros(count, dtype)
    raw = arr.view(np.uint8)
    size = arr.itemsize
    keep_bytes = raw.nbytes if keep is None else min(raw.nbytes, keep * size)
    end = min(offset + keep_bytes, file_size)
    for off, length in fio.data_extents(offset, end):
        fio.preadinto(raw[off - offset:off - offset + length], off)
        if ranges is not None:
            ranges.append(((off - offset) // size, -(-(off + length - offset) // size)))
    return arr


def nonzero_entries(fio: FileIO, offset: int, start: int, stop: int, dtype: npt.DTypeLike, file_size: int,
                    most: int = 20) -> tuple[int, list[int]]:
    """(count, first indices) of nonzero entries [start, stop) of an on-disk
    array, read in bounded chunks."""
    itemsize = np.dtype(dtype).itemsize
    lo, hi = offset + start * itemsize, min(offset + stop * itemsize, file_size)
    count = 0
    first: list[int] = []
    chunk = 1 << 20
    for off, length in fio.data_extents(lo, hi):
        off -= (off - offset) % itemsize
        for pos in range(off, off + length, chunk):
            n = min(chunk, off + length - pos) // itemsize * itemsize
            vals = np.frombuffer(fio.pread(n, pos), dtype=dtype)
            nz = np.flatnonzero(vals)
            count += len(nz)
            first.extend(((pos - offset) // itemsize + nz[:most - len(first)]).tolist())
    return count, first[:most]


PAGE = 4096


def page_runs(pages: npt.ArrayLike) -> list[tuple[int, int]]:
    """Contiguous runs [start, stop) of a sorted array of page numbers."""
    pages = np.asarray(pages, dtype=np.int64)
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    stops = pages[np.concatenate((breaks - 1, [len(pages) - 1]))] + 1
    return list(zip(starts.tolist(), stops.tolist()))


def write_pages(fio: FileIO, arr: npt.NDArray[Any], pages: npt.ArrayLike, base: int) -> None:
    """Write the 4 KiB pages (sorted page numbers) of arr to the file at base."""
    raw = arr.view(np.uint8)
    for start, stop in page_runs(pages):
        fio.pwrite(raw[start * PAGE:stop * PAGE], base + start * PAGE)


def write_nonzero_pages(fio: FileIO, arr: npt.NDArray[Any], base: int) -> None:
    """Write the 4 KiB pages of arr that hold a nonzero byte, 1 MiB of arr at a time."""
    raw = arr.view(np.uint8)
    step = 256 * PAGE
    pages = []
    for lo in range(0, raw.nbytes, step):
        seg = raw[lo:lo + step]
        whole = len(seg) // PAGE
        pages.append(np.flatnonzero(seg[:whole * PAGE].reshape(whole, PAGE).any(axis=1)) + lo // PAGE)
        if len(seg) % PAGE and seg[whole * PAGE:].any():
            pages.append(np.array([lo // PAGE + whole]))
    for start, stop in page_runs(np.concatenate(pages) if pages else []):
        fio.pwrite(raw[start * PAGE:stop * PAGE], base + start * PAGE)


def as_bytes_view(data: object) -> memoryview:
    """data as a flat, contiguous memoryview of bytes (a copy only when not contiguous)."""
    if isinstance(data, np.ndarray) and not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    try:
        mv = memoryview(cast("ReadableBuffer", data))     # the check itself: a non-buffer raises TypeError
    except TypeError:
        raise InvalidArgumentError(f"expected a bytes-like object, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
