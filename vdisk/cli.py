"""The ``vdisk`` command line, in the manner of ``qemu-img``.

Commands::

    vdisk create FILE SIZE [--block-size N] [--no-track-changes] [--overwrite]
    vdisk info FILE [--output human|json]
    vdisk check FILE [--repair] [-p] [--output human|json]
    vdisk map FILE [--output human|json]
    vdisk resize FILE [+|-]SIZE [--shrink] [--output human|json]
    vdisk checkpoint FILE [--output human|json]
    vdisk changes FILE --since ID|* [--output human|json]
    vdisk convert [-f FMT] [-O FMT] [-p] [--allow-backing] [--backing FILE] [--block-size N]
                  [--snapshot NAME] [-l SNAPSHOT] [-n] [--overwrite] [--output human|json] SRC DST
    vdisk compare [-f FMT] [-F FMT] [--allow-backing] [-p] [--output human|json] A B
    vdisk serve FILE (--socket PATH | --listen HOST:PORT) [--export NAME] [--read-only] [--pid-file PATH]
                [--tls-cert F --tls-key F [--tls-ca F]] [--insecure] [--poll-us MICROSECONDS]

Sizes are bytes or take a unit: 512, 64KiB, 1.5G, 10T (K/M/G/T are
binary; KB/MB/GB/TB decimal).  ``create`` rounds a size up to a multiple
of 512 bytes, as ``convert`` does (and ``qemu-img create``).

``convert`` takes the output format from DST's extension when -O is not
given (.qcow2; .raw and .img; .vdk and .vdisk; anything else: vdisk),
and refuses -O that contradicts it (.img, a name for any image, goes with
any -O).

``--output json`` of info, map and check is shaped as qemu-img's
(``virtual-size``, ``actual-size``, ``cluster-size``; map's list of
``start``/``length``/``data``/``zero``/``offset``; check's counts
``check-errors``, ``corruptions``, ``leaks``), with vdisk's own keys beside;
for a raw or qcow2 image, info and map (JSON and human) say what qemu-img
says (docs/CONVERT.md, "Info and map").

Exit codes
----------
0   success (for ``check``: the image is clean)
1   error: the operation failed, or ``check`` could not check the image
    (not a vdisk image, locked, unreadable, ...); and a usage error
    (unknown command or option, missing argument), for every command,
    as qemu-img does
2   ``check`` only: the image is corrupt
3   ``check`` only: leaked blocks were found, but no corruption

``compare`` follows ``qemu-img compare`` instead: 0 the images are
identical, 1 they differ (or a usage error), 2 an error (the one error
line, as above).

Every error is reported as exactly one line on stderr,
``vdisk: error: <message>``, never as a traceback; a message that names
what to change names the flag (``--overwrite``), not the Python
parameter.  A traceback means a bug in vdisk.

Start-up is kept short: this module imports click and vdisk's error
classes only; numpy, h5py and tqdm load inside the commands that use them
(``vdisk --help`` imports no numpy, and ``vdisk info`` of an image reads
it through vdisk/summary.py, which needs neither numpy nor the compiled
core).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from typing import Any, Iterator, NoReturn

import click

import vdisk
from vdisk.errors import ImageLockedError, InvalidArgumentError, OutOfRangeError, Param, VdiskError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 1          # qemu-img: a usage error exits 1, whatever the command
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_COMPARE_ERROR = 2  # qemu-img compare: 2 on error


# ---------------------------------------------------------------------------- errors
#: the flag of each API parameter an error may name (vdisk.errors.Param)
FLAGS = {
    "overwrite": "--overwrite", "allow_backing": "--allow-backing", "block_size": "--block-size",
    "snapshot": "--snapshot", "since": "--since", "consumer": "--consumer", "format": "-O",
    "repair": "--repair", "shrink": "--shrink",
    "src_format": "-f", "a_format": "-f", "b_format": "-F",     # convert's -f, compare's -f and -F
}


def flag_of(p: Param) -> str:
    """How the command line spells an API parameter named in an error."""
    if p.name == "allow_backing" and p.placeholder is not None:
        return "--backing FILE"
    if p.name == "track_changes":                   # a flag of create that says the opposite
        return ("--no-track-changes" if p.value is False
                else "change tracking: vdisk create without --no-track-changes")
    flag = FLAGS.get(p.name)
    if flag is None:                # a parameter without a flag: said as Python says it
        return str(p)
    if p.bare or p.value is True:
        return flag
    if p.placeholder is not None:
        return f"{flag} {p.placeholder.upper()}"
    return f"{flag} {p.value}"


def _error_message(exc: BaseException) -> str:
    """One line describing a user-facing error."""
    if isinstance(exc, click.UsageError):
        msg = exc.format_message()
        if exc.ctx is not None:
            msg += f" (try '{exc.ctx.command_path} --help')"
    elif isinstance(exc, click.ClickException):
        msg = exc.format_message()
    elif isinstance(exc, VdiskError) and exc.parts:
        msg = exc.render(flag_of)
    elif isinstance(exc, OSError) and exc.strerror:
        # OSError's str() is "[Errno 2] ...: 'path'"; say "path: reason" once
        msg = exc.strerror
        if exc.filename is not None and os.fspath(exc.filename) not in msg:
            msg = f"{os.fspath(exc.filename)}: {msg}"
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def _report_error(exc: BaseException) -> None:
    click.echo(f"vdisk: error: {_error_message(exc)}", err=True)


def _usage(message: str) -> NoReturn:
    raise click.UsageError(message, click.get_current_context(silent=True))


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A warning is one line on stderr, as qemu-img prints its own (``vdisk: warning: ...``)."""
    click.echo(f"vdisk: warning: {message}", err=True)


