"""Resource bounds: a 1 TiB (virtual) image opened and queried in bounded memory.

The bound (docs/FORMAT.md, "Memory"; docs/RELIABILITY.md): an open image's
memory follows the used part of its tables, not its virtual size.  Each
case runs in a fresh interpreter and measures the growth of its peak RSS
(VmHWM) over the baseline after importing vdisk (helpers.measure_in_child).

Hostile headers (huge table, refcount, snapshot and bitmap fields, huge
sparse files) are measured in tests/test_damage.py ("hostile headers:
memory"), hostile qcow2 input in tests/test_qcow2_hostile.py; here: the
legitimate 1 TiB image, and snapshot records that claim huge disks.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import vdisk
import vdisk.layout as L
from vdisk_testkit.helpers import measure_in_child

MiB = 1 << 20
SCATTERED = 4000

# peak RSS growth allowed for opening and querying, and for check, of a 1 TiB image
# with SCATTERED blocks written (measured: 39 and 81 MiB to open and query, 30 and
# 41 MiB to check, for 64 KiB and 4 KiB blocks; docs/RELIABILITY.md)
QUERY_BOUND = {"64KiB": 64 * MiB, "4KiB": 128 * MiB}
CHECK_BOUND = {"64KiB": 96 * MiB, "4KiB": 128 * MiB}


@pytest.fixture(scope="module", params=["64KiB", "4KiB"])
def big_image(request, tmp_path_factory):
    """1 TiB, SCATTERED blocks written at random after a checkpoint (4 KiB
    blocks: 2**28 blocks, the format's limit for that size)."""
    path = str(tmp_path_factory.mktemp("big") / "big.vdk")
    with vdisk.create(path, "1TiB", block_size=request.param) as d:
        c1 = d.checkpoint()
        idx = np.unique(np.random.default_rng(7).integers(0, d._hdr.nblocks, SCATTERED))
        for b in idx.tolist():
            d.pwrite(b"x" * 512, b * d.block_size)
        c2 = d.checkpoint()
        nblocks = d._hdr.nblocks
    return request.param, path, c1, c2, nblocks, idx


QUERY = """
import numpy as np
path, c1, c2, nblocks = args[0], args[1], args[2], int(args[3])
rng = np.random.default_rng(0)
with vdisk.open(path) as d:
    bs = d.block_size
    ext = d.changes_since(c1)
    result["changed"] = sorted(b for off, n in ext for b in range(off // bs, (off + n) // bs))
    result["changed_since_c2"] = len(d.changes_since(c2))
    result["mapped"] = d.map().nbytes // bs
    result["allocated"] = d.info()["allocated_blocks"]
    for b in rng.integers(0, nblocks, 200).tolist():
        d.pread(512, b * bs)
del d                                       # (a closed Disk keeps its arrays while referenced)
with vdisk.open(path, "r+") as d:           # a writer: open, write, checkpoint, query
    for b in rng.integers(0, nblocks, 100).tolist():
        d.pwrite(b"w" * 512, b * bs)
    cid = d.checkpoint()
    result["changed_by_writer"] = d.changes_since(c2).nbytes // bs
    result["changed_since_cid"] = len(d.changes_since(cid))
"""


def test_1tib_image_open_and_query_in_bounded_memory(big_image):
    bs_name, path, c1, c2, nblocks, idx = big_image
    res = measure_in_child(QUERY, path, c1, c2, nblocks)
    assert res["error"] is None, res
    assert res["changed"] == idx.tolist()
    assert res["changed_since_c2"] == 0 and res["changed_since_cid"] == 0
    assert res["mapped"] == res["allocated"] == len(idx)
    assert 0 < res["changed_by_writer"] <= 100
    print(f"1 TiB, {bs_name} blocks: open and query {res['growth'] / MiB:.0f} MiB, {res['seconds']:.2f} s")
    assert res["growth"] < QUERY_BOUND[bs_name], f"{res['growth'] / MiB:.0f} MiB to open and query ({bs_name} blocks)"


def test_1tib_image_check_in_bounded_memory(big_image):
    bs_name, path, *_ = big_image
    res = measure_in_child("""
r = vdisk.check(args[0])
result.update(ok=r.ok, corruptions=r.corruptions, leaked=r.leaked_blocks, allocated=r.allocated_blocks)
""", path)
    assert res["error"] is None and res["ok"], res
    assert res["allocated"] >= SCATTERED * 0.99
    print(f"1 TiB, {bs_name} blocks: check {res['growth'] / MiB:.0f} MiB, {res['seconds']:.2f} s")
    assert res["growth"] < CHECK_BOUND[bs_name], f"{res['growth'] / MiB:.0f} MiB to check ({bs_name} blocks)"


# ---------------------------------------------------------------------------- hostile snapshot records
HOSTILE_SNAPSHOTS = 8
HOSTILE_SIZE = 64 << 30          # each record claims a 64 GiB disk: 64 MiB frozen tables at 4 KiB blocks


def _hostile_snapshots(path: str) -> None:
    """A small image whose snapshot table claims HOSTILE_SNAPSHOTS snapshots of
    HOSTILE_SIZE each, their frozen tables in a sparse file.  Everything a
    reader checks holds (CRCs, names, generations, regions inside the file
    and apart, a refcount table covering them with every reference counted):
    only the claimed sizes are out of proportion to the data."""
    from vdisk.disk import _read_header
    from vdisk.fileio import FileIO
    from vdisk.snapshots import SnapshotRecord, parse_table
    bs = 4096
    with vdisk.create(path, 1 << 20, block_size=bs) as d:
        d.pwrite(b"x" * 8192, 4096)
        d.snapshot("s").close()
        data_blocks = [int(p) for p in d._table[:3] if p]
    fio = FileIO(path, writable=False)
    try:
        h, _ = _read_header(fio)
        (rec,) = parse_table(fio.pread(256, h.snapshot_offset), 1, h, fio.size())
        frozen, counters = fio.pread(bs, rec.table_offset), fio.pread(bs, rec.counter_offset)
        refs = np.frombuffer(fio.pread(L.round_up(h.refcount_capacity * 2, bs), h.refcount_offset), "<u2").copy()
    finally:
        fio.close()
    tbytes = L.round_up(HOSTILE_SIZE // bs * 4, bs)
    first = L.round_up(os.path.getsize(path), bs) // bs
    records = [SnapshotRecord(snapshot_id=i + 1, generation=rec.generation, virtual_size=HOSTILE_SIZE,
                              created_ns=rec.created_ns, table_offset=(first + 2 * i * tbytes // bs) * bs,
                              counter_offset=(first + (2 * i + 1) * tbytes // bs) * bs,
                              tracking_uuid=rec.tracking_uuid, name=f"h{i}") for i in range(HOSTILE_SNAPSHOTS)]
    # a new refcount table after the frozen regions, covering the whole file
    r_block = first + 2 * HOSTILE_SNAPSHOTS * tbytes // bs
    cap = r_block + 1
    while L.round_up(cap * 2, bs) // bs > cap - r_block:
        cap = r_block + L.round_up(cap * 2, bs) // bs
    cap = L.round_up(cap * 2, bs) // 2
    new_refs = np.zeros(cap, "<u2")
    new_refs[:first] = refs[:first]                   # the old tables stay counted: leaks, allowed
    assert not refs[first:].any()                     # (past the file's end: nothing to count)
    new_refs[data_blocks] += HOSTILE_SNAPSHOTS - 1    # snapshot "s" gives way to the records
    new_refs[first:r_block] = 1                       # the frozen regions
    new_refs[r_block:r_block + L.round_up(cap * 2, bs) // bs] = 1
    with open(path, "r+b") as f:
        for r in records:
            f.seek(r.table_offset)
            f.write(frozen)
            f.seek(r.counter_offset)
            f.write(counters)
        raw = new_refs.tobytes()
        for off in range(0, len(raw), bs):            # sparse: only the nonzero pages
            if any(raw[off:off + bs]):
                f.seek(r_block * bs + off)
                f.write(raw[off:off + bs])
        f.truncate(r_block * bs + L.round_up(cap * 2, bs))
        assert len(records) <= h.snapshot_capacity
        f.seek(h.snapshot_offset)
        f.write(b"".join(r.pack() for r in records))
        h2 = dataclasses.replace(h, sequence=h.sequence + 1, snapshot_count=len(records),
                                 snapshot_next_id=len(records) + 1, refcount_offset=r_block * bs,
                                 refcount_capacity=cap)
        h2.validate(os.path.getsize(path))
        f.seek(L.SLOT_OFFSETS[h2.sequence % 2])
        f.write(h2.pack())
    assert os.stat(path).st_blocks * 512 < 4 * MiB       # sparse: a few pages of real data


@pytest.fixture(scope="module")
def hostile_snapshots(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hostile") / "h.vdk")
    _hostile_snapshots(path)
    return path


def test_hostile_snapshot_records_open_and_check_bounded(hostile_snapshots):
    res = measure_in_child("""
with vdisk.open(args[0]) as d:
    result["names"] = [i.name for i in d.snapshots]
    result["sizes"] = sorted({i.size for i in d.snapshots})
r = vdisk.check(args[0])
result.update(ok=r.ok, corruptions=len(r.corruptions))
""", hostile_snapshots)
    assert res["error"] is None, res
    assert res["names"] == [f"h{i}" for i in range(HOSTILE_SNAPSHOTS)] and res["sizes"] == [HOSTILE_SIZE]
    assert res["ok"] is False and res["corruptions"] == 0    # leaks only: the old tables
    print(f"hostile snapshot records: open and check {res['growth'] / MiB:.0f} MiB")
    assert res["growth"] < 32 * MiB, f"{res['growth'] / MiB:.0f} MiB"


def test_hostile_snapshot_open_bounded(hostile_snapshots):
    res = measure_in_child("""
with vdisk.open(args[0]) as d:
    with d.open_snapshot("h0") as s:
        result["data"] = s.pread(8, 4096).hex()
        result["changed"] = len(s.changes_since("*"))
""", hostile_snapshots)
    assert res["error"] is None and res["data"] == (b"x" * 8).hex(), res
    assert res["growth"] < 32 * MiB, f"{res['growth'] / MiB:.0f} MiB to open one snapshot"


def test_snapshot_and_backup_of_a_large_sparse_disk_bounded(tmp_path):
    path = str(tmp_path / "s.vdk")
    with vdisk.create(path, 64 << 30, block_size="4KiB") as d:
        c = d.checkpoint()
        written = np.unique(np.random.default_rng(3).integers(0, d._hdr.nblocks, 200))
        for b in written.tolist():
            d.pwrite(b"x" * 512, b * 4096)
    res = measure_in_child("""
with vdisk.open(args[0], "r+") as d:
    d.snapshot("t").close()
    d.delete_snapshot("t")
    result["copied"] = vdisk.backup(d, args[2], since=args[1], compression=None).bytes_copied
""", path, c, str(tmp_path / "inc.h5"))
    assert res["error"] is None and res["copied"] == len(written) * 4096, res
    assert res["growth"] < 48 * MiB, f"{res['growth'] / MiB:.0f} MiB to snapshot and back up a 64 GiB disk"
