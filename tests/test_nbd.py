"""`vdisk serve` against real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy).

Every check compares byte for byte with the content written (a bytearray
model) or with what the image itself says after the server stopped
(Disk.map, changes_since, consumers).
"""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest

import vdisk
from vdisk_testkit.helpers import pattern
from vdisk_testkit.nbd_helpers import (complement, extents_of_map, nbdinfo_map, needs_clients, qemu_io_nbd, run,
                                       serve_process, socket_mode)  # noqa: F401 - serve_process is a fixture

pytestmark = needs_clients

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB


def make_image(path, size=32 * MiB, writes=()):
    with vdisk.create(path, size, block_size=BS) as d:
        for off, data in writes:
            d.pwrite(data, off)
    return str(path)


def image_bytes(path) -> bytes:
    with vdisk.open(path) as d:
        return d.pread(d.size, 0)


def runs(ext) -> list[tuple[int, int]]:
    return [(int(o), int(n)) for o, n in ext]


def test_qemu_io_write_zero_discard_flush_read(tmp_path, serve_process):
    img = make_image(tmp_path / "disk.vdk")
    srv = serve_process(img)
    model = bytearray(32 * MiB)
    qemu_io_nbd(srv.uri(), "write -P 0xa1 0 1M", "write -P 0xb2 3000 5000", "write -P 0xc3 5M 64k",
                "write -z 512k 128k", "discard 5M 4k", "write -P 0xd4 31M 1M", "flush",
                "read -P 0xa1 0 3000", "read -P 0xb2 3000 5000", "read -P 0xa1 8000 516288",
                "read -P 0 512k 128k", "read -P 0 5M 4k", "read -P 0xc3 5246976 60k", "read -P 0xd4 31M 1M",
                "read -P 0 1M 4M")
    model[0:MiB] = b"\xa1" * MiB
    model[3000:8000] = b"\xb2" * 5000
    model[5 * MiB:5 * MiB + 64 * KiB] = b"\xc3" * (64 * KiB)
    model[512 * KiB:640 * KiB] = bytes(128 * KiB)
    model[5 * MiB:5 * MiB + 4 * KiB] = bytes(4 * KiB)
    model[31 * MiB:] = b"\xd4" * MiB
    # the live export's two names are one disk
    qemu_io_nbd(srv.uri("disk"), "read -P 0xd4 31M 1M")
    assert srv.stop() == 0
    assert image_bytes(img) == bytes(model)
    assert vdisk.check(img).ok


def test_sigterm_flushes_closes_and_exits_0(tmp_path, serve_process):
    img = make_image(tmp_path / "disk.vdk")
    pid_file = str(tmp_path / "serve.pid")
    srv = serve_process(img, "--pid-file", pid_file)
    assert socket_mode(srv.socket) == 0o600
    with open(pid_file) as f:
        assert int(f.read()) == srv.proc.pid
    qemu_io_nbd(srv.uri(), "write -P 0x5a 1M 1M")      # no flush: the stop flushes
    with pytest.raises(vdisk.ImageLockedError):
        vdisk.open(img, "r+")                              # the server holds the write lock
    assert srv.stop(signal.SIGINT) == 0
    assert not os.path.exists(srv.socket) and not os.path.exists(pid_file)
    with vdisk.open(img, "r+") as d:                       # a clean close: the lock is free
        assert d.pread(MiB, MiB) == b"\x5a" * MiB


