"""A killed backup's partial delta is removed by the next backup; a live one's never."""
import glob
import os
import subprocess
import sys

import vdisk

KILLED_BACKUP = r"""
import glob, os, signal, sys
import vdisk
img, dest = sys.argv[1], sys.argv[2]
def progress(done, total):
    if glob.glob(os.path.join(os.path.dirname(dest), ".*.partial")):
        os.kill(os.getpid(), signal.SIGKILL)
vdisk.backup(img, dest, progress=progress)
"""

HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def _image(tmp_path):
    path = str(tmp_path / "a.vdk")
    with vdisk.create(path, size="4MiB", block_size="4KiB") as d:
        d.pwrite(b"x" * 4096 * 64, 0)
    return path


def test_killed_backup_partial_removed_by_next_backup(tmp_path):
    img = _image(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_BACKUP, img, str(out / "full.h5")])
    assert proc.returncode == -9
    left = glob.glob(str(out / ".*.partial"))
    assert len(left) == 1 and left[0].startswith(str(out / ".full.h5."))
    vdisk.backup(img, str(out / "full2.h5"))
    assert glob.glob(str(out / ".*.partial")) == []
    assert sorted(os.listdir(out)) == ["full2.h5"]


def test_live_writers_partial_is_kept(tmp_path):
    img = _image(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    partial = str(out / ".other.h5.0123abcd.partial")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, partial], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        vdisk.backup(img, str(out / "full.h5"))
        assert os.path.exists(partial)            # its writer is alive: never removed
    finally:
        holder.kill()
        holder.wait()
    vdisk.backup(img, str(out / "full2.h5"))      # now its writer is dead
    assert not os.path.exists(partial)


def _killed_partial(tmp_path, img, out) -> str:
    proc = subprocess.run([sys.executable, "-c", KILLED_BACKUP, img, str(out / "killed.h5")])
    assert proc.returncode == -9
    left = glob.glob(str(out / ".killed.h5.*.partial"))
    assert len(left) == 1 and os.path.getsize(left[0]) > 0
    return left[0]


def _holder(partial):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, partial], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_verify_reports_abandoned_partials_and_removes_none(tmp_path):
    from click.testing import CliRunner
    from vdisk.cli import main
    img = _image(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    vdisk.backup(img, str(out / "full.h5"))
    abandoned = _killed_partial(tmp_path, img, out)
    live = str(out / ".other.h5.0123abcd.partial")
    holder = _holder(live)
    try:
        summary = vdisk.verify(str(out / "full.h5"))        # before the fix: no such key
        assert summary["abandoned_partials"] == [abandoned]
        assert vdisk.verify_chain([str(out / "full.h5")])[0]["abandoned_partials"] == [abandoned]
        r = CliRunner().invoke(main, ["verify", str(out / "full.h5")])
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert lines[0].startswith(f"{out / 'full.h5'}: ok")
        assert len(lines) == 2 and lines[1].startswith(f"{abandoned}: abandoned partial delta") \
            and "next backup or merge" in lines[1], r.output
        assert live not in r.output
        r = CliRunner().invoke(main, ["verify", str(out / "full.h5"), "--output", "json"])
        import json
        assert json.loads(r.output)[0]["abandoned_partials"] == [abandoned]
        assert os.path.exists(abandoned) and os.path.exists(live)     # verify only reports
    finally:
        holder.kill()
        holder.wait()


def test_merge_removes_abandoned_partials_never_a_live_writers(tmp_path):
    img = _image(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    full = vdisk.backup(img, str(tmp_path / "full.h5"))
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"y" * 4096, 0)
    vdisk.backup(img, str(tmp_path / "incr.h5"), since=full.change_id)
    abandoned = _killed_partial(tmp_path, img, out)
    live = str(out / ".other.h5.0123abcd.partial")
    holder = _holder(live)
    try:
        vdisk.merge([str(tmp_path / "full.h5"), str(tmp_path / "incr.h5")], str(out / "m.h5"))
        assert not os.path.exists(abandoned)        # before the fix: left forever
        assert os.path.exists(live)                 # its writer is alive: never removed
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(out)) == [".other.h5.0123abcd.partial", "m.h5"]
