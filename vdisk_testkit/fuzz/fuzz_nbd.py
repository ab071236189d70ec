"""Fuzz target (nbd): arbitrary bytes at each state of an NBD session.

One server (vdisk/nbd, in a thread of this process) serves a small image
with data, a consumer and a snapshot.  Each input opens a connection,
brings it to a state, sends the rest of the input, half-closes, and reads
what the server answers until it closes.  Findings:

* the server does not close within the deadline (a hang: it waits for
  something the input can never send);
* it answers more than a bound (one 32 MiB read is the most a request may
  cost; the input holds at most a few thousand requests, but reads past
  the bound count as unbounded);
* it logs an internal error (any exception other than a protocol
  violation escaped a handler);
* a bystander connection, open across all inputs, stops reading the
  image's content correctly (one bad client disturbed another);
* a write changed the image where the bystander checks (the fuzz client
  writes only past the first 64 KiB: offsets are remapped there).

Input encoding::

    byte 0      state: 0 before the client flags, 1 options (fixed newstyle,
                no zeroes), 2 transmission with structured replies and both
                meta contexts (GO on ""), 3 transmission after EXPORT_NAME
                (simple replies), 4 transmission on the read-only snapshot
                export
    bytes 1..   sent as they are; in states 2-4 every 28-byte request
                header that carries the request magic has its offset
                moved past the first 64 KiB (the bystander's region)
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import time

import vdisk
from vdisk.nbd import Server, protocol as P

from vdisk_testkit.fuzz.common import remove, scratch_path

NAME = "nbd"
KiB, MiB = 1 << 10, 1 << 20
SIZE = 2 * MiB
GUARDED = 64 * KiB                 # the bystander's region: the fuzz client never writes it
DEADLINE = 10.0                    # seconds for the server to answer and close
MAX_ANSWER = 64 * MiB
_STATE = None


class _Findings(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


class _State:
    def __init__(self):
        path = scratch_path("nbd.vdk")
        remove(path)
        with vdisk.create(path, SIZE, block_size=4096) as d:
            d.pwrite(b"\x5a" * GUARDED, 0)
            d.consumers.register("c", d.checkpoint())
            d.pwrite(b"\x11" * 100, MiB)
            d.snapshot("s")
        self.sock_path = scratch_path("nbd.sock")
        self.findings = _Findings()
        logging.getLogger("vdisk.nbd").addHandler(self.findings)
        logging.getLogger("vdisk.nbd").propagate = False
        self.server = Server(path, socket=self.sock_path).start_in_thread()
        self.bystander = _connect(self.sock_path, _prefix(3))
        self.bystander.settimeout(DEADLINE)
        _recv_exact(self.bystander, 10)                     # EXPORT_NAME reply (no zeroes)
        self.cookie = 0

    def check_bystander(self) -> None:
        self.cookie += 1
        self.bystander.sendall(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_READ, self.cookie, 0, GUARDED))
        magic, err, cookie = P.SIMPLE_REPLY.unpack(_recv_exact(self.bystander, P.SIMPLE_REPLY.size))
        assert (magic, err, cookie) == (P.NBD_SIMPLE_REPLY_MAGIC, 0, self.cookie), (magic, err, cookie)
        assert _recv_exact(self.bystander, GUARDED) == b"\x5a" * GUARDED, "the bystander's data changed"

    def close(self) -> None:
        self.bystander.close()
        self.server.stop_in_thread()
        logging.getLogger("vdisk.nbd").removeHandler(self.findings)
        logging.getLogger("vdisk.nbd").propagate = True


def state() -> _State:
    global _STATE
    if _STATE is None:
        _STATE = _State()
    return _STATE


def close_state() -> None:
    """Stop the harness's server and close its bystander (a test run's end;
    under atheris the process ends with them)."""
    global _STATE
    if _STATE is not None:
        _STATE.close()
        _STATE = None


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = s.recv(n - len(out))
        if not part:
            raise AssertionError(f"server closed the bystander after {len(out)} of {n} bytes")
        out += part
    return bytes(out)


def _option(opt: int, data: bytes = b"") -> bytes:
    return P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data


def _name(text: str) -> bytes:
    raw = text.encode()
    return P.U32.pack(len(raw)) + raw


def _prefix(mode: int) -> bytes:
    flags = P.CLIENT_FLAGS.pack(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)
    if mode == 0:
        return b""
    if mode == 1:
        return flags
    if mode == 3:
        return flags + _option(P.NBD_OPT_EXPORT_NAME, b"")
    export = "nbd@s" if mode == 4 else ""
    meta = _name(export) + P.U32.pack(2) + _name("base:allocation") + _name("qemu:dirty-bitmap:c")
    return (flags + _option(P.NBD_OPT_STRUCTURED_REPLY) + _option(P.NBD_OPT_SET_META_CONTEXT, meta)
            + _option(P.NBD_OPT_GO, _name(export) + P.U16.pack(0)))


def _connect(path: str, prefix: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(DEADLINE)
    s.connect(path)
    _recv_exact(s, P.SERVER_GREETING.size)
    if prefix:
        s.sendall(prefix)
    return s


def _steer(payload: bytes) -> bytes:
    """Requests keep off the bystander's region: offsets below it move past it."""
    buf = bytearray(payload)
    magic = struct.pack(">I", P.NBD_REQUEST_MAGIC)
    at = buf.find(magic)
    while at >= 0 and at + P.REQUEST.size <= len(buf):
        (off,) = struct.unpack_from(">Q", buf, at + 16)
        if off < GUARDED:
            struct.pack_into(">Q", buf, at + 16, off + GUARDED)
        at = buf.find(magic, at + 4)
    return bytes(buf)


