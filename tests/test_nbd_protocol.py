"""The NBD server against a raw client (vdisk_testkit/nbd_client.py): what real
clients refuse to send, the wire details they hide, and hostile input.

Each bad request must get a clean error reply (the connection goes on) or
a disconnect logged in one line; never a crash, a hang or unbounded memory,
and other connections never notice.
"""
from __future__ import annotations

import logging
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vdisk
from vdisk.nbd import Server, protocol as P
from vdisk_testkit.fuzz import fuzz_nbd
from vdisk_testkit.nbd_client import Client

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB
SIZE = 4 * MiB + 1536          # not a multiple of the block size: the last block is partial


@pytest.fixture(scope="module", autouse=True)
def _fuzz_harness_closed():
    """The fuzz harness keeps one server and bystander for all its inputs:
    stopped and closed once this module's tests are done."""
    yield
    fuzz_nbd.close_state()


@pytest.fixture
def server(tmp_path):
    """A server in a thread over an image with data at [0, 100 KiB) and a snapshot."""
    path = str(tmp_path / "disk.vdk")
    with vdisk.create(path, SIZE, block_size=BS) as d:
        d.pwrite(b"\x01" * (100 * KiB), 0)
        cid = d.checkpoint()
        d.consumers.register("c", cid)
        d.pwrite(b"\x02" * 10, 2 * MiB)
        d.snapshot("s")
    srv = Server(path, socket=str(tmp_path / "s.sock"))
    srv.start_in_thread()
    yield srv
    srv.stop_in_thread()


def client(srv, export="", **kw) -> Client:
    return Client(srv.socket_path).connect(export, **kw)


def assert_alive(srv) -> None:
    """A fresh connection reads correct data: the server and other connections are unaffected."""
    c = client(srv)
    assert c.read(0, 8) == b"\x01" * 8
    c.close()


def test_handshake_flags_and_info(server):
    c = Client(server.socket_path)
    flags = c.greeting()
    assert flags == P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES
    replies = c.option(P.NBD_OPT_INFO, c.info_data("disk", [P.NBD_INFO_BLOCK_SIZE]))
    infos = {P.U16.unpack_from(d)[0]: d for t, d in replies if t == P.NBD_REP_INFO}
    _, size, tflags = P.INFO_EXPORT.unpack(infos[P.NBD_INFO_EXPORT])
    assert size == SIZE
    assert tflags & P.NBD_FLAG_CAN_MULTI_CONN and tflags & P.NBD_FLAG_SEND_FLUSH and not tflags & P.NBD_FLAG_READ_ONLY
    assert P.INFO_BLOCK_SIZE.unpack(infos[P.NBD_INFO_BLOCK_SIZE])[1:] == (1, BS, 32 * MiB)
    # unknown export; every unsupported option (extended headers first) answered UNSUP, parsing goes on
    assert c.option(P.NBD_OPT_GO, c.info_data("nope"))[-1][0] == P.NBD_REP_ERR_UNKNOWN
    for opt in (P.NBD_OPT_EXTENDED_HEADERS, P.NBD_OPT_PEEK_EXPORT, 12345):
        assert c.option(opt, b"xyz")[-1][0] == P.NBD_REP_ERR_UNSUP
    assert c.option(P.NBD_OPT_STARTTLS)[-1][0] == P.NBD_REP_ERR_POLICY     # no TLS configured
    assert c.list_exports() == ["disk", "disk@s"]
    # meta contexts need structured replies first
    assert c.meta(P.NBD_OPT_LIST_META_CONTEXT, "", []) == P.NBD_REP_ERR_INVALID
    assert c.option(P.NBD_OPT_STRUCTURED_REPLY)[-1][0] == P.NBD_REP_ACK
    assert list(c.meta(P.NBD_OPT_LIST_META_CONTEXT, "", []).values()) == ["base:allocation", "qemu:dirty-bitmap:c"]
    assert list(c.meta(P.NBD_OPT_LIST_META_CONTEXT, "", ["qemu:"]).values()) == ["qemu:dirty-bitmap:c"]
    assert list(c.meta(P.NBD_OPT_LIST_META_CONTEXT, "", ["qemu:dirty-bitmap:"]).values()) == ["qemu:dirty-bitmap:c"]
    assert list(c.meta(P.NBD_OPT_LIST_META_CONTEXT, "", ["base:"]).values()) == ["base:allocation"]
    # a stale, foreign or malformed id is not offered
    stale = ["qemu:dirty-bitmap:00000000-0000-0000-0000-000000000000/1", "qemu:dirty-bitmap:junk", "other:x"]
    assert c.meta(P.NBD_OPT_SET_META_CONTEXT, "", stale) == {}
    assert c.option(P.NBD_OPT_ABORT)[-1][0] == P.NBD_REP_ACK
    assert c.closed_by_server()
    c.close()


