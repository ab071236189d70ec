"""NBD servers as child processes, on Unix sockets: `vdisk serve` and its peer `qemu-nbd`.

Used by the guest tests, the NBD kill test and campaign and benchmarks/bench_nbd.py.
A server is started with its command line, considered ready once its socket
accepts a connection, and stopped by its pid (SIGTERM, then SIGKILL after a
grace period; ``kill()`` is an immediate SIGKILL, for the crash tests).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NbdServer:
    """One server process serving one export on a Unix socket."""

    def __init__(self, cmd: list[str], sock: str, export: str, name: str, env: dict | None = None,
                 ready_timeout: float = 30):
        self.cmd, self.socket, self.export, self.name = cmd, sock, export, name
        self.log = sock + ".log"
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.pid = self.proc.pid
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} before serving {self.socket}: "
                                   f"{self.log_text()[-1500:]}")
            if os.path.exists(self.socket):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(self.socket)
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {self.socket} within {timeout} s: "
                                   f"{self.log_text()[-1500:]}")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def log_text(self) -> str:
        self._logf.flush()
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the server (by pid) and reap it; returns its exit status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        rc = self.proc.wait()
        self._logf.close()
        return rc

    def stop(self, grace: float = 20) -> int:
        """SIGTERM, and SIGKILL if the server has not exited within `grace` seconds."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        rc = self.proc.wait()
        self._logf.close()
        return rc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass


def vdisk_serve(image: str, sock: str, export: str = "", read_only: bool = False, extra=()) -> NbdServer:
    """`vdisk serve IMAGE --socket SOCK --export EXPORT` with this interpreter."""
    cmd = [sys.executable, "-m", "vdisk", "serve", image, "--socket", sock, "--export", export, *extra]
    if read_only:
        cmd.append("--read-only")
    return NbdServer(cmd, sock, export, "vdisk serve")


def qemu_nbd(image: str, sock: str, export: str = "", fmt: str = "qcow2", bitmap: str | None = None,
             read_only: bool = False, extra=()) -> NbdServer:
    """qemu-nbd serving IMAGE (persistent: it outlives its clients), exposing `bitmap` as qemu:dirty-bitmap:NAME."""
    cmd = ["qemu-nbd", "--socket", sock, "--format", fmt, "--export-name", export, "--persistent",
           "--shared", "0", *extra]
    if bitmap:
        cmd += ["--bitmap", bitmap]
    if read_only:
        cmd.append("--read-only")
    cmd.append(image)
    return NbdServer(cmd, sock, export, "qemu-nbd")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def vdisk_has_serve() -> bool:
    """Whether this checkout's CLI has the serve command (vdisk/nbd/ present)."""
    return os.path.isdir(os.path.join(REPO, "vdisk", "nbd"))


def dirty_extents(uri: str, context: str, timeout: float = 120) -> list[tuple[int, int]]:
    """(offset, length) of the extents `nbdinfo --map=CONTEXT` reports with bit 0 set (dirty / a hole
    for base:allocation), merged."""
    import json
    out = subprocess.run(["nbdinfo", f"--map={context}", "--json", uri], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"nbdinfo --map={context} {uri} failed ({out.returncode}): {out.stderr.strip()}")
    runs: list[tuple[int, int]] = []
    for e in json.loads(out.stdout):
        if e["type"] & 1:
            if runs and runs[-1][0] + runs[-1][1] == e["offset"]:
                runs[-1] = (runs[-1][0], runs[-1][1] + e["length"])
            else:
                runs.append((e["offset"], e["length"]))
    return runs
