"""Writers on a served image's live export, and the checks of what a backup of it restores.

* QemuIoWriter: qemu-io processes in a loop, each a batch of writes, zero
  writes and a flush at pseudo-random places (any failure is kept and
  raised by stop()).
* StampWriter: one NBD connection writing unit j (of `units` 4 KiB units)
  with the stamp j, for j = 0, 1, 2, ... one request after the other, so
  the served content is always state(k): the first k writes done, none
  after.  stamp_point(content) finds the k a copy shows, and fails if the
  copy is no state(k) at all (a torn backup, a missing block, a block from
  another point).
"""
from __future__ import annotations

import random
import struct
import subprocess
import threading

import numpy as np

import vdisk.nbd.protocol as P
from vdisk_testkit.nbd_client import Client

UNIT = 4096


class QemuIoWriter:
    def __init__(self, uri: str, size: int, seed: int = 1, batch: int = 16):
        self.uri, self.size, self.batch = uri, size, batch
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.runs = 0
        self.thread = threading.Thread(target=self._body, daemon=True)
        self.thread.start()

    def _body(self) -> None:
        while not self.stop_event.is_set():
            cmds = []
            for _ in range(self.batch):
                off = self.rng.randrange(0, self.size // UNIT - 16) * UNIT
                n = self.rng.choice((UNIT, 4 * UNIT, 16 * UNIT))
                if self.rng.random() < 0.1:
                    cmds += ["-c", f"write -z {off} {n}"]
                else:
                    cmds += ["-c", f"write -P {self.rng.randrange(1, 255)} {off} {n}"]
            cmds += ["-c", "flush"]
            r = subprocess.run(["qemu-io", "-f", "raw", *cmds, self.uri], capture_output=True, text=True,
                               timeout=120)
            out = r.stdout + r.stderr
            if r.returncode or "error" in out.lower() or "fail" in out.lower():
                self.errors.append(f"qemu-io exited {r.returncode}: {out[-500:]}")
                return
            self.runs += 1

    def stop(self) -> int:
        self.stop_event.set()
        self.thread.join(180)
        assert not self.errors, self.errors
        assert self.runs > 0, "qemu-io never completed a batch"
        return self.runs


def stamp(j: int) -> bytes:
    return struct.pack("<Q", j + 1) * (UNIT // 8)        # +1: a never-written unit reads 0


class StampWriter:
    """Writes stamps through one NBD connection until stop(); .done is the count acknowledged."""

    def __init__(self, sock: str, units: int, export: str = "", flush_every: int = 64, rate: float = 0,
                 start: int = 0, replay_from: int | None = None):
        """start: the first write's j, for a writer taking over from one whose server was
        SIGKILLed after it had `start` writes acknowledged.  A kill keeps every write flushed
        before it, but not the unflushed writes into blocks allocated since the last flush
        (their table commit never happened: FORMAT.md, "Refcounts"), so the content is then
        state(flushed) with only some of the later writes.  replay_from (the killed writer's
        .flushed) first writes j = replay_from .. start - 1 again and flushes, which makes the
        content state(start) or state(start + 1) again; .replayed is set after that flush, and
        only from then on is the content a state(k) at every moment."""
        self.units, self.flush_every, self.start = units, flush_every, start
        self.rate = rate                    # writes per second (0: as fast as the server answers)
        self.client = Client(sock).connect(export)
        self.done = start
        self.flushed = start if replay_from is None else replay_from   # j's below it are durable
        self.replay_from = start if replay_from is None else replay_from
        self.replayed = threading.Event()
        self.errors: list[str] = []
        self.stop_event = threading.Event()
        self.latencies: list[float] = []
        self.thread = threading.Thread(target=self._body, daemon=True)
        self.thread.start()

    def _replay(self) -> bool:
        for j in range(self.replay_from, self.start):
            if self.client.call(P.NBD_CMD_WRITE, (j % self.units) * UNIT, UNIT, payload=stamp(j)).error:
                self.errors.append(f"replay of write {j}")
                return False
        if self.client.call(P.NBD_CMD_FLUSH).error:
            self.errors.append("flush after the replay")
            return False
        self.flushed = self.start
        self.replayed.set()
        return True

    def _body(self) -> None:
        import time
        try:
            if not self._replay():
                return
            j = self.start
            start = time.perf_counter() - j / self.rate if self.rate else 0
            while not self.stop_event.is_set():
                if self.rate:
                    ahead = start + j / self.rate - time.perf_counter()
                    if ahead > 0:
                        time.sleep(ahead)
                t = time.perf_counter()
                r = self.client.call(P.NBD_CMD_WRITE, (j % self.units) * UNIT, UNIT, payload=stamp(j))
                self.latencies.append(time.perf_counter() - t)
                if r.error:
                    self.errors.append(f"write {j}: NBD error {r.error}")
                    return
                j += 1
                self.done = j
                if j % self.flush_every == 0:
                    if self.client.call(P.NBD_CMD_FLUSH).error:
                        self.errors.append(f"flush after {j}")
                        return
                    self.flushed = j
        except Exception as exc:                        # noqa: BLE001 - reported by stop()
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self, check: bool = True) -> int:
        """Stop writing; check: fail if a write failed (not when the server was killed on purpose)."""
        self.stop_event.set()
        self.thread.join(60)
        self.client.close()
        assert not check or not self.errors, self.errors
        return self.done


def stamp_point(content: bytes, units: int) -> int:
    """The k with content == state(k) over the first `units` units; AssertionError if none."""
    arr = np.frombuffer(content[:units * UNIT], dtype="<u8").reshape(units, UNIT // 8)
    first = arr[:, 0]
    assert (arr == first[:, None]).all(), "a unit holds two stamps (a torn copy)"
    k = int(first.max())                                  # the last write in the copy was k - 1 ... stamp k
    idx = np.arange(units, dtype=np.int64)
    last = k - 1                                          # index of the last write done
    # state(k): unit b holds the last j <= last with j % units == b (stamp j + 1), or 0 if none
    expect = np.where(idx <= last, idx + ((last - idx) // units) * units + 1, 0)
    bad = np.flatnonzero(first != expect)
    assert not len(bad), (f"not the state after {k} writes: unit {int(bad[0])} holds stamp {int(first[bad[0]])}, "
                          f"expected {int(expect[bad[0]])} ({len(bad)} units differ)")
    return k