def test_qemu_img_map_and_convert_both_ways(tmp_path, serve_process):
    writes = [(0, pattern(1, 100 * KiB)), (7 * MiB + 123, pattern(2, 3 * MiB)), (31 * MiB, pattern(3, MiB))]
    img = make_image(tmp_path / "disk.vdk", writes=writes)
    srv = serve_process(img)
    out = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri()).stdout)
    data = [(e["start"], e["length"]) for e in out if e["data"]]
    merged = extents_of_map([{"offset": s, "length": n, "type": 1} for s, n in data], 1)
    assert all(e["zero"] for e in out if not e["data"])
    srv.stop()
    with vdisk.open(img) as d:
        expect = runs(d.map())
        content = d.pread(d.size, 0)
    assert merged == expect
    # nbd -> raw
    srv = serve_process(img)
    raw = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri(), raw)
    assert raw.read_bytes() == content
    # raw -> nbd (into a fresh image)
    src = tmp_path / "src.raw"
    body = bytearray(32 * MiB)
    body[MiB:2 * MiB] = pattern(9, MiB)
    body[20 * MiB + 5:20 * MiB + 70005] = pattern(10, 70000)
    src.write_bytes(bytes(body))
    img2 = make_image(tmp_path / "dst.vdk")
    srv2 = serve_process(img2)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, srv2.uri())
    assert srv2.stop() == 0 and srv.stop() == 0
    assert image_bytes(img2) == bytes(body)
    with vdisk.open(img2) as d:     # qemu-img skips zeros: only the written blocks are allocated
        assert {o // BS for o, n in d.map() for o in range(o, o + n, BS)} == \
            {b for b in range(32 * MiB // BS) if any(body[b * BS:(b + 1) * BS])}


def test_nbdcopy_both_ways(tmp_path, serve_process):
    writes = [(MiB, pattern(4, 2 * MiB)), (17 * MiB + 9, pattern(5, 5000))]
    img = make_image(tmp_path / "disk.vdk", writes=writes)
    content = image_bytes(img)
    srv = serve_process(img)
    out = tmp_path / "copy.raw"
    run("nbdcopy", srv.uri(), out)
    assert out.read_bytes() == content
    img2 = make_image(tmp_path / "two.vdk")
    srv2 = serve_process(img2)
    run("nbdcopy", out, srv2.uri())
    assert srv2.stop() == 0 and srv.stop() == 0
    assert image_bytes(img2) == content


def test_nbdinfo_list_and_maps_of_both_contexts(tmp_path, serve_process):
    img = str(tmp_path / "vm.vdk")
    with vdisk.create(img, 32 * MiB, block_size=BS) as d:
        d.pwrite(pattern(1, 3 * BS), 2 * BS)
        first = d.checkpoint()
        d.consumers.register("nightly", first)
        d.pwrite(pattern(2, 100), 10 * BS + 7)
        d.pwrite(pattern(3, BS), 3 * BS)
        d.snapshot("monday")
        d.pwrite(pattern(4, 2 * BS), 20 * BS)
        second = d.checkpoint()
        d.pwrite(pattern(5, 10), 30 * BS)
        expect_map = runs(d.map())
        expect_nightly = runs(d.changes_since(first))
        expect_second = runs(d.changes_since(second))
        snap = d.open_snapshot("monday")
        expect_snap_map = runs(snap.map())
        expect_snap_nightly = runs(snap.changes_since(first))
        snap.close()
    srv = serve_process(img)
    listing = json.loads(run("nbdinfo", "--list", "--json", srv.uri()).stdout)
    names = {e["export-name"]: e for e in listing["exports"]}
    assert set(names) == {"vm", "vm@monday"}
    assert names["vm"]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:nightly"]
    assert names["vm@monday"]["is_read_only"] and not names["vm"]["is_read_only"]
    size = 32 * MiB
    alloc = nbdinfo_map(srv.uri("vm"))
    assert complement(extents_of_map(alloc, 3), size) == expect_map
    assert all(e["type"] in (0, 3) for e in alloc)
    assert extents_of_map(nbdinfo_map(srv.uri("vm"), "qemu:dirty-bitmap:nightly"), 1) == expect_nightly
    assert extents_of_map(nbdinfo_map(srv.uri("vm"), f"qemu:dirty-bitmap:{second}"), 1) == expect_second
    snap_alloc = nbdinfo_map(srv.uri("vm@monday"))
    assert complement(extents_of_map(snap_alloc, 3), size) == expect_snap_map
    assert extents_of_map(nbdinfo_map(srv.uri("vm@monday"), "qemu:dirty-bitmap:nightly"), 1) == expect_snap_nightly
    # an id after the snapshot's point is not offered on it: refused, not a partial answer
    r = run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{second}", srv.uri("vm@monday"), check=False)
    assert r.returncode != 0
    assert srv.stop() == 0


def test_snapshot_export_reads_frozen_content_and_refuses_writes(tmp_path, serve_process):
    img = str(tmp_path / "disk.vdk")
    with vdisk.create(img, 8 * MiB, block_size=BS) as d:
        d.pwrite(b"\x11" * MiB, 0)
        d.snapshot("s")
        d.pwrite(b"\x22" * MiB, 0)
    srv = serve_process(img)
    qemu_io_nbd(srv.uri("disk@s"), "read -P 0x11 0 1M", read_only=True)
    qemu_io_nbd(srv.uri(), "read -P 0x22 0 1M")
    r = run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", srv.uri("disk@s"), check=False)
    assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()
    assert srv.stop() == 0
    with vdisk.open(img) as d:
        assert d.open_snapshot("s").pread(MiB, 0) == b"\x11" * MiB


def test_read_only_server(tmp_path, serve_process):
    img = make_image(tmp_path / "disk.vdk", writes=[(0, b"\x44" * 4096)])
    srv = serve_process(img, "--read-only")
    qemu_io_nbd(srv.uri(), "read -P 0x44 0 4k", read_only=True)
    with vdisk.open(img, "r") as d:                        # readers share the image
        assert d.pread(4096, 0) == b"\x44" * 4096
    r = run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4k", srv.uri(), check=False)
    assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()
    assert srv.stop() == 0
    assert image_bytes(img)[:4096] == b"\x44" * 4096


def test_cli_refuses_non_loopback_listen_before_binding(tmp_path):
    # the image does not exist: the refusal comes before the image is opened, so before any bind
    missing = str(tmp_path / "missing.vdk")
    for addr in ("0.0.0.0:10809", "[::]:10809", "192.0.2.1:10809"):
        r = run(sys.executable, "-m", "vdisk", "serve", missing, "--listen", addr, check=False)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--insecure" in lines[0] and "--tls-cert" in lines[0], r.stderr
    # a usage error: exit 1, as every command's (qemu-img's convention, issue 17)
    r = run(sys.executable, "-m", "vdisk", "serve", missing, check=False)
    assert r.returncode == 1 and "--socket" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sigkill_after_flush_loses_nothing_flushed_and_tracking_covers(tmp_path, serve_process):
    """The crash contract through NBD: SIGKILL right after the replies; what a
    client was told is flushed (FLUSH on any connection, or FUA) reads back,
    and changes_since of every outstanding id covers every changed block."""
    from vdisk_testkit.helpers import differing_blocks, extent_blocks
    from vdisk_testkit.nbd_client import Client
    from vdisk.nbd import protocol as P
    img = str(tmp_path / "disk.vdk")
    size = 16 * MiB
    with vdisk.create(img, size, block_size=BS) as d:
        d.pwrite(pattern(1, 4 * MiB), 0)
        old = d.checkpoint()
        d.consumers.register("nightly", old)
        d.pwrite(pattern(2, MiB), 4 * MiB)
        newer = d.checkpoint()
        before = d.pread(size, 0)
    srv = serve_process(img)
    a, b = Client(srv.socket).connect(), Client(srv.socket).connect()
    flushed = {}
    for i in range(8):                                   # new blocks (a mapping only a flush makes durable)
        off = 7 * MiB + i * 300 * KiB + 77
        data = pattern(10 + i, 50 * KiB)
        assert a.call(P.NBD_CMD_WRITE, off, len(data), 0, data).error == 0
        flushed[off] = data
    assert a.call(P.NBD_CMD_TRIM, 4 * MiB, 2 * BS).error == 0
    assert a.call(P.NBD_CMD_WRITE_ZEROES, 2 * MiB + 100, 3 * BS, P.NBD_CMD_FLAG_NO_HOLE).error == 0
    assert b.call(P.NBD_CMD_FLUSH).error == 0
    fua = pattern(30, 70 * KiB)
    assert b.call(P.NBD_CMD_WRITE, 10 * MiB + 5, len(fua), P.NBD_CMD_FLAG_FUA, fua).error == 0
    flushed[10 * MiB + 5] = fua
    for i in range(20):                                  # never flushed: may or may not survive
        data = pattern(40 + i, 20 * KiB)
        assert a.call(P.NBD_CMD_WRITE, 12 * MiB + i * 100 * KiB, len(data), 0, data).error == 0
    srv.kill()
    a.close(), b.close()
    with vdisk.open(img, "r+") as d:
        now = d.pread(size, 0)
        for off, data in flushed.items():
            assert now[off:off + len(data)] == data, f"flushed write at {off} lost"
        assert now[4 * MiB:4 * MiB + 2 * BS] == bytes(2 * BS)
        assert now[2 * MiB + 100:2 * MiB + 100 + 3 * BS] == bytes(3 * BS)
        changed = differing_blocks(now, before, BS)
        for cid in (old, newer, d.consumers["nightly"].change_id):
            missing = changed - extent_blocks(d.changes_since(cid), BS)
            assert not missing, f"changes_since({cid}) misses blocks {sorted(missing)[:8]}"
    assert not vdisk.check(img).corruptions


def test_golden_against_qemu_nbd_dirty_bitmap_and_allocation(tmp_path, serve_process):
    """The same writes to a qcow2 with a persistent bitmap served by `qemu-nbd -B`
    and to a vdisk image with a consumer: the same dirty extents at the block
    size and the same allocation map."""
    import shutil
    import subprocess
    import time
    if not shutil.which("qemu-nbd"):
        pytest.skip("qemu-nbd not installed")
    size = 32 * MiB
    first = [(0, 100 * KiB), (5 * MiB + 3, 3 * BS), (20 * MiB, MiB)]
    second = [(70 * KiB, 10), (5 * MiB + BS, 5), (9 * MiB + 4095, 2 * BS + 2), (31 * MiB, MiB), (20 * MiB + 7, 9)]
    q = str(tmp_path / "g.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", q, size)

    def qemu_writes(ws, seed):
        cmds = []
        for i, (off, n) in enumerate(ws):
            cmds += ["-c", f"write -P {seed + i} {off} {n}"]
        run("qemu-io", "-f", "qcow2", *cmds, q)
    qemu_writes(first, 1)
    run("qemu-img", "bitmap", "--add", "-g", "64k", q, "b0")
    qemu_writes(second, 50)
    img = str(tmp_path / "g.vdk")
    with vdisk.create(img, size, block_size=BS) as d:
        for i, (off, n) in enumerate(first):
            d.pwrite(bytes([1 + i]) * n, off)
        d.consumers.register("b0", d.checkpoint())
        for i, (off, n) in enumerate(second):
            d.pwrite(bytes([50 + i]) * n, off)
    qsock = str(tmp_path / "q.sock")
    qproc = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", "-B", "b0", "-x", "g", "-k", qsock, q],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if os.path.exists(qsock):
                break
            time.sleep(0.02)
        srv = serve_process(img)
        quri = f"nbd+unix:///g?socket={qsock}"
        q_dirty = extents_of_map(nbdinfo_map(quri, "qemu:dirty-bitmap:b0"), 1)
        v_dirty = extents_of_map(nbdinfo_map(srv.uri(), "qemu:dirty-bitmap:b0"), 1)
        assert q_dirty == v_dirty and q_dirty
        q_alloc = extents_of_map(nbdinfo_map(quri), 3)
        v_alloc = extents_of_map(nbdinfo_map(srv.uri()), 3)
        assert q_alloc == v_alloc
        q_data = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", quri).stdout)
        v_data = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri()).stdout)
        strip = [("start", "length", "data", "zero")]
        assert [{k: e[k] for k in strip[0]} for e in q_data] == [{k: e[k] for k in strip[0]} for e in v_data]
        assert srv.stop() == 0
    finally:
        qproc.terminate()
        qproc.communicate(timeout=30)


def test_sigterm_answers_requests_in_flight_then_exits_0(tmp_path, serve_process):
    """Pipelined writes, SIGTERM as soon as the first reply arrives: every write
    answered is in the image after the clean exit, and the session ends with a
    close, not a half-sent reply."""
    from vdisk_testkit.nbd_client import Client
    from vdisk.nbd import protocol as P
    img = make_image(tmp_path / "disk.vdk")
    srv = serve_process(img)
    c = Client(srv.socket).connect()
    n = 200
    burst = b"".join(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_WRITE, i + 1, i * BS, 4096)
                     + bytes([i % 250 + 1]) * 4096 for i in range(n))
    c.send(burst)
    answered = [c.reply()]
    srv.proc.send_signal(signal.SIGTERM)
    while True:
        try:
            answered.append(c.reply())
        except EOFError:
            break
    c.close()
    assert srv.stop() == 0
    assert all(r.error == 0 for r in answered) and [r.cookie for r in answered] == list(range(1, len(answered) + 1))
    data = image_bytes(img)
    for r in answered:
        i = r.cookie - 1
        assert data[i * BS:i * BS + 4096] == bytes([i % 250 + 1]) * 4096


