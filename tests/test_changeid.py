"""The change id value type (issue #16): a since is parsed once where it enters,
and the layers below take the ChangeId (no second parse of the same string)."""
from __future__ import annotations

import pytest

import vdisk
from vdisk import tracking


@pytest.fixture
def parses(monkeypatch):
    """The strings ChangeId.parse is handed, in order (a ChangeId handed on is not a parse)."""
    seen: list[str] = []
    original = tracking.ChangeId.parse.__func__

    def counting(cls, change_id):
        if isinstance(change_id, str):
            seen.append(change_id)
        return original(cls, change_id)
    monkeypatch.setattr(tracking.ChangeId, "parse", classmethod(counting))
    return seen


def test_a_backup_parses_its_since_once(tmp_path, parses):
    path = str(tmp_path / "a.vdk")
    with vdisk.create(path, size="1MiB", block_size="4KiB") as d:
        d.pwrite(b"a" * 8192, 0)
        cid = d.checkpoint()
        d.pwrite(b"b" * 4096, 65536)
        res = vdisk.backup(d, tmp_path / "i.h5", since=cid)      # before: parsed 2 times
    assert res.since == cid and res.extents.nbytes == 4096
    assert parses.count(cid) == 1, parses
    with vdisk.open(path, "r+") as d:
        d.consumers.register("c")
        del parses[:]
        d.consumers.update("c", cid)                             # before: parsed 2 times
        assert parses.count(cid) == 1, parses


def test_change_id_values(tmp_path):
    from vdisk.changeid import ANY, ChangeId, parse_since
    text = " 12345678-1234-1234-1234-123456789ABC/7.00000000000000ff "
    cid = ChangeId.parse(text)
    assert ChangeId.parse(cid) is cid and parse_since(cid) is cid and parse_since(ANY) == ANY
    assert str(cid) == "12345678-1234-1234-1234-123456789abc/7.00000000000000ff" and cid.given == text
    assert cid == ChangeId.parse(str(cid)) and hash(cid) == hash(ChangeId.parse(str(cid)))
    for bad in ("*x", "", "12345678-1234-1234-1234-123456789abc/7.0000000000000000", 7):
        with pytest.raises(vdisk.StaleChangeIdError):
            ChangeId.parse(bad)


def test_a_since_is_recorded_in_its_canonical_form(tmp_path):
    """An id the image accepts in another spelling (leading zeros in the generation, upper
    case, spaces) is recorded as the image issues it, so the chain links by string."""
    path = str(tmp_path / "a.vdk")
    with vdisk.create(path, size="1MiB", block_size="4KiB") as d:
        d.pwrite(b"a" * 4096, 0)
        full = vdisk.backup(d, tmp_path / "f.h5")
        d.pwrite(b"b" * 4096, 8192)
        epoch, rest = full.change_id.split("/")
        odd = f" {epoch.upper()}/00{rest} "
        incr = vdisk.backup(d, tmp_path / "i.h5", since=odd)
        data = d.pread(d.size, 0)
    assert incr.since == full.change_id            # before: ".../001..." (leading zeros kept)
    vdisk.restore([str(tmp_path / "f.h5"), str(tmp_path / "i.h5")], str(tmp_path / "t.raw"), format="raw")
    assert (tmp_path / "t.raw").read_bytes() == data    # before: BackupChainError "diverged copies"
