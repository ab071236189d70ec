"""Live operations on a served image: the client side of the control channel.

While ``vdisk serve FILE`` runs, the server holds FILE's write lock and
every other open of it fails with ImageLockedError.  The server also
listens on a *control channel*, a unix socket found from the image itself,
and this module talks to it::

    >>> import vdisk
    >>> with vdisk.connect("disk.vdk") as d:          # the image is served elsewhere
    ...     s = d.snapshot("b1").info                  # NAME@b1 is exported at once
    ...     d.consumers.update("nightly", s.change_id)
    ...     d.delete_snapshot("b1")

``vdisk.backup(path, ...)`` and ``vdisk.check(path)`` route through it by
themselves when the path is served, as do the CLI commands info, map,
changes, checkpoint, snapshot, consumer, backup, check and compact.

Where the socket is
-------------------
``<RUNDIR>/<st_dev>-<st_ino>.ctl`` (hex), named by the image file's device
and inode, so every path to the file (relative, symlinked, bind-mounted on
the same device) finds it.  RUNDIR is ``$VDISK_RUNTIME_DIR`` if set, else
``$XDG_RUNTIME_DIR/vdisk``, else ``/tmp/vdisk-<uid>``; it is created mode
0700 and used only if it belongs to the user and no one else may enter it.
The socket is 0600 (bound under a temporary name, then renamed), and the
server refuses peers of another uid (SO_PEERCRED; root is let in).

The wire
--------
One request per line: a JSON object ``{"op": NAME, "args": {...}}``, UTF-8,
at most :data:`MAX_REQUEST` bytes with its newline.  One answer per request,
one line: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
{"type": CLASS, "message": TEXT}}`` where CLASS names a VdiskError subclass
(vdisk/errors.py); this module raises that class with that message.  A
connection may send any number of requests, one after the other; backups
and checks of all connections run one at a time, and the other operations
are answered meanwhile (vdisk/nbd/control.py).  The operations are
those of :class:`LiveDisk` (``hello``, ``info``, ``map``, ``changes``,
``checkpoint``, ``snapshot_create``, ``snapshot_list``, ``snapshot_delete``,
``snapshot_revert``, ``consumer_register``, ``consumer_update``,
``consumer_forget``, ``consumer_list``, ``backup``, ``check``,
``compact``, ``clients``); vdisk/nbd/control.py carries them out and documents each.

Change ids cross the wire as the opaque strings they are.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket as _socket
import stat
import typing
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from . import errors
from .consumers import ConsumerInfo
from .extents import Extents
from .results import BackupResult, CheckResult
from .snapshots import SnapshotInfo
from ._types import PathArg, Progress
from .results import ImageInfo

if TYPE_CHECKING:
    from .disk import Disk

#: a JSON object as it crosses the control channel: its shape is the protocol's
#: (each request's answer is documented in vdisk/nbd/control.py), not checked here
Wire = dict[str, Any]

MAX_REQUEST = 1 << 20           # bytes of one request line, newline included
MAX_ANSWER = 1 << 30            # an answer (a map of a large image) may be long, not endless
SUFFIX = ".ctl"


# ---------------------------------------------------------------------------- where
def runtime_dir(create: bool = False) -> str:
    """The directory of the control sockets (module docstring); with create, made 0700 if missing.
    Raises ControlError if it exists but another user owns it or others may enter it."""
    base = os.environ.get("VDISK_RUNTIME_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "vdisk") if xdg and os.path.isdir(xdg) else f"/tmp/vdisk-{os.geteuid()}"
    if create:
        try:
            os.mkdir(base, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise errors.ControlError(f"{base}: cannot create the control directory: {exc.strerror}") from None
    try:
        st = os.lstat(base)
    except FileNotFoundError:
        return base
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise errors.ControlError(
            f"{base}: the control directory must be a directory of uid {os.geteuid()} that only its owner "
            f"may enter (found uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it or set "
            f"VDISK_RUNTIME_DIR")
    return base


def control_path(image: PathArg, create_dir: bool = False) -> str:
    """The control socket of the server of the image file at `image` (the file must exist)."""
    st = os.stat(image)
    return os.path.join(runtime_dir(create_dir), f"{st.st_dev:x}-{st.st_ino:x}{SUFFIX}")


# ---------------------------------------------------------------------------- the wire
def encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def error_answer(exc: BaseException) -> Wire:
    """The answer for a failed request: the VdiskError subclass by name, and its message
    (with the notes the operation added)."""
    name = type(exc).__name__ if isinstance(exc, errors.VdiskError) else "VdiskError"
    msg = str(exc) or type(exc).__name__
    notes = getattr(exc, "__notes__", None)
    if notes:
        msg += " (" + "; ".join(notes) + ")"
    return {"ok": False, "error": {"type": name, "message": msg}}


def raise_error(err: object) -> typing.NoReturn:
    """Raise the error an answer names (an unknown or non-vdisk name: ControlError)."""
    if not isinstance(err, dict):
        raise errors.ControlError(f"malformed error answer {str(err)[:80]!r}")
    cls = getattr(errors, str(err.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.VdiskError)):
        cls = errors.ControlError
    raise cls(str(err.get("message", "")))


def _snapshot_info(d: Wire) -> SnapshotInfo:
    return SnapshotInfo(d["name"], d["change_id"], d["generation"], datetime.datetime.fromisoformat(d["created"]),
                        d["size"])


def snapshot_dict(info: SnapshotInfo) -> Wire:
    return {"name": info.name, "change_id": info.change_id, "generation": info.generation,
            "created": info.created.isoformat(), "size": info.size}


def consumer_dict(info: ConsumerInfo) -> Wire:
    d: Wire = info._asdict()
    for k, v in d.items():
        if isinstance(v, datetime.datetime):
            d[k] = v.isoformat()
    return d


def _consumer_info(d: Wire) -> ConsumerInfo:
    def when(v: Any) -> Any:
        return datetime.datetime.fromisoformat(v) if v else v
    vals: Wire = {k: d.get(k) for k in ConsumerInfo._fields}     # a field the answer lacks: None
    return ConsumerInfo(name=vals["name"], change_id=vals["change_id"], generation=vals["generation"],
                        created=when(vals["created"]), updated=when(vals["updated"]))


def extents_list(ext: Iterable[tuple[int, int]]) -> list[list[int]]:
    return [[int(o), int(n)] for o, n in ext]


def _extents(runs: Iterable[Any]) -> Extents:
    return Extents([r[0] for r in runs], [r[1] for r in runs])


# ---------------------------------------------------------------------------- the client
class NotServedLive(errors.ImageLockedError, AttributeError):
    """A Disk method the control channel does not carry (resize, pread, ...): the
    image is locked by its server.  An AttributeError too, so hasattr() says False."""


class Channel:
    """One connection to a control socket: request() sends one request and returns its result."""

    def __init__(self, path: str, timeout: float | None = None):
        self.path = path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._buf = bytearray()

    def request(self, op: str, **args: Any) -> Any:
        self.sock.sendall(encode({"op": op, "args": args}))
        answer = self._line()
        try:
            msg = json.loads(answer)
        except ValueError:
            raise errors.ControlError(f"{self.path}: the server's answer is not JSON") from None
        if not isinstance(msg, dict) or "ok" not in msg:
            raise errors.ControlError(f"{self.path}: the server's answer has no 'ok' field")
        if not msg["ok"]:
            raise_error(msg.get("error"))
        return msg.get("result")

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[:i + 1]
                return line
            if len(self._buf) > MAX_ANSWER:
                raise errors.ControlError(f"{self.path}: an answer of more than {MAX_ANSWER} bytes")
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise errors.ControlError(f"{self.path}: the server closed the control channel without answering "
                                          f"(it stopped, or was killed)")
            self._buf += chunk

    def close(self) -> None:
        self.sock.close()


def find_server(path: PathArg, timeout: float | None = None) -> Channel | None:
    """A channel to the server of the image at path, or None when no server listens for it
    (no socket, or a stale one a killed server left)."""
    try:
        where = control_path(path)
    except (OSError, errors.ControlError):
        return None
    try:
        return Channel(where, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError as exc:
        raise errors.ControlError(f"{where}: cannot reach the server's control channel: {exc.strerror or exc}") \
            from None


def connect(path: PathArg, timeout: float | None = None) -> "LiveDisk":
    """A handle on the image at path as served by ``vdisk serve`` in another process.
    Raises ControlError when no server serves it."""
    ch = find_server(path, timeout)
    if ch is None:
        raise errors.ControlError(f"{os.fspath(path)}: no vdisk server serves this image (no control channel "
                                  f"at {_where(path)})")
    return LiveDisk(os.fspath(path), ch)


def _where(path: PathArg) -> str:
    try:
        return control_path(path)
    except (OSError, errors.ControlError) as exc:
        return f"? ({exc})"


class _SnapshotHandle:
    """What LiveDisk.snapshot returns: the new snapshot's info (read it through NAME@S on NBD)."""

    def __init__(self, info: SnapshotInfo):
        self.info = info
        self.name = info.name
        self.change_id = info.change_id

    def close(self) -> None:
        pass


