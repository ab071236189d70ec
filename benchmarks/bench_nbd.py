#!/usr/bin/env python3
"""`vdisk serve` against qemu-nbd, with the same clients in the same run, alternating the servers.

    python benchmarks/bench_nbd.py                   # every row, 5 rounds each (about 6 minutes)
    python benchmarks/bench_nbd.py --quick           # 128 MiB, 1 s per fio run, 3 rounds: a smoke run
    python benchmarks/bench_nbd.py --rows randread_qd1,map --rounds 7
    python benchmarks/bench_nbd.py --update-readme   # also write the table into benchmarks/README.md
    python benchmarks/bench_nbd.py --json out.json   # also keep every round's figures

The peer is qemu-nbd serving a qcow2 (64 KiB clusters) with a persistent
dirty bitmap, holding the same content as the vdisk image (64 KiB blocks,
change tracking on, a named consumer registered).  Both servers run on Unix
sockets for the whole run with their defaults (qemu-nbd: cache=writeback,
aio=threads; `vdisk serve`: the page cache), and neither is asked to flush by
the I/O rows (fio sends no FLUSH), so the rows measure the servers' request
paths, not the disk.

Rows: fio's nbd engine (``--ioengine=nbd --uri=nbd+unix:///EXPORT?socket=...``,
one job, one connection) reading and writing 1 MiB sequentially and 4 KiB at
random over the region, at queue depth 1 and 16, each fio run time-based;
and ``nbdinfo --map=qemu:dirty-bitmap:NAME`` of a 1 TiB image (64 KiB
blocks) whose consumer / bitmap has 0.1% of its blocks changed (scattered;
another 0.1% allocated but unchanged), timed from start to exit, output
discarded, five runs per side in each round (``--map-runs``; the round's
figure is their median, the server CPU their mean); and the same map right after an untimed 4 KiB write (the same
bytes again into a changed block: the dirty extents stay, and `vdisk
serve` asks the Disk anew about the written block, as after any write).  Every round runs both servers, one after the other, in
alternating order.  The ratio is vdisk / qemu-nbd throughput (= qemu-nbd
time / vdisk time for the map row), the median of the per-round ratios,
with their range: **> 1 means vdisk is faster**.  Nothing is asserted on a
timing; the map row checks that both servers report the same dirty extents.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import vdisk  # noqa: E402
from vdisk.nbd.polling import DEFAULT_POLL_US  # noqa: E402
from vdisk_testkit import nbdserve  # noqa: E402
from vdisk_testkit.nbdkill import NBD_CMD_FLUSH, NBD_CMD_WRITE, Client  # noqa: E402

README = os.path.join(HERE, "README.md")
MARK_BEGIN = "<!-- nbd-results:begin -->"
MARK_END = "<!-- nbd-results:end -->"
MiB = 1 << 20
BS = 64 << 10
CONSUMER = "bench"
TARGET = 1.0
MAP_SIZE = 1 << 40
MAP_FRACTION = 0.001

# name -> (label, fio rw, block size, iodepth); "map" is the nbdinfo row
ROWS = {
    "seqread_qd1": ("seq 1 MiB reads, qd 1", "read", "1M", 1),
    "seqread_qd16": ("seq 1 MiB reads, qd 16", "read", "1M", 16),
    "seqwrite_qd1": ("seq 1 MiB writes, qd 1", "write", "1M", 1),
    "seqwrite_qd16": ("seq 1 MiB writes, qd 16", "write", "1M", 16),
    "randread_qd1": ("random 4 KiB reads, qd 1", "randread", "4k", 1),
    "randread_qd16": ("random 4 KiB reads, qd 16", "randread", "4k", 16),
    "randwrite_qd1": ("random 4 KiB writes, qd 1", "randwrite", "4k", 1),
    "randwrite_qd16": ("random 4 KiB writes, qd 16", "randwrite", "4k", 16),
    "map": ("`nbdinfo --map=qemu:dirty-bitmap:` of 1 TiB, 0.1% changed", None, None, None),
    "map_after_write": ("the same map right after a 4 KiB write (the written block asked anew)", None, None, None),
}
MAP_ROWS = ("map", "map_after_write")


# ---------------------------------------------------------------------------- images
def content(size: int, seed: int = 20240601) -> bytes:
    """Incompressible bytes with no zero byte (so no block is skipped as zeros by either side)."""
    return np.random.default_rng(seed).integers(1, 256, size, dtype=np.uint8).tobytes()


def make_io_images(work: str, size: int) -> tuple[str, str]:
    """The region as a vdisk image (consumer registered) and as a qcow2 with a persistent bitmap."""
    raw = os.path.join(work, "region.raw")
    data = content(size)
    with open(raw, "wb") as f:
        for off in range(0, size, BS):          # 64 KiB writes: no large page-cache folios on one side only
            f.write(data[off:off + BS])
    img, q = os.path.join(work, "io.vdk"), os.path.join(work, "io.qcow2")
    vdisk.convert(raw, img, src_format="raw", block_size=BS)
    with vdisk.open(img, "r+") as d:
        d.consumers.register(CONSUMER, d.checkpoint())
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={BS}", raw, q],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(BS), q, CONSUMER], check=True)
    os.unlink(raw)
    return img, q


def write_blocks(srv, blocks, seed: int) -> None:
    """One 4 KiB write at the start of each block, pipelined (16 in flight), then a flush."""
    c = Client(srv.socket, srv.export)
    try:
        data = content(4096, seed)
        inflight = 0
        for b in blocks:
            c.send(NBD_CMD_WRITE, int(b) * BS, len(data), data)
            inflight += 1
            if inflight >= 16:
                assert c.reply()[1] == 0
                inflight -= 1
        while inflight:
            assert c.reply()[1] == 0
            inflight -= 1
        c.send(NBD_CMD_FLUSH)
        assert c.reply()[1] == 0
    finally:
        c.close()


def make_map_images(work: str, sockdir: str, size: int = MAP_SIZE) -> tuple[str, str, int]:
    """A 1 TiB image on each side with 0.1% of the blocks written before the consumer is registered /
    the bitmap added (allocated, unchanged); returns the blocks to change (another 0.1%) once served."""
    nblocks = size // BS
    rng = np.random.default_rng(7)
    picks = rng.choice(nblocks, 2 * int(nblocks * MAP_FRACTION), replace=False)
    base, changed = np.sort(picks[::2]), np.sort(picks[1::2])
    img, q = os.path.join(work, "map.vdk"), os.path.join(work, "map.qcow2")
    vdisk.create(img, size, block_size=BS).close()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={BS}", q, str(size)], check=True)
    sock = os.path.join(sockdir, "fill")
    with nbdserve.vdisk_serve(img, sock, "m") as srv:
        write_blocks(srv, base, 1)
    with vdisk.open(img, "r+") as d:
        d.consumers.register(CONSUMER, d.checkpoint())
    with nbdserve.qemu_nbd(q, sock, "m") as srv:
        write_blocks(srv, base, 1)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(BS), q, CONSUMER], check=True)
    return img, q, changed


# ---------------------------------------------------------------------------- measuring
def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads: its process CPU clock (Linux's
    clockid for another process, (~pid << 3) | CPUCLOCK_SCHED, in ns), else
    user + system time from /proc/PID/stat (clock ticks, 10 ms here)."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Sample:
    rate: float        # bytes/s (1 MiB rows), ops/s (4 KiB rows), seconds (map row)
    cpu_us: float      # server CPU per op (µs), or per map (ms) for the map row


CLIENT_PREFIX: list[str] = []      # ["taskset", "-c", "1"] under --pin


def pin(pid: int, cpu: int) -> None:
    """Every thread of process pid onto one CPU (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def fio(uri: str, pid: int, rw: str, bs: str, depth: int, size: int, runtime: float) -> Sample:
    """One fio run against the server with that pid: its throughput and the server's CPU per op."""
    cmd = CLIENT_PREFIX + ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", f"--size={size}", "--time_based", f"--runtime={runtime}",
           "--randrepeat=1", "--norandommap", "--output-format=json"]
    c0 = cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 10 + 60)
    cpu = cpu_seconds(pid) - c0
    if out.returncode:
        raise RuntimeError(f"fio failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    text = out.stdout
    job = json.loads(text[text.index("{"):])["jobs"][0]      # fio's nbd engine prints a line first
    side = job["write" if "write" in rw else "read"]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    return Sample(side["bw_bytes"] if bs == "1M" else side["iops"], cpu / max(1, side["total_ios"]) * 1e6)


def nbdinfo_map(uri: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(CLIENT_PREFIX + ["nbdinfo", f"--map=qemu:dirty-bitmap:{CONSUMER}", "--json", uri], capture_output=True,
                         text=True, timeout=600)
    t = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"nbdinfo --map failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    return t, out.stdout


def dirty_runs(text: str) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for e in json.loads(text):
        if e["type"] & 1:
            if runs and sum(runs[-1]) == e["offset"]:
                runs[-1] = (runs[-1][0], runs[-1][1] + e["length"])
            else:
                runs.append((e["offset"], e["length"]))
    return runs


def alternate(rounds: int, measure) -> dict[str, list[Sample]]:
    """measure(side) for both sides in every round, vdisk first in even rounds, qemu-nbd first in odd ones."""
    out: dict[str, list[Sample]] = {"vdisk": [], "qemu": []}
    for r in range(rounds):
        for side in (("vdisk", "qemu") if r % 2 == 0 else ("qemu", "vdisk")):
            out[side].append(measure(side))
    return out


# ---------------------------------------------------------------------------- reporting
def fmt_rate(x: float, unit: str) -> str:
    if unit == "MiB/s":
        return f"{x / MiB:,.0f} MiB/s"
    if unit == "k IOPS":
        return f"{x / 1e3:,.1f}k IOPS"
    return f"{x * 1e3:,.0f} ms" if x < 10 else f"{x:,.1f} s"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.995 else f"{x:.3g}"


def row_line(label: str, res: dict, unit: str) -> tuple[str, float]:
    v = np.asarray([x.rate for x in res["vdisk"]])
    q = np.asarray([x.rate for x in res["qemu"]])
    cv = float(np.median([x.cpu_us for x in res["vdisk"]]))
    cq = float(np.median([x.cpu_us for x in res["qemu"]]))
    ratios = (q / v) if unit == "time" else (v / q)
    ratio = float(np.median(ratios))
    lo, hi = float(ratios.min()), float(ratios.max())
    if lo < TARGET <= hi:
        verdict = f"≥{TARGET:g}x: unclear ({'met' if ratio >= TARGET else 'missed'} at the median)"
    else:
        verdict = f"≥{TARGET:g}x: {'met' if ratio >= TARGET else '**missed**'}"

    def side(a):
        return f"{fmt_rate(float(np.median(a)), unit)} [{fmt_rate(float(a.min()), unit)}–{fmt_rate(float(a.max()), unit)}]"

    cpu_unit = "ms" if unit == "time" else "µs"
    cpu = f"{cv:,.2f} / {cq:,.2f} {cpu_unit}" if cv < 10 else f"{cv:,.1f} / {cq:,.1f} {cpu_unit}" if cv < 100 else f"{cv:,.0f} / {cq:,.0f} {cpu_unit}"
    return (f"| {label} | {side(v)} | {side(q)} | **{fmt_ratio(ratio)}x** [{fmt_ratio(lo)}–{fmt_ratio(hi)}] "
            f"| {cpu} | {verdict} |"), ratio


def tool_versions() -> str:
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"
    qv = re.sub(r"^qemu-nbd\s*", "", first(["qemu-nbd", "--version"]))
    return f"qemu-nbd {qv}; {first(['fio', '--version'])}; {first(['nbdinfo', '--version'])}"


def header(args, size: int) -> list[str]:
    import importlib.util
    import report      # benchmarks/report.py and conftest.py: the machine and library lines of the other tables
    spec = importlib.util.spec_from_file_location("bench_conftest", os.path.join(HERE, "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    data = {"machine_info": {"vdisk_bench": conftest.describe_machine()}}
    lines = [report.machine_line(data)]
    lib = report.library_line([data])
    if lib:
        lines.append(lib)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += ["", f"Run {when}: {tool_versions()}. I/O region {size // MiB} MiB, fio runs of {args.runtime:g} s, "
                  f"{args.rounds} alternating rounds per row; load average before the run "
                  f"{os.getloadavg()[0]:.2f}"
                  + ("; both servers pinned to CPU 0 and the clients to CPU 1 (`--pin`)" if args.pin else "")
                  + (f"; vdisk serve --poll-us {args.poll_us}" if args.poll_us is not None else
                     f"; vdisk serve with its defaults (--poll-us {DEFAULT_POLL_US})")
                  + f". Each side: median [min–max] of the rounds; ratio = vdisk / qemu-nbd "
                  f"throughput (map row: qemu-nbd time / vdisk time), median [min–max] of the per-round ratios, "
                  f"**> 1 means vdisk is faster**. Server CPU: the server process's CPU clock (every thread) "
                  f"during the client's run, per request (map row: per nbdinfo run, the mean of a round's "
                  f"{args.map_runs} runs), median of the rounds.",
              "", "| workload | vdisk serve | qemu-nbd (qcow2 + persistent bitmap) | ratio | server CPU per op, "
                  "vdisk / qemu-nbd | target |",
              "| --- | --- | --- | --- | --- | --- |"]
    return lines


def update_readme(table: str) -> None:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    pat = re.compile(re.escape(MARK_BEGIN) + r".*?" + re.escape(MARK_END), re.S)
    if not pat.search(text):
        raise SystemExit(f"{README}: no {MARK_BEGIN} ... {MARK_END} block to replace")
    with open(README, "w", encoding="utf-8") as f:
        f.write(pat.sub(lambda _m: f"{MARK_BEGIN}\n{table}\n{MARK_END}", text))


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, help="alternating rounds per row (default 5)")
    ap.add_argument("--runtime", type=float, help="seconds per fio run (default 3)")
    ap.add_argument("--mib", type=int, help="I/O region in MiB (default 1024)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {','.join(ROWS)})")
    ap.add_argument("--quick", action="store_true", help="128 MiB, 1 s runs, 3 rounds")
    ap.add_argument("--pin", action="store_true",
                    help="both servers (every thread) on CPU 0, the clients on CPU 1: no run depends on where "
                         "the scheduler happens to place a server beside its client")
    ap.add_argument("--poll-us", type=int,
                    help="pass --poll-us to vdisk serve (default: the server's default; 0 turns its spin off)")
    ap.add_argument("--map-runs", type=int, default=5,
                    help="nbdinfo runs per side in each round of a map row; the round's figure is their median (default 5)")
    ap.add_argument("--json", help="write every round's figures here")
    ap.add_argument("--output", help="also write the table to this file")
    ap.add_argument("--update-readme", action="store_true", help="replace the NBD results block of benchmarks/README.md")
    ap.add_argument("--keep", help="use this directory for the images and keep it (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    for name, normal, quick in (("mib", 1024, 128), ("runtime", 3.0, 1.0), ("rounds", 5, 3)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    if args.pin:
        CLIENT_PREFIX[:] = ["taskset", "-c", "1"]
    rows = [r for r in args.rows.split(",") if r]
    serve_args = [] if args.poll_us is None else ["--poll-us", str(args.poll_us)]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    for tool in ("qemu-nbd", "qemu-img", "fio", "nbdinfo"):
        if not nbdserve.have(tool):
            print(f"bench_nbd: {tool} is missing (apt-get install qemu-utils fio libnbd-bin)", file=sys.stderr)
            return 1
    size = args.mib * MiB
    base = os.environ.get("VDISK_BENCH_DIR") or tempfile.gettempdir()
    lines = header(args, size)
    work = args.keep or tempfile.mkdtemp(prefix="vdisk-bench-nbd-", dir=base)
    os.makedirs(work, exist_ok=True)
    sockdir = tempfile.mkdtemp(prefix="vb-")
    results: dict[str, dict] = {}
    servers = []
    try:
        io_rows = [r for r in rows if r not in MAP_ROWS]
        if io_rows:
            print(f"building the {args.mib} MiB images ...", file=sys.stderr, flush=True)
            img, q = make_io_images(work, size)
            sv = nbdserve.vdisk_serve(img, os.path.join(sockdir, "v"), "io", extra=serve_args)
            servers.append(sv)
            sq = nbdserve.qemu_nbd(q, os.path.join(sockdir, "q"), "io", bitmap=CONSUMER)
            servers.append(sq)
            uris = {"vdisk": sv.uri, "qemu": sq.uri}
            pids = {"vdisk": sv.pid, "qemu": sq.pid}
            if args.pin:
                for pid in pids.values():
                    pin(pid, 0)
            for name in io_rows:
                label, rw, bsz, depth = ROWS[name]
                res = alternate(args.rounds, lambda side: fio(uris[side], pids[side], rw, bsz, depth, size,
                                                              args.runtime))
                results[name] = res
                unit = "MiB/s" if bsz == "1M" else "k IOPS"
                line, ratio = row_line(label, res, unit)
                lines.append(line)
                print(f"{name}: ratio {ratio:.3f}  vdisk {[round(x.rate) for x in res['vdisk']]}  "
                      f"qemu {[round(x.rate) for x in res['qemu']]}", file=sys.stderr, flush=True)
            for s in servers:
                s.stop()
            servers.clear()
        map_rows = [r for r in rows if r in MAP_ROWS]
        if map_rows:
            print("building the 1 TiB images ...", file=sys.stderr, flush=True)
            img, q, changed = make_map_images(work, sockdir)
            sv = nbdserve.vdisk_serve(img, os.path.join(sockdir, "v"), "m", extra=serve_args)
            servers.append(sv)
            sq = nbdserve.qemu_nbd(q, os.path.join(sockdir, "q"), "m", bitmap=CONSUMER)
            servers.append(sq)
            write_blocks(sv, changed, 2)       # the same blocks and bytes through the same client
            write_blocks(sq, changed, 2)
            uris = {"vdisk": sv.uri, "qemu": sq.uri}
            pids = {"vdisk": sv.pid, "qemu": sq.pid}
            if args.pin:
                for pid in pids.values():
                    pin(pid, 0)
            servers_of = {"vdisk": sv, "qemu": sq}
            want = sum(1 for _ in changed) * BS
            for name in map_rows:
                outputs = {}

                def measure(side, name=name, outputs=outputs):
                    times, cpu = [], 0.0
                    for _ in range(args.map_runs):
                        if name == "map_after_write":      # untimed: one block rewritten with its own bytes
                            write_blocks(servers_of[side], changed[:1], 2)
                        c0 = cpu_seconds(pids[side])
                        t, text = nbdinfo_map(uris[side])
                        cpu += cpu_seconds(pids[side]) - c0
                        times.append(t)
                        outputs[side] = text
                    return Sample(float(np.median(times)), cpu / args.map_runs * 1e3)

                res = alternate(args.rounds, measure)
                rv, rq = dirty_runs(outputs["vdisk"]), dirty_runs(outputs["qemu"])
                if rv != rq or sum(n for _, n in rv) != want:
                    print(f"WARNING: {name}: the dirty maps differ: vdisk {len(rv)} runs ({sum(n for _, n in rv)} "
                          f"bytes), qemu-nbd {len(rq)} runs ({sum(n for _, n in rq)} bytes), written {want} bytes",
                          file=sys.stderr)
                    results[f"{name}_mismatch"] = True
                results[name] = res
                line, ratio = row_line(ROWS[name][0], res, "time")
                lines.append(line)
                print(f"{name}: ratio {ratio:.3f}  vdisk {[round(x.rate * 1e3, 1) for x in res['vdisk']]} ms  "
                      f"qemu {[round(x.rate * 1e3, 1) for x in res['qemu']]} ms", file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=dataclasses.asdict)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.update_readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
