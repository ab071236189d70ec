"""Refcounts that disagree with the tables sharing a block (issue #7, "Hardening").

A block's refcount must be at least the number of tables (the live block
table and every snapshot's frozen table) that map it (docs/FORMAT.md,
"Refcounts").  A LOWER refcount on a hostile image would let a writer
overwrite a shared block in place (a snapshot changes) or free a block a
table still maps (a later allocation reuses it: one block reads another's
data).  A writable open refuses such an image with CorruptImageError;
``check`` reports it as corruption and ``check --repair`` raises the
refcount to the references.  A HIGHER refcount is a leak: the image opens,
``check`` reports leaked blocks only.

Every case builds the same small image (1 MiB, 4 KiB blocks, two snapshots
sharing blocks with the live disk and with each other), damages one
refcount, then runs the operations that depend on it.  A test that ran
them on the damaged image (before the fix) saw the contents change; now
the open refuses, and the same operations after the repair keep every
content intact.
"""
from __future__ import annotations

import dataclasses
import struct

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import vdisk
from vdisk_testkit.helpers import measure_in_child, pattern

KiB = 1 << 10
MiB = 1 << 20
BS = 4 * KiB
VSIZE = 1 * MiB


# ============================================================================ the image and its model
@dataclasses.dataclass
class Model:
    live: bytearray
    snaps: dict           # name -> bytes


def build(path) -> Model:
    """Blocks 0-5 written; s1; blocks 1, 2 overwritten (copied on write); s2;
    blocks 2, 3 overwritten.  References per physical block:
    block 0, 4, 5: live + s1 + s2 (3); s1's 1 and 2: s1 (1); live's 1: live + s2
    (2); s2's 2: s2 (1); s1's 3: s1 + s2 (2); live's 2 and 3: live (1)."""
    live = bytearray(VSIZE)

    def write(d, seed, off, length):
        data = pattern(seed, length)
        d.pwrite(data, off)
        live[off:off + length] = data

    snaps = {}
    with vdisk.create(path, VSIZE, block_size=BS) as d:
        write(d, 1, 0, 6 * BS)
        d.snapshot("s1").close()
        snaps["s1"] = bytes(live)
        write(d, 2, BS + 100, 200)
        write(d, 3, 2 * BS, BS)
        d.snapshot("s2").close()
        snaps["s2"] = bytes(live)
        write(d, 4, 2 * BS + 7, 10)
        write(d, 5, 3 * BS, 300)
    return Model(live, snaps)


