"""The NBD server against a raw client (tests/nbd_client.py): what real
clients refuse to send, the wire details they hide, and hostile input.

Each bad request must get a clean error reply (the connection goes on) or
a disconnect logged in one line; never a crash, a hang or unbounded memory,
and other connections never notice.
"""
from __future__ import annotations

import logging
import os
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vdisk
from nbd_client import Client
from vdisk.nbd import Server, protocol as P

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB
SIZE = 4 * MiB + 1536          # not a multiple of the block size: the last block is partial


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


def test_flush_covers_writes_of_every_connection(tmp_path):
    """CAN_MULTI_CONN: a write acknowledged on A, a flush on B, then the data
    is durable (checked by the Disk's own view: nothing left unflushed)."""
    path = str(tmp_path / "m.vdk")
    vdisk.create(path, MiB, block_size=BS).close()
    with Server(path, socket=str(tmp_path / "m.sock")) as srv:
        a, b = client(srv), client(srv)
        assert a.call(P.NBD_CMD_WRITE, 0, 4, 0, b"AAAA").error == 0
        flushed = []
        orig = srv.disk.flush
        srv.disk.flush = lambda: (flushed.append(srv.disk._dirty_table_pages.copy()), orig())[1]
        assert b.call(P.NBD_CMD_FLUSH).error == 0
        assert flushed and flushed[0]               # the flush saw A's unflushed mapping
        assert not srv.disk._dirty_table_pages      # and made it durable before B's reply
        a.close(), b.close()


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
    bystander.close()


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
    """Read what the server sends until it closes or goes quiet; the byte count."""
    import socket as _s
    total = 0
    sock.settimeout(0.3)
    while True:
        try:
            part = sock.recv(1 << 20)
        except (_s.timeout, ConnectionResetError):
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
