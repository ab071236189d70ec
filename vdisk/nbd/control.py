"""The control channel of ``vdisk serve``: live operations on the served image.

The wire, the socket's place and its permissions are declared in
vdisk/live.py (the client side).  This module listens and carries out the
operations on the server's one open Disk.

Where each operation runs
-------------------------
* In the loop's thread, like every NBD command: the short ones (info, map,
  changes, checkpoint, snapshot create/list/delete/revert, consumer
  register/update/forget/list, clients).  A snapshot delete and a revert
  check the connected clients and act in the same step, so no client can
  connect to what they remove in between.
  They are answered while a backup or a check runs (they do not wait for it).
* In one worker thread, one at a time: ``backup``, ``check`` and ``compact``.  A backup
  reads a snapshot, a frozen view: its reads take the Disk's lock for one
  batch each (ViewHost.read_through), so live NBD writes interleave with the
  copy; the snapshot taken, the consumer recorded and the snapshot deleted
  are each one short locked step.  ``check`` flushes and then holds the
  Disk's lock for the whole check (NBD requests wait meanwhile): it reads
  the file, which must not change under it.  ``compact`` is Disk.compact:
  it holds the Disk's lock while it flushes, punches the free blocks and
  cuts the free tail (a killed writer's leak among them) off the file.

Operations (``args`` of the request; the result)
------------------------------------------------
hello                              {pid, path, export, address, read_only, version}
info                               Disk.info()
map                                [[offset, length], ...] allocated
host_map                           [[offset, length, host offset], ...] (Disk.host_map)
changes {since | consumer}         {since, change_id, extents: [[offset, length], ...]}
checkpoint                         the new change id
snapshot_create {name?}            {name, change_id, generation, created, size}
snapshot_list                      [{name, change_id, ...}, ...]
snapshot_delete {name, wait?}      null; refused (ImageLockedError) while clients read NAME@S,
                                   unless they leave within wait seconds
snapshot_revert {name}             null; refused (ImageLockedError) while a client is connected
                                   to the live export
consumer_register {name, change_id?}, consumer_update {name, change_id}: the consumer's record
consumer_forget {name}             null
consumer_list                      [{name, change_id, generation, created, updated}, ...]
backup {dest, since?, consumer?, compression?}   BackupResult.to_dict() and extent_runs
check                              CheckResult.to_dict() of the flushed state
compact                            {released: bytes given back, blocks: the file's blocks after};
                                   refused (ReadOnlyError) by a --read-only server
clients                            {export name: connected clients}

Isolation: a control client is one task of the loop; whatever it sends,
it is answered or disconnected, and NBD connections do not notice.  A
request line longer than MAX_REQUEST is answered with an error and the
connection closed (its framing is lost); a line that is not a JSON object
with a known op is answered with an error and the connection goes on.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import os
import socket as _socket
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Literal, TypeVar, overload

from .. import errors, live
from ..changeid import ANY

if TYPE_CHECKING:
    from ..consumers import ConsumerInfo
    from ..results import CheckResult, CheckResultDict, ImageInfo
    from .server import Server

T = TypeVar("T")
#: an operation: a coroutine function (ControlServer, **args) -> its JSON result
Op = TypeVar("Op", bound=Callable[..., Coroutine[Any, Any, object]])

log = logging.getLogger("vdisk.nbd")

MAX_CLIENTS = 32        # control connections at once; more are answered an error and closed
_LONG = frozenset(("backup", "check", "compact"))      # the operations of the worker thread


class ControlServer:
    """The control listener of one nbd.Server (started and stopped by it)."""

    def __init__(self, server: Server):
        self.server = server
        self.disk = server.disk
        self.path: str | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._ino: int | None = None
        # backups and checks are carried out one at a time (made in the loop: Server.start makes us)
        self._lock = asyncio.Lock()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vdisk-nbd-control")
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            path = live.control_path(self.disk.path, create_dir=True)
        except (OSError, errors.ControlError) as exc:
            log.warning("control channel not started: %s", exc)
            return
        probe = live.find_server(self.disk.path, timeout=2)
        if probe is not None:           # another (read-only) server of this image has it
            probe.close()
            log.warning("control channel not started: another server of %s listens on %s", self.disk.path, path)
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        old = os.umask(0o177)           # born 0600, under a name no client looks for
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(16)
            os.rename(tmp, path)        # atomically replaces a stale socket of a killed server
        except OSError as exc:
            sock.close()
            log.warning("control channel not started: %s: %s", path, exc.strerror or exc)
            return
        finally:
            os.umask(old)
        self._ino = os.stat(path).st_ino
        self._listener = await asyncio.start_unix_server(self._client, sock=sock, limit=live.MAX_REQUEST)
        self.path = path
        log.info("control channel on %s", path)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self.path is not None:
            try:
                if os.stat(self.path).st_ino == self._ino:      # still ours
                    os.unlink(self.path)
            except OSError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self._worker.shutdown, True)

    # ---------------------------------------------------------------- one client
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None                 # start_unix_server runs each client as a task
        self._tasks.add(task)
        try:
            if len(self._tasks) > MAX_CLIENTS:
                writer.write(live.encode(live.error_answer(errors.ControlError(
                    f"{MAX_CLIENTS} control clients are connected already; try again later"))))
                await writer.drain()
                return
            if not self._peer_allowed(writer):
                writer.write(live.encode(live.error_answer(errors.ControlError(
                    "the control channel serves only the server's own user"))))
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return                   # EOF (a partial line without newline is dropped)
                except asyncio.LimitOverrunError:
                    writer.write(live.encode(live.error_answer(errors.ControlError(
                        f"request longer than {live.MAX_REQUEST} bytes; closing the control connection"))))
                    await writer.drain()
                    return
                answer = await self._answer(line)
                writer.write(live.encode(answer))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:             # a bug: this control client only
            log.exception("control client: internal error %s; disconnected", exc)
        finally:
            self._tasks.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
        except (OSError, AttributeError):
            return True                      # no SO_PEERCRED here: the 0600 mode is the guard
        _pid, uid, _gid = struct.unpack("3i", raw)
        if uid in (os.geteuid(), 0):
            return True
        log.warning("control channel: refused a client of uid %d", uid)
        return False

    async def _answer(self, line: bytes) -> live.Wire:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):         # RecursionError: nesting deeper than the parser goes
            return live.error_answer(errors.ControlError("the request is not a line of JSON"))
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return live.error_answer(errors.ControlError('the request must be a JSON object {"op": NAME, "args": {...}}'))
        args = req.get("args", {})
        if not isinstance(args, dict):
            return live.error_answer(errors.ControlError(f"request {req['op']!r}: args must be a JSON object"))
        handler = _OPS.get(req["op"])
        if handler is None:
            return live.error_answer(errors.ControlError(
                f"unknown operation {req['op'][:64]!r} (known: {', '.join(sorted(_OPS))})"))
        try:
            inspect.signature(handler).bind(self, **args)
        except TypeError as exc:
            return live.error_answer(errors.ControlError(f"operation {req['op']!r}: bad arguments ({exc})"))
        image = self.server.image
        image.touch()                       # any operation may change the Disk: block status
        try:                                # answers computed before or during it are stale
            if req["op"] in _LONG:
                async with self._lock:      # one backup or check at a time
                    result = await handler(self, **args)
            else:                           # runs in the loop, between the steps of a long one
                result = await handler(self, **args)
        except errors.VdiskError as exc:
            return live.error_answer(exc)
        except OSError as exc:
            return live.error_answer(errors.VdiskIOError(exc.errno, f"{exc.strerror or exc}"
                                                         + (f": {exc.filename}" if exc.filename else "")))
        except Exception as exc:
            log.exception("control operation %s failed: %s", req["op"], exc)
            return live.error_answer(errors.VdiskError(f"operation {req['op']!r} failed: {exc}"))
        finally:
            image.touch()
        return {"ok": True, "result": result}

    # ---------------------------------------------------------------- helpers
    def _in_worker(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._worker, fn)

    def _served(self, what: str) -> str:
        return (f"{self.disk.path} is served by vdisk serve (pid {os.getpid()}, {self.server.address}): "
                f"{what}")


def _op(fn: Op) -> Op:
    _OPS[fn.__name__[4:]] = fn
    return fn


_OPS: dict[str, Callable[..., Coroutine[Any, Any, object]]] = {}


@overload
def _str(value: object, what: str, optional: Literal[False] = False) -> str: ...
@overload
def _str(value: object, what: str, optional: Literal[True]) -> str | None: ...


def _str(value: object, what: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise errors.InvalidArgumentError(f"{what} must be a string, not {type(value).__name__}")
    return value


@_op
async def _op_hello(c: ControlServer) -> live.Wire:
    from .. import __version__
    return {"pid": os.getpid(), "path": c.disk.path, "export": c.server.image.name, "address": c.server.address,
            "read_only": c.server.image.read_only, "version": __version__}


@_op
async def _op_info(c: ControlServer) -> ImageInfo:
    return c.disk.info()


@_op
async def _op_map(c: ControlServer) -> list[list[int]]:
    return live.extents_list(c.disk.map())


@_op
async def _op_host_map(c: ControlServer) -> list[list[int]]:
    return [list(run) for run in c.disk.host_map()]


@_op
async def _op_changes(c: ControlServer, since: object = None, consumer: object = None) -> live.Wire:
    if (since is None) == (consumer is None):
        raise errors.InvalidArgumentError("give exactly one of since and consumer")
    if consumer is not None:
        since = c.disk.consumers.last_id(_str(consumer, "consumer")) or ANY
    ext = c.disk.changes_since(_str(since, "since"))
    return {"since": since, "change_id": c.disk.change_id, "extents": live.extents_list(ext)}


@_op
async def _op_checkpoint(c: ControlServer) -> str:
    cid = c.disk.checkpoint()
    return cid


@_op
async def _op_snapshot_create(c: ControlServer, name: object = None) -> live.Wire:
    snap = c.disk.snapshot(_str(name, "name", optional=True))
    try:
        info = snap.info
    finally:
        snap.close()
    return live.snapshot_dict(info)


@_op
async def _op_snapshot_list(c: ControlServer) -> list[live.Wire]:
    return [live.snapshot_dict(i) for i in c.disk.snapshots]


@_op
async def _op_snapshot_delete(c: ControlServer, name: object, wait: object = None) -> None:
    name = _str(name, "name")
    seconds: float | None = None
    if wait is not None:
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 86400:
            raise errors.InvalidArgumentError(f"wait {wait!r}: seconds from 0 to 86400")
        seconds = wait
    export = f"{c.server.image.name}@{name}"
    deadline = time.monotonic() + (seconds or 0)
    while True:
        if name not in {s.name for s in c.disk.snapshots}:
            raise errors.SnapshotNotFoundError(f"{c.disk.path}: no snapshot named {name!r}")
        n = c.server.export_clients().get(export, 0)
        if not n:
            break
        if time.monotonic() >= deadline:
            waited = f" after waiting {seconds:g}s" if seconds else ""
            raise errors.ImageLockedError(c._served(
                f"snapshot {name!r} is read by {n} NBD client{'s' if n > 1 else ''} of export {export!r}{waited}; "
                f"delete it once they disconnect (or pass --wait SECONDS)"))
        await asyncio.sleep(0.05)
    c.disk.delete_snapshot(name)         # same step as the count: no client can connect in between


@_op
async def _op_snapshot_revert(c: ControlServer, name: object) -> None:
    name = _str(name, "name")
    if name not in {s.name for s in c.disk.snapshots}:
        raise errors.SnapshotNotFoundError(f"{c.disk.path}: no snapshot named {name!r}")
    n = c.server.export_clients().get(c.server.image.name, 0)
    if n:
        raise errors.ImageLockedError(c._served(
            f"cannot revert to snapshot {name!r} while {n} NBD client{'s are' if n > 1 else ' is'} connected to "
            f"the live export (the guest would see its disk change under it); disconnect them first"))
    c.disk.revert(name)


def _consumer(info: ConsumerInfo) -> live.Wire:
    return live.consumer_dict(info)


@_op
async def _op_consumer_register(c: ControlServer, name: object, change_id: object = None) -> live.Wire:
    info = c.disk.consumers.register(_str(name, "name"), _str(change_id, "change_id", optional=True))
    return _consumer(info)


@_op
async def _op_consumer_update(c: ControlServer, name: object, change_id: object) -> live.Wire:
    info = c.disk.consumers.update(_str(name, "name"), _str(change_id, "change_id"))
    return _consumer(info)


@_op
async def _op_consumer_forget(c: ControlServer, name: object) -> None:
    c.disk.consumers.forget(_str(name, "name"))


@_op
async def _op_consumer_list(c: ControlServer) -> list[live.Wire]:
    return [_consumer(i) for i in c.disk.consumers.values()]


@_op
async def _op_clients(c: ControlServer) -> dict[str, int]:
    return dict(c.server.export_clients())


@_op
async def _op_backup(c: ControlServer, dest: object, since: object = None, consumer: object = None,
                     compression: object = "gzip") -> live.Wire:
    from ..backup import backup as run_backup
    path = _str(dest, "dest")
    if not os.path.isabs(path):
        raise errors.InvalidArgumentError(f"dest {path!r}: the server needs an absolute path")
    since_id = _str(since, "since", optional=True)
    consumer_name = _str(consumer, "consumer", optional=True)
    res = await c._in_worker(lambda: run_backup(c.disk, path, since=since_id, consumer=consumer_name,
                                                compression=_str(compression, "compression")))
    out: live.Wire = {**res.to_dict(), "extent_runs": live.extents_list(res.extents)}
    return out


@_op
async def _op_compact(c: ControlServer) -> live.Wire:
    if c.server.image.read_only:
        raise errors.ReadOnlyError(c._served("it is served read-only, and compact writes the image; serve it "
                                             "without --read-only, or stop the server first"))
    seen = [0]

    def run() -> live.Wire:
        released = c.disk.compact(progress=lambda done, total: seen.__setitem__(0, total))
        return {"released": released, "blocks": seen[0]}
    return await c._in_worker(run)


@_op
async def _op_check(c: ControlServer) -> CheckResultDict:
    from ..check import _check as check_file
    from ..fileio import FileIO

    def run() -> CheckResult:
        disk = c.disk
        with disk.quiesced():               # the file must not change while check reads it
            fio = FileIO(disk.path, writable=False)
            try:
                return check_file(fio, repair=False)
            finally:
                fio.close()
    return (await c._in_worker(run)).to_dict()
