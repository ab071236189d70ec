"""Hostile deltas: HDF5 structures that point outside the file, resource
bombs, filters and plugins (issue 13).

Each delta here is crafted as an attacker would, per docs/BACKUP_FORMAT.md:
a real delta edited with h5py, its attributes checksum recomputed and its
preamble resealed, so that only vdisk.delta.check_structure stands between
it and libhdf5.  Hangs and memory run in a child process with a time limit
(vdisk_testkit/helpers.py measure_in_child).
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import textwrap

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import vdisk
from vdisk.cli import main as cli_main
from vdisk_testkit.deltacraft import extents_of, make_delta, replace, reseal
from vdisk_testkit.helpers import measure_in_child, pattern

D = importlib.import_module("vdisk.delta")
BS = 4096
KiB, MiB = 1 << 10, 1 << 20
SECRET = b"root:x:0:0:secret-bytes-of-a-host-file\n" * 4


# ---------------------------------------------------------------------------- crafting: vdisk_testkit/deltacraft.py
@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "host-file"
    p.write_bytes(SECRET)
    return str(p)


@pytest.fixture
def fifo(tmp_path):
    p = str(tmp_path / "fifo")
    os.mkfifo(p)
    return p


def every_reader(path, tmp_path):
    """The error of verify, restore (raw and vdisk) and merge of the delta: all must refuse it."""
    errors = []
    for run in (lambda: vdisk.verify(path),
                lambda: vdisk.restore([path], str(tmp_path / "t.raw"), format="raw"),
                lambda: vdisk.restore([path], str(tmp_path / "t.vdk"), format="vdisk"),
                lambda: vdisk.merge([path], str(tmp_path / "m.h5"))):
        with pytest.raises(vdisk.VdiskError) as ei:
            run()
        errors.append(ei.value)
    assert not any(os.path.exists(tmp_path / n) for n in ("t.raw", "t.vdk", "m.h5"))
    return errors


def secret_numbers():
    """The ways a leaked host file's bytes would show in a message."""
    raw = SECRET[:64]
    out = {raw[:8].decode()}
    for dt in ("<u8", "<u4", "u1"):
        out.update(str(int(v)) for v in np.frombuffer(raw[:len(raw) // 8 * 8], dt)[:4] if v > 9)
    return out


def assert_no_leak(errors):
    for e in errors:
        text = str(e)
        leaked = [s for s in secret_numbers() if s in text]
        assert not leaked, f"the message quotes the host file's bytes {leaked}: {text}"


# ---------------------------------------------------------------------------- external storage
@pytest.mark.parametrize("name", [D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS, D.DS_CRC, D.DS_DATA])
def test_external_storage_is_refused_before_reading(tmp_path, secret, name):
    """The CVE-2024-32498 class: a dataset whose bytes HDF5 reads from
    another file.  `offsets` external to a host file made verify print its
    bytes ("extent 0 (offset 3475222254926655346, ..." = b'root:x:0');
    every dataset is checked now, before any is read."""
    p = make_delta(tmp_path)
    arrays = extents_of(p)
    with h5py.File(p, "r+") as f:
        shape, dt = f[name].shape, f[name].dtype
        replace(f, name, external=[(secret, 0, int(np.prod(shape)) * dt.itemsize)])
    reseal(p, arrays)
    errors = every_reader(p, tmp_path)
    for e in errors:
        assert isinstance(e, vdisk.UnsupportedFeatureError) and "external storage" in str(e), e
        assert p in str(e) and repr(name) in str(e)
    assert_no_leak(errors)


def test_external_storage_on_a_fifo_or_dev_zero_is_refused_without_reading(tmp_path, fifo):
    """With /dev/zero behind a huge `offsets` vdisk took 719 MB; with a FIFO it hung."""
    p = make_delta(tmp_path)
    n = 1 << 26                          # 512 MiB of offsets
    with h5py.File(p, "r+") as f:
        for name in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS):
            replace(f, name, shape=(n,), external=[("/dev/zero", 0, n * f[name].dtype.itemsize)])
        f.attrs["virtual_size"] = np.uint64(n * BS)
    reseal(p, [np.zeros(n, "<u8"), np.zeros(n, "<u8"), np.zeros(n, "u1")])
    q = make_delta(tmp_path, "fifo.h5")
    arrays = extents_of(q)
    with h5py.File(q, "r+") as f:
        replace(f, D.DS_OFFSETS, external=[(fifo, 0, f[D.DS_OFFSETS].size * 8)])
    reseal(q, arrays)
    for path in (p, q):
        r = measure_in_child("vdisk.verify(args[0])", path, timeout=60)
        assert r["error"] and "UnsupportedFeatureError" in r["error"] and "external storage" in r["error"], r
        assert r["growth"] < 32 * MiB, r


# ---------------------------------------------------------------------------- links and virtual datasets
def test_external_link_to_a_fifo_is_never_followed(tmp_path, fifo):
    """libhdf5 opened the file an external link names (outside the
    preamble's CRC); one to a FIFO hung verify, restore and merge."""
    p = make_delta(tmp_path)
    with h5py.File(p, "r+") as f:
        del f[D.DS_FLAGS]
        f[D.DS_FLAGS] = h5py.ExternalLink(fifo, "/flags")
    reseal(p, [np.zeros(0)] * 3)
    target = str(tmp_path / "t.raw")
    for body in ("vdisk.verify(args[0])", "vdisk.restore([args[0]], args[1], format='raw')",
                 "vdisk.merge([args[0]], args[1])"):
        r = measure_in_child(body, p, target, timeout=30)
        assert r["error"] and "external link" in r["error"] and "'flags'" in r["error"], r
        assert not os.path.exists(target)


def test_external_link_to_another_delta_is_refused(tmp_path):
    """A link to a valid delta's dataset (what libhdf5 would read is well formed: only the link is wrong)."""
    other = make_delta(tmp_path, "other.h5")
    p = make_delta(tmp_path)
    arrays = extents_of(p)
    with h5py.File(p, "r+") as f:
        del f[D.DS_OFFSETS]
        f[D.DS_OFFSETS] = h5py.ExternalLink(other, "/offsets")
    reseal(p, arrays)
    for e in every_reader(p, tmp_path):
        assert isinstance(e, vdisk.UnsupportedFeatureError) and "'offsets' is an external link" in str(e), e


def test_soft_link_is_refused(tmp_path):
    """A soft link `lengths` -> /offsets read as the lengths; now no soft link is followed."""
    p = make_delta(tmp_path)
    with h5py.File(p, "r+") as f:
        del f[D.DS_LENGTHS]
        f[D.DS_LENGTHS] = h5py.SoftLink("/offsets")
    reseal(p)
    for e in every_reader(p, tmp_path):
        assert isinstance(e, vdisk.UnsupportedFeatureError) and "'lengths' is a soft link" in str(e), e


def test_virtual_dataset_is_refused(tmp_path, secret, fifo):
    """A virtual dataset reads other files' datasets (here a host file's, and a FIFO)."""
    src = str(tmp_path / "src.h5")
    with h5py.File(src, "w") as s:
        s["x"] = np.frombuffer(SECRET[:64], "<u8")
    for source in (src, fifo):
        p = make_delta(tmp_path, f"v{os.path.basename(source)}.h5")
        arrays = extents_of(p)
        with h5py.File(p, "r+") as f:
            n = f[D.DS_OFFSETS].shape[0]
            lay = h5py.VirtualLayout(shape=(n,), dtype="<u8")
            lay[:] = h5py.VirtualSource(source, "x", shape=(8,))[:n]
            del f[D.DS_OFFSETS]
            f.create_virtual_dataset(D.DS_OFFSETS, lay)
        reseal(p, arrays)
        r = measure_in_child("vdisk.verify(args[0])", p, timeout=30)
        assert r["error"] and "virtual dataset" in r["error"], r
    assert_no_leak(every_reader(p, tmp_path))


# ---------------------------------------------------------------------------- extra objects
@pytest.mark.parametrize("extra", ["group", "nested-external-link", "named-datatype", "dataset", "hard-alias",
                                   "dataset-attribute", "committed-type", "compact", "enum-flags",
                                   "big-endian-offsets"])
def test_unexpected_objects_are_refused(tmp_path, fifo, extra):
    """vdisk writes five datasets and nothing else: a group (nested with a
    link to a FIFO), a named datatype, another dataset, a second name for a
    dataset, attributes on a dataset, a dataset of a committed type, compact
    storage, or an integer type in disguise (enum, big-endian) was ignored or
    read; now it is refused before anything is read."""
    p = make_delta(tmp_path)
    with h5py.File(p, "r+") as f:
        if extra == "group":
            f.create_group("g")
        elif extra == "nested-external-link":
            f.create_group("g/h")["x"] = h5py.ExternalLink(fifo, "/x")
        elif extra == "named-datatype":
            f["t"] = np.dtype("<u8")
        elif extra == "dataset":
            f["more"] = np.arange(4)
        elif extra == "hard-alias":
            f["alias"] = f[D.DS_OFFSETS]
        elif extra == "dataset-attribute":
            f[D.DS_CRC].attrs["note"] = "x"
        elif extra == "committed-type":
            f["t"] = np.dtype("<u8")
            replace(f, D.DS_LENGTHS, data=None, dtype=f["t"])
            del f["t"]                           # the type stays, committed, reached from the dataset only
        elif extra == "compact":
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.COMPACT)
            replace(f, D.DS_FLAGS, data=None, dcpl=dcpl)
        elif extra == "enum-flags":
            replace(f, D.DS_FLAGS, data=None, dtype=h5py.enum_dtype({"ZERO": 1, "DATA": 0}, basetype="u1"))
        elif extra == "big-endian-offsets":
            replace(f, D.DS_OFFSETS, data=f[D.DS_OFFSETS][()].astype(">u8"), dtype=">u8")
    reseal(p)
    errors = every_reader(p, tmp_path)
    for e in errors:
        assert isinstance(e, (vdisk.CorruptImageError, vdisk.UnsupportedFeatureError)), e
        assert p in str(e)
    msg = str(errors[0])
    want = {"group": "unexpected object 'g'", "nested-external-link": "unexpected object 'g'",
            "named-datatype": "unexpected object 't'", "dataset": "unexpected object 'more'",
            "hard-alias": "unexpected object 'alias'", "dataset-attribute": "'crc32c' has attributes",
            "committed-type": "'lengths' is not of type", "compact": "'flags' has layout",
            "enum-flags": "'flags' is not of type", "big-endian-offsets": "'offsets' is not of type"}[extra]
    assert want in msg, msg


@pytest.mark.parametrize("kind", ["object-ref", "region-ref", "float", "compound", "array", "vlen-seq"])
def test_attributes_that_can_point_elsewhere_are_refused_before_reading(tmp_path, kind):
    """Root attributes are scalar integers and strings: an object or region
    reference (which may name another object or file), or any other type, is
    refused from its type, before its value is read."""
    p = make_delta(tmp_path)
    with h5py.File(p, "r+") as f:
        value = {"object-ref": lambda: f[D.DS_DATA].ref,
                 "region-ref": lambda: f[D.DS_DATA].regionref[0:1],
                 "float": lambda: np.float64(1.5),
                 "compound": lambda: np.array((1, 2), dtype=[("a", "<u4"), ("b", "<u4")]),
                 "array": lambda: np.arange(3, dtype="<u8"),
                 "vlen-seq": None}[kind]
        if kind == "vlen-seq":
            seq = np.empty((), dtype=object)
            seq[()] = np.arange(3, dtype="<u4")
            f.attrs.create("extra", seq, dtype=h5py.vlen_dtype("<u4"))
        else:
            f.attrs["extra"] = value()
    reseal(p)
    reads = []
    real = D.DeltaFile._read_attrs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D.DeltaFile, "_read_attrs", lambda self: (reads.append(1), real(self))[1])
        errors = every_reader(p, tmp_path)
    assert not reads, "attribute values were read before the attribute types were checked"
    for e in errors:
        assert "attribute 'extra'" in str(e), e


