"""The ``vdisk`` command line, in the manner of ``qemu-img``.

Commands::

    vdisk create FILE SIZE [--block-size N] [--no-track-changes] [--overwrite]
    vdisk info FILE [--output human|json]
    vdisk check FILE [--repair] [--output human|json]
    vdisk map FILE [--output human|json]
    vdisk resize FILE [+|-]SIZE
    vdisk checkpoint FILE
    vdisk changes FILE --since ID|* [--output human|json]
    vdisk convert [-f FMT] [-O FMT] [-p] [--allow-backing] [--backing FILE] [--block-size N]
                  [--snapshot NAME] [--overwrite] SRC DST
    vdisk compare [-f FMT] [-F FMT] [--allow-backing] A B
    vdisk serve FILE (--socket PATH | --listen HOST:PORT) [--export NAME] [--read-only] [--pid-file PATH]
                [--tls-cert F --tls-key F [--tls-ca F]] [--insecure]

Sizes are bytes or take a unit: 512, 64KiB, 10GiB, 1G (K/M/G/T are binary).

Exit codes
----------
0   success (for ``check``: the image is clean)
1   error: the operation failed, or ``check`` could not check the image
    (not a vdisk image, locked, unreadable, ...)
2   usage error (unknown command or option, missing argument);
    for ``check``: the image is corrupt
3   ``check`` only: leaked blocks were found, but no corruption

``compare`` follows ``qemu-img compare`` instead: 0 the images are
identical, 1 they differ, 2 an error (the one error line, as above).

Every error is reported as exactly one line on stderr,
``vdisk: error: <message>``, never as a traceback.  A traceback means a
bug in vdisk.
"""
from __future__ import annotations

import json
import os
import sys

import click

import vdisk
from vdisk.layout import format_size

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3


# ---------------------------------------------------------------------------- errors
def _error_message(exc: BaseException) -> str:
    """One line describing a user-facing error."""
    if isinstance(exc, click.UsageError):
        msg = exc.format_message()
        if exc.ctx is not None:
            msg += f" (try '{exc.ctx.command_path} --help')"
    elif isinstance(exc, click.ClickException):
        msg = exc.format_message()
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


