"""Fuzz target (d): change-id parsing.

Change ids come from users and from files: ``changes_since(id)`` on a Disk
and on a Snapshot, :func:`vdisk.tracking.parse_change_id` itself (also used
by backup and by the delta reader), and the chain sidecar of a restored
target (``<target>.vdisk-chain``, JSON, whose change id restore hands to
the chain check).  For any string (or non-string) each must return an
answer or raise a VdiskError (StaleChangeIdError, CorruptImageError,
BackupChainError, ...); an id it accepts must name a closed generation.

Input encoding::

    byte 0      bits 0-2, mode: 0 the rest as text; 1 this image's tracking uuid, "/",
                then the rest; 2 one of the image's real ids reshaped by the
                rest (case, spaces, zeros, digits); 3 a value of another type;
                4 the rest as the sidecar's JSON; 5 the rest as the sidecar's
                change id; 6 the tracking uuid, "/", the rest as the sidecar's
                change id
                bit 3: text is Latin-1 (each byte one character: U+0080 to
                U+00FF are easy to reach), else UTF-8 with undecodable bytes
                kept as lone surrogates
    bytes 1..   the payload

The image (tracking on, three closed generations, a snapshot) is made once
per process in the scratch folder and kept open read-only.
"""
from __future__ import annotations

import importlib
import json
import os
import types

import vdisk
from vdisk.tracking import format_change_id, parse_change_id

B = importlib.import_module("vdisk.backup")    # vdisk.backup is also the name of the function

from vdisk_testkit.fuzz.common import guard, remove, scratch_path

NAME = "changeid"
_STATE = None


class _State:
    def __init__(self):
        path = scratch_path("changeid.img")
        remove(path)
        with vdisk.create(path, 256 * 1024, block_size=4096) as d:
            d.pwrite(b"a" * 5000, 0)
            self.ids = [d.checkpoint()]
            d.pwrite(b"b" * 100, 70000)
            d.snapshot("s")
            d.pwrite(b"c" * 100, 9000)
            self.ids.append(d.checkpoint())
        self.disk = vdisk.open(path)
        self.snap = self.disk.open_snapshot("s")
        self.ids.append(self.snap.change_id)
        self.tracking = self.disk._hdr.tracking_uuid
        self.generation = self.disk.generation
        self.uuid = self.disk.tracking_id
        self.dir = os.path.dirname(path)

    def alive(self) -> bool:
        return os.path.isdir(self.dir) and not self.disk.closed


def state() -> _State:
    global _STATE
    if _STATE is None or not _STATE.alive():
        _STATE = _State()
    return _STATE


LATIN1 = 1 << 3
_codec = "utf-8"


def _text(b: bytes) -> str:
    return b.decode("latin-1") if _codec == "latin-1" else b.decode("utf-8", "surrogateescape")


def _reshape(cid: str, ops: bytes) -> str:
    """A real id changed by a few byte-coded edits."""
    s = cid
    for i in range(0, len(ops) - 1, 2):
        op, arg = ops[i] % 9, ops[i + 1]
        if op == 0:
            s = s.upper()
        elif op == 1:
            s = " \t\n\u2003\x00"[arg % 5] + s + " \r\x0b"[arg % 3]
        elif op == 2:
            u, g = s.rsplit("/", 1) if "/" in s else (s, "")
            s = f"{u}/{'0' * (arg % 12)}{g}"
        elif op == 3:
            u = s.rsplit("/", 1)[0]
            s = f"{u}/{int.from_bytes(ops[i:i + 8], 'little') >> (arg % 64)}"
        elif op == 4 and s:
            k = arg % len(s)
            s = s[:k] + s[k + 1:]
        elif op == 5:
            k = arg % (len(s) + 1)
            s = s[:k] + chr(ops[(i + 2) % len(ops)] * (arg + 1)) + s[k:]
        elif op == 6:
            s = s.replace("-", "" if arg & 1 else "--", 1)
        elif op == 7:
            u = s.rsplit("/", 1)[0]
            s = u + "/" + "\u0663\u00b2\uff11\u0967"[arg % 4] * (1 + arg % 3)   # non-ASCII digits
        else:
            s = s + "/" + str(arg)
    return s


