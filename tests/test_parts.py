"""The Disk's parts (docs/ARCHITECTURE.md): calls go down only.

Static checks of the module boundaries, and the one run-time property the
split must keep: the parts hold the Disk only weakly, so a dropped Disk
closes (flushes, unlocks) at once, without waiting for the cycle collector.
"""
from __future__ import annotations

import ast
import gc
import os
import re

import vdisk

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vdisk")

# the Disk's parts and the layers under them: none may import the Disk's module
PARTS = ["allocator.py", "blocktable.py", "snapshot_ops.py", "header.py", "snapshots.py", "consumers.py",
         "tracking.py", "arrays.py", "layout.py", "fileio.py", "extents.py", "errors.py"]


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth, outside
    ``if TYPE_CHECKING:`` blocks (those never run)."""
    tree = ast.parse(open(path).read())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}".replace("..", ".")) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_no_part_imports_the_disk():
    parts = [name for name in PARTS if os.path.exists(os.path.join(PKG, name))]
    found = [f"{name}:{line} imports {mod}" for name in parts for line, mod in _imports(os.path.join(PKG, name))
             if mod in (".disk", "vdisk.disk") or mod.startswith((".disk.", "vdisk.disk."))]
    assert not found, found


def test_nothing_outside_disk_py_names_the_disks_private_state():
    """No module but disk.py reaches into a Disk: ``disk._x``, ``self._disk._x``."""
    pattern = re.compile(r"\b(?:disk|_disk|d)\._[a-z]\w*")
    found = []
    for root, _dirs, files in os.walk(PKG):
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".py") or path == os.path.join(PKG, "disk.py"):
                continue
            for i, line in enumerate(open(path), 1):
                code = line.split("#", 1)[0]
                found += [f"{os.path.relpath(path, PKG)}:{i}: {m}" for m in pattern.findall(code)]
    assert not found, found


def test_a_dropped_disk_closes_at_once(tmp_path):
    """The parts call back into the Disk through weak references: with the
    cycle collector off, dropping the last reference closes the Disk (its
    write flushed, its exclusive lock released)."""
    path = str(tmp_path / "d.vdk")
    vdisk.create(path, "1MiB").close()
    gc.disable()
    try:
        d = vdisk.open(path, "r+")
        d.snapshot("s")                 # the snapshot operations and the allocator are in use
        d.pwrite(b"gone", 0)
        del d
        with vdisk.open(path, "r+") as again:        # the lock is free: the Disk closed
            assert again.pread(4, 0) == b"gone"
    finally:
        gc.enable()


def _cython_sources() -> list[str]:
    return sorted(os.path.join(PKG, n) for n in os.listdir(PKG) if n.endswith(".pyx"))


def test_the_cython_layer_never_names_the_disks_private_state():
    """One-way boundary (docs/ARCHITECTURE.md, "The hot path"): the Cython
    code knows arrays, a descriptor and callables.  It reads no private
    attribute of any object but its own (``self._x``), names no Disk method
    and never looks a private name up by string."""
    access = re.compile(r"\b(?!self\b)[A-Za-z_]\w*\._[a-z]\w*")
    disk_names = re.compile(r"\b_(?:pread_slow|pwrite_slow|fold_due|hot|rebind_hot|io|bt|alloc|tracker|hdr)\b")
    by_string = re.compile(r"getattr\([^)]*[\"']_")
    found = []
    for path in _cython_sources():
        for i, line in enumerate(open(path), 1):
            code = line.split("#", 1)[0]
            bare = re.sub(r"\"[^\"]*\"|'[^']*'", '""', code)      # names in messages are no access
            for rx, text in ((access, bare), (disk_names, bare), (by_string, code)):
                found += [f"{os.path.basename(path)}:{i}: {m}" for m in rx.findall(text)]
    assert _cython_sources() and not found, found
