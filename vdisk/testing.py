"""Test support: an I/O layer that simulates power loss and injects faults.

:class:`RecordingIO` is a drop-in :class:`vdisk.fileio.FileIO` that also
keeps, in memory, the file as it stood at the last fsync (``durable``) and
the writes issued since (``pending``).  :meth:`RecordingIO.crash_image`
returns the bytes the file could hold after a power loss: the durable
state plus any subset of the pending writes, applied in issue order (a
disk may persist any of them, in any order; a later write to the same
bytes wins when both land).  Pass ``torn=True`` to also tear writes at
512-byte sector boundaries.  It is thread-safe, as a file is: an fsync
makes durable the writes issued before it began; writes issued while it
runs stay pending (they may or may not land), as the kernel promises.

:class:`FaultyIO` fails the n-th call of a chosen kind (pwrite, fsync,
truncate, punch_hole) with an OSError (EIO, ENOSPC, ...), raised as the
:class:`vdisk.VdiskIOError` the real layer would raise.  Driven by a
:class:`FaultPlan`, it also counts every call by kind: a dry run with an
empty plan lists a workload's call sites, and rerunning the same workload
with ``FaultPlan(kind, n, err)`` for each of them fails every site in turn.
:class:`FaultyRecordingIO` does both at once: after the fault,
``crash_image`` gives the power-loss states of the file (a failed fsync
leaves its writes pending: any subset may have reached the disk).

Use them through the ``io_factory`` argument of vdisk.create / vdisk.open
(``FaultyIO.factory(plan)`` binds a plan; the plan is the only interface).
"""
from __future__ import annotations

import errno
import random
import threading
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence, TypeVar, Union

from .fileio import FileIO, _io_error, readable_buffer

if TYPE_CHECKING:
    from ._types import ByteBuffer

SECTOR = 512
_R = TypeVar("_R")
#: a recorded change of the file: ("w", offset, data) a write, ("t", size) a truncate
Op = Union[tuple[Literal["w"], int, bytes], tuple[Literal["t"], int]]


class RecordingIO(FileIO):
    def __init__(self, path: str, writable: bool, create: bool = False, overwrite: bool = False):
        super().__init__(path, writable, create=create, overwrite=overwrite)
        self.durable = bytearray(self._read_all())
        self.pending: list[Op] = []
        self.fsyncs = 0
        self._rec_lock = threading.Lock()   # pending/durable bookkeeping (threads write at once)
        self.on_fsync: Callable[[RecordingIO], None] | None = None     # called (with self) before each fsync lands: crash states mid-operation

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
    def pwrite(self, data: ByteBuffer, offset: int) -> None:
        data = bytes(memoryview(readable_buffer(data)).cast("B"))
        with self._rec_lock:        # the file and the record in the same order
            super().pwrite(data, offset)
            self.pending.append(("w", offset, data))

    def pwritev(self, buffers: Sequence[ByteBuffer], offset: int) -> None:
        self.pwrite(b"".join(bytes(memoryview(readable_buffer(b)).cast("B")) for b in buffers), offset)

    def truncate(self, size: int) -> None:
        with self._rec_lock:
            super().truncate(size)
            self.pending.append(("t", size))

    def punch_hole(self, offset: int, length: int) -> bool:
        end = min(offset + length, super().size())
        if end > offset:
            self.pwrite(bytes(end - offset), offset)
        return True

    def fsync(self) -> None:
        if self.on_fsync is not None:
            self.on_fsync(self)
        with self._rec_lock:
            covered = len(self.pending)     # what was issued before this fsync began
        super().fsync()
        with self._rec_lock:
            self.durable = apply_ops(self.durable, self.pending[:covered])
            self.pending = self.pending[covered:]
            self.fsyncs += 1

    # --- crash states -----------------------------------------------------------
    def crash_image(self, rng: random.Random | None = None, keep: Sequence[bool] | None = None,
                    torn: bool = False) -> bytes:
        """The file after a power loss now.

        keep: a list of booleans, one per pending op (which writes reached
        the disk); by default each is kept with probability 1/2.
        """
        rng = rng or random.Random()
        with self._rec_lock:
            durable, pending = bytes(self.durable), list(self.pending)
        if keep is None:
            keep = [rng.random() < 0.5 for _ in pending]
        ops: list[Op] = []
        for op, k in zip(pending, keep):
            if not k:
                continue
            if torn and op[0] == "w" and len(op[2]) > SECTOR:
                data: bytes = op[2]
                for s in range(0, len(data), SECTOR):
                    if rng.random() < 0.5:
                        ops.append(("w", op[1] + s, data[s:s + SECTOR]))
            else:
                ops.append(op)
        return bytes(apply_ops(bytearray(durable), ops))


def apply_ops(image: bytearray, ops: Sequence[Op]) -> bytearray:
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


KINDS = ("pwrite", "fsync", "truncate", "punch_hole")   # the calls that change the file


