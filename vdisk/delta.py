"""The delta file: one HDF5 file per backup, declared once, read and written.

docs/BACKUP_FORMAT.md describes it table for table: the five datasets
(``DATASETS``), the root attributes (``ATTRS``), the extent and row rules,
the checksums and the write order.  :class:`DeltaFile` opens a delta and
validates everything but the block rows, which :meth:`DeltaFile.read_rows`
checks (CRC32C) as it reads them: first the preamble, then the HDF5
structure (:func:`check_structure`: nothing that names another file, no
object, filter or attribute type vdisk does not write, every declared size
backed by bytes in the file) before libhdf5 reads any attribute value or
dataset; :class:`DeltaWriter` writes one under a
temporary name and moves it into place when complete and durable.

h5py/HDF5 errors never escape: they become CorruptImageError naming the file.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import importlib
import json
import os
import re
import struct
from stat import S_ISREG as stat_is_regular
import threading
import uuid as _uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import crc32c as _crc32c
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

from . import layout as L
from .errors import (ChecksumError, CorruptImageError, FormatError, InvalidArgumentError, StaleChangeIdError,
                     UnsupportedFeatureError, VdiskError, VdiskIOError)
from .fileio import fsync_dir, open_regular, place, place_synced, pwrite_all, start_writeback  # noqa: F401 - backup imports some here
from .fileio import readable_buffer, writable_buffer
from ._types import PathArg
from .changeid import ANY
from .tracking import parse_change_id

# ---------------------------------------------------------------------------- the bytes, declared once
FORMAT_NAME = "vdisk-delta"
FORMAT_VERSION = 1

FLAG_ZERO = 1                          # extent reads as zeros: no data rows
KNOWN_FLAGS = FLAG_ZERO

# datasets: name -> (dtype, ndim)
DS_OFFSETS, DS_LENGTHS, DS_FLAGS, DS_DATA, DS_CRC = "offsets", "lengths", "flags", "data", "crc32c"
DATASETS: dict[str, tuple[np.dtype[Any], int]] = {
    DS_OFFSETS: (np.dtype("<u8"), 1),
    DS_LENGTHS: (np.dtype("<u8"), 1),
    DS_FLAGS: (np.dtype("u1"), 1),
    DS_DATA: (np.dtype("u1"), 2),
    DS_CRC: (np.dtype("<u4"), 1),
}

# root attributes: name -> type ("str", or the numpy dtype of an integer)
ATTRS: dict[str, str | np.dtype[Any]] = {
    "format": "str",                   # FORMAT_NAME
    "format_version": np.dtype("<u4"),  # FORMAT_VERSION
    "image_uuid": "str",
    "tracking_id": "str",
    "since": "str",                    # "*" (changeid.ANY) for a full backup
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

COMPRESSIONS: dict[str | None, str | None] = {"gzip": "gzip", "lzf": "lzf", "none": None, None: None}
GZIP_LEVEL = 4
CHUNK_BYTES = 1 << 20                  # a chunk of `data` holds at most 16 rows and about 1 MiB
MAX_CHUNK_ROWS = 16
BATCH_BYTES = 8 << 20                  # data moved per batch
H5_CACHE_BYTES = 16 << 20              # chunk cache of an open delta
PREAD_BYTES = 8 << 20                  # at most this much per read of the extents and rows

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


def pack_preamble(file_size: int, meta_crc: int, skips: Sequence[tuple[int, int]]) -> bytes:
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


def metadata_crc(fd: int, file_size: int, skips: Iterable[tuple[int, int]], path: str) -> int:
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


def check_global_heaps(fd: int, file_size: int, skips: Iterable[tuple[int, int]], path: str) -> None:
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


def _complement(skips: Iterable[tuple[int, int]], lo: int, hi: int) -> Iterator[tuple[int, int]]:
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


def attrs_checksum(attrs: dict[str, Any], offsets: npt.ArrayLike, lengths: npt.ArrayLike, flags: npt.ArrayLike) -> int:
    """CRC32C of the canonical form: the attributes but ``checksum`` as JSON
    (sorted keys, no spaces, ASCII), then the three extent arrays' bytes."""
    canon = {k: (v if isinstance(v, str) else int(v)) for k, v in attrs.items() if k != "checksum"}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    crc = _crc32c.crc32c(text)
    for arr, dt in ((offsets, "<u8"), (lengths, "<u8"), (flags, "u1")):
        crc = _crc32c.crc32c(readable_buffer(np.ascontiguousarray(arr, dtype=dt)), crc)
    return crc


