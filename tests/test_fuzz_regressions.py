"""Fuzzing without atheris: every saved fuzz input replayed, and a short fuzz.

The harnesses live in tools/fuzz/ (one per target, each with a
``one_input(data)`` that raises on a finding: any exception that is not a
VdiskError).  tools/fuzz/run.py runs them under atheris for the long
campaigns; here the same ``one_input`` functions run

* on every input kept in tests/fuzz_regressions/<target>/: the findings
  (``crash-*``, ``oom-*``, ``timeout-*``: each was a bug, fixed; ``open-*``:
  found, not fixed here, the broken property an ``xfail(strict=True)``
  test below) and a few seeds and corpus entries worth keeping (``seed-*``,
  ``corpus-*``);
* on random damage of real seed images, driven by hypothesis (the
  harnesses' structure-aware ``mutate``), a few hundred inputs per target,
  so CI fuzzes on every run.

tests/fuzz_regressions/delta-crafted/ holds deltas whose HDF5 metadata is
damaged behind a resealed preamble (a crafted file): libhdf5 is not
hardened against those (docs/BACKUP_FORMAT.md), so they are replayed in a
child process with a time limit; without the reseal, the same damage must
be refused by the preamble.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vdisk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGRESSIONS = os.path.join(ROOT, "tests", "fuzz_regressions")

TARGETS = {"vdisk": "fuzz_vdisk", "qcow2": "fuzz_qcow2", "delta": "fuzz_delta", "changeid": "fuzz_changeid"}
EXAMPLES = {"vdisk": 500, "qcow2": 500, "delta": 300, "changeid": 500}


def harness(target: str):
    return importlib.import_module(f"vdisk_testkit.fuzz.{TARGETS[target]}")


def kept(target: str) -> list[str]:
    d = os.path.join(REGRESSIONS, target)
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []


def read(target: str, name: str) -> bytes:
    with open(os.path.join(REGRESSIONS, target, name), "rb") as f:
        return f.read()


def test_every_target_keeps_inputs():
    for target in TARGETS:
        assert kept(target), f"tests/fuzz_regressions/{target}/ is empty"


@pytest.mark.parametrize("target,name", [pytest.param(t, n, id=f"{t}/{n}") for t in TARGETS for n in kept(t)])
def test_saved_input(target, name):
    """Only VdiskErrors: one_input raises anything else."""
    harness(target).one_input(read(target, name))


@pytest.mark.parametrize("bad", ["\u00b2", "1" * 5000, "[" * 50000])
def test_restore_onto_a_target_with_a_hostile_sidecar(tmp_path, bad):
    """changeid/crash-*sidecar*, end to end: the change id of a restored
    target's sidecar with a superscript digit (str.isdigit took it, int()
    did not: ValueError out of restore), or too many digits, or the sidecar
    nested too deep for json (RecursionError): a VdiskError, nothing written."""
    B = importlib.import_module("vdisk.backup")     # the module (vdisk.backup is also the function)
    with vdisk.create(tmp_path / "src.img", 64 * 1024, block_size=4096) as d:
        d.pwrite(b"a" * 5000, 0)
        full = vdisk.backup(d, tmp_path / "full.h5", compression=None)
        d.pwrite(b"b" * 100, 9000)
        vdisk.backup(d, tmp_path / "inc.h5", since=full.change_id, compression=None)
    target = str(tmp_path / "target.raw")
    vdisk.restore([tmp_path / "full.h5"], target, format="raw")
    side = B.sidecar_path(target)
    with open(side) as f:
        data = json.load(f)
    with open(side, "w") as f:
        if bad.startswith("["):
            f.write(bad)
        else:
            data["change_id"] = f"{data['tracking_id']}/{bad}"
            json.dump(data, f)
    before = open(target, "rb").read()
    with pytest.raises(vdisk.VdiskError):
        vdisk.restore([tmp_path / "inc.h5"], target, format="raw")
    assert open(target, "rb").read() == before


# ---------------------------------------------------------------------------- memory
_WRITE_CHILD = """
import sys
from vdisk_testkit.fuzz import common, fuzz_vdisk
path = common.scratch_path("image")
fuzz_vdisk.materialize(open(sys.argv[1], "rb").read(), path)
base = common.peak_rss_mb()
fuzz_vdisk.exercise(path, writable=True, snapshot=False)   # as when it was found
print(common.peak_rss_mb() - base)
common.cleanup_scratch()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (VmHWM) and sparse files")
def test_writer_memory_on_a_huge_sparse_file():
    """oom-write-refcount-grow-...: an image whose refcounts leave no free
    block, in a 128 GiB sparse file, opened "r+" and written: the write
    appends at the end of the file and relocates the refcount table to cover
    it.  The relocation scanned (and padded a copy of) the whole new table,
    touching ~100 MiB of pages for 33 Mi blocks nobody uses; it now writes
    only the pages that can hold counts."""
    name = "oom-write-refcount-grow-to-end-of-128g-sparse-file"
    proc = subprocess.run([sys.executable, "-c", _WRITE_CHILD,
                           os.path.join(REGRESSIONS, "vdisk", name)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1])
    assert growth < 48, f"opening, writing and closing took {growth} MiB more peak RSS"


