"""The server's spin for the next request (vdisk/nbd/polling.py).

What must hold: the spin ends when any watched connection's socket becomes
readable; a connection's closed socket number, reused by a later one, does
not take the later one's registration with it; a client at queue depth 1
is caught by the spin; a server whose clients are idle or slow does not
spin (one spin at most after a burst), nor after block status alone (a
client walking the map); poll_us 0 turns it off; the CLI
refuses a budget out of range, naming the flag.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest

import vdisk
from vdisk import _fast
from vdisk.nbd import Server
from vdisk.nbd.polling import Polling
from vdisk_testkit.nbd_client import Client

KiB, MiB = 1 << 10, 1 << 20


def spin_once(polling: Polling) -> None:
    """Run one spin as the server's loop would: queued by replied(), run by the loop."""
    async def body() -> None:
        polling.replied()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    asyncio.run(body())


def test_the_spin_ends_when_any_watched_socket_is_readable():
    p = Polling(200_000_000)            # 200 ms: a spin that ran out would show in the time it took
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for i, (a, _b) in enumerate(pairs):
            p.add(a.fileno(), i)
        p.last_wait_ns = 0               # requests came quickly: spin
        pairs[2][1].send(b"x")           # the last connection has a request waiting
        t0 = time.monotonic()
        spin_once(p)
        assert (p.caught, p.missed) == (1, 0)
        assert time.monotonic() - t0 < 0.15
        pairs[2][0].recv(1)
        p.last_wait_ns = 0
        spin_once(p)                     # nothing readable: the budget runs out
        assert (p.caught, p.missed) == (1, 1)
        assert _fast.spin_until_ready(-1, 10_000) == -1      # epoll_wait fails: -1, no hang
    finally:
        p.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_a_reused_descriptor_number_keeps_the_later_connections_registration():
    p = Polling(50_000_000)
    a, b = socket.socketpair()
    fd = a.fileno()
    p.add(fd, "first")
    a.close()                           # the first connection's socket is gone; its number is free
    c, d = socket.socketpair()
    try:
        if c.fileno() != fd:            # make the later socket take the same number
            os.dup2(c.fileno(), fd)
            c.close()
            c = socket.socket(fileno=fd)
        p.add(fd, "second")
        p.remove(fd, "first")           # the first connection's connection_lost, late
        d.send(b"x")
        p.last_wait_ns = 0
        spin_once(p)
        assert p.caught == 1            # still watched
        p.remove(fd, "second")
        p.last_wait_ns = 0
        spin_once(p)
        assert p.missed == 1            # not watched any more: the spin runs out
    finally:
        p.close()
        for s in (b, c, d):
            s.close()


def test_polling_off_is_inert():
    p = Polling(0)
    a, b = socket.socketpair()
    try:
        p.add(a.fileno(), 1)
        p.replied()                     # no loop is needed: nothing is queued
        assert not p.enabled and (p.caught, p.missed) == (0, 0)
    finally:
        a.close()
        b.close()
    for bad in (-1, 1001, 2.5, True):
        with pytest.raises(vdisk.VdiskError, match="poll_us"):
            Server("/nonexistent/p.vdk", socket="/x", poll_us=bad)    # refused before the image is opened


@pytest.fixture
def served(tmp_path):
    """serve(poll_us): a context giving (server, its socket, a connected client), all stopped after."""
    path = str(tmp_path / "p.vdk")
    with vdisk.create(path, 16 * MiB, block_size=64 * KiB) as d:
        d.pwrite(b"\x07" * MiB, 0)
    sock = str(tmp_path / "p.sock")

    @contextlib.contextmanager
    def serve(poll_us: int):
        srv = Server(path, socket=sock, poll_us=poll_us).start_in_thread()
        try:
            c = Client(sock).connect()
            try:
                yield srv, sock, c
            finally:
                c.close()
        finally:
            srv.stop_in_thread()
    return serve


def qd1(c: Client, n: int, pause: float = 0.0) -> None:
    for i in range(n):
        assert c.read((i % 16) * 4096, 4096) == b"\x07" * 4096
        if pause:
            time.sleep(pause)


