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