def test_second_server_on_a_served_image_fails_in_one_line(tmp_path, serve_process):
    img = make_image(tmp_path / "disk.vdk")
    serve_process(img)
    r = run(sys.executable, "-m", "vdisk", "serve", img, "--socket", str(tmp_path / "other.sock"), check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "in use" in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--socket", "/nonexistent-dir/x.sock"], ["cannot listen", "/nonexistent-dir/x.sock"]),
    (["--listen", "127.0.0.1:0", "--tls-cert", "cert.pem"], ["--tls-key"]),
    (["--listen", "127.0.0.1:0", "--tls-cert", "/missing.pem", "--tls-key", "/missing.key"], ["/missing.pem"]),
    (["--listen", "no-port"], ["HOST:PORT"]),
    (["--socket", "s.sock", "--export", "a@b"], ["'a@b'"]),
    (["--socket", ""], ["--socket ''"]),             # was a traceback (IndexError in create_unix_server)
])
def test_cli_errors_are_one_line(tmp_path, args, words):
    img = make_image(tmp_path / "disk.vdk", size=MiB)
    r = run(sys.executable, "-m", "vdisk", "serve", img, *args, check=False, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("vdisk: error: "), r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_serve_until_stopped_before_start_says_so(tmp_path):
    """A server not started has nothing to wait for: ServeError naming start(), not
    AttributeError "'NoneType' object has no attribute 'wait'" (found by mypy)."""
    import asyncio

    from vdisk.nbd import Server
    srv = Server(make_image(tmp_path / "disk.vdk", size=MiB), socket=str(tmp_path / "s.sock"))
    try:
        with pytest.raises(vdisk.ServeError, match=r"not started: call start\(\)"):
            asyncio.run(srv.serve_until_stopped())
    finally:
        srv.disk.close()
