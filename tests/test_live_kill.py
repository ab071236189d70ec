"""The short run of tools/campaign_live.py while a stamp writer writes the served image: every
step of the live workflows stopped once (docs/RELIABILITY.md).

* `vdisk backup FILE DEST --consumer c` inside the server: the server SIGKILLed at each step
  (temporary snapshot taken, first rows copied, delta synced, temporary snapshot deleted,
  delta placed, consumer updated), and the CLI client SIGKILLed while the server holds at
  each of them (vdisk_testkit/livestop.py).  After every backup the consumer's id names a delta
  that exists; the chain restores prefix by prefix to states the writer went through, in
  order, and in full to the image after one more backup; no temporary snapshot is left.
* The README's pull workflow: the server SIGKILLed after each of its operations (snapshot
  create, consumer update, snapshot delete), the CLI client SIGKILLed while the server holds
  there, and the backup tool SIGKILLing itself at each of its steps.  The next round leaves
  the tool's copy a state the writer went through, the last one equal to the image, and no
  snapshot is left.

The random-delay kills of the same campaign run in tools/campaign_live.py --trials."""
from __future__ import annotations

import os

import pytest

from vdisk_testkit import livekill
from vdisk_testkit.nbd_helpers import needs_clients

pytestmark = needs_clients


@pytest.mark.parametrize("target,step", livekill.step_targets(),
                         ids=[f"{t}-{s}" for t, s in livekill.step_targets()])
def test_stop_at_each_step(tmp_path, monkeypatch, target, step):
    monkeypatch.setenv("VDISK_RUNTIME_DIR", str(tmp_path / "run"))
    seed = int(os.environ.get("VDISK_LIVE_SEED", "0"))
    r = livekill.step_trial(str(tmp_path), target, step, seed)
    assert r["violation"] is None, r
    if not target.startswith("pull-"):
        assert r["deltas"] >= 3
