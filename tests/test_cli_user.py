"""What a new user of the command line hit (issue 17): flags, not Python
parameters, in messages; usage errors exit 1; help; the user's paths in
errors; convert's output format from the extension; qemu-img shaped JSON;
progress bars; sizes; the raw restore's sidecar; start-up imports; typing
and the wheel's contents."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import warnings

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from click.testing import CliRunner

import vdisk
from vdisk.arrays import distinct
from vdisk.cli import main

from vdisk_testkit.qemu_helpers import needs_qemu

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VDISK = os.path.join(os.path.dirname(sys.executable), "vdisk")      # the venv's entry point


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error(result, code=1) -> str:
    """The single ``vdisk: error:`` line of a failed command (and its exit code)."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: error: "), result.stderr
    return lines[0]


def cli(*args, env=None, **kw):
    """The installed ``vdisk`` entry point, in a child process."""
    return subprocess.run([VDISK, *map(str, args)], capture_output=True, text=True, timeout=120, env=env, **kw)


def qemu_img(*args):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=True, timeout=60)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.vdk"
    with vdisk.create(path, "4MiB") as d:
        d.pwrite(b"a" * (2 * BS), 3 * BS)
        d.pwrite(b"b", 10 * BS + 17)
    return path


def chain(tmp_path, raw=False):
    """An image with a full backup and one incremental: (image, full, incremental)."""
    img = tmp_path / "src.vdk"
    with vdisk.create(img, "2MiB") as d:
        d.pwrite(b"1" * BS, 0)
    full = tmp_path / "full.h5"
    vdisk.backup(img, full)
    with vdisk.open(img, "r+") as d:
        d.pwrite(b"2" * BS, BS)
    incr = tmp_path / "incr.h5"
    vdisk.backup(img, incr, since=vdisk.verify(full)["change_id"])
    return img, full, incr


# ---------------------------------------------------------------------------- flags, not parameters
def test_existing_output_names_the_flag(tmp_path, image):
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"x" * MiB)
    msg = one_error(run("convert", raw, image))
    assert msg == f"vdisk: error: {image} exists (pass --overwrite to replace it)"
    # the Python API says it as Python does, from the same error
    with pytest.raises(vdisk.InvalidArgumentError) as exc:
        vdisk.convert(raw, image)
    assert str(exc.value) == f"{image} exists (pass overwrite=True to replace it)"
    assert [p.name for p in exc.value.params] == ["overwrite"]


def test_block_size_for_raw_output_names_the_flag(tmp_path, image):
    msg = one_error(run("convert", "-O", "raw", "--block-size", "4KiB", image, tmp_path / "o.raw"))
    assert "--block-size applies to vdisk and qcow2 output" in msg and "block_size" not in msg


def test_snapshot_of_a_raw_source_names_the_flag(tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(MiB))
    msg = one_error(run("convert", "-f", "raw", "--snapshot", "s1", raw, tmp_path / "o.vdk"))
    assert "--snapshot s1 picks a vdisk snapshot, but the image is raw" in msg and "snapshot=" not in msg


def test_since_and_consumer_together_name_the_flags(tmp_path, image):
    msg = one_error(run("backup", image, tmp_path / "b.h5", "--since", "*", "--consumer", "x"))
    assert "give --since or --consumer, not both" in msg
    assert not (tmp_path / "b.h5").exists()


def test_untracked_image_names_the_create_flag(tmp_path):
    img = tmp_path / "plain.vdk"
    assert run("create", img, "1MiB", "--no-track-changes").exit_code == 0
    msg = one_error(run("backup", img, tmp_path / "b.h5"))
    assert "vdisk create without --no-track-changes" in msg and "track_changes" not in msg


def test_restore_onto_a_foreign_target_names_the_flag(tmp_path):
    _, full, _ = chain(tmp_path)
    target = tmp_path / "t.vdk"
    target.write_bytes(b"not restored by vdisk")
    msg = one_error(run("restore", target, full))
    assert "(pass --overwrite to restore from scratch)" in msg and "overwrite=True" not in msg


