"""The vdisk exception hierarchy.

Everything vdisk raises on purpose derives from :class:`VdiskError`, so a
caller can catch one class.  Messages name what was found, where (offset,
field, block) and what was expected.
"""


class VdiskError(Exception):
    """Base class of every error vdisk raises on purpose."""


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


class ServeError(VdiskError):
    """The NBD server cannot start as asked: an address it may not or cannot
    listen on, a socket path in use, unusable TLS files.  The message names
    the address or file and the flag that would allow it."""
