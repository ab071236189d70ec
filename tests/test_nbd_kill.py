"""The NBD flush contract under SIGKILL of `vdisk serve` (vdisk_testkit/nbdkill.py), a short run:
VDISK_NBD_KILLS kills (default 12, 4 per image) over images of 4 and 8 KiB blocks.
The long run is tools/campaign_nbd_kill.py (docs/RELIABILITY.md, "NBD server kill")."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from vdisk_testkit import nbdkill, nbdserve

KILLS = int(os.environ.get("VDISK_NBD_KILLS", "12"))
ROUNDS = 4             # servers killed one after the other on one image


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="vk-")       # short: a Unix socket path has at most 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(not nbdserve.vdisk_has_serve(), reason="vdisk serve (vdisk/nbd/) is not in this checkout")
@pytest.mark.parametrize("seed", range(max(1, -(-KILLS // ROUNDS))))
def test_sigkill_server_after_flush(tmp_path, sockdir, seed):
    """Flushed (and FUA) writes survive a SIGKILL of the server; every change id handed out
    before covers every changed block; the backup chain restores (see vdisk_testkit/nbdkill.py)."""
    stats = nbdkill.run(seed, ROUNDS, str(tmp_path), sockdir, size=(256 if seed % 2 else 128) * 1024,
                        block_size=4096 if seed % 3 else 8192)
    assert stats.kills == ROUNDS and stats.after_flush >= ROUNDS // 2 and stats.flushes > stats.after_flush
    print(f"seed {seed}: {stats}")
