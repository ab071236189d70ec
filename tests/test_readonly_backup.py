"""Backups of an image nobody can write while they run (issue #17): a Disk opened "r",
or a file the user may only read.

A read-only open holds the image's shared lock, so no writer can run beside
it: the backup reads the image itself, no temporary snapshot.  It cannot close
a generation (that writes the image), so its delta names the image's last
change id, and may hold blocks changed after that point: the next incremental
since that id copies them again (more, never less).  Each test restores the
chain and compares it with the image's content, byte for byte.

Unwritable file: chmod 0444 stops a writer only when the tests run as another
user than root; as root the file is made immutable (chattr +i), which stops
root's O_RDWR open too.  Where neither can be had, those tests skip.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

import vdisk
from vdisk.cli import main

KiB = 1024
BS = 4 * KiB


def content(path) -> bytes:
    with vdisk.open(path) as d:
        return d.pread(d.size, 0)


def restored(tmp_path, deltas, name="t") -> bytes:
    target = tmp_path / f"{name}.raw"
    vdisk.restore([str(p) for p in deltas], str(target), format="raw", overwrite=True)
    data = target.read_bytes()
    os.unlink(target)
    os.unlink(str(target) + ".vdisk-chain")
    return data


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def image(tmp_path):
    """An image with two change ids, then blocks changed after the last one (an open generation)."""
    path = str(tmp_path / "a.vdk")
    with vdisk.create(path, size="1MiB", block_size=BS) as d:
        d.pwrite(b"a" * 16 * BS, 0)
        id0 = d.checkpoint()
        d.pwrite(b"b" * 4 * BS, 32 * BS)
        id1 = d.checkpoint()
        d.pwrite(b"c" * 2 * BS, 8 * BS)            # after id1: in no closed generation yet
        d.discard(32 * BS, BS)                      # and one unmapped: a zero extent
    return path, id0, id1


def test_full_and_incremental_backup_of_a_disk_opened_r(tmp_path):
    path, id0, id1 = image(tmp_path)
    with vdisk.open(path, "r") as d:                # before the fix: ReadOnlyError (the snapshot)
        full = vdisk.backup(d, tmp_path / "full.h5")
        incr = vdisk.backup(d, tmp_path / "incr.h5", since=id0)
        assert d.snapshots == []                    # no temporary snapshot
    assert full.change_id == id1 and incr.change_id == id1 and incr.since == id0
    now = content(path)
    assert restored(tmp_path, [tmp_path / "full.h5"]) == now      # the image as it is, "c" blocks included
    # the chain goes on from the id the read-only backup named: the blocks changed after it
    # come again, with every later change
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"d" * BS, 60 * BS)
    nxt = vdisk.backup(path, tmp_path / "next.h5", since=full.change_id)
    assert nxt.extents.nbytes >= 3 * BS             # "c" (2 blocks, again) and "d"
    assert restored(tmp_path, [tmp_path / "full.h5", tmp_path / "next.h5"]) == content(path)
    assert vdisk.verify(tmp_path / "incr.h5")["since"] == id0


def test_incremental_from_a_disk_opened_r_restores_onto_a_full_at_its_since(tmp_path):
    path = str(tmp_path / "a.vdk")
    with vdisk.create(path, size="1MiB", block_size=BS) as d:
        d.pwrite(b"a" * 16 * BS, 0)
    full = vdisk.backup(path, tmp_path / "full.h5")         # writable: a snapshot names its point
    with vdisk.open(path, "r+") as d:
        d.pwrite(b"b" * BS, 3 * BS)
        d.checkpoint()
        d.pwrite(b"c" * BS, 70 * BS)                          # after the last id
    with vdisk.open(path) as d:
        incr = vdisk.backup(d, tmp_path / "incr.h5", since=full.change_id)
    assert incr.since == full.change_id and incr.extents.nbytes == 2 * BS
    assert restored(tmp_path, [tmp_path / "full.h5", tmp_path / "incr.h5"]) == content(path)


def test_what_a_read_only_backup_refuses_and_writes_nothing(tmp_path):
    path, id0, id1 = image(tmp_path)
    with vdisk.open(path, "r+") as d:
        d.consumers.register("nightly", id0)
    before = digest(path)
    with vdisk.open(path) as d:
        # since = its last id: the delta would end where it starts, and a new point needs a write
        with pytest.raises(vdisk.ReadOnlyError, match="last change id"):
            vdisk.backup(d, tmp_path / "x.h5", since=id1)
        # a consumer's backup records its new id in the image
        with pytest.raises(vdisk.ReadOnlyError, match="consumer"):
            vdisk.backup(d, tmp_path / "y.h5", consumer="nightly")
        with pytest.raises(vdisk.StaleChangeIdError):
            vdisk.backup(d, tmp_path / "z.h5", since="not-an-id")
        assert d.consumers["nightly"].change_id == id0
    assert sorted(os.listdir(tmp_path)) == ["a.vdk"]
    assert digest(path) == before
    fresh = str(tmp_path / "fresh.vdk")             # never checkpointed: no id to name the point
    vdisk.create(fresh, size="64KiB", block_size=BS).close()
    with vdisk.open(fresh) as d:
        with pytest.raises(vdisk.ReadOnlyError, match="no change id yet"):
            vdisk.backup(d, tmp_path / "f.h5")
    assert not os.path.exists(tmp_path / "f.h5")


@contextlib.contextmanager
def unwritable(path):
    """path made unwritable for this process: chmod 0444 (not root), chattr +i (root)."""
    os.chmod(path, 0o444)
    immutable = False
    try:
        if os.geteuid() == 0:
            if not shutil.which("chattr") or subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
                pytest.skip("root writes a 0444 file, and chattr +i is not available here")
            immutable = True
        try:
            os.close(os.open(path, os.O_RDWR))
            pytest.skip("the file stays writable for this process")
        except PermissionError:
            pass
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", path], check=True)
        os.chmod(path, 0o644)


def test_cli_backup_of_a_file_the_user_may_only_read(tmp_path):
    path, id0, id1 = image(tmp_path)
    with vdisk.open(path, "r+") as d:
        d.consumers.register("nightly", id0)
    now = content(path)
    run = CliRunner().invoke
    with unwritable(path):
        before = digest(path)
        r = run(main, ["backup", path, str(tmp_path / "full.h5")])     # before the fix: permission denied
        assert r.exit_code == 0, r.output
        assert r.output.strip() == id1
        r = run(main, ["backup", path, str(tmp_path / "incr.h5"), "--since", id0])
        assert r.exit_code == 0 and r.output.strip() == id1, r.output
        r = run(main, ["backup", path, str(tmp_path / "c.h5"), "--consumer", "nightly"])
        assert r.exit_code == 1 and "consumer" in r.output and path in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not os.path.exists(tmp_path / "c.h5")
        assert digest(path) == before
    assert restored(tmp_path, [tmp_path / "full.h5"]) == now
