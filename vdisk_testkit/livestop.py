"""Deterministic stop points in a vdisk process, for the live kill campaign (tools/campaign_live.py).

Run ``python -m vdisk_testkit.livestop ARGS...`` instead of ``python -m vdisk ARGS...``
(``serve FILE --socket S`` for a server).  With ``VDISK_STOP=STEP:ACTION`` and
``VDISK_STOP_FILE=F`` in the environment, the process stops when it reaches STEP
while the file ``F.arm`` exists (it removes ``F.arm`` then: one stop per arming):

* ACTION ``kill``: it SIGKILLs itself there;
* ACTION ``hold``: it creates ``F.reached`` and waits (at most 300 s) until
  ``F.go`` exists, then goes on; meanwhile the campaign kills another
  process (the CLI client waiting for this server's answer).

The steps, in the order a consumer's backup inside the server reaches them
(vdisk/backup.py, ``backup(disk, dest, consumer=C)``):

  snapshot   the temporary snapshot is taken, nothing copied yet
  copy       the first batch of rows is written to the delta's temporary file
  synced     the delta is complete and fsynced, the temporary snapshot not yet deleted
  dropped    the temporary snapshot is deleted, the delta not yet linked into place
  placed     the delta is in place, the consumer not yet updated
  recorded   the consumer names the new id, the answer not yet sent

and after a control operation has been carried out, before its answer:
``op:NAME`` (op:snapshot_create, op:consumer_update, op:snapshot_delete, ...).

Nothing here is in the library: the stop points are patched into the
functions by name, and a step that is renamed away makes the campaign's
trial fail (the stop is never reached), not pass.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import time

BACKUP_STEPS = ("snapshot", "copy", "synced", "dropped", "placed", "recorded")


def stop(step: str) -> None:
    want = os.environ.get("VDISK_STOP", "")
    base = os.environ.get("VDISK_STOP_FILE")
    name, _, action = want.rpartition(":")
    if not base or name != step:
        return
    try:
        os.unlink(base + ".arm")
    except FileNotFoundError:
        return                                  # not armed (another backup of the trial)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    open(base + ".reached", "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(base + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)


def install() -> None:
    import importlib
    B, D = importlib.import_module("vdisk.backup"), importlib.import_module("vdisk.disk")
    from vdisk.nbd import control
    from vdisk.snapshots import BACKUP_SNAPSHOT_PREFIX

    snapshot = D.Disk.snapshot

    @functools.wraps(snapshot)
    def snapshot_then_stop(self, name=None, *a, **kw):
        snap = snapshot(self, name, *a, **kw)
        if name and name.startswith(BACKUP_SNAPSHOT_PREFIX):
            stop("snapshot")
        return snap
    D.Disk.snapshot = snapshot_then_stop

    write_rows = B.DeltaWriter.write_rows

    @functools.wraps(write_rows)
    def write_rows_then_stop(self, row, rows):
        write_rows(self, row, rows)
        if row == 0:
            stop("copy")
    B.DeltaWriter.write_rows = write_rows_then_stop

    commit = B.DeltaWriter.commit

    @functools.wraps(commit)
    def commit_with_stops(self, before_place=None):
        def around():
            stop("synced")
            if before_place is not None:
                before_place()
            stop("dropped")
        return commit(self, around)
    B.DeltaWriter.commit = commit_with_stops

    record = B._record

    @functools.wraps(record)
    def record_with_stops(disk, consumer, result):
        stop("placed")
        record(disk, consumer, result)
        stop("recorded")
    B._record = record_with_stops

    for op, handler in list(control._OPS.items()):
        def wrapped(c, *a, _op=op, _h=handler, **kw):
            async def run():
                result = await _h(c, *a, **kw)
                stop(f"op:{_op}")
                return result
            return run()
        functools.update_wrapper(wrapped, handler)     # keeps the signature the channel binds against
        control._OPS[op] = wrapped


if __name__ == "__main__":
    install()
    from vdisk.cli import main
    main(args=sys.argv[1:], prog_name="vdisk")
