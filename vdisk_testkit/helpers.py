"""Shared test helpers: patterns, extents <-> block sets and masks, differing blocks."""
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


def assert_hot_bound(d) -> None:
    """The Cython hot path of an open Disk points at the Disk's current arrays
    and size (a missed rebind would read or write through stale arrays)."""
    table, refs, vsize, dirty, groups, coarse, fresh, rel, can_read, can_write = d._hot.describe()
    if d.closed:
        assert not can_read and not can_write and table is None
        return
    assert table is d._table and refs is d._refcounts, "hot path bound to stale table/refcount arrays"
    assert vsize == d.size, f"hot path thinks the size is {vsize}, the disk {d.size}"
    assert can_read and can_write == d.writable()
    t = d._tracker
    if t is None:
        assert dirty is None
    else:
        assert dirty is t.dirty and groups is t.dirty_groups and coarse is t._coarse, "stale tracker arrays"
        assert fresh is d._bt.fresh, "stale fresh-block array"
        assert rel == t.rel_shift


def block_mask(ext: vdisk.Extents, block_size: int, nblocks: int) -> np.ndarray:
    """Boolean per block: the Extents touches it (asserting block-aligned offsets)."""
    out = np.zeros(nblocks, dtype=bool)
    for off, length in ext:
        assert off % block_size == 0, f"extent offset {off} not block-aligned"
        out[off // block_size:-(-(off + length) // block_size)] = True
    return out


def differing_mask(now: np.ndarray, then: np.ndarray, block_size: int) -> np.ndarray:
    """Boolean per block of `now`: its content differs from `then` (blocks
    reaching past `then`'s end always differ); differing_blocks for arrays."""
    nb = -(-len(now) // block_size)
    a = np.zeros(nb * block_size, np.uint8)
    b = np.zeros(nb * block_size, np.uint8)
    a[:len(now)] = now
    n = min(len(then), len(now))
    b[:n] = then[:n]
    out = (a != b).reshape(nb, block_size).any(axis=1)
    ends = np.minimum((np.arange(nb) + 1) * block_size, len(now))
    out |= ends > len(then)
    return out


_MEASURED = '''
import importlib, json, resource, sys, time
import vdisk
for _m in ("disk", "backup", "check", "convert", "delta"):   # the baseline holds the library's imports
    importlib.import_module("vdisk." + _m)                    # (vdisk itself now loads them lazily)


def peak() -> int:
    """Peak RSS of this process in bytes: VmHWM (ru_maxrss where there is no
    /proc; on Linux ru_maxrss carries over exec from the parent, so a big
    pytest parent would mask the growth)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


args = sys.argv[1:]
result = {"error": None}
before = peak()
started = time.monotonic()
try:
%s
except vdisk.VdiskError as exc:
    result["error"] = type(exc).__name__ + ": " + str(exc)
result["growth"] = peak() - before
result["seconds"] = time.monotonic() - started
print(json.dumps(result))
'''


def measure_in_child(body: str, *args, timeout: float = 300) -> dict:
    """Run `body` (Python source; sees `args`, `vdisk` and a `result` dict to
    fill) in a fresh interpreter and return `result` with the growth of its
    peak RSS in bytes ("growth", over the baseline after importing vdisk and its modules),
    "seconds", and "error" (a VdiskError's name and message, or None)."""
    import json
    import subprocess
    import sys
    import textwrap
    code = _MEASURED % textwrap.indent(textwrap.dedent(body), "    ")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