def test_export_name_option_and_no_zeroes(server):
    for client_flags, pad in ((P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES, 0),
                              (P.NBD_FLAG_C_FIXED_NEWSTYLE, P.EXPORT_NAME_PADDING)):
        c = Client(server.socket_path)
        c.greeting(client_flags)
        c.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 4) + b"disk")
        size, flags = P.EXPORT_NAME_REPLY.unpack(c.recv(10))
        assert size == SIZE and c.recv(pad) == bytes(pad)
        c.structured = False
        assert c.read(0, 4) == b"\x01" * 4
        c.close()
    c = Client(server.socket_path)                  # an unknown name: the server must disconnect
    c.greeting()
    c.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 3) + b"bad")
    assert c.closed_by_server()
    c.close()


def test_bad_requests_get_clean_errors(server):
    c = client(server)
    other = client(server)                          # an onlooker on another connection
    cases = [
        (P.NBD_CMD_READ, SIZE - 10, 20, 0, P.NBD_EINVAL),            # past the end
        (P.NBD_CMD_READ, 2 ** 63, 1, 0, P.NBD_EINVAL),
        (P.NBD_CMD_WRITE_ZEROES, SIZE, 1, 0, P.NBD_ENOSPC),
        (P.NBD_CMD_TRIM, SIZE - 1, 2, 0, P.NBD_EINVAL),
        (P.NBD_CMD_READ, 0, 32 * MiB + 1, 0, P.NBD_EINVAL),          # oversize
        (P.NBD_CMD_CACHE, 0, SIZE + 1, 0, P.NBD_EINVAL),
        (P.NBD_CMD_READ, 0, 10, 1 << 9, P.NBD_EINVAL),               # unknown flag
        (P.NBD_CMD_FLUSH, 0, 0, P.NBD_CMD_FLAG_FUA, P.NBD_EINVAL),
        (P.NBD_CMD_TRIM, 0, 10, P.NBD_CMD_FLAG_REQ_ONE, P.NBD_EINVAL),
        (99, 0, 10, 0, P.NBD_EINVAL),                                # unknown command
        (P.NBD_CMD_RESIZE, 0, 0, 0, P.NBD_EINVAL),
        (P.NBD_CMD_BLOCK_STATUS, 0, 10, 0, P.NBD_EINVAL),            # no meta context negotiated
        (P.NBD_CMD_WRITE_ZEROES, 0, BS, P.NBD_CMD_FLAG_FAST_ZERO | P.NBD_CMD_FLAG_NO_HOLE, P.NBD_ENOTSUP),
    ]
    for cmd, off, length, flags, err in cases:
        r = c.call(cmd, off, length, flags)
        assert r.error == err, (cmd, off, length, flags, r.error)
        assert other.read(0, 4) == b"\x01" * 4
    r = c.call(P.NBD_CMD_WRITE, SIZE - 1, 2, 0, b"ab")             # past the end: the payload is consumed
    assert r.error == P.NBD_ENOSPC
    assert c.read(0, 100 * KiB) == b"\x01" * (100 * KiB)            # the connection goes on
    # a fast zero that really is fast (a hole) is done
    assert c.call(P.NBD_CMD_WRITE_ZEROES, 0, BS, P.NBD_CMD_FLAG_FAST_ZERO).error == 0
    assert c.read(0, BS) == bytes(BS)
    c.close()
    other.close()


def test_read_only_export_answers_writes_eperm(server):
    c = client(server, "disk@s")
    assert c.flags & P.NBD_FLAG_READ_ONLY
    for cmd in (P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES):
        payload = b"x" * 8 if cmd == P.NBD_CMD_WRITE else b""
        assert c.call(cmd, 0, 8, 0, payload).error == P.NBD_EPERM
    assert c.call(P.NBD_CMD_FLUSH).error == 0
    assert c.read(2 * MiB, 10) == b"\x02" * 10
    c.close()
    with server.disk.open_snapshot("s") as snap:
        assert snap.pread(8, 0) == b"\x01" * 8