# ---------------------------------------------------------------------------- h5py errors
@contextlib.contextmanager
def _h5(path: str, what: str) -> Iterator[None]:
    """Turn h5py/HDF5 errors into CorruptImageError naming the file."""
    try:
        yield
    except VdiskError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise CorruptImageError(f"{path}: {what}: {msg}") from exc


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Turn OS and HDF5 errors while writing (ENOSPC, EIO, ...) into VdiskIOError naming the file."""
    try:
        yield
    except VdiskError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        code = getattr(exc, "errno", None) or errno.EIO
        msg = " ".join((getattr(exc, "strerror", None) or str(exc)).split())
        raise VdiskIOError(code, f"writing {path} failed: {msg}") from exc


def _chunk_ranges(ds: Any) -> list[tuple[int, int]]:     # an h5py Dataset
    """(offset, length) of a chunked dataset's storage, sorted and coalesced."""
    info = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    out: list[list[int]] = []
    for off, n in sorted((c.byte_offset, c.size) for c in info if c.byte_offset is not None):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]


def _import_h5py() -> Any:
    """h5py, imported on first use (it ships no type hints: its objects are Any here)."""
    import h5py  # type: ignore[import-untyped]  # h5py ships neither stubs nor py.typed
    return h5py


# ---------------------------------------------------------------------------- the HDF5 structure, before any read
# What a delta may contain, checked by check_structure before libhdf5 reads
# any dataset or attribute value (docs/BACKUP_FORMAT.md, "What a reader checks
# before reading"): HDF5 can store a dataset's bytes in other files
# (external storage), name other files or paths (external and soft links),
# assemble a dataset from other files (virtual datasets) and run filter
# plugins it loads from HDF5_PLUGIN_PATH; a delta uses none of it.
MAX_ROOT_LINKS = 64                    # vdisk writes len(DATASETS); more are refused (named), many by count
MAX_ROOT_ATTRS = 64                    # vdisk writes len(ATTRS); a few more are accepted (and checksummed)
MAX_STR_ATTR_BYTES = 4096              # a fixed-length string attribute (vdisk writes variable-length ones)
FILTER_DEFLATE, FILTER_LZF = 1, 32000  # H5Z_FILTER_DEFLATE; LZF, registered by h5py itself (no plugin)
DATA_FILTERS = {FILTER_DEFLATE: "gzip", FILTER_LZF: "lzf"}
CONTIGUOUS, CHUNKED = "contiguous", "chunked"


class Storage:
    """Where one validated dataset's bytes are: all inside the delta file.

    ``ranges``: the (file offset, length) runs of its storage (one for a
    contiguous dataset with storage, the coalesced chunks of a chunked
    one); ``offset``: the file offset of a contiguous dataset's bytes, or
    None when it has none (an empty dataset)."""

    __slots__ = ("name", "dsid", "shape", "layout", "chunks", "filter", "offset", "ranges")

    def __init__(self, name: str, dsid: Any, shape: tuple[int, ...], layout: str, chunks: tuple[int, ...] | None,
                 filt: str | None, offset: int | None, ranges: list[tuple[int, int]]):
        self.name, self.dsid, self.shape, self.layout = name, dsid, shape, layout
        self.chunks, self.filter, self.offset, self.ranges = chunks, filt, offset, ranges


def _link_name(raw: bytes) -> str:
    return ascii(raw.decode("utf-8", "replace")[:64])


