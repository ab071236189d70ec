"""fileio.atomic_output: the one temp-then-place of convert, clone and restore."""
from __future__ import annotations

import errno
import os

import pytest

import vdisk
from vdisk import fileio


def test_places_the_file_and_leaves_nothing_else(tmp_path):
    dest = tmp_path / "out.img"
    with fileio.atomic_output(str(dest), what="testing") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".testing")
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert dest.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.img"]


def test_an_error_in_the_body_removes_the_temporary_file(tmp_path):
    dest = tmp_path / "out.img"
    with pytest.raises(RuntimeError):
        with fileio.atomic_output(str(dest)) as tmp:
            open(tmp, "wb").close()
            raise RuntimeError("copy failed")
    assert os.listdir(tmp_path) == []


def test_an_existing_dest_is_kept_unless_overwrite(tmp_path):
    dest = tmp_path / "out.img"
    dest.write_bytes(b"old")
    with pytest.raises(vdisk.InvalidArgumentError, match="overwrite"):
        with fileio.atomic_output(str(dest)) as tmp:
            open(tmp, "wb").close()
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.img"]
    with fileio.atomic_output(str(dest), overwrite=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert dest.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.img"]


def test_a_failing_directory_sync_is_named_by_placing_error(tmp_path, monkeypatch):
    dest = tmp_path / "out.img"
    real = os.fsync

    def failing(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(vdisk.VdiskIOError, match="out.img: placing failed"):
        with fileio.atomic_output(str(dest), overwrite=True,
                                  placing_error=lambda e: vdisk.VdiskIOError(e.errno, f"{dest}: placing failed")) as tmp:
            open(tmp, "wb").close()
    assert not any(name.startswith(".out.img.") for name in os.listdir(tmp_path))
