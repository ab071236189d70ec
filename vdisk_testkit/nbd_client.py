"""A raw NBD client for the tests, declared from vdisk/nbd/protocol.py.

It sends what qemu's and libnbd's clients refuse to send (requests past
the end, writes to a read-only export, unaligned or oversize requests,
unknown commands and flags, garbage) and decodes every reply strictly: a
reply that breaks the protocol fails the test.
"""
from __future__ import annotations

import socket
import struct

from vdisk.nbd import protocol as P


class ProtocolError(AssertionError):
    """The server sent something the protocol does not allow."""


class Chunk:
    __slots__ = ("flags", "type", "cookie", "payload")

    def __init__(self, flags, type_, cookie, payload):
        self.flags, self.type, self.cookie, self.payload = flags, type_, cookie, payload

    @property
    def error(self) -> int:
        return struct.unpack_from(">I", self.payload)[0] if self.type & (1 << 15) else 0

    def __repr__(self):
        return f"Chunk(flags={self.flags}, type={self.type}, {len(self.payload)} bytes)"


class Reply:
    """A simple reply (chunks is None) or a structured one (its chunks)."""

    def __init__(self, cookie: int, error: int = 0, data: bytes = b"", chunks=None):
        self.cookie, self.error, self.data, self.chunks = cookie, error, data, chunks


