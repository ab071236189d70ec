"""What the four fuzz harnesses share: scratch files, the error rule, a mutator.

The rule every harness enforces: for any input, the code under test may
raise a :class:`vdisk.VdiskError` subclass, and nothing else.  Any other
exception escapes the harness's ``one_input`` and is a finding; so is a
crash, a hang (libFuzzer's ``-timeout``) or a memory blow-up (one input
lifting the peak RSS past a limit: :func:`with_memory_limit`).

Nothing imports atheris at import time: ``one_input`` functions run under atheris
(tools/fuzz/run.py), under hypothesis (tests/test_fuzz_regressions.py) and
replay saved inputs (the same test file), with one code path.
"""
from __future__ import annotations

import atexit
import os
import random
import resource
import shutil
import struct
import sys
import tempfile

import vdisk

PAGE = 4096
KiB, MiB = 1 << 10, 1 << 20

_SCRATCH: str | None = None


def scratch_base() -> str | None:
    """Where scratch directories go: tmpfs when there is one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def scratch_dir() -> str:
    """A private directory for the files one process writes per input, under
    VDISK_FUZZ_SCRATCH if set (run.py sets it and removes it after each
    process: libFuzzer ends the process without Python's atexit handlers)."""
    global _SCRATCH
    if _SCRATCH is None or not os.path.isdir(_SCRATCH):
        base = os.environ.get("VDISK_FUZZ_SCRATCH") or scratch_base()
        _SCRATCH = tempfile.mkdtemp(prefix="vdisk-fuzz-", dir=base)
        atexit.register(shutil.rmtree, _SCRATCH, True)
    return _SCRATCH


def scratch_path(name: str) -> str:
    return os.path.join(scratch_dir(), name)


def cleanup_scratch() -> None:
    global _SCRATCH
    if _SCRATCH is not None:
        shutil.rmtree(_SCRATCH, ignore_errors=True)
        _SCRATCH = None


def remove(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def write_sparse(path: str, data: bytes, size: int | None = None) -> None:
    """Write data as a fresh file whose all-zero 4 KiB pages are holes (as in a
    real sparse image), then set its length to size (default len(data))."""
    remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        mv = memoryview(data)
        zero = bytes(PAGE)
        for off in range(0, len(mv), PAGE):
            page = mv[off:off + PAGE]
            if page != zero[:len(page)]:
                os.pwrite(fd, page, off)
        os.ftruncate(fd, len(mv) if size is None else size)
    finally:
        os.close(fd)


def guard(fn, *args, **kwargs):
    """fn(*args, **kwargs), or None if it raised a VdiskError (the allowed outcome).
    Any other exception propagates: that is a finding."""
    try:
        return fn(*args, **kwargs)
    except vdisk.VdiskError:
        return None


# ---------------------------------------------------------------------------- a mutator without atheris
INTERESTING = [0, 1, 2, 7, 8, 9, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0x1000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 56) - 1, (1 << 62), (1 << 63) - 1,
               1 << 63, (1 << 64) - 1]


def put_int(buf: bytearray, at: int, width: int, value: int, big: bool = False) -> None:
    if at < 0 or at + width > len(buf):
        return
    fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
    buf[at:at + width] = struct.pack((">" if big else "<") + fmt, value & ((1 << (8 * width)) - 1))


def get_int(buf, at: int, width: int, big: bool = False) -> int:
    fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
    return struct.unpack_from((">" if big else "<") + fmt, buf, at)[0]


def havoc(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None, rounds: int | None = None,
          big_endian: bool = False, max_len: int = 1 << 20) -> bytes:
    """Random byte-level damage inside [lo, hi) of data: bit flips, interesting
    integers, arithmetic, copied and zeroed ranges, and (rarely) a cut or an
    insertion that moves everything after it."""
    buf = bytearray(data)
    hi = len(buf) if hi is None else min(hi, len(buf))
    if hi <= lo:
        return bytes(buf)
    for _ in range(rounds if rounds is not None else 1 + int(min(rng.expovariate(0.7), 16))):
        hi = min(hi, len(buf))
        if hi <= lo:
            break
        at = rng.randrange(lo, hi)
        op = rng.randrange(10)
        if op == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at] = rng.randrange(256)
        elif op in (2, 3):
            width = rng.choice((1, 2, 4, 8))
            at -= at % width if rng.random() < 0.7 else 0
            put_int(buf, at, width, rng.choice(INTERESTING) + rng.choice((0, 0, 0, 1, -1)), big_endian)
        elif op == 4 and at + 8 <= len(buf):
            width = rng.choice((1, 2, 4, 8))
            v = get_int(buf, at, width, big_endian)
            put_int(buf, at, width, v + rng.randint(-35, 35), big_endian)
        elif op == 5:
            n = min(rng.choice((1, 4, 16, 64, 512, 4096)), hi - at)
            buf[at:at + n] = bytes(n)
        elif op == 6:
            n = min(rng.choice((1, 4, 16, 64, 512)), hi - at)
            src = rng.randrange(0, max(1, len(buf) - n))
            buf[at:at + n] = buf[src:src + n]
        elif op == 7:
            n = min(rng.choice((1, 8, 64, 512)), hi - at)
            buf[at:at + n] = bytes(rng.randrange(256) for _ in range(n))
        elif op == 8 and rng.random() < 0.2:
            del buf[rng.randrange(at, len(buf) + 1):]          # truncation
        elif op == 9 and rng.random() < 0.2:
            n = rng.choice((1, 8, 512, 4096))
            buf[at:at] = bytes(n) if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(n))
    return bytes(buf[:max_len])