def check_structure(f: Any, path: str, file_size: int, skips: Sequence[tuple[int, int]]) -> dict[str, Storage]:
    """Validate the HDF5 structure of an open delta before anything reads a
    dataset or an attribute value; return {dataset name: Storage}.

    The root group holds exactly the five DATASETS, each reached by a hard
    link (no soft, external or user-defined link: libhdf5 would open what
    they name), each a plain dataset of its declared integer type and rank,
    contiguous or (``data`` only) chunked in whole rows, never virtual or
    compact, with no external storage and no filter but gzip or lzf (on
    ``data`` only), no attributes, and every byte of its storage inside the
    file: a contiguous dataset's storage is allocated and exactly its size,
    a chunked one has every chunk written.  The preamble's skipped ranges
    are exactly the storage of ``data``.  The root attributes are scalar
    integers or strings (no references, which can name other files or
    objects), at most MAX_ROOT_ATTRS of them.  O(number of objects + chunks
    of ``data``); ``data`` is bounded by ``crc32c`` (4 bytes a row, stored
    in the file) before its chunks are listed.  Raises
    UnsupportedFeatureError (an HDF5 feature vdisk never writes) or
    CorruptImageError; no message quotes a value read from a dataset."""
    h5py = _import_h5py()
    h5d, h5l, h5o, h5a, h5s, h5t = h5py.h5d, h5py.h5l, h5py.h5o, h5py.h5a, h5py.h5s, h5py.h5t
    with _h5(path, "reading the HDF5 structure"):
        root = h5py.h5g.open(f.id, b"/")
        nlinks = root.get_num_objs()
        if nlinks > MAX_ROOT_LINKS:
            raise CorruptImageError(f"{path}: the root group holds {nlinks} objects; a delta holds exactly the "
                                    f"datasets {', '.join(DATASETS)}")
        links: dict[bytes, int] = {}
        root.links.iterate(lambda name, info: links.__setitem__(name, info.type), info=True)
        for raw, kind in links.items():
            name = raw.decode("utf-8", "replace")
            if name not in DATASETS:
                raise CorruptImageError(f"{path}: unexpected object {_link_name(raw)} in the root group; a delta "
                                        f"holds exactly the datasets {', '.join(DATASETS)}")
            if kind != h5l.TYPE_HARD:
                what = {h5l.TYPE_SOFT: "a soft link", h5l.TYPE_EXTERNAL: "an external link (to another file)"}
                raise UnsupportedFeatureError(f"{path}: {name!r} is {what.get(kind, f'a link of type {kind}')}; "
                                              f"a delta's datasets are stored in it (hard links only)")
        for name in DATASETS:
            if name.encode() not in links:
                raise CorruptImageError(f"{path}: dataset {name!r} missing")
        out = {name: _check_dataset(h5py, root, name, path, file_size) for name in (DS_OFFSETS, DS_LENGTHS,
                                                                                    DS_FLAGS, DS_CRC)}
        out[DS_DATA] = _check_dataset(h5py, root, DS_DATA, path, file_size, max_rows=out[DS_CRC].shape[0])
        if out[DS_DATA].ranges != [tuple(r) for r in skips] and (out[DS_DATA].layout == CONTIGUOUS or skips):
            raise CorruptImageError(f"{path}: the preamble's skipped ranges {skips[:4]} are not the storage of "
                                    f"dataset 'data' {out[DS_DATA].ranges[:4]}")
        nattrs = h5a.get_num_attrs(root)
        if nattrs > MAX_ROOT_ATTRS:
            raise CorruptImageError(f"{path}: the root group has {nattrs} attributes, at most {MAX_ROOT_ATTRS}")
        for i in range(nattrs):
            aid = h5a.open(root, index=i)
            aname = _link_name(aid.name)
            tid, space = aid.get_type(), aid.get_space()
            cls = tid.get_class()
            if space.get_simple_extent_type() != h5s.SCALAR:
                raise CorruptImageError(f"{path}: attribute {aname} is not a scalar")
            if tid.committed():
                raise UnsupportedFeatureError(f"{path}: attribute {aname} has a named (committed) datatype")
            if cls == h5t.INTEGER:
                if tid.get_size() > 8:
                    raise CorruptImageError(f"{path}: attribute {aname} is a {tid.get_size()}-byte integer")
            elif cls == h5t.STRING:
                if not tid.is_variable_str() and tid.get_size() > MAX_STR_ATTR_BYTES:
                    raise CorruptImageError(f"{path}: attribute {aname} is a {tid.get_size()}-byte string, at "
                                            f"most {MAX_STR_ATTR_BYTES}")
            else:
                described = {h5t.REFERENCE: "a reference (to an object or a region, here or in another file)",
                        h5t.FLOAT: "a float", h5t.COMPOUND: "a compound", h5t.VLEN: "a variable-length sequence",
                        h5t.ARRAY: "an array", h5t.ENUM: "an enum", h5t.OPAQUE: "opaque"}.get(cls, f"class {cls}")
                raise UnsupportedFeatureError(f"{path}: attribute {aname} is {described}; a delta's attributes are "
                                              f"integers and strings")
    return out


