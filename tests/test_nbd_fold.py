"""The server's fold policy: no fold in the event loop's thread; a client that
never flushes still gets its writes folded (in the flush thread) within a few
periods; the Disk's own fold_interval is put back at stop."""
from __future__ import annotations

import threading
import time

import vdisk
from vdisk.nbd import Server, protocol as P
from vdisk_testkit.nbd_client import Client

BS = 4096


def test_folds_run_off_the_loop_thread_and_periodically(tmp_path, monkeypatch):
    path = str(tmp_path / "d.vdisk")
    with vdisk.create(path, "4MiB", block_size="4KiB") as d:
        d.pwrite(b"\1" * (1 << 20), 0)
        c0 = d.checkpoint()
        d.fold_interval = 8                     # an automatic fold every 8 writes, were it left on
        folds: list[str] = []
        real = d._flush_begin                   # step 1 of every flush, the fold (locked or not)

        def recording(*args, **kwargs):
            folds.append(threading.current_thread().name)
            return real(*args, **kwargs)
        monkeypatch.setattr(d, "_flush_begin", recording)
        srv = Server(d, socket=str(tmp_path / "s.sock"), fold_period=0.2)
        srv.start_in_thread()
        try:
            assert d.fold_interval > 1 << 40
            cl = Client(srv.socket_path).connect()
            for i in range(64):                 # in-place overwrites, never a FLUSH
                assert cl.call(P.NBD_CMD_WRITE, i * BS, BS, payload=bytes([i + 2]) * BS).error == 0
            deadline = time.monotonic() + 30
            while not folds and time.monotonic() < deadline:
                time.sleep(0.05)
            assert folds, "no periodic fold after writes that were never flushed"
            assert all(name.startswith("vdisk-nbd-flush") for name in folds), folds
            assert srv.unflushed == 0
            cl.close()
        finally:
            srv.stop_in_thread()
        assert d.fold_interval == 8
        assert {(o, n) for o, n in d.changes_since(c0)} == {(0, 64 * BS)}


def test_the_periodic_fold_waits_for_a_pause_or_for_its_longest_period(tmp_path, monkeypatch):
    """Writes that never pause get no periodic fold (its fdatasync beside them
    slows them) until FOLD_MAX_PERIODS periods passed; once they pause for a
    period, the fold comes."""
    from vdisk.nbd.server import FOLD_MAX_PERIODS
    period = 0.25
    path = str(tmp_path / "p.vdisk")
    with vdisk.create(path, "4MiB", block_size="4KiB") as d:
        d.pwrite(b"\1" * (1 << 20), 0)
        d.checkpoint()
        folds: list[float] = []
        real = d._flush_begin

        def recording(*args, **kwargs):
            folds.append(time.monotonic())
            return real(*args, **kwargs)
        monkeypatch.setattr(d, "_flush_begin", recording)
        srv = Server(d, socket=str(tmp_path / "p.sock"), fold_period=period)
        srv.start_in_thread()
        try:
            cl = Client(srv.socket_path).connect()
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < (FOLD_MAX_PERIODS + 4) * period:     # never a pause of a period
                assert cl.call(P.NBD_CMD_WRITE, (i % 256) * BS, BS, payload=bytes([i % 250 + 2]) * BS).error == 0
                i += 1
                time.sleep(0.005)
            during = [t - t0 for t in folds]
            assert during, "no fold in FOLD_MAX_PERIODS + 4 periods of writes"
            assert min(during) >= (FOLD_MAX_PERIODS - 1) * period, during      # none before the longest period
            folds.clear()
            paused = time.monotonic()
            deadline = paused + 30
            while not folds and time.monotonic() < deadline:
                time.sleep(0.02)
            assert folds and folds[0] - paused <= 3 * period + 1, folds          # a pause: folded within periods
            assert srv.unflushed == 0
            cl.close()
        finally:
            srv.stop_in_thread()