@needs_qemu
def test_backing_file_names_the_flags(tmp_path):
    qemu_img("create", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    msg = one_error(run("convert", tmp_path / "top.qcow2", tmp_path / "o.vdk"))
    assert "(pass --allow-backing, or --backing FILE)" in msg and "allow_backing" not in msg
    with pytest.raises(vdisk.UnsupportedFeatureError, match=r"allow_backing=True, or allow_backing=<the backing"):
        vdisk.convert(tmp_path / "top.qcow2", tmp_path / "o.vdk")


def test_every_parameter_an_error_names_has_a_flag():
    """The library's Param(...) names, read from its source, each map to a flag (not the Python spelling)."""
    from vdisk.cli import flag_of
    from vdisk.errors import Param
    names = set()
    for root, _dirs, files in os.walk(os.path.join(ROOT, "vdisk")):      # the subpackages too (vdisk/qcow2/)
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    names |= set(re.findall(r'Param\("(\w+)"', f.read()))
    assert {"overwrite", "allow_backing", "block_size", "snapshot", "since", "consumer"} <= names
    for n in names:
        for p in (Param(n), Param(n, True), Param(n, "x"), Param(n, placeholder="a path")):
            said = flag_of(p)
            assert "=" not in said and "_" not in said and "--" in said, (n, said)


def test_size_past_the_limit_suggests_the_block_size(tmp_path):
    msg = one_error(run("create", tmp_path / "big.vdk", "20T"))
    assert "a block size of --block-size 128KiB holds it" in msg
    assert run("create", tmp_path / "big.vdk", "20T", "--block-size", "128KiB").exit_code == 0
    msg = one_error(run("create", tmp_path / "huge.vdk", "1P", "--block-size", "4KiB"))
    assert "--block-size 4MiB" in msg
    assert "block size of" not in one_error(run("create", tmp_path / "h.vdk", "2P"))   # nothing fits


# ---------------------------------------------------------------------------- usage errors and help
@pytest.mark.parametrize("args", [
    ("check", "--bogus", "x.vdk"),              # 2 would mean "corrupt"
    ("compare", "--bogus", "a", "b"),           # 2 would mean "error comparing"
    ("changes", "x.vdk"),                       # neither --since nor --consumer
    ("frobnicate",),
    ("info",),
    ("snapshot", "frobnicate"),
    ("convert", "-O", "vmdk", "a", "b"),
])
def test_usage_errors_exit_1(args):
    one_error(run(*args), 1)


@pytest.mark.parametrize("args, title", [
    ((), "Create, inspect, check and track"),
    (("snapshot",), "Create, list, delete and revert internal snapshots."),
    (("consumer",), "Named backup consumers"),
])
def test_a_group_without_command_prints_its_help(args, title):
    r = cli(*args)
    assert r.returncode == 1                         # a usage error, as qemu-img without a command
    assert "vdisk: error" not in r.stderr and r.stderr == ""
    assert title in r.stdout and "Commands:" in r.stdout
    assert len(r.stdout.splitlines()) > 5            # the normal help, not one squashed line


def test_dash_h_is_help():
    for args in (("-h",), ("convert", "-h"), ("snapshot", "list", "-h")):
        r = run(*args)
        assert r.exit_code == 0 and r.stdout.startswith("Usage: ") and "-h, --help" in r.stdout


# ---------------------------------------------------------------------------- the Python surface
def test_open_of_a_missing_file_is_a_file_not_found_error(tmp_path):
    path = tmp_path / "nope.vdk"
    with pytest.raises(FileNotFoundError) as exc:
        vdisk.open(path)
    e = exc.value
    assert isinstance(e, vdisk.InvalidArgumentError) and isinstance(e, vdisk.VdiskError)
    assert e.errno == 2 and e.filename == str(path) and str(e) == f"{path}: no such file"
    with pytest.raises(FileNotFoundError):
        vdisk.check(path)
    with pytest.raises(FileNotFoundError):
        vdisk.convert(path, tmp_path / "o.vdk")
    assert one_error(run("info", path)) == f"vdisk: error: {path}: no such file"


def test_lock_message_does_not_promise_a_wait(image):
    with vdisk.open(image, "r+"):
        with pytest.raises(vdisk.ImageLockedError) as exc:
            vdisk.open(image)
    assert "wait" not in str(exc.value) and "once the writer has closed it" in str(exc.value)


def test_user_docstrings_do_not_mention_internals():
    for fn in (vdisk.Disk.pread, vdisk.Disk.pwrite):
        assert "_fast" not in (fn.__doc__ or "") and "HotPath" not in (fn.__doc__ or "")


# ---------------------------------------------------------------------------- the user's paths in errors
def test_output_in_a_missing_directory_names_it(tmp_path, image):
    for fmt in ("vdisk", "raw", "qcow2"):
        dst = tmp_path / "nonexist" / f"x.{fmt}"
        msg = one_error(run("convert", "-O", fmt, image, dst))
        assert msg == f"vdisk: error: {dst}: directory {tmp_path / 'nonexist'} does not exist"
    with pytest.raises(FileNotFoundError):
        vdisk.convert(image, tmp_path / "nonexist" / "x.vdk")


def test_create_names_the_users_path(tmp_path):
    dst = tmp_path / "nonexist" / "x.vdk"
    assert one_error(run("create", dst, "1M")) == f"vdisk: error: {dst}: directory {dst.parent} does not exist"
    adir = tmp_path / "adir"
    adir.mkdir()
    assert one_error(run("create", adir, "1M", "--overwrite")) == f"vdisk: error: {adir} is a directory"
    assert sorted(os.listdir(tmp_path)) == ["adir"] and os.listdir(adir) == []


def test_output_that_is_a_directory_names_it(tmp_path, image):
    adir = tmp_path / "adir"
    adir.mkdir()
    msg = one_error(run("convert", "--overwrite", "-O", "raw", image, adir))
    assert msg == f"vdisk: error: {adir} is a directory"
    assert sorted(os.listdir(tmp_path)) == ["adir", "disk.vdk"] and os.listdir(adir) == []


def test_a_raw_probe_warns_in_one_line(tmp_path):
    """An unrecognised source is read as raw with qemu-img's warning: one line, then success."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x07" * 4096)
    r = run("convert", src, tmp_path / "out.vdk")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines() == [f"vdisk: warning: Image format was not specified for '{src}' and probing "
                                     f"guessed raw."]
    r = run("convert", "-f", "raw", src, tmp_path / "out2.vdk")
    assert r.exit_code == 0 and r.stderr == ""


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vdisk"])
def test_a_full_file_system_names_the_output(tmp_path, fmt):
    """A write past RLIMIT_FSIZE fails (EFBIG) as a full file system does (ENOSPC): the
    error names DST, not the temporary file beside it, and none of them is left."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for i in range(16):
            f.write(os.urandom(MiB))
    dst = tmp_path / f"out.{fmt}"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20)); "
            "from vdisk.cli import main; main(sys.argv[1:], prog_name='vdisk')")
    r = subprocess.run([sys.executable, "-c", code, "convert", "-f", "raw", "-O", fmt, src, dst],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vdisk: error: {dst}: writing the converted image failed: ")
    assert "File too large" in lines[0]
    assert ".converting" not in lines[0] and ".creating" not in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["src.raw"]


# ---------------------------------------------------------------------------- convert's output format
@needs_qemu
@pytest.mark.parametrize("name, fmt", [("out.qcow2", "qcow2"), ("out.raw", "raw"), ("out.img", "raw"),
                                       ("out.vdk", "vdisk"), ("out.bin", "vdisk")])
def test_convert_takes_the_format_from_the_extension(tmp_path, image, name, fmt):
    dst = tmp_path / name
    r = run("convert", image, dst)
    assert r.exit_code == 0, r.stderr
    from vdisk.convert import detect_format
    assert detect_format(dst) == fmt                            # by the magic in the file
    if fmt == "raw":
        assert os.path.getsize(dst) == 4 * MiB
    if fmt == "qcow2":
        assert json.loads(qemu_img("info", "--output=json", dst).stdout)["format"] == "qcow2"
    assert run("compare", "-F", fmt, image, dst).exit_code == 0


def test_convert_refuses_an_extension_that_contradicts_o(tmp_path, image):
    msg = one_error(run("convert", "-O", "vdisk", image, tmp_path / "out.qcow2"))
    assert "the extension .qcow2 says qcow2, but -O vdisk was given" in msg
    one_error(run("convert", "-O", "qcow2", image, tmp_path / "out.raw"))
    assert os.listdir(tmp_path) == ["disk.vdk"]
    # .img names no one format: any -O goes
    assert run("convert", "-O", "qcow2", image, tmp_path / "out.img").exit_code == 0
    assert (tmp_path / "out.img").read_bytes()[:4] == b"QFI\xfb"


# ---------------------------------------------------------------------------- JSON shaped as qemu-img's
@needs_qemu
def test_info_json_has_qemu_img_keys(tmp_path, image):
    with vdisk.open(image, "r+") as d:
        d.snapshot("s1")
    q2 = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", q2, "4M")
    subprocess.run(["qemu-io", "-c", "write 0 64k", q2], check=True, capture_output=True)
    qemu_img("snapshot", "-c", "s1", q2)
    theirs = json.loads(qemu_img("info", "--output=json", q2).stdout)
    ours = json.loads(run("info", image, "--output", "json").stdout)
    for key in ("filename", "format", "virtual-size", "actual-size", "cluster-size", "dirty-flag", "snapshots"):
        assert type(ours[key]) is type(theirs[key]), key
    assert set(theirs["snapshots"][0]) <= set(ours["snapshots"][0])
    for key in theirs["snapshots"][0]:
        assert type(ours["snapshots"][0][key]) is type(theirs["snapshots"][0][key]), key
    assert ours["format"] == "vdisk" and ours["virtual-size"] == 4 * MiB and ours["cluster-size"] == BS
    assert ours["actual-size"] == os.stat(image).st_blocks * 512
    assert ours["snapshots"][0]["name"] == "s1" and ours["snapshots"][0]["id"] == "1"
    assert ours["change-id"] and ours["track-changes"] is True        # vdisk's own keys beside


@needs_qemu
def test_map_json_is_qemu_img_maps_list(tmp_path, image):
    ours = json.loads(run("map", image, "--output", "json").stdout)
    q2 = tmp_path / "same.qcow2"
    vdisk.convert(image, q2, dst_format="qcow2")
    theirs = json.loads(qemu_img("map", "--output=json", q2).stdout)
    assert {frozenset(e) for e in ours} == {frozenset(e) for e in theirs}     # the same keys, data and holes
    assert ours[0]["start"] == 0 and sum(e["length"] for e in ours) == 4 * MiB
    assert all(a["start"] + a["length"] == b["start"] for a, b in zip(ours, ours[1:]))

    def data_ranges(entries):
        return [(e["start"], e["start"] + e["length"]) for e in entries if e["data"]]
    assert data_ranges(ours) == data_ranges(theirs)
    # offset is where the data is in the image file
    blob = image.read_bytes()
    with vdisk.open(image) as d:
        for e in ours:
            if e["data"]:
                assert blob[e["offset"]:e["offset"] + e["length"]] == d.pread(e["length"], e["start"])


@needs_qemu
def test_check_json_has_qemu_img_counts(tmp_path, image):
    q2 = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", q2, "4M")
    theirs = json.loads(subprocess.run(["qemu-img", "check", "--output=json", q2], capture_output=True,
                                       text=True).stdout)
    ours = json.loads(run("check", image, "--output", "json").stdout)
    assert set(theirs) <= set(ours)
    for key in theirs:
        assert type(ours[key]) is type(theirs[key]), key
    assert ours["check-errors"] == 0 and ours["corruptions"] == 0 and ours["leaks"] == 0
    assert ours["allocated-clusters"] == 3 and ours["total-clusters"] == 64
    assert ours["corruption-messages"] == []


def test_check_json_counts_corruptions(image):
    from test_cli import make_corruption
    make_corruption(image)
    r = run("check", image, "--output", "json")
    assert r.exit_code == 2
    ours = json.loads(r.stdout)
    assert ours["corruptions"] == 1 and len(ours["corruption-messages"]) == 1


def test_json_for_the_other_commands(tmp_path, image):
    r = run("checkpoint", image, "--output", "json")
    cid = json.loads(r.stdout)["change_id"]
    with vdisk.open(image) as d:
        assert d.change_id == cid
    assert json.loads(run("resize", image, "+1M", "--output", "json").stdout) == {
        "filename": str(image), "virtual-size": 5 * MiB, "old-virtual-size": 4 * MiB}
    out = json.loads(run("convert", image, tmp_path / "c.qcow2", "--output", "json").stdout)
    assert out == {"source": str(image), "filename": str(tmp_path / "c.qcow2"), "format": "qcow2",
                   "virtual-size": 5 * MiB}
    r = run("compare", image, tmp_path / "c.qcow2", "--output", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["identical"] is True
    with vdisk.open(image, "r+") as d:
        d.pwrite(b"z", 1000)
    r = run("compare", image, tmp_path / "c.qcow2", "--output", "json")
    assert r.exit_code == 1 and json.loads(r.stdout)["offset"] == 1000 and json.loads(r.stdout)["sector"] == 512

    _, full, incr = chain(tmp_path)
    out = json.loads(run("merge", tmp_path / "m.h5", full, incr, "--output", "json").stdout)
    assert out["change_id"] == vdisk.verify(incr)["change_id"] and out["since"] == "*"
    out = json.loads(run("restore", tmp_path / "r.vdk", full, incr, "--output", "json").stdout)
    assert out["deltas"] == 2 and out["format"] == "vdisk" and out["incremental"] is False


# ---------------------------------------------------------------------------- progress bars
def test_progress_bars(tmp_path, image):
    _, full, incr = chain(tmp_path)
    with vdisk.open(image, "r+") as d:
        d.snapshot("s")
        d.pwrite(b"q" * BS, 20 * BS)
        d.delete_snapshot("s")
    raw = tmp_path / "a.raw"
    vdisk.convert(image, raw, dst_format="raw")
    for args in (("merge", tmp_path / "m.h5", full, incr), ("verify", full, incr), ("check", image),
                 ("compare", image, raw), ("compact", image)):
        r = run(*args, "-p")
        assert r.exit_code == 0, r.stderr
        assert "100%" in r.stderr, (args, r.stderr)
        assert "100%" not in run(*args).stderr


def test_library_progress_callbacks(tmp_path, image):
    _, full, incr = chain(tmp_path)
    for call in (lambda p: vdisk.verify(full, progress=p), lambda p: vdisk.merge([full, incr], tmp_path / "m.h5",
                                                                                   progress=p),
                 lambda p: vdisk.check(image, progress=p)):
        seen = []
        call(lambda done, total: seen.append((done, total)))
        assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    seen = []
    with vdisk.open(image, "r+") as d:
        d.compact(progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1]


# ---------------------------------------------------------------------------- sizes
def test_sizes_with_fractions_and_units(tmp_path):
    r = run("create", tmp_path / "a.vdk", "1.5G")
    assert r.exit_code == 0 and f"size={3 << 29} " in r.stdout
    r = run("create", tmp_path / "b.vdk", "10T")
    assert r.exit_code == 0 and f"size={10 << 40} " in r.stdout
    assert "not a whole number of bytes" in one_error(run("create", tmp_path / "c.vdk", "1.1K"))
    assert vdisk.parse_size("0.5MiB") == 512 * KiB


def test_create_rounds_as_convert_does(tmp_path):
    raw = tmp_path / "odd.raw"
    raw.write_bytes(b"x" * 1000)
    vdisk.convert(raw, tmp_path / "conv.vdk")
    r = run("create", tmp_path / "made.vdk", "1000")
    assert r.exit_code == 0, r.stderr
    with vdisk.open(tmp_path / "conv.vdk") as a, vdisk.open(tmp_path / "made.vdk") as b:
        assert a.size == b.size == 1024


# ---------------------------------------------------------------------------- restore
def test_advancing_a_raw_restore_reads_the_format_from_its_sidecar(tmp_path):
    img, full, incr = chain(tmp_path)
    target = tmp_path / "t.raw"
    r = run("restore", "-O", "raw", target, full)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.endswith("(1 delta, 2 MiB)\n")                  # not "1 deltas"
    r = run("restore", target, incr)                                # no -O raw again
    assert r.exit_code == 0, r.stderr
    with vdisk.open(img) as d:
        assert target.read_bytes() == d.pread(d.size, 0)
    assert vdisk.restore([full], tmp_path / "fresh.vdk")["format"] == "vdisk"     # a new target: vdisk


# ---------------------------------------------------------------------------- cosmetics
def test_snapshot_list_columns_hold_long_names(image):
    with vdisk.open(image, "r+") as d:
        d.snapshot("a-very-long-snapshot-name-before-the-upgrade")
        d.snapshot("s2")
    lines = run("snapshot", "list", image).stdout.splitlines()
    starts = {re.search(r"\s(\S+ (B|KiB|MiB))\s", ln).start(1) for ln in lines[1:]}
    assert len(starts) == 1                             # SIZE begins in one column
    assert all(ln.split()[0] for ln in lines)


def test_consumer_forget_of_an_unknown_name(image):
    msg = one_error(run("consumer", "forget", image, "nobody"))
    assert "nobody" in msg and "register it first" not in msg
    assert "register it first" in one_error(run("consumer", "update", image, "nobody", "x"))


def test_plural_words(tmp_path, image):
    assert run("changes", image, "--since", "*").stdout.splitlines()[-1] == f"2 extents, {3 * BS} bytes"
    assert "(3 blocks)" in run("info", image).stdout
    one = tmp_path / "one.vdk"
    with vdisk.create(one, "1MiB") as d:
        d.pwrite(b"x", 0)
    assert run("changes", one, "--since", "*").stdout.splitlines()[-1] == f"1 extent, {BS} bytes"
    assert "(1 block)" in run("info", one).stdout


def test_demo_last_lines_are_whole(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vdisk.demo", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    refused = [ln for ln in r.stdout.splitlines() if "a chain with a gap is refused" in ln]
    assert refused and not refused[0].endswith("...")
    assert "1 extents" not in r.stdout


def test_readme_synopsis_lists_every_option():
    """Each command's line in the README's CLI synopsis names all its options."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    block = re.sub(r"\n\s+", " ", block)              # continuation lines join their command's
    missing = []

    def walk(cmd, path):
        import click
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
            return
        def names(ln):
            words = ln.split()
            return words[1:2] + (words[2].split("|") if len(path) > 1 and len(words) > 2 else [])
        line = next((ln for ln in block.splitlines() if ln.startswith("vdisk ")
                     and names(ln)[:1] == path[:1] and (len(path) == 1 or path[1] in names(ln)[1:])), None)
        if line is None:
            missing.append(" ".join(path))
            return
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                if not any(opt in line for opt in p.opts):
                    missing.append(f"{' '.join(path)} {p.opts[0]}")
    walk(main, [])
    assert not [m for m in missing if not m.startswith(("clone", "serve"))], missing


# ---------------------------------------------------------------------------- start-up
def test_help_and_version_import_no_numpy():
    code = ("import sys; from vdisk.cli import main\n"
            "try:\n    main([sys.argv[1]], prog_name='vdisk')\nexcept SystemExit:\n    pass\n"
            "print('numpy' in sys.modules, 'h5py' in sys.modules, 'tqdm' in sys.modules, file=sys.stderr)")
    for arg in ("--help", "--version"):
        r = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=60)
        assert r.stderr.splitlines()[-1] == "False False False", (arg, r.stderr)


def test_info_imports_neither_h5py_nor_tqdm(image):
    code = ("import sys; from vdisk.cli import main\n"
            "try:\n    main(['info', sys.argv[1]], prog_name='vdisk')\nexcept SystemExit as e:\n    assert not e.code\n"
            "print('h5py' in sys.modules, 'tqdm' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True, text=True, timeout=60)
    assert r.stderr.splitlines()[-1] == "False False", r.stderr


def test_writes_flushes_and_tracking_import_no_numpy_ma(tmp_path):
    """numpy 2's np.unique imports numpy.ma on first use (8-15 ms): a process's
    first flush paid it.  Writes, flushes, a checkpoint, changes_since, a
    snapshot, a discard, a resize and a reopen import no numpy.ma."""
    code = textwrap.dedent("""
        import sys, vdisk
        p = sys.argv[1]
        with vdisk.create(p, 64 << 20) as d:
            d.pwrite(b"x" * 4096, 0)
            d.flush()
            cid = d.checkpoint()
            d.pwrite(b"y" * 100000, 3 * 65536)
            assert d.changes_since(cid).nbytes == 131072
            d.snapshot("s1")
            d.pwrite(b"z" * 4096, 0)
            d.discard(0, 65536)
            d.resize(128 << 20)
        with vdisk.open(p, "r+") as d:
            d.pwrite(b"q" * 4096, 4096)
            d.flush()
        print("numpy.ma" in sys.modules, file=sys.stderr)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.vdk")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr.splitlines()[-1] == "False", r.stderr


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.lists(st.integers(0, 2 ** 40), max_size=200), st.sampled_from(["int64", "uint32", "int32"]))
def test_distinct_is_numpys_unique(values, dtype):
    a = np.array([v % (2 ** 31) for v in values], dtype=dtype)
    got, want = distinct(a), np.unique(a)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_lazy_names_are_the_functions():
    import vdisk.check      # noqa: F401 - the submodule import must not hide the function
    import vdisk.convert    # noqa: F401
    import vdisk.backup     # noqa: F401
    assert callable(vdisk.check) and vdisk.check.__module__ == "vdisk.check"
    assert vdisk.convert.__name__ == "convert" and vdisk.backup.__name__ == "backup"
    assert set(vdisk.__all__) <= set(dir(vdisk))
    for name in vdisk.__all__:
        assert getattr(vdisk, name) is not None
    with pytest.raises(AttributeError):
        vdisk.no_such_name   # noqa: B018


# ---------------------------------------------------------------------------- typing and packaging
def test_public_api_is_annotated():
    """Every parameter and return of the functions and public methods vdisk exports has a type."""
    import inspect
    missing = []

    def check(name, fn):
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
                missing.append(f"{name}({p.name})")
        if sig.return_annotation is inspect.Signature.empty and not name.endswith("__init__"):
            missing.append(f"{name} -> ?")

    for name in vdisk.__all__:
        obj = getattr(vdisk, name)
        if inspect.isclass(obj):
            if issubclass(obj, BaseException):
                continue
            for attr, value in vars(obj).items():
                if attr.startswith("_") and attr not in ("__init__", "__enter__", "__exit__"):
                    continue
                if isinstance(value, property):
                    check(f"{name}.{attr}", value.fget)
                elif inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod)):
                    check(f"{name}.{attr}", getattr(obj, attr))
        elif callable(obj):
            check(name, obj)
    assert not missing, missing


