"""vdisk: sparse virtual-disk images that track their own changes.

    >>> import vdisk
    >>> d = vdisk.create("disk.vdk", size="10GiB")
    >>> d.pwrite(b"hello", 0)
    >>> cid = d.checkpoint()
    >>> d.changes_since(cid)

The compiled core (vdisk._fast) is required: there is no pure-Python
stand-in, so a broken build fails here, loudly.
"""
try:
    from . import _fast  # noqa: F401
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "vdisk's compiled extension vdisk._fast is missing or broken; reinstall with "
        "'pip install .' (needs a C compiler, Cython and numpy)") from exc

from .check import CheckResult, check
from .convert import compare, convert
from .disk import Disk, create, open
from .snapshots import Snapshot, SnapshotInfo
from .consumers import ConsumerInfo, Consumers
from .errors import (ClosedError, CorruptImageError, FormatError, ImageLockedError, InvalidArgumentError,
                     OutOfRangeError, ReadOnlyError, StaleChangeIdError, UnsupportedFeatureError, VdiskError,
                     VdiskIOError, SnapshotNotFoundError, BackupChainError, ChecksumError,
                     ConsumerNotFoundError)
from .extents import Extents
from .layout import parse_size
from .backup import BackupResult, backup, merge, restore, verify

__version__ = "0.1.0"

__all__ = [
    "create", "open", "check", "convert", "compare", "Disk", "Extents", "CheckResult", "parse_size",
    "VdiskError", "FormatError", "CorruptImageError", "ImageLockedError", "UnsupportedFeatureError",
    "OutOfRangeError", "ReadOnlyError", "StaleChangeIdError", "VdiskIOError", "ClosedError",
    "InvalidArgumentError", "SnapshotNotFoundError", "Snapshot", "SnapshotInfo", "__version__",
    "backup", "restore", "verify", "merge", "BackupResult", "BackupChainError", "ChecksumError",
    "Consumers", "ConsumerInfo", "ConsumerNotFoundError",
]


def serve(path_or_disk, *, socket=None, listen=None, export=None, read_only=False, **options) -> None:
    """Serve an image over NBD until SIGTERM/SIGINT (vdisk/nbd/__init__.py)."""
    from .nbd import serve as _serve
    _serve(path_or_disk, socket=socket, listen=listen, export=export, read_only=read_only, **options)