def test_a_client_at_queue_depth_1_is_caught_by_the_spin(served):
    with served(1000) as (srv, _sock, c):         # 1 ms: room for a loaded machine's client
        qd1(c, 400)
        p = srv.polling
        assert p.caught >= 200, (p.caught, p.missed)     # most requests arrive while it spins


def test_idle_or_slow_clients_make_no_spins(served):
    with served(1000) as (srv, _sock, c):
        qd1(c, 50)
        p = srv.polling
        before = p.caught + p.missed
        time.sleep(0.2)                 # idle: at most the one spin after the last reply
        qd1(c, 20, pause=0.01)          # a request every 10 ms: far slower than the budget
        spins = p.caught + p.missed - before
        assert spins <= 2, (p.caught, p.missed)          # always spinning would be 20


def test_block_status_alone_is_not_followed_by_a_spin(served):
    """A client walking the map (block status only, at queue depth 1) that may
    run beside the server (here: in its process) gets no spin after its
    replies; a read among its requests brings the spin back."""
    with served(1000) as (srv, sock, _c):
        c = Client(sock).connect(contexts=["base:allocation"])
        try:
            p = srv.polling
            before = p.caught + p.missed
            for i in range(100):
                assert isinstance(c.block_status((i % 16) * 64 * KiB, 64 * KiB), dict)
            assert p.caught + p.missed - before <= 1, (p.caught, p.missed)     # the handshake's last, at most
            qd1(c, 100)
            assert p.caught >= 50, (p.caught, p.missed)
        finally:
            c.close()


WALKER = """
import sys
from vdisk_testkit.nbd_client import Client
c = Client(sys.argv[1]).connect(contexts=["base:allocation"])
for i in range(100):
    assert isinstance(c.block_status((i % 16) * 65536, 65536), dict)
c.close()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to keep a client apart")
def test_block_status_is_followed_by_a_spin_for_a_client_kept_on_another_cpu(served):
    """The same walk from a process pinned to a CPU the server's thread may not
    use (taskset): the two can never share a CPU, so the spin saves the
    server's wakeup as for reads."""
    cpus = sorted(os.sched_getaffinity(0))
    main = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})          # the server's thread, started now, inherits it
    try:
        with served(1000) as (srv, sock, _c):
            os.sched_setaffinity(0, main)
            p = srv.polling
            before = p.caught + p.missed
            out = subprocess.run(["taskset", "-c", str(cpus[1]), sys.executable, "-c", WALKER, sock],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert p.caught + p.missed - before >= 50, (p.caught, p.missed)
    finally:
        os.sched_setaffinity(0, main)


def test_peer_apart_tells_a_client_that_may_share_our_cpus():
    from vdisk.nbd.polling import peer_apart
    a, b = socket.socketpair()                  # this process on both ends: the same CPUs
    try:
        assert peer_apart(a) is False
    finally:
        a.close()
        b.close()
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        assert peer_apart(s) is True            # TCP: a client we cannot ask
        s.close()
        c.close()
    finally:
        srv.close()


def test_poll_us_0_serves_without_spinning(served):
    with served(0) as (srv, _sock, c):
        qd1(c, 100)
        assert not srv.polling.enabled and (srv.polling.caught, srv.polling.missed) == (0, 0)


def test_cli_refuses_a_budget_out_of_range(tmp_path):
    path = str(tmp_path / "c.vdk")
    vdisk.create(path, MiB).close()
    out = subprocess.run([sys.executable, "-m", "vdisk", "serve", path, "--socket", str(tmp_path / "s"),
                          "--poll-us", "5000"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--poll-us" in lines[0], out.stderr


def test_the_handshake_spins_for_the_next_option(served):
    """Each option's replies are followed by a spin for the client's next option, as requests are."""
    with served(1000) as (srv, sock, _c):
        before = srv.polling.caught
        for _ in range(20):
            Client(sock).connect(contexts=["base:allocation"]).close()      # four options each, no request
        p = srv.polling
        assert p.caught - before >= 20, (p.caught, p.missed)
