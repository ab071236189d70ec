"""Crash consistency: simulated power loss (thousands of states) and real SIGKILLs."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import vdisk
from crashsim import run_campaign
from helpers import extent_blocks, pattern

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
CHILD = r"""
import sys, random, vdisk
sys.path.insert(0, sys.argv[3])
from helpers import pattern
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
d = vdisk.open(path, "r+")
d.fold_interval = 5
size = d.size
print("ready", flush=True)
for i in range(100000):
    kind = rng.random()
    off = rng.randrange(size)
    length = rng.randint(1, min(size - off, 20000))
    if kind < 0.8:
        d.pwrite(pattern(seed * 100000 + i, length), off)
    elif kind < 0.9:
        d.discard(off, length)
    elif kind < 0.95:
        d.flush()
        print("flushed", i, flush=True)
    else:
        print("checkpoint", i, d.checkpoint(), flush=True)
"""


def replay(seed: int, size: int, upto: int):
    """Contents after op `upto` (inclusive) and every op's result after it, as the child did."""
    rng = random.Random(seed)
    cur = np.zeros(size, np.uint8)
    states = []
    for i in range(upto):
        kind = rng.random()
        off = rng.randrange(size)
        length = rng.randint(1, min(size - off, 20000))
        if kind < 0.8:
            cur[off:off + length] = np.frombuffer(pattern(seed * 100000 + i, length), np.uint8)
        elif kind < 0.9:
            cur[off:off + length] = 0
        states.append(cur.copy())
    return states


@pytest.mark.parametrize("seed", range(int(os.environ.get("VDISK_KILLS", "8"))))
def test_sigkill_writer(img, seed):
    size = 512 * 1024
    vdisk.create(img, size, block_size="4KiB").close()
    here = os.path.dirname(__file__)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, img, str(seed), here],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"     # started, whatever the machine's load
    time.sleep(random.Random(seed).uniform(0.1, 0.8))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    lines = out.splitlines()
    last_flush, points = -1, []
    if not out.endswith("\n"):
        lines = lines[:-1]                  # the kill cut the last line short
    for line in lines:
        parts = line.split()
        if parts[0] in ("flushed", "checkpoint"):
            last_flush = int(parts[1])
        if parts[0] == "checkpoint":
            points.append((int(parts[1]), parts[2]))
    res = vdisk.check(img)
    assert not res.corruptions, res
    with vdisk.open(img) as d:
        state = np.frombuffer(d.pread(size, 0), np.uint8)
        # the child issued at most a few hundred ops past its last line
        history = replay(seed, size, last_flush + 2000)
        flushed = history[last_flush] if last_flush >= 0 else np.zeros(size, np.uint8)
        ok = state == flushed
        for v in history[last_flush + 1:]:
            ok |= state == v
        assert ok.all(), f"byte {int(np.flatnonzero(~ok)[0])} holds data never written there"
        for i, cid in points:
            got = extent_blocks(d.changes_since(cid), d.block_size)
            then = history[i]
            bs = d.block_size
            differ = {b for b in range(size // bs) if not np.array_equal(state[b * bs:(b + 1) * bs], then[b * bs:(b + 1) * bs])}
            assert differ <= got, f"under-report after kill for {cid}: {sorted(differ - got)[:5]}"
    with vdisk.open(img, "r+") as d:   # recovery and a clean close
        pass
    assert not vdisk.check(img).corruptions
