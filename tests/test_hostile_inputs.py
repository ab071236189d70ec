"""Hostile inputs (issue #13): FIFOs where files are expected, header
counters at their limits, a damaged snapshot record, and the one-liner
whose Disk is referenced only by the call expression.

Each test crafts its input per docs/FORMAT.md.  The FIFO tests run the call
in a child process with a time limit, so a hang fails the test instead of
hanging the suite.
"""
from __future__ import annotations

import gc
import os
import struct
import subprocess

import pytest

import vdisk
from vdisk import layout as L
from helpers import measure_in_child, pattern

KiB = 1 << 10
MiB = 1 << 20
BS = 4 * KiB


# ============================================================================ the one-liner
def test_one_liner_read_on_a_dropped_disk(img):
    """The bound pread holds the Disk for the call: no AttributeError from a
    Disk collected mid-call (the hot path holds it only weakly).  The calls
    stand outside the asserts: pytest's assertion rewriting would keep the
    Disk alive in a temporary."""
    with vdisk.create(img, MiB, block_size=BS) as d:
        d.pwrite(b"hello", 0)
    gc.collect()
    small = vdisk.open(img).pread(10, 0)
    spanning = vdisk.open(img).pread(3 * BS, 0)        # the slow path too
    assert small == b"hello" + bytes(5)
    assert spanning == b"hello" + bytes(3 * BS - 5)


def test_one_liner_writes_on_a_dropped_disk(img, tmp_path):
    with vdisk.create(img, MiB, block_size=BS) as d:
        d.pwrite(b"x" * BS, 0)
    in_place = vdisk.open(img, "r+").pwrite(b"y", 0)                # the hot path
    allocating = vdisk.open(img, "r+").pwrite(b"z" * 10, 5 * BS)    # the slow path
    other = str(tmp_path / "new.vdk")
    created = vdisk.create(other, "1MiB").pwrite(b"abc", 7)
    assert (in_place, allocating, created) == (1, 10, 3)
    with vdisk.open(img) as d:              # each dropped Disk closed (and flushed) at once
        assert d.pread(2, 0) == b"yx"
        assert d.pread(10, 5 * BS) == b"z" * 10
    with vdisk.open(other) as d:
        assert d.pread(10, 0) == bytes(7) + b"abc"


def test_dropped_disk_still_closes_at_once(img):
    """The bound methods hold the Disk only for the call: dropping the last
    reference closes it (its lock is free for a writer) without a gc pass."""
    vdisk.create(img, MiB, block_size=BS).close()
    d = vdisk.open(img)
    read = d.pread
    del d
    assert read(4, 0) == bytes(4)           # the bound method alone keeps it open ...
    del read
    with vdisk.open(img, "r+") as w:        # ... and once it goes, the shared lock is gone
        w.pwrite(b"w", 0)


# ============================================================================ FIFOs
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_LIMIT = 30          # seconds: a call that waits on a FIFO never returns at all


def in_child(body: str, *args) -> dict:
    """measure_in_child with a time limit: a hang fails the test (the child is killed)."""
    try:
        return measure_in_child(body, *args, timeout=HANG_LIMIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {HANG_LIMIT} s (a FIFO opened or read without O_NONBLOCK?)")


def assert_refused_fifo(result: dict, path: str) -> None:
    err = result["error"]
    assert err is not None, f"no VdiskError: {result}"
    assert err.startswith("InvalidArgumentError: "), err
    assert path in err and "FIFO" in err, err


@pytest.fixture
def fifo(tmp_path):
    path = str(tmp_path / "pipe.vdk")
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("call", ["vdisk.open(args[0])", "vdisk.open(args[0], 'r+')", "vdisk.check(args[0])",
                                  "vdisk.check(args[0], repair=True)"])
def test_fifo_image_is_refused_not_waited_on(fifo, call):
    assert_refused_fifo(in_child(call, fifo), fifo)


@pytest.mark.parametrize("call", [
    "vdisk.create(args[0], '1MiB', overwrite=True)",
    "vdisk.convert(args[1], args[0], overwrite=True)",
    "vdisk.restore([args[2]], args[0], overwrite=True)",
])
def test_fifo_output_with_overwrite_is_refused(fifo, tmp_path, call):
    """create/convert/restore(..., fifo, overwrite=True): refuse_if_in_use
    probes the existing file; a FIFO is refused, and stays a FIFO."""
    src = str(tmp_path / "src.vdk")
    with vdisk.create(src, MiB, block_size=BS) as d:
        d.pwrite(pattern(1, BS), 0)
    delta = str(tmp_path / "full.vdelta")
    vdisk.backup(src, delta)
    assert_refused_fifo(in_child(call, fifo, src, delta), fifo)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)


