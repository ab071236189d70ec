"""vdisk: sparse virtual-disk images that track their own changes.

    >>> import vdisk
    >>> d = vdisk.create("disk.vdk", size="10GiB")
    >>> d.pwrite(b"hello", 0)
    >>> cid = d.checkpoint()
    >>> d.changes_since(cid)

The names below load on first use (PEP 562): ``import vdisk`` itself costs
only the error classes, so the command line starts without numpy or h5py
when a command needs neither.  The compiled core (vdisk._fast, vdisk._hotpath) is
required: there is no pure-Python stand-in, so a broken build fails at the
first use of the API, loudly.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import (BackupChainError, ChecksumError, ClosedError, ConsumerNotFoundError, ControlError,
                     CorruptImageError,
                     FormatError, ImageLockedError, InvalidArgumentError, NoSuchFileError, OutOfRangeError,
                     ReadOnlyError, ServeError, SnapshotNotFoundError, StaleChangeIdError, UnsupportedFeatureError,
                     VdiskError, VdiskIOError)

__version__ = "0.1.0"

if TYPE_CHECKING:       # what the lazy names are, for type checkers and editors
    from .backup import BackupResult, backup, merge, restore, verify, verify_chain
    from .check import CheckResult, check
    from .clone import clone
    from .consumers import ConsumerInfo, Consumers
    from .convert import compare, convert
    from .disk import Disk, create, open
    from .extents import Extents
    from .layout import parse_size
    from .live import connect
    from .nbd import serve
    from .snapshot_table import SnapshotInfo
    from .snapshots import Snapshot

#: lazy name -> the submodule that defines it
_LAZY = {
    "create": "disk", "open": "disk", "Disk": "disk",
    "check": "check", "CheckResult": "check",
    "convert": "convert", "compare": "convert",
    "Snapshot": "snapshots", "SnapshotInfo": "snapshot_table",
    "ConsumerInfo": "consumers", "Consumers": "consumers",
    "Extents": "extents",
    "parse_size": "layout",
    "serve": "nbd",
    "connect": "live",
    "BackupResult": "backup", "backup": "backup", "restore": "backup", "verify": "backup", "verify_chain": "backup",
    "merge": "backup", "clone": "clone",
}


def _load_core() -> None:
    try:
        from . import _fast, _hotpath  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError(
            f"vdisk's compiled extension {exc.name or 'vdisk._fast'} is missing or broken; reinstall with "
            "'pip install .' (needs a C compiler, Cython and numpy)") from exc


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vdisk' has no attribute {name!r}")
    _load_core()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value                 # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The vdisk package: importing a submodule that shares a name with a
    function (vdisk.check, vdisk.convert, vdisk.backup) binds the function
    under that name, not the submodule (as the eager imports did)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (name in _LAZY and isinstance(value, types.ModuleType)
                and value.__name__ == f"{__name__}.{name}" and hasattr(value, name)):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "create", "open", "check", "clone", "convert", "compare", "Disk", "Extents", "CheckResult", "parse_size",
    "VdiskError", "FormatError", "CorruptImageError", "ImageLockedError", "UnsupportedFeatureError",
    "OutOfRangeError", "ReadOnlyError", "StaleChangeIdError", "VdiskIOError", "ClosedError",
    "InvalidArgumentError", "NoSuchFileError", "SnapshotNotFoundError", "Snapshot", "SnapshotInfo",
    "__version__", "backup", "restore", "verify", "verify_chain", "merge", "BackupResult", "BackupChainError", "ChecksumError",
    "Consumers", "ConsumerInfo", "ConsumerNotFoundError", "serve", "ServeError", "clone",
    "ControlError", "connect",
]