def test_structured_read_holes_and_df(server):
    c = client(server)
    r = c.call(P.NBD_CMD_READ, 0, 3 * BS)
    kinds = [(ch.type, ch.flags & P.NBD_REPLY_FLAG_DONE) for ch in r.chunks]
    # [0, 100 KiB) is data in blocks 0-1, block 2 is a hole
    assert kinds == [(P.NBD_REPLY_TYPE_OFFSET_DATA, 0), (P.NBD_REPLY_TYPE_OFFSET_HOLE, 1)]
    assert c.read(0, 3 * BS) == b"\x01" * (100 * KiB) + bytes(3 * BS - 100 * KiB)
    r = c.call(P.NBD_CMD_READ, 0, 3 * BS, P.NBD_CMD_FLAG_DF)
    assert [ch.type for ch in r.chunks] == [P.NBD_REPLY_TYPE_OFFSET_DATA]
    r = c.call(P.NBD_CMD_READ, 3 * BS, BS)
    assert [ch.type for ch in r.chunks] == [P.NBD_REPLY_TYPE_OFFSET_HOLE]
    c.close()
    plain = client(server, structured=False)
    assert plain.call(P.NBD_CMD_READ, 0, 10, P.NBD_CMD_FLAG_DF).error == P.NBD_EINVAL
    assert plain.read(SIZE - 1000, 1000) == bytes(1000)
    plain.close()


def test_block_status_clips_req_one_and_never_zero_length(server):
    ctxs = ["base:allocation", "qemu:dirty-bitmap:c", "qemu:dirty-bitmap:" + server.disk.consumers["c"].change_id]
    c = client(server, contexts=ctxs)
    assert sorted(c.contexts.values()) == sorted(ctxs)
    st_ = c.block_status(0, SIZE)
    assert st_["base:allocation"] == [(2 * BS, 0), (2 * MiB - 2 * BS, 3), (BS, 0), (SIZE - 2 * MiB - BS, 3)]
    assert st_["qemu:dirty-bitmap:c"] == [(2 * MiB, 0), (BS, 1), (SIZE - 2 * MiB - BS, 0)]
    assert st_[ctxs[2]] == st_["qemu:dirty-bitmap:c"]
    # clipped to an unaligned request inside runs; REQ_ONE: one descriptor per context
    st_ = c.block_status(100, 2 * BS)
    assert st_["base:allocation"] == [(2 * BS - 100, 0), (100, 3)]
    st_ = c.block_status(100, 2 * BS, P.NBD_CMD_FLAG_REQ_ONE)
    assert {k: v for k, v in st_.items()} == {"base:allocation": [(2 * BS - 100, 0)],
                                             "qemu:dirty-bitmap:c": [(2 * BS, 0)], ctxs[2]: [(2 * BS, 0)]}
    st_ = c.block_status(SIZE - 1, 1)                     # the last byte, in a partial block
    assert st_["base:allocation"] == [(1, 3)]
    assert c.block_status(0, 0) == P.NBD_EINVAL
    assert c.block_status(SIZE, 1) == P.NBD_EINVAL
    # writes move both contexts at once
    assert c.call(P.NBD_CMD_WRITE, 3 * MiB, 5, 0, b"hello").error == 0
    st_ = c.block_status(3 * MiB, BS)
    assert st_["base:allocation"] == [(BS, 0)] and st_["qemu:dirty-bitmap:c"] == [(BS, 1)]
    c.close()


def test_min_block_size_alignment(tmp_path):
    path = str(tmp_path / "a.vdk")
    vdisk.create(path, MiB, block_size=BS).close()
    with Server(path, socket=str(tmp_path / "a.sock"), min_block_size=512) as srv:
        c = client(srv)
        assert c.call(P.NBD_CMD_READ, 1, 512).error == P.NBD_EINVAL
        assert c.call(P.NBD_CMD_READ, 0, 100).error == P.NBD_EINVAL
        assert c.call(P.NBD_CMD_WRITE, 512, 3, 0, b"abc").error == P.NBD_EINVAL
        assert c.read(512, 512) == bytes(512)
        c.close()


