"""The NBD flush contract under SIGKILL: `vdisk serve` killed by its pid, the image reopened.

Each round starts `vdisk serve` on the image, connects a client (a small
one written here from doc/proto.md: fixed newstyle, NBD_OPT_GO, simple
replies, so the server is judged by a client its author did not write),
and sends random requests: WRITE (sometimes with FUA, at any byte offset
and length), WRITE_ZEROES, TRIM, FLUSH and READ, several in flight at once
(pipelined; never two in flight on the same block, so their order does not
matter).  Then it SIGKILLs the server, either right after a FLUSH reply
(the contract's case) or with requests still in flight, and checks the
image with vdisk_testkit/crashsim.py's checks:

* vdisk.check finds no corruption (leaks allowed); the image opens;
* every byte holds the value it had when the last acknowledged FLUSH was
  *sent* (what that flush covers: every write whose reply came before it,
  doc/proto.md "NBD_CMD_FLUSH"), or a value a write sent since gave it;
  a write acknowledged with FUA holds its data;
* for every change id handed out so far (a checkpoint before each round,
  the consumer "c"'s backups, the chain's backups), changes_since(id)
  contains every block whose content differs from the content at the
  id's point; the same after a read-write open (recovery) and reopen;
* the consumer's id is the one of its last backup;
* an incremental backup since the chain's last id, restored after the
  chain, is the recovered content.

Between rounds, with the server gone, the image gets a checkpoint and
sometimes a backup (full or incremental) or a backup of the consumer, so
the ids outstanding at each kill span many rounds.  A READ of a range
with no request in flight must return the model's content (read your
writes).

Used by tests/test_nbd_kill.py (a few kills in CI) and tools/campaign_nbd_kill.py.
"""
from __future__ import annotations

import dataclasses
import os
import random
import socket
import struct
import time

import numpy as np

import vdisk
from vdisk_testkit import nbdserve
from vdisk_testkit.crashsim import CrashModel, apply_op, check_chain_restores, check_image
from vdisk_testkit.helpers import pattern

# ---------------------------------------------------------------------------- the wire (doc/proto.md)
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_INFO_EXPORT = 0
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_TRIM = 0, 1, 2, 3, 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
OPT_REPLY = struct.Struct(">QIII")


class NbdClientError(AssertionError):
    pass


