"""The vdisk command line: outputs, exit codes and one-line errors."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner

import vdisk
from vdisk.cli import main

BS = 64 * 1024
MiB = 1 << 20


def run(*args):
    """Invoke the CLI in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, code=None):
    assert result.exit_code != 0
    if code is not None:
        assert result.exit_code == code
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vdisk: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.vdk"
    vdisk.create(path, "4MiB").close()
    return path


def write(path, data, offset):
    with vdisk.open(path, "r+") as d:
        d.pwrite(data, offset)


def info_json(path):
    r = run("info", path, "--output", "json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------- create / info
def test_create_prints_formatting_line_and_info_agrees(tmp_path):
    path = tmp_path / "new.vdk"
    r = run("create", path, "10GiB", "--block-size", "128KiB")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"Formatting '{path}', fmt=vdisk size={10 << 30} block_size={128 << 10}\n"
    data = info_json(path)
    assert data["virtual-size"] == 10 << 30
    assert data["cluster-size"] == 128 << 10
    assert data["track-changes"] is True
    assert data["allocated-blocks"] == 0


def test_create_refuses_existing_file_without_overwrite(image):
    before = info_json(image)["uuid"]
    assert "--overwrite" in assert_user_error(run("create", image, "1MiB"), 1)
    assert info_json(image)["uuid"] == before
    r = run("create", image, "1MiB", "--overwrite")
    assert r.exit_code == 0, r.stderr
    after = info_json(image)
    assert after["uuid"] != before and after["virtual-size"] == MiB


def test_create_without_tracking(tmp_path):
    path = tmp_path / "plain.vdk"
    assert run("create", path, "1MiB", "--no-track-changes").exit_code == 0
    data = info_json(path)
    assert data["track-changes"] is False and "change-id" not in data
    human = run("info", path).stdout
    assert [ln.split(":", 1)[1].strip() for ln in human.splitlines() if ln.startswith("change tracking:")] == ["off"]
    assert "tracking id" not in human
    err = assert_user_error(run("changes", path, "--since", "*"), 1)
    assert "tracking" in err


def test_info_human(image):
    write(image, b"x" * BS, 2 * BS)
    lines = run("info", image).stdout.splitlines()
    fields = dict(ln.split(":", 1) for ln in lines)
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["image"] == str(image)
    assert fields["file format"] == "vdisk"
    assert fields["virtual size"] == f"4 MiB ({4 * MiB} bytes)"
    assert fields["allocated"] == "64 KiB (1 block)"
    assert fields["change tracking"] == "on"
    assert fields["generation"] == "1"
    for key in ("tracking id", "change id", "dirty coarse regions"):
        assert key in fields
    # values line up in one column
    assert len({ln.index(ln.split(":", 1)[1].strip()) for ln in lines}) == 1


# ---------------------------------------------------------------------------- map
def test_map_lists_exactly_the_written_blocks(image):
    write(image, b"a" * (2 * BS), 3 * BS)
    write(image, b"b", 10 * BS + 17)
    r = run("map", image, "--output", "json")
    assert r.exit_code == 0
    entries = json.loads(r.stdout)             # qemu-img map's shape: every range, holes as zero
    assert [(e["start"], e["length"], e["data"], e["zero"]) for e in entries] == [
        (0, 3 * BS, False, True), (3 * BS, 2 * BS, True, False), (5 * BS, 5 * BS, False, True),
        (10 * BS, BS, True, False), (11 * BS, 4 * MiB - 11 * BS, False, True)]
    lines = run("map", image).stdout.splitlines()
    assert lines[0].split() == ["Offset", "Length"]
    assert [ln.split() for ln in lines[1:]] == [[hex(3 * BS), hex(2 * BS)], [hex(10 * BS), hex(BS)]]


def test_map_of_empty_image(image):
    assert json.loads(run("map", image, "--output", "json").stdout) == [
        {"start": 0, "length": 4 * MiB, "depth": 0, "present": False, "zero": True, "data": False}]
    assert run("map", image).stdout.splitlines()[1:] == []


# ---------------------------------------------------------------------------- checkpoint / changes
def test_changes_since_checkpoint_lists_exactly_the_written_block(image):
    write(image, b"old" * 1000, 0)
    r = run("checkpoint", image)
    assert r.exit_code == 0, r.stderr
    cid = r.stdout.strip()
    assert r.stdout.count("\n") == 1
    assert info_json(image)["change-id"] == cid
    write(image, b"new", 5 * BS + 100)

    r = run("changes", image, "--since", cid)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [f"{5 * BS} {BS}", f"1 extent, {BS} bytes"]

    data = json.loads(run("changes", image, "--since", cid, "--output", "json").stdout)
    assert data == {"since": cid, "change_id": cid, "extents": [{"offset": 5 * BS, "length": BS}], "bytes": BS}

    everything = json.loads(run("changes", image, "--since", "*", "--output", "json").stdout)
    assert everything["extents"] == [{"offset": 0, "length": BS}, {"offset": 5 * BS, "length": BS}]
    assert everything["bytes"] == 2 * BS


def test_changes_rejects_bad_ids(image):
    assert_user_error(run("changes", image, "--since", "garbage"), 1)
    assert_user_error(run("changes", image), 1)     # --since is required


# ---------------------------------------------------------------------------- resize
def test_resize_relative_and_absolute(image):
    r = run("resize", image, "+1M")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Image resized.\n"
    assert info_json(image)["virtual-size"] == 5 * MiB
    assert_user_error(run("resize", image, "-512K"), 1)      # shrinking needs --shrink
    assert run("resize", image, "-512K", "--shrink").exit_code == 0
    assert info_json(image)["virtual-size"] == 5 * MiB - 512 * 1024
    assert run("resize", image, "8MiB").exit_code == 0
    assert info_json(image)["virtual-size"] == 8 * MiB
    assert_user_error(run("resize", image, "-9MiB"), 1)
    assert_user_error(run("resize", image, "+1000"), 1)
    assert info_json(image)["virtual-size"] == 8 * MiB


# ---------------------------------------------------------------------------- check
def make_leak(path):
    """Give an unreferenced data-area block a refcount of 1."""
    with vdisk.open(path) as d:
        refcount_offset, end_block = d._hdr.refcount_offset, d._end_block
        capacity, bs = d._hdr.refcount_capacity, d.block_size
    block = end_block + 2
    assert block < capacity
    with open(path, "r+b") as f:
        f.seek(refcount_offset + 2 * block)
        f.write(struct.pack("<H", 1))
        f.truncate((block + 1) * bs)


def make_corruption(path):
    """A table entry pointing far past the end of the file."""
    with vdisk.open(path) as d:
        table_offset = d._hdr.table_offset
    with open(path, "r+b") as f:
        f.seek(table_offset + 4 * 3)
        f.write(struct.pack("<I", 1_000_000))


def test_check_clean_image(image):
    write(image, b"z" * 100, 0)
    r = run("check", image)
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0] == "No errors were found on the image."
    data = json.loads(run("check", image, "--output", "json").stdout)
    assert data["ok"] is True and data["leaks"] == 0 and data["corruptions"] == 0
    assert data["allocated-clusters"] == 1 and data["check-errors"] == 0