def test_extra_scalar_attributes_are_still_accepted(tmp_path):
    """What the reader accepted before and the checksum covers: an extra integer or string attribute."""
    p = make_delta(tmp_path)
    with h5py.File(p, "r+") as f:
        f.attrs["comment"] = "made by hand"
        f.attrs["level"] = np.uint32(3)
    reseal(p)
    assert vdisk.verify(p)["blocks"] == 3


# ---------------------------------------------------------------------------- resource bombs
_BOMB = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
if args[1] == "verify":
    vdisk.verify(args[0])
elif args[1] == "restore":
    vdisk.restore([args[0]], args[2], format="raw")
else:
    vdisk.merge([args[0]], args[2])
"""


@pytest.mark.parametrize("storage", ["chunked-unwritten", "contiguous-unallocated"])
@pytest.mark.parametrize("op", ["verify", "restore", "merge"])
def test_declared_extents_bomb(tmp_path, storage, op):
    """A 12 KiB delta whose extent datasets declare 2^28 entries (no byte of
    them written: they read as fill values) took 53 s and 10 GB before
    refusing.  A dataset's declared size is now bounded by its storage in
    the file (and by the attributes) before anything reads it.  (The child
    has a 3 GiB address-space limit, so the old code fails here with a
    MemoryError instead of taking the machine's memory.)"""
    p = make_delta(tmp_path)
    n = 1 << 28
    with h5py.File(p, "r+") as f:
        for name in (D.DS_OFFSETS, D.DS_LENGTHS, D.DS_FLAGS):
            if storage == "chunked-unwritten":
                replace(f, name, shape=(n,), chunks=(1 << 16,))
            else:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_LATE)
                replace(f, name, shape=(n,), dcpl=dcpl)
        f.attrs["virtual_size"] = np.uint64(n * BS)
    reseal(p, [np.zeros(n, "<u8"), np.zeros(n, "<u8"), np.zeros(n, "u1")])
    assert os.path.getsize(p) < 64 * KiB
    r = measure_in_child(_BOMB, p, op, str(tmp_path / "out"), timeout=120)
    assert r["error"] and "CorruptImageError" in r["error"], r
    assert ("is chunked" if storage == "chunked-unwritten" else "needs") in r["error"], r
    assert r["growth"] < 32 * MiB, r
    assert not os.path.exists(tmp_path / "out")


