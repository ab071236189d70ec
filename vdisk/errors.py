"""The vdisk exception hierarchy.

Everything vdisk raises on purpose derives from :class:`VdiskError`, so a
caller can catch one class.  Messages name what was found, where (offset,
field, block) and what was expected.

A message that tells the caller which argument to change names it as a
:class:`Param`, not as text: ``str(error)`` spells it as the Python API
does (``overwrite=True``), and the command line renders the same error
with its flag (``--overwrite``) through :meth:`VdiskError.render`.
"""
from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from typing import Callable, TypeVar, Union

_BARE = object()


@dataclass(frozen=True)
class Param:
    """A parameter of the public API named inside an error message.

    value: the value the caller could pass (True for a flag); omitted, the
    parameter is named bare.  placeholder: instead of a value, what kind of
    value (``"the backing file's path"``)."""
    name: str
    value: object = _BARE
    placeholder: str | None = None

    @property
    def bare(self) -> bool:
        return self.value is _BARE and self.placeholder is None

    def __str__(self) -> str:
        if self.placeholder is not None:
            return f"{self.name}=<{self.placeholder}>"
        if self.value is _BARE:
            return self.name
        return f"{self.name}={self.value!r}"


Part = Union[str, Param]
_E = TypeVar("_E", bound="VdiskError")

#: the remedy for an existing output file: ``(pass overwrite=True to replace it)``
TO_REPLACE: tuple[Part, ...] = ("pass ", Param("overwrite", True), " to replace it")
#: the remedy for a restore target that cannot be advanced
FROM_SCRATCH: tuple[Part, ...] = ("pass ", Param("overwrite", True), " to restore from scratch")


class VdiskError(Exception):
    """Base class of every error vdisk raises on purpose."""

    parts: tuple[Part, ...] = ()

    @classmethod
    def naming(cls: type[_E], *parts: Part) -> _E:
        """An error whose message is the text and parameters in parts (see
        :class:`Param`); its str() spells the parameters as Python does."""
        exc = cls("".join(map(str, parts)))
        exc.parts = parts
        return exc

    @property
    def params(self) -> tuple[Param, ...]:
        """The API parameters the message names, in order."""
        return tuple(p for p in self.parts if isinstance(p, Param))

    def render(self, name: Callable[[Param], str]) -> str:
        """The message with each parameter spelled by name(param) (the CLI
        passes its flag names); the same as str() for a message without any."""
        if not self.parts:
            return str(self)
        return "".join(name(p) if isinstance(p, Param) else p for p in self.parts)


class FormatError(VdiskError):
    """Not a vdisk image, or a version or incompatible feature this build does not know."""


class CorruptImageError(VdiskError):
    """The image is damaged: a checksum, a pointer or a table does not hold what it must."""


class ImageLockedError(VdiskError):
    """Another process holds a lock on the image that conflicts with the requested mode."""


class UnsupportedFeatureError(VdiskError):
    """The input uses a feature vdisk does not support; the message names the feature."""


class OutOfRangeError(VdiskError, ValueError):
    """An offset, length or size outside what the image or the format allows."""


class ReadOnlyError(VdiskError):
    """A write to an image (or snapshot) opened read-only."""


class StaleChangeIdError(VdiskError, ValueError):
    """A change id that is malformed, from another image or tracking epoch, or from the future."""


class VdiskIOError(VdiskError, OSError):
    """The host file system failed an I/O call (EIO, ENOSPC, ...).

    After a failed fsync, metadata write or truncate the Disk is poisoned: it
    refuses every later call (reads and flush included) with this error and
    must be reopened; the kernel may have dropped the dirty pages, so a
    retried fsync could report a false success.  A failed data write of
    pwrite or discard leaves the Disk usable (vdisk/disk.py, "I/O errors").
    """


class ClosedError(VdiskError, ValueError):
    """An operation on a closed Disk."""


class InvalidArgumentError(VdiskError, ValueError):
    """A wrong argument: an unknown mode, an unparsable size, a bad block size."""


class NoSuchFileError(InvalidArgumentError, FileNotFoundError):
    """The image (or another input) does not exist: an InvalidArgumentError, and a
    FileNotFoundError (errno ENOENT, filename the path) as Python callers expect."""

    def __init__(self, path: str, what: str = "no such file"):
        super().__init__(f"{path}: {what}")
        self.errno = _errno.ENOENT
        self.strerror = what
        self.filename = path

    def __str__(self) -> str:          # OSError would format "[Errno 2] ..."
        return str(self.args[0])


class SnapshotNotFoundError(VdiskError, KeyError):
    """No snapshot of that name."""

    def __str__(self) -> str:          # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ConsumerNotFoundError(VdiskError, KeyError):
    """No consumer of that name is registered in the image."""

    def __str__(self) -> str:          # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BackupChainError(VdiskError):
    """Deltas that do not form one backup chain (a gap, a reorder, a duplicate,
    a foreign delta, a missing full backup), or a restore target at another
    point of the chain.  The message names the broken link: files and ids."""


class ChecksumError(CorruptImageError):
    """Stored data does not match its checksum; the message names the file and the block or structure."""


class VdiskWarning(UserWarning):
    """Base class of the warnings vdisk issues (``warnings.warn``); filter or catch them by this class."""


class ServeError(VdiskError):
    """The NBD server cannot start as asked: an address it may not or cannot
    listen on, a socket path in use, unusable TLS files.  The message names
    the address or file and the flag that would allow it."""


class ControlError(VdiskError):
    """The control channel of a served image (vdisk/live.py) failed: no server
    serves the image, the server went away mid-request, a request or an
    answer that is not what the channel carries, a peer of another user."""
