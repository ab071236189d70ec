"""A short run of tools/campaign_live.py while a writer writes the served image: the server
or the backup client SIGKILLed in the middle of `vdisk backup --consumer` (the consumer's
chain has every delta and restores to the image byte for byte after one more backup, no
temporary snapshot is left), and the pull workflow stopped at a random step (the tool's copy
equals the image after the next full round, no snapshot is left).  docs/RELIABILITY.md."""
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


@pytest.mark.parametrize("seed", range(int(os.environ.get("VDISK_LIVE_KILLS", "4"))))
def test_pull_workflow_interrupted(tmp_path, monkeypatch, seed):
    monkeypatch.setenv("VDISK_RUNTIME_DIR", str(tmp_path / "run"))
    r = campaign_live.pull_trial(str(tmp_path), 2000 + seed)
    assert r["violation"] is None, r