@pytest.mark.skipif(shutil.which("mypy", path=os.path.dirname(sys.executable)) is None
                    and subprocess.run([sys.executable, "-m", "mypy", "--version"],
                                       capture_output=True).returncode != 0, reason="mypy is not installed")
def test_mypy_sees_the_typed_public_api(tmp_path):
    """A user's script type-checks against the installed (editable) package, and the
    public modules pass mypy --strict."""
    user = tmp_path / "user.py"
    user.write_text(
        "import numpy as np\n"
        "import vdisk\n"
        "def f(path: str) -> int:\n"
        "    with vdisk.open(path) as d:\n"
        "        n: int = d.size\n"
        "        d.preadinto(np.zeros(4096, np.uint8), 0)\n"
        "        info: vdisk.Disk = d\n"
        "        n += info.info()['virtual_size']\n"
        "    r = vdisk.backup(path, path + '.h5', since=None)\n"
        "    vdisk.restore([path + '.h5'], path + '.raw', format='raw')\n"
        "    vdisk.convert(path, path + '.qcow2', dst_format='qcow2')\n"
        "    vdisk.merge([path + '.h5'], path + '.m.h5')\n"
        "    return n + len(r.change_id)\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert "Cannot find implementation" not in r.stdout, (
        "mypy cannot see the installed vdisk: install it as the README says "
        "(pip install -e . --config-settings editable_mode=compat)\n" + r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    strict = ["vdisk", "vdisk.errors", "vdisk.cli", "vdisk._types", "vdisk.summary", "vdisk.changeid",
              "vdisk.snapshot_table", "vdisk.consumers", "vdisk.extents", "vdisk.header", "vdisk.clone",
              "vdisk.snapshots", "vdisk.results", "vdisk.layout", "vdisk.disk",
              "vdisk.check", "vdisk.live", "vdisk.arrays", "vdisk.backup", "vdisk.convert",
              "vdisk.protocols", "vdisk.fileio", "vdisk.blocktable", "vdisk.allocator", "vdisk.snapshot_ops",
              "vdisk.tracking", "vdisk.sources", "vdisk.sinks", "vdisk.delta", "vdisk.testing", "vdisk.demo",
              "vdisk.__main__", "vdisk.nbd.protocol", "vdisk.nbd.exports", "vdisk.nbd.control",
              "vdisk.nbd.server", "vdisk.nbd.polling", "vdisk.nbd"]
    # every module of the package and of vdisk.nbd is strict (the qcow2 subpackage not yet): a new one joins the list
    modules = {"vdisk." + f[:-3] for f in os.listdir(os.path.join(ROOT, "vdisk")) if f.endswith(".py")} - {"vdisk.__init__"}
    modules |= {"vdisk.nbd" if f == "__init__.py" else "vdisk.nbd." + f[:-3]
                for f in os.listdir(os.path.join(ROOT, "vdisk", "nbd")) if f.endswith(".py")}
    assert modules <= set(strict), sorted(modules - set(strict))
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent",
                        *(a for m in strict for a in ("-m", m))],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_result_dicts_hold_every_field():
    """to_dict (the JSON of backup and check) names each field of the result, as its TypedDict does."""
    import dataclasses
    import typing
    from vdisk.results import BackupResult, BackupResultDict, CheckResult, CheckResultDict
    check = CheckResult(ok=False, corruptions=["x"], leaked_blocks=1, corruption_count=1)
    assert check.to_dict() == dataclasses.asdict(check)
    assert set(typing.get_type_hints(CheckResultDict)) == {f.name for f in dataclasses.fields(CheckResult)}
    backup = BackupResult("a", "*", vdisk.Extents([0], [4096]), 4096, 0, "d", "u", "t", 8192, 4096, 100)
    assert backup.to_dict()["extents"] == 1
    assert set(typing.get_type_hints(BackupResultDict)) == set(backup.to_dict()) == {
        f.name for f in dataclasses.fields(BackupResult)}


