"""Disk.changes_in: the ranged answer the NBD server's block status uses equals
changes_since clipped to the range, on random histories (writes, discards,
checkpoints, snapshots, flushes, a crash with armed coarse regions) and random ranges."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vdisk
from vdisk.testing import RecordingIO

BS = 4096
NBLOCKS = 300                       # ~9.4 groups of 32: ranges start and end inside groups
SIZE = NBLOCKS * BS - 1024          # a partial last block


def clipped(ext: vdisk.Extents, offset: int, length: int) -> list[tuple[int, int]]:
    out = []
    for o, n in ext:
        lo, hi = max(o, offset), min(o + n, offset + length)
        if hi > lo:
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0])
            else:
                out.append((lo, hi - lo))
    return out


op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, NBLOCKS - 1), st.integers(1, 40)),
    st.tuples(st.just("write"), st.integers(0, NBLOCKS - 1), st.integers(1, 3)),
    st.tuples(st.just("discard"), st.integers(0, NBLOCKS - 1), st.integers(1, 40)),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("flush")),
)
ranges = st.lists(st.tuples(st.integers(0, SIZE), st.one_of(st.integers(0, 80 * BS), st.integers(0, SIZE))),
                  min_size=1, max_size=12)


def check(d, ids, rngs):
    for cid in ids:
        whole = d.changes_since(cid)
        for offset, length in rngs:
            length = min(length, SIZE - offset)
            got = list(d.changes_in(cid, offset, length))
            assert got == clipped(whole, offset, length), (cid, offset, length)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(op, max_size=25), crash_after=st.lists(op, max_size=8), crash=st.booleans(),
       rngs=ranges, base=st.integers(0, NBLOCKS // 2))
def test_changes_in_equals_clipped_changes_since(tmp_path_factory, history, crash_after, crash, rngs, base):
    img = str(tmp_path_factory.mktemp("ci") / "d.vdisk")
    d = vdisk.create(img, SIZE, block_size="4KiB", coarse_region_size="64KiB", io_factory=RecordingIO)
    ids = ["*"]
    nsnap = 0
    # a base so later writes there are in-place overwrites (they arm coarse bits); single
    # changed blocks elsewhere (a group's `sole` shortcut)
    if base:
        d.pwrite(b"\1" * (base * BS), 0)
    ids.append(d.checkpoint())

    def apply(ops):
        nonlocal nsnap
        for o in ops:
            if o[0] in ("write", "discard"):
                off = o[1] * BS
                n = min(o[2] * BS, SIZE - off)
                if n <= 0:
                    continue
                if o[0] == "write":
                    d.pwrite(bytes([len(ids) % 250 + 2]) * n, off)
                else:
                    d.discard(off, n)
            elif o[0] == "checkpoint":
                ids.append(d.checkpoint())
            elif o[0] == "snapshot":
                nsnap += 1
                ids.append(d.snapshot(f"s{nsnap}").change_id)
            else:
                d.flush()

    apply(history)
    check(d, ids, rngs)
    if crash:                         # power loss after more writes, every pending write kept:
        apply([o for o in crash_after if o[0] in ("write", "discard")])    # armed coarse regions
        image = d._io.crash_image(keep=[True] * len(d._io.pending))
        d.close()
        with open(img, "wb") as f:
            f.write(image)
        with vdisk.open(img) as d2:
            check(d2, ids, rngs)
    else:
        d.close()


def test_changes_in_refuses_stale_ids_and_bad_ranges(tmp_path):
    img = str(tmp_path / "d.vdisk")
    with vdisk.create(img, "1MiB", block_size="4KiB") as d:
        c = d.checkpoint()
        with pytest.raises(vdisk.StaleChangeIdError):
            d.changes_in("00000000-0000-0000-0000-000000000000/1", 0, 0)
        with pytest.raises(vdisk.OutOfRangeError):
            d.changes_in(c, 1 << 20, 1)
        d.pwrite(b"x", 5 * BS + 7)
        assert list(d.changes_in(c, 5 * BS + 100, 10)) == [(5 * BS + 100, 10)]
        assert list(d.changes_in(c, 0, 5 * BS)) == []