def test_hostile_lengths_disconnect_one_client_only(server, caplog):
    caplog.set_level(logging.WARNING, logger="vdisk.nbd")
    bystander = client(server)
    bad = client(server)
    bad.request(P.NBD_CMD_WRITE, 0, 2 ** 32 - 1)        # a 4 GiB payload: never buffered
    assert bad.closed_by_server()
    bad2 = Client(server.socket_path)
    bad2.greeting()
    bad2.send(P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_GO, 2 ** 32 - 1))
    assert bad2.closed_by_server()
    bad3 = client(server)
    bad3.send(b"\xde\xad\xbe\xef" * 7)                  # a wrong request magic
    assert bad3.closed_by_server()
    assert bystander.read(0, 8) == b"\x01" * 8
    lines = [r.getMessage() for r in caplog.records if r.name == "vdisk.nbd"]
    assert len(lines) == 3 and all("disconnected" in m and "\n" not in m for m in lines), lines
    assert "4294967295" in lines[0] and "IHAVEOPT" not in lines[0]
    for x in (bystander, bad, bad2, bad3):
        x.close()


# ---------------------------------------------------------------------------- fuzz
def _prefix(state: str) -> bytes:
    """The bytes a client sends to reach a state."""
    flags = P.CLIENT_FLAGS.pack(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)
    if state == "greeting":
        return b""
    if state == "options":
        return flags
    go = P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_STRUCTURED_REPLY, 0)
    meta = Client.meta_data("", ["base:allocation", "qemu:dirty-bitmap:c"])
    go += P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_SET_META_CONTEXT, len(meta)) + meta
    info = Client.name_data("") + P.U16.pack(0)
    go += P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_GO, len(info)) + info
    return flags + go


def _drain(sock) -> int:
    """Read what the server sends until it closes; the byte count.  The client
    has half-closed: a server still silent after 10 s hangs."""
    import socket as _s
    total = 0
    sock.settimeout(10)
    while True:
        try:
            part = sock.recv(1 << 20)
        except _s.timeout:
            raise AssertionError("the server neither answered nor closed after the client's EOF") from None
        except ConnectionResetError:
            return total
        if not part:
            return total
        total += len(part)


_request = st.builds(lambda cmd, flags, off, n: P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, 7, off, n),
                     st.sampled_from(list(range(10)) + [255]), st.integers(0, 0xFFFF),
                     st.one_of(st.integers(0, SIZE + 10), st.integers(0, 2 ** 64 - 1)),
                     st.one_of(st.integers(0, 2 * BS), st.integers(0, 2 ** 32 - 1)))
_option = st.builds(lambda opt, data: P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data,
                    st.integers(0, 15), st.binary(max_size=64))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.sampled_from(["greeting", "options", "transmission"]),
       chunks=st.lists(st.one_of(st.binary(max_size=64), _request, _option), max_size=6))
def test_fuzz_every_state(server, state, chunks):
    import socket as _s
    s = _s.socket(_s.AF_UNIX)
    s.settimeout(5)
    s.connect(server.socket_path)
    try:
        s.sendall(_prefix(state) + b"".join(chunks))
        s.shutdown(_s.SHUT_WR)
        # the server answers within bounds (a 32 MiB read is the most one request may cost) and
        # then closes: reading would hang forever if it waited on a request it cannot finish
        assert _drain(s) <= 64 * MiB
    finally:
        s.close()
    assert_alive(server)


def test_many_connections_at_once(server):
    conns = [client(server) for _ in range(16)]
    errors = []

    def worker(i, c):
        try:
            data = bytes([i + 10]) * 4096
            off = MiB + i * 8192
            for _ in range(20):
                assert c.call(P.NBD_CMD_WRITE, off, 4096, 0, data).error == 0
                assert c.read(off, 4096) == data
        except Exception as exc:        # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in range(16):
        assert server.disk.pread(4096, MiB + i * 8192) == bytes([i + 10]) * 4096
    for c in conns:
        c.close()