def references(path) -> dict[int, tuple[int, int]]:
    """physical block -> (tables mapping it, its stored refcount), for every mapped block."""
    count: dict[int, int] = {}
    with vdisk.open(path) as d:
        tables = [d._table[:d._hdr.nblocks]]
        for info in d.snapshots:
            with d.open_snapshot(info.name) as s:
                tables.append(np.array(s._table[:-(-s.size // BS)]))
        for t in tables:
            for p in t[t != 0].tolist():
                count[p] = count.get(p, 0) + 1
        return {p: (n, int(d._refcounts[p])) for p, n in count.items()}


def phys_of(path, vblock: int, table: str = "live") -> int:
    with vdisk.open(path) as d:
        if table == "live":
            return int(d._table[vblock])
        with d.open_snapshot(table) as s:
            return int(s._table[vblock])


def set_refcount(path, phys: int, value: int) -> None:
    with vdisk.open(path) as d:
        off = d._hdr.refcount_offset + 2 * phys
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<H", value))


def assert_intact(path, model: Model, what: str) -> None:
    """The live disk and every snapshot the model holds read back exactly."""
    with vdisk.open(path) as d:
        assert sorted(i.name for i in d.snapshots) == sorted(model.snaps), what
        live = d.pread(d.size, 0)
        for b in range(VSIZE // BS):
            assert live[b * BS:(b + 1) * BS] == model.live[b * BS:(b + 1) * BS], \
                f"{what}: live block {b} reads other data"
        for name, content in model.snaps.items():
            with d.open_snapshot(name) as s:
                got = s.pread(s.size, 0)
            for b in range(VSIZE // BS):
                assert got[b * BS:(b + 1) * BS] == content[b * BS:(b + 1) * BS], \
                    f"{what}: snapshot {name!r} block {b} changed"


def write_new_blocks(d, model: Model, seed: int, first: int = 100, count: int = 16) -> None:
    """Whole blocks into unallocated virtual blocks: they take the lowest free
    physical blocks, where a wrongly freed one would be reused."""
    for i in range(count):
        data = pattern(seed + i, BS)
        d.pwrite(data, (first + i) * BS)
        model.live[(first + i) * BS:(first + i + 1) * BS] = data
    d.flush()


def overwrite(d, model: Model, vblock: int, seed: int) -> None:
    """A partial write: in place if the block's refcount says 1, else copied."""
    data = pattern(seed, 100)
    d.pwrite(data, vblock * BS + 50)
    model.live[vblock * BS + 50:vblock * BS + 150] = data
    d.flush()


# ============================================================================ the cases
# (what to damage: virtual block and the table it is read from, refcount written; the operations)
def _op_write0(d, m):
    overwrite(d, m, 0, 10)


def _op_delete_s1_write0(d, m):
    d.delete_snapshot("s1")
    del m.snaps["s1"]
    overwrite(d, m, 0, 11)


def _op_delete_s2_reuse(d, m):
    d.delete_snapshot("s2")
    del m.snaps["s2"]
    write_new_blocks(d, m, 12)


def _op_delete_s1_reuse(d, m):
    d.delete_snapshot("s1")
    del m.snaps["s1"]
    write_new_blocks(d, m, 13)


def _op_revert_s2_write1(d, m):
    d.revert("s2")
    m.live = bytearray(m.snaps["s2"])
    overwrite(d, m, 1, 14)


def _op_reuse(d, m):
    write_new_blocks(d, m, 15)


CASES = {
    # block 0 is live + s1 + s2 (3): an in-place write changes both snapshots
    "live_and_two_snapshots_at_1": (0, "live", 1, _op_write0),
    # ... at 2: deleting s1 leaves 1, then the write goes in place and changes s2
    "live_and_two_snapshots_at_2": (0, "live", 2, _op_delete_s1_write0),
    # live's block 1 is live + s2 (2): deleting s2 frees a block the live table maps
    "live_and_snapshot_delete": (1, "live", 1, _op_delete_s2_reuse),
    # s1's block 3 is s1 + s2 (2): deleting s1 frees a block s2 maps
    "two_snapshots_delete": (3, "s1", 1, _op_delete_s1_reuse),
    # live's block 1 again: a revert to s2 leaves live and s2 on it at refcount 1
    "live_and_snapshot_revert": (1, "live", 1, _op_revert_s2_write1),
    # s1's block 1 is s1 only (1): at 0 it is free while s1 maps it
    "snapshot_only_at_0": (1, "s1", 0, _op_reuse),
}


@pytest.mark.parametrize("case", list(CASES))
def test_undercounted_shared_block(img, case):
    vblock, table, value, op = CASES[case]
    model = build(img)
    phys = phys_of(img, vblock, table)
    refs, stored = references(img)[phys]
    assert value < refs == stored
    set_refcount(img, phys, value)
    try:
        d = vdisk.open(img, "r+")
    except vdisk.CorruptImageError as exc:
        refused = exc
    else:                       # not refused: the operations show the damage it does
        with d:
            op(d, model)
        assert_intact(img, model, f"{case} on the damaged image")
        pytest.fail(f"{case}: a writable open accepted physical block {phys} at refcount {value} "
                    f"with {refs} references")
    assert f"physical block {phys}" in str(refused) and "check --repair" in str(refused), refused
    # read-only: opens (reads do not depend on refcounts) and reads everything intact; a snapshot
    # table entry at refcount 0 is refused when the snapshot is opened, as in the live table
    if value:
        assert_intact(img, model, f"{case}, read-only")
    else:
        with vdisk.open(img) as d, pytest.raises(vdisk.CorruptImageError, match="refcount is 0"):
            d.open_snapshot(table)
    r = vdisk.check(img)
    assert not r.ok and r.leaked_blocks == 0, r
    assert any(f"physical block {phys}: refcount {value}, but {refs} references" in c
               for c in r.corruptions), r
    r = vdisk.check(img, repair=True)
    assert r.ok and r.repaired, r
    assert references(img)[phys] == (refs, refs)
    with vdisk.open(img, "r+") as d:
        op(d, model)
    assert_intact(img, model, f"{case} after repair")
    assert vdisk.check(img).ok


def test_overcounted_shared_block_is_a_leak(img):
    """A refcount higher than the references opens; check reports a leak only."""
    model = build(img)
    phys = phys_of(img, 0)
    set_refcount(img, phys, 7)
    with vdisk.open(img, "r+") as d:
        d.delete_snapshot("s1")
        del model.snaps["s1"]
        d.delete_snapshot("s2")
        del model.snaps["s2"]
        overwrite(d, model, 0, 20)      # refcount 5 now: copied, never in place
        write_new_blocks(d, model, 21)
    assert_intact(img, model, "overcounted")
    r = vdisk.check(img)
    assert not r.ok and r.corruptions == [] and r.leaked_blocks == 1, r
    assert vdisk.check(img, repair=True).ok
    assert_intact(img, model, "overcounted, repaired")


def test_refcount_at_the_cap_revert_refused(img):
    """A refcount of 65,535 on a shared block is a leak, allowed; a revert
    must not add the new table's reference to it (it wrapped to 0: a free
    block three tables map, written to the file, and a ValueError)."""
    model = build(img)
    phys = phys_of(img, 0)
    set_refcount(img, phys, 65535)
    with vdisk.open(img, "r+") as d:
        with pytest.raises(vdisk.OutOfRangeError, match="exceed 65535 references"):
            d.revert("s1")
        overwrite(d, model, 0, 30)          # still works: copied on write
    assert_intact(img, model, "after the refused revert")
    r = vdisk.check(img)
    assert r.corruptions == [] and r.leaked_blocks == 1, r
    assert vdisk.check(img, repair=True).ok
    with vdisk.open(img, "r+") as d:
        d.revert("s1")
        model.live = bytearray(model.snaps["s1"])
    assert_intact(img, model, "reverted after repair")
    assert vdisk.check(img).ok


def test_revert_to_a_snapshot_mapping_a_block_twice_refused(img):
    """A snapshot table mapping one block from two entries (refcount counting
    both) reads fine and deletes fine, but cannot become the live table: the
    revert raised one reference for two entries, and a later delete left two
    virtual blocks on one block at refcount 1 (a write to one changed the other)."""
    model = build(img)
    with vdisk.open(img) as d:
        s1 = d._snapshots[0]
        phys = phys_of(img, 4, "s1")
    with open(img, "r+b") as f:         # s1's block 9 (unallocated) now maps s1's block 4 too
        f.seek(s1.table_offset + 4 * 9)
        f.write(struct.pack("<I", phys))
    refs, stored = references(img)[phys]
    set_refcount(img, phys, refs)
    model.snaps["s1"] = model.snaps["s1"][:9 * BS] + model.snaps["s1"][4 * BS:5 * BS] + model.snaps["s1"][10 * BS:]
    assert_intact(img, model, "damaged, consistent refcount")
    found = vdisk.check(img)                # check reports it (repair is tested in test_check_repairs_...)
    assert not found.ok and any("which an earlier block of the same snapshot maps" in c
                                for c in found.corruptions), found
    with vdisk.open(img, "r+") as d:
        with pytest.raises(vdisk.CorruptImageError, match="from two entries"):
            d.revert("s1")
        d.delete_snapshot("s2")
        del model.snaps["s2"]
        overwrite(d, model, 4, 31)
        write_new_blocks(d, model, 32)
    assert_intact(img, model, "after the refused revert")
    with vdisk.open(img, "r+") as d:
        d.delete_snapshot("s1")
        del model.snaps["s1"]
        write_new_blocks(d, model, 48, first=120)
    assert_intact(img, model, "after deleting s1")
    assert vdisk.check(img).ok


def test_check_repairs_a_snapshot_mapping_a_block_twice(img):
    """Repair keeps the first entry, clears the later one (it reads zeros and its
    frozen counter marks it changed), and the reference count follows."""
    model = build(img)
    with vdisk.open(img) as d:
        s1 = d._snapshots[0]
        phys = phys_of(img, 4, "s1")
        gen = s1.generation
    with open(img, "r+b") as f:
        f.seek(s1.table_offset + 4 * 9)
        f.write(struct.pack("<I", phys))
    fixed = vdisk.check(img, repair=True)
    assert fixed.ok and fixed.repaired, fixed
    with vdisk.open(img, "r+") as d:
        with d.open_snapshot("s1") as s:
            assert s.pread(BS, 9 * BS) == bytes(BS)
            assert s.pread(BS, 4 * BS) == model.snaps["s1"][4 * BS:5 * BS]
            assert s._load_counters()[9] == gen   # changed at the snapshot's own point: reported
        d.revert("s1")                          # a consistent table now
    assert vdisk.check(img).ok


def test_snapshot_entry_into_metadata_refused_at_writable_open(img):
    """A snapshot table entry pointing at the live block table: deleting the
    snapshot would drop the table block's refcount to 0 and hand it out for data."""
    model = build(img)
    with vdisk.open(img) as d:
        target = d._hdr.table_offset // BS
        entry = d._snapshots[1].table_offset + 4 * 5      # s2's block 5
    with open(img, "r+b") as f:
        f.seek(entry)
        f.write(struct.pack("<I", target))
    with pytest.raises(vdisk.CorruptImageError, match="metadata"):
        vdisk.open(img, "r+")
    r = vdisk.check(img)
    assert not r.ok and any("metadata" in c for c in r.corruptions), r
    assert vdisk.check(img, repair=True).ok
    model.snaps["s2"] = model.snaps["s2"][:5 * BS] + bytes(BS) + model.snaps["s2"][6 * BS:]
    with vdisk.open(img, "r+") as d:
        _op_delete_s1_reuse(d, model)
    assert_intact(img, model, "after repair")


@pytest.mark.parametrize("where", ["past_file", "header_area"])
def test_snapshot_entry_outside_data_area_refused_at_writable_open(img, where):
    build(img)
    with vdisk.open(img) as d:
        value = {"past_file": d._end_block + 50, "header_area": 1}[where]
        entry = d._snapshots[0].table_offset + 4 * 2
    with open(img, "r+b") as f:
        f.seek(entry)
        f.write(struct.pack("<I", value))
    with pytest.raises(vdisk.CorruptImageError, match="outside the data area"):
        vdisk.open(img, "r+")
    assert not vdisk.check(img).ok
    assert vdisk.check(img, repair=True).ok
    with vdisk.open(img, "r+") as d:
        d.delete_snapshot("s1")
    assert vdisk.check(img).ok


def test_cli_refuses_reports_and_repairs(img):
    from click.testing import CliRunner
    from vdisk.cli import main

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    build(img)
    set_refcount(img, phys_of(img, 0), 1)
    r = run("snapshot", "delete", img, "s1")
    assert r.exit_code != 0 and "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.splitlines()) == 1 and "check --repair" in r.stderr, r.stderr
    r = run("check", img)
    assert r.exit_code == 2 and "refcount 1, but 3 references" in r.stdout, r.stdout
    assert run("check", img, "--repair").exit_code == 0
    assert run("snapshot", "delete", img, "s1").exit_code == 0
    assert run("check", img).exit_code == 0


# ============================================================================ random workloads, random damage
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_refcount_damage(tmp_path, data):
    """Random writes and snapshots; one mapped block's refcount set to a random
    value.  Below its references: a writable open refuses, check reports that
    block, repair makes it work.  At or above: it opens (a leak when above).
    Then every snapshot is deleted in a random order between writes to every
    block, and every content is checked after each step."""
    path = str(tmp_path / "r.vdk")
    nb = 64
    model = Model(bytearray(nb * BS), {})
    with vdisk.create(path, nb * BS, block_size=BS, overwrite=True) as d:
        for i in range(data.draw(st.integers(1, 4), label="snapshots")):
            for b in data.draw(st.lists(st.integers(0, nb - 1), min_size=1, max_size=12), label="writes"):
                buf = pattern(b * 100 + i, data.draw(st.sampled_from([100, BS])))
                d.pwrite(buf, b * BS)
                model.live[b * BS:b * BS + len(buf)] = buf
            d.snapshot(f"s{i}").close()
            model.snaps[f"s{i}"] = bytes(model.live)
        for b in data.draw(st.lists(st.integers(0, nb - 1), max_size=8), label="writes after"):
            buf = pattern(b * 100 + 99, 100)
            d.pwrite(buf, b * BS)
            model.live[b * BS:b * BS + 100] = buf
    refs = references(path)
    phys = data.draw(st.sampled_from(sorted(refs)), label="block")
    n, stored = refs[phys]
    assert stored == n
    value = data.draw(st.integers(0, n + 3), label="refcount")
    set_refcount(path, phys, value)
    if value < n:
        with pytest.raises(vdisk.CorruptImageError, match=f"physical block {phys}"):
            vdisk.open(path, "r+")
        r = vdisk.check(path)
        assert not r.ok and r.leaked_blocks == 0 and any(f"physical block {phys}:" in c for c in r.corruptions), r
        assert vdisk.check(path, repair=True).ok
    elif value > n:
        r = vdisk.check(path)
        assert r.corruptions == [] and r.leaked_blocks == 1, r
    assert_intact(path, model, "before the workload")
    with vdisk.open(path, "r+") as d:
        order = data.draw(st.permutations(sorted(model.snaps)), label="delete order")
        for k, name in enumerate(order):
            d.delete_snapshot(name)
            del model.snaps[name]
            for b in range(nb):
                buf = pattern(1000 * k + b, 64)
                d.pwrite(buf, b * BS + 64 * k)
                model.live[b * BS + 64 * k:b * BS + 64 * k + 64] = buf
            d.flush()
            assert d.pread(nb * BS, 0) == model.live
            for other in model.snaps:
                with d.open_snapshot(other) as s:
                    assert s.pread(s.size, 0) == model.snaps[other], (name, other)
    r = vdisk.check(path)
    assert r.corruptions == [], r
    assert r.leaked_blocks == (1 if value > n else 0), r


# ============================================================================ the kernel
def _kernel_reference(table, lo, hi, ranges, refcounts):
    counts = {}
    for i, v in enumerate(table.tolist()):
        if not v:
            continue
        if not lo <= v < hi:
            return i, 1
        if any(a <= v < b for a, b in ranges):
            return i, 2
        if counts.get(v, 0) >= refcounts[v]:
            return i, 3
        counts[v] = counts.get(v, 0) + 1
    return -1, 0


@settings(max_examples=300, deadline=None)
@given(data=st.data(), hi=st.integers(1, 300), shift=st.integers(0, 9))
def test_count_refs_within_matches_a_reference(data, hi, shift):
    """The kernel of the validation against a plain loop: edges of the data
    area and of every metadata range, refcounts 0 to 3."""
    from vdisk import _fast
    lo = data.draw(st.integers(0, hi))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, hi + 5), max_size=8))))
    ranges = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    refcounts = np.array(data.draw(st.lists(st.integers(0, 3), min_size=hi + 8, max_size=hi + 8)), np.uint16)
    table = np.array(data.draw(st.lists(st.integers(0, hi + 6), max_size=60)), np.uint32)
    cells = np.zeros((hi >> shift) + 1, np.uint8)
    for a, b in ranges:
        cells[a >> shift:((b - 1) >> shift) + 1] = 1
    counts = np.zeros(hi, np.uint16)
    got = _fast.count_refs_within(table, len(table), lo, hi, np.array([a for a, _ in ranges], np.int64),
                                  np.array([b for _, b in ranges], np.int64), cells, shift, counts,
                                  refcounts[:hi])
    assert got == _kernel_reference(table, lo, hi, ranges, refcounts)
    assert (counts <= refcounts[:hi]).all()


# ============================================================================ memory
def test_writable_open_with_snapshots_of_a_1tib_disk_bounded(tmp_path):
    """The validation at a writable open streams the snapshot tables: memory
    follows the pages the file holds, not the 1 GiB tables a 1 TiB disk at
    4 KiB blocks has (2**28 entries each)."""
    path = str(tmp_path / "big.vdk")
    rng = np.random.default_rng(5)
    with vdisk.create(path, "1TiB", block_size="4KiB") as d:
        for i in range(3):
            for b in np.unique(rng.integers(0, d._hdr.nblocks, 300)).tolist():
                d.pwrite(b"x" * 512, b * 4096)
            d.snapshot(f"s{i}").close()
    res = measure_in_child("""
with vdisk.open(args[0], "r+") as d:
    result["snapshots"] = len(d.snapshots)
""", path)
    assert res["error"] is None and res["snapshots"] == 3, res
    print(f"writable open, 1 TiB, 3 snapshots: {res['growth'] / MiB:.0f} MiB, {res['seconds']:.2f} s")
    assert res["growth"] < 64 * MiB, f"{res['growth'] / MiB:.0f} MiB"
