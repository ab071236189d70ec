"""Process and Disk-object locking: one writer alone, or any number of readers.

A child process (``python -c``) opens the image, says "ready" on stdout and
holds it until the test writes a line to its stdin (or kills it).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import vdisk


_CHILD = textwrap.dedent("""
    import sys
    import vdisk
    path, mode = sys.argv[1], sys.argv[2]
    try:
        d = vdisk.open(path, mode)
    except vdisk.VdiskError as exc:
        print("error", type(exc).__name__, exc, flush=True)
        sys.exit(3)
    print("ready", d.pread(4, 0).hex(), flush=True)
    sys.stdin.readline()                  # hold the image until told to go
    if mode == "r+":
        d.pwrite(b"kid!", 0)
    d.close()
    print("closed", flush=True)
""")


class Holder:
    """A child process holding the image open in `mode`."""

    def __init__(self, path, mode):
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first = self.proc.stdout.readline().split()

    @property
    def ready(self) -> bool:
        return bool(self.first) and self.first[0] == "ready"

    def release(self) -> str:
        out, err = self.proc.communicate("go\n", timeout=30)
        assert self.proc.returncode == 0, err
        return out.strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


@pytest.fixture
def image(img):
    with vdisk.create(img, "1MiB", block_size="4KiB") as d:
        d.pwrite(b"orig", 0)
    return img


def _assert_locked(exc_info, path, *words):
    exc = exc_info.value
    assert isinstance(exc, vdisk.VdiskError)
    msg = str(exc)
    assert str(path) in msg, msg
    assert any(w in msg for w in words), msg


# ---------------------------------------------------------------------------- other processes
def test_second_writer_process_is_refused(image):
    with Holder(image, "r+") as h:
        assert h.ready, h.first
        with pytest.raises(vdisk.ImageLockedError) as ei:
            vdisk.open(image, "r+")
        _assert_locked(ei, image, "in use", "writer")
        assert h.release() == "closed"
    with vdisk.open(image, "r+") as d:          # the writer is gone: a new writer opens
        assert d.pread(4, 0) == b"kid!"
        d.pwrite(b"mine", 0)
    with vdisk.open(image) as d:
        assert d.pread(4, 0) == b"mine"


def test_reader_refused_while_a_writer_holds_it(image):
    with Holder(image, "r+") as h:
        assert h.ready
        with pytest.raises(vdisk.ImageLockedError) as ei:
            vdisk.open(image, "r")
        _assert_locked(ei, image, "writ")
        h.release()
    with vdisk.open(image, "r") as d:
        assert d.pread(4, 0) == b"kid!"


def test_writer_refused_while_a_reader_holds_it(image):
    with Holder(image, "r") as h:
        assert h.ready and h.first[1] == b"orig".hex()
        with pytest.raises(vdisk.ImageLockedError) as ei:
            vdisk.open(image, "r+")
        _assert_locked(ei, image, "in use", "writer")
        with vdisk.open(image, "r") as d:       # readers share
            assert d.pread(4, 0) == b"orig"
        h.release()
    with vdisk.open(image, "r+") as d:
        d.pwrite(b"next", 0)


def test_readers_share_across_processes(image):
    with Holder(image, "r") as a, Holder(image, "r") as b:
        assert a.ready and b.ready
        assert a.first[1] == b.first[1] == b"orig".hex()
        with vdisk.open(image) as d:
            assert d.pread(4, 0) == b"orig"
        assert vdisk.check(image).ok             # check takes a shared lock too
        a.release()
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.open(image, "r+")              # b still reads
        b.release()
    with vdisk.open(image, "r+"):
        pass


def test_child_sees_the_lock_of_this_process(image):
    with vdisk.open(image, "r+") as d:
        d.pwrite(b"par!", 0)
        with Holder(image, "r") as h:
            assert not h.ready
            assert h.first[:2] == ["error", "ImageLockedError"]
            h.proc.communicate(timeout=30)
            assert h.proc.returncode == 3
        with Holder(image, "r+") as h:
            assert h.first[:2] == ["error", "ImageLockedError"]
    with Holder(image, "r") as h:
        assert h.ready and h.first[1] == b"par!".hex()
        h.release()


def test_killed_writer_releases_the_lock(image):
    h = Holder(image, "r+")
    try:
        assert h.ready
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.open(image, "r+")
    finally:
        h.kill()
    with vdisk.open(image, "r+") as d:
        assert d.pread(4, 0) == b"orig"
    assert vdisk.check(image).ok


def test_check_and_create_respect_the_lock(image):
    with Holder(image, "r+") as h:
        assert h.ready
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.check(image)
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.check(image, repair=True)
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.create(image, "2MiB", overwrite=True)     # never replace an image in use
        h.release()
    with vdisk.open(image) as d:
        assert d.size == 1 << 20 and d.pread(4, 0) == b"kid!"


# ---------------------------------------------------------------------------- this process, two Disk objects
def test_second_writer_in_same_process(image):
    d1 = vdisk.open(image, "r+")
    try:
        with pytest.raises(vdisk.ImageLockedError) as ei:
            vdisk.open(image, "r+")
        _assert_locked(ei, image, "in use", "writer")
        with pytest.raises(vdisk.ImageLockedError) as ei:
            vdisk.open(image, "r")
        _assert_locked(ei, image, "writ")
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.create(image, "1MiB", overwrite=True)
        d1.pwrite(b"one!", 0)                    # the refused opens did not disturb the holder
    finally:
        d1.close()
    with vdisk.open(image, "r+") as d2:
        assert d2.pread(4, 0) == b"one!"


def test_create_holds_the_lock(tmp_path):
    path = tmp_path / "fresh.vdk"
    with vdisk.create(path, "1MiB") as d:
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.open(path, "r")
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.open(path, "r+")
        d.pwrite(b"x", 0)
    with vdisk.open(path) as d:
        assert d.pread(1, 0) == b"x"


def test_readers_share_in_same_process(image):
    with vdisk.open(image) as a, vdisk.open(image) as b:
        assert a.pread(4, 0) == b.pread(4, 0) == b"orig"
        with pytest.raises(vdisk.ImageLockedError):
            vdisk.open(image, "r+")
    with vdisk.open(image, "r+"):
        pass


def test_failed_opens_leak_no_descriptors(image):
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("needs /proc")
    with vdisk.open(image, "r+"):
        before = len(os.listdir(fd_dir))
        for _ in range(20):
            with pytest.raises(vdisk.ImageLockedError):
                vdisk.open(image, "r+")
            with pytest.raises(vdisk.ImageLockedError):
                vdisk.open(image, "r")
        assert len(os.listdir(fd_dir)) == before


def test_closed_disk_releases_the_lock_without_close_call(image):
    d = vdisk.open(image, "r+")
    d.pwrite(b"gone", 0)
    del d                                     # __del__ closes (and flushes)
    import gc
    gc.collect()
    with vdisk.open(image, "r+") as d2:
        assert d2.pread(4, 0) == b"gone"