@pytest.mark.slow
def test_wheel_ships_the_pyx_and_pyi_not_the_c(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ROOT,
                    "-w", tmp_path], check=True, timeout=1200)
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "vdisk/_fast.pyx" in names and "vdisk/_fast.pyi" in names and "vdisk/py.typed" in names
    assert not [n for n in names if n.endswith(".c")], names


# ---------------------------------------------------------------------------- check counts
def _scribbled(tmp_path, bad: int) -> str:
    """An image whose first `bad` block-table entries point past the file (one corruption each)."""
    path = str(tmp_path / "bad.vdk")
    with vdisk.create(path, "4MiB", block_size="4KiB") as d:
        for b in range(bad):
            d.pwrite(b"x", b * 4096)
        table = d._hdr.table_offset
    with open(path, "r+b") as f:
        f.seek(table)
        f.write((0xFFFFFF00).to_bytes(4, "little") * bad)
    return path


def test_check_counts_every_corruption_not_the_listed_ones(tmp_path):
    """More corruptions than check lists one by one: the counts (human, JSON, API) are the
    checker's, and no listing line is counted or passed off as a corruption."""
    bad = 57
    path = _scribbled(tmp_path, bad)
    res = vdisk.check(path)
    from vdisk.check import MAX_LISTED
    assert res.corruption_count == bad and len(res.corruptions) == MAX_LISTED
    assert all("more" not in m for m in res.corruptions)
    r = run("check", "--output", "json", path)
    assert r.exit_code == 2
    data = json.loads(r.stdout)
    assert data["corruptions"] == bad and len(data["corruption-messages"]) == MAX_LISTED
    assert not any(m.startswith("...") for m in data["corruption-messages"])
    r = run("check", path)
    assert r.exit_code == 2
    assert f"{bad} errors were found on the image." in r.stdout
    assert f"ERROR ... and {bad - MAX_LISTED} more" in r.stdout


