"""Fixtures of the NBD tests: a `vdisk serve` process, or a server in a thread."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

HAVE_CLIENTS = all(shutil.which(t) for t in ("qemu-io", "qemu-img", "nbdinfo", "nbdcopy"))
needs_clients = pytest.mark.skipif(not HAVE_CLIENTS, reason="needs qemu-utils and libnbd-bin")


def uri(sock: str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


class ServeProcess:
    """`vdisk serve FILE --socket S ...` as a child process."""

    def __init__(self, image: str, sock: str, *args: str, wait: bool = True, tcp: bool = False):
        """tcp: args hold --listen instead of a socket; sock only names the stderr file."""
        self.image, self.socket = image, (None if tcp else sock)
        self.stderr_path = sock + ".stderr"
        self._err = open(self.stderr_path, "wb")
        where = [] if tcp else ["--socket", sock]
        self.proc = subprocess.Popen([sys.executable, "-m", "vdisk", "serve", image, *where, *args],
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "serving" in self.stderr():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"vdisk serve exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.02)
        raise AssertionError(f"vdisk serve not ready after {timeout}s: {self.stderr()}")

    @property
    def address(self) -> tuple[str, int]:
        """The TCP address the server said it listens on."""
        line = next(ln for ln in self.stderr().splitlines() if "serving" in ln)
        host, _, port = line.rsplit(" on ", 1)[1].split()[0].rpartition(":")
        return host, int(port)

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def uri(self, export: str = "") -> str:
        return uri(self.socket, export)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._err.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._err.close()


@pytest.fixture
def serve_process(tmp_path):
    """serve_process(image, *args) -> ServeProcess; every one is stopped at the end."""
    started = []

    def start(image, *args, sock=None, wait=True, tcp=False):
        p = ServeProcess(str(image), sock or str(tmp_path / f"nbd{len(started)}.sock"), *args, wait=wait, tcp=tcp)
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()


def run(*args, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode:
        raise AssertionError(f"{args[0]} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r


def qemu_io_nbd(target: str, *commands: str, read_only: bool = False) -> str:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", c]
    r = run(*args, target)
    out = r.stdout + r.stderr
    assert "error" not in out.lower() and "fail" not in out.lower() and "pattern verification" not in out, out
    return out


def nbdinfo_map(target: str, context: str = "base:allocation") -> list[dict]:
    return json.loads(run("nbdinfo", "--json", f"--map={context}", target).stdout)


def extents_of_map(entries: list[dict], flag: int) -> list[tuple[int, int]]:
    """Merged (offset, length) runs of the map entries whose type has the flag."""
    out: list[tuple[int, int]] = []
    for e in entries:
        if e["type"] & flag:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


def complement(runs, size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for off, n in runs:
        if off > pos:
            out.append((pos, off - pos))
        pos = off + n
    if pos < size:
        out.append((pos, size - pos))
    return out


def socket_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777
