"""Shared setup for the vdisk benchmarks (run them with ``python benchmarks/report.py``).

Every vdisk workload is measured next to a baseline in the same run; the
report divides the two.  Nothing here asserts a timing.

Knobs (environment variables, all optional):

* ``VDISK_BENCH_DIR``    directory for the images and raw files (default: the system temp dir)
* ``VDISK_BENCH_MIB``    size of the I/O region in MiB (default 256)
* ``VDISK_BENCH_OPS``    random 4 KiB operations per round (default 16384)
* ``VDISK_BENCH_ROUNDS`` multiplier for every round count (default 1.0; ``--quick`` uses less)
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:          # the package is built in place, not installed
    sys.path.insert(0, ROOT)

import vdisk  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10

REGION = int(os.environ.get("VDISK_BENCH_MIB", "256")) * MiB   # the I/O region of workloads 1-5
RANDOM_OPS = int(os.environ.get("VDISK_BENCH_OPS", "16384"))   # random 4 KiB ops per round
ROUNDS_SCALE = float(os.environ.get("VDISK_BENCH_ROUNDS", "1"))
SEQ_IO = 1 * MiB
RANDOM_IO = 4 * KiB
PREFILL_CHUNK = 64 * KiB        # see prefill_raw / prefill_vdisk
SEED = 20240601


def rounds(n: int) -> int:
    return max(2, int(round(n * ROUNDS_SCALE)))


# ---------------------------------------------------------------------------- places and data
def bench_dir() -> str:
    return os.environ.get("VDISK_BENCH_DIR") or tempfile.gettempdir()


@pytest.fixture(scope="session")
def workdir():
    """A private directory under the bench dir, removed with everything in it at the end."""
    d = tempfile.mkdtemp(prefix="vdisk-bench-", dir=bench_dir())
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def payload() -> bytes:
    """1 MiB of incompressible, never-zero-block data (vdisk skips all-zero blocks)."""
    return np.random.default_rng(SEED).integers(1, 256, SEQ_IO, dtype=np.uint8).tobytes()


@pytest.fixture(scope="session")
def small_payload() -> bytes:
    return np.random.default_rng(SEED + 1).integers(1, 256, RANDOM_IO, dtype=np.uint8).tobytes()


@pytest.fixture(scope="session")
def random_offsets() -> list[int]:
    """RANDOM_OPS 4 KiB-aligned offsets inside the region, fixed seed (repeats allowed)."""
    rng = np.random.default_rng(SEED + 2)
    return (rng.integers(0, REGION // RANDOM_IO, RANDOM_OPS, dtype=np.int64) * RANDOM_IO).tolist()


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def prefill_raw(fd: int, data: bytes, chunk: int = PREFILL_CHUNK) -> None:
    """Write the whole region through fd in `chunk`-sized writes, then fsync.

    64 KiB chunks on both sides, on purpose: Linux 6.x page cache builds
    large folios from large aligned writes, and a 4 KiB overwrite of a page
    inside a >=1 MiB folio costs ~5x one inside a 64 KiB folio (measured
    6.4 vs 1.3 us per os.pwrite on this kernel).  vdisk's data blocks start
    at a 64 KiB-aligned (not 1 MiB-aligned) file offset, so its folios are
    at most 64 KiB whatever the write size; prefilling the raw file with
    1 MiB writes would slow the raw baseline and flatter vdisk.
    """
    mv = memoryview(data)
    for off in range(0, REGION, chunk):
        piece = mv[(off % len(data)):(off % len(data)) + chunk]
        os.pwrite(fd, piece, off)
    os.fsync(fd)


def prefill_vdisk(d, data: bytes, chunk: int = PREFILL_CHUNK) -> None:
    mv = memoryview(data)
    for off in range(0, REGION, chunk):
        d.pwrite(mv[(off % len(data)):(off % len(data)) + chunk], off)
    d.flush()


@pytest.fixture(scope="module")
def filled_raw(workdir, payload):
    """A raw file holding the region's data, open read-write (page cache warm)."""
    path = os.path.join(workdir, "filled.raw")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        prefill_raw(fd, payload)
        yield fd
    finally:
        os.close(fd)
        remove(path)


def _filled_vdisk(workdir, payload, track: bool, name: str = ""):
    path = os.path.join(workdir, name or f"filled-{'track' if track else 'notrack'}.vdk")
    d = vdisk.create(path, REGION, block_size="64KiB", overwrite=True, track_changes=track)
    try:
        prefill_vdisk(d, payload)     # ends with a flush: tracking state folded, coarse bits clear
        yield d
    finally:
        d.close()
        remove(path)


@pytest.fixture(scope="module")
def filled_vdisk(workdir, payload):
    """A 64 KiB-block vdisk image, tracking on, every block of the region allocated."""
    yield from _filled_vdisk(workdir, payload, True)


@pytest.fixture(scope="module")
def filled_vdisk_notrack(workdir, payload):
    yield from _filled_vdisk(workdir, payload, False)


@pytest.fixture(scope="module")
def filled_vdisk_twin(workdir, payload):
    """A second image like filled_vdisk (tracking on): the control of the paired tracking rows."""
    yield from _filled_vdisk(workdir, payload, True, "filled-track-twin.vdk")


# ---------------------------------------------------------------------------- tagging
def tag(benchmark, workload: str, impl: str, *, nbytes: int = 0, ops: int = 0, **extra) -> None:
    """Name a benchmark for report.py: group = workload, extra_info carries the pairing key.

    impl is one of "vdisk", "vdisk-notrack", "raw", "numpy", ...; report.py
    pairs (workload, subject impl) with (workload, baseline impl).
    """
    benchmark.group = workload
    benchmark.extra_info.update(workload=workload, impl=impl, bytes=nbytes, ops=ops, **extra)


# ---------------------------------------------------------------------------- machine description
def _mount_of(path: str) -> tuple[str, str, str]:
    """(device, mount point, fs type) of the mount holding path, from /proc/mounts."""
    path = os.path.realpath(path)
    best = ("?", "/", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (dev, mnt, fstype)
    except OSError:
        pass
    return best


def library_state() -> dict:
    """The commit the library was measured at, and which of its files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10).stdout
    digest = hashlib.sha1()
    src = os.path.join(ROOT, "vdisk")
    for name in sorted(os.listdir(src)):
        if name.endswith((".py", ".pyx")) or (name.startswith("_fast.") and name.endswith(".so")):
            digest.update(name.encode())
            with open(os.path.join(src, name), "rb") as f:
                digest.update(f.read())
    out = {"source_sha1": digest.hexdigest()[:12]}    # tells runs of different code apart
    try:
        out["commit"] = git("rev-parse", "--short", "HEAD").strip() or None
        out["uncommitted"] = sorted(line[3:] for line in
                                    git("status", "--porcelain", "--", "vdisk", "setup.py").splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    d = bench_dir()
    dev, mnt, fstype = _mount_of(d)
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_bytes": ram,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "numpy": np.__version__,
        "vdisk": vdisk.__version__,
        "kernel": platform.release(),
        "bench_dir": d,
        "bench_fs": fstype,
        "bench_mount": mnt,
        "bench_device": dev,
        "region_bytes": REGION,
        "random_ops": RANDOM_OPS,
        "rounds_scale": ROUNDS_SCALE,
        "library": library_state(),
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["vdisk_bench"] = describe_machine()