def test_block_status_of_a_1tib_image_from_the_tracking_kernels(tmp_path):
    """A 1 TiB image with three changed blocks: exact answers for both contexts
    over whole 4 GiB requests, from Disk.map_range and changes_since alone:
    no full-table map() and no data read."""
    path = str(tmp_path / "big.vdk")
    tib = 1 << 40
    d = vdisk.create(path, tib)
    try:
        d.pwrite(b"a" * 100, 5 << 30)
        d.consumers.register("c", d.checkpoint())
        d.pwrite(b"b" * 100, 700 << 30)
        d.pwrite(b"c" * 10, tib - 10)
        with Server(d, socket=str(tmp_path / "b.sock")) as srv:
            def refuse(*a, **k):
                raise AssertionError("block status must not scan the whole table or read data")
            d.map = d.pread = d.preadinto = refuse
            c = client(srv, contexts=["base:allocation", "qemu:dirty-bitmap:c"])
            step = (1 << 32) - BS
            seen = {"base:allocation": [], "qemu:dirty-bitmap:c": []}
            for off in (4 << 30, 699 << 30, tib - step):
                got = c.block_status(off, step)
                for name, descs in got.items():
                    pos = off
                    for n, f in descs:
                        if f in (0, 1) and f == (0 if name == "base:allocation" else 1):
                            seen[name].append((pos, n))
                        pos += n
            assert seen["base:allocation"] == [(5 << 30, BS), (700 << 30, BS), (tib - BS, BS)]
            assert seen["qemu:dirty-bitmap:c"] == [(700 << 30, BS), (tib - BS, BS)]
            c.close()
    finally:
        d.__dict__.pop("map", None), d.__dict__.pop("pread", None), d.__dict__.pop("preadinto", None)
        d.close()


def test_pipelined_requests_after_go_and_disc_finishes_them(server):
    """GO, two writes, a read and DISC in one send: the server answers all three
    requests (in order), applies the writes, then closes."""
    c = Client(server.socket_path)
    c.greeting()
    info = Client.info_data("")
    burst = P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_GO, len(info)) + info
    burst += P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, 1, MiB, 3) + b"xyz"
    burst += P.REQUEST.pack(P.NBD_REQUEST_MAGIC, P.NBD_CMD_FLAG_FUA, P.NBD_CMD_WRITE, 2, MiB + 3, 2) + b"!!"
    burst += P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, 3, MiB, 5)
    burst += P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_DISC, 4, 0, 0)
    c.send(burst)
    while True:
        magic, opt, rtype, length = P.OPTION_REPLY.unpack(c.recv(P.OPTION_REPLY.size))
        c.recv(length)
        if rtype == P.NBD_REP_ACK:
            break
    assert [c.reply().cookie, c.reply().cookie] == [1, 2]
    r = c.reply(read_length=5)
    assert (r.cookie, r.error, r.data) == (3, 0, b"xyz!!")
    assert c.closed_by_server()
    c.close()
    assert server.disk.pread(5, MiB) == b"xyz!!"


def test_fuzz_harness_seeds():
    """vdisk_testkit/fuzz/fuzz_nbd.py (the atheris target) on its seeds: no finding."""
    fz = fuzz_nbd
    for name, data in fz.build_seeds().items():
        fz.one_input(data)


@settings(max_examples=150, deadline=None)
@given(seed=st.sampled_from(sorted(fuzz_nbd.build_seeds())), rnd=st.randoms(use_true_random=False))
def test_fuzz_harness_mutations(seed, rnd):
    """The harness's own mutator over its seeds, under hypothesis (CI's fuzzing)."""
    fz = fuzz_nbd
    fz.one_input(fz.mutate(fz.build_seeds()[seed], rnd))


def test_snapshot_taken_while_serving_is_exported_at_once(server):
    c = client(server)
    assert c.call(P.NBD_CMD_WRITE, MiB, 4, 0, b"live").error == 0
    server.disk.snapshot("now")                         # the serving program keeps using its Disk
    assert c.call(P.NBD_CMD_WRITE, MiB, 4, 0, b"LATE").error == 0
    snap = client(server, "disk@now")
    assert snap.read(MiB, 4) == b"live" and c.read(MiB, 4) == b"LATE"
    lister = Client(server.socket_path)
    lister.greeting()
    assert lister.list_exports() == ["disk", "disk@s", "disk@now"]
    for x in (c, snap, lister):
        x.close()