def test_data_chunks_never_written_are_refused(tmp_path):
    """A gzip delta whose 'data' declares 1 Mi rows (4 GiB) with no chunk
    written, and 'crc32c' holding the CRC of a zero row for each: every row
    reads as fill values, so verify read 4 GiB of nothing and passed.  The
    chunks are counted first now (and 'data' is bounded by 'crc32c', which
    must be stored in the file)."""
    p = make_delta(tmp_path, compression="gzip")
    rows = 1 << 20
    zero_crc = D._crc32c.crc32c(bytes(BS))
    with h5py.File(p, "r+") as f:
        replace(f, D.DS_DATA, shape=(rows, BS), chunks=(16, BS), compression="gzip")
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        replace(f, D.DS_CRC, shape=(rows,), data=np.full(rows, zero_crc, "<u4"), dcpl=dcpl)
        replace(f, D.DS_OFFSETS, data=np.array([0], "<u8"))
        replace(f, D.DS_LENGTHS, data=np.array([rows * BS], "<u8"))
        replace(f, D.DS_FLAGS, data=np.array([0], "u1"))
        f.attrs["virtual_size"] = np.uint64(rows * BS)
        f.attrs["data_blocks"] = np.uint64(rows)
        f.attrs["data_bytes"] = np.uint64(rows * BS)
    reseal(p)
    r = measure_in_child("result['summary'] = vdisk.verify(args[0])['blocks']", p, timeout=300)
    assert r["error"] and "0 chunks written of the 65536" in r["error"], r
    assert r["growth"] < 32 * MiB, r


