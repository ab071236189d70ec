"""End-to-end demo: ``python -m vdisk.demo [DIR]``.

Creates an image, writes, reads back, tracks changes across a checkpoint,
shows info and map, and checks the image.  Exits non-zero if anything
does not hold.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import vdisk


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as tmp:
        directory = argv[0] if argv else tmp
        path = os.path.join(directory, "demo.vdk")
        print(f"create {path}: 10 GiB virtual, 64 KiB blocks")
        with vdisk.create(path, "10GiB", block_size="64KiB", overwrite=True) as d:
            d.pwrite(b"boot sector".ljust(512, b"\0"), 0)
            d.pwrite(os.urandom(1 << 20), 1 << 30)          # 1 MiB at 1 GiB
            d.pwrite(bytes(1 << 20), 2 << 30)               # zeros: allocates nothing
            d.flush()
            assert d.pread(11, 0) == b"boot sector"
            print(f"wrote 3 regions; allocated {d.map().nbytes} bytes of 10 GiB (zeros took no space)")
            cid = d.checkpoint()
            print(f"checkpoint -> change id {cid}")
            d.pwrite(b"changed", (1 << 30) + 70000)
            d.pwrite(b"new data", 5 << 30)
            changed = d.changes_since(cid)
            print(f"changes since it: {[(o, n) for o, n in changed]} ({changed.nbytes} bytes to back up)")
            assert changed.nbytes == 2 * d.block_size
        with vdisk.open(path) as d:
            info = d.info()
            print("info:", json.dumps({k: info[k] for k in ("virtual_size", "block_size", "allocated_bytes",
                                                             "file_size", "generation", "change_id")}))
            assert d.pread(7, (1 << 30) + 70000) == b"changed"
        result = vdisk.check(path)
        print(f"check: ok={result.ok} corruptions={len(result.corruptions)} leaks={result.leaked_blocks}")
        if not result.ok:
            return 1
        print(f"image file: {os.path.getsize(path)} bytes apparent, "
              f"{os.stat(path).st_blocks * 512} bytes on disk")
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
