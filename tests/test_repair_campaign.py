"""Lost header commits repaired (tests/repairsim.py; the long run is tools/campaign_repair.py)."""
import os

import pytest

import repairsim

SEEDS = int(os.environ.get("VDISK_REPAIR_SEEDS", "4"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_lost_commits_repaired_never_under_report(seed, tmp_path):
    stats = repairsim.run(seed, ops=100, workdir=str(tmp_path))
    assert stats.losses > 0 and stats.checks > 0
    print(f"seed {seed}: {stats}")


def test_campaign_reaches_lost_generations(tmp_path):
    """The campaign does lose checkpoints' commits (counters past the header), not only others."""
    moved = sum(repairsim.run(100 + s, ops=100, workdir=str(tmp_path)).repairs_moved for s in range(3))
    assert moved > 0
