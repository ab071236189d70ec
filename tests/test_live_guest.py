"""Live backups while a real Linux guest (vdisk_testkit/guest.py, TCG) writes files on the served image.

The guest makes an ext2 file system on its virtio-blk disk (an NBD export
of `vdisk serve`) and writes, rewrites and syncs files for a while.  While
it runs, other processes back the image up through the control channel:

* consumers a, b and c with `vdisk backup FILE DEST --consumer` every
  round, every second round, every third round;
* a pull consumer with the README's workflow (snapshot, `nbdinfo --map`,
  reads of the dirty extents from the snapshot export, consumer update,
  snapshot delete): its copy, rebuilt from the dirty extents alone, equals
  `nbdcopy` of the snapshot export byte for byte every round.

After the guest unmounted and powered off, one more backup each: every
prefix of every chain restores, the last restore of each is the image's
content byte for byte, e2fsck -fn accepts it, and the files read back
with debugfs have the checksums the guest printed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import vdisk
from vdisk_testkit import guest
from vdisk_testkit.nbd_client import Client
from vdisk_testkit.nbd_helpers import ServeProcess, extents_of_map, needs_clients, nbdinfo_map, run

pytestmark = needs_clients

MiB = 1 << 20
SIZE = 64 * MiB

SCRIPT = r"""set -e
mke2fs -F -b 4096 -L live /dev/vda >/dev/null
mount -t ext2 /dev/vda /mnt
mkdir -p /mnt/d
i=0
while [ $i -lt 10 ]; do
  dd if=/dev/urandom of=/mnt/d/f$i bs=64k count=$((i + 2)) 2>/dev/null
  dd if=/dev/urandom of=/mnt/big bs=4k count=8 seek=$((i * 37)) conv=notrunc 2>/dev/null
  rm -f /mnt/d/f$((i - 3))
  sync
  sleep 1
  i=$((i + 1))
done
cd /mnt
sha256sum big d/*
cd /
umount /mnt
echo guest-done
"""


@pytest.fixture(scope="module")
def vm():
    try:
        return guest.available()
    except guest.GuestUnavailable as e:
        pytest.skip(f"no TCG guest: {e}")


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "vdisk", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"vdisk {' '.join(map(str, args))}: {r.stderr}"
    return r.stdout


def pull_round(img, srv, name, target: bytearray, work) -> int:
    cli("snapshot", "create", img, name)
    uri = srv.uri(f"guest@{name}")
    dirty = extents_of_map(nbdinfo_map(uri, "qemu:dirty-bitmap:pull"), 1)
    c = Client(srv.socket).connect(f"guest@{name}")
    for off, n in dirty:
        pos = off
        while pos < off + n:
            take = min(off + n - pos, 8 * MiB)
            target[pos:pos + take] = c.read(pos, take)
            pos += take
    c.close()
    raw = os.path.join(work, f"{name}.raw")
    run("nbdcopy", uri, raw)
    with open(raw, "rb") as f:
        assert bytes(target) == f.read(), f"{name}: the copy from the dirty extents differs from the snapshot"
    os.unlink(raw)
    cid = next(s["change_id"] for s in json.loads(cli("snapshot", "list", img, "--output", "json"))
               if s["name"] == name)
    cli("consumer", "update", img, "pull", cid)
    cli("snapshot", "delete", img, name)
    return sum(n for _, n in dirty)


def restore(chain, target):
    vdisk.restore([str(c) for c in chain], str(target), format="raw", overwrite=True)
    with open(target, "rb") as f:
        return f.read()


@pytest.mark.skipif(not (shutil.which("e2fsck") and shutil.which("debugfs")), reason="needs e2fsprogs")
def test_backups_while_a_guest_writes(vm, tmp_path, monkeypatch):
    sockdir = tempfile.mkdtemp(prefix="vl-")
    monkeypatch.setenv("VDISK_RUNTIME_DIR", os.path.join(sockdir, "run"))
    img = str(tmp_path / "guest.vdk")
    with vdisk.create(img, SIZE, block_size=64 * 1024) as d:
        for c in ("a", "b", "c", "pull"):
            d.consumers.register(c)
    srv = ServeProcess(img, os.path.join(sockdir, "s"), "--export", "guest")
    result = {}

    def boot():
        try:
            result["run"] = vm.boot(guest.Nbd(srv.socket, "guest"), SCRIPT, timeout=400)
        except Exception as exc:            # noqa: BLE001 - raised below
            result["error"] = exc
    t = threading.Thread(target=boot)
    chains = {c: [] for c in "abc"}
    target = bytearray(SIZE)
    pulled = []
    try:
        t.start()
        rnd = 0
        while t.is_alive() and rnd < 30:
            for c, every in (("a", 1), ("b", 2), ("c", 3)):
                if rnd % every == 0:
                    dest = tmp_path / f"{c}{rnd}.vdelta"
                    cli("backup", img, dest, "--consumer", c, "--compression", "lzf")
                    chains[c].append(dest)
            pulled.append(pull_round(img, srv, f"p{rnd}", target, tmp_path))
            rnd += 1
            time.sleep(1)
        t.join(400)
        assert "error" not in result, result.get("error")
        g = result["run"]
        assert g.rc == 0 and "guest-done" in g.output, g.output
        assert rnd >= 3, f"only {rnd} rounds while the guest ran"
        for c in "abc":                      # the guest is done: one more each
            dest = tmp_path / f"{c}-last.vdelta"
            cli("backup", img, dest, "--consumer", c)
            chains[c].append(dest)
        pulled.append(pull_round(img, srv, "plast", target, tmp_path))
    finally:
        t.join(400)
        assert srv.stop() == 0
        shutil.rmtree(sockdir, ignore_errors=True)
    with vdisk.open(img) as d:
        final = d.pread(SIZE, 0)
        assert d.snapshots == []
    assert bytes(target) == final
    sums = guest.parse_sums(g.output)
    assert "big" in sums and len(sums) >= 3, g.output
    for c, chain in chains.items():
        for i in range(1, len(chain)):
            restore(chain[:i], tmp_path / "prefix.raw")      # every prefix is a chain that restores
        raw = tmp_path / f"{c}-last.raw"
        assert restore(chain, raw) == final, f"consumer {c}: the last restore differs from the image"
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True, timeout=120)
        assert fsck.returncode == 0, f"consumer {c}: e2fsck -fn: {fsck.stdout}{fsck.stderr}"
        for name, want in sums.items():
            out = subprocess.run(["debugfs", "-R", f"cat /{name}", str(raw)], capture_output=True, timeout=60)
            assert hashlib.sha256(out.stdout).hexdigest() == want, f"consumer {c}: /{name} differs"
        os.unlink(raw)
    print(f"guest {g.seconds:.1f} s, {len(chains['a'])} backups of a, pull rounds copied {pulled}")