class Client:
    def __init__(self, address, timeout: float = 20):
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX)
        else:
            self.sock = socket.socket(socket.AF_INET)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.cookie = 0
        self.structured = False
        self.size = None
        self.flags = None
        self.contexts: dict[int, str] = {}

    # ---------------------------------------------------------------- bytes
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            part = self.sock.recv(n - len(out))
            if not part:
                raise EOFError(f"server closed the connection after {len(out)} of {n} bytes")
            out += part
        return bytes(out)

    def closed_by_server(self) -> bool:
        """Whether the server closed the connection (EOF), waiting up to the timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    # ---------------------------------------------------------------- handshake
    def greeting(self, client_flags: int = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, flags = P.SERVER_GREETING.unpack(self.recv(P.SERVER_GREETING.size))
        if magic != P.NBDMAGIC or opt_magic != P.IHAVEOPT:
            raise ProtocolError(f"greeting magics {magic:#x} {opt_magic:#x}")
        self.send(P.CLIENT_FLAGS.pack(client_flags))
        return flags

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; the replies (type, data) up to the final one."""
        self.send(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, ropt, rtype, length = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
            if magic != P.NBD_OPT_REPLY_MAGIC or ropt != opt:
                raise ProtocolError(f"option reply magic {magic:#x} for option {ropt}, sent {opt}")
            if length > 1 << 20:
                raise ProtocolError(f"option reply of {length} bytes")
            out.append((rtype, self.recv(length)))
            if rtype == P.NBD_REP_ACK or rtype & P.NBD_REP_FLAG_ERROR:
                return out

    @staticmethod
    def name_data(name: str) -> bytes:
        raw = name.encode()
        return P.U32.pack(len(raw)) + raw

    @staticmethod
    def info_data(name: str, infos=(P.NBD_INFO_BLOCK_SIZE,)) -> bytes:
        return Client.name_data(name) + P.U16.pack(len(infos)) + b"".join(P.U16.pack(i) for i in infos)

    @staticmethod
    def meta_data(name: str, queries) -> bytes:
        return Client.name_data(name) + P.U32.pack(len(queries)) + b"".join(Client.name_data(q) for q in queries)

    def list_exports(self) -> list[str]:
        out = []
        for rtype, data in self.option(P.NBD_OPT_LIST):
            if rtype == P.NBD_REP_SERVER:
                (n,) = P.U32.unpack_from(data)
                out.append(data[4:4 + n].decode())
        return out

    def meta(self, opt: int, name: str, queries) -> dict[int, str] | int:
        """LIST or SET meta context: {id: name}, or the error reply type."""
        replies = self.option(opt, self.meta_data(name, queries))
        if replies[-1][0] != P.NBD_REP_ACK:
            return replies[-1][0]
        out = {}
        for rtype, data in replies[:-1]:
            assert rtype == P.NBD_REP_META_CONTEXT, rtype
            out[P.U32.unpack_from(data)[0] if opt == P.NBD_OPT_SET_META_CONTEXT else len(out)] = data[4:].decode()
        return out

    def connect(self, export: str = "", structured: bool = True, contexts=()) -> "Client":
        """Greeting, STRUCTURED_REPLY, SET_META_CONTEXT, GO: ready to transmit."""
        self.greeting()
        if structured:
            assert self.option(P.NBD_OPT_STRUCTURED_REPLY)[-1][0] == P.NBD_REP_ACK
            self.structured = True
        if contexts:
            got = self.meta(P.NBD_OPT_SET_META_CONTEXT, export, list(contexts))
            assert isinstance(got, dict), got
            self.contexts = got
        replies = self.option(P.NBD_OPT_GO, self.info_data(export))
        if replies[-1][0] != P.NBD_REP_ACK:
            self.close()                    # the caller never gets this client: nothing else would
            raise ProtocolError(f"GO {export!r} refused: {replies[-1]}")
        for rtype, data in replies:
            if rtype == P.NBD_REP_INFO and P.U16.unpack_from(data)[0] == P.NBD_INFO_EXPORT:
                _, self.size, self.flags = P.INFO_EXPORT.unpack(data)
        return self

    # ---------------------------------------------------------------- transmission
    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> int:
        self.cookie += 1
        self.send(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, self.cookie, offset, length) + payload)
        return self.cookie

    def reply(self, read_length: int | None = None) -> Reply:
        """One reply; read_length: the length of a READ answered with a simple reply."""
        (magic,) = P.U32.unpack(self.recv(4))
        if magic == P.NBD_SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv(12))
            data = self.recv(read_length) if read_length and not error else b""
            return Reply(cookie, error, data)
        if magic != P.NBD_STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"reply magic {magic:#x}")
        chunks = []
        while True:
            if chunks:
                (magic,) = P.U32.unpack(self.recv(4))
                if magic != P.NBD_STRUCTURED_REPLY_MAGIC:
                    raise ProtocolError(f"chunk magic {magic:#x}")
            flags, type_, cookie, length = struct.unpack(">HHQI", self.recv(16))
            if length > P.MAX_REQUEST + 1024:
                raise ProtocolError(f"chunk of {length} bytes")
            chunks.append(Chunk(flags, type_, cookie, self.recv(length)))
            if flags & P.NBD_REPLY_FLAG_DONE:
                break
        errs = [c.error for c in chunks if c.error]
        return Reply(chunks[0].cookie, errs[0] if errs else 0, chunks=chunks)

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> Reply:
        cookie = self.request(cmd, offset, length, flags, payload)
        r = self.reply(length if cmd == P.NBD_CMD_READ else None)
        if r.cookie != cookie:
            raise ProtocolError(f"reply to cookie {r.cookie}, expected {cookie}")
        return r

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """READ, assembled from data and hole chunks (each checked to lie in the request)."""
        r = self.call(P.NBD_CMD_READ, offset, length, flags)
        if r.error:
            raise OSError(r.error, f"READ {offset}+{length}: NBD error {r.error}")
        if r.chunks is None:
            return r.data
        buf = bytearray(length)
        covered = 0
        for c in r.chunks:
            if c.type == P.NBD_REPLY_TYPE_OFFSET_DATA:
                (off,) = P.U64.unpack_from(c.payload)
                data = c.payload[8:]
            elif c.type == P.NBD_REPLY_TYPE_OFFSET_HOLE:
                off, n = P.OFFSET_HOLE.unpack(c.payload)
                data = bytes(n)
            elif c.type == P.NBD_REPLY_TYPE_NONE:
                continue
            else:
                raise ProtocolError(f"chunk type {c.type} in a READ reply")
            if not data or off < offset or off + len(data) > offset + length:
                raise ProtocolError(f"chunk {off}+{len(data)} outside the request {offset}+{length}")
            buf[off - offset:off - offset + len(data)] = data
            covered += len(data)
        if covered != length:
            raise ProtocolError(f"READ chunks cover {covered} of {length} bytes")
        return bytes(buf)

    def block_status(self, offset: int, length: int, flags: int = 0) -> dict[str, list[tuple[int, int]]] | int:
        """{context name: [(length, flags), ...]} or the NBD error."""
        r = self.call(P.NBD_CMD_BLOCK_STATUS, offset, length, flags)
        if r.error:
            return r.error
        out = {}
        for c in r.chunks:
            if c.type == P.NBD_REPLY_TYPE_NONE:
                continue
            if c.type != P.NBD_REPLY_TYPE_BLOCK_STATUS or (len(c.payload) - 4) % 8:
                raise ProtocolError(f"chunk type {c.type} of {len(c.payload)} bytes in a BLOCK_STATUS reply")
            (cid,) = P.U32.unpack_from(c.payload)
            descs = [P.EXTENT.unpack_from(c.payload, 4 + 8 * i) for i in range((len(c.payload) - 4) // 8)]
            if not descs or any(n == 0 for n, _ in descs):
                raise ProtocolError(f"context {cid}: empty or zero-length descriptor {descs[:4]}")
            if sum(n for n, _ in descs) > length:
                raise ProtocolError(f"context {cid}: descriptors past the request")
            out[self.contexts[cid]] = descs
        return out
