"""The NBD wire protocol, declared once: every constant and fixed structure
the server and the test client use, named as in doc/proto.md of the
NetworkBlockDevice/nbd repository (and qemu's docs/interop/nbd.rst for the
``qemu:`` meta contexts).

All integers on the wire are big-endian.  Only the fixed newstyle
handshake and compact (non-extended) headers are spoken; the option of
extended headers is answered ``NBD_REP_ERR_UNSUP``.
"""
from __future__ import annotations

import errno as _errno
import struct

# ---------------------------------------------------------------------------- handshake
NBDMAGIC = 0x4E42444D41474943              # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054              # "IHAVEOPT"
NBD_OPT_REPLY_MAGIC = 0x0003E889045565A9

# handshake flags (server, 16 bits)
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
# client flags (32 bits)
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# transmission flags (16 bits)
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

# options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# option reply types
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10

# NBD_REP_INFO types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# ---------------------------------------------------------------------------- transmission
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# commands
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

COMMAND_NAMES = {NBD_CMD_READ: "READ", NBD_CMD_WRITE: "WRITE", NBD_CMD_DISC: "DISC", NBD_CMD_FLUSH: "FLUSH",
                 NBD_CMD_TRIM: "TRIM", NBD_CMD_CACHE: "CACHE", NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
                 NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS", NBD_CMD_RESIZE: "RESIZE"}

# command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5

# structured reply chunk flags and types
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# error values (the spec fixes these numbers; they are not the host's errno)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

ERRNO_TO_NBD = {_errno.EPERM: NBD_EPERM, _errno.EROFS: NBD_EPERM, _errno.EACCES: NBD_EPERM,
                _errno.EIO: NBD_EIO, _errno.ENOMEM: NBD_ENOMEM, _errno.EINVAL: NBD_EINVAL,
                _errno.ENOSPC: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC,
                _errno.EOVERFLOW: NBD_EOVERFLOW, _errno.ENOTSUP: NBD_ENOTSUP, _errno.ESHUTDOWN: NBD_ESHUTDOWN}

# ---------------------------------------------------------------------------- meta contexts
BASE_ALLOCATION = "base:allocation"
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
QEMU_NAMESPACE = "qemu:"
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"
NBD_STATE_DIRTY = 1 << 0

# ---------------------------------------------------------------------------- fixed structures
SERVER_GREETING = struct.Struct(">QQH")        # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")          # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")          # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")       # size, transmission flags (then 124 zeros unless NO_ZEROES)
INFO_EXPORT = struct.Struct(">HQH")            # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")       # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")             # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")           # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")         # magic, flags, type, cookie, length
OFFSET_HOLE = struct.Struct(">QI")             # offset, hole length
ERROR_CHUNK = struct.Struct(">IH")             # error, message length (then the message)
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT = struct.Struct(">II")                  # length, status flags

EXPORT_NAME_PADDING = 124

# ---------------------------------------------------------------------------- limits of this server
MAX_STRING = 4096                 # an export or context name (the spec's limit)
MAX_OPTION_LENGTH = 64 * 1024     # an option's data; more is a hostile client
MAX_REQUEST = 32 * 1024 * 1024    # NBD_INFO_BLOCK_SIZE maximum: the largest READ/WRITE payload
PREFERRED_BLOCK = 64 * 1024
MAX_EXTENTS = 65536               # block status descriptors per context and reply
MAX_OPTIONS = 4096                # options per handshake before the client is cut off
