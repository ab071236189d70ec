"""Compressed clusters: deflate and zstd decompression capped at one cluster
of output (references: qcow2_zlib_decompress, qcow2_zstd_decompress), and
the threads that decompress many clusters at once."""
from __future__ import annotations

import os
import zlib

from ..errors import UnsupportedFeatureError
from .structures import COMPRESSION_ZLIB, COMPRESSION_ZSTD, MiB

ZSTD_MAX_WINDOW = 4 * MiB              # a cluster is at most 2 MiB: no honest frame needs a larger window
ZSTD_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE_MAGIC, ZSTD_SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0


class BadCompressedCluster(ValueError):
    """A compressed cluster that is not exactly one cluster of output (the message says how)."""


def _zstd_decompressor():
    """A zstandard decompression context (one per thread: they are not thread-safe)."""
    try:
        import zstandard
    except ImportError:
        raise UnsupportedFeatureError("qcow2 zstd compression (install zstandard)") from None
    return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)


def zstd_piece_budget(cluster_size: int) -> int:
    """How many zstd frames and blocks one cluster may be made of, together
    (ours: qemu has no cap).  qemu writes one frame of blocks of up to
    128 KiB; this allows one per 512 bytes of the cluster, plus 16, so a
    hostile stream of empty blocks costs microseconds, not half a second."""
    return cluster_size // 512 + 16


def _zstd_frame_end(mv: memoryview, pos: int, budget: int) -> tuple[int, int]:
    """(the offset just past the zstd frame that starts at pos, the budget
    left after its blocks) (reference: ZSTD_findFrameCompressedSize; the
    frame format is RFC 8878 section 3.1).

    Only the frame header and the 3-byte block headers are read, each
    block spending one unit of budget.  BadCompressedCluster when there is
    no frame at pos, it runs past the end of the data, or the budget runs out."""
    n = len(mv)
    budget -= 1
    if budget < 0:
        raise BadCompressedCluster("its zstd data has too many frames (more than one per 512 bytes of the cluster)")
    if pos + 5 > n:
        raise BadCompressedCluster("its zstd data ends before a complete frame header")
    magic = int.from_bytes(mv[pos:pos + 4], "little")
    if magic & ZSTD_SKIPPABLE_MASK == ZSTD_SKIPPABLE_MAGIC:
        end = pos + 8 + int.from_bytes(mv[pos + 4:pos + 8], "little") if pos + 8 <= n else n + 1
        if end > n:
            raise BadCompressedCluster("a skippable zstd frame runs past the end of the compressed data")
        return end, budget
    if magic != ZSTD_MAGIC:
        raise BadCompressedCluster(f"no zstd frame at byte {pos} of the compressed data")
    fhd = mv[pos + 4]
    single_segment = fhd >> 5 & 1
    p = pos + 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + ((single_segment, 2, 4, 8)[fhd >> 6])
    while True:
        budget -= 1
        if budget < 0:
            raise BadCompressedCluster("its zstd data has too many blocks (more than one per 512 bytes of the "
                                       "cluster)")
        if p + 3 > n:
            raise BadCompressedCluster("its zstd frame is cut short (the data ends inside the frame)")
        b = mv[p] | mv[p + 1] << 8 | mv[p + 2] << 16
        block_type = b >> 1 & 3
        if block_type == 3:
            raise BadCompressedCluster(f"its zstd frame has a block of the reserved type 3 at byte {p}")
        p += 3 + (1 if block_type == 1 else b >> 3)
        if b & 1:
            break
    p += 4 if fhd & 0x04 else 0               # the content checksum
    if p > n:
        raise BadCompressedCluster("its zstd frame is cut short (the data ends inside the frame)")
    return p, budget


def _zstd_decompress(ctx, data, cluster_size: int) -> bytes:
    """One cluster from a zstd stream (reference: qcow2_zstd_decompress).

    As qemu: frames are decoded one after the other until the output holds
    one cluster; the frame that fills it must end there (qemu: EIO when
    ZSTD_decompressStream still has output to flush, i.e. the cluster
    decompresses to more than one cluster), and what follows that frame
    (the rest of its last 512-byte sector, often the next cluster's frame)
    is never parsed.  Output is capped at one cluster and the window at
    4 MiB, so a zstd bomb costs one cluster of memory.
    """
    mv = memoryview(data)
    parts, got, pos = [], 0, 0
    budget = zstd_piece_budget(cluster_size)
    while got < cluster_size:
        if pos >= len(mv):
            raise BadCompressedCluster(f"it decompresses to {got} bytes, not the cluster size {cluster_size}")
        end, budget = _zstd_frame_end(mv, pos, budget)
        reader = ctx.stream_reader(mv[pos:end], read_across_frames=False)
        while got < cluster_size:
            piece = reader.read(cluster_size - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        if got == cluster_size and reader.read(1):
            raise BadCompressedCluster(f"its zstd frame decompresses to more than one cluster ({cluster_size} "
                                       f"bytes)")
        pos = end
    return b"".join(parts)


def _decompress(data, cluster_size: int, compression_type: int, zstd_ctx=None) -> bytes:
    """One cluster from its compressed bytes, the output capped to cluster_size.

    Raises zlib.error / ZstdError / BadCompressedCluster on bad input; the
    caller turns them into CorruptImageError with the location.
    """
    if compression_type == COMPRESSION_ZLIB:
        # reference: qcow2_zlib_decompress (raw deflate, 4 KiB window; as qemu, a full
        # cluster of output is enough: the input is only known to the sector)
        d = zlib.decompressobj(-12)
        return d.decompress(data, cluster_size)
    return _zstd_decompress(zstd_ctx, data, cluster_size)



# ---------------------------------------------------------------------------- parallel decompression
_POOL = None
_POOL_WORKERS = 1


def _pool():
    """The decompression threads: one per usable core, at most 8."""
    global _POOL, _POOL_WORKERS
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _POOL_WORKERS = max(1, min(8, cores))
        _POOL = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="vdisk-qcow2")
    return _POOL


def _decompress_one(job, cluster_size, compression_type, ctx):
    try:
        return _decompress(job[2], cluster_size, compression_type, ctx), None
    except BadCompressedCluster as exc:
        return b"", str(exc)
    except Exception as exc:         # zlib.error, ZstdError, ...: reported with the location
        return b"", f"it does not decompress ({type(exc).__name__}: {exc})"


def _map_decompress(jobs, cluster_size: int, compression_type: int, ctx_factory):
    """Decompress jobs (cluster, host offset, data), in threads when there
    are enough to pay for them (zlib and zstd release the GIL)."""
    if len(jobs) < 4:
        ctx = ctx_factory() if compression_type == COMPRESSION_ZSTD else None
        return [_decompress_one(j, cluster_size, compression_type, ctx) for j in jobs]
    pool = _pool()
    workers = _POOL_WORKERS
    chunks = [jobs[i::workers] for i in range(workers)]

    def work(chunk):
        ctx = ctx_factory() if compression_type == COMPRESSION_ZSTD else None
        return [_decompress_one(j, cluster_size, compression_type, ctx) for j in chunk]

    parts = list(pool.map(work, chunks))
    out = [None] * len(jobs)
    for w, part in enumerate(parts):
        out[w::workers] = part
    return out