# ---------------------------------------------------------------------------- filters and plugins
@pytest.mark.parametrize("filters", ["shuffle", "fletcher32", "scaleoffset", "gzip-on-crc32c"])
def test_filters_vdisk_does_not_write_are_refused(tmp_path, filters):
    """vdisk writes gzip or lzf on 'data' and nothing else (no shuffle, no
    Fletcher32; 'crc32c' and the extents unfiltered): the rest was read."""
    p = make_delta(tmp_path, compression="gzip")
    with h5py.File(p, "r+") as f:
        if filters == "gzip-on-crc32c":
            replace(f, D.DS_CRC, data=None, chunks=f[D.DS_CRC].shape, compression="gzip")
        else:
            kw = {"shuffle": {"shuffle": True}, "fletcher32": {"fletcher32": True},
                  "scaleoffset": {"scaleoffset": 0}}[filters]
            replace(f, D.DS_DATA, data=None, chunks=f[D.DS_DATA].chunks, compression="gzip", **kw)
    reseal(p)
    for e in every_reader(p, tmp_path):
        assert isinstance(e, (vdisk.UnsupportedFeatureError, vdisk.CorruptImageError)), e
        assert ("'crc32c' is chunked" if filters == "gzip-on-crc32c" else "'data' has the filters") in str(e), e