class VdiskGroup(click.Group):
    """A click group that turns user errors into one ``vdisk: error:`` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if prog_name is None:
            prog_name = "vdisk"
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            # non-standalone: exceptions reach us, and ctx.exit(n) comes back as n
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            _report_error(exc)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("vdisk: error: aborted", err=True)
            sys.exit(EXIT_ERROR)
        except (vdisk.VdiskError, OSError) as exc:
            _report_error(exc)
            sys.exit(EXIT_ERROR)
        # the commands return None; an int is an exit code from ctx.exit()
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


# ---------------------------------------------------------------------------- shared helpers
output_option = click.option(
    "--output", type=click.Choice(["human", "json"]), default="human", show_default=True,
    help="Output format.")

file_argument = click.argument("file", type=click.Path())


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def _size(text: str, what: str = "size") -> int:
    return vdisk.parse_size(text, what)


def _table(rows: list[tuple[str, object]]) -> None:
    """Print aligned ``key: value`` lines."""
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        click.echo(f"{key + ':':<{width}}{value}")


# ---------------------------------------------------------------------------- commands
@click.group(cls=VdiskGroup, context_settings={"help_option_names": ["--help"]})
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
    """Create an image FILE of virtual size SIZE."""
    nbytes = _size(size)
    bs = _size(block_size, "block size")
    if os.path.exists(file) and not overwrite:
        raise vdisk.InvalidArgumentError(f"{file} exists (use --overwrite to replace it)")
    with vdisk.create(file, nbytes, block_size=bs, overwrite=overwrite,
                      track_changes=not no_track_changes) as d:
        click.echo(f"Formatting '{file}', fmt=vdisk size={d.size} block_size={d.block_size}")


@main.command()
@file_argument
@output_option
def info(file: str, output: str) -> None:
    """Show the image's geometry, allocation and tracking state."""
    with vdisk.open(file) as d:
        data = d.info()
    if output == "json":
        _emit_json(data)
        return
    rows = [
        ("image", data["path"]),
        ("file format", data["format"]),
        ("version", data["version"]),
        ("virtual size", f"{format_size(data['virtual_size'])} ({data['virtual_size']} bytes)"),
        ("block size", data["block_size"]),
        ("allocated", f"{format_size(data['allocated_bytes'])} ({data['allocated_blocks']} blocks)"),
        ("file size", f"{format_size(data['file_size'])} ({data['file_size']} bytes)"),
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
    _table(rows)


def _check_exit_code(result: vdisk.CheckResult) -> int:
    if result.corruptions:
        return EXIT_CORRUPT
    if result.leaked_blocks:
        return EXIT_LEAKS
    return EXIT_OK


def _print_findings(result: vdisk.CheckResult) -> None:
    for msg in result.corruptions:
        click.echo(f"ERROR {msg}")
    if result.corruptions:
        click.echo(f"\n{len(result.corruptions)} errors were found on the image.")
        click.echo("Data may be corrupted, or further writes to the image may corrupt it.")
    if result.leaked_blocks:
        if result.corruptions:
            click.echo()
        click.echo(f"{result.leaked_blocks} leaked clusters were found on the image.")
        click.echo("This means waste of disk space, but no harm to data.")
    if not result.corruptions and not result.leaked_blocks:
        click.echo("No errors were found on the image.")


@main.command()
@file_argument
@click.option("--repair", is_flag=True, help="Repair leaks and corruptions.")
@output_option
@click.pass_context
def check(ctx: click.Context, file: str, repair: bool, output: str) -> None:
    """Check the image for consistency (exit 0 clean, 2 corrupt, 3 leaks, 1 could not check)."""
    before = result = vdisk.check(file)
    if repair and not before.ok:
        # check(repair=True) reports the state after the repair; ``before`` says what it fixed
        result = vdisk.check(file, repair=True)
    if output == "json":
        data = result.to_dict()
        data.update({
            "filename": file, "format": "vdisk", "check-errors": 0,
            "corruption-count": len(result.corruptions), "leaks": result.leaked_blocks,
        })
        if result.repaired:
            data.update({"corruptions-fixed": len(before.corruptions) - len(result.corruptions),
                         "leaks-fixed": before.leaked_blocks - result.leaked_blocks})
        _emit_json(data)
    else:
        if result.repaired:
            click.echo("The following inconsistencies were found and repaired:\n")
            click.echo(f"    {before.leaked_blocks} leaked clusters")
            click.echo(f"    {len(before.corruptions)} corruptions\n")
            click.echo("Double checking the fixed image now...")
        _print_findings(result)
        if result.total_blocks:
            pct = 100.0 * result.allocated_blocks / result.total_blocks
            click.echo(f"{result.allocated_blocks}/{result.total_blocks} = {pct:.2f}% allocated")
        click.echo(f"Image end offset: {result.image_end_offset}")
    ctx.exit(_check_exit_code(result))


@main.command(name="map")
@file_argument
@output_option
def map_(file: str, output: str) -> None:
    """List the allocated (data) extents of the image."""
    with vdisk.open(file) as d:
        extents = list(d.map())
    if output == "json":
        _emit_json([{"offset": o, "length": n, "data": True} for o, n in extents])
        return
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
            raise vdisk.OutOfRangeError(f"cannot shrink by {n} bytes: the image has only {current}")
        return current - n
    return n


@main.command(context_settings={"ignore_unknown_options": True})
@file_argument
@click.argument("size")
@click.option("--shrink", is_flag=True, help="Allow making the image smaller (data past the new end is lost).")
def resize(file: str, size: str, shrink: bool) -> None:
    """Set the virtual size to SIZE, or grow/shrink it by +SIZE/-SIZE."""
    with vdisk.open(file, "r+") as d:
        new = _new_size(size, d.size)
        if new < d.size and not shrink:
            raise click.UsageError(
                f"shrinking from {d.size} to {new} bytes loses the data past the new end; pass --shrink")
        d.resize(new)
    click.echo("Image resized.")


@main.command()
@file_argument
def checkpoint(file: str) -> None:
    """Take a change-tracking point; prints its change id."""
    with vdisk.open(file, "r+") as d:
        cid = d.checkpoint()
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
        raise click.UsageError("give exactly one of --since ID and --consumer NAME")
    with vdisk.open(file) as d:
        if consumer is not None:
            since = d.consumers.last_id(consumer) or "*"
        extents = d.changes_since(since)
        change_id = d.change_id
    if output == "json":
        _emit_json({"since": since, "change_id": change_id, "extents": extents.to_list(),
                    "bytes": extents.nbytes})
        return
    for o, n in extents:
        click.echo(f"{o} {n}")
    click.echo(f"{len(extents)} extents, {extents.nbytes} bytes")


# ---------------------------------------------------------------------------- snapshots
@main.group()
def snapshot() -> None:
    """Create, list, delete and revert internal snapshots."""


def _snapshot_json(info: vdisk.SnapshotInfo) -> dict:
    return {"name": info.name, "change_id": info.change_id, "generation": info.generation,
            "created": info.created.isoformat(), "size": info.size}


@snapshot.command(name="create")
@file_argument
@click.argument("name", required=False)
@output_option
def snapshot_create(file: str, name: str | None, output: str) -> None:
    """Take a snapshot (a generated name when NAME is omitted)."""
    with vdisk.open(file, "r+") as d:
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
    with vdisk.open(file) as d:
        infos = d.snapshots
    if output == "json":
        _emit_json([_snapshot_json(i) for i in infos])
        return
    click.echo(f"{'NAME':<24} {'SIZE':>12} {'CREATED':<20} CHANGE ID")
    for i in infos:
        click.echo(f"{i.name:<24} {format_size(i.size):>12} {i.created.strftime('%Y-%m-%d %H:%M:%S'):<20} "
                   f"{i.change_id}")


@snapshot.command(name="delete")
@file_argument
@click.argument("name")
def snapshot_delete(file: str, name: str) -> None:
    """Delete snapshot NAME; its unshared blocks become free."""
    with vdisk.open(file, "r+") as d:
        d.delete_snapshot(name)


@snapshot.command(name="revert")
@file_argument
@click.argument("name")
def snapshot_revert(file: str, name: str) -> None:
    """Make the disk's content (and size) that of snapshot NAME."""
    with vdisk.open(file, "r+") as d:
        d.revert(name)


# ---------------------------------------------------------------------------- consumers
@main.group()
def consumer() -> None:
    """Named backup consumers stored in the image, each with its last change id."""


def _consumer_json(info) -> dict:
    return {"name": info.name, "change_id": info.change_id, "created": info.created.isoformat(),
            "updated": info.updated.isoformat()}


@consumer.command(name="register")
@file_argument
@click.argument("name")
@click.option("--change-id", metavar="ID", help="The id of a backup the consumer holds already (default: none).")
def consumer_register(file: str, name: str, change_id: str | None) -> None:
    """Register consumer NAME (its first backup with --consumer is a full one)."""
    with vdisk.open(file, "r+") as d:
        d.consumers.register(name, change_id)


@consumer.command(name="update")
@file_argument
@click.argument("name")
@click.argument("change_id", metavar="ID")
def consumer_update(file: str, name: str, change_id: str) -> None:
    """Record ID as the last completed backup of consumer NAME."""
    with vdisk.open(file, "r+") as d:
        d.consumers.update(name, change_id)


@consumer.command(name="forget")
@file_argument
@click.argument("name")
def consumer_forget(file: str, name: str) -> None:
    """Remove consumer NAME from the image."""
    with vdisk.open(file, "r+") as d:
        d.consumers.forget(name)


@consumer.command(name="list")
@file_argument
@output_option
def consumer_list(file: str, output: str) -> None:
    """List the consumers and the change id of each one's last recorded backup."""
    with vdisk.open(file) as d:
        infos = d.consumers.values()
    if output == "json":
        _emit_json([_consumer_json(i) for i in infos])
        return
    for i in infos:
        click.echo(f"{i.name}\t{i.change_id or '-'}\t{i.updated.strftime('%Y-%m-%dT%H:%M:%SZ')}")


@main.command()
@file_argument
def compact(file: str) -> None:
    """Give unused space inside the image back to the file system."""
    with vdisk.open(file, "r+") as d:
        released = d.compact()
    click.echo(f"Released {format_size(released)}.")

# ---------------------------------------------------------------------------- convert / compare
format_choice = click.Choice(["raw", "qcow2", "vdisk"])


class _ProgressBar:
    """A tqdm bar on stderr fed by convert's progress(done, total) callback."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                            desc=self.desc, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@main.command(name="convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("-f", "src_format", type=format_choice, help="Source format (default: detected; else raw).")
@click.option("-O", "dst_format", type=click.Choice(["vdisk", "raw", "qcow2"]), default="vdisk",
              show_default=True, help="Output format.")
@click.option("-p", "show_progress", is_flag=True, help="Show a progress bar on stderr.")
@click.option("--allow-backing", is_flag=True,
              help="Follow a qcow2 backing file named relative to, and inside, the image's folder.")
@click.option("--backing", "backing_path", type=click.Path(), metavar="FILE",
              help="Use FILE as the backing file of SRC (implies --allow-backing).")
@click.option("--block-size", metavar="SIZE", help="vdisk block size or qcow2 cluster size (default 64KiB).")
@click.option("--snapshot", metavar="NAME", help="Convert this snapshot of a vdisk SRC.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DST.")
def convert_(src: str, dst: str, src_format: str | None, dst_format: str, show_progress: bool,
             allow_backing: bool, backing_path: str | None, block_size: str | None, snapshot: str | None,
             overwrite: bool) -> None:
    """Convert image SRC (raw, qcow2 or vdisk) into a new image DST."""
    bs = None if block_size is None else _size(block_size, "block size")
    bar = _ProgressBar("convert") if show_progress else None
    try:
        vdisk.convert(src, dst, src_format=src_format, dst_format=dst_format, block_size=bs, snapshot=snapshot,
                      allow_backing=backing_path if backing_path is not None else allow_backing,
                      progress=bar, overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()


@main.command(name="compare")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("-f", "a_format", type=format_choice, help="Format of A (default: detected; else raw).")
@click.option("-F", "b_format", type=format_choice, help="Format of B (default: detected; else raw).")
@click.option("--allow-backing", is_flag=True,
              help="Follow qcow2 backing files named relative to, and inside, the image's folder.")
@click.pass_context
def compare_(ctx: click.Context, a: str, b: str, a_format: str | None, b_format: str | None,
             allow_backing: bool) -> None:
    """Compare the content of images A and B (exit 0 identical, 1 different, 2 error)."""
    from vdisk.convert import compare_images
    try:
        offset, size_a, size_b = compare_images(a, b, a_format=a_format, b_format=b_format,
                                                allow_backing=allow_backing)
    except (vdisk.VdiskError, OSError) as exc:
        _report_error(exc)
        ctx.exit(EXIT_CORRUPT)      # qemu-img compare: 2 on error
    if size_a != size_b and (offset is None or offset >= min(size_a, size_b)):
        click.echo("Warning: Image size mismatch!")     # as qemu-img: once past the common part
    if offset is None:
        click.echo("Images are identical.")
        ctx.exit(EXIT_OK)
    # qemu-img reports the 512-byte sector holding the first difference
    click.echo(f"Content mismatch at offset {offset - offset % 512}!")
    ctx.exit(EXIT_ERROR)


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
@click.option("-p", "show_progress", is_flag=True, help="Show a progress bar on stderr.")
@output_option
def backup_(file: str, dest: str, since: str | None, consumer: str | None, compression: str, show_progress: bool,
            output: str) -> None:
    """Back up image FILE to a new delta file DEST; prints the change id to keep for the next --since."""
    bar = _ProgressBar("backup") if show_progress else None
    try:
        res = vdisk.backup(file, dest, since=since, compression=compression, progress=bar, consumer=consumer)
    finally:
        if bar is not None:
            bar.close()
    if output == "json":
        _emit_json(res.to_dict())
    else:
        click.echo(res.change_id)


@main.command(name="restore")
@click.argument("target", type=click.Path())
@click.argument("deltas", nargs=-1, required=True, type=click.Path())
@click.option("-O", "target_format", type=click.Choice(["vdisk", "raw"]), default="vdisk", show_default=True,
              help="Format of TARGET.")
@click.option("-p", "show_progress", is_flag=True, help="Show a progress bar on stderr.")
@click.option("--overwrite", is_flag=True, help="Restore from scratch, replacing an existing TARGET.")
def restore_(target: str, deltas: tuple[str, ...], target_format: str, show_progress: bool, overwrite: bool) -> None:
    """Restore the chain DELTA... (a full backup, then its incrementals) into TARGET, or advance a
    TARGET restored earlier by the incrementals that follow it."""
    bar = _ProgressBar("restore") if show_progress else None
    try:
        res = vdisk.restore(list(deltas), target, format=target_format, progress=bar, overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()
    how = "advanced" if res["incremental"] else "restored"
    click.echo(f"{target} {how} to {res['change_id']} ({res['deltas']} deltas, {format_size(res['virtual_size'])})")


@main.command(name="verify")
@click.argument("deltas", nargs=-1, required=True, type=click.Path())
@output_option
@click.pass_context
def verify_(ctx: click.Context, deltas: tuple[str, ...], output: str) -> None:
    """Verify delta files completely (exit 0 when all verify, 1 otherwise: one error line per bad file)."""
    results, bad = [], 0
    for path in deltas:
        try:
            summary = vdisk.verify(path)
        except (vdisk.VdiskError, OSError) as exc:
            bad += 1
            _report_error(exc)
            results.append({"path": path, "ok": False, "error": _error_message(exc)})
            continue
        results.append(dict(summary, ok=True))
        if output != "json":
            kind = "full" if summary["full"] else f"since {summary['since']}"
            click.echo(f"{path}: ok, {kind} -> {summary['change_id']}, {summary['extents']} extents, "
                       f"{summary['bytes']} bytes")
    if output == "json":
        _emit_json(results)
    ctx.exit(EXIT_ERROR if bad else EXIT_OK)


@main.command(name="merge")
@click.argument("dest", type=click.Path())
@click.argument("deltas", nargs=-1, required=True, type=click.Path())
def merge_(dest: str, deltas: tuple[str, ...]) -> None:
    """Merge the chain DELTA... into one full backup DEST; prints its change id."""
    res = vdisk.merge(list(deltas), dest)
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
def serve_(file: str, socket_path: str | None, listen: str | None, export_name: str | None, read_only: bool,
           pid_file: str | None, tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
           insecure: bool) -> None:
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
    Server(file, socket=socket_path, listen=listen, export=export_name, read_only=read_only, pid_file=pid_file,
           tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, insecure=insecure).run()


if __name__ == "__main__":
    main()