class FaultPlan:
    """Which call fails, and a count of every call by kind.

    One plan is shared by every FaultyIO made from ``FaultyIO.factory(plan)``
    (an image, and the same image reopened), so calls are numbered in issue
    order across them.  kind=None fails nothing: the dry run that counts the
    sites.  partial=True: a failing pwrite first writes the leading half of
    its data (sector-aligned), as a short write followed by the error does.
    """

    def __init__(self, kind: str | None = None, nth: int = 0, err: int = errno.EIO, partial: bool = False):
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.kind, self.nth, self.err, self.partial = kind, nth, err, partial
        self.counts = dict.fromkeys(KINDS, 0)     # calls issued so far, by kind
        self.fired: tuple[str, int, int] | None = None   # (kind, nth, errno) once the fault fired
        self.landed_after = 0     # calls that reached the file after the fault fired
        self.label = ""           # set by the caller: what is running (recorded in trace)
        self.trace: list[tuple[str, int, str]] | None = None   # a list: every call appends (kind, n, label)

    def sites(self) -> list[tuple[str, int]]:
        """Every (kind, n) counted so far: after a dry run, the sites to fail in turn."""
        return [(k, n) for k in KINDS for n in range(self.counts[k])]

    def _hit(self, kind: str) -> bool:
        n = self.counts[kind]
        self.counts[kind] = n + 1
        if self.trace is not None:
            self.trace.append((kind, n, self.label))
        if kind == self.kind and n == self.nth and self.fired is None:
            self.fired = (kind, n, self.err)
            return True
        return False

    def __repr__(self) -> str:
        what = "dry run" if self.kind is None else f"{self.kind} #{self.nth} {errno.errorcode.get(self.err, self.err)}"
        return f"<FaultPlan {what} counts={self.counts} fired={self.fired is not None}>"


class FaultyIO(FileIO):
    """FileIO that fails the call its :class:`FaultPlan` chooses, and counts every call.

    Made through ``FaultyIO.factory(plan)``; without a plan it fails nothing.
    The plan's fields may be changed between calls (for example
    ``plan.kind, plan.nth = "pwrite", plan.counts["pwrite"]``: the next pwrite).

    A failed fsync poisons the file as a real one does; a failed pwrite,
    truncate or punch_hole changes nothing (with plan.partial, a pwrite
    lands its first half).  pwritev counts as one pwrite.
    """

    plan: FaultPlan | None = None
    _inner = False           # inside a counted call (pwritev -> pwrite): not a call of its own

    @classmethod
    def factory(cls, plan: FaultPlan) -> Callable[..., FaultyIO]:
        """An io_factory for vdisk.create / vdisk.open whose files share plan."""
        def make(path: str, writable: bool, create: bool = False, overwrite: bool = False) -> FaultyIO:
            fio = cls(path, writable, create=create, overwrite=overwrite)
            fio.plan = plan
            return fio
        return make

    def _maybe_fail(self, kind: str) -> None:
        if self.plan is not None and self.plan._hit(kind):
            raise OSError(self.plan.err, f"injected fault: {kind} #{self.plan.nth}")

    def _call(self, kind: str, op: Callable[..., _R], *args: Any) -> _R:
        """op(*args) as one call of `kind`: fail it if it is the chosen one."""
        if self._inner:
            return op(*args)
        try:
            self._maybe_fail(kind)
        except OSError as exc:
            if kind == "fsync":
                raise self._poison(_io_error("fsync", self.path, exc)) from exc
            if kind == "pwrite" and self.plan is not None and self.plan.partial:
                self._land_partial(*args)
            raise _io_error("fallocate" if kind == "punch_hole" else kind, self.path, exc) from exc
        self._inner = True
        try:
            result = op(*args)
        finally:
            self._inner = False
        if self.plan is not None and self.plan.fired is not None:
            self.plan.landed_after += 1
        return result

    def _land_partial(self, data: ByteBuffer | list[ByteBuffer], offset: int) -> None:
        mv = memoryview(readable_buffer(_joined(data))).cast("B")
        half = len(mv) // 2 // SECTOR * SECTOR
        if half:
            self._inner = True
            try:
                super().pwrite(mv[:half], offset)
            finally:
                self._inner = False

    def pwrite(self, data: ByteBuffer, offset: int) -> None:
        return self._call("pwrite", super().pwrite, data, offset)

    def pwritev(self, buffers: Sequence[ByteBuffer], offset: int) -> None:
        return self._call("pwrite", super().pwritev, buffers, offset)

    def fsync(self) -> None:
        return self._call("fsync", super().fsync)

    def truncate(self, size: int) -> None:
        return self._call("truncate", super().truncate, size)

    def punch_hole(self, offset: int, length: int) -> bool:
        return self._call("punch_hole", super().punch_hole, offset, length)


class FaultyRecordingIO(FaultyIO, RecordingIO):
    """FaultyIO over RecordingIO: fail a call, then take power-loss states."""


def _joined(data: ByteBuffer | list[ByteBuffer]) -> ByteBuffer:
    """A pwritev buffer list as one buffer (pwrite data passes through)."""
    if isinstance(data, list):
        return b"".join(bytes(memoryview(readable_buffer(b)).cast("B")) for b in data)
    return data
