"""The asyncio NBD server: handshake, transmission, lifecycle.

One :class:`Server` serves one image (vdisk/nbd/exports.py names its
exports) on a unix socket or a TCP address, to any number of connections
(up to max_connections).  The handshake runs as a coroutine (:class:`Connection`)
over the connection's :class:`Wire` protocol; at GO or EXPORT_NAME the transport is handed
to a :class:`Transmission` protocol that parses requests straight from its
input buffer, handles them in the loop's thread and writes the replies of
a burst at once.

Contracts
---------
* Durability: a reply to FLUSH, or to a write with FUA, is sent only after
  Disk.flush returned.  Every connection writes through the one Disk, and
  Disk.flush makes every write before it durable, so a flush covers the
  writes acknowledged on every connection before it: the server advertises
  NBD_FLAG_CAN_MULTI_CONN.
* Bounded memory: a request is at most 32 MiB (advertised as the maximum
  block size; a larger WRITE is a disconnect, a larger READ an EINVAL); a
  connection holds at most one unanswered request's payload in, and stops
  reading while its unsent replies pass the 4 MiB high-water mark or a
  flush is pending: about 70 MiB at worst, times max_connections.
* Isolation: a malformed or hostile client is disconnected and logged in
  one line (``logging`` logger ``vdisk.nbd``, with the peer and what was
  wrong); a bad request (past the end, unaligned, unknown command or
  flag) gets an error reply and the session goes on.  No other connection
  notices either.
* Disk calls run in the loop's thread (each is short: a pread or pwrite of
  at most 32 MiB), except flush, which runs in one executor thread so a
  slow fsync does not stall the other connections; the connection that
  asked waits (reads nothing more) until it returned.
* Polling: once the loop has nothing left to run after a burst of
  replies, it spins up to poll_us (default 50 µs) for the next request,
  as long as requests have been coming that quickly (vdisk/nbd/polling.py):
  a client at queue depth 1 then does not wait for the server's thread to
  be woken, which on a virtual machine costs tens of microseconds.  After
  a burst of block status requests alone, only for a client that can never
  run on the server's CPU: a client walking the map that may share it runs
  fastest beside the server, which the scheduler arranges while it sleeps.
* Folds never run in the loop's thread.  While serving, the Disk's
  automatic fold (every Disk.fold_interval writes: counter pages, then
  fdatasync) is turned off (fold_interval set to
  SERVE_FOLD_INTERVAL, the old value put back at close); the tracking bits
  are folded by Disk.flush in the executor thread: at the client's FLUSH
  or FUA, and, when a write, trim or zeroing was answered since the last
  flush began, once the writes paused for fold_period seconds (default 5)
  or every FOLD_MAX_PERIODS periods (60 s) under writes that never pause,
  so a client that never flushes still gets its counters folded.  Disk.flush holds the Disk's
  lock only for the fold and the copy of the changed table pages, and for
  the releases after its syncs (well under a millisecond; its fdatasyncs
  run without the lock, benchmarks/README.md), so writes in the loop's
  thread go on while it syncs.  The periodic one first syncs the file from
  a descriptor of its own, so its own syncs have little data left to write.
  Tracking never under-reports between folds: the write path only sets
  bits; an in-place overwrite of durably mapped data makes its coarse
  region's bit durable before the data write is issued (the write-ahead
  rule, vdisk/tracking.py and docs/FORMAT.md "Write order"), whatever the
  time since the last fold, so a crash before the fold reports the whole
  region; a write that remaps a block becomes visible only with the block
  table that the flush writes after the folded counters are durable.
  Longer intervals cost only a larger in-memory dirty set and, after a
  crash, the regions written since the last fold (more, never less).
* Stop (SIGTERM/SIGINT, or Server.stop()): stop accepting, cut off
  sessions still negotiating, let each session in transmission answer
  every request it has received (and a pending flush), flush, close the
  image; sessions still open after stop_timeout are cut off.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import signal
import socket as _socket
import ssl
import stat
import threading
from typing import TYPE_CHECKING, Any, Callable, Coroutine, cast

from .. import _fast, errors
from ..disk import Disk
from . import protocol as P
from .exports import Context, Export, Image, describe
from .polling import DEFAULT_POLL_US, MAX_POLL_US, Polling

if TYPE_CHECKING:
    from .._types import PathArg
    from .control import ControlServer

log = logging.getLogger("vdisk.nbd")

SERVE_FOLD_INTERVAL = 1 << 62      # Disk.fold_interval while serving: no automatic fold in the loop's thread
FOLD_MAX_PERIODS = 12              # under writes that never pause, a periodic fold every 12 fold_periods


class ProtocolViolation(Exception):
    """The client broke the protocol: log one line and disconnect."""


class _Disconnect(Exception):
    """The client ended the session cleanly (ABORT, DISC, EOF between messages)."""


def is_loopback(host: str) -> bool:
    """Whether every address host resolves to is a loopback address (no DNS is asked
    for a literal address)."""
    if host in ("", "*"):
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = _socket.getaddrinfo(host, None, type=_socket.SOCK_STREAM)
    except OSError:
        return False
    # str(): a host's addresses are AF_INET/AF_INET6 ones, whose sockaddr[0] is already the address text
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise errors.InvalidArgumentError(f"--listen {text!r}: expected HOST:PORT (e.g. 127.0.0.1:10809)")
    return host.strip("[]"), int(port)


def tls_context(cert: PathArg, key: PathArg, ca: PathArg | None = None) -> ssl.SSLContext:
    """A server TLS context; with ca, clients must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise errors.ServeError(f"TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


class Wire(asyncio.Protocol):
    """A connection's protocol during the handshake: the bytes received, read
    by the handshake coroutine with readexactly, and its writes with drain.

    Everything the client sent is in ``buffer`` (a bytearray of ours), so at
    GO or EXPORT_NAME the requests it pipelined after the option are handed
    to the Transmission protocol as they are, with ``eof`` (the client
    half-closed), through public names only.  Input is bounded as a
    StreamReader bounds it: reading pauses while more than LIMIT bytes wait
    unread (an option is at most MAX_OPTION_LENGTH).  Writes are gathered
    and sent at the next drain, close or hand-over (``flush``): one send for
    an option's replies (GO's are four, header and data apart), not one per
    piece, each waking the client; then the server's spin (polling.py)
    watches for the next option, as it watches for requests later."""

    LIMIT = 2 * (P.MAX_OPTION_LENGTH + P.OPTION_HEADER.size)

    def __init__(self, accept: Callable[[Wire], Coroutine[Any, Any, None]], polling: Polling | None = None):
        self._accept = accept               # coroutine function (wire) run as the session's task
        self.polling = polling if polling is not None else Polling(0)   # the server's spin (polling.py)
        self._fd = -1
        self.transport: asyncio.Transport | None = None     # set by connection_made
        self.buffer = bytearray()
        self.eof = False
        self.lost = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None      # readexactly waiting for data
        self._drained: asyncio.Future[None] | None = None     # drain waiting for the transport's writes
        self._paused_writing = False
        self._paused_reading = False
        self._out: list[bytes] = []         # written, not yet sent (flush)
        self.task: asyncio.Task[None] | None = None

    @property
    def stream(self) -> asyncio.Transport:
        """The transport, which connection_made set before any other callback or call."""
        t = self.transport
        assert t is not None, "the connection is not made yet"
        return t

    # --- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream server's connection (create_server, create_unix_server): an asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self._fd = self.polling.watch(transport, self)      # until the Transmission protocol takes it over
        self.task = asyncio.get_running_loop().create_task(self._accept(self))

    def data_received(self, data: bytes) -> None:
        self.polling.arrived()
        self.buffer += data
        if len(self.buffer) > self.LIMIT and not self._paused_reading:
            self._paused_reading = True
            self.stream.pause_reading()
        self._wake(self._waiter)

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake(self._waiter)
        return None if self.stream.get_extra_info("sslcontext") is not None else True

    def connection_lost(self, exc: Exception | None) -> None:
        self.polling.remove(self._fd, self)
        self.lost = True
        self.eof = True
        self._exc = exc
        self._wake(self._waiter)
        self._wake(self._drained)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._wake(self._drained)

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    # --- what the handshake calls
    async def readexactly(self, n: int) -> bytes:
        buf = self.buffer
        while len(buf) < n:
            if self.eof:
                if self._exc is not None:
                    raise ConnectionResetError(f"connection lost: {self._exc}")
                raise asyncio.IncompleteReadError(bytes(buf), n)
            if self._paused_reading:
                self._paused_reading = False
                self.stream.resume_reading()
            self.flush()                    # never wait for the client with its answer unsent
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(buf[:n])
        del buf[:n]
        if self._paused_reading and len(buf) <= self.LIMIT:
            self._paused_reading = False
            self.stream.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if data:
            self._out.append(data)

    def flush(self) -> None:
        """Send what was written since the last flush, in one transport write, then
        let the server spin a little for the client's next option."""
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not self.lost:
                self.stream.write(data)
                self.polling.replied()

    async def drain(self) -> None:
        self.flush()
        if self.lost:
            raise ConnectionResetError("connection lost")
        while self._paused_writing:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None
            if self.lost:
                raise ConnectionResetError("connection lost")

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """TLS from here on (loop.start_tls: this protocol stays, on the new transport)."""
        self.transport = await asyncio.get_running_loop().start_tls(self.stream, self, context,
                                                                    server_side=True)

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.stream.get_extra_info(name, default)


class Connection:
    """One client: the handshake's state, then the transmission loop."""

    def __init__(self, server: "Server", wire: Wire, peer: str):
        self.server = server
        self.image: Image = server.image
        self.wire = wire
        self.peer = peer
        self.structured = False
        self.no_zeroes = False
        self.tls = False
        self.export: Export | None = None
        self.meta_export: str | None = None    # the export name the contexts were set for
        self.contexts: list[Context] = []      # index i: context id i + 1
        self.stopping = False
        self.proto: Transmission | None = None

    # ---------------------------------------------------------------- io helpers
    async def _read(self, n: int) -> bytes:
        return await self.wire.readexactly(n)

    def _send(self, *parts: bytes) -> None:
        w = self.wire
        for p in parts:
            w.write(p)

    # ---------------------------------------------------------------- the session
    async def run(self) -> None:
        try:
            await self._handshake()
            await self._transmission()
        except _Disconnect:
            pass
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.warning("nbd client %s: disconnected in the middle of a message (%d of %d bytes)",
                            self.peer, len(exc.partial), exc.expected)
        except ProtocolViolation as exc:
            log.warning("nbd client %s: %s; disconnected", self.peer, exc)
        except ssl.SSLError as exc:
            log.warning("nbd client %s: TLS failed: %s; disconnected", self.peer, exc)
        except ConnectionError as exc:          # the peer went away: its own business
            log.debug("nbd client %s: connection lost: %s", self.peer, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:                  # a bug: this connection only
            log.exception("nbd client %s: internal error %s; disconnected", self.peer, exc)
        finally:
            try:
                self.wire.close()
            except Exception:
                pass

    # ---------------------------------------------------------------- handshake
    async def _handshake(self) -> None:
        self._send(P.SERVER_GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES))
        await self.wire.drain()
        (flags,) = P.CLIENT_FLAGS.unpack(await self._read(4))
        if not flags & P.NBD_FLAG_C_FIXED_NEWSTYLE:
            raise ProtocolViolation(f"client flags {flags:#x} lack NBD_FLAG_C_FIXED_NEWSTYLE")
        if flags & ~P.KNOWN_CLIENT_FLAGS:
            raise ProtocolViolation(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & P.NBD_FLAG_C_NO_ZEROES)
        for _ in range(P.MAX_OPTIONS):
            magic, opt, length = P.OPTION_HEADER.unpack(await self._read(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise ProtocolViolation(f"option magic {magic:#x}, expected IHAVEOPT")
            if length > P.MAX_OPTION_LENGTH:
                raise ProtocolViolation(f"option {opt} of {length} bytes (at most {P.MAX_OPTION_LENGTH})")
            data = await self._read(length) if length else b""
            if self.stopping:
                self._reply(opt, P.NBD_REP_ERR_SHUTDOWN, b"server shutting down")
                await self.wire.drain()
                raise _Disconnect()
            if await self._option(opt, data):
                return
            await self.wire.drain()
        raise ProtocolViolation(f"more than {P.MAX_OPTIONS} options without entering transmission")

    def _reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._send(P.OPTION_REPLY.pack(P.NBD_OPT_REPLY_MAGIC, opt, rtype, len(data)), data)

    def _error(self, opt: int, rtype: int, message: str) -> None:
        self._reply(opt, rtype, message.encode()[:P.MAX_STRING])

    async def _option(self, opt: int, data: bytes) -> bool:
        """Handle one option; True when transmission begins."""
        if self.server.tls_context is not None and not self.tls and opt not in (P.NBD_OPT_STARTTLS, P.NBD_OPT_ABORT):
            if opt == P.NBD_OPT_EXPORT_NAME:
                raise ProtocolViolation("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a TLS-only server")
            self._error(opt, P.NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
            return False
        if opt == P.NBD_OPT_EXPORT_NAME:
            export = self.image.lookup(self._text(data, "export name"))
            if export is None:
                raise ProtocolViolation(f"NBD_OPT_EXPORT_NAME of an unknown export {data[:64]!r}")
            self._enter(export)
            reply = P.EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags())
            self._send(reply if self.no_zeroes else reply + bytes(P.EXPORT_NAME_PADDING))
            return True
        if opt == P.NBD_OPT_ABORT:
            self._reply(opt, P.NBD_REP_ACK)
            await self.wire.drain()
            raise _Disconnect()
        if opt == P.NBD_OPT_LIST:
            if data:
                self._error(opt, P.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return False
            for name in self.image.names():
                raw = name.encode()
                self._reply(opt, P.NBD_REP_SERVER, P.U32.pack(len(raw)) + raw)
            self._reply(opt, P.NBD_REP_ACK)
            return False
        if opt == P.NBD_OPT_STARTTLS:
            await self._starttls(data)
            return False
        if opt in (P.NBD_OPT_INFO, P.NBD_OPT_GO):
            return self._info_go(opt, data)
        if opt == P.NBD_OPT_STRUCTURED_REPLY:
            if data:
                self._error(opt, P.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._reply(opt, P.NBD_REP_ACK)
            return False
        if opt in (P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT):
            self._meta_context(opt, data)
            return False
        self._error(opt, P.NBD_REP_ERR_UNSUP, f"option {opt} is not supported")
        return False

    def _text(self, raw: bytes, what: str) -> str:
        if len(raw) > P.MAX_STRING:
            raise ProtocolViolation(f"{what} of {len(raw)} bytes (at most {P.MAX_STRING})")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolViolation(f"{what} is not UTF-8") from None

    def _parse_name(self, data: bytes, what: str) -> tuple[str, int]:
        """A u32-length-prefixed string at the start of data: (text, offset after it)."""
        if len(data) < 4:
            raise _BadOption(f"{what}: {len(data)} bytes, too short for its length field")
        (n,) = P.U32.unpack_from(data)
        if n > P.MAX_STRING or 4 + n > len(data):
            raise _BadOption(f"{what}: length {n} does not fit the option's {len(data)} bytes")
        try:
            return data[4:4 + n].decode(), 4 + n
        except UnicodeDecodeError:
            raise _BadOption(f"{what} is not UTF-8") from None

    def _info_go(self, opt: int, data: bytes) -> bool:
        try:
            name, pos = self._parse_name(data, "export name")
            if len(data) < pos + 2:
                raise _BadOption("no count of information requests")
            (count,) = P.U16.unpack_from(data, pos)
            if len(data) != pos + 2 + 2 * count:
                raise _BadOption(f"{count} information requests in {len(data) - pos - 2} bytes")
        except _BadOption as exc:
            self._error(opt, P.NBD_REP_ERR_INVALID, str(exc))
            return False
        export = self.image.lookup(name)
        if export is None:
            self._error(opt, P.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return False
        self._reply(opt, P.NBD_REP_INFO, P.INFO_EXPORT.pack(P.NBD_INFO_EXPORT, export.size,
                                                            export.transmission_flags()))
        if export.description:
            self._reply(opt, P.NBD_REP_INFO, P.U16.pack(P.NBD_INFO_DESCRIPTION) + export.description.encode())
        self._reply(opt, P.NBD_REP_INFO, P.INFO_BLOCK_SIZE.pack(
            P.NBD_INFO_BLOCK_SIZE, self.server.min_block, max(self.server.min_block, P.PREFERRED_BLOCK),
            P.MAX_REQUEST))
        self._reply(opt, P.NBD_REP_ACK)
        if opt == P.NBD_OPT_GO:
            self._enter(export)
            return True
        return False

    def _enter(self, export: Export) -> None:
        self.export = export
        if self.meta_export is not None and self.image.lookup(self.meta_export) is not export:
            self.contexts = []          # contexts were negotiated for another export

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self._error(opt, P.NBD_REP_ERR_INVALID, "meta contexts need NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            name, pos = self._parse_name(data, "export name")
            if len(data) < pos + 4:
                raise _BadOption("no count of queries")
            (count,) = P.U32.unpack_from(data, pos)
            pos += 4
            queries: list[str] = []
            for i in range(count):
                q, used = self._parse_name(data[pos:], f"query {i}")
                pos += used
                queries.append(q)
            if pos != len(data):
                raise _BadOption(f"{len(data) - pos} bytes after the queries")
        except _BadOption as exc:
            self._error(opt, P.NBD_REP_ERR_INVALID, str(exc))
            return
        export = self.image.lookup(name)
        if export is None:
            self._error(opt, P.NBD_REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if opt == P.NBD_OPT_LIST_META_CONTEXT:
            for ctx_name in export.list_contexts(queries):
                raw = ctx_name.encode()
                self._reply(opt, P.NBD_REP_META_CONTEXT, P.U32.pack(0) + raw)
        else:
            self.contexts = export.select_contexts(queries)
            self.meta_export = name
            for i, ctx in enumerate(self.contexts):
                self._reply(opt, P.NBD_REP_META_CONTEXT, P.U32.pack(i + 1) + ctx.name.encode())
        self._reply(opt, P.NBD_REP_ACK)

    async def _starttls(self, data: bytes) -> None:
        opt = P.NBD_OPT_STARTTLS
        if self.server.tls_context is None:
            self._error(opt, P.NBD_REP_ERR_POLICY, "this server is not configured for TLS")
            return
        if self.tls:
            self._error(opt, P.NBD_REP_ERR_INVALID, "TLS is already on")
            return
        if data:
            self._error(opt, P.NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return
        self._reply(opt, P.NBD_REP_ACK)
        await self.wire.drain()
        try:
            await asyncio.wait_for(self.wire.start_tls(self.server.tls_context), 30)
        except (ssl.SSLError, ConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise ProtocolViolation(f"TLS handshake failed: {exc}") from None
        self.tls = True

    # ---------------------------------------------------------------- transmission
    async def _transmission(self) -> None:
        """Hand the transport to a Transmission protocol; wait until it closes."""
        wire = self.wire
        wire.flush()                                # GO's or EXPORT_NAME's replies
        transport = wire.stream
        leftover = bytes(wire.buffer)               # requests the client pipelined after GO
        wire.buffer.clear()
        proto = Transmission(self, transport, leftover)
        self.proto = proto
        transport.set_protocol(proto)
        if not transport.is_reading():
            transport.resume_reading()
        proto.start()
        if wire.eof:                                # the client half-closed before the switch
            proto.eof_received()
        await proto.closed
        if proto.violation:
            log.warning("nbd client %s: %s; disconnected", self.peer, proto.violation)

    def stop(self, task: asyncio.Task[None]) -> None:
        """Server stop: a session in transmission finishes what it holds, then closes;
        one still negotiating is cut off."""
        self.stopping = True
        if self.proto is not None:
            self.proto.shutdown()
        else:
            task.cancel()


class Transmission(asyncio.Protocol):
    """The transmission phase of one connection, driven by data_received.

    Requests are parsed from the input buffer and handled synchronously in
    the loop's thread, replies gathered and written once per batch (one
    send for the sixteen replies of a qd16 burst).  A flush (FLUSH, or a
    write with FUA) runs in the server's flush thread; meanwhile the
    connection reads nothing more, so its input is bounded by one request
    (at most 32 MiB) plus one socket read.  When the client does not read
    its replies, the transport's high-water mark pauses us the same way.
    """

    HEAD = 32           # room before read data for the reply header (simple: 16, structured: 28)

    def __init__(self, conn: Connection, transport: asyncio.Transport, leftover: bytes):
        self.conn = conn
        self.server = conn.server
        export = conn.export
        assert export is not None               # GO or EXPORT_NAME chose it: the handshake is over
        self.export = export
        self.view = export.view
        self.image = conn.image
        self.structured = conn.structured
        self.contexts = conn.contexts
        self.peer = conn.peer
        self.t = transport
        self.inbuf = bytearray(leftover)
        self.out: list[bytes] = []      # the replies of this batch
        self.blocked = False            # waiting for a flush
        self.write_paused = False
        self.closing = False
        self.violation: str | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray(0)
        self.polling = conn.server.polling
        self.fd = -1                    # the socket's descriptor, watched by the server's polling
        transport.set_write_buffer_limits(high=4 << 20)

    # ---------------------------------------------------------------- asyncio callbacks
    def start(self) -> None:
        self.fd = self.polling.watch(self.t, self)
        self._process()

    def data_received(self, data: bytes) -> None:
        self.polling.arrived()
        self.inbuf += data
        if not self.blocked and not self.write_paused:
            self._process()

    def eof_received(self) -> bool | None:
        self.closing = True             # the client is done sending: answer what it sent, then close
        if not self.blocked:
            self._process()
            self._log_partial()
            self.t.close()
        return None if self.conn.tls else True      # (TLS transports close on EOF whatever we say)

    def _log_partial(self) -> None:
        if self.inbuf and self.violation is None:
            log.warning("nbd client %s: closed in the middle of a request (%d bytes of it sent)",
                        self.peer, len(self.inbuf))
            self.inbuf.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.polling.remove(self.fd, self)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.t.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.blocked:
            self.t.resume_reading()
            self._process()

    def shutdown(self) -> None:
        """Answer the requests already received, then close (after a pending flush)."""
        self.closing = True
        if not self.blocked:
            self._process()
            self.t.close()

    def _disconnect(self, why: str) -> None:
        self.violation = why
        self.closing = True
        self.inbuf.clear()
        self._send_out()
        self.t.close()

    # ---------------------------------------------------------------- the request loop
    def _process(self) -> None:
        buf = self.inbuf
        pos = 0
        size = P.REQUEST.size
        unpack = P.REQUEST.unpack_from
        data = False                    # a request other than BLOCK_STATUS among them (see below)
        try:
            while not self.blocked and not self.write_paused:
                avail = len(buf) - pos
                if avail < size:
                    break
                magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
                data = data or cmd != P.NBD_CMD_BLOCK_STATUS
                if magic != P.NBD_REQUEST_MAGIC:
                    self._disconnect(f"request magic {magic:#x}, expected {P.NBD_REQUEST_MAGIC:#x}")
                    return
                if cmd == P.NBD_CMD_WRITE:
                    if length > P.MAX_REQUEST:
                        self._disconnect(f"WRITE of {length} bytes (the advertised maximum is {P.MAX_REQUEST})")
                        return
                    if avail < size + length:
                        break
                    with memoryview(buf) as mv:
                        payload = mv[pos + size:pos + size + length]
                        try:
                            self._request(cmd, flags, cookie, offset, length, payload)
                        finally:
                            payload.release()
                    pos += size + length
                else:
                    pos += size
                    if cmd == P.NBD_CMD_DISC:
                        self.closing = True
                        self.blocked = True     # nothing after DISC is read
                        self._send_out()
                        self.t.close()
                        return
                    self._request(cmd, flags, cookie, offset, length, None)
        except Exception as exc:                    # a bug: this connection only
            log.exception("nbd client %s: internal error %s; disconnected", self.peer, exc)
            self._disconnect(f"internal error {exc!r}")
            return
        finally:
            if pos:
                del buf[:pos]
        self._send_out()
        if self.closing and not self.blocked:
            self.t.close()
        elif not buf and not self.blocked and not self.write_paused:
            # everything answered: spin a little for the next request; after block status alone,
            # only for a client that cannot run beside us (polling.py: a client walking the map
            # that may share our CPU runs fastest there, which a spinning server prevents)
            self.polling.replied(data)

    def _send_out(self) -> None:
        out = self.out
        if not out:
            return
        if len(out) == 1:
            self.t.write(out[0])
        else:
            self.t.write(b"".join(out))
        out.clear()

    def _send_now(self, part: memoryview) -> None:
        """Write a large part at once, after what is gathered (no copy into a join)."""
        self._send_out()
        self.t.write(part)

    def _request(self, cmd: int, flags: int, cookie: int, offset: int, length: int,
                 payload: memoryview | None) -> None:
        """One request; payload: a WRITE's data (None for every other command)."""
        err, msg = self._check(cmd, flags, offset, length)
        if err:
            self._reply_error(cmd, cookie, err, msg)
            return
        try:
            if cmd == P.NBD_CMD_BLOCK_STATUS:       # first: a client mapping a disk sends hundreds
                self._block_status(flags, cookie, offset, length)
                return
            if cmd == P.NBD_CMD_READ:
                self._read(flags, cookie, offset, length)
                return
            if cmd == P.NBD_CMD_WRITE:
                if length:
                    assert payload is not None      # _process passes a WRITE its payload
                    self.view.pwrite(payload, offset)
            elif cmd == P.NBD_CMD_TRIM:
                if length:
                    self.view.discard(offset, length)
            elif cmd == P.NBD_CMD_WRITE_ZEROES:
                if length:
                    self._write_zeroes(flags, offset, length)
            # CACHE: the page cache serves reads; nothing to prefetch
            if cmd in _WRITES:
                self.image.wrote(offset, length)    # block status asks these blocks anew, no others
                self.server.answered += 1       # the periodic fold: unflushed, and waits while this moves
            if cmd == P.NBD_CMD_FLUSH and not self.export.read_only or flags & P.NBD_CMD_FLAG_FUA and cmd in _WRITES:
                self._flush_then_reply(cmd, cookie, offset, length)
                return
            self._ok(cookie)
        except Exception as exc:
            if cmd in _WRITES:
                self.image.touch()              # a failed change may have done part of it: ask everything anew
            self._failed(cmd, cookie, offset, length, exc)

    def _failed(self, cmd: int, cookie: int, offset: int, length: int, exc: BaseException) -> None:
        """Reply the error of a request that failed; an exception no NBD error names is raised again."""
        if isinstance(exc, errors.ReadOnlyError):
            self._reply_error(cmd, cookie, P.NBD_EPERM, str(exc))
            return
        if isinstance(exc, errors.OutOfRangeError):         # e.g. the image's physical limit
            self._reply_error(cmd, cookie, P.NBD_ENOSPC if cmd in _WRITES else P.NBD_EINVAL, str(exc))
            return
        if isinstance(exc, OSError):
            err = P.ERRNO_TO_NBD.get(exc.errno or 0, P.NBD_EIO)
        elif isinstance(exc, errors.VdiskError):
            err = P.NBD_EIO
        else:
            raise exc
        log.error("nbd client %s: %s at offset %d length %d failed: %s", self.peer,
                  P.COMMAND_NAMES.get(cmd, cmd), offset, length, exc)
        self._reply_error(cmd, cookie, err, str(exc))

    def _flush_then_reply(self, cmd: int, cookie: int, offset: int, length: int) -> None:
        """Block this connection until Disk.flush returned in the flush thread; then reply."""
        self.blocked = True
        self.t.pause_reading()
        self._send_out()
        fut = self.server.flush_future()

        def done(f: asyncio.Future[None]) -> None:
            self.blocked = False
            exc = f.exception()
            if exc is None:
                self._ok(cookie)
            else:
                try:
                    self._failed(cmd, cookie, offset, length, exc)
                except Exception:
                    self._reply_error(cmd, cookie, P.NBD_EIO, str(exc))
            if self.t.is_closing():
                return
            if not self.write_paused:
                self.t.resume_reading()
            self._process()
        fut.add_done_callback(done)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """(NBD error, message) for a request the server refuses before doing it, or (0, '')."""
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return P.NBD_EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return P.NBD_EINVAL, f"flags {flags:#x} not valid for {P.COMMAND_NAMES[cmd]}"
        if cmd == P.NBD_CMD_FLUSH:
            return 0, ""
        export = self.export
        if flags & P.NBD_CMD_FLAG_DF and not self.structured:
            return P.NBD_EINVAL, "NBD_CMD_FLAG_DF without structured replies"
        if cmd in _WRITES and export.read_only:
            return P.NBD_EPERM, "the export is read-only"
        if offset + length > export.size:
            return (P.NBD_ENOSPC if cmd in (P.NBD_CMD_WRITE, P.NBD_CMD_WRITE_ZEROES) else P.NBD_EINVAL,
                    f"offset {offset} + length {length} is past the export's size {export.size}")
        mb = self.server.min_block
        if mb > 1 and (offset % mb or (length % mb and offset + length != export.size)):
            return P.NBD_EINVAL, f"offset {offset} or length {length} not a multiple of {mb}"
        if cmd in (P.NBD_CMD_READ, P.NBD_CMD_CACHE) and length > P.MAX_REQUEST:
            return P.NBD_EINVAL, f"{P.COMMAND_NAMES[cmd]} of {length} bytes (at most {P.MAX_REQUEST})"
        if cmd == P.NBD_CMD_BLOCK_STATUS:
            if not self.contexts:
                return P.NBD_EINVAL, "BLOCK_STATUS without a meta context (NBD_OPT_SET_META_CONTEXT)"
            if not length:
                return P.NBD_EINVAL, "BLOCK_STATUS of length 0"
        if cmd == P.NBD_CMD_WRITE_ZEROES and flags & P.NBD_CMD_FLAG_FAST_ZERO and flags & P.NBD_CMD_FLAG_NO_HOLE:
            return P.NBD_ENOTSUP, "writing zeros that stay allocated is not faster than a write"
        return 0, ""

    # ---------------------------------------------------------------- replies
    def _reply_error(self, cmd: int, cookie: int, err: int, msg: str) -> None:
        if self.structured and cmd in (P.NBD_CMD_READ, P.NBD_CMD_BLOCK_STATUS):
            raw = msg.encode()[:P.MAX_STRING]
            self.out.append(P.CHUNK_HEADER.pack(P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                                                P.NBD_REPLY_TYPE_ERROR, cookie, P.ERROR_CHUNK.size + len(raw))
                            + P.ERROR_CHUNK.pack(err, len(raw)) + raw)
        else:
            self.out.append(P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, err, cookie))

    def _ok(self, cookie: int) -> None:
        self.out.append(P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, cookie))

    def _write_zeroes(self, flags: int, offset: int, length: int) -> None:
        view = self.view
        if not flags & P.NBD_CMD_FLAG_NO_HOLE:
            view.discard(offset, length)            # a hole: reads as zeros, blocks freed
            return
        if not isinstance(view, Disk):      # a snapshot export: read-only, so _check refused the request
            raise errors.ReadOnlyError(f"export {self.export.name!r} is a snapshot, read-only")
        view.write_zeros(offset, length)            # zeros written: every block stays allocated

    def _buffer(self, n: int) -> bytearray:
        """The connection's read buffer (HEAD + n bytes), reused only when the
        transport holds no reference into it (everything written reached the socket).
        A new one is not zero-filled: preadinto fills the data part whole (or
        raises, and nothing is sent), and the header is packed in before it."""
        if len(self._buf) < self.HEAD + n or self.t.get_write_buffer_size():
            self._buf = _fast.empty_bytearray(self.HEAD + max(n, 1 << 16))
        return self._buf

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        view = self.view
        H = self.HEAD
        if not length:
            if self.structured:
                self.out.append(P.CHUNK_HEADER.pack(P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                                                    P.NBD_REPLY_TYPE_NONE, cookie, 0))
            else:
                self._ok(cookie)
            return
        if length <= 1 << 16:                       # small: bytes from the hot path, gathered
            data = view.pread(length, offset)
            if not self.structured:
                self.out.append(P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
                self.out.append(data)
                return
            if data.count(0) == length:             # all zeros: maybe holes (data never is)
                self._read_runs(flags, cookie, offset, length, data)
                return
            self.out.append(P.CHUNK_HEADER.pack(P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                                                P.NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + length) + P.U64.pack(offset))
            self.out.append(data)
            return
        if not self.structured:
            buf = self._buffer(length)
            with memoryview(buf) as mv:
                view.preadinto(mv[H:H + length], offset)
                P.SIMPLE_REPLY.pack_into(buf, H - 16, P.NBD_SIMPLE_REPLY_MAGIC, 0, cookie)
                self._send_now(mv[H - 16:H + length])
            return
        self._read_runs(flags, cookie, offset, length, None)

    def _read_runs(self, flags: int, cookie: int, offset: int, length: int, data: bytes | None) -> None:
        """A structured read as data and hole chunks; with DF one chunk.  data: the
        range's content when already read (all zeros)."""
        offs, ends = self.export.allocated(offset, length)
        runs = describe(offs, ends, offset, offset + length, 0, 1, 1 << 30).tolist()
        if flags & P.NBD_CMD_FLAG_DF and len(runs) > 1:
            runs = [(length, 0)]
        last = len(runs) - 1
        pos = offset
        hdr = P.CHUNK_HEADER.pack
        magic = P.NBD_STRUCTURED_REPLY_MAGIC
        if data is None and len(runs) == 1 and not runs[0][1]:
            H = self.HEAD                           # one data chunk: header and data in one buffer
            buf = self._buffer(length)
            with memoryview(buf) as mv:
                self.view.preadinto(mv[H:H + length], offset)
                P.CHUNK_HEADER.pack_into(buf, H - 28, magic, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA,
                                         cookie, 8 + length)
                P.U64.pack_into(buf, H - 8, offset)
                self._send_now(mv[H - 28:H + length])
            return
        for i, (n, hole) in enumerate(runs):
            done = P.NBD_REPLY_FLAG_DONE if i == last else 0
            if hole:
                self.out.append(hdr(magic, done, P.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, P.OFFSET_HOLE.size)
                                + P.OFFSET_HOLE.pack(pos, n))
            else:
                part = data[pos - offset:pos - offset + n] if data is not None else self.view.pread(n, pos)
                self.out.append(hdr(magic, done, P.NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + n) + P.U64.pack(pos))
                self.out.append(part)
            pos += n

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        """One chunk per context, each built whole by a kernel (Window.chunk), the last one DONE."""
        limit = 1 if flags & P.NBD_CMD_FLAG_REQ_ONE else P.MAX_EXTENTS
        stop = offset + length
        contexts = self.contexts
        last = len(contexts)
        windows = []
        try:
            for ctx in contexts:
                windows.append(ctx.window(offset, stop))
        except (errors.StaleChangeIdError, errors.UnsupportedFeatureError) as exc:
            # the id stopped being answerable (tracking reset): refuse, never a partial answer
            self._reply_error(P.NBD_CMD_BLOCK_STATUS, cookie, P.NBD_EINVAL, str(exc))
            return
        out = self.out
        i = 0
        for w in windows:
            i += 1
            out.append(w.chunk(offset, stop, limit, cookie, i, i == last))


class _BadOption(Exception):
    """An option's data does not parse: answered NBD_REP_ERR_INVALID."""


_WRITES = frozenset((P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES))
_ALLOWED_FLAGS = {
    P.NBD_CMD_READ: P.NBD_CMD_FLAG_DF | P.NBD_CMD_FLAG_FUA,
    P.NBD_CMD_WRITE: P.NBD_CMD_FLAG_FUA,
    P.NBD_CMD_FLUSH: 0,
    P.NBD_CMD_TRIM: P.NBD_CMD_FLAG_FUA,
    P.NBD_CMD_CACHE: 0,
    P.NBD_CMD_WRITE_ZEROES: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO,
    P.NBD_CMD_BLOCK_STATUS: P.NBD_CMD_FLAG_REQ_ONE,
}


class Server:
    """An NBD server of one vdisk image.

    ``Server(path_or_disk, socket=PATH)`` or ``listen="HOST:PORT"``; then
    either ``await server.start()`` / ``await server.stop()`` in your own
    event loop, ``server.start_in_thread()`` / ``server.stop_in_thread()``
    from plain code, or ``server.run()`` to serve until SIGTERM/SIGINT.
    A path is opened (``r+``, or ``r`` when read-only) and closed at stop,
    and is then written only through the server (its block status answers
    are reused while nothing changes: vdisk/nbd/exports.py, "Reuse"); a Disk
    passed in is flushed at stop and left open, and asked on every request.

    Options: export (the live image's name; default the file name without
    extension), read_only, tls_cert/tls_key[/tls_ca] (TLS required of every
    client), insecure (allow a non-loopback listen without TLS), pid_file,
    min_block_size (advertised minimum; requests not aligned to it get
    EINVAL), max_connections (more are refused and logged), stop_timeout
    (seconds a stop waits for sessions to finish their requests before it
    cuts them off: a client that reads no replies cannot hold it forever),
    fold_period (seconds between the periodic folds of writes no client
    flushed; see "Folds" in the module notes: the Disk's own fold_interval is
    off while serving and put back at close), poll_us (how long the loop
    spins for the next request after replying, while requests come that
    quickly; 0 turns it off: vdisk/nbd/polling.py).
    """

    def __init__(self, path_or_disk: PathArg | Disk, *, socket: PathArg | None = None, listen: str | None = None,
                 export: str | None = None, read_only: bool = False, tls_cert: PathArg | None = None,
                 tls_key: PathArg | None = None, tls_ca: PathArg | None = None, insecure: bool = False,
                 pid_file: PathArg | None = None, min_block_size: int = 1, max_connections: int = 64,
                 stop_timeout: float = 30, fold_period: float = 5, poll_us: int = DEFAULT_POLL_US):
        if (socket is None) == (listen is None):
            raise errors.InvalidArgumentError("give exactly one of socket=PATH or listen='HOST:PORT'")
        if socket is not None and not os.fspath(socket):
            raise errors.InvalidArgumentError("--socket '': give the path of the socket to create")
        if bool(tls_cert) != bool(tls_key):
            raise errors.InvalidArgumentError("TLS needs both --tls-cert and --tls-key")
        if tls_ca and not tls_cert:
            raise errors.InvalidArgumentError("--tls-ca needs --tls-cert and --tls-key")
        if not fold_period > 0:
            raise errors.InvalidArgumentError(f"fold_period {fold_period}: seconds, more than 0")
        if isinstance(poll_us, bool) or not isinstance(poll_us, int) or not 0 <= poll_us <= MAX_POLL_US:
            raise errors.InvalidArgumentError(f"poll_us {poll_us}: microseconds from 0 (off) to {MAX_POLL_US}")
        if min_block_size < 1 or min_block_size & (min_block_size - 1) or min_block_size > 65536:
            raise errors.InvalidArgumentError(f"min_block_size {min_block_size}: a power of two from 1 to 65536")
        self.socket_path = os.fspath(socket) if socket is not None else None
        self.listen = parse_listen(listen) if listen is not None else None
        if self.listen and not is_loopback(self.listen[0]) and not tls_cert and not insecure:
            raise errors.ServeError(
                f"--listen {listen}: {self.listen[0] or 'every address'} is not a loopback address; "
                f"serve it only with TLS (--tls-cert/--tls-key) or pass --insecure")
        self.tls_context = tls_context(tls_cert, tls_key, tls_ca) if tls_cert and tls_key else None
        self.min_block = min_block_size
        self.stop_timeout = stop_timeout              # seconds a stop waits for sessions to finish
        self.fold_period = fold_period                # seconds between folds when writes went unflushed
        self.answered = 0                             # writes answered since the start
        self._answered_at_flush = 0                   # ... when the last flush began
        self._fold_task: asyncio.Task[None] | None = None
        self._saved_fold_interval: int | None = None
        self.max_connections = max_connections      # each may hold ~70 MiB at worst (a 32 MiB write in,
        #                                             a 32 MiB read out): the cap bounds the whole server
        self.pid_file = os.fspath(pid_file) if pid_file is not None else None
        if isinstance(path_or_disk, Disk):
            self._owns_disk = False
            self.disk = path_or_disk
        else:
            from .. import disk as _disk
            self._owns_disk = True
            self.disk = _disk.open(path_or_disk, "r" if read_only else "r+")
        try:
            if export is None:
                export = os.path.splitext(os.path.basename(self.disk.path))[0]
            if "@" in export or len(export.encode()) > P.MAX_STRING or not export.isprintable():
                raise errors.InvalidArgumentError(f"export name {export!r}: printable, no '@', at most 4096 bytes")
            self.image = Image(self.disk, export, read_only, sole_writer=self._owns_disk)
        except BaseException:
            if self._owns_disk:
                self.disk.close()
            raise
        self.address: str | None = None       # "unix:PATH" or "HOST:PORT" once listening
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[asyncio.Task[Any], Connection] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vdisk-nbd-flush")
        self._counter = 0
        self._stopped: asyncio.Event | None = None     # set when stop() begins
        self._done: asyncio.Event | None = None        # set when stop() has finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.control: ControlServer | None = None      # the control channel (vdisk/nbd/control.py)
        self.polling = Polling(poll_us * 1000)         # the spin after replies (vdisk/nbd/polling.py)

    @property
    def unflushed(self) -> int:
        """Writes, trims and zeroings answered since the last flush began."""
        return self.answered - self._answered_at_flush

    def export_clients(self) -> dict[str, int]:
        """Connected clients by export name (the live export counted as NAME)."""
        out: dict[str, int] = {}
        for conn in self._conns.values():
            if conn.export is not None:
                out[conn.export.name] = out.get(conn.export.name, 0) + 1
        return out

    @property
    def export_name(self) -> str:
        return self.image.name

    def flush_future(self, presync: bool = False) -> asyncio.Future[None]:
        """Disk.flush in the flush thread: every write acknowledged before, on any connection, durable
        (and the tracking bits folded).  presync: sync the file first without the Disk's lock."""
        self._answered_at_flush = self.answered     # writes answered from now on: the next period's
        fn = self._presync_and_flush if presync else self.disk.flush
        # a flush changes no block status answer (its fold turns dirty bits into counters of the
        # open generation: changed since every id, as before); a failed one may have: ask anew
        fut = asyncio.get_running_loop().run_in_executor(self._executor, fn)

        def done(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                self.image.touch()
        fut.add_done_callback(done)
        return fut

    def _presync_and_flush(self) -> None:
        try:        # fdatasync of our own descriptor writes the inode's dirty pages back, lock-free
            fd = os.open(self.disk.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except (OSError, TypeError):    # no such file (a Disk over another io): the flush does it all
            pass
        self.disk.flush()

    def _serve_folds(self) -> None:
        """Turn the Disk's automatic fold off while serving and fold periodically in the executor."""
        if self.image.read_only or not self.disk.track_changes:
            return
        self._saved_fold_interval = self.disk.fold_interval
        self.disk.fold_interval = SERVE_FOLD_INTERVAL
        self._fold_task = asyncio.ensure_future(self._fold_periodically())

    async def _fold_periodically(self) -> None:
        """Fold the writes no client flushed once they pause for a fold_period,
        or every FOLD_MAX_PERIODS periods under writes that never pause: a fold
        syncs the file, and its fdatasync beside a stream of writes slowed them
        by about a tenth (benchmarks/README.md, NBD)."""
        loop = asyncio.get_running_loop()
        last_fold = loop.time()
        seen = self.answered
        while True:
            await asyncio.sleep(self.fold_period)
            busy, seen = self.answered != seen, self.answered
            if not self.unflushed or self.disk.closed:
                continue
            if busy and loop.time() - last_fold < FOLD_MAX_PERIODS * self.fold_period:
                continue
            try:
                await self.flush_future(presync=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:        # the next client FLUSH reports it to the client
                log.error("periodic flush of %s failed: %s", self.disk.path, exc)
            last_fold, seen = loop.time(), self.answered

    async def _end_folds(self) -> None:
        task, self._fold_task = self._fold_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._saved_fold_interval is not None and not self.disk.closed:
            self.disk.fold_interval = self._saved_fold_interval
        self._saved_fold_interval = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Bind and start accepting (returns once listening)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._done = asyncio.Event()
        try:
            if self.socket_path is not None:
                _clear_stale_socket(self.socket_path)
                old = os.umask(0o177)           # the socket is born 0600
                try:
                    self._server = await self._loop.create_unix_server(lambda: Wire(self._accept, self.polling),
                                                                       self.socket_path)
                finally:
                    os.umask(old)
                os.chmod(self.socket_path, 0o600)
                self.address = f"unix:{self.socket_path}"
            else:
                assert self.listen is not None      # __init__ took exactly one of socket and listen
                host, port = self.listen
                self._server = await self._loop.create_server(lambda: Wire(self._accept, self.polling), host, port)
                bound = self._server.sockets[0].getsockname()
                self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        except OSError as exc:
            await self._close_image()
            where = self.socket_path if self.listen is None else f"{self.listen[0]}:{self.listen[1]}"
            raise errors.ServeError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        self._serve_folds()
        from .control import ControlServer     # before the pid file: ready means live operations too
        self.control = ControlServer(self)
        await self.control.start()
        if self.pid_file:
            with open(self.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        log.info("serving %s as export %r (and %r) on %s%s", self.disk.path, self.image.name, "",
                 self.address, " read-only" if self.image.read_only else "")

    async def _accept(self, wire: Wire) -> None:
        self._counter += 1
        peer = wire.get_extra_info("peername")
        peer = f"#{self._counter} " + (f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix")
        task = asyncio.current_task()
        assert task is not None                 # Wire.connection_made runs us as a task
        stopped, _done = self._events()
        if stopped.is_set():
            wire.close()
            return
        if len(self._conns) >= self.max_connections:
            log.warning("nbd client %s: refused, %d connections already open (the maximum)", peer,
                        len(self._conns))
            wire.close()
            return
        conn = Connection(self, wire, peer)
        self._conns[task] = conn
        try:
            await conn.run()
        finally:
            self._conns.pop(task, None)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, flush and close the image."""
        if self._stopped is None:
            return
        stopped, done = self._events()
        if stopped.is_set():
            await done.wait()
            return
        stopped.set()
        try:
            await self._stop()
        finally:
            done.set()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task, conn in list(self._conns.items()):
            conn.stop(task)
        deadline = asyncio.get_running_loop().time() + self.stop_timeout
        while self._conns:
            await asyncio.wait(list(self._conns), timeout=1)
            if self._conns and asyncio.get_running_loop().time() > deadline:
                for task, conn in list(self._conns.items()):     # e.g. a client that reads no replies
                    log.warning("nbd client %s: still open %.0f s after the stop; cut off", conn.peer,
                                self.stop_timeout)
                    if conn.proto is not None:
                        conn.proto.t.abort()
                    else:
                        task.cancel()
                deadline = float("inf")
        if self.control is not None:
            await self.control.stop()
        await self._close_image()
        if self.socket_path and os.path.exists(self.socket_path):
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        if self.pid_file:
            try:
                os.unlink(self.pid_file)
            except OSError:
                pass
        log.info("stopped; %s flushed and closed", self.disk.path)

    async def _close_image(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._end_folds()
            self.image.close()
            if not self.disk.closed and self.disk.writable():
                await asyncio.get_running_loop().run_in_executor(self._executor, self.disk.flush)
        finally:
            self._executor.shutdown(wait=True)
            self.polling.close()
            if self._owns_disk:
                self.disk.close()

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        """(stopped, done): set when stop() begins and when it has finished; start() makes them."""
        if self._stopped is None or self._done is None:
            raise errors.ServeError("the server is not started: call start() (or start_in_thread()) first")
        return self._stopped, self._done

    async def serve_until_stopped(self) -> None:
        """Wait until stop() (called elsewhere, or by a signal) has finished."""
        stopped, done = self._events()
        await stopped.wait()
        await done.wait()

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT (in the main thread), then stop cleanly.

        The loop is uvloop's when it is installed (a dependency on Linux:
        about half the server CPU per 4 KiB request of asyncio's own loop,
        benchmarks/README.md), unless VDISK_NBD_UVLOOP=0 is in the
        environment or TLS is configured (qemu-img's STARTTLS fails on
        uvloop 0.23's start_tls: not investigated); asyncio's otherwise."""
        async def main() -> None:
            await self.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
            try:
                await self.serve_until_stopped()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        run_uvloop = _uvloop_run() if self.tls_context is None else None
        if run_uvloop is not None:
            run_uvloop(main())
        else:
            asyncio.run(main())

    # ---------------------------------------------------------------- from plain code
    def start_in_thread(self) -> "Server":
        """Serve from a thread with its own event loop; returns once listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def body() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_until_complete(self._stopped_and_closed())
            loop.close()

        self._thread = threading.Thread(target=body, name="vdisk-nbd", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    async def _stopped_and_closed(self) -> None:
        await self.serve_until_stopped()

    def stop_in_thread(self) -> None:
        if self._thread is None:
            return
        loop = self._loop
        assert loop is not None     # start_in_thread's thread set it before it started the server
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> "Server":
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_in_thread()


def _uvloop_run() -> Callable[[Coroutine[Any, Any, None]], None] | None:
    """uvloop.run, if uvloop is installed and not turned off (VDISK_NBD_UVLOOP=0)."""
    if os.environ.get("VDISK_NBD_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    run: Callable[[Coroutine[Any, Any, None]], None] | None = getattr(uvloop, "run", None)   # uvloop >= 0.18
    return run


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else at path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise errors.ServeError(f"{path} exists and is not a socket")
    probe = _socket.socket(_socket.AF_UNIX)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise errors.ServeError(f"{path}: another server is listening on this socket")


def serve(path_or_disk: PathArg | Disk, *, socket: str | os.PathLike[str] | None = None, listen: str | None = None,
          export: str | None = None, read_only: bool = False, **options: Any) -> None:
    """Serve an image over NBD until SIGTERM/SIGINT (see Server for the options)."""
    Server(path_or_disk, socket=socket, listen=listen, export=export, read_only=read_only, **options).run()