def test_check_leak_exits_3_and_repair_fixes_it(image):
    write(image, b"z" * 100, 0)
    make_leak(image)
    res = vdisk.check(image)
    assert not res.ok and res.leaked_blocks > 0 and res.corruptions == []

    r = run("check", image)
    assert r.exit_code == 3
    assert f"{res.leaked_blocks} leaked clusters were found on the image." in r.stdout
    assert "No errors were found" not in r.stdout
    data = json.loads(run("check", image, "--output", "json").stdout)
    assert data["leaks"] == res.leaked_blocks and data["ok"] is False

    r = run("check", image, "--repair")
    assert r.exit_code == 0, r.stdout
    assert "The following inconsistencies were found and repaired" in r.stdout
    assert f"{res.leaked_blocks} leaked clusters" in r.stdout
    assert "No errors were found on the image." in r.stdout
    assert run("check", image).exit_code == 0
    assert vdisk.check(image).ok


def test_check_corruption_exits_2(image):
    write(image, b"z" * 100, 0)
    make_corruption(image)
    r = run("check", image)
    assert r.exit_code == 2
    assert "ERROR block 3" in r.stdout
    assert "1 errors were found on the image." in r.stdout
    data = json.loads(run("check", image, "--output", "json").stdout)
    assert data["ok"] is False and data["corruptions"] == 1 and len(data["corruption-messages"]) == 1
    # the image cannot be opened, one line says so; info reads only the header and the records
    # (vdisk/summary.py, as qemu-img info reads no L2 table), so it still describes the image
    assert "block table" in str(pytest.raises(vdisk.CorruptImageError, vdisk.open, image).value)
    assert run("info", image).exit_code == 0
    r = run("check", image, "--repair", "--output", "json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["repaired"] is True and data["corruptions-fixed"] == 1
    assert run("check", image).exit_code == 0


def test_check_cannot_check_exits_1(tmp_path, image):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an image at all" * 1000)
    assert "not a vdisk image" in assert_user_error(run("check", junk), 1)
    assert_user_error(run("check", tmp_path / "missing.vdk"), 1)
    with vdisk.open(image, "r+"):                  # a writer holds the image
        assert_user_error(run("check", image), 1)


# ---------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("args, code", [
    (("info", "{tmp}/missing.vdk"), 1),
    (("map", "{tmp}/missing.vdk"), 1),
    (("checkpoint", "{tmp}/missing.vdk"), 1),
    (("create", "{tmp}/a.vdk", "12XB"), 1),
    (("create", "{tmp}/a.vdk", "1MiB", "--block-size", "3KiB"), 1),
    (("info", "{tmp}/junk.bin", "-f", "vdisk"), 1),      # without -f it is a raw image, as qemu-img says
    (("map", "{tmp}/junk.bin", "-f", "qcow2"), 1),
    (("resize", "{tmp}/junk.bin", "+1M"), 1),
    (("info", "{tmp}"), 1),
    (("frobnicate",), 1),
    (("create",), 1),
    (("info", "{tmp}/junk.bin", "--output", "xml"), 1),
])
def test_user_errors_are_one_line(tmp_path, args, code):
    (tmp_path / "junk.bin").write_bytes(b"\0" * 10000)
    result = run(*[a.format(tmp=tmp_path) for a in args])
    assert_user_error(result, code)
    assert not (tmp_path / "a.vdk").exists()


def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("create", "info", "check", "map", "resize", "checkpoint", "changes"):
        assert cmd in r.stdout
    r = run("--version")
    assert r.exit_code == 0 and vdisk.__version__ in r.stdout


# ---------------------------------------------------------------------------- the real entry point
def test_module_entry_point(tmp_path):
    path = tmp_path / "p.vdk"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vdisk.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=60)

    r = cli("create", path, "2MiB")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Formatting '{path}', fmt=vdisk size={2 * MiB}")
    r = cli("info", path, "--output", "json")
    assert json.loads(r.stdout)["virtual-size"] == 2 * MiB
    make_leak(path)
    assert cli("check", path).returncode == 3
    r = cli("info", tmp_path / "missing.vdk")
    assert r.returncode == 1
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("vdisk: error: ")
    assert "Traceback" not in r.stderr