def test_lzf_and_gzip_deltas_still_read(tmp_path):
    for comp in ("gzip", "lzf", None):
        p = make_delta(tmp_path, f"{comp}.h5", compression=comp)
        s = vdisk.verify(p)
        assert s["compression"] == (comp or "none") and s["blocks"] == 3
        vdisk.restore([p], str(tmp_path / f"{comp}.raw"), format="raw")
        with open(tmp_path / f"{comp}.raw", "rb") as fh:
            got = fh.read()
        assert got[:5000] == pattern(1, 5000) and got[9 * BS:10 * BS] == pattern(2, BS)


PLUGIN_ID = 40000
PLUGIN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
typedef long long hid_t;
typedef struct {
    int version; int id; unsigned encoder_present, decoder_present; const char *name;
    int (*can_apply)(hid_t, hid_t, hid_t); int (*set_local)(hid_t, hid_t, hid_t);
    size_t (*filter)(unsigned, size_t, const unsigned *, size_t, size_t *, void **);
} H5Z_class2_t;
static void mark(const char *what) {
    const char *p = getenv("VDISK_PLUGIN_MARKER");
    FILE *f = p ? fopen(p, "a") : NULL;
    if (f) { fputs(what, f); fclose(f); }
}
__attribute__((constructor)) static void loaded(void) { mark("loaded\n"); }
static size_t identity(unsigned flags, size_t n, const unsigned *cd, size_t nbytes, size_t *size, void **buf) {
    return nbytes;
}
static const H5Z_class2_t cls = {1, %d, 1, 1, "vdisk test plugin", NULL, NULL, identity};
int H5PLget_plugin_type(void) { return 0; }
const void *H5PLget_plugin_info(void) { return &cls; }
""" % PLUGIN_ID


@pytest.fixture
def plugin(tmp_path):
    """A filter plugin (id 40000, the identity) that notes in $VDISK_PLUGIN_MARKER when it is loaded."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a test plugin")
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "plugin.c").write_text(PLUGIN_C)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "libvdisktest.so"), str(d / "plugin.c")], check=True)
    os.unlink(d / "plugin.c")
    return str(d)


_PLUGIN_CRAFT = """
import h5py
from vdisk_testkit.deltacraft import replace, reseal
with h5py.File(args[0], "r+") as f:
    replace(f, "data", data=None, chunks=f["data"].chunks, compression={pid})
reseal(args[0])
"""


def test_a_filter_plugin_is_never_loaded(tmp_path, plugin, monkeypatch):
    """A delta whose 'data' needs filter 40000 made libhdf5 look it up in
    HDF5_PLUGIN_PATH and load whatever library is there (its constructor
    ran), and verify passed.  The filter is refused before anything is read."""
    p = make_delta(tmp_path, compression="gzip")
    marker = str(tmp_path / "marker")
    monkeypatch.setenv("HDF5_PLUGIN_PATH", plugin)
    monkeypatch.setenv("VDISK_PLUGIN_MARKER", marker)
    r = measure_in_child(_PLUGIN_CRAFT.format(pid=PLUGIN_ID), p)
    assert r["error"] is None and os.path.exists(marker), "crafting with the plugin failed"
    os.unlink(marker)
    for body in ("vdisk.verify(args[0])", "vdisk.restore([args[0]], args[1], format='raw')",
                 "vdisk.merge([args[0]], args[1])"):
        r = measure_in_child(body, p, str(tmp_path / "out"), timeout=60)
        assert r["error"] and f"'data' has the filters [{PLUGIN_ID}]" in r["error"], r
        assert not os.path.exists(marker), f"{body}: libhdf5 loaded a plugin from HDF5_PLUGIN_PATH"


_PLUGIN_SWITCH = """
import h5py
from vdisk import delta as D
with h5py.File(args[0], "r") as f:
    with D.no_hdf5_plugins():
        result["state_inside"] = D.plugin_loading_state()
        try:
            f["data"][0]
            result["inside"] = "read"
        except OSError:
            result["inside"] = "refused"
    result["state_after"] = D.plugin_loading_state()
    result["loaded_inside"] = os.path.exists(args[1])
    f["data"][0]
    result["loaded_after"] = os.path.exists(args[1])
"""


