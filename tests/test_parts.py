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
from pathlib import Path

import vdisk

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vdisk")

# the Disk's parts and the layers under them: none may import the Disk's module
PARTS = ["allocator.py", "blocktable.py", "snapshot_ops.py", "header.py", "snapshots.py", "consumers.py",
         "tracking.py", "arrays.py", "layout.py", "fileio.py", "extents.py", "errors.py"]


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth, outside
    ``if TYPE_CHECKING:`` blocks (those never run)."""
    tree = ast.parse(Path(path).read_text())
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
            for i, line in enumerate(Path(path).read_text().splitlines(), 1):
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
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            bare = re.sub(r"\"[^\"]*\"|'[^']*'", '""', code)      # names in messages are no access
            for rx, text in ((access, bare), (disk_names, bare), (by_string, code)):
                found += [f"{os.path.basename(path)}:{i}: {m}" for m in rx.findall(text)]
    assert _cython_sources() and not found, found


def _module_graph() -> dict[str, set[str]]:
    """vdisk module -> the vdisk modules it imports (at any depth, TYPE_CHECKING
    blocks left out), by dotted name; a package stands for its __init__."""
    modules = {}
    for root, _dirs, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                modules[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, name)

    def known(name: str) -> str:          # 'vdisk.errors.VdiskError' -> 'vdisk.errors'
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        tree = ast.parse(Path(path).read_text())
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # 'from . import x': module x if there is one, else a name of the package
                deps.update(known(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else known(base)
                            for a in node.names)
        graph[mod] = {d for d in deps if d.startswith("vdisk") and d != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_vdisk_modules():
    """No two vdisk modules import each other, directly or round a loop, with
    imports at any depth counted: a function-level import that only hides a
    circle is a circle.  (The package's lazy names go through importlib and
    are no import; ``from . import __version__`` imports the package.)"""
    graph = _module_graph()
    assert "vdisk.disk" in graph["vdisk.convert"] and "vdisk.errors" in graph["vdisk.disk"]
    assert _cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_qcow2_is_split_by_concern():
    """vdisk.qcow2 as dissect.hypervisor splits it: the structures (no I/O)
    apart from the reader, the compressed-cluster code, the writer and the
    updater (convert -n); the writer and the compressed-cluster code know
    nothing of the reader, and the reader nothing of the updater over it."""
    graph = _module_graph()
    q = {m for m in graph if m.startswith("vdisk.qcow2.")}
    assert q == {"vdisk.qcow2.structures", "vdisk.qcow2.backing", "vdisk.qcow2.compressed", "vdisk.qcow2.reader",
                 "vdisk.qcow2.writer", "vdisk.qcow2.updater"}
    assert "vdisk.qcow2.updater" not in graph["vdisk.qcow2.reader"] | graph["vdisk.qcow2.writer"]
    assert graph["vdisk.qcow2.structures"] <= {"vdisk.errors"}
    assert "vdisk.qcow2.reader" not in graph["vdisk.qcow2.writer"] | graph["vdisk.qcow2.compressed"]
    assert "vdisk.fileio" not in graph["vdisk.qcow2.structures"]


def test_files_are_put_in_place_by_fileio_only():
    """Every temp-then-place copy is fileio.atomic_output: no other module
    renames, links or places files.  Two exceptions, each with its reason:
    the delta writer (delta.py) holds an flock on its partial file from
    creation to placing, so a later backup can tell an abandoned partial
    from a live one, and the control server renames a socket."""
    allowed = {("delta.py", "place_synced("), ("nbd/control.py", "os.rename(")}
    found = []
    for root, _dirs, files in os.walk(PKG):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, PKG)
            if not name.endswith(".py") or rel == "fileio.py":
                continue
            for i, line in enumerate(Path(path).read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                for call in ("os.replace(", "os.rename(", "os.link(", "place_synced(", " place(", "os.renames("):
                    if call in code and (rel, call) not in allowed:
                        found.append(f"{rel}:{i}: {code.strip()}")
    assert not found, found
