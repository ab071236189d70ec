"""Crash consistency: simulated power loss (thousands of states) and real SIGKILLs."""
import os

import pytest

import vdisk
from vdisk_testkit import killsim
from vdisk_testkit.crashsim import run_campaign

CRASH_SEEDS = int(os.environ.get("VDISK_CRASH_SEEDS", "6"))


@pytest.mark.parametrize("seed", range(CRASH_SEEDS))
def test_power_loss_states(seed):
    checker = run_campaign(seed, ops=60, per_point=4, block_size=4096 if seed % 2 else 8192)
    assert checker.states >= 300, checker.states
    print(f"seed {seed}: {checker.states} crash states, {checker.leaky} with leaks")


@pytest.mark.parametrize("seed", range(CRASH_SEEDS))
def test_power_loss_states_with_snapshots(seed):
    """Snapshot create, delete and revert are atomic: every committed snapshot
    survives with its frozen content, the live disk keeps the contract."""
    checker = run_campaign(1000 + seed, ops=60, per_point=4, block_size=4096 if seed % 2 else 8192,
                           snapshots=True)
    assert checker.states >= 300, checker.states


@pytest.mark.parametrize("seed", range(max(1, CRASH_SEEDS // 2)))
def test_power_loss_states_with_backups_compact_and_reset(seed):
    """Backups (full and incremental), compact and reset_tracking in the
    workload: the crash contract holds for the image, every backup's id stays
    valid after a crash (until a reset), and the chain exported before a
    crash still restores, followed by an incremental of the recovered image."""
    checker = run_campaign(2000 + seed, ops=60, per_point=4, block_size=4096 if seed % 2 else 8192,
                           snapshots=True, backups=True, compact=True, reset=True, restore_rate=0.05)
    assert checker.states >= 300, checker.states


def test_power_loss_across_table_and_refcount_relocation(monkeypatch):
    """A disk whose refcount table is nearly full, written whole, snapshotted and
    written whole again (every block copied on write: the refcount table is
    relocated), then grown past the block table's capacity (the table and the
    counters are relocated): every crash state of those ops keeps the contract."""
    size = 1730 * 4096     # the refcount table then has room for about 2,000 more blocks
    script = [{"k": "write", "off": 0, "len": size, "seed": 1, "zero": False, "flush": False},
              {"k": "snapshot", "name": "whole"},
              {"k": "checkpoint"},
              {"k": "write", "off": 0, "len": size, "seed": 2, "zero": False, "flush": False},
              {"k": "resize", "size": 9 << 20},
              {"k": "write", "off": 8 << 20, "len": 12288, "seed": 3, "zero": False, "flush": True}]
    seen = []
    for name in ("_grow_tables", "_grow_refcounts"):
        real = getattr(vdisk.Disk, name)
        monkeypatch.setattr(vdisk.Disk, name, lambda self, *a, _r=real, _n=name: seen.append(_n) or _r(self, *a))
    checker = run_campaign(9, ops=len(script), per_point=3, size=size, snapshots=True, script=script)
    assert sorted(set(seen)) == ["_grow_refcounts", "_grow_tables"], seen
    assert checker.states >= 30, checker.states


@pytest.mark.parametrize("seed", range(2))
def test_power_loss_states_with_copies(seed):
    """Crash states kept as copies of the image diverge: at the end no copy
    answers an id the original handed out after its copy (nor a backup since
    it), the original answers no id of a copy (crashsim.CopyWatch)."""
    checker = run_campaign(3000 + seed, ops=40, per_point=3, snapshots=True, backups=True, reset=seed == 1,
                           copies=2, copy_rate=0.05)
    assert len(checker.watch.copies) == 2 and checker.watch.checks > 0


def test_power_loss_state_count_total():
    """The campaign's size: at least a few thousand states over the seeds above."""
    total = sum(run_campaign(100 + s, ops=30, per_point=4).states for s in range(2))
    assert total >= 400


def test_recorder_drops_unsynced_writes(tmp_path):
    """The recorder itself: unsynced writes can vanish, synced ones cannot."""
    from vdisk.testing import RecordingIO
    rec = RecordingIO(str(tmp_path / "f"), writable=True, create=True)
    rec.pwrite(b"aaaa", 0)
    rec.fsync()
    rec.pwrite(b"bb", 1)
    assert rec.crash_image(keep=[False]) == b"aaaa"
    assert rec.crash_image(keep=[True]) == b"abba"
    rec.close()


def test_unflushed_new_block_lost_flushed_kept(img):
    from vdisk.testing import RecordingIO
    d = vdisk.create(img, "1MiB", block_size="4KiB", io_factory=RecordingIO)
    d.pwrite(b"A" * 4096, 0)
    d.flush()
    d.pwrite(b"B" * 4096, 8192)
    image = d._io.crash_image(keep=[False] * len(d._io.pending))
    d.close()
    with open(img, "wb") as f:
        f.write(image)
    with vdisk.open(img) as d2:
        assert d2.pread(4096, 0) == b"A" * 4096
        assert d2.pread(4096, 8192) == bytes(4096)


# --------------------------------------------------------------------------- SIGKILL
KILLS = int(os.environ.get("VDISK_KILLS", "10"))
KILL_ROUNDS = 2        # writers killed one after the other on one image


@pytest.mark.parametrize("seed", range(max(1, -(-KILLS // KILL_ROUNDS))))
def test_sigkill_writer(tmp_path, seed):
    """A writer process killed at random moments, twice per image: the crash
    contract holds after each kill (vdisk_testkit/killsim.py; the long run is
    tools/campaign_kill.py)."""
    stats = killsim.run(seed, KILL_ROUNDS, str(tmp_path), size=(256 if seed % 2 else 128) * 1024,
                        block_size=4096 if seed % 3 else 8192)
    assert stats.kills == KILL_ROUNDS
    print(f"seed {seed}: {stats}")


def test_sigkill_writer_with_copies(tmp_path):
    """Killed images copied (a copy of a crashed image) and diverged, the
    writers going on on the original: no id crosses (crashsim.CopyWatch)."""
    stats = killsim.run(77, 3, str(tmp_path), size=128 * 1024, copies=2, copy_rate=1.0)
    assert stats.kills == 3 and stats.copies == 2 and stats.copy_checks > 0
