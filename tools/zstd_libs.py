"""Which zstd binding should read qcow2 zstd clusters: zstandard or pyzstd?

Measures, on clusters that qemu-img itself compressed
(``qemu-img convert -c -O qcow2 -o compression_type=zstd``):

* decompression throughput of every compressed cluster of the image, each
  through the way vdisk.qcow2 reads one (output capped at one cluster, then
  the check that the frame ends there), for each binding;
* import time of each binding in a fresh interpreter (median of N runs).

Run: ``python tools/zstd_libs.py [--mib 64] [--cluster 64k] [--repeat 5]``.
Needs qemu-img and both packages (``pip install zstandard pyzstd``).
Prints a table; the figures are in docs/CONVERT.md ("zstd").
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from vdisk import qcow2 as Q


def text_like(nbytes: int, seed: int = 7) -> bytes:
    """Data zstd shrinks about 3:1, never all-zero (words from a small alphabet)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 16, nbytes, dtype=np.uint8) + 97).astype(np.uint8).tobytes()


def compressed_clusters(path: str):
    """(compressed bytes, cluster size) of every compressed cluster of a qcow2 image."""
    img = Q.Qcow2Image(path)
    try:
        g = img.geometry
        out = []
        with open(path, "rb") as f:
            for l1i in range(img._l1_needed):
                entries, _bm, _off = img._l2_table(l1i)
                if entries is None:
                    continue
                for e in entries.tolist():
                    if e & Q.QCOW_OFLAG_COMPRESSED:
                        co, cs = Q.parse_compressed_l2_entry(g, e)
                        f.seek(co)
                        out.append(f.read(cs))
        return out, img.cluster_size
    finally:
        img.close()


def bench(fn, clusters, C, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for data in clusters:
            fn(data, C)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def import_time(module: str, runs: int) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    got = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
           for _ in range(runs)]
    return statistics.median(got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--cluster", default="64k")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vdisk-zstd-") as tmp:
        raw, img = os.path.join(tmp, "src.raw"), os.path.join(tmp, "z.qcow2")
        with open(raw, "wb") as f:
            f.write(text_like(args.mib << 20))
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                        f"compression_type=zstd,cluster_size={args.cluster}", raw, img], check=True)
        clusters, C = compressed_clusters(img)
    total = len(clusters) * C
    ratio = total / sum(len(c) for c in clusters)
    print(f"{len(clusters)} qemu-made zstd clusters of {C} bytes ({args.mib} MiB, ratio {ratio:.2f}:1), "
          f"Python {sys.version.split()[0]}")
    import pyzstd
    import zstandard
    from backports import zstd as bzstd

    zctx = zstandard.ZstdDecompressor(max_window_size=Q.ZSTD_MAX_WINDOW)

    def via_zstandard(data, C):
        # vdisk.qcow2's reader: the frame's end found from its block headers, then a
        # stream reader over that frame, output capped at one cluster
        return Q._zstd_decompress(zctx, data, C)

    def via_zstandard_old(data, C):
        # vdisk 0.1: a stream reader capped at one cluster, no check that the frame ends there
        reader = zctx.stream_reader(data, read_across_frames=True)
        parts, got = [], 0
        while got < C:
            piece = reader.read(C - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def stdlib_api(make, data, C):
        # the same check with the zlib-like API of pyzstd / backports.zstd (compression.zstd):
        # decompress(data, max_length), then eof tells whether the frame ended
        d = make()
        out = d.decompress(data, C)
        if len(out) == C and not d.eof and (d.decompress(b"", 1) or not d.eof):
            raise ValueError("the frame goes on past the cluster")
        return out

    popt = {pyzstd.DParameter.windowLogMax: 22}
    bopt = {bzstd.DecompressionParameter.window_log_max: 22}

    def via_pyzstd(data, C):
        return stdlib_api(lambda: pyzstd.ZstdDecompressor(option=popt), data, C)

    def via_backports(data, C):
        return stdlib_api(lambda: bzstd.ZstdDecompressor(options=bopt), data, C)

    rows = []
    for name, fn, mod in (("zstandard " + zstandard.__version__, via_zstandard, "zstandard"),
                          ("(no frame-end check)", via_zstandard_old, "zstandard"),
                          ("pyzstd " + pyzstd.__version__, via_pyzstd, "pyzstd"),
                          ("backports.zstd", via_backports, "backports.zstd")):
        assert all(len(fn(c, C)) == C for c in clusters[:64])
        t = bench(fn, clusters, C, args.repeat)
        rows.append((name, total / t / (1 << 20), t / len(clusters) * 1e6, import_time(mod, 9) * 1e3))
    print(f"{'binding':<20}{'MiB/s (one thread)':>20}{'us/cluster':>12}{'import ms':>11}")
    for name, mibs, us, imp in rows:
        print(f"{name:<20}{mibs:>20.0f}{us:>12.1f}{imp:>11.1f}")


if __name__ == "__main__":
    main()
