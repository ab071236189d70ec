"""A short run of tools/campaign_live.py: the server or the backup client SIGKILLed in the
middle of `vdisk backup --consumer` on a served image while a writer writes.  Each trial
checks that the consumer's chain has every delta, restores to the image byte for byte after
one more backup, and that no temporary snapshot is left (docs/RELIABILITY.md)."""
from __future__ import annotations

import os
import sys

import pytest

from nbd_helpers import needs_clients

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import campaign_live  # noqa: E402

pytestmark = needs_clients


@pytest.mark.parametrize("seed", range(int(os.environ.get("VDISK_LIVE_KILLS", "4"))))
def test_kill_during_live_backup(tmp_path, monkeypatch, seed):
    monkeypatch.setenv("VDISK_RUNTIME_DIR", str(tmp_path / "run"))
    r = campaign_live.trial(str(tmp_path), 1000 + seed)
    assert r["violation"] is None, r
    assert r["deltas"] >= 2
