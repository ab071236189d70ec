"""vdisk_testkit/ is the one place tests/ and tools/ share code through.

Nothing under tests/, tools/ or vdisk_testkit/ puts a directory on the
import path (PATH_TRICKS below) or loads a module from a file path: every shared simulator, model, helper and fuzz
harness is imported as ``vdisk_testkit.NAME``, which the README's install
command makes importable.  And every tool still starts from anywhere.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("tests", "tools", "vdisk_testkit")

# Ways to reach a module by its path rather than by its package name.
PATH_TRICKS = {
    "sys.path": re.compile(r"\bsys\s*\.\s*path\b"),
    "PYTHONPATH set": re.compile(r"""["']PYTHONPATH["']|\bPYTHONPATH\s*=\s*[^<\s]"""),
    "site.addsitedir": re.compile(r"\baddsitedir\b"),
    "a module loaded from its file": re.compile(r"\bspec_from_file_location\b|\bSourceFileLoader\b|\brunpy\b"),
}


def sources(root: str = ROOT) -> list[str]:
    """The Python files of tests/, tools/ and vdisk_testkit/ but this one (which names the tricks)."""
    out = []
    for top in SHARED:
        out += glob.glob(os.path.join(root, top, "**", "*.py"), recursive=True)
    return sorted(p for p in out if os.path.abspath(p) != os.path.abspath(__file__))


def path_tricks(root: str = ROOT) -> list[str]:
    """'file:line: what' for every path trick in the shared sources (code, docstrings and the
    source of child processes kept in strings alike)."""
    found = []
    for path in sources(root):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                for what, pattern in PATH_TRICKS.items():
                    if pattern.search(line):
                        found.append(f"{os.path.relpath(path, root)}:{n}: {what}: {line.strip()}")
    return found


def test_no_import_path_manipulation():
    found = path_tricks()
    assert not found, ("import it from vdisk_testkit instead (vdisk_testkit/__init__.py):\n"
                       + "\n".join(found))


def test_the_scan_sees_each_trick(tmp_path):
    """The scan is not blind: one line of each kind, in a tests/ file, is found."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import sys, os\n"
        "sys.path.insert(0, os.path.dirname(__file__))\n"
        'env = dict(os.environ, PYTHONPATH="/x")\n'
        'env["PYTHONPATH"] = "/x"\n'
        "site.addsitedir('/x')\n"
        "importlib.util.spec_from_file_location('m', '/x/m.py')\n"
        "'''Run it with ``PYTHONPATH=<copy>`` (words, not code).'''\n")
    found = path_tricks(str(tmp_path))
    assert [f.split(":")[1] for f in found] == ["2", "3", "4", "5", "6"], found


def test_every_testkit_module_imports_from_anywhere(tmp_path):
    """In a fresh interpreter started elsewhere (no test directory on the path), every module of
    vdisk_testkit imports by its package name."""
    names = sorted("vdisk_testkit." + os.path.relpath(p, ROOT)[len("vdisk_testkit/"):-3].replace("/", ".")
                   for p in glob.glob(os.path.join(ROOT, "vdisk_testkit", "**", "*.py"), recursive=True)
                   if not p.endswith("__init__.py"))
    assert "vdisk_testkit.crashsim" in names and "vdisk_testkit.fuzz.fuzz_vdisk" in names
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok')"
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (
        "vdisk_testkit does not import: install as the README says "
        "(pip install -e '.[test]' --config-settings editable_mode=compat)\n" + r.stderr[-3000:])


TOOLS = sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")) + [os.path.join(ROOT, "tools", "fuzz", "run.py")])


@pytest.mark.parametrize("tool", TOOLS, ids=[os.path.relpath(t, ROOT) for t in TOOLS])
def test_tool_starts_from_anywhere(tool, tmp_path):
    """`python tools/X.py --help`, run from another directory, prints its usage."""
    r = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-3000:]