def test_connection_cap(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vdisk.nbd")
    path = str(tmp_path / "c.vdk")
    vdisk.create(path, MiB).close()
    with Server(path, socket=str(tmp_path / "c.sock"), max_connections=2) as srv:
        a, b = client(srv), client(srv)
        extra = Client(srv.socket_path)
        with pytest.raises((EOFError, ConnectionError, OSError)):
            extra.greeting()
        extra.close()
        assert any("refused, 2 connections" in r.getMessage() for r in caplog.records)
        assert a.read(0, 4) == bytes(4)
        a.close()
        import time
        for _ in range(100):                              # a closed slot is free again
            time.sleep(0.02)
            if len(srv._conns) < 2:
                break
        c = client(srv)
        assert c.read(0, 4) == bytes(4)
        b.close(), c.close()


def test_eof_right_after_go_still_answers_and_closes(server):
    """A client that sends GO and a request and half-closes at once: the EOF may
    reach the server during the handshake; the request is answered, then the
    server closes (it must not wait for more)."""
    import socket as _s
    for _ in range(20):
        s = _s.socket(_s.AF_UNIX)
        s.settimeout(10)
        s.connect(server.socket_path)
        s.sendall(_prefix("transmission") + P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, 9, 0, 16))
        s.shutdown(_s.SHUT_WR)
        data = b""
        while True:
            try:
                part = s.recv(1 << 16)
            except _s.timeout:
                raise AssertionError("the server did not close after the client's EOF") from None
            if not part:
                break
            data += part
        s.close()
        assert data.endswith(b"\x01" * 16)


@settings(max_examples=400, deadline=None)
@given(points=st.lists(st.integers(0, 300), max_size=40, unique=True), start=st.integers(0, 299),
       span=st.integers(1, 300), limit=st.sampled_from([1, 2, 3, 65536]))
def test_describe_matches_a_byte_model(points, start, span, limit):
    """Block status descriptors (vdisk/nbd/exports.describe) against a per-byte
    model: a correct prefix of the truth (the last may stop early), touching
    runs merged, at most limit, never zero-length; all of it without a limit."""
    import numpy as np
    from vdisk.nbd.exports import describe
    pts = sorted(points)[:len(points) // 2 * 2]
    offs, ends = np.array(pts[0::2], dtype=np.uint64), np.array(pts[1::2], dtype=np.uint64)
    stop = min(start + span, 301)
    marks = np.zeros(stop - start, dtype=bool)
    for a, b in zip(pts[0::2], pts[1::2]):
        marks[max(a, start) - start:max(min(b, stop) - start, 0)] = True
    truth, i = [], 0
    while i < len(marks):
        j = i
        while j < len(marks) and marks[j] == marks[i]:
            j += 1
        truth.append((j - i, 0 if marks[i] else 3))
        i = j
    got = [tuple(x) for x in describe(offs, ends, start, stop, 0, 3, limit).tolist()]
    assert 1 <= len(got) <= limit and all(n > 0 for n, _ in got)
    assert got[:-1] == truth[:len(got) - 1]
    assert got[-1][1] == truth[len(got) - 1][1] and got[-1][0] <= truth[len(got) - 1][0]
    if limit == 65536:
        assert got == truth


@settings(max_examples=80, deadline=None)
@given(blocks=st.sets(st.integers(0, 63), max_size=20), offset=st.integers(0, 64 * 4096 - 1),
       length=st.integers(0, 64 * 4096))
def test_map_range_is_map_clipped(tmp_path_factory, blocks, offset, length):
    """Disk.map_range (added for the server) equals map() clipped to the range."""
    length = min(length, 64 * 4096 - offset)
    path = str(tmp_path_factory.mktemp("mr") / "m.vdk")
    with vdisk.create(path, 64 * 4096, block_size=4096) as d:
        for b in blocks:
            d.pwrite(b"\x01", b * 4096 + 7)
        want = []
        for o, n in d.map():
            lo, hi = max(o, offset), min(o + n, offset + length)
            if hi > lo:
                want.append((lo, hi - lo))
        assert list(d.map_range(offset, length)) == want


def test_server_in_the_programs_own_event_loop(tmp_path):
    import asyncio
    path = str(tmp_path / "own.vdk")
    vdisk.create(path, MiB).close()

    async def main():
        srv = Server(path, socket=str(tmp_path / "own.sock"))
        await srv.start()
        assert srv.address == f"unix:{tmp_path / 'own.sock'}"

        def use():
            c = client(srv)
            assert c.call(P.NBD_CMD_WRITE, 0, 3, P.NBD_CMD_FLAG_FUA, b"own").error == 0
            c.close()
        await asyncio.to_thread(use)
        await srv.stop()
        await srv.serve_until_stopped()
    asyncio.run(main())
    with vdisk.open(path) as d:
        assert d.pread(3, 0) == b"own"


def test_a_client_that_never_reads_its_replies_is_held_to_bounded_memory(server):
    """50 pipelined 4 MiB reads and no reading: the server stops at its write
    high-water mark (a few MiB queued, the rest of the requests left unread in
    the socket), a bystander is served meanwhile, and once the client reads,
    every reply arrives intact."""
    import time
    n, size = 50, 4 * MiB
    greedy = client(server, structured=False)
    greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    greedy.send(b"".join(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, i + 1, 0, size) for i in range(n)))
    time.sleep(1)
    conn = next(c for c in server._conns.values() if c.proto is not None and c.proto.write_paused)
    queued = conn.proto.t.get_write_buffer_size()
    assert queued <= 4 * MiB + size + 64 * KiB, queued          # high water + one reply
    assert_alive(server)
    for i in range(n):
        r = greedy.reply(read_length=size)
        assert r.cookie == i + 1 and r.error == 0 and r.data[:100 * KiB] == b"\x01" * (100 * KiB)
    greedy.close()


