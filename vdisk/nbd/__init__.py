"""``vdisk serve``: an NBD server of vdisk images.

How to start it
---------------
Command line (serves until SIGTERM/SIGINT, then flushes and exits 0)::

    vdisk serve disk.vdk --socket /run/disk.sock        # nbd+unix:///?socket=/run/disk.sock
    vdisk serve disk.vdk --listen 127.0.0.1:10809       # nbd://127.0.0.1:10809/disk
    vdisk serve disk.vdk --listen 0.0.0.0:10809 --tls-cert server-cert.pem --tls-key server-key.pem

Once listening it writes ``--pid-file`` and one line on stderr,
``vdisk serve: serving FILE as export 'NAME' (and '') on ADDRESS`` (for
``--listen HOST:0`` the ADDRESS holds the port it got).  Bad clients are
logged one line each on stderr; the exit status is 0 after a signal.

Python::

    import vdisk
    vdisk.serve("disk.vdk", socket="/run/disk.sock")     # blocks until SIGTERM/SIGINT

    from vdisk.nbd import Server
    with Server("disk.vdk", socket="/tmp/s") as srv:     # served from a thread
        ...                                              # clients use nbd+unix:///?socket=/tmp/s
    srv = Server(disk, listen="127.0.0.1:0")             # or in your own event loop:
    await srv.start(); print(srv.address); ...; await srv.stop()

Exports: ``""`` and NAME (``export=``, default the file name without its
extension) are the live image; ``NAME@S`` is snapshot S, read-only.  Meta
contexts: ``base:allocation``, ``qemu:dirty-bitmap:CONSUMER`` and
``qemu:dirty-bitmap:CHANGE-ID``.

Tracking and folds: while serving, the Disk's automatic fold (every
``fold_interval`` writes) is off and the server folds in its flush thread
instead, at each client FLUSH and every ``fold_period`` seconds (default 5)
when writes went unflushed; the event loop never waits on a fold's
fdatasync.  Changed-block tracking stays exact without a crash and never
under-reports after one: an in-place overwrite arms its coarse region's
bit durably before its data is written (docs/FORMAT.md, "Write order"),
however long since the last fold (server.py's notes say why).  Block
status of a dirty bitmap costs what its range's blocks cost
(Disk.changes_in), not the whole disk's.

Modules: protocol.py declares the wire (constants and structs, named as in
the NBD spec), exports.py is the glue to a Disk, server.py the asyncio
server and its lifecycle, polling.py its spin for the next request after
replying (``--poll-us``, default 50 µs, off with 0), control.py the control channel through which
other processes take snapshots, record consumers and run backups of the
served image (the client side and the wire: vdisk/live.py).
"""
from .server import Server, serve

__all__ = ["Server", "serve"]