class Client:
    """A blocking NBD client on a Unix socket: one export, simple replies, pipelining by cookie."""

    def __init__(self, path: str, export: str = "", timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.cookie = 0
        self.reads: dict[int, int] = {}        # cookie -> length of a READ in flight
        magic, opt, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not hflags & NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdClientError(f"not a fixed newstyle NBD server: {magic:#x} {opt:#x} flags {hflags:#x}")
        self.sock.sendall(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | (hflags & NBD_FLAG_NO_ZEROES)))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(data)) + data)
        self.size = self.flags = None
        while True:
            magic, opt, rtype, length = OPT_REPLY.unpack(self._recv(OPT_REPLY.size))
            payload = self._recv(length)
            if magic != OPT_REPLY_MAGIC or opt != NBD_OPT_GO:
                raise NbdClientError(f"bad option reply {magic:#x} for option {opt}")
            if rtype & NBD_REP_FLAG_ERROR:
                raise NbdClientError(f"NBD_OPT_GO refused ({rtype:#x}): {payload[:200]!r}")
            if rtype == NBD_REP_INFO and len(payload) >= 12 and struct.unpack_from(">H", payload)[0] == NBD_INFO_EXPORT:
                self.size, self.flags = struct.unpack_from(">QH", payload, 2)
            elif rtype == NBD_REP_ACK:
                break
        if self.size is None:
            raise NbdClientError("NBD_OPT_GO ended without NBD_INFO_EXPORT")

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"server closed the connection ({len(buf)} of {n} bytes)")
            buf += chunk
        return bytes(buf)

    def send(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        """Send one request; returns its cookie (collect the reply with reply())."""
        self.cookie += 1
        if cmd == NBD_CMD_READ:
            self.reads[self.cookie] = length
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, flags, cmd, self.cookie, offset, length) + data)
        return self.cookie

    def reply(self) -> tuple[int, int, bytes]:
        """(cookie, error, data) of the next reply."""
        magic, err, cookie = SIMPLE_REPLY.unpack(self._recv(SIMPLE_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC:
            raise NbdClientError(f"bad reply magic {magic:#x}")
        n = self.reads.pop(cookie, 0)
        data = self._recv(n) if n and not err else b""
        return cookie, err, data

    def close(self) -> None:
        try:
            self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------------------- the model
class NbdModel(CrashModel):
    """CrashModel with NBD's rules: a flush covers the writes acknowledged before it
    was sent (doc/proto.md), a FUA write its own range.  ``versions`` carry
    sequence numbers (``base`` is the first's); a write in flight when a flush
    is sent keeps its version (and every later one) allowed after the flush."""

    def __init__(self, size: int, block_size: int):
        super().__init__(size, block_size)
        self._reset_nbd()

    def _reset_nbd(self) -> None:
        self.acked = self.cur.copy()       # content by the acknowledged writes
        self.base = 0
        self.unacked: set[int] = set()     # sequence numbers of writes in flight
        self.fua_log: list[tuple[int, np.ndarray]] = []   # FUA writes acknowledged, in order

    def sent(self, off: int, data: np.ndarray) -> int:
        new = self.cur.copy()
        new[off:off + len(data)] = data
        self.will_become(new)
        seq = self.base + len(self.versions) - 1
        self.unacked.add(seq)
        return seq

    def acknowledged(self, off: int, data: np.ndarray, seq: int, fua: bool) -> None:
        self.unacked.discard(seq)
        self.acked[off:off + len(data)] = data
        if fua:           # durable now: older values of the range are no longer allowed
            self.fua_log.append((off, data))
            self.flushed[off:off + len(data)] = data
            for i in range(max(0, seq - self.base + 1)):
                self.versions[i][off:off + len(data)] = data

    def flush_sent(self) -> tuple[int, np.ndarray, int]:
        keep = min(self.unacked) if self.unacked else self.base + len(self.versions)
        return keep, self.acked.copy(), len(self.fua_log)

    def flush_acknowledged(self, mark: tuple[int, np.ndarray, int]) -> None:
        keep, content, nfua = mark
        for off, data in self.fua_log[nfua:]:      # FUA writes acknowledged while the flush was in flight
            content[off:off + len(data)] = data
        self.flushed = content
        if keep > self.base:
            del self.versions[:keep - self.base]
            self.base = keep

    def flushed_now(self) -> None:        # an op on the open Disk between rounds, or recovery
        super().flushed_now()
        self._reset_nbd()


# ---------------------------------------------------------------------------- the campaign
@dataclasses.dataclass
class NbdKillStats:
    kills: int = 0
    after_flush: int = 0       # kills right after a FLUSH reply
    in_flight: int = 0         # kills with requests in flight
    requests: int = 0
    flushes: int = 0
    fua: int = 0
    ids: int = 0               # change ids outstanding at the last kill
    leaky: int = 0
    restores: int = 0
    seconds: float = 0.0


class NbdKillCampaign:
    def __init__(self, seed: int, workdir: str, sockdir: str, size: int = 256 * 1024, block_size: int = 4096,
                 max_requests: int = 200, depth: int = 8):
        self.seed, self.rng = seed, random.Random(seed)
        self.workdir, self.sockdir = workdir, sockdir
        self.path = os.path.join(workdir, "n.vdk")
        self.deltas = os.path.join(workdir, "deltas")
        os.makedirs(self.deltas, exist_ok=True)
        self.bs, self.size = block_size, size
        self.max_requests, self.depth = max_requests, depth
        vdisk.create(self.path, size, block_size=block_size).close()
        self.model = NbdModel(size, block_size)
        self.stats = NbdKillStats()
        self.round = 0

    # --- between rounds: ops on the open Disk (crashsim's ops and model)
    def between(self) -> None:
        m, rng = self.model, self.rng
        ops = [{"k": "checkpoint"}]
        r = rng.random()
        if r < 0.25:
            full = m.chain_id is None or rng.random() < 0.2
            ops.append({"k": "backup", "dest": os.path.join(self.deltas, f"b{self.round}.h5"),
                        "since": None if full else m.chain_id, "compression": None})
        elif r < 0.4:
            ops.append({"k": "cbackup", "dest": os.path.join(self.deltas, f"c{self.round}.h5")})
        with vdisk.open(self.path, "r+") as d:
            for op in ops:
                m.begin(op)
                m.end(op, apply_op(d, op))
                if op["k"] == "backup":
                    check_chain_restores(m, self.workdir)

    # --- one round
    def kill_once(self) -> None:
        t0 = time.monotonic()
        self.between()
        self.round += 1
        rng, m = self.rng, self.model
        sock = os.path.join(self.sockdir, f"k{self.round % 2}")
        srv = nbdserve.vdisk_serve(self.path, sock, "k")
        how = "?"
        c = None
        try:
            c = Client(sock, "k")
            assert c.size == self.size, f"export size {c.size}, image {self.size}"
            for bit in (NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES):
                assert c.flags & bit, f"transmission flags {c.flags:#x} lack {bit:#x}"
            after_flush = self.round % 2 == 1 or rng.random() < 0.3     # odd rounds: the contract's case
            how = self._requests(c, rng.randint(1, self.max_requests), after_flush)
        finally:
            srv.kill()
            if c is not None:
                c.sock.close()          # the server is gone: no DISC to send
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass
        self.stats.kills += 1
        where = f"seed {self.seed} kill {self.round} ({how})"
        restore = os.path.join(self.deltas, f"after-kill-{self.round}.h5") if m.chain else None
        state, infos, epoch, leaked, cid, consumer = check_image(self.path, m, where, recovery=True,
                                                                 restore=restore)
        self.stats.ids = len(m.points)
        self.stats.leaky += leaked > 0
        m.recovered(state, infos, epoch, consumer)
        if cid is not None:
            self.stats.restores += 1
            m.points.append((cid, state.copy()))
            m.chain, m.chain_id, m.chain_content = m.chain + [restore], cid, state.copy()
        self.stats.seconds += time.monotonic() - t0

    def _requests(self, c: Client, n: int, kill_after_flush: bool) -> str:
        """Send n random requests, up to `depth` in flight; return how the kill found the server."""
        rng, m, bs = self.rng, self.model, self.bs
        pending: dict[int, tuple] = {}         # cookie -> (kind, blocks, payload...)
        busy: dict[int, int] = {}              # block -> cookie of the request in flight on it

        def collect():
            cookie, err, data = c.reply()
            kind, blocks, *rest = pending.pop(cookie)
            for b in blocks:
                del busy[b]
            if err:
                raise NbdClientError(f"seed {self.seed} round {self.round}: {kind} failed with NBD error {err}")
            if kind == "write":
                off, arr, seq, fua = rest
                m.acknowledged(off, arr, seq, fua)
            elif kind == "flush":
                m.flush_acknowledged(rest[0])
            elif kind == "read":
                off, want = rest
                got = np.frombuffer(data, np.uint8)
                if not np.array_equal(got, want):
                    bad = int(np.flatnonzero(got != want)[0])
                    raise AssertionError(f"seed {self.seed} round {self.round}: READ at {off} differs at byte "
                                         f"{off + bad}: {got[bad]} instead of {want[bad]}")
            return kind

        for _ in range(n):
            while len(pending) >= rng.randint(1, self.depth):
                collect()
            kind = rng.choices(["write", "zero", "trim", "flush", "read"], [50, 8, 8, 14, 10])[0]
            if kind == "flush":
                mark = m.flush_sent()
                pending[c.send(NBD_CMD_FLUSH)] = ("flush", (), mark)
                self.stats.flushes += 1
                self.stats.requests += 1
                continue
            off = rng.randrange(self.size)
            length = rng.randint(1, min(self.size - off, 3 * bs))
            blocks = range(off // bs, (off + length - 1) // bs + 1)
            if any(b in busy for b in blocks):
                while pending:         # drain: never two requests in flight on one block
                    collect()
            if kind == "read":
                cookie = c.send(NBD_CMD_READ, off, length)
                pending[cookie] = ("read", blocks, off, m.cur[off:off + length].copy())
            else:
                if kind == "write":
                    data = pattern(rng.randrange(2 ** 31), length)
                    arr = np.frombuffer(data, np.uint8)
                else:
                    data, arr = b"", np.zeros(length, np.uint8)
                fua = rng.random() < 0.1
                cmd = {"write": NBD_CMD_WRITE, "zero": NBD_CMD_WRITE_ZEROES, "trim": NBD_CMD_TRIM}[kind]
                flags = (NBD_CMD_FLAG_FUA if fua else 0) | (
                    NBD_CMD_FLAG_NO_HOLE if kind == "zero" and rng.random() < 0.5 else 0)
                seq = m.sent(off, arr)
                cookie = c.send(cmd, off, length, data, flags)
                pending[cookie] = ("write", blocks, off, arr, seq, fua)
                self.stats.fua += fua
            for b in blocks:
                busy[b] = cookie
            self.stats.requests += 1
        if kill_after_flush:
            while pending:
                collect()
            mark = m.flush_sent()
            c.send(NBD_CMD_FLUSH)
            pending[c.cookie] = ("flush", (), mark)
            self.stats.flushes += 1
            collect()
            self.stats.after_flush += 1
            return "right after a FLUSH reply"
        self.stats.in_flight += 1
        if pending and rng.random() < 0.5:
            time.sleep(rng.uniform(0, 0.005))
        return f"{len(pending)} requests in flight"


def run(seed: int, kills: int, workdir: str, sockdir: str, **kw) -> NbdKillStats:
    camp = NbdKillCampaign(seed, workdir, sockdir, **kw)
    for _ in range(kills):
        camp.kill_once()
    return camp.stats