def _check_dataset(h5py: Any, root: Any, name: str, path: str, file_size: int, max_rows: int | None = None) -> Storage:
    """One dataset of check_structure, opened by its (hard) link and checked
    before anything reads it."""
    h5d, h5o, h5s, h5t = h5py.h5d, h5py.h5o, h5py.h5s, h5py.h5t
    dtype, ndim = DATASETS[name]
    where = f"{path}: dataset {name!r}"
    if h5o.get_info(root, name.encode()).type != h5o.TYPE_DATASET:
        raise CorruptImageError(f"{where} is not a dataset")
    dsid = h5d.open(root, name.encode())
    dcpl = dsid.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5d.VIRTUAL:
        raise UnsupportedFeatureError(f"{where} is a virtual dataset (made of other files' datasets); a delta "
                                      f"stores its datasets in it")
    if dcpl.get_external_count():
        raise UnsupportedFeatureError(f"{where} has external storage (its bytes in another file); a delta "
                                      f"stores its datasets in it")
    if layout not in (h5d.CONTIGUOUS, h5d.CHUNKED):
        raise UnsupportedFeatureError(f"{where} has layout {layout} (compact?); a delta's datasets are "
                                      f"contiguous or chunked")
    chunked = layout == h5d.CHUNKED
    if chunked and name != DS_DATA:
        raise CorruptImageError(f"{where} is chunked; version 1 stores it contiguous")
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    if filters and (len(filters) > 1 or filters[0] not in DATA_FILTERS):
        raise UnsupportedFeatureError(f"{where} has the filters {filters}; a delta uses none, or one of gzip "
                                      f"(id {FILTER_DEFLATE}) and lzf (id {FILTER_LZF}) on 'data'")
    if h5py.h5a.get_num_attrs(dsid):
        raise CorruptImageError(f"{where} has attributes; a delta's datasets have none")
    tid = dsid.get_type()
    if tid.committed() or tid.get_class() != h5t.INTEGER or tid.get_size() != dtype.itemsize \
            or tid.get_sign() != h5t.SGN_NONE or tid.get_precision() != 8 * dtype.itemsize or tid.get_offset() \
            or (dtype.itemsize > 1 and tid.get_order() != h5t.ORDER_LE):
        raise CorruptImageError(f"{where} is not of type {dtype} (plain little-endian unsigned integers)")
    space = dsid.get_space()
    if space.get_simple_extent_type() != h5s.SIMPLE or space.get_simple_extent_ndims() != ndim:
        raise CorruptImageError(f"{where} is not a {ndim}-D array")
    shape = tuple(int(n) for n in space.get_simple_extent_dims())
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    if not chunked:
        size, offset = dsid.get_storage_size(), dsid.get_offset()
        if nbytes == 0:               # an empty dataset (an early allocation of 0 bytes has an odd offset)
            return Storage(name, dsid, shape, CONTIGUOUS, None, None, None, [])
        if offset is None or size != nbytes or not PREAMBLE_SIZE <= offset <= file_size - nbytes:
            raise CorruptImageError(f"{where}: {list(shape)} needs {nbytes} bytes of storage, it has {size} at "
                                    f"offset {offset}: not all of it inside the {file_size}-byte file")
        return Storage(name, dsid, shape, CONTIGUOUS, None, None, offset, [(offset, nbytes)])
    # chunked 'data': whole rows per chunk, at most as many rows as 'crc32c' has entries, every chunk written
    chunks = tuple(int(n) for n in dcpl.get_chunk())
    rows, width = shape
    if (max_rows is not None and rows > max_rows) or chunks[1] != width or not 1 <= chunks[0] <= MAX_CHUNK_ROWS:
        raise CorruptImageError(f"{where}: {list(shape)} in chunks of {list(chunks)}: expected chunks of at most "
                                f"{MAX_CHUNK_ROWS} whole rows and no more rows than 'crc32c' has ({max_rows})")
    want = -(-rows // chunks[0])
    got = dsid.get_num_chunks()
    if got != want:
        raise CorruptImageError(f"{where}: {got} chunks written of the {want} its {rows} rows need (a chunk "
                                f"never written reads as fill values)")
    runs: list[list[int]] = []
    seen = set()
    for i in range(got):
        info = dsid.get_chunk_info(i)
        off, n = info.byte_offset, info.size
        if off is None or n <= 0 or not PREAMBLE_SIZE <= off <= file_size - n or info.chunk_offset[1] \
                or info.chunk_offset[0] % chunks[0] or info.chunk_offset[0] in seen:
            raise CorruptImageError(f"{where}: chunk {i} ({n} bytes at offset {off}) is not a chunk of whole rows "
                                    f"inside the {file_size}-byte file")
        seen.add(info.chunk_offset[0])
        runs.append([off, n])
    runs.sort()
    ranges: list[list[int]] = []
    for off, n in runs:
        if ranges and ranges[-1][0] + ranges[-1][1] > off:
            raise CorruptImageError(f"{where}: chunks at offsets {ranges[-1][0]} and {off} overlap")
        if ranges and ranges[-1][0] + ranges[-1][1] == off:
            ranges[-1][1] += n
        else:
            ranges.append([off, n])
    filt = DATA_FILTERS[filters[0]] if filters else None
    return Storage(name, dsid, shape, CHUNKED, chunks, filt, None, [(o, n) for o, n in ranges])


# libhdf5 loads filter (and VFD, VOL) plugins from HDF5_PLUGIN_PATH when a
# dataset needs a filter it does not know: code from a directory named by the
# environment, run because a file asked for it.  check_structure refuses
# every filter but deflate (built into libhdf5) and lzf (registered by h5py);
# as a second wall, loading is switched off while vdisk reads a delta.
_plugin_lock = threading.Lock()
_plugin_depth = 0
_plugin_saved: int | None = None
_plugin_api: list[tuple[Any, Any] | None] = []     # [(get, set)] ctypes functions once looked up, [None] where unavailable


def _plugin_calls() -> tuple[Any, Any] | None:
    if not _plugin_api:
        try:
            import ctypes
            h5 = importlib.import_module("h5py.h5")
            lib = ctypes.CDLL(h5.__file__)            # dlsym on it searches libhdf5, which it links
            get, put = lib.H5PLget_loading_state, lib.H5PLset_loading_state
            get.argtypes, get.restype = [ctypes.POINTER(ctypes.c_uint)], ctypes.c_int
            put.argtypes, put.restype = [ctypes.c_uint], ctypes.c_int
            _plugin_api.append((get, put))
        except (OSError, AttributeError, ImportError):
            _plugin_api.append(None)
    return _plugin_api[0]


def plugin_loading_state() -> int | None:
    """libhdf5's plugin loading mask (H5PLget_loading_state; 0: none loads), None where unknown."""
    calls = _plugin_calls()
    if calls is None:
        return None
    import ctypes
    state = ctypes.c_uint()
    return state.value if calls[0](ctypes.byref(state)) >= 0 else None


@contextlib.contextmanager
def no_hdf5_plugins() -> Iterator[None]:
    """libhdf5 loads no plugin inside (process-wide: nested and concurrent
    uses share one switch; the mask before the first is put back after the
    last)."""
    global _plugin_depth, _plugin_saved
    calls = _plugin_calls()
    if calls is None:
        yield
        return
    with _plugin_lock:
        if _plugin_depth == 0:
            _plugin_saved = plugin_loading_state()
            if _plugin_saved:
                calls[1](0)
        _plugin_depth += 1
    try:
        yield
    finally:
        with _plugin_lock:
            _plugin_depth -= 1
            if _plugin_depth == 0 and _plugin_saved:
                calls[1](_plugin_saved)


def _open_delta_fd(path: str) -> int:
    """A read-only descriptor of the delta at path, refusing what is not a
    regular file (fileio.open_regular: O_NONBLOCK, so a FIFO never blocks the
    open, and fstat on that descriptor before any read)."""
    try:
        return open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path}: no such delta file") from None
    except InvalidArgumentError:
        raise
    except OSError as exc:
        raise VdiskIOError(exc.errno or errno.EIO, f"{path}: cannot open: {exc.strerror or exc}") from None


