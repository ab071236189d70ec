"""Injected faults below Python (vdisk_testkit/faultshim.c, an LD_PRELOAD
library): EIO and ENOSPC from the write-side system calls of restore,
convert, check --repair, backup, merge and create, run through the CLI in a
child process (the engine is vdisk_testkit/opfaultsim.py; the long run is
tools/fault_campaign_ops.py).  The short campaign here tries a few sites of
every operation; the regression tests fail the very call each bug was found
at.
"""
import os
import shutil
import subprocess
import sys

import pytest

from vdisk_testkit import opfaultsim as O

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("qemu-img") is None,
                                reason="needs gcc (the shim) and qemu-img (the qcow2 input and checks)")


@pytest.fixture(scope="session")
def shim():
    return O.build_shim()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return O.prepare(str(tmp_path_factory.mktemp("opfault-inputs")))


def _op(inputs, name):
    return next(o for o in O.operations(inputs) if o.name == name)


# ============================================================================ the shim itself
PROBE = r"""
import ctypes, os, sys
import numpy as np, h5py
d = sys.argv[1]
fd = os.open(os.path.join(d, "a"), os.O_RDWR | os.O_CREAT)
os.pwrite(fd, b"x" * 10, 0)
os.pwritev(fd, [b"a", b"b"], 0)
os.ftruncate(fd, 8192)
os.fdatasync(fd)
os.fsync(fd)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.fallocate(fd, 3, 0, 4096)
with open(os.path.join(d, "b"), "w") as f:
    f.write("text")
os.close(fd)
with h5py.File(os.path.join(d, "c.h5"), "w") as f:     # libhdf5's sec2 driver
    f.create_dataset("x", data=np.arange(1000))
"""


def test_shim_sees_python_and_libhdf5_calls(shim, tmp_path):
    log, report = tmp_path / "log", tmp_path / "report"
    work = tmp_path / "work"
    work.mkdir()
    env = O.shim_env(shim, str(work), report=str(report), log=str(log))
    r = subprocess.run([sys.executable, "-c", PROBE, str(work)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [line.split(" ", 2) for line in log.read_text().splitlines()]
    kinds = {(k, os.path.basename(p)) for _n, k, p in calls}
    assert {("pwrite", "a"), ("pwritev", "a"), ("ftruncate", "a"), ("fdatasync", "a"), ("fsync", "a"),
            ("fallocate", "a"), ("write", "b")} <= kinds
    assert any(k == "pwrite" and p.endswith("c.h5") for _n, k, p in calls), calls     # libhdf5's writes
    assert sum(int(x) for x in report.read_text().split()) == len(calls)
    assert [int(n) for n, _k, _p in calls] == list(range(1, len(calls) + 1))


def test_shim_fails_the_chosen_call(shim, tmp_path):
    body = ("import os, sys\nfd = os.open(sys.argv[1] + '/a', os.O_RDWR | os.O_CREAT)\n"
            "print(os.pwrite(fd, b'x' * 10, 0))\n"
            "try:\n    os.fsync(fd)\nexcept OSError as e:\n    print('fsync', e.errno)\n"
            "try:\n    print(os.pwrite(fd, b'y' * 10, 0))\nexcept OSError as e:\n    print('pwrite', e.errno)\n")

    def run(at, mode):
        env = O.shim_env(shim, str(tmp_path), fail_at=at, mode=mode)
        return subprocess.run([sys.executable, "-c", body, str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=60).stdout.split("\n")[:3]
    assert run(2, "eio") == ["10", "fsync 5", "10"]
    assert run(1, "short") == ["5", "pwrite 28", ""]    # half written; later writes fail, fsyncs pass
    assert run(1, "enospc") == [""]                     # the first write raised


# ============================================================================ regressions
_DRY: dict = {}      # op name -> its calls in a fault-free run (the inputs are the module's)


def _regression(shim, inputs, tmp_path, op_name, kind, name, which):
    op = _op(inputs, op_name)
    if op_name not in _DRY:
        dry, _DRY[op_name] = O.execute(shim, op, inputs, str(tmp_path), count=True)
        assert not dry.violations, dry.violations
    calls = _DRY[op_name]
    site, k = O.site_of(calls, kind, name, which)
    for mode in ("eio", "short") if k in O.WRITE_KINDS else ("eio",):
        out, _ = O.execute(shim, op, inputs, str(tmp_path), site=site, mode=mode, kind=k)
        assert not out.violations, (site, k, mode, out.violations)
        assert out.returncode == 1


partial = lambda f: f.endswith(".partial")          # noqa: E731 - a delta being written
directory = "."                                     # the directory's own fsync


@pytest.mark.parametrize("op_name, kind, name, which", [
    # libhdf5 saw its own write fail: its close crashed the process (SIGSEGV in H5D_close)
    ("backup-full", "pwrite", partial, 1),
    ("backup-full", "pwrite", partial, 2),
    ("backup-incremental", "pwrite", partial, 3),
    ("merge", "pwrite", partial, 1),
], ids=["backup-hdf5-write-2", "backup-hdf5-write-3", "incremental-gzip-hdf5-write-4", "merge-hdf5-write-2"])
def test_failed_hdf5_write_is_one_error_line_not_a_crash(shim, inputs, tmp_path, op_name, kind, name, which):
    _regression(shim, inputs, tmp_path, op_name, kind, name, which)


@pytest.mark.parametrize("op_name, kind, name, which", [
    # the directory's fsync failed after the output was linked into place: it stayed
    ("convert-raw-vdisk", "fsync", directory, -1),
    ("convert-vdisk-qcow2", "fsync", directory, -1),
    ("merge", "fsync", directory, -1),
    ("backup-full", "fsync", directory, -1),
    ("restore-vdisk", "fsync", directory, 1),
    ("create", "fsync", directory, -1),
    # the restore sidecar could not be written: the new target stayed without it
    ("restore-raw", "write", lambda f: f.endswith(".tmp"), 0),
    ("restore-vdisk", "fsync", lambda f: f.endswith(".tmp"), 0),
    # the backup source's last fsync (its close) failed after the delta was in place
    ("backup-full", "fdatasync", "src.vdk", -1),
    ("backup-incremental", "fdatasync", "src.vdk", -1),
], ids=["convert-vdisk", "convert-qcow2", "merge", "backup", "restore", "create", "sidecar-write",
        "sidecar-fsync", "backup-source-close", "incremental-source-close"])
def test_failed_operation_leaves_no_output(shim, inputs, tmp_path, op_name, kind, name, which):
    _regression(shim, inputs, tmp_path, op_name, kind, name, which)


# ============================================================================ the short campaign
def test_short_campaign(tmp_path):
    """A few sites of every operation (the first, the last, the first of each kind),
    one fault mode per site in turn; tools/fault_campaign_ops.py runs them all."""
    s = O.campaign(limit=int(os.environ.get("VDISK_OPFAULT_SITES", "3")), rotate=True, jobs=2,
                   work_root=str(tmp_path))
    assert not s["violations"], "\n".join(s["violations"][:20])
    assert s["operations"] == 17
    assert all(v["faults"] >= 2 for v in s["by_op"].values()), s["by_op"]
    assert s["by_op"]["backup-incremental"]["sites"] > 0 and s["by_kind"].get("fsync", 0) > 0