class LiveConsumers:
    """``LiveDisk.consumers``: the consumers of a served image (as Disk.consumers)."""

    def __init__(self, live: "LiveDisk"):
        self._live = live

    def values(self) -> list[ConsumerInfo]:
        return [_consumer_info(d) for d in self._live._call("consumer_list")]

    def __iter__(self) -> Iterator[str]:
        return iter([c.name for c in self.values()])

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.values())

    def __len__(self) -> int:
        return len(self.values())

    def __getitem__(self, name: str) -> ConsumerInfo:
        for c in self.values():
            if c.name == name:
                return c
        raise errors.ConsumerNotFoundError(f"{self._live.path}: no consumer named {name!r} (register it first)")

    def get(self, name: str, default: ConsumerInfo | None = None) -> ConsumerInfo | None:
        try:
            return self[name]
        except errors.ConsumerNotFoundError:
            return default

    def last_id(self, name: str) -> str | None:
        return self[name].change_id

    def changes(self, name: str) -> Extents:
        return self._live._changes(consumer=name)[0]

    def register(self, name: str, change_id: str | None = None) -> ConsumerInfo:
        return _consumer_info(self._live._call("consumer_register", name=name, change_id=change_id))

    def update(self, name: str, change_id: str) -> ConsumerInfo:
        if change_id is None:
            raise errors.InvalidArgumentError("update needs a change id (forget and register again to start over)")
        return _consumer_info(self._live._call("consumer_update", name=name, change_id=change_id))

    def forget(self, name: str) -> None:
        self._live._call("consumer_forget", name=name)