class _H5Source:
    """The file object libhdf5 reads an open delta through (h5py's fileobj
    driver): the very descriptor whose bytes vdisk checked, not whatever the
    path names by the time libhdf5 opens it, and no file system access of
    libhdf5's own (no driver or plugin chosen from the environment)."""

    def __init__(self, fd: int):
        self.fd, self.pos = fd, 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = (offset if whence == os.SEEK_SET else self.pos + offset if whence == os.SEEK_CUR
                    else os.fstat(self.fd).st_size + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: WriteableBuffer) -> int:
        mv = memoryview(buf).cast("B")
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], self.pos + done)
            if n <= 0:
                break
            done += n
        self.pos += done
        return done

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, os.fstat(self.fd).st_size - self.pos)
        buf = bytearray(size)
        return bytes(buf[:self.readinto(buf)])

    def write(self, data: ReadableBuffer) -> int:
        raise OSError(errno.EBADF, "a delta is read-only")

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------------------- reading a delta
class DeltaFile:
    """An open delta whose structure, attributes checksum and extents were validated.

    Block rows are read with :meth:`read_rows`, which checks each row's CRC32C.
    """

    def __init__(self, path: str):
        self.path = path
        self._h5file: Any = None        # an h5py File
        self._fd = -1
        self.attrs: dict[str, Any] = {}     # validated by _read_attrs: each of ATTRS of its type

    # --- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: PathArg) -> "DeltaFile":
        """Open and validate the delta at path: every open of a delta comes here."""
        self = cls(os.fspath(path))
        try:
            with no_hdf5_plugins():
                self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        """In order: a regular file; the preamble and the CRC of every byte HDF5
        will parse, and its global heaps, before HDF5 sees the file; the HDF5
        structure (check_structure) before any attribute value or dataset is
        read; the attributes; the datasets' sizes against the attributes and
        the file before the extents are read; the extents; the checksum."""
        path = self.path
        self._fd = _open_delta_fd(path)      # O_NONBLOCK, fstat: a regular file before any read
        size = os.fstat(self._fd).st_size
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
            self._h5file = h5py.File(_H5Source(self._fd), "r", rdcc_nbytes=H5_CACHE_BYTES)
        self._storage = check_structure(self._h5file, path, size, skips)
        self._read_attrs()
        self._read_datasets()
        self._check_extents()
        got = attrs_checksum(self.attrs, self.offsets, self.lengths, self.flags)
        if got != self.attrs["checksum"]:
            raise ChecksumError(
                f"{path}: attributes checksum mismatch: stored {self.attrs['checksum']:#010x}, computed "
                f"{got:#010x} (an attribute or the extents table was changed or damaged)")

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
        attrs: dict[str, Any] = {}
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
            if isinstance(kind, str) != isinstance(attrs[name], str):      # kind: "str" or a dtype
                raise CorruptImageError(f"{path}: attribute {name!r} is {attrs[name]!r}, expected "
                                        f"{'a string' if kind == 'str' else 'an integer'}")
            if not isinstance(kind, str) and not 0 <= attrs[name] <= np.iinfo(kind).max:
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
            self.since_generation = (0 if attrs["since"] == ANY else
                                     parse_change_id(attrs["since"], tracking, self.generation))
        except StaleChangeIdError as exc:
            raise CorruptImageError(f"{path}: attributes 'since' {attrs['since']!r} and 'change_id' "
                                    f"{attrs['change_id']!r} do not form a delta of tracking epoch "
                                    f"{attrs['tracking_id']}: {exc}") from None

    def _read_datasets(self) -> None:
        """Bound every dataset by the attributes (check_structure bounded them by
        the file), then read the extents, straight from their storage."""
        path, st, a = self.path, self._storage, self.attrs
        bs, vs = self.block_size, self.virtual_size
        n = st[DS_OFFSETS].shape[0]
        if st[DS_LENGTHS].shape[0] != n or st[DS_FLAGS].shape[0] != n:
            raise CorruptImageError(f"{path}: extent datasets differ in length: offsets {n}, lengths "
                                    f"{st[DS_LENGTHS].shape[0]}, flags {st[DS_FLAGS].shape[0]}")
        rows = st[DS_DATA].shape[0]
        if st[DS_DATA].shape[1] != bs or st[DS_CRC].shape[0] != rows:
            raise CorruptImageError(f"{path}: dataset 'data' is {list(st[DS_DATA].shape)} and 'crc32c' "
                                    f"{list(st[DS_CRC].shape)}, expected [{rows}, {bs}] and [{rows}]")
        if rows != a["data_blocks"]:
            raise CorruptImageError(f"{path}: dataset 'data' has {rows} rows, attribute data_blocks says "
                                    f"{a['data_blocks']}")
        # each data extent owns at least one row, each zero extent a block (the last may be shorter)
        most = min(max(1, -(-vs // bs)), rows + a["zero_bytes"] // bs + 1)
        if n > most:
            raise CorruptImageError(f"{path}: {n} extents cannot fit {rows} data rows and {a['zero_bytes']} zero "
                                    f"bytes of a disk of {vs} bytes in {bs}-byte blocks")
        if a["data_bytes"] > rows * bs or a["zero_bytes"] > vs:
            raise CorruptImageError(f"{path}: attributes data_bytes {a['data_bytes']} and zero_bytes "
                                    f"{a['zero_bytes']} cannot fit {rows} rows of {bs} bytes and a disk of {vs}")
        data = st[DS_DATA]
        if data.layout == CHUNKED and data.chunks is not None and data.chunks[0] != min(chunk_rows_for(bs), rows):
            raise CorruptImageError(f"{path}: dataset 'data' is stored in chunks of {data.chunks[0]} rows, "
                                    f"expected {min(chunk_rows_for(bs), rows)} for {bs}-byte blocks")
        arrays: list[npt.NDArray[Any]] = []
        for name in (DS_OFFSETS, DS_LENGTHS, DS_FLAGS):
            arr = np.empty(n, dtype=DATASETS[name][0])
            at = st[name].offset
            if n:
                if at is None:          # (check_structure gives a dataset with bytes its offset)
                    raise CorruptImageError(f"{path}: dataset {name!r} has no storage")
                self._pread_exact(arr.view(np.uint8), at, f"reading dataset {name!r}")
            arrays.append(arr)
        self.offsets, self.lengths, self.flags = arrays
        self.rows = rows
        self.compression = data.filter
        # an h5py Dataset of chunked rows (None: contiguous rows, read at _data_off)
        self._data: Any = None if data.layout == CONTIGUOUS else _import_h5py().Dataset(data.dsid)
        self._data_off = data.offset if rows and data.layout == CONTIGUOUS else None
        crc_off = st[DS_CRC].offset
        if rows and (crc_off is None or (data.layout == CONTIGUOUS and self._data_off is None)):
            raise CorruptImageError(f"{path}: datasets 'data' or 'crc32c' have no storage")
        self._crc_off = 0 if crc_off is None else crc_off      # (no rows: never read)

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
                    bad = f"extent {i} of {len(off)} {what}"     # values unquoted: they failed
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
        return int(self.attrs["block_size"])

    @property
    def virtual_size(self) -> int:
        return int(self.attrs["virtual_size"])

    @property
    def since(self) -> str:
        return str(self.attrs["since"])

    @property
    def change_id(self) -> str:
        return str(self.attrs["change_id"])

    @property
    def image_uuid(self) -> str:
        return str(self.attrs["image_uuid"])

    @property
    def tracking_id(self) -> str:
        return str(self.attrs["tracking_id"])

    @property
    def full(self) -> bool:
        return self.since == ANY

    def block_of_row(self, row: int) -> int:
        i = int(np.searchsorted(self._data_rows, row, side="right")) - 1
        return int(self._data_blocks[i]) + row - int(self._data_rows[i])

    def summary(self) -> dict[str, Any]:
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
    def read_rows(self, row: int, n: int, out: npt.NDArray[np.uint8]) -> None:
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
            with _h5(self.path, f"reading block rows [{row}, {row + n})"), no_hdf5_plugins():
                self._data.read_direct(out, np.s_[row:row + n], np.s_[0:n])
        crcs = np.empty(n, dtype="<u4")
        self._pread_exact(crcs.view(np.uint8), self._crc_off + row * 4, f"checksums of rows [{row}, {row + n})")
        crc = _crc32c.crc32c
        for i in range(n):
            got = crc(readable_buffer(view[i]))
            if got != crcs[i]:
                r = row + i
                b = self.block_of_row(r)
                raise ChecksumError(
                    f"{self.path}: block row {r} (virtual block {b}, offset {b * bs}): CRC32C mismatch (the row "
                    f"or its checksum in 'crc32c' is damaged)")        # neither value quoted: both failed

    def _pread_exact(self, mv: npt.NDArray[np.uint8], offset: int, what: str) -> None:
        buf = memoryview(writable_buffer(mv)).cast("B")
        done = 0
        while done < len(buf):
            try:
                k = os.preadv(self._fd, [buf[done:done + PREAD_BYTES]], offset + done)
            except OSError as exc:
                raise CorruptImageError(f"{self.path}: {what}: {exc.strerror or exc}") from exc
            if k == 0:
                raise CorruptImageError(f"{self.path}: {what}: the file ends at {offset + done}: truncated")
            done += k

    def verify_rows(self, ranges: Iterable[tuple[int, int]] | None = None,
                    tick: Callable[[int], None] | None = None) -> None:
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

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- writing a delta
def check_dest(dest: PathArg) -> str:
    dest = os.fspath(dest)
    if os.path.lexists(dest):
        raise InvalidArgumentError(f"{dest} exists: a delta is never overwritten (choose a new name)")
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise InvalidArgumentError(f"{dest}: directory {directory} does not exist")
    return dest


PARTIAL_SUFFIX = ".partial"
_PARTIAL_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.partial$")


def remove_abandoned_partials(directory: str) -> list[str]:
    """Remove the partial deltas (``.NAME.<hex>.partial``) in directory
    whose writer is dead: a live DeltaWriter holds an flock on its partial
    until it is placed or removed, so a partial whose lock can be taken was
    left by a killed process.  Returns the paths removed."""
    return abandoned_partials(directory, remove=True)


def abandoned_partials(directory: str, remove: bool = False) -> list[str]:
    """The partial deltas in directory whose lock can be taken (their writer
    is dead), sorted; with remove, each is removed (remove_abandoned_partials).

    Without remove (a report: verify), empty partials are left out: a
    writer between its create and its lock (_open_locked) holds an empty
    file whose lock can be taken, and a report must not name a live
    writer's file.  A remover may take such a file: the writer then starts
    again under a new name."""
    found: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in sorted(names):
        if not _PARTIAL_RE.match(name):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat_is_regular(st.st_mode) or not (remove or st.st_size):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue                    # locked: its writer is alive
            if os.stat(path, follow_symlinks=False).st_ino == st.st_ino:
                if remove:
                    os.unlink(path)
                found.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return found


def parse_compression(compression: object) -> str | None:
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
    ENOSPC under libhdf5, vdisk_testkit/opfaultsim.py).  So libhdf5 never sees one:
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

    def readinto(self, buf: WriteableBuffer) -> int:
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

    def write(self, data: ReadableBuffer) -> int:
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

    def __init__(self, dest: str, attrs: dict[str, Any], offsets: npt.ArrayLike, lengths: npt.ArrayLike,
                 flags: npt.ArrayLike, compression: str | None):
        h5py = _import_h5py()
        self.dest = dest
        directory = os.path.dirname(os.path.abspath(dest))
        self.directory = directory
        self.tmp = ""
        self.bs = attrs["block_size"]
        self.rows = attrs["data_blocks"]
        self._f: Any = None             # the h5py File being written
        self._fd = -1
        self._lock_fd = -1
        self._target: _H5Target | None = None
        attrs = dict(attrs)
        attrs["checksum"] = attrs_checksum(attrs, offsets, lengths, flags)
        self.attrs = attrs
        try:
            self._create(h5py, attrs, offsets, lengths, flags, compression)
        except BaseException:
            self.abort()
            raise

    @contextlib.contextmanager
    def _h5_writing(self) -> Iterator[None]:
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

    def _create(self, h5py: Any, attrs: dict[str, Any], offsets: npt.ArrayLike, lengths: npt.ArrayLike,
                flags: npt.ArrayLike, compression: str | None) -> None:
        bs, rows = self.bs, self.rows
        self._open_locked()
        self._target = _H5Target(self._fd)
        with self._h5_writing():
            self._f = f = h5py.File(self._target, "w", userblock_size=PREAMBLE_SIZE, libver=HDF5_LIBVER)
            f.create_dataset(DS_OFFSETS, data=np.asarray(offsets, dtype="<u8"))
            f.create_dataset(DS_LENGTHS, data=np.asarray(lengths, dtype="<u8"))
            f.create_dataset(DS_FLAGS, data=np.asarray(flags, dtype="u1"))
            def early() -> Any:           # contiguous storage allocated now: its offset exists before any write
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
                f.attrs[name] = value if isinstance(kind, str) else np.array(value, dtype=kind)[()]
            self._raw = self._data.chunks is None
            self._data_off = self._data.id.get_offset()
            self._crc_off = self._crc.id.get_offset()
            if self._raw:
                self._close_h5()

    def _open_locked(self) -> None:
        """Create the partial file and hold an flock on it until it is placed
        or removed: a later backup removes only partials whose lock it can
        take (their writer is dead).  Such a cleaner may remove the file
        between our create and our lock: then the name no longer names our
        file, and we start again under a new name."""
        while True:
            self.tmp = os.path.join(self.directory,
                                    f".{os.path.basename(self.dest)}.{_uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
            with _writing(self.tmp):
                self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                                   0o644)
                self._lock_fd = os.dup(self._fd)    # its own descriptor: commit closes _fd before placing
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    ours = os.stat(self.tmp).st_ino == os.fstat(self._fd).st_ino
                except FileNotFoundError:
                    ours = False
            if ours:
                return
            os.close(self._fd)
            os.close(self._lock_fd)
            self._fd = self._lock_fd = -1

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _close_h5(self) -> None:
        self._data = self._crc = None
        f, self._f = self._f, None
        f.close()

    def write_rows(self, row: int, buf: npt.NDArray[np.uint8]) -> None:
        """buf: n x block_size rows for [row, row + n); their CRCs are computed here."""
        n = len(buf)
        crc = _crc32c.crc32c
        crcs = np.fromiter((crc(readable_buffer(r)) for r in buf), dtype="<u4", count=n)
        if self._raw:
            with _writing(self.tmp):
                pwrite_all(self._fd, buf.reshape(-1), self._data_off + row * self.bs)
                start_writeback(self._fd, self._data_off + row * self.bs, n * self.bs)
                pwrite_all(self._fd, crcs.view(np.uint8), self._crc_off + row * 4)
        else:
            with self._h5_writing():
                self._data[row:row + n] = buf
                self._crc[row:row + n] = crcs

    def commit(self, before_place: Callable[[], None] | None = None) -> int:
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
                with _import_h5py().File(self.tmp, "r", locking=False) as f:     # we hold the file's flock
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
        self._unlock()
        return os.path.getsize(self.dest)

    def abort(self) -> None:
        if self._f is not None:
            if self._target is not None:      # (always, once _f is)
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
        if self.tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
        self._unlock()
