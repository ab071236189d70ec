"""A real Linux guest (vdisk_testkit/guest.py: Debian's cloud kernel under TCG) on an NBD export.

The guest makes an ext2 file system (busybox mke2fs) on its virtio-blk disk,
writes files, syncs, unmounts and powers off, printing the files' sha256.
Then, on the host:

* the dirty bitmap the server offers for the consumer
  (``nbdinfo --map=qemu:dirty-bitmap:NAME``) covers every block whose content
  differs between before and after the guest ran;
* the consumer's incremental backup, restored after its full backup
  (``vdisk restore -O raw``), is the image's content byte for byte, a file
  system ``e2fsck -fn`` accepts, and its files (read with
  ``debugfs -R 'cat PATH'``) have the checksums the guest printed.

The image is not empty before the guest runs (a pattern in every 7th
block), so the restore must keep what the guest left alone, and "differs"
is not simply "not zero".  The same workload through qemu-nbd serving a
qcow2 with a persistent bitmap is the control: it shows that the checks
themselves hold against the peer.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import vdisk
from vdisk_testkit import guest, nbdserve
from vdisk_testkit.helpers import pattern

SIZE = 64 << 20
BS = 64 << 10
CONSUMER = "guest"
EXPORT = "guest-disk"

SCRIPT = r"""set -e
mke2fs -F -b 4096 -L vdisk-guest /dev/vda >/dev/null
mount -t ext2 /dev/vda /mnt
mkdir -p /mnt/dir/sub
dd if=/dev/urandom of=/mnt/big bs=64k count=48 2>/dev/null
dd if=/dev/urandom of=/mnt/dir/small bs=1000 count=1 2>/dev/null
dd if=/dev/urandom of=/mnt/dir/sub/mid bs=4k count=37 2>/dev/null
echo "hello from the guest" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/sparse bs=4k count=3 seek=1000 2>/dev/null
dd if=/dev/urandom of=/mnt/big bs=4k count=5 seek=100 conv=notrunc 2>/dev/null
sync
cd /mnt
sha256sum big dir/small dir/sub/mid hello.txt sparse
cd /
umount /mnt
echo guest-done
"""
FILES = ("big", "dir/small", "dir/sub/mid", "hello.txt", "sparse")


@pytest.fixture(scope="module")
def vm():
    try:
        return guest.available()
    except guest.GuestUnavailable as e:
        pytest.skip(f"no TCG guest: {e}")


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="vg-")       # short: a Unix socket path has at most 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def prefill() -> bytes:
    """What the disk holds before the guest: a pattern in every 7th block, zeros elsewhere."""
    buf = bytearray(SIZE)
    for b in range(0, SIZE // BS, 7):
        buf[b * BS:(b + 1) * BS] = pattern(b, BS)
    return bytes(buf)


def changed_blocks(before: bytes, after: bytes) -> set[int]:
    a = np.frombuffer(before, np.uint8).reshape(-1, BS)
    b = np.frombuffer(after, np.uint8).reshape(-1, BS)
    return set(np.flatnonzero((a != b).any(axis=1)).tolist())


def blocks_of_runs(runs) -> set[int]:
    out: set[int] = set()
    for off, length in runs:
        out.update(range(off // BS, -(-(off + length) // BS)))
    return out


def run_guest(vm, srv) -> dict[str, str]:
    run = vm.boot(guest.Nbd(srv.socket, srv.export), SCRIPT, timeout=180)
    print(f"guest boot, script and power-off: {run.seconds:.2f} s")
    assert run.rc == 0 and "guest-done" in run.output, run.output
    sums = guest.parse_sums(run.output)
    assert sorted(sums) == sorted(FILES), run.output
    return sums


def check_filesystem(raw: str, sums: dict[str, str]) -> None:
    """e2fsck -fn accepts `raw`, and each file read back with debugfs has the guest's checksum."""
    fsck = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, f"e2fsck -fn {raw}: exit {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
    for name, want in sums.items():
        out = subprocess.run(["debugfs", "-R", f"cat /{name}", raw], capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert hashlib.sha256(out.stdout).hexdigest() == want, f"/{name} read back from {raw} differs"


def read_raw(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.skipif(not nbdserve.vdisk_has_serve(), reason="vdisk serve (vdisk/nbd/) is not in this checkout")
@pytest.mark.skipif(not (nbdserve.have("nbdinfo") and nbdserve.have("e2fsck") and nbdserve.have("debugfs")),
                    reason="needs nbdinfo (libnbd-bin) and e2fsck/debugfs (e2fsprogs)")
def test_guest_on_vdisk_serve(vm, tmp_path, sockdir):
    img = str(tmp_path / "guest.vdk")
    before = prefill()
    with vdisk.create(img, SIZE, block_size=BS) as d:
        for b in range(0, SIZE // BS, 7):
            d.pwrite(before[b * BS:(b + 1) * BS], b * BS)
        d.flush()
        d.consumers.register(CONSUMER)
        full = vdisk.backup(d, str(tmp_path / "full.h5"), consumer=CONSUMER)

    with nbdserve.vdisk_serve(img, os.path.join(sockdir, "s"), EXPORT) as srv:
        sums = run_guest(vm, srv)
        dirty = blocks_of_runs(nbdserve.dirty_extents(srv.uri, f"qemu:dirty-bitmap:{CONSUMER}"))
    # the server is stopped: the image is ours again
    with vdisk.open(img) as d:
        after = d.pread(SIZE, 0)
    changed = changed_blocks(before, after)
    assert len(changed) > 10, "the guest changed (almost) nothing: the test would prove nothing"
    missing = sorted(changed - dirty)
    assert not missing, f"the dirty bitmap misses {len(missing)} changed blocks, first {missing[:10]}"

    inc = vdisk.backup(img, str(tmp_path / "inc.h5"), consumer=CONSUMER)
    assert inc.since == full.change_id
    restored = str(tmp_path / "restored.raw")
    cli = subprocess.run([sys.executable, "-m", "vdisk", "restore", restored, full.dest, inc.dest, "-O", "raw"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert read_raw(restored) == after
    check_filesystem(restored, sums)


@pytest.mark.skipif(not (nbdserve.have("qemu-nbd") and nbdserve.have("qemu-img") and nbdserve.have("nbdinfo")
                         and nbdserve.have("e2fsck") and nbdserve.have("debugfs")),
                    reason="needs qemu-nbd/qemu-img (qemu-utils), nbdinfo (libnbd-bin), e2fsprogs")
def test_guest_on_qemu_nbd_control(vm, tmp_path, sockdir):
    """The same guest and checks through qemu-nbd: a qcow2 with a persistent bitmap added after the prefill."""
    raw = str(tmp_path / "before.raw")
    before = prefill()
    with open(raw, "wb") as f:
        f.write(before)
    q = str(tmp_path / "guest.qcow2")
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", raw, q],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(BS), q, CONSUMER], check=True)
    with nbdserve.qemu_nbd(q, os.path.join(sockdir, "s"), EXPORT, bitmap=CONSUMER) as srv:
        sums = run_guest(vm, srv)
        dirty = blocks_of_runs(nbdserve.dirty_extents(srv.uri, f"qemu:dirty-bitmap:{CONSUMER}"))
    after_raw = str(tmp_path / "after.raw")
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", q, after_raw], check=True)
    changed = changed_blocks(before, read_raw(after_raw))
    assert len(changed) > 10
    assert not sorted(changed - dirty)
    check_filesystem(after_raw, sums)
