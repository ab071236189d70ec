"""Space a killed writer leaves behind: check reports it, repair reclaims it."""
import json
import os
import subprocess
import sys

from click.testing import CliRunner

import vdisk
from vdisk.check import check
from vdisk.cli import main

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
