"""The delta file: one HDF5 file per backup, declared once, read and written.

docs/BACKUP_FORMAT.md describes it table for table: the five datasets
(``DATASETS``), the root attributes (``ATTRS``), the extent and row rules,
the checksums and the write order.  :class:`DeltaFile` opens a delta and
validates everything but the block rows, which :meth:`DeltaFile.read_rows`
checks (CRC32C) as it reads them; :class:`DeltaWriter` writes one under a
temporary name and moves it into place when complete and durable.

h5py/HDF5 errors never escape: they become CorruptImageError naming the file.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import struct
import uuid as _uuid

import crc32c as _crc32c
import numpy as np

from . import layout as L
from .errors import (ChecksumError, CorruptImageError, FormatError, InvalidArgumentError, StaleChangeIdError,
                     UnsupportedFeatureError, VdiskError, VdiskIOError)
from .fileio import fsync_dir, open_regular, place, place_synced, pwrite_all, start_writeback  # noqa: F401 - backup imports some here
from .tracking import parse_change_id

# ---------------------------------------------------------------------------- the bytes, declared once
FORMAT_NAME = "vdisk-delta"
FORMAT_VERSION = 1

FLAG_ZERO = 1                          # extent reads as zeros: no data rows
KNOWN_FLAGS = FLAG_ZERO

# datasets: name -> (dtype, ndim)
DS_OFFSETS, DS_LENGTHS, DS_FLAGS, DS_DATA, DS_CRC = "offsets", "lengths", "flags", "data", "crc32c"
DATASETS = {
    DS_OFFSETS: (np.dtype("<u8"), 1),
    DS_LENGTHS: (np.dtype("<u8"), 1),
    DS_FLAGS: (np.dtype("u1"), 1),
    DS_DATA: (np.dtype("u1"), 2),
    DS_CRC: (np.dtype("<u4"), 1),
}

# root attributes: name -> type ("str", or the numpy dtype of an integer)
ATTRS = {
    "format": "str",                   # FORMAT_NAME
    "format_version": np.dtype("<u4"),  # FORMAT_VERSION
    "image_uuid": "str",
    "tracking_id": "str",
    "since": "str",                    # "*" for a full backup
    "change_id": "str",
    "block_size": np.dtype("<u8"),
    "virtual_size": np.dtype("<u8"),
    "data_blocks": np.dtype("<u8"),    # rows of `data`
    "data_bytes": np.dtype("<u8"),     # bytes of the data extents
    "zero_bytes": np.dtype("<u8"),     # bytes of the zero extents
    "created": "str",                  # ISO 8601 UTC, e.g. 2024-06-01T12:00:00Z
    "vdisk_version": "str",
    "checksum": np.dtype("<u4"),       # CRC32C of the canonical attributes + extents (see attrs_checksum)
}

COMPRESSIONS = {"gzip": "gzip", "lzf": "lzf", "none": None, None: None}
GZIP_LEVEL = 4
CHUNK_BYTES = 1 << 20                  # a chunk of `data` holds at most 16 rows and about 1 MiB
MAX_CHUNK_ROWS = 16
BATCH_BYTES = 8 << 20                  # data moved per batch
H5_CACHE_BYTES = 16 << 20              # chunk cache of an open delta

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HDF5_LIBVER = ("v110", "v110")         # checksummed HDF5 metadata, readable by HDF5 >= 1.10

# The preamble: the HDF5 user block (bytes HDF5 leaves to the application),
# checked before HDF5 parses anything.  libhdf5 can crash or loop forever on
# damaged metadata, so every byte it reads is under a CRC32C here first;
# the block rows (the skipped ranges) carry their own CRCs.
PREAMBLE_SIZE = 4096
PREAMBLE_MAGIC = b"VDKDELTA"
PREAMBLE_VERSION = 1
PREAMBLE_HEAD = struct.Struct("<8sIIQII")     # magic, version, nskip, file_size, meta_crc, reserved
PREAMBLE_SKIP = struct.Struct("<QQ")          # offset, length of a skipped range (the `data` storage)
MAX_SKIP_RANGES = (PREAMBLE_SIZE - 4 - PREAMBLE_HEAD.size) // PREAMBLE_SKIP.size


def pack_preamble(file_size: int, meta_crc: int, skips) -> bytes:
    body = PREAMBLE_HEAD.pack(PREAMBLE_MAGIC, PREAMBLE_VERSION, len(skips), file_size, meta_crc, 0)
    body += b"".join(PREAMBLE_SKIP.pack(o, n) for o, n in skips)
    body = body.ljust(PREAMBLE_SIZE - 4, b"\0")
    return body + struct.pack("<I", _crc32c.crc32c(body))


def unpack_preamble(raw: bytes, path: str) -> tuple[int, int, list[tuple[int, int]]]:
    """(file_size, meta_crc, skipped ranges) of a preamble; raises on damage."""
    if raw[:8] != PREAMBLE_MAGIC[:len(raw[:8])]:
        if raw[:8] == HDF5_SIGNATURE:
            raise FormatError(f"{path}: an HDF5 file, but not a vdisk delta (no vdisk preamble)")
        raise FormatError(f"{path}: not a vdisk delta (no vdisk preamble)")
    if len(raw) < PREAMBLE_SIZE:
        raise CorruptImageError(f"{path}: truncated to {len(raw)} bytes, inside the {PREAMBLE_SIZE}-byte preamble")
    body, (stored,) = raw[:PREAMBLE_SIZE - 4], struct.unpack("<I", raw[PREAMBLE_SIZE - 4:PREAMBLE_SIZE])
    if _crc32c.crc32c(body) != stored:
        raise ChecksumError(f"{path}: preamble checksum mismatch: stored {stored:#010x}, computed "
                            f"{_crc32c.crc32c(body):#010x}")
    magic, version, nskip, file_size, meta_crc, _ = PREAMBLE_HEAD.unpack_from(body)
    if version != PREAMBLE_VERSION:
        raise UnsupportedFeatureError(f"{path}: delta preamble version {version}; this vdisk reads "
                                      f"{PREAMBLE_VERSION}")
    if nskip > MAX_SKIP_RANGES:
        raise CorruptImageError(f"{path}: preamble lists {nskip} skipped ranges, at most {MAX_SKIP_RANGES}")
    skips = [PREAMBLE_SKIP.unpack_from(body, PREAMBLE_HEAD.size + i * PREAMBLE_SKIP.size) for i in range(nskip)]
    pos = PREAMBLE_SIZE
    for off, n in skips:
        if off < pos or n == 0 or off + n > file_size:
            raise CorruptImageError(f"{path}: preamble: skipped range [{off}, {off + n}) unsorted, empty or "
                                    f"outside [{PREAMBLE_SIZE}, {file_size})")
        pos = off + n
    return file_size, meta_crc, skips


def metadata_crc(fd: int, file_size: int, skips, path: str) -> int:
    """CRC32C of the bytes [PREAMBLE_SIZE, file_size) outside the skipped ranges, in file order."""
    crc = 0
    buf = bytearray(1 << 20)
    for start, stop in _complement(skips, PREAMBLE_SIZE, file_size):
        pos = start
        while pos < stop:
            n = os.preadv(fd, [memoryview(buf)[:min(len(buf), stop - pos)]], pos)
            if n <= 0:
                raise CorruptImageError(f"{path}: the file ends at {pos}: truncated")
            crc = _crc32c.crc32c(memoryview(buf)[:n], crc)
            pos += n
    return crc


# HDF5 global heap collections (where the string attributes live): libhdf5's
# H5HG_load walks a collection's objects and loops forever on an object of
# size 0, so a collection is walked here first (a resealed preamble does not
# stop a crafted file: fuzz finding, tests/fuzz_regressions/delta-crafted/)
GCOL_SIGNATURE = b"GCOL"
GCOL_OBJECT_HEADER = struct.Struct("<HH4xQ")  # heap object index (0: free space), reference count, size
GCOL_MIN_SIZE = 4096                          # H5HG_MINSIZE
GCOL_MAX_SIZE = 1 << 20                       # a delta's few short strings fill one 4 KiB collection


def check_global_heaps(fd: int, file_size: int, skips, path: str) -> None:
    """Walk every global heap collection in the bytes the preamble's CRC covers,
    as libhdf5 will; raise CorruptImageError where the walk would not end."""
    window = 1 << 20
    for start, stop in _complement(skips, PREAMBLE_SIZE, file_size):
        for pos in range(start, stop, window):
            raw = os.pread(fd, min(window, stop - pos) + len(GCOL_SIGNATURE) - 1, pos)
            at = raw.find(GCOL_SIGNATURE)
            while 0 <= at and pos + at < stop:
                _check_global_heap(fd, pos + at, file_size, path)
                at = raw.find(GCOL_SIGNATURE, at + 1)


def _check_global_heap(fd: int, off: int, file_size: int, path: str) -> None:
    head = os.pread(fd, 16, off)
    where = f"{path}: HDF5 global heap collection at offset {off}"
    version, size = (head[4], struct.unpack_from("<Q", head, 8)[0]) if len(head) == 16 else (0, 0)
    if version != 1 or not GCOL_MIN_SIZE <= size <= GCOL_MAX_SIZE or off + size > file_size:
        raise CorruptImageError(f"{where}: version {version}, {size} bytes: not a collection of "
                                f"{GCOL_MIN_SIZE} to {GCOL_MAX_SIZE} bytes inside the file")
    body = os.pread(fd, size, off)
    pos = 16
    while pos + GCOL_OBJECT_HEADER.size <= size:
        index, _refs, n = GCOL_OBJECT_HEADER.unpack_from(body, pos)
        need = n if index == 0 else GCOL_OBJECT_HEADER.size + -(-n // 8) * 8
        if need < GCOL_OBJECT_HEADER.size or pos + need > size:
            raise CorruptImageError(f"{where}: heap object {index} at +{pos} claims {n} bytes: the walk of the "
                                    f"{size}-byte collection would not end (libhdf5 loops or reads past it)")
        pos += need


def _complement(skips, lo: int, hi: int):
    pos = lo
    for off, n in skips:
        if off > pos:
            yield pos, off
        pos = off + n
    if pos < hi:
        yield pos, hi


def chunk_rows_for(block_size: int) -> int:
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // block_size))


def batch_rows_for(block_size: int) -> int:
    chunk = chunk_rows_for(block_size)
    return max(chunk, BATCH_BYTES // block_size // chunk * chunk)


def attrs_checksum(attrs: dict, offsets: np.ndarray, lengths: np.ndarray, flags: np.ndarray) -> int:
    """CRC32C of the canonical form: the attributes but ``checksum`` as JSON
    (sorted keys, no spaces, ASCII), then the three extent arrays' bytes."""
    canon = {k: (v if isinstance(v, str) else int(v)) for k, v in attrs.items() if k != "checksum"}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    crc = _crc32c.crc32c(text)
    for arr, dt in ((offsets, "<u8"), (lengths, "<u8"), (flags, "u1")):
        crc = _crc32c.crc32c(np.ascontiguousarray(arr, dtype=dt), crc)
    return crc