class VdiskGroup(click.Group):
    """A click group that turns user errors into one ``vdisk: error:`` line,
    and prints its help (not an error) when called without a command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:
            click.echo(ctx.get_help())
            ctx.exit(EXIT_USAGE)
        return super().parse_args(ctx, args)

    def main(self, args: list[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if prog_name is None:
            prog_name = "vdisk"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        shown, warnings.showwarning = warnings.showwarning, _show_warning
        try:
            # non-standalone: exceptions reach us, and ctx.exit(n) comes back as n
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            _report_error(exc)
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            _report_error(exc)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("vdisk: error: aborted", err=True)
            sys.exit(EXIT_ERROR)
        except (VdiskError, OSError) as exc:
            _report_error(exc)
            sys.exit(EXIT_ERROR)
        finally:
            warnings.showwarning = shown
        # the commands return None; an int is an exit code from ctx.exit()
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


VdiskGroup.group_class = type          # snapshot and consumer groups behave the same


# ---------------------------------------------------------------------------- shared helpers
output_option = click.option(
    "--output", type=click.Choice(["human", "json"]), default="human", show_default=True,
    help="Output format.")

progress_option = click.option("-p", "show_progress", is_flag=True, help="Show a progress bar on stderr.")

file_argument = click.argument("file", type=click.Path())


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def _size(text: str, what: str = "size") -> int:
    from vdisk.layout import parse_size
    return parse_size(text, what)


def _fmt_size(n: int) -> str:
    from vdisk.layout import format_size
    return format_size(n)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _open_or_connect(file: str, mode: str = "r") -> Any:
    """The image, or, while `vdisk serve` holds it, its server's control channel (vdisk/live.py)."""
    from vdisk.live import open_or_connect
    return open_or_connect(file, mode)


@contextlib.contextmanager
def _not_live(what: str, *paths: str | None) -> Iterator[None]:
    """A command that reads image files itself: when one of them is held by `vdisk serve`,
    say so in one line (vdisk.live.served_refusal) instead of the bare lock error."""
    from vdisk.live import refused_if_served
    with refused_if_served(what, *paths):
        yield


def _info_of(file: str) -> tuple[dict[str, Any], list[Any]]:
    """(Disk.info(), the snapshots' SnapshotInfo) of FILE, read by vdisk.summary without numpy
    (start-up); an image a `vdisk serve` holds, through its server."""
    from vdisk.summary import summarize
    try:
        return summarize(file)
    except ImageLockedError:
        with _open_or_connect(file) as d:
            data = d.info()
            return data, d.snapshots if data["snapshots"] else []


def _is_live(d: Any) -> bool:
    from vdisk.live import LiveDisk
    return isinstance(d, LiveDisk)


def _table(rows: list[tuple[str, object]]) -> None:
    """Print aligned ``key: value`` lines."""
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        click.echo(f"{key + ':':<{width}}{value}")


