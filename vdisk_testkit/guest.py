"""A real Linux guest under TCG, for tests that want a kernel's block layer
on the far side of a disk (an NBD export, or a plain raw file).

What it needs, and where it gets it:

* the kernel: Debian's cloud kernel, found unpacked in the cache directory
  (``$VDISK_GUEST_CACHE``, else ``~/.cache/vdisk-guest``) or fetched there
  with ``apt-get download`` (the ``linux-image-cloud-amd64`` metapackage is
  resolved to the real ``linux-image-<ver>-cloud-amd64`` package with
  ``apt-cache depends``) and unpacked with ``dpkg -x``;
* the modules a virtio-blk disk on q35 needs (virtio_pci, virtio_blk and what
  they depend on), found by reading each module's ``.modinfo`` section: the
  package ships no modules.dep, depmod writes it at install time.  ext4
  (which mounts ext2) and its helpers are built in, in this kernel; if
  another kernel has them as modules they are loaded too;
* busybox-static, as /bin/busybox of a cpio.gz initramfs (written here in
  the newc format, so nothing needs root or fakeroot) whose /init mounts
  /proc, /sys and /dev, loads the modules, waits for /dev/vda, runs the test's
  script (a second, uncompressed cpio archive appended to the initramfs for
  each boot: the kernel unpacks concatenated archives), prints its output
  on the serial console between two markers and powers off (``poweroff -f``);
* qemu-system-x86_64 with ``-machine q35,accel=tcg`` (never KVM), the disk as
  a virtio-blk drive with ``cache=none`` (so the guest's syncs reach the
  server as flushes).

Every boot is time-limited; on a timeout qemu is killed by its pid and the
console so far is in the exception.  ``available()`` says why a guest cannot
be had (no qemu, no busybox, the kernel cannot be fetched); tests skip with
that reason.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
QEMU = "qemu-system-x86_64"
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
# what the initramfs loads (with their dependencies), if the kernel has them as modules
WANTED_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic")
BEGIN = "@@vdisk-guest-begin@@"
END = "@@vdisk-guest-end rc="
# console=ttyS0: the output; panic=-1: a panic reboots, which -no-reboot turns into an exit;
# the rest shortens a TCG boot (no probing of absent keyboard/mouse controllers, no mitigations).
KERNEL_ARGS = ("console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off i8042.noaux i8042.nokbd "
               "i8042.nopnp i8042.dumbkbd random.trust_cpu=on tsc=reliable no_timer_check rdinit=/init")


class GuestUnavailable(Exception):
    """A guest cannot be booted here; the message says what is missing."""


class GuestError(AssertionError):
    """A boot failed, timed out or printed no result; the message holds the console tail."""


# ---------------------------------------------------------------------------- the kernel
def cache_dir() -> str:
    d = os.environ.get("VDISK_GUEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vdisk-guest")
    os.makedirs(d, exist_ok=True)
    return d


@dataclasses.dataclass(frozen=True)
class Kernel:
    version: str           # e.g. 6.1.0-57-cloud-amd64
    vmlinuz: str
    moddir: str            # .../lib/modules/<version>


def _run(cmd: list[str], timeout: float = 300, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def resolve_kernel_package() -> str:
    """The real linux-image-<ver>-cloud-amd64 package the metapackage depends on (the newest candidate)."""
    if shutil.which("apt-cache") is None:
        raise GuestUnavailable("no apt-cache: cannot find Debian's cloud kernel package")
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    pkgs = re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*-cloud-amd64)\b", out.stdout)
    if out.returncode or not pkgs:
        raise GuestUnavailable(f"apt-cache depends {KERNEL_METAPACKAGE} names no linux-image-<ver>-cloud-amd64 "
                               f"package (exit {out.returncode}: {out.stderr.strip()[-200:]}); "
                               f"run apt-get update")
    return pkgs[0]


def _unpacked(root: str) -> Kernel | None:
    vmlinuz = sorted(glob.glob(os.path.join(root, "boot", "vmlinuz-*")))
    if not vmlinuz:
        return None
    version = os.path.basename(vmlinuz[-1])[len("vmlinuz-"):]
    moddir = os.path.join(root, "lib", "modules", version)
    if not os.path.isdir(moddir):
        moddir = os.path.join(root, "usr", "lib", "modules", version)
    if not os.path.isdir(moddir):
        return None
    return Kernel(version, vmlinuz[-1], moddir)


def _download(pkg: str, where: str) -> str:
    """apt-get download PKG into `where`; on failure (no lists, stale lists) one apt-get update and a retry."""
    for attempt in range(2):
        out = _run(["apt-get", "download", "-q", pkg], cwd=where)
        debs = glob.glob(os.path.join(where, f"{pkg}_*.deb"))
        if out.returncode == 0 and debs:
            return debs[0]
        if attempt == 0 and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"], timeout=600)
    raise GuestUnavailable(f"apt-get download {pkg} failed: {out.stderr.strip()[-300:]}")


def find_kernel() -> Kernel:
    """The cloud kernel, unpacked in the cache directory (fetched there on first use)."""
    base = cache_dir()
    try:
        pkg = resolve_kernel_package()
    except GuestUnavailable as e:                  # offline: any kernel unpacked earlier will do
        for root in sorted(glob.glob(os.path.join(base, "linux-image-*")), reverse=True):
            k = _unpacked(root)
            if k:
                return k
        raise e
    root = os.path.join(base, pkg)
    k = _unpacked(root)
    if k:
        return k
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise GuestUnavailable("no apt-get/dpkg to fetch and unpack the kernel")
    tmp = tempfile.mkdtemp(prefix=f".{pkg}-", dir=base)
    try:
        deb = _download(pkg, tmp)
        out = _run(["dpkg", "-x", deb, os.path.join(tmp, "root")])
        if out.returncode:
            raise GuestUnavailable(f"dpkg -x {deb} failed: {out.stderr.strip()[-300:]}")
        if _unpacked(os.path.join(tmp, "root")) is None:
            raise GuestUnavailable(f"{pkg} holds no boot/vmlinuz-* with its lib/modules directory")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(os.path.join(tmp, "root"), root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    k = _unpacked(root)
    assert k is not None
    return k


# ---------------------------------------------------------------------------- modules
def _module_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        import zstandard      # a test extra
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
    return data


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    out: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] != b".modinfo":
            continue
        for item in data[off:off + size].split(b"\0"):
            if b"=" in item:
                k, v = item.decode("utf-8", "replace").split("=", 1)
                out.setdefault(k, []).append(v)
    return out


def module_index(moddir: str) -> dict[str, str]:
    """Module name (dashes as underscores, as the kernel names them) -> its file, for every module."""
    index = {}
    for path in glob.glob(os.path.join(moddir, "kernel", "**", "*.ko*"), recursive=True):
        base = os.path.basename(path)
        index[base[:base.index(".ko")].replace("-", "_")] = path
    return index


def module_closure(moddir: str, wanted=WANTED_MODULES) -> list[tuple[str, bytes]]:
    """(file name, contents) of the wanted modules that exist as modules, with
    their dependencies, in load order (dependencies first).  Built-in ones
    (listed in modules.builtin, or simply absent) need nothing."""
    index = module_index(moddir)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]):
        name = name.replace("-", "_")
        if name in seen or name not in index:
            return
        if name in chain:
            raise GuestUnavailable(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        data = _module_bytes(index[name])
        for dep in ",".join(modinfo(data).get("depends", [])).split(","):
            if dep:
                visit(dep, chain + (name,))
        seen.add(name)
        order.append((name + ".ko", data))

    for name in wanted:
        visit(name, ())
    return order


# ---------------------------------------------------------------------------- initramfs
def _newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (name, mode, data, rdev) entries, owned by root, ending in TRAILER!!!."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data, rdev in entries + [("TRAILER!!!", 0, b"", 0)]:
        nm = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{x:08X}" for x in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(nm), 0))
        out.write(hdr.encode() + nm)
        out.write(b"\0" * (-(110 + len(nm)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m || echo "vdisk-guest: insmod $m failed"
done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do usleep 20000; n=$((n+1)); done
echo "@@vdisk-guest-begin@@"
sh /guest/script.sh 2>&1
echo "@@vdisk-guest-end rc=$?@@"
sync
poweroff -f
"""


