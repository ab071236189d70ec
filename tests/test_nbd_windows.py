"""Block status answered from reused windows (vdisk/nbd/exports.py, Window).

A context keeps its last answer over a window of the disk and answers the
next requests inside it without asking the Disk again, while the image's
version stays.  What must hold: every answer equals the per-request answer
(a byte model, and Disk.changes_in / map_range asked fresh), whatever was
written, trimmed or zeroed in between on any connection; a Disk the
server does not own (a program may write to it behind the server's back)
is asked on every request; and a walk over the disk asks the Disk about
once per window, not once per request.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import vdisk
from vdisk_testkit.nbd_client import Client
from vdisk.nbd import Server, protocol as P
from vdisk.nbd.exports import WINDOW_FACTOR, Window, describe

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = 64 * KiB
DIRTY = "qemu:dirty-bitmap:c"
ALLOC = P.BASE_ALLOCATION


@settings(max_examples=300, deadline=None)
@given(points=st.lists(st.integers(0, 300), max_size=40, unique=True), window=st.tuples(st.integers(0, 300),
       st.integers(0, 300)), request=st.tuples(st.integers(0, 300), st.integers(0, 300)),
       limit=st.sampled_from([1, 2, 3, 65536]))
def test_window_payload_equals_describe(points, window, request, limit):
    """Any request inside any window: the same descriptors as describe() over
    the runs clipped to the request (the answer before windows), as wire bytes;
    and as a whole reply chunk (header and context id from protocol.py's structs)."""
    w0, w1 = sorted(window)
    r0, r1 = sorted(request)
    r0, r1 = max(r0, w0), min(r1, w1)
    if w0 == w1 or r0 >= r1:
        return
    pts = sorted(points)[:len(points) // 2 * 2]
    offs, ends = np.array(pts[0::2], dtype=np.uint64), np.array(pts[1::2], dtype=np.uint64)
    # the window's query gives the runs meeting it, clipped to it (what changes_in / map_range return)
    keep = (ends > w0) & (offs < w1)
    wo = np.maximum(offs[keep], np.uint64(w0))
    we = np.minimum(ends[keep], np.uint64(w1))
    win = Window(wo, we, w0, w1, 1, 0, 0)
    got = win.payload(r0, r1, limit)
    want = describe(offs, ends, r0, r1, 1, 0, limit).astype(">u4").tobytes()
    assert got == want
    cookie = (r0 << 40) | (r1 << 8) | limit % 251          # every byte of the cookie's 8 in play
    for ctx_id, done in ((1, True), (2 ** 32 - 1, False)):
        head = P.CHUNK_HEADER.pack(P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE if done else 0,
                                   P.NBD_REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(want))
        assert win.chunk(r0, r1, limit, cookie, ctx_id, done) == head + P.U32.pack(ctx_id) + want


@settings(max_examples=300, deadline=None)
@given(before=st.lists(st.integers(0, 200), max_size=30, unique=True),
       after=st.lists(st.integers(0, 200), max_size=30, unique=True),
       window=st.tuples(st.integers(0, 200), st.integers(0, 200)),
       written=st.lists(st.tuples(st.integers(0, 220), st.integers(0, 40)), max_size=12))
def test_a_patched_window_equals_the_window_computed_anew(before, after, window, written):
    """Window.patch: a window of the runs `before`, patched for written
    ranges (some outside it, overlapping, touching, more than PATCH_RANGES)
    where the truth became the runs `after` (and stayed `before` elsewhere),
    has the segments of a window computed from that truth."""
    w0, w1 = sorted(window)
    if w0 == w1:
        return
    ranges = [(a, a + n) for a, n in written]

    def runs(points):
        pts = sorted(points)[:len(points) // 2 * 2]
        return np.array(pts[0::2], dtype=np.uint64), np.array(pts[1::2], dtype=np.uint64)

    def bitmap(offs, ends, lo=0, hi=240):
        m = np.zeros(hi, dtype=bool)
        for o, e in zip(offs.tolist(), ends.tolist()):
            m[max(o, lo):min(e, hi)] = True
        return m

    old, new = bitmap(*runs(before)), bitmap(*runs(after))
    truth = old.copy()
    for a, b in ranges:             # the Disk changed where it was written, nowhere else
        truth[a:b] = new[a:b]

    def query(off, n):              # the runs meeting [off, off + n), clipped to it
        o, e = _runs_of(truth[off:off + n])
        return o + np.uint64(off), e + np.uint64(off)
    win = Window(*_clip(*_runs_of(old), w0, w1), w0, w1, 1, 0, 0)
    win.patch(ranges, query)
    want = Window(*_clip(*_runs_of(truth), w0, w1), w0, w1, 1, 0, 0)
    assert win.segments.bounds.tolist() == want.segments.bounds.tolist()
    assert win.segments.flags.tolist() == want.segments.flags.tolist()


def _runs_of(mask):
    idx = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return idx[0::2].astype(np.uint64), idx[1::2].astype(np.uint64)


def _clip(offs, ends, w0, w1):
    keep = (ends > w0) & (offs < w1)
    return np.maximum(offs[keep], np.uint64(w0)), np.minimum(ends[keep], np.uint64(w1))


def descs_of(runs, start: int, stop: int, inside: int, outside: int):
    """Descriptors of [start, stop) from Extents (the per-request truth)."""
    offs = np.asarray([o for o, _ in runs], dtype=np.uint64)
    ends = np.asarray([o + n for o, n in runs], dtype=np.uint64)
    return [tuple(x) for x in describe(offs, ends, start, stop, inside, outside, 1 << 20).tolist()]


@pytest.fixture
def image(tmp_path):
    """A 3 GiB image, data in scattered blocks, consumer c registered after some of them."""
    path = str(tmp_path / "w.vdk")
    with vdisk.create(path, 3 * GiB, block_size=BS) as d:
        for b in range(0, 3 * GiB // BS, 997):
            d.pwrite(b"\x01" * 4096, b * BS)
        d.consumers.register("c", d.checkpoint())
        for b in range(5, 3 * GiB // BS, 1499):
            d.pwrite(b"\x02" * 4096, b * BS + 100)
    return path


def walk(c: Client, start: int, stop: int, step: int) -> dict[str, list]:
    """Block status of [start, stop) in requests of step bytes, the descriptors joined."""
    out: dict[str, list] = {ALLOC: [], DIRTY: []}
    off = start
    while off < stop:
        n = min(step, stop - off)
        got = c.block_status(off, n)
        assert isinstance(got, dict), got
        covered = {}
        for name, descs in got.items():
            out[name] += descs
            covered[name] = sum(x for x, _ in descs)
        assert len(set(covered.values())) == 1, covered     # both contexts answered the same range
        off += covered[ALLOC]
    return out


def merged(descs):
    out: list[list[int]] = []
    for n, f in descs:
        if out and out[-1][1] == f:
            out[-1][0] += n
        else:
            out.append([n, f])
    return [tuple(x) for x in out]


def truth(d, start: int, stop: int):
    """The answers asked fresh of the Disk."""
    n = stop - start
    alloc = descs_of(list(d.map_range(start, n)), start, stop, 0, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO)
    cid = d.consumers["c"].change_id
    dirty = descs_of(list(d.changes_in(cid, start, n)), start, stop, P.NBD_STATE_DIRTY, 0)
    return {ALLOC: alloc, DIRTY: dirty}


def test_walks_see_every_change_made_between_them_on_any_connection(image, tmp_path):
    """The server owns the Disk (windows reused).  Each check walks the last
    GiB (where the previous check left the connection's window), the rest,
    and the last GiB again; between two checks, on the connection that walks
    and on another one, a write, a trim, zeroings (hole and NO_HOLE) in that
    last GiB: the first walk after each must see it, not the window before."""
    srv = Server(image, socket=str(tmp_path / "w.sock"))
    srv.start_in_thread()
    try:
        assert srv.image.sole_writer
        a = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        b = Client(srv.socket_path).connect("", contexts=[ALLOC])
        step = 64 * MiB
        parts = [(2 * GiB, 3 * GiB), (0, 2 * GiB), (2 * GiB, 3 * GiB)]

        def check():
            walks = []
            for lo, hi in parts:
                got = {k: merged(v) for k, v in walk(a, lo, hi, step).items()}
                assert got == {k: merged(v) for k, v in truth(srv.disk, lo, hi).items()}, (lo, hi)
                walks.append(got)
            return walks[0]

        before = check()
        steps = [
            (a, P.NBD_CMD_WRITE, 2 * GiB + 7 * BS + 5, b"\x03" * 10),     # same connection, a new block
            (b, P.NBD_CMD_WRITE, 2 * GiB + 3 * BS, b"\x04" * 4096),       # another connection
            (b, P.NBD_CMD_TRIM, 997 * 33 * BS, 2 * BS),                    # a hole where data was
            (a, P.NBD_CMD_WRITE_ZEROES, 997 * 34 * BS, BS),                # a hole where data was, changed
            (b, P.NBD_CMD_WRITE_ZEROES, 2 * GiB + 40 * BS, BS),            # zeros that stay allocated
        ]
        for i, (conn, cmd, off, arg) in enumerate(steps):
            if cmd == P.NBD_CMD_WRITE:
                r = conn.call(cmd, off, len(arg), 0, arg)
            else:
                flags = P.NBD_CMD_FLAG_NO_HOLE if i == 4 else 0
                r = conn.call(cmd, off, arg, flags)
            assert r.error == 0
            after = check()
            assert after != before, f"step {i}: the walk did not change"
            before = after
        assert a.call(P.NBD_CMD_FLUSH).error == 0      # a flush folds: the answers stay the same
        assert check() == before
        a.close()
        b.close()
    finally:
        srv.stop_in_thread()


@pytest.fixture
def disk_calls(monkeypatch) -> dict[str, int]:
    """Counts of the Disk's changes_in and map_range calls (the block-status
    queries; not the zero-length changes_in that checks an id is answerable)."""
    calls = {"changes_in": 0, "map_range": 0}
    for name in calls:
        real = getattr(vdisk.disk.Disk, name)

        def counting(self, *args, _real=real, _name=name):
            if args[-1]:
                calls[_name] += 1
            return _real(self, *args)
        monkeypatch.setattr(vdisk.disk.Disk, name, counting)
    return calls


def test_a_walk_asks_the_disk_once_per_window(image, tmp_path, disk_calls):
    """48 requests of 64 MiB over 3 GiB: with windows of 16x the request, the
    Disk is asked about 3 times per context, not 48."""
    calls = disk_calls
    srv = Server(image, socket=str(tmp_path / "w.sock"))
    srv.start_in_thread()
    try:
        a = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        for k in calls:
            calls[k] = 0
        walk(a, 0, 3 * GiB, 64 * MiB)
        a.close()
    finally:
        srv.stop_in_thread()
    per = -(-3 * GiB // (WINDOW_FACTOR * 64 * MiB))
    assert calls["changes_in"] <= per + 1 and calls["map_range"] <= per + 1, calls


def test_connections_asking_the_same_share_the_window(image, tmp_path, disk_calls):
    """A second connection walking an unchanged disk, twice, asks the Disk
    nothing: the export keeps each question's windows, not the connection.  After a
    write on either connection, the next walk asks again and sees it."""
    calls = disk_calls
    srv = Server(image, socket=str(tmp_path / "w.sock"))
    srv.start_in_thread()
    try:
        a = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        first = walk(a, 0, 3 * GiB, 256 * MiB)
        a.close()
        for k in calls:
            calls[k] = 0
        b = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        assert walk(b, 0, 3 * GiB, 256 * MiB) == first
        assert walk(b, 0, 3 * GiB, 256 * MiB) == first        # the walk's windows are all kept
        assert calls == {"changes_in": 0, "map_range": 0}, calls
        assert b.call(P.NBD_CMD_WRITE, 2 * BS + 9, 3, 0, b"\x06" * 3).error == 0
        c = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        got = {k: merged(v) for k, v in walk(c, 0, 3 * GiB, 256 * MiB).items()}
        assert calls["changes_in"] > 0
        assert got[DIRTY] == merged(truth(srv.disk, 0, 3 * GiB)[DIRTY]) != merged(first[DIRTY])
        b.close()
        c.close()
    finally:
        srv.stop_in_thread()


def test_after_a_write_a_walk_asks_the_disk_about_the_written_blocks_only(image, tmp_path, monkeypatch):
    """A walk keeps its windows; then writes, a trim, zeroings and a flush
    through the server, on two connections: the next walk asks the Disk
    only about the blocks those touched (each query at most the rounded-out
    range: no window is computed anew), and answers what the Disk answers.
    A failed write makes the next walk ask everything anew."""
    asked: list[tuple[str, int, int]] = []
    for name in ("changes_in", "map_range"):
        real = getattr(vdisk.disk.Disk, name)

        def recording(self, *args, _real=real, _name=name):
            if args[-1] and threading.current_thread() is not threading.main_thread():     # the server's
                asked.append((_name, args[-2], args[-1]))
            return _real(self, *args)
        monkeypatch.setattr(vdisk.disk.Disk, name, recording)
    srv = Server(image, socket=str(tmp_path / "w.sock"))
    srv.start_in_thread()
    try:
        a = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        b = Client(srv.socket_path).connect("", contexts=[ALLOC])
        walk(a, 0, 3 * GiB, 256 * MiB)
        assert max(n for _, _, n in asked) >= 1 * GiB              # the first walk built windows
        changes = [(a, P.NBD_CMD_WRITE, 2 * GiB + 7 * BS + 5, 10, 0), (b, P.NBD_CMD_WRITE, 3 * BS - 2, 4, 0),
                   (b, P.NBD_CMD_TRIM, 997 * 33 * BS, 2 * BS, 0), (a, P.NBD_CMD_WRITE_ZEROES, 997 * 34 * BS, BS, 0),
                   (b, P.NBD_CMD_WRITE_ZEROES, 40 * BS, BS, P.NBD_CMD_FLAG_NO_HOLE), (a, P.NBD_CMD_FLUSH, 0, 0, 0)]
        for conn, cmd, off, n, flags in changes:
            asked.clear()
            data = b"\x09" * n if cmd == P.NBD_CMD_WRITE else b""
            assert conn.call(cmd, off, n, flags, data).error == 0
            got = {k: merged(v) for k, v in walk(a, 0, 3 * GiB, 256 * MiB).items()}
            assert got == {k: merged(v) for k, v in truth(srv.disk, 0, 3 * GiB).items()}
            if cmd == P.NBD_CMD_FLUSH:
                assert asked == [], f"a flush made the walk ask {asked}"
                continue
            lo, hi = off // BS * BS, -(-(off + n) // BS) * BS       # the blocks it touched
            assert asked and all(lo <= o and o + length <= hi for _, o, length in asked), (cmd, asked)
        asked.clear()
        assert a.call(P.NBD_CMD_WRITE, 3 * GiB - 10, 20, 0, b"\x01" * 20).error != 0     # past the end
        walk(a, 0, 3 * GiB, 256 * MiB)
        assert asked == [], asked                  # refused before it ran: nothing changed
        real_pwrite = vdisk.disk.Disk.pwrite

        def failing(self, data, offset):
            real_pwrite(self, data, offset)         # done, then it fails: the answers may have changed
            raise vdisk.VdiskIOError("injected")
        monkeypatch.setattr(vdisk.disk.Disk, "pwrite", failing)
        assert a.call(P.NBD_CMD_WRITE, 5 * BS, 3, 0, b"\x02" * 3).error != 0
        monkeypatch.setattr(vdisk.disk.Disk, "pwrite", real_pwrite)
        got = {k: merged(v) for k, v in walk(a, 0, 3 * GiB, 256 * MiB).items()}
        assert got == {k: merged(v) for k, v in truth(srv.disk, 0, 3 * GiB).items()}
        assert max(n for _, _, n in asked) >= 1 * GiB, asked     # every window computed anew
        a.close()
        b.close()
    finally:
        srv.stop_in_thread()


def test_a_consumer_moved_between_two_connections_answers_each_its_own_id(image, tmp_path, monkeypatch):
    """Connection a selects qemu:dirty-bitmap:c while c is at its first id,
    then c is updated to a newer checkpoint (the control channel) and
    connection b selects the same name: the two contexts ask different
    questions, so a's walk keeps reporting everything since c's first id
    (b's shorter answer, computed at the same image version, is never
    handed to a: that would under-report)."""
    import subprocess
    import sys
    monkeypatch.setenv("VDISK_RUNTIME_DIR", str(tmp_path / "run"))     # the control channel's, this test's own
    with vdisk.open(image) as d:
        old = d.consumers["c"].change_id
    srv = Server(image, socket=str(tmp_path / "w.sock"))
    srv.start_in_thread()
    try:
        a = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        newer = srv.disk.checkpoint()
        r = subprocess.run([sys.executable, "-m", "vdisk", "consumer", "update", image, "c", newer],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        b = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        got_b = merged(walk(b, 0, 3 * GiB, 256 * MiB)[DIRTY])
        got_a = merged(walk(a, 0, 3 * GiB, 256 * MiB)[DIRTY])
        want_a = merged(descs_of(list(srv.disk.changes_in(old, 0, 3 * GiB)), 0, 3 * GiB, P.NBD_STATE_DIRTY, 0))
        assert got_a == want_a and any(f for _, f in got_a)
        assert got_b == [(3 * GiB, 0)]          # nothing changed since the newer checkpoint
        a.close()
        b.close()
    finally:
        srv.stop_in_thread()


def test_a_disk_the_program_owns_is_asked_on_every_request(image, tmp_path):
    """A Disk passed in: the program may write to it behind the server's back,
    so no answer is reused: a write made directly shows in the next request."""
    with vdisk.open(image, "r+") as d:
        srv = Server(d, socket=str(tmp_path / "w.sock"))
        srv.start_in_thread()
        try:
            assert not srv.image.sole_writer
            a = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
            first = a.block_status(0, 64 * MiB)
            d.pwrite(b"\x05" * 10, 3 * BS)          # a never-written block, not through the server
            second = a.block_status(0, 64 * MiB)
            assert second != first
            assert merged(second[DIRTY]) == merged(descs_of(list(d.changes_in(d.consumers["c"].change_id, 0,
                                                                               64 * MiB)), 0, 64 * MiB,
                                                            P.NBD_STATE_DIRTY, 0))
            a.close()
        finally:
            srv.stop_in_thread()


def test_a_walk_of_a_large_sparse_disk_grows_its_windows(tmp_path, disk_calls):
    """A client walking a 1 TiB disk with few changes in 4 GiB requests (as
    nbdinfo --map does): each window starting where the last one ended covers
    WINDOW_GROWTH times its span, so the Disk is asked 3 times per context
    (64 GiB, 256 GiB, the rest), not 16; the answers equal the Disk's."""
    from vdisk.nbd.exports import WINDOW_GROWTH
    path = str(tmp_path / "big.vdk")
    with vdisk.create(path, 1 << 40, block_size=BS) as d:
        d.consumers.register("c", d.checkpoint())
        for k in range(64):
            d.pwrite(b"\x07" * 4096, (k * 16 * GiB) + k * BS)
    calls = disk_calls
    srv = Server(path, socket=str(tmp_path / "b.sock"))
    srv.start_in_thread()
    try:
        a = Client(srv.socket_path).connect("", contexts=[ALLOC, DIRTY])
        for k in calls:
            calls[k] = 0
        step = 4 * GiB - BS
        got = {k: merged(v) for k, v in walk(a, 0, 1 << 40, step).items()}
        a.close()
        asked = dict(calls)
        assert got == {k: merged(v) for k, v in truth(srv.disk, 0, 1 << 40).items()}
    finally:
        srv.stop_in_thread()
    spans, covered = [], 0
    while covered < 1 << 40:
        span = max(WINDOW_FACTOR * step, 1 << 30) if not spans else max(WINDOW_FACTOR * step,
                                                                        WINDOW_GROWTH * spans[-1])
        spans.append(min(span, (1 << 40) - covered))
        covered += spans[-1]
    assert len(spans) == 3
    assert asked == {"changes_in": len(spans), "map_range": len(spans)}, asked


def test_segments_and_wire_refuse_what_they_cannot_answer():
    from vdisk import _fast
    b, f = _fast.segments(np.array([10], np.uint64), np.array([20], np.uint64), 0, 30, 1, 0)
    assert b.tolist() == [0, 10, 20, 30] and f.tolist() == [0, 1, 0]
    with pytest.raises(ValueError):
        _fast.segments(np.array([], np.uint64), np.array([], np.uint64), 5, 5, 1, 0)
    with pytest.raises(ValueError):
        _fast.block_status_wire(b, f, 25, 31, 10)          # past the window
    with pytest.raises(ValueError):
        _fast.block_status_wire(b, f, 0, 10, 0)            # no descriptor allowed
    assert _fast.block_status_wire(b, f, 5, 25, 2) == bytes.fromhex("00000005 00000000 0000000a 00000001")


def test_read_buffers_are_not_zero_filled_but_sized():
    """The server's large-read buffers come from _fast.empty_bytearray (no
    memset: 11% of the server's CPU on 1 MiB reads at qd 16 was bytearray(n)'s
    zero fill); preadinto then fills the data part whole."""
    from vdisk import _fast
    b = _fast.empty_bytearray(1 << 20)
    assert type(b) is bytearray and len(b) == 1 << 20
    b[:3] = b"abc"
    assert bytes(b[:3]) == b"abc" and len(_fast.empty_bytearray(0)) == 0
    with pytest.raises(ValueError):
        _fast.empty_bytearray(-1)
