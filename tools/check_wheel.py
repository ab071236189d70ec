#!/usr/bin/env python3
"""Check a built wheel ships the Cython sources and stubs, not the generated C.

    pip wheel . -w /tmp/whl --no-deps && python tools/check_wheel.py /tmp/whl/vdisk-*.whl

Every extension module (vdisk/*.pyx in the source tree) must be in the
wheel as its .pyx, its .pyi stub and a compiled module; no .c file may be.
Exit status 1 with one line per problem otherwise (.ci/run calls this).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problems(wheel: str) -> list[str]:
    names = set(zipfile.ZipFile(wheel).namelist())
    out = [f"{wheel}: ships generated C source {n}" for n in sorted(names) if n.endswith(".c")]
    for pyx in sorted(glob.glob(os.path.join(ROOT, "vdisk", "*.pyx"))):
        mod = os.path.splitext(os.path.basename(pyx))[0]
        for want in (f"vdisk/{mod}.pyx", f"vdisk/{mod}.pyi"):
            if want not in names:
                out.append(f"{wheel}: {want} missing")
        if not any(n.startswith(f"vdisk/{mod}.") and n.endswith((".so", ".pyd")) for n in names):
            out.append(f"{wheel}: no compiled vdisk/{mod} module")
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Check that a built wheel ships the .pyx and .pyi of every "
                                             "extension module and a compiled module, and no generated C.")
    ap.add_argument("wheel", help="the .whl file (pip wheel . -w DIR --no-deps)")
    wheel = ap.parse_args(argv).wheel
    found = problems(wheel)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