_CHECK_CHILD = """
import sys
import vdisk
from vdisk_testkit.fuzz import common, fuzz_vdisk
if {instrument!r}:                  # atheris's instrumentation, as a fuzz run has it (not mended)
    import atheris
    atheris.instrument_func(sys.modules["vdisk.check"]._check)
path = common.scratch_path("image")
flags = fuzz_vdisk.materialize(open(sys.argv[1], "rb").read(), path)
fuzz_vdisk.exercise(path, bool(flags & fuzz_vdisk.WRITE), snapshot=False)   # the write allocates at the end
base = common.peak_rss_mb()
vdisk.check(path, repair={repair!r})
print(common.peak_rss_mb() - base)
common.cleanup_scratch()
"""
HUGE = "oom-check-dense-arrays-span-a-128g-sparse-file"


def check_growth(name: str, repair: bool = False, instrument: bool = False) -> int:
    """Peak RSS growth (MiB) of check (repair) in a fresh process, after the harness wrote the image."""
    code = _CHECK_CHILD.format(repair=repair, instrument=instrument)
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(REGRESSIONS, "vdisk", name)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (VmHWM) and sparse files")
def test_check_memory_on_a_huge_sparse_file():
    """A fuzzed image in a 128 GiB sparse file, opened "r+" and written (the
    new block goes at the end of the file), then checked: check's reference
    arrays spanned up to the highest physical block mapped (~300 MiB here);
    now lazy, and every pass over them runs in chunks."""
    growth = check_growth(HUGE)
    assert growth < 64, f"check took {growth} MiB more peak RSS"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (VmHWM) and sparse files")
def test_repair_memory_on_a_huge_sparse_file():
    """The same image repaired: the new refcounts were filled chunk by chunk
    over every block up to the highest one mapped, zeros included, paging in
    2 bytes per block of the 128 GiB span (66 MiB); now only the nonzero
    counts are written (2 MiB)."""
    growth = check_growth(HUGE, repair=True)
    assert growth < 24, f"check --repair took {growth} MiB more peak RSS"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (VmHWM) and sparse files")
def test_check_and_repair_under_atheris_instrumentation():
    """The 953 MiB peak of the long run (docs/RELIABILITY.md, "Fuzzing"):
    atheris 3.0.0 keeps one reference to every comparison result of
    instrumented code, and check compared whole 1 Mi-entry chunks of
    [0, highest block] five times per pass (1 MiB kept per comparison per
    chunk: 160 MiB per pass over 128 GiB, four passes in a repair).  check
    now visits only the chunks that hold a reference, metadata or a stored
    refcount (2 here); the harness also mends the leak (common.py)."""
    pytest.importorskip("atheris")
    growth = check_growth(HUGE, repair=True, instrument=True)
    assert growth < 64, f"check --repair under atheris's instrumentation took {growth} MiB more peak RSS"


_MENDED_CHILD = """
import sys, weakref
import numpy as np
from vdisk_testkit.fuzz import common


def compare(a, b):                      # instrumented (a __main__ function): atheris._trace_cmp
    return a > b, a <= 1, 7 == b, a != b


def one_input(data):
    gt, le, eq, ne = compare(np.arange(5), 2)
    assert gt.tolist() == [False, False, False, True, True] and le.tolist() == [True, True, False, False, False]
    assert eq is False and ne.tolist() == [True, True, False, True, True]
    assert compare(3, 2) == (True, False, False, True)
    ref = weakref.ref(gt)
    del gt, le, ne
    if ref() is not None:
        raise MemoryError("an instrumented comparison's result outlives its last name")


common.atheris_main(one_input)
"""