def _other(payload: bytes):
    k = payload[0] % 10 if payload else 0
    n = int.from_bytes(payload[1:9], "little")
    return [None, n, -n, float(n), payload, bytearray(payload), [_text(payload)], {"id": n},
            memoryview(payload), object()][k]


def check_parse(value, tracking: bytes, generation: int) -> None:
    g = guard(parse_change_id, value, tracking, generation)
    if g is not None:
        assert isinstance(g, int) and 1 <= g < generation, (value, g, generation)
        assert guard(parse_change_id, format_change_id(tracking, g), tracking, generation) == g


def check_sidecar(st: _State, text: str) -> None:
    target = scratch_path("target.raw")
    side = B.sidecar_path(target)
    with open(side, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    try:
        data = guard(B._read_sidecar, target)
        if data is None:
            return
        # what restore does next with the sidecar's change id: the chain check of the next delta
        nxt = types.SimpleNamespace(path="next.h5", full=False, since=st.ids[0], change_id=st.ids[1],
                                    image_uuid=data["image_uuid"], tracking_id=data["tracking_id"],
                                    block_size=data["block_size"])
        guard(B.check_chain, [nxt], base=data["change_id"], base_what="the target")
        guard(st.disk.changes_since, data["target"].get("change_id"))
    finally:
        remove(side)


def sidecar_json(st: _State, change_id: str) -> str:
    """The sidecar restore writes (vdisk/backup.py _sidecar), with the given change id."""
    return json.dumps({"format": B.CHAIN_FORMAT, "version": B.CHAIN_VERSION, "state": "complete",
                       "target_format": "raw", "image_uuid": str(st.disk.uuid), "tracking_id": st.uuid,
                       "change_id": change_id, "virtual_size": st.disk.size, "block_size": st.disk.block_size,
                       "target": {"size": 1, "mtime_ns": 1, "inode": 1, "change_id": st.ids[0]},
                       "deltas": ["d0.h5"], "updated": "2024-01-01T00:00:00Z"}, ensure_ascii=False)


def one_input(data: bytes) -> None:
    if not data:
        return
    global _codec
    st = state()
    mode, payload = (data[0] & 7) % 7, data[1:]
    _codec = "latin-1" if data[0] & LATIN1 else "utf-8"
    if mode == 4:
        check_sidecar(st, _text(payload))
        return
    if mode in (5, 6):
        check_sidecar(st, sidecar_json(st, (f"{st.uuid}/" if mode == 6 else "") + _text(payload)))
        return
    if mode == 0:
        value = _text(payload)
    elif mode == 1:
        value = f"{st.uuid}/{_text(payload)}"
    elif mode == 2:
        value = _reshape(st.ids[payload[0] % len(st.ids)] if payload else st.ids[0], payload[1:])
    else:
        value = _other(payload)
    check_parse(value, st.tracking, st.generation)
    check_parse(value, st.tracking, 1 + int.from_bytes(payload[-8:], "little") % (1 << 62))
    guard(st.disk.changes_since, value)
    guard(st.snap.changes_since, value)


def build_seeds(directory: str | None = None) -> dict[str, bytes]:
    st = state()
    seeds = {"star": b"\x00*", "empty": b"\x00", "gen": b"\x01" + b"2", "gen0": b"\x01" + b"0",
             "huge": b"\x01" + b"9999999999", "reshape": b"\x02\x01\x00\x01\x02\x03", "other": b"\x03\x04abc",
             "sidecar": b"\x04" + sidecar_json(st, st.ids[1]).encode(),
             "sidecar-id": b"\x05" + st.ids[0].encode(), "sidecar-gen": b"\x06" + b"12"}
    for i, cid in enumerate(st.ids):
        seeds[f"id{i}"] = b"\x00" + cid.encode()
    return seeds


def mutate(data: bytes, rng) -> bytes:
    from vdisk_testkit.fuzz.common import havoc
    if data and rng.random() < 0.2:
        return bytes([rng.randrange(7) | rng.choice((0, LATIN1))]) + data[1:]
    return havoc(data, rng, 1 if len(data) > 1 else 0, max_len=4096)


if __name__ == "__main__":
    from vdisk_testkit.fuzz.common import atheris_main
    atheris_main(one_input)