def test_plugin_loading_is_off_while_a_delta_is_read(tmp_path, plugin, monkeypatch):
    """The second wall, alone: inside no_hdf5_plugins (every open and row read
    of a delta), libhdf5 loads no plugin even for a dataset that needs one;
    the process's setting is back afterwards."""
    p = make_delta(tmp_path, compression="gzip")
    marker = str(tmp_path / "marker")
    monkeypatch.setenv("HDF5_PLUGIN_PATH", plugin)
    monkeypatch.setenv("VDISK_PLUGIN_MARKER", marker)
    assert measure_in_child(_PLUGIN_CRAFT.format(pid=PLUGIN_ID), p)["error"] is None
    os.unlink(marker)
    r = measure_in_child("import os\n" + _PLUGIN_SWITCH, p, marker)
    assert r["state_inside"] == 0 and r["inside"] == "refused" and not r["loaded_inside"], r
    assert r["state_after"] != 0 and r["loaded_after"], r


# ---------------------------------------------------------------------------- the CLI and the path itself
def test_cli_one_line_error_for_a_hostile_delta(tmp_path, secret):
    p = make_delta(tmp_path)
    arrays = extents_of(p)
    with h5py.File(p, "r+") as f:
        replace(f, D.DS_OFFSETS, external=[(secret, 0, f[D.DS_OFFSETS].size * 8)])
    reseal(p, arrays)
    for args in (["verify", p], ["restore", str(tmp_path / "t.raw"), p, "-O", "raw"],
                 ["merge", str(tmp_path / "m.h5"), p]):
        r = CliRunner().invoke(cli_main, args, catch_exceptions=False)
        assert r.exit_code == 1, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vdisk: error: ") and "external storage" in lines[0], lines
        assert_no_leak([lines[0]])


def test_a_fifo_or_directory_given_as_a_delta_is_refused(tmp_path, fifo):
    """A FIFO named as the delta: opened O_NONBLOCK and refused from fstat (never read)."""
    for path in (fifo, str(tmp_path)):
        r = measure_in_child("vdisk.verify(args[0])", path, timeout=30)
        assert r["error"] and "not a regular file" in r["error"], r


def test_the_file_libhdf5_opens_is_the_file_vdisk_checked(tmp_path):
    """The delta is opened once, by descriptor: renaming another file over its
    path after the preamble check does not make libhdf5 read that one."""
    good = make_delta(tmp_path, "good.h5")
    p = make_delta(tmp_path, "d.h5")
    evil = str(tmp_path / "evil.h5")
    shutil.copy(p, evil)
    with h5py.File(evil, "r+") as f:
        f.attrs["since"] = "x"
    reseal(evil)
    real = D.check_global_heaps

    def swap(*a):
        real(*a)
        os.replace(evil, p)                 # after vdisk read and checked the preamble of the good file
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "check_global_heaps", swap)
        shutil.copy(good, p)
        s = vdisk.verify(p)
    assert s["since"] == "*"


# ---------------------------------------------------------------------------- the fuzzer's structure mutations


def test_structure_mutations_never_reach_outside():
    """vdisk_testkit/fuzz/fuzz_delta.py's structure mutations alone (external
    storage, links, virtual datasets, extra objects, attribute types,
    filters, huge declared shapes, unwritten chunks; the delta resealed),
    driven by hypothesis: only VdiskErrors, and no file outside the delta
    opened (the bait's access time; 50 of 300 such inputs opened it on the
    reader before check_structure)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from vdisk_testkit.fuzz import fuzz_delta as fz
    seeds = {k: v for k, v in fz.build_seeds().items() if v[1:9] == D.PREAMBLE_MAGIC}
    if not fz.arm_bait():
        pytest.skip("the scratch file system keeps no access times: the bait cannot tell")

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(sorted(seeds)), rng=st.randoms(use_true_random=False), rounds=st.integers(1, 2))
    def fuzz(name, rng, rounds):
        data = seeds[name]
        for _ in range(rounds):
            out = fz._structure_edit(data[1:], rng)
            data = data if out is None else data[:1] + out
        fz.one_input(data)

    fuzz()