def test_stop_cuts_off_a_client_that_never_reads(tmp_path):
    """A stop finishes sessions, but one stuck behind a client that reads no
    replies is cut off after stop_timeout; the image is still flushed and closed."""
    import time
    path = str(tmp_path / "st.vdk")
    with vdisk.create(path, 8 * MiB) as d:
        d.pwrite(b"\x01" * MiB, 0)
    srv = Server(path, socket=str(tmp_path / "st.sock"), stop_timeout=1).start_in_thread()
    greedy = client(srv, structured=False)
    greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    greedy.send(b"".join(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, i + 1, 0, 4 * MiB) for i in range(20)))
    writer = client(srv)
    assert writer.call(P.NBD_CMD_WRITE, 2 * MiB, 4, 0, b"last").error == 0
    time.sleep(0.5)
    stopper = threading.Thread(target=srv.stop_in_thread, daemon=True)
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "the stop waits forever on a client that reads no replies"
    greedy.close(), writer.close()
    with vdisk.open(path) as d:
        assert d.pread(4, 2 * MiB) == b"last"


def test_write_zeroes_no_hole_keeps_blocks_allocated(server):
    """WRITE_ZEROES with NO_HOLE reads back as zeros and leaves every block of the range
    allocated (later writes there need no new space); without it the whole blocks are freed."""
    c = client(server)
    assert c.call(P.NBD_CMD_WRITE_ZEROES, 0, 2 * BS, P.NBD_CMD_FLAG_NO_HOLE).error == 0       # data blocks
    assert c.call(P.NBD_CMD_WRITE_ZEROES, 3 * BS, 2 * BS + 100, P.NBD_CMD_FLAG_NO_HOLE).error == 0  # unallocated
    assert c.call(P.NBD_CMD_WRITE_ZEROES, 8 * BS, BS, 0).error == 0                          # a hole
    assert c.read(0, 6 * BS) == bytes(6 * BS)
    c.close()
    disk = server.disk
    mapped = {(o, n) for o, n in zip(disk.map_range(0, 10 * BS).offsets.tolist(),
                                     disk.map_range(0, 10 * BS).lengths.tolist())}
    covered = set()
    for o, n in mapped:
        covered.update(range(o // BS, (o + n + BS - 1) // BS))
    assert {0, 1, 3, 4, 5} <= covered, f"NO_HOLE zeroing freed blocks: mapped {sorted(mapped)}"
    assert 8 not in covered
    changed = set()                         # zeros written are changes: tracked like any write
    ext = disk.changes_since(disk.consumers["c"].change_id)
    for o, n in zip(ext.offsets.tolist(), ext.lengths.tolist()):
        changed.update(range(o // BS, (o + n + BS - 1) // BS))
    assert {0, 1, 3, 4, 5} <= changed