class LiveDisk:
    """A served image, through its server's control channel.

    It answers the Disk calls that make sense from outside the server:
    ``info()``, ``map()``, ``changes_since(id)``, ``change_id``,
    ``checkpoint()``, ``snapshot(name)``, ``snapshots``,
    ``delete_snapshot(name, wait=None)``, ``revert(name)``, ``consumers``
    (register/update/forget/values/last_id), ``backup(dest, ...)``,
    ``check()``, ``compact()`` and ``clients()``.  Data I/O goes through NBD, not here;
    any other Disk method raises ImageLockedError saying so."""

    def __init__(self, path: str, channel: Channel):
        self.path = path
        self._ch: Channel | None = channel
        self.server: Wire = channel.request("hello")        # pid, export, address, read_only, path

    # --- plumbing ---------------------------------------------------------------------
    def _call(self, op: str, **args: Any) -> Any:
        if self._ch is None:
            raise errors.ClosedError(f"{self.path}: the control connection is closed")
        return self._ch.request(op, **args)

    def close(self) -> None:
        if self._ch is not None:
            self._ch.close()
            self._ch = None

    @property
    def closed(self) -> bool:
        return self._ch is None

    def __enter__(self) -> "LiveDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> typing.NoReturn:
        if name.startswith("_"):
            raise AttributeError(name)
        raise NotServedLive(_served_line(self.path, self.server, name))

    def __repr__(self) -> str:
        return f"<vdisk.LiveDisk {self.path!r} served by pid {self.server.get('pid')}>"

    # --- reading ----------------------------------------------------------------------
    def info(self) -> ImageInfo:
        """Disk.info() of the served image, with this handle's path and a served_by entry."""
        out: ImageInfo = self._call("info")
        out["path"] = self.path
        out["served_by"] = {"pid": self.server.get("pid"), "address": self.server.get("address")}
        return out

    def map(self) -> Extents:
        return _extents(self._call("map"))

    def host_map(self) -> list[tuple[int, int, int]]:
        return [(int(o), int(n), int(h)) for o, n, h in self._call("host_map")]

    def _changes(self, since: str | None = None, consumer: str | None = None) -> tuple[Extents, str | None, str]:
        r: Wire = self._call("changes", since=since, consumer=consumer)
        return _extents(r["extents"]), r["change_id"], r["since"]

    def changes_since(self, change_id: str | None) -> Extents:
        return self._changes(since=change_id)[0]

    @property
    def change_id(self) -> str | None:
        return self.info().get("change_id")

    @property
    def size(self) -> int:
        return self.info()["virtual_size"]

    @property
    def snapshots(self) -> list[SnapshotInfo]:
        return [_snapshot_info(d) for d in self._call("snapshot_list")]

    @property
    def consumers(self) -> LiveConsumers:
        return LiveConsumers(self)

    def clients(self) -> dict[str, int]:
        """Connected NBD clients by export name (the live export as NAME)."""
        clients: dict[str, int] = self._call("clients")
        return clients

    # --- changing ---------------------------------------------------------------------
    def checkpoint(self) -> str:
        change_id: str = self._call("checkpoint")
        return change_id

    def snapshot(self, name: str | None = None) -> _SnapshotHandle:
        return _SnapshotHandle(_snapshot_info(self._call("snapshot_create", name=name)))

    def delete_snapshot(self, name: str, wait: float | None = None) -> None:
        """Delete a snapshot; refused while NBD clients read its export, unless they
        disconnect within `wait` seconds."""
        self._call("snapshot_delete", name=name, wait=wait)

    def revert(self, name: str) -> None:
        """Refused while a client is connected to the live export."""
        self._call("snapshot_revert", name=name)

    def backup(self, dest: PathArg, *, since: str | None = None, consumer: str | None = None,
               compression: str | None = "gzip", progress: Progress | None = None) -> BackupResult:
        """vdisk.backup inside the server (DEST is written by the server process)."""
        r: Wire = self._call("backup", dest=os.path.abspath(os.fspath(dest)), since=since, consumer=consumer,
                       compression=compression)
        fields = {k: v for k, v in r.items() if k not in ("extents", "extent_runs")}
        res = BackupResult(extents=_extents(r["extent_runs"]), **fields)
        if progress:
            progress(res.bytes_copied, res.bytes_copied)
        return res

    def compact(self, *, progress: Progress | None = None) -> int:
        """Disk.compact inside the server (refused by a --read-only one): the bytes released."""
        r = self._call("compact")
        if progress:
            progress(r["blocks"], r["blocks"])
        return int(r["released"])

    def check(self) -> CheckResult:
        """A read-only check of the served image's flushed state."""
        return CheckResult(**self._call("check"))