# ---------------------------------------------------------------------------- foreign formats
def test_a_foreign_format_refusal_names_the_flag(tmp_path):
    """The way out of a VMDK refusal is said as the flag in the CLI (-f raw; compare's B: -F raw) and
    as the parameter in Python (src_format='raw'), each alone."""
    vmdk = tmp_path / "a.vmdk"
    vmdk.write_bytes(b"KDMV" + bytes(64 * KiB - 4))             # a VMDK sparse extent's magic
    raw = tmp_path / "b.raw"
    raw.write_bytes(bytes(64 * KiB))
    msg = one_error(run("convert", vmdk, tmp_path / "o.vdk"))
    assert "(format vmdk)" in msg and msg.endswith("or pass -f raw to read the file's bytes as a raw disk")
    assert "src_format" not in msg
    msg = one_error(run("compare", "-f", "raw", raw, vmdk), 2)
    assert msg.endswith("or pass -F raw to read the file's bytes as a raw disk") and "b_format" not in msg
    msg = one_error(run("compare", vmdk, raw), 2)
    assert "or pass -f raw to read" in msg and "a_format" not in msg
    with pytest.raises(vdisk.UnsupportedFeatureError) as exc:
        vdisk.convert(vmdk, tmp_path / "o.vdk")
    assert str(exc.value).endswith("or pass src_format='raw' to read the file's bytes as a raw disk")
    assert "-f raw" not in str(exc.value)
    with pytest.raises(vdisk.UnsupportedFeatureError, match=r"pass b_format='raw' to read"):
        vdisk.compare(raw, vmdk, a_format="raw")
    assert run("convert", "-f", "raw", vmdk, tmp_path / "o.vdk").exit_code == 0
    from vdisk.convert import open_backing
    with pytest.raises(vdisk.UnsupportedFeatureError) as exc:      # a backing file: the overlay records formats
        open_backing(str(vmdk), None, (), True)
    assert "qemu-img rebase -u -F raw" in str(exc.value) and "src_format" not in str(exc.value)


