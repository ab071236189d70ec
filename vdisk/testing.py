"""Test support: an I/O layer that simulates power loss and injects faults.

:class:`RecordingIO` is a drop-in :class:`vdisk.fileio.FileIO` that also
keeps, in memory, the file as it stood at the last fsync (``durable``) and
the writes issued since (``pending``).  :meth:`RecordingIO.crash_image`
returns the bytes the file could hold after a power loss: the durable
state plus any subset of the pending writes, applied in issue order (a
disk may persist any of them, in any order; a later write to the same
bytes wins when both land).  Pass ``torn=True`` to also tear writes at
512-byte sector boundaries.

:class:`FaultyIO` raises an OSError (EIO, ENOSPC, ...) from the n-th call
of a chosen kind, for fault-injection tests.

Use them through the ``io_factory`` argument of vdisk.create / vdisk.open.
"""
from __future__ import annotations

import errno
import random

from .fileio import FileIO

SECTOR = 512


class RecordingIO(FileIO):
    def __init__(self, path, writable, create=False, overwrite=False):
        super().__init__(path, writable, create=create, overwrite=overwrite)
        self.durable = bytearray(self._read_all())
        self.pending: list[tuple] = []
        self.fsyncs = 0
        self.on_fsync = None     # called (with self) before each fsync lands: crash states mid-operation

    def _read_all(self) -> bytes:
        out = bytearray()
        size = super().size()
        while len(out) < size:
            chunk = super().pread(min(1 << 20, size - len(out)), len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    # --- recorded calls -------------------------------------------------------
    def pwrite(self, data, offset):
        data = bytes(memoryview(data).cast("B"))
        super().pwrite(data, offset)
        self.pending.append(("w", offset, data))

    def pwritev(self, buffers, offset):
        self.pwrite(b"".join(bytes(memoryview(b).cast("B")) for b in buffers), offset)

    def truncate(self, size):
        super().truncate(size)
        self.pending.append(("t", size))

    def punch_hole(self, offset, length):
        end = min(offset + length, super().size())
        if end > offset:
            self.pwrite(bytes(end - offset), offset)
        return True

    def fsync(self):
        if self.on_fsync is not None:
            self.on_fsync(self)
        super().fsync()
        self.durable = apply_ops(self.durable, self.pending)
        self.pending = []
        self.fsyncs += 1

    # --- crash states -----------------------------------------------------------
    def crash_image(self, rng: random.Random | None = None, keep=None, torn: bool = False) -> bytes:
        """The file after a power loss now.

        keep: a list of booleans, one per pending op (which writes reached
        the disk); by default each is kept with probability 1/2.
        """
        rng = rng or random.Random()
        if keep is None:
            keep = [rng.random() < 0.5 for _ in self.pending]
        ops = []
        for op, k in zip(self.pending, keep):
            if not k:
                continue
            if torn and op[0] == "w" and len(op[2]) > SECTOR:
                data = op[2]
                for s in range(0, len(data), SECTOR):
                    if rng.random() < 0.5:
                        ops.append(("w", op[1] + s, data[s:s + SECTOR]))
            else:
                ops.append(op)
        return bytes(apply_ops(bytearray(self.durable), ops))


def apply_ops(image: bytearray, ops) -> bytearray:
    for op in ops:
        if op[0] == "w":
            _, off, data = op
            end = off + len(data)
            if end > len(image):
                image.extend(bytes(end - len(image)))
            image[off:end] = data
        else:
            size = op[1]
            if size < len(image):
                del image[size:]
            else:
                image.extend(bytes(size - len(image)))
    return image


class FaultyIO(FileIO):
    """Raises OSError(err) from the `nth` call (0-based) of kind `fail_on`
    ("pwrite", "fsync" or "truncate"), counted across all instances that
    share the same `counter` dict."""

    fail_on = "pwrite"
    nth = 0
    err = errno.EIO
    counter: dict = {}

    def _maybe_fail(self, kind):
        if kind != self.fail_on:
            return
        n = self.counter.get(kind, 0)
        self.counter[kind] = n + 1
        if n == self.nth:
            raise OSError(self.err, "injected fault")

    def pwrite(self, data, offset):
        try:
            self._maybe_fail("pwrite")
        except OSError as exc:
            from .fileio import _io_error
            raise _io_error("pwrite", self.path, exc) from exc
        super().pwrite(data, offset)

    def pwritev(self, buffers, offset):
        self.pwrite(b"".join(bytes(memoryview(b).cast("B")) for b in buffers), offset)

    def fsync(self):
        try:
            self._maybe_fail("fsync")
        except OSError as exc:
            from .fileio import _io_error
            self.poisoned = _io_error("fsync", self.path, exc)
            raise self.poisoned from exc
        super().fsync()

    def truncate(self, size):
        try:
            self._maybe_fail("truncate")
        except OSError as exc:
            from .fileio import _io_error
            raise _io_error("truncate", self.path, exc) from exc
        super().truncate(size)