def _served_line(path: PathArg, server: Wire, what: str, instead: str = "stop the server first") -> str:
    return (f"{os.fspath(path)} is served by vdisk serve (pid {server.get('pid')}, {server.get('address')}): "
            f"{what} cannot run on a served image; {instead}")


def served_refusal(path: PathArg, what: str) -> NotServedLive | None:
    """The one-line error for a command that reads the image file itself (convert, compare,
    clone, ...) when a server in another process holds it, or None when none serves it.  The
    line names the server and how to read the served state instead: a snapshot's NBD export."""
    ch = find_server(path, timeout=10)
    if ch is None:
        return None
    try:
        server: Wire = ch.request("hello")
    finally:
        ch.close()
    addr = str(server.get("address") or "")
    uri = (f"nbd+unix:///{server.get('export')}@S?socket={addr[5:]}" if addr.startswith("unix:")
           else f"nbd://{addr}/{server.get('export')}@S")
    return NotServedLive(_served_line(
        path, server, what, f"take a snapshot (vdisk snapshot create {os.fspath(path)} S) and read it from "
                            f"{uri} (qemu-img convert, nbdcopy), or stop the server first"))


@contextlib.contextmanager
def refused_if_served(what: str, *paths: PathArg | None) -> Iterator[None]:
    """For a command that reads image files itself (convert, compare, clone): an
    ImageLockedError raised inside, for an image a server in another process holds,
    becomes that server's one-line refusal (served_refusal); the CLI and the Python
    functions raise the same error."""
    try:
        yield
    except errors.ImageLockedError as exc:
        if isinstance(exc, NotServedLive):
            raise
        for p in paths:
            refusal = served_refusal(p, what) if p is not None and not isinstance(p, (bool, int)) else None
            if refusal is not None:
                raise refusal from exc
        raise


def open_or_connect(path: PathArg, mode: str = "r") -> Disk | LiveDisk:
    """vdisk.open(path, mode), or, when a server in another process holds the image,
    a LiveDisk on its control channel (the CLI's route for live operations)."""
    from .disk import open as open_disk
    try:
        return open_disk(path, mode)
    except errors.ImageLockedError:
        ch = find_server(path)
        if ch is None:
            raise
        try:
            return LiveDisk(os.fspath(path), ch)
        except BaseException:
            ch.close()
            raise