def find_busybox() -> str:
    for p in BUSYBOX_PATHS:
        if os.path.exists(p):
            with open(p, "rb") as f:
                head = f.read(4096)
            if head[:4] == b"\x7fELF" and b"ld-linux" not in head and b"/lib64/ld" not in head:
                return p
    raise GuestUnavailable("no static busybox (apt-get install busybox-static)")


def build_initramfs(kernel: Kernel, busybox: str) -> str:
    """The base initramfs (busybox, modules, /init), cached by content."""
    modules = module_closure(kernel.moddir)
    with open(busybox, "rb") as f:
        bb = f.read()
    key = hashlib.sha256(INIT.encode() + bb + b"".join(n.encode() + d for n, d in modules)).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"initramfs-{kernel.version}-{key}.cpio.gz")
    if os.path.exists(path):
        return path
    d, f, c = stat.S_IFDIR | 0o755, stat.S_IFREG, stat.S_IFCHR | 0o600
    entries = [(p, d, b"", 0) for p in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules", "guest")]
    entries += [("dev/console", c, b"", os.makedev(5, 1)), ("dev/ttyS0", c, b"", os.makedev(4, 64)),
                ("bin/busybox", f | 0o755, bb, 0), ("bin/sh", stat.S_IFLNK | 0o777, b"busybox", 0),
                ("init", f | 0o755, INIT.encode(), 0),
                ("lib/modules/order", f | 0o644, "".join(n + "\n" for n, _ in modules).encode(), 0)]
    entries += [(f"lib/modules/{n}", f | 0o644, data, 0) for n, data in modules]
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(gzip.compress(_newc(entries), compresslevel=6, mtime=0))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- booting
@dataclasses.dataclass(frozen=True)
class Nbd:
    """An NBD export on a Unix socket, as the guest's disk."""
    socket: str
    export: str = ""

    def drive(self) -> str:
        uri = f"nbd+unix:///{self.export}?socket={self.socket}"
        return f"file={uri.replace(',', ',,')},format=raw,if=virtio,cache=none"


@dataclasses.dataclass(frozen=True)
class RawFile:
    path: str

    def drive(self) -> str:
        return f"file={self.path.replace(',', ',,')},format=raw,if=virtio,cache=none"


@dataclasses.dataclass
class GuestRun:
    rc: int                # the script's exit status, as /init printed it
    output: str            # what the script printed (between the markers)
    console: str           # the whole serial console
    seconds: float         # qemu start to exit


@dataclasses.dataclass(frozen=True)
class Guest:
    kernel: Kernel
    initramfs: str

    def boot(self, disk, script: str, timeout: float = 120, memory: str = "512") -> GuestRun:
        """Boot with `disk` (Nbd or RawFile) as /dev/vda, run `script` (busybox sh), return its output.
        Raises GuestError when qemu fails, times out, or the script's end marker is missing."""
        work = tempfile.mkdtemp(prefix="vdisk-guest-")
        try:
            initrd = os.path.join(work, "initrd")
            with open(self.initramfs, "rb") as src, open(initrd, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.write(b"\0" * (-dst.tell() % 4))
                dst.write(_newc([("guest", stat.S_IFDIR | 0o755, b"", 0),
                                 ("guest/script.sh", stat.S_IFREG | 0o755, script.encode(), 0)]))
            cmd = [QEMU, "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "1", "-m", memory,
                   "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                   "-kernel", self.kernel.vmlinuz, "-initrd", initrd, "-append", KERNEL_ARGS,
                   "-drive", disk.drive()]
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                out, _ = proc.communicate()
                raise GuestError(f"guest did not power off within {timeout} s; console tail:\n"
                                 f"{_tail(out)}") from None
            finally:
                if proc.poll() is None:
                    os.kill(proc.pid, 9)
                    proc.wait()
            seconds = time.monotonic() - t0
        finally:
            shutil.rmtree(work, ignore_errors=True)
        console = out.decode("utf-8", "replace").replace("\r\n", "\n")
        m = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END) + r"(\d+)@@", console, re.S)
        if proc.returncode != 0 or not m:
            raise GuestError(f"qemu exited {proc.returncode} after {seconds:.1f} s "
                             f"{'with' if m else 'without'} the script's end marker; console tail:\n"
                             f"{_tail(out)}")
        return GuestRun(int(m.group(2)), m.group(1), console, seconds)


def _tail(out: bytes, n: int = 3000) -> str:
    return out.decode("utf-8", "replace")[-n:]


_GUEST: Guest | None = None


def available() -> Guest:
    """The guest (kernel fetched and initramfs built on first use), or GuestUnavailable saying why not."""
    global _GUEST
    if _GUEST is None:
        if shutil.which(QEMU) is None:
            raise GuestUnavailable(f"no {QEMU} (apt-get install qemu-system-x86)")
        busybox = find_busybox()
        kernel = find_kernel()
        _GUEST = Guest(kernel, build_initramfs(kernel, busybox))
    return _GUEST


def parse_sums(output: str) -> dict[str, str]:
    """path -> sha256 from `sha256sum` lines in a script's output."""
    return {m.group(2): m.group(1) for m in re.finditer(r"^([0-9a-f]{64})\s+(\S+)$", output, re.M)}