def test_restore_onto_fifo_target_is_refused(fifo, tmp_path):
    """An existing target that is a FIFO (no overwrite): the incremental path opens it."""
    src = str(tmp_path / "src.vdk")
    with vdisk.create(src, MiB, block_size=BS) as d:
        d.pwrite(pattern(1, BS), 0)
    full = str(tmp_path / "full.vdelta")
    r = vdisk.backup(src, full)
    with vdisk.open(src, "r+") as d:
        d.pwrite(pattern(2, BS), BS)
    inc = str(tmp_path / "inc.vdelta")
    vdisk.backup(src, inc, since=r.change_id)
    target = str(tmp_path / "target.vdk")
    vdisk.restore([full], target)
    os.unlink(target)
    os.mkfifo(target)
    assert_refused_fifo(in_child("vdisk.restore([args[1]], args[0])", target, inc), target)


def test_restore_with_fifo_chain_sidecar_is_refused(tmp_path):
    """A restore target whose <target>.vdisk-chain sidecar is a FIFO."""
    src = str(tmp_path / "src.vdk")
    with vdisk.create(src, MiB, block_size=BS) as d:
        d.pwrite(pattern(1, BS), 0)
    full = str(tmp_path / "full.vdelta")
    r = vdisk.backup(src, full)
    with vdisk.open(src, "r+") as d:
        d.pwrite(pattern(2, BS), BS)
    inc = str(tmp_path / "inc.vdelta")
    vdisk.backup(src, inc, since=r.change_id)
    target = str(tmp_path / "target.vdk")
    vdisk.restore([full], target)
    side = target + ".vdisk-chain"
    assert os.path.isfile(side)
    os.unlink(side)
    os.mkfifo(side)
    assert_refused_fifo(in_child("vdisk.restore([args[1]], args[0])", target, inc), side)
    with vdisk.open(target) as d:           # untouched
        assert d.pread(2 * BS, 0) == pattern(1, BS) + bytes(BS)


def test_cli_info_on_a_fifo(fifo):
    import sys
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, "-m", "vdisk", "info", fifo], capture_output=True, text=True,
                              timeout=HANG_LIMIT, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vdisk info hung for {HANG_LIMIT} s on a FIFO")
    assert proc.returncode != 0
    assert "FIFO" in proc.stderr and fifo in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_open_regular_refuses_other_kinds(tmp_path):
    """The one helper every open goes through: a socket and a character
    device are refused by kind, a regular file opens blocking again."""
    import socket
    from vdisk.fileio import open_regular
    sock_path = str(tmp_path / "s")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    try:
        with pytest.raises(vdisk.InvalidArgumentError, match="socket"):
            open_regular(sock_path, os.O_RDONLY)
    finally:
        s.close()
    with pytest.raises(vdisk.InvalidArgumentError, match="character device"):
        open_regular("/dev/null", os.O_RDONLY)
    with pytest.raises(vdisk.InvalidArgumentError, match="directory"):
        open_regular(str(tmp_path), os.O_RDONLY)
    f = str(tmp_path / "f")
    open(f, "wb").close()
    fd = open_regular(f, os.O_RDWR)
    try:
        import fcntl
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)