INSTRUMENTED = ("vdisk", "__main__")      # vdisk and vdisk_testkit.fuzz (common, the harnesses)


def instrument_loaded(prefixes=INSTRUMENTED) -> int:
    """Add atheris's coverage instrumentation to the already imported Python
    functions of vdisk and the harness (not numpy's or h5py's: instrumenting
    everything, as atheris.instrument_all does, costs half a minute per
    start and steers the fuzzer into libraries it is not aimed at).  The
    Cython core is not instrumented."""
    import gc
    import types
    import atheris
    n = 0
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and isinstance(getattr(obj, "__module__", None), str) \
                and obj.__module__.startswith(prefixes) and obj.__module__ in sys.modules:
            try:
                atheris.instrument_func(obj)
                n += 1
            except Exception:       # noqa: BLE001 - a function atheris cannot patch stays uninstrumented
                pass
    return n


class MemoryBlowUp(Exception):
    """One input raised the process's peak RSS by more than the limit."""


def peak_rss_mb() -> int:
    """This process image's peak RSS (VmHWM; ru_maxrss carries a parent's peak over fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) >> 10
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10


def with_memory_limit(one_input, limit_mb: int):
    """one_input, raising MemoryBlowUp when an input lifts the peak RSS more
    than limit_mb above the peak before the first input.  The peak only
    rises while the input that causes it runs, so the blame is exact (unlike
    libFuzzer's -rss_limit_mb, whose watcher thread blames whatever input
    runs when it looks)."""
    if not limit_mb:
        return one_input
    base = [None]

    def checked(data: bytes) -> None:
        if base[0] is None:
            base[0] = peak_rss_mb()
        before = peak_rss_mb()
        one_input(data)
        after = peak_rss_mb()
        if after > before and after - base[0] > limit_mb:
            raise MemoryBlowUp(f"this input raised the peak RSS from {before} to {after} MiB, more than "
                               f"{limit_mb} MiB above the {base[0]} MiB before the first input")
    return checked


def mend_trace_cmp_leak() -> bool:
    """Make atheris's comparison tracing give back the reference it keeps.

    Instrumented code runs every ``a < b`` as ``atheris._trace_cmp(a, b, op,
    counter, is_const)``.  atheris 3.0.0 (measured on Python 3.11) returns
    the comparison's result with one reference too many, so every result
    that is not a shared singleton stays alive for good: a numpy comparison
    over a 1 Mi-entry chunk leaks 1 MiB per execution (docs/RELIABILITY.md,
    "Fuzzing": the 953 MiB peak of check on a 128 GiB sparse image), which
    the memory limit then blames on the input.  This probes the leak on a
    fresh object and, only if exactly one reference is extra, puts a
    wrapper in the module attribute the instrumented bytecode looks up at
    each comparison that drops that reference.  Returns whether it did.
    ``atheris.Fuzz()`` replaces that attribute with libFuzzer's version
    (which keeps the reference too) when it starts: call this from inside
    the fuzz loop (atheris_main does, on the first input)."""
    import ctypes
    import atheris
    native = getattr(atheris, "_trace_cmp", None)
    if native is None or getattr(native, "_vdisk_mended", False):
        return False

    class _Fresh:
        pass

    class _Probe:
        def __lt__(self, other):
            return _Fresh()
        __gt__ = __le__ = __ge__ = __lt__

    probe = native(_Probe(), 0, 4, 0, False)      # 4: ">" on Python 3.11 ("<" where the op is shifted)
    if sys.getrefcount(probe) - 2 != 1:          # 2: the name and getrefcount's argument
        return False
    decref = ctypes.pythonapi.Py_DecRef
    decref.argtypes, decref.restype = [ctypes.py_object], None
    decref(probe)

    def _trace_cmp(left, right, op, counter, is_const, _native=native, _decref=decref, _bool=bool):
        result = _native(left, right, op, counter, is_const)
        if result.__class__ is not _bool:        # True and False live for ever: leave them
            _decref(result)
        return result
    _trace_cmp._vdisk_mended = True
    atheris._trace_cmp = _trace_cmp
    return True


def atheris_main(one_input, custom_mutator=None) -> None:
    """Run one_input under atheris with libFuzzer's command line (sys.argv).
    VDISK_FUZZ_INPUT_MB (set by run.py) is the memory one input may take."""
    import atheris
    sys.stderr.write(f"INFO: instrumented {instrument_loaded()} functions of vdisk and the harness\n")
    kwargs = {"custom_mutator": custom_mutator} if custom_mutator is not None else {}
    one_input = with_memory_limit(one_input, int(os.environ.get("VDISK_FUZZ_INPUT_MB", "0")))
    unmended = [True]

    def mended_input(data: bytes, _run=one_input) -> None:
        if unmended[0]:                 # the first input: Fuzz() has put libFuzzer's _trace_cmp in place
            unmended[0] = False
            if mend_trace_cmp_leak():
                sys.stderr.write("INFO: atheris's _trace_cmp kept one reference per comparison result: "
                                 "mended\n")
        _run(data)
    atheris.Setup(sys.argv, mended_input, **kwargs)
    try:
        atheris.Fuzz()
    finally:
        cleanup_scratch()


def atheris_mutate(data: bytes, max_size: int) -> bytes:
    import atheris
    return atheris.Mutate(data, max_size)


def mixed_mutator(mutate):
    """A libFuzzer custom mutator: atheris.Mutate 30% of the time, the
    harness's structure-aware mutate(data, rng) otherwise."""
    import random

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.3:
            return atheris_mutate(data, max_size)
        return mutate(data, rng)[:max_size]
    return custom_mutator