def one_input(data: bytes) -> None:
    if not data:
        return
    st = state()
    mode = data[0] % 5
    payload = data[1:] if mode < 2 else _steer(data[1:])
    s = _connect(st.sock_path, _prefix(mode))
    total = 0
    t0 = time.monotonic()
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass                                 # the server cut the client off early: allowed
    try:
        s.shutdown(socket.SHUT_WR)
        while True:
            part = s.recv(1 << 20)
            if not part:
                break
            total += len(part)
            assert total <= MAX_ANSWER, f"the server answered more than {MAX_ANSWER} bytes"
    except (ConnectionResetError, BrokenPipeError, OSError) as exc:
        if isinstance(exc, socket.timeout):
            raise AssertionError(f"the server did not close within {DEADLINE} s (a hang)") from None
    finally:
        s.close()
    assert time.monotonic() - t0 < 2 * DEADLINE
    if st.findings.records:
        found, st.findings.records = st.findings.records, []
        raise AssertionError(f"server logged an internal error: {found[0]}")
    st.check_bystander()


def build_seeds(directory: str | None = None) -> dict[str, bytes]:
    req = P.REQUEST.pack
    m = P.NBD_REQUEST_MAGIC
    seeds = {
        "flags-bad": b"\x00" + b"\xff\xff\xff\xff",
        "opt-list": b"\x01" + _option(P.NBD_OPT_LIST) + _option(P.NBD_OPT_ABORT),
        "opt-info": b"\x01" + _option(P.NBD_OPT_INFO, _name("nbd") + P.U16.pack(1) + P.U16.pack(3)),
        "opt-meta": b"\x01" + _option(P.NBD_OPT_STRUCTURED_REPLY)
        + _option(P.NBD_OPT_LIST_META_CONTEXT, _name("") + P.U32.pack(1) + _name("qemu:")),
        "opt-ext": b"\x01" + _option(P.NBD_OPT_EXTENDED_HEADERS) + _option(P.NBD_OPT_STARTTLS),
        "read": b"\x02" + req(m, 0, P.NBD_CMD_READ, 1, 0, 4096),
        "read-df": b"\x02" + req(m, P.NBD_CMD_FLAG_DF, P.NBD_CMD_READ, 1, 0, 70000),
        "write": b"\x02" + req(m, P.NBD_CMD_FLAG_FUA, P.NBD_CMD_WRITE, 1, 100, 5) + b"hello",
        "status": b"\x02" + req(m, P.NBD_CMD_FLAG_REQ_ONE, P.NBD_CMD_BLOCK_STATUS, 1, 0, SIZE),
        "zero": b"\x02" + req(m, P.NBD_CMD_FLAG_FAST_ZERO, P.NBD_CMD_WRITE_ZEROES, 1, 0, 8192),
        "trim-flush": b"\x03" + req(m, 0, P.NBD_CMD_TRIM, 1, 0, 8192) + req(m, 0, P.NBD_CMD_FLUSH, 2, 0, 0),
        "ro-write": b"\x04" + req(m, 0, P.NBD_CMD_WRITE, 1, 0, 3) + b"abc" + req(m, 0, P.NBD_CMD_DISC, 2, 0, 0),
    }
    if directory:
        os.makedirs(directory, exist_ok=True)
        for name, blob in seeds.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(blob)
    return seeds


def mutate(data: bytes, rng) -> bytes:
    from vdisk_testkit.fuzz.common import havoc
    if data and rng.random() < 0.2:
        return bytes([rng.randrange(5)]) + data[1:]
    return havoc(data, rng, 1 if len(data) > 1 else 0, max_len=4096)


if __name__ == "__main__":
    from vdisk_testkit.fuzz.common import atheris_main
    atheris_main(one_input)