def test_atheris_trace_cmp_mended(tmp_path):
    """common.mend_trace_cmp_leak, as the harnesses run it (inside
    atheris.Fuzz(), which swaps in libFuzzer's _trace_cmp when it starts):
    comparisons of instrumented code keep their results and semantics, and
    the results die when dropped."""
    pytest.importorskip("atheris")
    proc = subprocess.run([sys.executable, "-c", _MENDED_CHILD, "-runs=20",
                           f"-artifact_prefix={tmp_path}/", str(tmp_path)],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "VDISK_FUZZ_INPUT_MB"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mended" in proc.stderr


# ---------------------------------------------------------------------------- crafted deltas (libhdf5)
_CRAFTED_CHILD = """
import sys
from vdisk_testkit.fuzz import fuzz_delta
fuzz_delta.one_input_crafted(open(sys.argv[1], "rb").read())
print("done")
"""


@pytest.mark.parametrize("name", kept("delta-crafted"))
def test_crafted_delta(name):
    """timeout-libhdf5-*: libhdf5 2.0 loops forever in H5HG_load on a global
    heap object of size 0; the reader now walks the heaps itself first
    (vdisk.delta.check_global_heaps).  open-* files: libhdf5 problems vdisk
    does not catch yet (an xfail)."""
    data = read("delta-crafted", name)
    harness("delta").one_input(data)          # as damage (no reseal): the preamble refuses it
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(data)
        f.flush()
        try:
            proc = subprocess.run([sys.executable, "-c", _CRAFTED_CHILD, f.name],
                                  capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            if name.startswith("open-"):
                pytest.xfail(f"{name}: libhdf5 hangs on this crafted delta")
            pytest.fail(f"{name}: reading the resealed delta hangs (libhdf5, behind vdisk's checks)")
    if proc.returncode < 0 and name.startswith("open-"):
        pytest.xfail(f"{name}: libhdf5 crashes on this crafted delta (signal {-proc.returncode})")
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------- a short fuzz (hypothesis)
_SEEDS: dict[str, dict[str, bytes]] = {}


def seeds(target: str) -> dict[str, bytes]:
    if target not in _SEEDS:
        _SEEDS[target] = harness(target).build_seeds()
    return _SEEDS[target]


@pytest.mark.parametrize("target", list(TARGETS))
def test_short_fuzz(target):
    """Random damage of real seeds through the same one_input, a few hundred
    inputs per target.  A failure saves its input to the temporary folder and
    says where: add it to tests/fuzz_regressions/<target>/ with the fix."""
    mod = harness(target)
    pool = seeds(target)
    names = sorted(pool)

    @settings(max_examples=EXAMPLES[target], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(name=st.sampled_from(names), rng=st.randoms(use_true_random=False), rounds=st.integers(1, 3))
    def fuzz(name, rng, rounds):
        data = pool[name]
        for _ in range(rounds):
            data = mod.mutate(data, rng)
        try:
            mod.one_input(data)
        except BaseException as exc:
            path = os.path.join(tempfile.gettempdir(),
                                f"fuzz-finding-{target}-{hashlib.sha1(data).hexdigest()[:12]}")
            with open(path, "wb") as f:
                f.write(data)
            exc.add_note(f"input saved to {path}; replay: vdisk_testkit.fuzz.{TARGETS[target]}.one_input")
            raise

    fuzz()


# ---------------------------------------------------------------------------- open findings
def test_repair_fixes_what_check_reports(tmp_path):
    """A fuzzed image whose snapshot table maps a metadata block: check
    reports it, and check(repair=True) clears it (it used to say repaired
    and leave it: repair dropped only live-table entries into metadata)."""
    path = str(tmp_path / "image")
    harness("vdisk").materialize(read("vdisk", "repair-left-a-snapshot-mapping-into-metadata"), path)
    assert not vdisk.check(path).ok
    repaired = vdisk.check(path, repair=True)
    assert repaired.ok and vdisk.check(path).ok, repaired
