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