def test_convert_warns_of_what_it_does_not_carry_over(tmp_path, image):
    """A vdisk source's snapshots and consumers are not in convert's output: one warning line says so."""
    warnings.simplefilter("always")         # one process runs every command: each warns anew
    r = run("convert", image, tmp_path / "plain.vdk")
    assert r.exit_code == 0 and r.stderr == ""                  # nothing left behind: no warning
    with vdisk.open(image, "r+") as d:
        d.snapshot("s1")
        d.snapshot("s2")
        d.consumers.register("nightly")
    r = run("convert", image, tmp_path / "o.vdk")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines() == [f"vdisk: warning: {image}: its 2 snapshots (s1, s2) and 1 consumer are not "
                                     f"carried over ('vdisk clone --snapshots' keeps the snapshots)"]
    r = run("convert", "-O", "raw", image, tmp_path / "o.raw")
    assert r.stderr.splitlines() == [f"vdisk: warning: {image}: its 2 snapshots (s1, s2) and 1 consumer are not "
                                     f"carried over ('vdisk clone --snapshots' keeps the snapshots)"]
    assert run("convert", "--snapshot", "s1", image, tmp_path / "s1.vdk").stderr == ""    # one snapshot, chosen
    from vdisk.convert import NotCarriedOverWarning
    with pytest.warns(NotCarriedOverWarning, match=r"2 snapshots \(.*\) and 1 consumer are not"):
        vdisk.convert(image, tmp_path / "api.vdk")
