"""Shared test helpers: patterns, extents <-> block sets, a content model."""
from __future__ import annotations

import numpy as np

import vdisk


def pattern(seed: int, length: int, zero: bool = False) -> bytes:
    """Deterministic bytes for a write; all zeros when zero=True."""
    if zero:
        return bytes(length)
    return np.random.default_rng(seed).integers(1, 256, length, dtype=np.uint8).tobytes()


def extent_blocks(ext: vdisk.Extents, block_size: int) -> set[int]:
    """The set of block numbers an Extents touches (asserting block alignment)."""
    out: set[int] = set()
    for off, length in ext:
        assert off % block_size == 0, f"extent offset {off} not block-aligned"
        out.update(range(off // block_size, -(-(off + length) // block_size)))
    return out


def blocks_of(offset: int, length: int, block_size: int) -> set[int]:
    if length <= 0:
        return set()
    return set(range(offset // block_size, (offset + length - 1) // block_size + 1))


def differing_blocks(now: bytes, then: bytes, block_size: int) -> set[int]:
    """Blocks of `now` whose content differs from `then` (blocks past `then`'s end always differ)."""
    out = set()
    nb = -(-len(now) // block_size)
    for b in range(nb):
        lo, hi = b * block_size, min((b + 1) * block_size, len(now))
        if hi > len(then) or now[lo:hi] != then[lo:hi]:
            out.add(b)
    return out


def read_all(d) -> bytes:
    return d.pread(d.size, 0)