class _ProgressBar:
    """A tqdm bar on stderr fed by a progress(done, total) callback."""

    def __init__(self, desc: str, unit: str = "B"):
        self.desc = desc
        self.unit = unit
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
            scale = self.unit == "B"
            self.bar = tqdm(total=total, unit=self.unit, unit_scale=scale, unit_divisor=1024, file=sys.stderr,
                            desc=self.desc, dynamic_ncols=True)
        if total != self.bar.total:            # a check that goes on to repair has more passes
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _progress:
    """``with _progress(show, "name") as bar``: a _ProgressBar (or None), closed at the end."""

    def __init__(self, show: bool, desc: str, unit: str = "B"):
        self.bar = _ProgressBar(desc, unit) if show else None

    def __enter__(self) -> _ProgressBar | None:
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- commands
@click.group(cls=VdiskGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(vdisk.__version__, prog_name="vdisk")
def main() -> None:
    """Create, inspect, check and track sparse vdisk images."""


@main.command()
@file_argument
@click.argument("size")
@click.option("--block-size", default="64KiB", show_default=True, help="Allocation unit (4KiB..4MiB).")
@click.option("--no-track-changes", is_flag=True, help="Create the image without change tracking.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def create(file: str, size: str, block_size: str, no_track_changes: bool, overwrite: bool) -> None:
    """Create an image FILE of virtual size SIZE (rounded up to a multiple of 512 bytes)."""
    nbytes = -(-_size(size) // 512) * 512           # as convert and qemu-img create round
    bs = _size(block_size, "block size")
    if os.path.lexists(file) and not overwrite:
        raise InvalidArgumentError(f"{file} exists (use --overwrite to replace it)")
    with vdisk.create(file, nbytes, block_size=bs, overwrite=overwrite,
                      track_changes=not no_track_changes) as d:
        click.echo(f"Formatting '{file}', fmt=vdisk size={d.size} block_size={d.block_size}")


def _qemu_snapshots(snapshots: list[Any]) -> list[dict[str, Any]]:
    """vdisk snapshots as qemu-img info lists internal snapshots, with vdisk's own keys beside."""
    out = []
    for i, s in enumerate(snapshots, 1):
        ns = int(s.created.timestamp() * 1e9)
        out.append({"id": str(i), "name": s.name, "vm-state-size": 0, "date-sec": ns // 10**9,
                    "date-nsec": ns % 10**9, "vm-clock-sec": 0, "vm-clock-nsec": 0, "icount": 0,
                    "virtual-size": s.size, "change-id": s.change_id, "generation": s.generation})
    return out


def info_json(path: str, data: dict[str, Any], snapshots: list[Any]) -> dict[str, Any]:
    """``vdisk info --output json``: qemu-img info's keys where they mean the same, vdisk's beside."""
    st = os.stat(path)
    out = {
        "filename": path,
        "format": "vdisk",
        "virtual-size": data["virtual_size"],
        "actual-size": st.st_blocks * 512,          # as qemu-img: bytes the host file occupies
        "cluster-size": data["block_size"],
        "dirty-flag": False,
        "file-size": data["file_size"],
        "version": data["version"],
        "uuid": data["uuid"],
        "created": data["created"],
        "allocated-blocks": data["allocated_blocks"],
        "allocated-bytes": data["allocated_bytes"],
        "track-changes": data["track_changes"],
        "coarse-region-size": data["coarse_region_size"],
        "consumers": [{"name": c["name"], "change-id": c["change_id"]} for c in data["consumers"]],
    }
    if data["track_changes"]:
        out.update({"generation": data["generation"], "tracking-id": data["tracking_id"],
                    "change-id": data["change_id"], "dirty-coarse-regions": data["dirty_coarse_regions"]})
    if snapshots:                                   # qemu-img leaves the key out when there are none
        out["snapshots"] = _qemu_snapshots(snapshots)
    if "served_by" in data:                         # answered by the `vdisk serve` that holds the image
        out["served-by"] = data["served_by"]
    return out


def _has_vdisk_magic(file: str) -> bool:
    """Whether FILE is a vdisk image by sources.probe_format's rule (not
    qcow2's magic, vdisk's in either header slot), read without numpy."""
    from vdisk import layout as L
    from vdisk.fileio import FileIO, open_input
    fio = FileIO.adopt(open_input(file), file)
    try:
        head = fio.pread(L.SLOT_OFFSETS[1] + len(L.MAGIC), 0)
    finally:
        fio.close()
    return head[:4] != b"QFI\xfb" and any(head[o:o + len(L.MAGIC)] == L.MAGIC for o in L.SLOT_OFFSETS)


def _other_format(file: str) -> str | None:
    """The format of FILE when it is not a vdisk image ("raw", "qcow2"; a
    format vdisk does not read is refused, naming it), else None."""
    if _has_vdisk_magic(file):          # before sources, which loads numpy: info starts without it
        return None
    from vdisk.sources import probe_format
    fmt, what = probe_format(file)
    if fmt == "vdisk":
        return None
    if fmt not in ("raw", "qcow2"):
        raise vdisk.UnsupportedFeatureError(f"{file}: {what} (format {fmt}), which vdisk does not read")
    return fmt


def image_info_json(file: str, image: Any) -> dict[str, Any]:
    """``vdisk info --output json`` of a raw or qcow2 image: qemu-img info's keys, vdisk's beside."""
    st = os.stat(file)
    out: dict[str, Any] = {"filename": file, "format": image.format, "virtual-size": image.size,
                           "actual-size": st.st_blocks * 512, "dirty-flag": bool(getattr(image, "dirty", False))}
    if image.format == "qcow2":
        out["cluster-size"] = image.cluster_size
        out["format-specific"] = {"type": "qcow2", "data": image.format_specific()}
        if image.snapshots:                         # qemu-img leaves the key out when there are none
            out["snapshots"] = [{"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
                                 "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                                 "vm-clock-sec": s.vm_clock_nsec // 10**9, "vm-clock-nsec": s.vm_clock_nsec % 10**9,
                                 "icount": s.icount if s.icount is not None else 0} for s in image.snapshots]
        if image.backing_file is not None:
            out["backing-filename"] = image.backing_file
    out["data-bytes"] = sum(n for _o, n, data in image.extents(0, image.size) if data)
    return out


def _info_other(file: str, fmt: str, output: str) -> None:
    """info of a raw or qcow2 image, through its reader (vdisk.protocols.ImageReader)."""
    from vdisk.sources import open_image
    image = open_image(file, fmt, warn_raw=False)
    try:
        data = image_info_json(file, image)
    finally:
        image.close()
    if output == "json":
        _emit_json(data)
        return
    # qemu-img info's human layout (reference: qemu-img.c dump_human_image_info, bdrv_snapshot_dump)
    lines = [f"image: {file}", f"file format: {fmt}",
             f"virtual size: {qemu_size_str(data['virtual-size'])} ({data['virtual-size']} bytes)",
             f"disk size: {qemu_size_str(data['actual-size'])}"]
    if fmt == "qcow2":
        lines.append(f"cluster_size: {data['cluster-size']}")
        if "backing-filename" in data:
            lines.append(f"backing file: {data['backing-filename']}")
        if data.get("snapshots"):
            lines.append("Snapshot list:")
            lines.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
            for snap in data["snapshots"]:
                lines.append(_snapshot_line(snap))
        spec = data.get("format-specific", {}).get("data", {})
        if spec:
            lines.append("Format specific information:")
            for key, value in spec.items():
                shown = str(value).lower() if isinstance(value, bool) else value
                lines.append(f"    {key.replace('-', ' ')}: {shown}")
    click.echo("\n".join(lines))


def qemu_size_str(n: int) -> str:
    """A size as qemu prints it (reference: util/cutils.c size_to_str): three significant digits and a
    binary unit, "780 KiB", "1.18 MiB", "0 B"."""
    import math
    i = (math.frexp(n / (1000.0 / 1024.0))[1] - 1) // 10 if n else 0
    i = max(0, min(i, 6))
    value = n / (1 << (i * 10))
    text = f"{value:.3g}"
    if "e" in text:                # %g switches to exponents from 1000 on: qemu's units keep values below 1000
        text = f"{value:.0f}"
    return f"{text} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[i]}B"


def _snapshot_line(snap: dict[str, Any]) -> str:
    """One row of qemu-img info's snapshot list (reference: bdrv_snapshot_dump)."""
    import time
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["date-sec"]))
    secs = snap["vm-clock-sec"]
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{snap['vm-clock-nsec'] // 1000000:03d}"
    icount = "" if snap.get("icount") is None else str(snap["icount"])
    return f"{snap['id']:<9} {snap['name']:<16} {qemu_size_str(snap['vm-state-size']):>8}{date:>20}{clock:>13}" \
           f"{icount:>11}"


def _given_or_probed(file: str, fmt: str | None) -> str | None:
    """-f FMT, else the probed format; None for a vdisk image (or a path that is no file: the vdisk path words it)."""
    if fmt is not None:
        return None if fmt == "vdisk" else fmt
    return _other_format(file) if os.path.isfile(file) else None


@main.command()
@file_argument
@click.option("-f", "fmt", type=click.Choice(("raw", "qcow2", "vdisk")), help="Format of FILE (default: detected; else raw).")
@output_option
def info(file: str, fmt: str | None, output: str) -> None:
    """Show the image's geometry, allocation and tracking state (raw and qcow2 images: as qemu-img info)."""
    fmt = _given_or_probed(file, fmt)
    if fmt is not None:
        _info_other(file, fmt, output)
        return
    data, snapshots = _info_of(file)
    if output == "json":
        _emit_json(info_json(file, data, snapshots))
        return
    rows = [
        ("image", data["path"]),
        ("file format", data["format"]),
        ("version", data["version"]),
        ("virtual size", f"{_fmt_size(data['virtual_size'])} ({data['virtual_size']} bytes)"),
        ("block size", data["block_size"]),
        ("allocated", f"{_fmt_size(data['allocated_bytes'])} ({_plural(data['allocated_blocks'], 'block')})"),
        ("file size", f"{_fmt_size(data['file_size'])} ({data['file_size']} bytes)"),
        ("uuid", data["uuid"]),
        ("created", data["created"]),
        ("snapshots", data["snapshots"]),
        ("change tracking", "on" if data["track_changes"] else "off"),
    ]
    if data["track_changes"]:
        rows += [
            ("coarse region size", data["coarse_region_size"]),
            ("generation", data["generation"]),
            ("tracking id", data["tracking_id"]),
            ("change id", data["change_id"] or "none (no checkpoint yet)"),
            ("dirty coarse regions", data["dirty_coarse_regions"]),
        ]
        for c in data["consumers"]:
            rows.append((f"consumer {c['name']}", c["change_id"] or "no backup recorded (next one is full)"))
    if data.get("damaged_snapshot_records"):
        rows.append(("damaged snapshot records", f"{data['damaged_snapshot_records']} (left out; 'vdisk check "
                                                 f"--repair' drops them)"))
    _table(rows)


def _check_exit_code(result: Any) -> int:
    if result.corruption_count:
        return EXIT_CORRUPT
    if result.leaked_blocks or result.unreferenced_data_blocks:
        return EXIT_LEAKS
    return EXIT_OK


def _print_findings(result: Any) -> None:
    for msg in result.corruptions:
        click.echo(f"ERROR {msg}")
    if result.corruption_count > len(result.corruptions):
        click.echo(f"ERROR ... and {result.corruption_count - len(result.corruptions)} more")
    if result.corruption_count:
        click.echo(f"\n{result.corruption_count} errors were found on the image.")
        click.echo("Data may be corrupted, or further writes to the image may corrupt it.")
    if result.leaked_blocks:
        if result.corruption_count:
            click.echo()
        click.echo(f"{result.leaked_blocks} leaked clusters were found on the image.")
        click.echo("This means waste of disk space, but no harm to data.")
    if result.unreferenced_data_blocks:
        click.echo(f"{result.unreferenced_data_blocks} blocks past the last referenced one hold data nothing maps "
                   f"(leaked by a killed writer; 'vdisk compact' or 'vdisk check --repair' truncates them).")
    if not result.corruption_count and not result.leaked_blocks and not result.unreferenced_data_blocks:
        click.echo("No errors were found on the image.")


def check_json(file: str, result: Any, before: Any) -> dict[str, Any]:
    """``vdisk check --output json``: qemu-img check's keys (counts), the findings listed beside."""
    data: dict[str, Any] = {
        "filename": file, "format": "vdisk", "check-errors": 0,
        "corruptions": result.corruption_count, "leaks": result.leaked_blocks + result.unreferenced_data_blocks,
        "unreferenced-data-blocks": result.unreferenced_data_blocks,
        "image-end-offset": result.image_end_offset, "total-clusters": result.total_blocks,
        "allocated-clusters": result.allocated_blocks,
        "ok": result.ok, "corruption-messages": list(result.corruptions), "repaired": result.repaired,
    }
    if result.repaired:
        data.update({"corruptions-fixed": before.corruption_count - result.corruption_count,
                     "leaks-fixed": (before.leaked_blocks + before.unreferenced_data_blocks
                                     - result.leaked_blocks - result.unreferenced_data_blocks)})
    return data


@main.command()
@file_argument
@click.option("--repair", is_flag=True, help="Repair leaks and corruptions.")
@progress_option
@output_option
@click.pass_context
def check(ctx: click.Context, file: str, repair: bool, show_progress: bool, output: str) -> None:
    """Check the image for consistency (exit 0 clean, 2 corrupt, 3 leaks, 1 could not check)."""
    from vdisk.check import check as check_image
    with _progress(show_progress, "check", unit="pass") as bar:
        before = result = check_image(file, progress=bar)
    if repair and not before.ok:
        # check(repair=True) reports the state after the repair; ``before`` says what it fixed
        with _progress(show_progress, "repair", unit="pass") as bar:
            result = check_image(file, repair=True, progress=bar)
    if output == "json":
        _emit_json(check_json(file, result, before))
    else:
        if result.repaired:
            click.echo("The following inconsistencies were found and repaired:\n")
            click.echo(f"    {before.leaked_blocks + before.unreferenced_data_blocks} leaked clusters")
            click.echo(f"    {before.corruption_count} corruptions\n")
            click.echo("Double checking the fixed image now...")
        _print_findings(result)
        if result.total_blocks:
            pct = 100.0 * result.allocated_blocks / result.total_blocks
            click.echo(f"{result.allocated_blocks}/{result.total_blocks} = {pct:.2f}% allocated")
        click.echo(f"Image end offset: {result.image_end_offset}")
    ctx.exit(_check_exit_code(result))


def map_json(size: int, runs: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """qemu-img map's JSON list: every range of the disk, data runs with their host offset."""
    out: list[dict[str, Any]] = []
    pos = 0

    def hole(end: int) -> None:
        if end > pos:
            out.append({"start": pos, "length": end - pos, "depth": 0, "present": False, "zero": True,
                        "data": False})

    for start, length, host in runs:
        hole(start)
        out.append({"start": start, "length": length, "depth": 0, "present": True, "zero": False,
                    "data": True, "offset": host})
        pos = start + length
    hole(size)
    return out


def _c_hex(n: int) -> str:
    """printf's %#x: 0 without the 0x."""
    return f"{n:#x}" if n else "0"


def _qemu_map(file: str, fmt: str) -> list[dict[str, Any]]:
    """qemu-img map --output=json of a raw or qcow2 image."""
    if fmt == "qcow2":
        from vdisk.qcow2 import Qcow2Image
        from vdisk.sources import open_image
        image = open_image(file, fmt, warn_raw=False)
        try:
            assert isinstance(image, Qcow2Image)        # open_image's reader for "qcow2"
            entries: list[dict[str, Any]] = image.qemu_map()
            return entries
        finally:
            image.close()
    from vdisk.convert import image_map         # raw: every range present, at its own offset, as qemu-img
    return [{"start": r["start"], "length": r["length"], "depth": 0, "present": True, "zero": r["zero"],
             "data": r["data"], "offset": r["start"]} for r in image_map(file, fmt)]


@main.command(name="map")
@file_argument
@click.option("-f", "fmt", type=click.Choice(("raw", "qcow2", "vdisk")), help="Format of FILE (default: detected; else raw).")
@output_option
def map_(file: str, fmt: str | None, output: str) -> None:
    """List the allocated (data) extents of the image (JSON: every range, as qemu-img map).

    Raw and qcow2 images too: their data runs (SEEK_DATA holes and zero or unallocated clusters read as zeros)."""
    fmt = _given_or_probed(file, fmt)
    if fmt is not None:
        entries = _qemu_map(file, fmt)
        if output == "json":
            _emit_json(entries)
            return
        # qemu-img map's human layout (reference: qemu-img.c dump_map_entry): the ranges holding data
        click.echo(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
        for e in entries:
            if e["data"] and "offset" not in e:
                raise vdisk.UnsupportedFeatureError(
                    f"{file}: contains compressed clusters, which have no host offset to show (as qemu-img "
                    f"map says); use --output json")
            if e["data"] and not e["zero"]:
                click.echo(f"{_c_hex(e['start']):<16}{_c_hex(e['length']):<16}{_c_hex(e['offset']):<16}{file}")
        return
    with _open_or_connect(file) as d:
        if output == "json":
            _emit_json(map_json(d.size, d.host_map()))
            return
        extents = list(d.map())
    click.echo(f"{'Offset':<16}Length")
    for o, n in extents:
        click.echo(f"{o:<#16x}{n:<#16x}".rstrip())


def _new_size(spec: str, current: int) -> int:
    """SIZE, +SIZE or -SIZE relative to current."""
    sign = spec[:1] if spec[:1] in "+-" else ""
    n = _size(spec[1:] if sign else spec)
    if sign == "+":
        return current + n
    if sign == "-":
        if n > current:
            raise OutOfRangeError(f"cannot shrink by {n} bytes: the image has only {current}")
        return current - n
    return n


@main.command(context_settings={"ignore_unknown_options": True})
@file_argument
@click.argument("size")
@click.option("--shrink", is_flag=True, help="Allow making the image smaller (data past the new end is lost).")
@output_option
def resize(file: str, size: str, shrink: bool, output: str) -> None:
    """Set the virtual size to SIZE, or grow/shrink it by +SIZE/-SIZE."""
    with _open_or_connect(file, "r+") as d:
        old = d.size
        new = _new_size(size, old)
        if new < old and not shrink:
            _usage(f"shrinking from {old} to {new} bytes loses the data past the new end; pass --shrink")
        d.resize(new)
    if output == "json":
        _emit_json({"filename": file, "virtual-size": new, "old-virtual-size": old})
    else:
        click.echo("Image resized.")


@main.command()
@file_argument
@output_option
def checkpoint(file: str, output: str) -> None:
    """Take a change-tracking point; prints its change id."""
    with _open_or_connect(file, "r+") as d:
        cid = d.checkpoint()
    if output == "json":
        _emit_json({"change_id": cid})
    else:
        click.echo(cid)


@main.command()
@file_argument
@click.option("--since", "since", metavar="ID",
              help="A change id from 'vdisk checkpoint', or '*' for every allocated extent.")
@click.option("--consumer", metavar="NAME", help="Since the last recorded backup of this consumer.")
@output_option
def changes(file: str, since: str | None, consumer: str | None, output: str) -> None:
    """List the extents changed after the point ID (or since a consumer's last backup)."""
    if (since is None) == (consumer is None):
        _usage("give exactly one of --since ID and --consumer NAME")
    from vdisk.changeid import ANY
    with _open_or_connect(file) as d:
        if consumer is not None:
            since = d.consumers.last_id(consumer) or ANY
        extents = d.changes_since(since)
        change_id = d.change_id
    if output == "json":
        _emit_json({"since": since, "change_id": change_id, "extents": extents.to_list(),
                    "bytes": extents.nbytes})
        return
    for o, n in extents:
        click.echo(f"{o} {n}")
    click.echo(f"{_plural(len(extents), 'extent')}, {extents.nbytes} bytes")


# ---------------------------------------------------------------------------- snapshots
@main.group()
def snapshot() -> None:
    """Create, list, delete and revert internal snapshots."""


def _snapshot_json(info: Any) -> dict[str, Any]:
    return {"name": info.name, "change_id": info.change_id, "generation": info.generation,
            "created": info.created.isoformat(), "size": info.size}


@snapshot.command(name="create")
@file_argument
@click.argument("name", required=False)
@output_option
def snapshot_create(file: str, name: str | None, output: str) -> None:
    """Take a snapshot (a generated name when NAME is omitted)."""
    with _open_or_connect(file, "r+") as d:
        info = d.snapshot(name).info
    if output == "json":
        _emit_json(_snapshot_json(info))
    else:
        click.echo(f"{info.name} {info.change_id}")


@snapshot.command(name="list")
@file_argument
@output_option
def snapshot_list(file: str, output: str) -> None:
    """List the snapshots, oldest first."""
    with _open_or_connect(file) as d:
        infos = d.snapshots
    if output == "json":
        _emit_json([_snapshot_json(i) for i in infos])
        return
    width = max([len("NAME")] + [len(i.name) for i in infos])     # a long name widens the column
    click.echo(f"{'NAME':<{width}} {'SIZE':>12} {'CREATED':<20} CHANGE ID")
    for i in infos:
        click.echo(f"{i.name:<{width}} {_fmt_size(i.size):>12} {i.created.strftime('%Y-%m-%d %H:%M:%S'):<20} "
                   f"{i.change_id}")


@snapshot.command(name="delete")
@file_argument
@click.argument("name")
@click.option("--wait", type=float, metavar="SECONDS",
              help="On a served image: wait this long for NBD clients of NAME's export to disconnect.")
def snapshot_delete(file: str, name: str, wait: float | None) -> None:
    """Delete snapshot NAME; its unshared blocks become free."""
    with _open_or_connect(file, "r+") as d:
        d.delete_snapshot(name, **({"wait": wait} if wait is not None and _is_live(d) else {}))


@snapshot.command(name="revert")
@file_argument
@click.argument("name")
def snapshot_revert(file: str, name: str) -> None:
    """Make the disk's content (and size) that of snapshot NAME."""
    with _open_or_connect(file, "r+") as d:
        d.revert(name)


# ---------------------------------------------------------------------------- consumers
@main.group()
def consumer() -> None:
    """Named backup consumers stored in the image, each with its last change id."""


def _consumer_json(info: Any) -> dict[str, Any]:
    return {"name": info.name, "change_id": info.change_id, "created": info.created.isoformat(),
            "updated": info.updated.isoformat()}


@consumer.command(name="register")
@file_argument
@click.argument("name")
@click.option("--change-id", metavar="ID", help="The id of a backup the consumer holds already (default: none).")
def consumer_register(file: str, name: str, change_id: str | None) -> None:
    """Register consumer NAME (its first backup with --consumer is a full one)."""
    with _open_or_connect(file, "r+") as d:
        d.consumers.register(name, change_id)


@consumer.command(name="update")
@file_argument
@click.argument("name")
@click.argument("change_id", metavar="ID")
def consumer_update(file: str, name: str, change_id: str) -> None:
    """Record ID as the last completed backup of consumer NAME."""
    with _open_or_connect(file, "r+") as d:
        d.consumers.update(name, change_id)


@consumer.command(name="forget")
@file_argument
@click.argument("name")
def consumer_forget(file: str, name: str) -> None:
    """Remove consumer NAME from the image."""
    with _open_or_connect(file, "r+") as d:
        d.consumers.forget(name)


@consumer.command(name="list")
@file_argument
@output_option
def consumer_list(file: str, output: str) -> None:
    """List the consumers and the change id of each one's last recorded backup."""
    with _open_or_connect(file) as d:
        infos = d.consumers.values()
    if output == "json":
        _emit_json([_consumer_json(i) for i in infos])
        return
    for i in infos:
        click.echo(f"{i.name}\t{i.change_id or '-'}\t{i.updated.strftime('%Y-%m-%dT%H:%M:%SZ')}")


@main.command()
@file_argument
@progress_option
def compact(file: str, show_progress: bool) -> None:
    """Give unused space inside the image back to the file system."""
    with _open_or_connect(file, "r+") as d, _progress(show_progress, "compact") as bar:
        released = d.compact(progress=bar)
    click.echo(f"Released {_fmt_size(released)}.")


# ---------------------------------------------------------------------------- convert / compare
FORMATS = ("raw", "qcow2", "vdisk")
format_choice = click.Choice(FORMATS)

#: the output format a destination's extension names (convert without -O)
EXTENSION_FORMATS = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw", ".vdk": "vdisk", ".vdisk": "vdisk"}
#: extensions that name no one format, so agree with any -O (qemu users write -O qcow2 disk.img)
GENERIC_EXTENSIONS = {".img"}


def output_format(dst: str, given: str | None) -> str:
    """The format convert writes: -O, else the one DST's extension names, else vdisk.
    An extension that names another format than -O is a usage error."""
    ext = os.path.splitext(dst)[1].lower()
    implied = EXTENSION_FORMATS.get(ext)
    if given is None:
        return implied or "vdisk"
    if implied is not None and implied != given and ext not in GENERIC_EXTENSIONS:
        _usage(f"{dst}: the extension {ext} says {implied}, but -O {given} was given "
               f"(name the file .{ 'vdk' if given == 'vdisk' else given }, or drop -O)")
    return given


@main.command(name="convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("-f", "src_format", type=format_choice, help="Source format (default: detected; else raw).")
@click.option("-O", "dst_format", type=format_choice,
              help="Output format (default: from DST's extension .qcow2, .raw/.img, .vdk; else vdisk).")
@progress_option
@click.option("--allow-backing", is_flag=True,
              help="Follow a qcow2 backing file named relative to, and inside, the image's folder.")
@click.option("--backing", "backing_path", type=click.Path(), metavar="FILE",
              help="Use FILE as the backing file of SRC (implies --allow-backing).")
@click.option("--block-size", metavar="SIZE", help="vdisk block size or qcow2 cluster size (default 64KiB).")
@click.option("--snapshot", metavar="NAME", help="Convert this snapshot of SRC (vdisk, or a qcow2 internal one).")
@click.option("-l", "qcow2_snapshot", metavar="SNAPSHOT",
              help="Convert this internal snapshot of a qcow2 SRC (NAME, snapshot.name=NAME or snapshot.id=ID).")
@click.option("-n", "existing", is_flag=True,
              help="Write into the existing raw, qcow2 (v3) or vdisk image DST (at least as large as SRC), as "
                   "qemu-img -n.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST.")
@output_option
def convert_(src: str, dst: str, src_format: str | None, dst_format: str | None, show_progress: bool,
             allow_backing: bool, backing_path: str | None, block_size: str | None, snapshot: str | None,
             qcow2_snapshot: str | None, existing: bool, overwrite: bool, output: str) -> None:
    """Convert image SRC (raw, qcow2 or vdisk) into a new image DST.

    A vdisk DST is always a new image with a new identity (uuid and tracking epoch): no change id
    of SRC is valid on it, and it has no consumers; a qcow2 SRC's internal snapshots become its
    snapshots (a warning names snapshots left behind). 'vdisk clone' does the same for a vdisk SRC
    keeping its block size, and with --snapshots its snapshots. With -n, DST is an existing raw,
    qcow2 (version 3, e.g. made by qemu-img create -o ...) or vdisk image written in place."""
    from vdisk.convert import convert as convert_image, open_image
    if existing and overwrite:
        _usage("-n writes into the existing DST, --overwrite replaces it: give one")
    if existing and block_size is not None:
        _usage("-n writes into the existing DST, whose block size is its own: drop --block-size")
    if qcow2_snapshot is not None:
        if snapshot is not None:
            _usage("give -l or --snapshot, not both")
        snapshot = qcow2_snapshot
        for prefix in ("snapshot.name=", "snapshot.id="):
            if snapshot.startswith(prefix):
                snapshot = snapshot[len(prefix):]
    if existing and dst_format is None and os.path.splitext(dst)[1].lower() not in EXTENSION_FORMATS \
            and os.path.isfile(dst):
        from vdisk.sources import probe_format
        fmt = probe_format(dst)[0]            # -n without -O: the target's own format
    else:
        fmt = output_format(dst, dst_format)
    bs = None if block_size is None else _size(block_size, "block size")
    with _not_live("convert", src, backing_path), _progress(show_progress, "convert") as bar:
        convert_image(src, dst, src_format=src_format, dst_format=fmt, block_size=bs, snapshot=snapshot,
                      allow_backing=backing_path if backing_path is not None else allow_backing,
                      progress=bar, overwrite=overwrite, existing=existing)
    if output == "json":
        image = open_image(dst, fmt)
        try:
            size = image.size
        finally:
            image.close()
        _emit_json({"source": src, "filename": dst, "format": fmt, "virtual-size": size})


@main.command(name="clone")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--snapshots", is_flag=True, help="Recreate SRC's snapshots in DST (with new change ids).")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST.")
def clone_(src: str, dst: str, snapshots: bool, overwrite: bool) -> None:
    """Copy the vdisk image SRC into DST with a new identity (image uuid, tracking epoch).

    Use it instead of cp for a second disk from one image: DST answers no change id of SRC and
    no delta of one chains onto the other's. Consumers are dropped; DST is sparse and appears
    complete or not at all."""
    with _not_live("clone", src):
        res = vdisk.clone(src, dst, snapshots=snapshots, overwrite=overwrite)
    epoch = f", tracking epoch {res['tracking_id']}" if res["tracking_id"] else ""
    click.echo(f"{dst}: clone of {src} with a new identity (uuid {res['uuid']}{epoch}), {res['snapshots']} snapshots")


@main.command(name="compare")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("-f", "a_format", type=format_choice, help="Format of A (default: detected; else raw).")
@click.option("-F", "b_format", type=format_choice, help="Format of B (default: detected; else raw).")
@click.option("--allow-backing", is_flag=True,
              help="Follow qcow2 backing files named relative to, and inside, the image's folder.")
@progress_option
@output_option
@click.pass_context
def compare_(ctx: click.Context, a: str, b: str, a_format: str | None, b_format: str | None,
             allow_backing: bool, show_progress: bool, output: str) -> None:
    """Compare the content of images A and B (exit 0 identical, 1 different, 2 error)."""
    from vdisk.convert import compare_images
    try:
        with _not_live("compare", a, b), _progress(show_progress, "compare") as bar:
            offset, size_a, size_b = compare_images(a, b, a_format=a_format, b_format=b_format,
                                                    allow_backing=allow_backing, progress=bar)
    except (VdiskError, OSError) as exc:
        _report_error(exc)
        ctx.exit(EXIT_COMPARE_ERROR)
    code = EXIT_OK if offset is None else EXIT_ERROR
    if output == "json":
        _emit_json({"identical": offset is None, "offset": offset,
                    "sector": None if offset is None else offset - offset % 512,
                    "size-a": size_a, "size-b": size_b})
        ctx.exit(code)
    if size_a != size_b and (offset is None or offset >= min(size_a, size_b)):
        click.echo("Warning: Image size mismatch!")     # as qemu-img: once past the common part
    if offset is None:
        click.echo("Images are identical.")
    else:
        # qemu-img reports the 512-byte sector holding the first difference
        click.echo(f"Content mismatch at offset {offset - offset % 512}!")
    ctx.exit(code)


# ---------------------------------------------------------------------------- backups
@main.command(name="backup")
@file_argument
@click.argument("dest", type=click.Path())
@click.option("--since", "since", metavar="ID", default=None,
              help="Back up only the blocks changed after this change id (default: a full backup).")
@click.option("--compression", type=click.Choice(["gzip", "lzf", "none"]), default="gzip", show_default=True,
              help="Compression of the block data in the delta file.")
@click.option("--consumer", metavar="NAME",
              help="Instead of --since: back up since this registered consumer's last backup, then record it.")
@progress_option
@output_option
def backup_(file: str, dest: str, since: str | None, consumer: str | None, compression: str, show_progress: bool,
            output: str) -> None:
    """Back up image FILE to a new delta file DEST; prints the change id to keep for the next --since."""
    from vdisk.backup import backup as backup_image
    with _progress(show_progress, "backup") as bar:
        res = backup_image(file, dest, since=since, compression=compression, progress=bar, consumer=consumer)
    if output == "json":
        _emit_json(res.to_dict())
    else:
        click.echo(res.change_id)


@main.command(name="restore", short_help="Restore a backup chain into TARGET, or advance an earlier restore.")
@click.argument("target", type=click.Path())
@click.argument("deltas", nargs=-1, required=True, type=click.Path())
@click.option("-O", "target_format", type=click.Choice(["vdisk", "raw"]), default=None,
              help="Format of TARGET (default: vdisk; advancing an earlier restore: the format it has).")
@progress_option
@click.option("--overwrite", is_flag=True, help="Restore from scratch, replacing an existing TARGET.")
@output_option
def restore_(target: str, deltas: tuple[str, ...], target_format: str | None, show_progress: bool,
             overwrite: bool, output: str) -> None:
    """Restore the chain DELTA... (a full backup, then its incrementals) into TARGET, or advance a
    TARGET restored earlier by the incrementals that follow it."""
    from vdisk.backup import restore
    with _progress(show_progress, "restore") as bar:
        res = restore(list(deltas), target, format=target_format, progress=bar, overwrite=overwrite)
    if output == "json":
        _emit_json(res)
        return
    how = "advanced" if res["incremental"] else "restored"
    click.echo(f"{target} {how} to {res['change_id']} ({_plural(res['deltas'], 'delta')}, "
               f"{_fmt_size(res['virtual_size'])})")


@main.command(name="verify")
@click.argument("deltas", nargs=-1, required=True, type=click.Path())
@click.option("--chain", "as_chain", is_flag=True,
              help="Also check that DELTA... form one chain, in order (as restore and merge do).")
@progress_option
@output_option
@click.pass_context
def verify_(ctx: click.Context, deltas: tuple[str, ...], as_chain: bool, show_progress: bool, output: str) -> None:
    """Verify delta files completely (exit 0 when all verify, 1 otherwise: one error line per bad file)."""
    from vdisk.backup import verify, verify_chain
    chained = verify_chain(list(deltas)) if as_chain else None    # a broken link: one error line, exit 1
    results, bad = [], 0
    for i, path in enumerate(deltas):
        try:
            if chained is not None:
                summary = chained[i]
            else:
                with _progress(show_progress, f"verify {os.path.basename(path)}") as bar:
                    summary = verify(path, progress=bar)
        except (VdiskError, OSError) as exc:
            bad += 1
            _report_error(exc)
            results.append({"path": path, "ok": False, "error": _error_message(exc)})
            continue
        results.append(dict(summary, ok=True))
        if output != "json":
            kind = "full" if summary["full"] else f"since {summary['since']}"
            click.echo(f"{path}: ok, {kind} -> {summary['change_id']}, {_plural(summary['extents'], 'extent')}, "
                       f"{summary['bytes']} bytes")
    if output != "json":
        _report_partials(results)
    if output == "json":
        _emit_json(results)
    ctx.exit(EXIT_ERROR if bad else EXIT_OK)


def _report_partials(results: list[dict[str, Any]]) -> None:
    """One line per abandoned partial delta beside the verified ones (each once)."""
    seen: set[str] = set()
    for res in results:
        for partial in res.get("abandoned_partials", ()):
            if partial in seen:
                continue
            seen.add(partial)
            try:
                size = _fmt_size(os.path.getsize(partial))
            except OSError:
                continue                      # removed meanwhile
            click.echo(f"{partial}: abandoned partial delta of a killed backup or merge ({size}); the next "
                       f"backup or merge into {os.path.dirname(partial)} removes it")


@main.command(name="merge")
@click.argument("dest", type=click.Path())
@click.argument("deltas", nargs=-1, required=True, type=click.Path())
@progress_option
@output_option
def merge_(dest: str, deltas: tuple[str, ...], show_progress: bool, output: str) -> None:
    """Merge the chain DELTA... into one full backup DEST; prints its change id."""
    from vdisk.backup import merge
    with _progress(show_progress, "merge") as bar:
        res = merge(list(deltas), dest, progress=bar)
    if output == "json":
        _emit_json(res.to_dict())
    else:
        click.echo(res.change_id)


@main.command(name="serve")
@file_argument
@click.option("--socket", "socket_path", type=click.Path(), help="Listen on this unix socket (created mode 0600).")
@click.option("--listen", metavar="HOST:PORT",
              help="Listen on TCP; a non-loopback address needs TLS or --insecure.")
@click.option("--export", "export_name", metavar="NAME",
              help="Export name of the live image (default: the file name without extension).")
@click.option("--read-only", is_flag=True, help="Serve read-only (writes are answered EPERM).")
@click.option("--pid-file", type=click.Path(), help="Write the server's pid here once listening.")
@click.option("--tls-cert", type=click.Path(), help="Server certificate (PEM): TLS is then required.")
@click.option("--tls-key", type=click.Path(), help="Private key of --tls-cert (PEM).")
@click.option("--tls-ca", type=click.Path(), help="Accept only clients with a certificate this CA signed.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --listen without TLS.")
@click.option("--poll-us", type=click.IntRange(0, 1000), metavar="MICROSECONDS",     # 1000: polling.MAX_POLL_US
              help="Spin up to this long for the next request after replying, while requests come that fast "
                   "(default 50; 0: off).")
def serve_(file: str, socket_path: str | None, listen: str | None, export_name: str | None, read_only: bool,
           pid_file: str | None, tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
           insecure: bool, poll_us: int | None) -> None:
    """Serve FILE over NBD until SIGTERM/SIGINT (then flush and exit 0).

    Exports: "" and NAME are the live image, NAME@SNAPSHOT each snapshot
    (read-only).  Meta contexts: base:allocation, qemu:dirty-bitmap:CONSUMER,
    qemu:dirty-bitmap:CHANGE-ID.
    """
    import logging

    from vdisk.nbd import Server
    if (socket_path is None) == (listen is None):
        raise click.UsageError("give exactly one of --socket PATH or --listen HOST:PORT")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vdisk serve: %(message)s"))
    logger = logging.getLogger("vdisk.nbd")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    polling = {} if poll_us is None else {"poll_us": poll_us}      # default: vdisk/nbd/polling.py
    Server(file, socket=socket_path, listen=listen, export=export_name, read_only=read_only, pid_file=pid_file,
           tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, insecure=insecure, **polling).run()


if __name__ == "__main__":
    main()
