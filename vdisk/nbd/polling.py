"""Busy polling between requests: the server's answer to slow wakeups.

A client at queue depth 1 sends its next request a few microseconds after
it read our reply.  When the server's thread sleeps in the event loop's
epoll_wait meanwhile, each request pays for waking it: on a virtual
machine whose idle CPUs halt, waking a thread on the other CPU costs tens
of microseconds (about 36 µs on the host of benchmarks/README.md, where a
4 KiB round trip took 85 µs across CPUs and 12.5 µs on one).  So, as
qemu's iothreads do (their poll-max-ns, 32 µs by default), the server
spins for a short while after it replied, before it sleeps: it asks the
kernel, without waiting, whether any connection's socket became readable,
and returns to the event loop as soon as one did.  The loop's epoll_wait
then returns at once.

The spin is bounded and adaptive, so an idle server burns nothing:

* it runs once the loop has nothing else ready (scheduled with call_soon
  after a burst of replies), for at most ``max_ns``;
* it runs only while requests come soon after replies: when the last
  wait (from the loop going idle to the next request's bytes arriving)
  was at most ``2 * max_ns``.  A connection that goes quiet costs one
  spin that times out, then none until requests come quickly again.  The
  factor 2 is there because a wait measured while the thread slept holds
  its own wakeup, which the spin would have saved;
* after a burst of block status requests alone it spins only for a client
  that can never run beside the server (``replied(data=False)``): a
  client walking the map (nbdinfo --map, a backup tool) works through each
  reply before it asks again, and when it may share the server's CPU it
  runs fastest there, which the scheduler arranges only while the server
  sleeps (a spinning server draws it to the other CPU: on the benchmark
  host a map of 1 TiB took 45 ms with the spin against 32-41 ms without,
  benchmarks/README.md).  A client is *apart* (peer_apart) when it is a
  local process whose CPU affinity shares no CPU with the server's, or
  not a local process (TCP): for it the spin saves the server's wakeup
  as for data requests.

The spin watches every connection's socket (one epoll set of the
transmission sockets, level-triggered), so a request on another
connection ends it as well; it releases the GIL (vdisk._fast
spin_until_ready), so the flush thread and a program's own threads go on.
What it does not watch: timers and the flush thread's completion, which
therefore wait at most ``max_ns`` longer.  ``max_ns`` 0 turns it off.
"""
from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import time

from .. import _fast

DEFAULT_POLL_US = 50
"""The server's default spin budget (µs).  A 4 KiB request's round trip
across two CPUs of the benchmark host waits 40-50 µs for the client."""
MAX_POLL_US = 1000
"""The largest budget a server takes (``poll_us``, ``--poll-us``)."""


class Polling:
    """The spin budget, the epoll set of the transmission sockets, and the rule of when to spin."""

    def __init__(self, max_ns: int):
        if max_ns < 0:
            raise ValueError(f"poll budget {max_ns} ns: not negative")
        self.max_ns = max_ns
        self._ep = select.epoll() if max_ns else None
        self._owners: dict[int, object] = {}     # fd -> the connection that registered it
        self._apart: set[int] = set()             # the fds whose clients can never run beside the server
        self._queued = False
        self._idle_since = 0                      # monotonic ns when the loop went idle; 0: not waiting
        self.last_wait_ns = 1 << 62               # the last measured wait; long: do not spin yet
        self.caught = 0                           # spins that saw a request arrive
        self.missed = 0                           # spins that ran out of budget

    @property
    def enabled(self) -> bool:
        return self._ep is not None

    def watch(self, transport: asyncio.BaseTransport, owner: object) -> int:
        """Watch the socket of owner's transport: its descriptor (-1 when not watched), for remove()."""
        if self._ep is None:
            return -1
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        self.add(fd, owner, apart=sock is None or peer_apart(sock))
        return fd

    def add(self, fd: int, owner: object, apart: bool = True) -> None:
        """Watch a connection's socket (its descriptor number may be a closed one's
        again); apart: its client can never run beside the server (peer_apart)."""
        ep = self._ep
        if ep is None or fd < 0:
            return
        if fd in self._owners:                    # a closed socket's number, seen again
            try:
                ep.unregister(fd)
            except OSError:                       # the kernel dropped it with its file
                pass
        try:
            ep.register(fd, select.EPOLLIN)
        except OSError:                           # not a pollable descriptor: the spin ignores it
            return
        self._owners[fd] = owner
        if apart:
            self._apart.add(fd)
        else:
            self._apart.discard(fd)

    def remove(self, fd: int, owner: object) -> None:
        """Stop watching it; only its owner's registration is removed (not a later socket's)."""
        ep = self._ep
        if ep is None or self._owners.get(fd) is not owner:
            return
        del self._owners[fd]
        self._apart.discard(fd)
        try:
            ep.unregister(fd)
        except OSError:
            pass

    def arrived(self) -> None:
        """Bytes of an option or a request arrived (data_received): the wait ends."""
        since = self._idle_since
        if since:
            self.last_wait_ns = time.monotonic_ns() - since
            self._idle_since = 0

    def replied(self, data: bool = True) -> None:
        """A connection answered everything it had: spin once the loop has nothing
        else to run.  data False: the burst was block status alone, spin only if
        a watched client is apart (see the module docstring)."""
        if self._ep is not None and not self._queued and (data or self._apart):
            self._queued = True
            asyncio.get_running_loop().call_soon(self._spin)

    def _spin(self) -> None:
        self._queued = False
        ep = self._ep
        if ep is None:
            return
        self._idle_since = time.monotonic_ns()
        if self.last_wait_ns > 2 * self.max_ns:
            return                                # requests come slowly: sleep in the loop
        if _fast.spin_until_ready(ep.fileno(), self.max_ns) >= 0:
            self.caught += 1
        else:
            self.missed += 1

    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        self._owners.clear()
        self._apart.clear()


def peer_apart(sock: socket.socket) -> bool:
    """Whether the client behind a connected socket can never run on a CPU
    this thread may run on: a local (Unix socket) client whose CPU affinity
    and ours are disjoint, or a client we cannot ask (TCP, or its process
    gone or not ours to ask)."""
    if sock.family != getattr(socket, "AF_UNIX", None) or not hasattr(socket, "SO_PEERCRED"):
        return True
    try:
        pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        return pid <= 0 or not (os.sched_getaffinity(pid) & os.sched_getaffinity(0))
    except (OSError, AttributeError, struct.error):
        return True
