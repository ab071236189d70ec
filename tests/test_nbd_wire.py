"""The handshake's Wire protocol (vdisk/nbd/server.py): bounded input, and
requests pipelined right after GO handed to the transmission phase."""
from __future__ import annotations

import socket

import vdisk
from vdisk_testkit.nbd_client import Client
from vdisk.nbd import Server, protocol as P
from vdisk.nbd.server import Wire


class FakeTransport:
    def __init__(self):
        self.reading = True
        self.written = []

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def write(self, data):
        self.written.append(bytes(data))

    def get_extra_info(self, name, default=None):
        return default


def test_wire_stops_reading_past_its_limit_and_resumes_as_it_is_read():
    """Input beyond Wire.LIMIT unread pauses the transport's reading (the rest
    stays in the socket, as a StreamReader would leave it); reading it down
    resumes; a read longer than the limit resumes to get its bytes; EOF in
    the middle of a read is an IncompleteReadError with what came."""
    async def main():
        async def session(wire):
            pass
        w = Wire(session)
        t = FakeTransport()
        w.connection_made(t)
        w.data_received(b"x" * (Wire.LIMIT - 1))
        assert t.reading
        w.data_received(b"yy")
        assert not t.reading and len(w.buffer) == Wire.LIMIT + 1
        assert await w.readexactly(Wire.LIMIT - 1) == b"x" * (Wire.LIMIT - 1)
        assert t.reading and bytes(w.buffer) == b"yy"
        w.data_received(b"z" * (Wire.LIMIT + 10))
        assert not t.reading
        import asyncio
        task = asyncio.ensure_future(w.readexactly(2 * Wire.LIMIT + 100))
        await asyncio.sleep(0)
        assert t.reading                    # resumed: the read needs more than the limit
        w.data_received(b"w" * (Wire.LIMIT + 88))
        assert len(await task) == 2 * Wire.LIMIT + 100
        w.data_received(b"abc")
        w.eof_received()
        try:
            await w.readexactly(10)
        except asyncio.IncompleteReadError as exc:
            assert exc.partial == b"abc" and exc.expected == 10
        else:
            raise AssertionError("no IncompleteReadError")
    import asyncio
    asyncio.run(main())


def test_requests_pipelined_with_go_are_answered(tmp_path):
    """GO and three requests in one send (and the client's EOF right after):
    each request gets its reply, in order, from the transmission phase."""
    path = str(tmp_path / "p.vdk")
    with vdisk.create(path, 1 << 20) as d:
        d.pwrite(b"abcd", 0)
    with Server(path, socket=str(tmp_path / "p.sock")) as srv:
        c = Client(srv.socket_path)
        c.greeting()
        go = P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_GO, len(c.info_data(""))) + c.info_data("")
        reqs = b"".join(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, i + 1, 0, 4) for i in range(3))
        c.sock.sendall(go + reqs)
        c.sock.shutdown(socket.SHUT_WR)
        while True:                     # the GO replies, up to the ACK
            magic, opt, rtype, n = P.OPTION_REPLY.unpack(c.recv(P.OPTION_REPLY.size))
            c.recv(n)
            if rtype == P.NBD_REP_ACK:
                break
        for i in range(3):
            r = c.reply(read_length=4)
            assert (r.cookie, r.error, r.data) == (i + 1, 0, b"abcd")
        c.close()