# ---------------------------------------------------------------------------- h5py errors
@contextlib.contextmanager
def _h5(path: str, what: str):
    """Turn h5py/HDF5 errors into CorruptImageError naming the file."""
    try:
        yield
    except VdiskError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise CorruptImageError(f"{path}: {what}: {msg}") from exc


@contextlib.contextmanager
def _writing(path: str):
    """Turn OS and HDF5 errors while writing (ENOSPC, EIO, ...) into VdiskIOError naming the file."""
    try:
        yield
    except VdiskError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        code = getattr(exc, "errno", None) or errno.EIO
        msg = " ".join((getattr(exc, "strerror", None) or str(exc)).split())
        raise VdiskIOError(code, f"writing {path} failed: {msg}") from exc


def _chunk_ranges(ds) -> list[tuple[int, int]]:
    """(offset, length) of a chunked dataset's storage, sorted and coalesced."""
    info = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    out: list[list[int]] = []
    for off, n in sorted((c.byte_offset, c.size) for c in info if c.byte_offset is not None):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]


def _import_h5py():
    import h5py
    return h5py


# ---------------------------------------------------------------------------- reading a delta
class DeltaFile:
    """An open delta whose structure, attributes checksum and extents were validated.

    Block rows are read with :meth:`read_rows`, which checks each row's CRC32C.
    """

    def __init__(self, path: str):
        self.path = path
        self._h5file = None
        self._fd = -1
        self.attrs: dict = {}

    # --- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "DeltaFile":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InvalidArgumentError(f"{path}: no such delta file")
        self = cls(path)
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        path = self.path
        self._fd = open_regular(path, os.O_RDONLY)      # O_NONBLOCK, fstat: a regular file before any read
        size = os.fstat(self._fd).st_size
        # 1. the preamble and the CRC of every byte HDF5 will parse, before HDF5 sees the file
        file_size, meta_crc, skips = unpack_preamble(os.pread(self._fd, PREAMBLE_SIZE, 0), path)
        if size != file_size:
            raise CorruptImageError(f"{path}: {size} bytes, the preamble says {file_size}: "
                                    f"{'truncated' if size < file_size else 'bytes appended'}")
        got = metadata_crc(self._fd, size, skips, path)
        if got != meta_crc:
            raise ChecksumError(f"{path}: HDF5 structure checksum mismatch: stored {meta_crc:#010x}, computed "
                                f"{got:#010x} (the file's metadata is damaged)")
        check_global_heaps(self._fd, size, skips, path)
        self.file_size = size
        self._skips = skips
        h5py = _import_h5py()
        with _h5(path, "cannot open as HDF5 (damaged or truncated)"):
            self._h5file = h5py.File(path, "r", rdcc_nbytes=H5_CACHE_BYTES)
        self._check_skips()
        self._read_attrs()
        self._read_datasets()
        self._check_extents()
        got = attrs_checksum(self.attrs, self.offsets, self.lengths, self.flags)
        if got != self.attrs["checksum"]:
            raise ChecksumError(
                f"{path}: attributes checksum mismatch: stored {self.attrs['checksum']:#010x}, computed "
                f"{got:#010x} (an attribute or the extents table was changed or damaged)")

    def _check_skips(self) -> None:
        """The preamble's skipped ranges are the storage of 'data', nothing else:
        checked before HDF5 reads an attribute, so the global heap holding them
        lies in the bytes check_global_heaps walked (a crafted preamble could
        otherwise skip it)."""
        path, f = self.path, self._h5file
        if not self._skips:
            return
        with _h5(path, "reading the storage layout of dataset 'data'"):
            if DS_DATA not in f:
                raise CorruptImageError(f"{path}: dataset {DS_DATA!r} missing")
            ds = f[DS_DATA]
            if ds.chunks is None:
                off = ds.id.get_offset()
                storage = [(off, ds.id.get_storage_size())] if off is not None else []
            else:
                storage = _chunk_ranges(ds)
        if storage != [tuple(r) for r in self._skips]:
            raise CorruptImageError(f"{path}: the preamble's skipped ranges {self._skips[:4]} are not the storage "
                                    f"of dataset 'data' {storage[:4]}")

    def _read_attrs(self) -> None:
        path, f = self.path, self._h5file
        with _h5(path, "reading the attributes"):
            raw = {k: f.attrs[k] for k in f.attrs.keys()}
        fmt = raw.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode("utf-8", "replace")
        if fmt != FORMAT_NAME:
            if fmt is None:
                raise CorruptImageError(f"{path}: attribute 'format' missing (not a vdisk delta, or damaged)")
            raise FormatError(f"{path}: attribute 'format' is {fmt!r}, expected {FORMAT_NAME!r}")
        attrs = {}
        for name, value in raw.items():
            if isinstance(value, str):
                attrs[name] = value
            elif isinstance(value, (np.integer, int)) and not isinstance(value, bool):
                attrs[name] = int(value)
            else:
                raise CorruptImageError(f"{path}: attribute {name!r} has type {type(value).__name__}, "
                                        f"expected a string or an integer scalar")
        for name, kind in ATTRS.items():
            if name not in attrs:
                raise CorruptImageError(f"{path}: attribute {name!r} missing")
            if (kind == "str") != isinstance(attrs[name], str):
                raise CorruptImageError(f"{path}: attribute {name!r} is {attrs[name]!r}, expected "
                                        f"{'a string' if kind == 'str' else 'an integer'}")
            if kind != "str" and not 0 <= attrs[name] <= np.iinfo(kind).max:
                raise CorruptImageError(f"{path}: attribute {name!r} = {attrs[name]} out of range for {kind}")
        if attrs["format_version"] != FORMAT_VERSION:
            raise UnsupportedFeatureError(f"{path}: delta format version {attrs['format_version']}; this vdisk "
                                          f"reads version {FORMAT_VERSION}")
        self.attrs = attrs
        bs, vs = attrs["block_size"], attrs["virtual_size"]
        if bs & (bs - 1) or not (1 << L.MIN_BLOCK_SHIFT) <= bs <= (1 << L.MAX_BLOCK_SHIFT):
            raise CorruptImageError(f"{path}: block_size {bs}: not a power of two from 4 KiB to 4 MiB")
        if vs % L.SECTOR or -(-vs // bs) > L.MAX_BLOCKS:
            raise CorruptImageError(f"{path}: virtual_size {vs}: not a multiple of {L.SECTOR} or past "
                                    f"{L.MAX_BLOCKS} blocks")
        if not UUID_RE.match(attrs["image_uuid"]) or not UUID_RE.match(attrs["tracking_id"]):
            raise CorruptImageError(f"{path}: image_uuid {attrs['image_uuid']!r} or tracking_id "
                                    f"{attrs['tracking_id']!r} is not a UUID")
        tracking = _uuid.UUID(attrs["tracking_id"]).bytes
        try:
            self.generation = parse_change_id(attrs["change_id"], tracking, 1 << 62)
            self.since_generation = (0 if attrs["since"] == "*" else
                                     parse_change_id(attrs["since"], tracking, self.generation))
        except StaleChangeIdError as exc:
            raise CorruptImageError(f"{path}: attributes 'since' {attrs['since']!r} and 'change_id' "
                                    f"{attrs['change_id']!r} do not form a delta of tracking epoch "
                                    f"{attrs['tracking_id']}: {exc}") from None

    def _read_datasets(self) -> None:
        path, f = self.path, self._h5file
        bs, vs = self.block_size, self.virtual_size
        ds = {}
        for name, (dtype, ndim) in DATASETS.items():
            with _h5(path, f"opening dataset {name!r}"):
                if name not in f:
                    raise CorruptImageError(f"{path}: dataset {name!r} missing")
                d = f[name]
                shape, dt = d.shape, d.dtype
            if dt != dtype or len(shape) != ndim:
                raise CorruptImageError(f"{path}: dataset {name!r} is {dt}{list(shape)}, expected {ndim}-D {dtype}")
            ds[name] = d
        n = ds[DS_OFFSETS].shape[0]
        if ds[DS_LENGTHS].shape[0] != n or ds[DS_FLAGS].shape[0] != n:
            raise CorruptImageError(f"{path}: extent datasets differ in length: offsets {n}, lengths "
                                    f"{ds[DS_LENGTHS].shape[0]}, flags {ds[DS_FLAGS].shape[0]}")
        if n > max(1, -(-vs // bs)):        # each extent holds at least one block: bound before reading
            raise CorruptImageError(f"{path}: {n} extents cannot fit a disk of {vs} bytes in {bs}-byte blocks")
        rows = ds[DS_DATA].shape[0]
        if ds[DS_DATA].shape[1] != bs or ds[DS_CRC].shape[0] != rows:
            raise CorruptImageError(f"{path}: dataset 'data' is {list(ds[DS_DATA].shape)} and 'crc32c' "
                                    f"{list(ds[DS_CRC].shape)}, expected [{rows}, {bs}] and [{rows}]")
        if rows != self.attrs["data_blocks"]:
            raise CorruptImageError(f"{path}: dataset 'data' has {rows} rows, attribute data_blocks says "
                                    f"{self.attrs['data_blocks']}")
        with _h5(path, "reading the extents"):
            self.offsets = ds[DS_OFFSETS][()] if n else np.zeros(0, np.uint64)
            self.lengths = ds[DS_LENGTHS][()] if n else np.zeros(0, np.uint64)
            self.flags = ds[DS_FLAGS][()] if n else np.zeros(0, np.uint8)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.uint64)
        self.lengths = np.ascontiguousarray(self.lengths, dtype=np.uint64)
        self.flags = np.ascontiguousarray(self.flags, dtype=np.uint8)
        self._data, self._crc = ds[DS_DATA], ds[DS_CRC]
        self.rows = rows
        with _h5(path, "reading the storage layout"):
            self.compression = self._data.compression
            contiguous = self._data.chunks is None
            if self._data.external or self._crc.external:
                raise UnsupportedFeatureError(f"{path}: external dataset storage")
            if self._crc.chunks is not None:
                raise CorruptImageError(f"{path}: dataset 'crc32c' is chunked; version 1 stores it contiguous")
            crc_off = self._crc.id.get_offset() if rows else None
            data_off = self._data.id.get_offset() if rows and contiguous else None
            storage = ([(data_off, rows * bs)] if contiguous else _chunk_ranges(self._data)) if rows else []
        if rows and (crc_off is None or (contiguous and data_off is None)):
            raise CorruptImageError(f"{path}: datasets 'data' or 'crc32c' have no storage")
        if storage != [tuple(r) for r in self._skips] and (contiguous or self._skips):
            raise CorruptImageError(f"{path}: the preamble's skipped ranges {self._skips[:4]} are not the storage "
                                    f"of dataset 'data' {storage[:4]}")
        for what, off, nbytes in (("data", data_off, rows * bs), ("crc32c", crc_off, rows * 4)):
            if off is not None and off + nbytes > self.file_size:
                raise CorruptImageError(f"{path}: dataset {what!r} occupies bytes [{off}, {off + nbytes}) but the "
                                        f"file has {self.file_size}: truncated")
        self._data_off, self._crc_off = data_off, crc_off

    def _check_extents(self) -> None:
        path, bs, vs = self.path, self.block_size, self.virtual_size
        off, length, flags = self.offsets, self.lengths, self.flags
        if len(off) == 0:
            bad = None
        else:
            end = off + length
            wrapped = end < off
            checks = [
                (wrapped | (length == 0), "has a zero length or wraps around"),
                (off % np.uint64(bs) != 0, f"offset is not a multiple of the block size {bs}"),
                (end > np.uint64(vs), f"ends past the virtual size {vs}"),
                ((length % np.uint64(bs) != 0) & (end != np.uint64(vs)),
                 f"length is not a multiple of the block size {bs} and the extent does not end at the virtual size"),
                ((flags & ~np.uint8(KNOWN_FLAGS)) != 0, "has unknown flag bits"),
                (np.concatenate(([False], off[1:] < end[:-1])), "overlaps the previous extent or is out of order"),
            ]
            bad = None
            for mask, what in checks:
                hits = np.flatnonzero(mask)
                if len(hits):
                    i = int(hits[0])
                    bad = f"extent {i} (offset {int(off[i])}, length {int(length[i])}, flags {int(flags[i])}) {what}"
                    break
        if bad:
            raise CorruptImageError(f"{path}: {bad}")
        data = (flags & FLAG_ZERO) == 0
        nblocks = ((length + np.uint64(bs - 1)) // np.uint64(bs)).astype(np.int64)
        self.block_starts = (off // np.uint64(bs)).astype(np.int64)
        self.block_ends = self.block_starts + nblocks
        self.is_zero = ~data
        # the first data row of every extent (zero extents: the row after the previous data)
        self.row_starts = np.concatenate(([0], np.cumsum(np.where(data, nblocks, 0))[:-1])).astype(np.int64) \
            if len(off) else np.zeros(0, np.int64)
        want_rows = int(nblocks[data].sum()) if len(off) else 0
        want_bytes = int(length[data].sum()) if len(off) else 0
        zero_bytes = int(length[~data].sum()) if len(off) else 0
        if want_rows != self.rows:
            raise CorruptImageError(f"{path}: the data extents need {want_rows} block rows, dataset 'data' "
                                    f"has {self.rows}")
        if (want_bytes, zero_bytes) != (self.attrs["data_bytes"], self.attrs["zero_bytes"]):
            raise CorruptImageError(f"{path}: the extents hold {want_bytes} data and {zero_bytes} zero bytes, "
                                    f"attributes say {self.attrs['data_bytes']} and {self.attrs['zero_bytes']}")
        self._data_rows = self.row_starts[data]
        self._data_blocks = self.block_starts[data]

    # --- identity --------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.attrs["block_size"]

    @property
    def virtual_size(self) -> int:
        return self.attrs["virtual_size"]

    @property
    def since(self) -> str:
        return self.attrs["since"]

    @property
    def change_id(self) -> str:
        return self.attrs["change_id"]

    @property
    def image_uuid(self) -> str:
        return self.attrs["image_uuid"]

    @property
    def tracking_id(self) -> str:
        return self.attrs["tracking_id"]

    @property
    def full(self) -> bool:
        return self.since == "*"

    def block_of_row(self, row: int) -> int:
        i = int(np.searchsorted(self._data_rows, row, side="right")) - 1
        return int(self._data_blocks[i]) + row - int(self._data_rows[i])

    def summary(self) -> dict:
        a = self.attrs
        return {
            "path": self.path, "format_version": a["format_version"], "image_uuid": a["image_uuid"],
            "tracking_id": a["tracking_id"], "since": a["since"], "change_id": a["change_id"], "full": self.full,
            "extents": int(np.count_nonzero(~self.is_zero)), "zero_extents": int(np.count_nonzero(self.is_zero)),
            "bytes": a["data_bytes"], "zero_bytes": a["zero_bytes"], "blocks": self.rows,
            "block_size": a["block_size"], "virtual_size": a["virtual_size"], "created": a["created"],
            "vdisk_version": a["vdisk_version"], "compression": self.compression or "none",
            "file_bytes": self.file_size,
        }

    # --- rows --------------------------------------------------------------------------
    def read_rows(self, row: int, n: int, out: np.ndarray) -> None:
        """Rows [row, row+n) into out[:n] (C-contiguous uint8, n x block_size), each CRC-checked."""
        bs = self.block_size
        if row < 0 or n < 0 or row + n > self.rows:
            raise CorruptImageError(f"{self.path}: block rows [{row}, {row + n}) outside [0, {self.rows})")
        if n == 0:
            return
        view = out[:n]
        if self._data_off is not None:
            self._pread_exact(view.reshape(-1), self._data_off + row * bs, f"block rows [{row}, {row + n})")
        else:
            with _h5(self.path, f"reading block rows [{row}, {row + n})"):
                self._data.read_direct(out, np.s_[row:row + n], np.s_[0:n])
        crcs = np.empty(n, dtype="<u4")
        self._pread_exact(crcs.view(np.uint8), self._crc_off + row * 4, f"checksums of rows [{row}, {row + n})")
        crc = _crc32c.crc32c
        for i in range(n):
            got = crc(view[i])
            if got != crcs[i]:
                r = row + i
                b = self.block_of_row(r)
                raise ChecksumError(
                    f"{self.path}: block row {r} (virtual block {b}, offset {b * bs}): CRC32C mismatch: stored "
                    f"{int(crcs[i]):#010x}, computed {got:#010x}")

    def _pread_exact(self, mv: np.ndarray, offset: int, what: str) -> None:
        buf = memoryview(mv).cast("B")
        done = 0
        while done < len(buf):
            try:
                k = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise CorruptImageError(f"{self.path}: {what}: {exc.strerror or exc}") from exc
            if k == 0:
                raise CorruptImageError(f"{self.path}: {what}: the file ends at {offset + done}: truncated")
            done += k

    def verify_rows(self, ranges=None, tick=None) -> None:
        """Read and CRC-check rows (all, or the [start, stop) ranges given), in batches."""
        if ranges is None:
            ranges = [(0, self.rows)]
        batch = batch_rows_for(self.block_size)
        buf = np.empty((batch, self.block_size), dtype=np.uint8)
        for start, stop in ranges:
            for r in range(start, stop, batch):
                n = min(batch, stop - r)
                self.read_rows(r, n, buf)
                if tick:
                    tick(n * self.block_size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._h5file is not None:
            try:
                self._h5file.close()
            except Exception:       # closing a damaged file must not hide the error that got us here
                pass
            self._h5file = None

    def __enter__(self) -> "DeltaFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- writing a delta
def check_dest(dest) -> str:
    dest = os.fspath(dest)
    if os.path.lexists(dest):
        raise InvalidArgumentError(f"{dest} exists: a delta is never overwritten (choose a new name)")
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise InvalidArgumentError(f"{dest}: directory {directory} does not exist")
    return dest


def parse_compression(compression):
    if isinstance(compression, str):
        compression = compression.lower()
    if compression not in COMPRESSIONS:
        raise InvalidArgumentError(f"compression {compression!r}: expected 'gzip', 'lzf' or None/'none'")
    return COMPRESSIONS[compression]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _H5Target:
    """The file object libhdf5 writes a new delta through (h5py's fileobj driver).

    libhdf5 does not survive its own write errors: after a failed write its
    close fails half-way, leaves objects it then frees twice, and the process
    crashes (a segmentation fault in H5D_close; found by injecting EIO and
    ENOSPC under libhdf5, tests/opfaultsim.py).  So libhdf5 never sees one:
    the first failed write (or truncate) is kept in ``error`` for the writer
    to raise, and from then on, or once ``discard()`` is called, nothing
    reaches the file: writes land in memory, where reads find them, so that
    libhdf5 can close cleanly a file that is being deleted anyway.
    """

    def __init__(self, fd: int):
        self.fd, self.pos = fd, 0
        self.error: OSError | None = None
        self._detached = False
        self._overlay: list[tuple[int, bytes]] = []     # writes kept in memory once detached

    def discard(self) -> None:
        self._detached = True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        else:
            end = os.fstat(self.fd).st_size
            for off, data in self._overlay:
                end = max(end, off + len(data))
            self.pos = end + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        mv = memoryview(buf).cast("B")
        n = os.preadv(self.fd, [mv], self.pos)
        mv[n:] = bytes(len(mv) - n)           # past the end of the file: zeros
        for off, data in self._overlay:       # later writes win
            lo, hi = max(off, self.pos), min(off + len(data), self.pos + len(mv))
            if lo < hi:
                mv[lo - self.pos:hi - self.pos] = data[lo - off:hi - off]
        self.pos += len(mv)
        return len(mv)

    def read(self, size: int = -1) -> bytes:
        buf = bytearray(max(size, 0))
        self.readinto(buf)
        return bytes(buf)

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        if self.error is None and not self._detached:
            try:
                pwrite_all(self.fd, mv, self.pos)
            except OSError as exc:
                self.error = exc
        if self.error is not None or self._detached:
            self._overlay.append((self.pos, bytes(mv)))
        self.pos += len(mv)
        return len(mv)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None and not self._detached:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        """Durability comes from the writer's fsync in commit()."""


class DeltaWriter:
    """Writes one delta under a temporary name; commit() moves it into place.

    Everything but the rows is known up front: the datasets and attributes
    are created first.  Uncompressed, `data` and `crc32c` are contiguous and
    allocated at creation: the rows then go straight to their file offsets
    with pwrite (the layout a memory map of the file sees).  Compressed,
    they go through h5py in whole chunks.  libhdf5 writes through a
    :class:`_H5Target`, so that a failed write raises VdiskIOError here and
    never reaches libhdf5.
    """

    def __init__(self, dest: str, attrs: dict, offsets, lengths, flags, compression):
        h5py = _import_h5py()
        self.dest = dest
        directory = os.path.dirname(os.path.abspath(dest))
        self.directory = directory
        self.tmp = os.path.join(directory, f".{os.path.basename(dest)}.{_uuid.uuid4().hex[:8]}.partial")
        self.bs = attrs["block_size"]
        self.rows = attrs["data_blocks"]
        self._f = None
        self._fd = -1
        self._target = None
        attrs = dict(attrs)
        attrs["checksum"] = attrs_checksum(attrs, offsets, lengths, flags)
        self.attrs = attrs
        try:
            self._create(h5py, attrs, offsets, lengths, flags, compression)
        except BaseException:
            self.abort()
            raise

    @contextlib.contextmanager
    def _h5_writing(self):
        """libhdf5 at work: a write it could not make raises, as VdiskIOError naming the file."""
        with _writing(self.tmp):
            try:
                yield
            except (OSError, RuntimeError, ValueError):
                if self._target is not None and self._target.error is not None:
                    raise self._target.error from None      # the cause, not what libhdf5 made of it
                raise
            if self._target is not None and self._target.error is not None:
                raise self._target.error

    def _create(self, h5py, attrs, offsets, lengths, flags, compression) -> None:
        bs, rows = self.bs, self.rows
        with _writing(self.tmp):
            self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._target = _H5Target(self._fd)
        with self._h5_writing():
            self._f = f = h5py.File(self._target, "w", userblock_size=PREAMBLE_SIZE, libver=HDF5_LIBVER)
            f.create_dataset(DS_OFFSETS, data=np.asarray(offsets, dtype="<u8"))
            f.create_dataset(DS_LENGTHS, data=np.asarray(lengths, dtype="<u8"))
            f.create_dataset(DS_FLAGS, data=np.asarray(flags, dtype="u1"))
            def early():                  # contiguous storage allocated now: its offset exists before any write
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                return dcpl
            self._crc = f.create_dataset(DS_CRC, shape=(rows,), dtype="<u4", dcpl=early(), fill_time="never")
            if compression is None or not rows:
                self._data = f.create_dataset(DS_DATA, shape=(rows, bs), dtype="u1", dcpl=early(),
                                              fill_time="never")
            else:
                opts = {"compression_opts": GZIP_LEVEL} if compression == "gzip" else {}
                self._data = f.create_dataset(DS_DATA, shape=(rows, bs), dtype="u1",
                                              chunks=(min(chunk_rows_for(bs), rows), bs), compression=compression,
                                              **opts)
            for name, kind in ATTRS.items():
                value = attrs[name]
                f.attrs[name] = value if kind == "str" else np.array(value, dtype=kind)[()]
            self._raw = self._data.chunks is None
            self._data_off = self._data.id.get_offset()
            self._crc_off = self._crc.id.get_offset()
            if self._raw:
                self._close_h5()

    def _close_h5(self) -> None:
        self._data = self._crc = None
        f, self._f = self._f, None
        f.close()

    def write_rows(self, row: int, buf: np.ndarray) -> None:
        """buf: n x block_size rows for [row, row + n); their CRCs are computed here."""
        n = len(buf)
        crc = _crc32c.crc32c
        crcs = np.fromiter((crc(r) for r in buf), dtype="<u4", count=n)
        if self._raw:
            with _writing(self.tmp):
                pwrite_all(self._fd, buf.reshape(-1), self._data_off + row * self.bs)
                start_writeback(self._fd, self._data_off + row * self.bs, n * self.bs)
                pwrite_all(self._fd, crcs.view(np.uint8), self._crc_off + row * 4)
        else:
            with self._h5_writing():
                self._data[row:row + n] = buf
                self._crc[row:row + n] = crcs

    def commit(self, before_place=None) -> int:
        """Close, fsync, link into place (never over an existing file), fsync the directory.
        before_place(): called once the file is complete and synced, before it is linked into
        place; if it raises, nothing appears under dest (abort() removes the file).  If the
        directory's fsync fails, dest is removed again and the error raised."""
        if self._f is not None:
            with self._h5_writing():
                self._close_h5()
        with _writing(self.tmp):
            if self._raw:
                skips = [(self._data_off, self.rows * self.bs)] if self.rows else []
            else:
                with _import_h5py().File(self.tmp, "r") as f:
                    skips = _chunk_ranges(f[DS_DATA])
                if len(skips) > MAX_SKIP_RANGES:   # too scattered to list: the whole file under one CRC
                    skips = []
            size = os.fstat(self._fd).st_size
            preamble = pack_preamble(size, metadata_crc(self._fd, size, skips, self.tmp), skips)
            pwrite_all(self._fd, preamble, 0)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if before_place is not None:
            before_place()
        place_synced(self.tmp, self.dest, "a delta is never overwritten")
        return os.path.getsize(self.dest)

    def abort(self) -> None:
        if self._f is not None:
            self._target.discard()        # libhdf5 closes in memory: the file is being deleted
            self._data = self._crc = None
            f, self._f = self._f, None
            try:
                f.close()
            except Exception:
                pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
