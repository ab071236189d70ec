"""Space a killed writer leaves behind: check reports it, repair reclaims it."""
import json
import os
import subprocess
import sys

from click.testing import CliRunner

import vdisk
from vdisk.check import check
from vdisk.cli import main
from vdisk_testkit.nbd_helpers import needs_clients, qemu_io_nbd, serve_process  # noqa: F401

WRITER = r"""
import os, signal, sys
import vdisk
d = vdisk.create(sys.argv[1], size="16MiB", block_size="4KiB")
d.pwrite(b"kept" * 1024 * 8, 0)          # 8 blocks, flushed
d.flush()
for i in range(2000):                     # fresh blocks, never flushed
    d.pwrite(bytes([i % 251 + 1]) * 4096, (100 + i) * 4096)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writer_leak_reported_and_reclaimed(tmp_path):
    path = str(tmp_path / "k.vdk")
    proc = subprocess.run([sys.executable, "-c", WRITER, path])
    assert proc.returncode == -9
    size_before = os.path.getsize(path)
    runner = CliRunner()
    assert runner.invoke(main, ["check", path]).exit_code == 3     # before the fix: 0, "No errors"
    result = check(path)
    assert result.corruption_count == 0
    assert result.unreferenced_data_blocks > 0
    assert not result.ok
    out = runner.invoke(main, ["check", path, "--output", "json"])
    assert out.exit_code == 3, out.output
    assert json.loads(out.output)["leaks"] >= result.unreferenced_data_blocks
    out = runner.invoke(main, ["check", path, "--repair"])
    assert out.exit_code == 0, out.output
    assert os.path.getsize(path) < size_before
    with vdisk.open(path) as d:
        assert d.pread(8 * 4096, 0) == b"kept" * 1024 * 8
    after = check(path)
    assert after.ok and after.unreferenced_data_blocks == 0 and after.leaked_blocks == 0
    assert runner.invoke(main, ["check", path]).exit_code == 0


def test_clean_image_with_snapshots_reports_no_leak(tmp_path):
    path = str(tmp_path / "c.vdk")
    with vdisk.create(path, size="4MiB", block_size="4KiB") as d:
        d.pwrite(b"a" * 4096 * 20, 0)
        d.snapshot("s1")
        d.pwrite(b"b" * 4096 * 20, 0)       # copies past the end of the file
        d.snapshot("s2")
        d.pwrite(b"c" * 4096 * 10, 4096 * 40)
        d.delete_snapshot("s2")
        d.delete_snapshot("s1")             # frees the first copies
    result = check(path)
    assert result.ok, result
    assert result.unreferenced_data_blocks == 0


# ---------------------------------------------------------------------------- reclaimed while served
def _served_cli(*args):
    return subprocess.run([sys.executable, "-m", "vdisk", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@needs_clients
def test_compact_reclaims_a_killed_writers_tail_while_served(tmp_path, serve_process, monkeypatch):
    """`vdisk serve` holds the image open for writing for as long as it runs, and check --repair
    cannot run on a served image: compact, through the server, is how the leak goes."""
    monkeypatch.setenv("VDISK_RUNTIME_DIR", str(tmp_path / "run"))
    path = str(tmp_path / "k.vdk")
    assert subprocess.run([sys.executable, "-c", WRITER, path]).returncode == -9
    size_before = os.path.getsize(path)
    srv = serve_process(path)
    r = _served_cli("check", path, "--output", "json")
    assert r.returncode == 3 and json.loads(r.stdout)["unreferenced-data-blocks"] == 2000, r.stderr
    r = _served_cli("compact", path)                # before the fix: exit 1, "cannot run on a served image"
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Released 7.8")      # the 2,000 leaked 4 KiB blocks
    assert os.path.getsize(path) < size_before - 2000 * 4096 + 4096
    assert _served_cli("check", path).returncode == 0
    qemu_io_nbd(srv.uri(), "read -P 0x6b 0 1", "write -P 0x11 64k 8k", "flush")    # 'k' of "kept"
    with vdisk.connect(path) as live:                # the Python API: the same operation
        assert live.compact() == 0
        assert live.info()["allocated_blocks"] == 10
    assert srv.stop() == 0
    with vdisk.open(path) as d:
        assert d.pread(8 * 4096, 0) == b"kept" * 1024 * 8
        assert d.pread(8192, 65536) == b"\x11" * 8192
    assert check(path).ok


@needs_clients
def test_compact_of_a_read_only_server_is_refused_in_one_line(tmp_path, serve_process, monkeypatch):
    monkeypatch.setenv("VDISK_RUNTIME_DIR", str(tmp_path / "run"))
    path = str(tmp_path / "k.vdk")
    assert subprocess.run([sys.executable, "-c", WRITER, path]).returncode == -9
    size_before = os.path.getsize(path)
    srv = serve_process(path, "--read-only")
    r = _served_cli("compact", path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "read-only" in r.stderr and f"pid {srv.proc.pid}" in r.stderr and path in r.stderr, r.stderr
    assert os.path.getsize(path) == size_before
    srv.stop()
