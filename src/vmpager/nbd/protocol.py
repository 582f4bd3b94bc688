"""NBD wire format: magic numbers, flags, option/command/reply codes and struct layouts.

Everything here is a constant taken from the NBD protocol specification
(``doc/proto.md`` of the reference implementation). All integers travel in
network byte order; the ``struct.Struct`` objects below are the exact layouts
of the fixed-size messages, so the server never builds them field by field.
Only the fixed-newstyle handshake, simple and structured replies are
described; oldstyle negotiation, TLS and the experimental extended headers
are not spoken.
"""

from __future__ import annotations

import errno
import struct
from typing import Final

# --- magic numbers --------------------------------------------------------------------------

#: Sent first by the server in every handshake (ASCII ``NBDMAGIC``).
NBDMAGIC: Final = 0x4E42444D41474943
#: Newstyle magic (ASCII ``IHAVEOPT``): after NBDMAGIC, and before every client option.
IHAVEOPT: Final = 0x49484156454F5054
#: Magic of every fixed-newstyle option reply.
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
#: Magic of a transmission request.
REQUEST_MAGIC: Final = 0x25609513
#: Magic of a simple reply.
SIMPLE_REPLY_MAGIC: Final = 0x67446698
#: Magic of a structured reply chunk.
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- handshake flags (16 bits, server) and client flags (32 bits) ----------------------------

NBD_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_NO_ZEROES: Final = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_C_NO_ZEROES: Final = 1 << 1

# --- transmission flags (16 bits) -----------------------------------------------------------

NBD_FLAG_HAS_FLAGS: Final = 1 << 0
NBD_FLAG_READ_ONLY: Final = 1 << 1
NBD_FLAG_SEND_FLUSH: Final = 1 << 2
NBD_FLAG_SEND_FUA: Final = 1 << 3
NBD_FLAG_ROTATIONAL: Final = 1 << 4
NBD_FLAG_SEND_TRIM: Final = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
NBD_FLAG_SEND_DF: Final = 1 << 7
NBD_FLAG_CAN_MULTI_CONN: Final = 1 << 8
NBD_FLAG_SEND_RESIZE: Final = 1 << 9
NBD_FLAG_SEND_CACHE: Final = 1 << 10
NBD_FLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- options --------------------------------------------------------------------------------

NBD_OPT_EXPORT_NAME: Final = 1
NBD_OPT_ABORT: Final = 2
NBD_OPT_LIST: Final = 3
NBD_OPT_PEEK_EXPORT: Final = 4
NBD_OPT_STARTTLS: Final = 5
NBD_OPT_INFO: Final = 6
NBD_OPT_GO: Final = 7
NBD_OPT_STRUCTURED_REPLY: Final = 8
NBD_OPT_LIST_META_CONTEXT: Final = 9
NBD_OPT_SET_META_CONTEXT: Final = 10
NBD_OPT_EXTENDED_HEADERS: Final = 11

OPTION_NAMES: Final[dict[int, str]] = {
    NBD_OPT_EXPORT_NAME: "EXPORT_NAME",
    NBD_OPT_ABORT: "ABORT",
    NBD_OPT_LIST: "LIST",
    NBD_OPT_PEEK_EXPORT: "PEEK_EXPORT",
    NBD_OPT_STARTTLS: "STARTTLS",
    NBD_OPT_INFO: "INFO",
    NBD_OPT_GO: "GO",
    NBD_OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# --- option reply types ---------------------------------------------------------------------

NBD_REP_ACK: Final = 1
NBD_REP_SERVER: Final = 2
NBD_REP_INFO: Final = 3
NBD_REP_META_CONTEXT: Final = 4
_REP_ERR: Final = 1 << 31
NBD_REP_ERR_UNSUP: Final = _REP_ERR + 1
NBD_REP_ERR_POLICY: Final = _REP_ERR + 2
NBD_REP_ERR_INVALID: Final = _REP_ERR + 3
NBD_REP_ERR_PLATFORM: Final = _REP_ERR + 4
NBD_REP_ERR_TLS_REQD: Final = _REP_ERR + 5
NBD_REP_ERR_UNKNOWN: Final = _REP_ERR + 6
NBD_REP_ERR_SHUTDOWN: Final = _REP_ERR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD: Final = _REP_ERR + 8
NBD_REP_ERR_TOO_BIG: Final = _REP_ERR + 9

# --- NBD_REP_INFO information types ---------------------------------------------------------

NBD_INFO_EXPORT: Final = 0
NBD_INFO_NAME: Final = 1
NBD_INFO_DESCRIPTION: Final = 2
NBD_INFO_BLOCK_SIZE: Final = 3

# --- transmission commands and command flags ------------------------------------------------

NBD_CMD_READ: Final = 0
NBD_CMD_WRITE: Final = 1
NBD_CMD_DISC: Final = 2
NBD_CMD_FLUSH: Final = 3
NBD_CMD_TRIM: Final = 4
NBD_CMD_CACHE: Final = 5
NBD_CMD_WRITE_ZEROES: Final = 6
NBD_CMD_BLOCK_STATUS: Final = 7

COMMAND_NAMES: Final[dict[int, str]] = {
    NBD_CMD_READ: "read",
    NBD_CMD_WRITE: "write",
    NBD_CMD_DISC: "disc",
    NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim",
    NBD_CMD_CACHE: "cache",
    NBD_CMD_WRITE_ZEROES: "write_zeroes",
    NBD_CMD_BLOCK_STATUS: "block_status",
}

NBD_CMD_FLAG_FUA: Final = 1 << 0
NBD_CMD_FLAG_NO_HOLE: Final = 1 << 1
NBD_CMD_FLAG_DF: Final = 1 << 2
NBD_CMD_FLAG_REQ_ONE: Final = 1 << 3
NBD_CMD_FLAG_FAST_ZERO: Final = 1 << 4

# --- structured replies ---------------------------------------------------------------------

NBD_REPLY_FLAG_DONE: Final = 1 << 0

NBD_REPLY_TYPE_NONE: Final = 0
NBD_REPLY_TYPE_OFFSET_DATA: Final = 1
NBD_REPLY_TYPE_OFFSET_HOLE: Final = 2
NBD_REPLY_TYPE_BLOCK_STATUS: Final = 5
NBD_REPLY_TYPE_ERROR: Final = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) + 2

# --- base:allocation ------------------------------------------------------------------------

#: The one metadata context defined by the specification.
BASE_ALLOCATION: Final = "base:allocation"
NBD_STATE_HOLE: Final = 1 << 0
NBD_STATE_ZERO: Final = 1 << 1

# --- error values carried in replies --------------------------------------------------------

NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

_ERRNO_TO_NBD: Final[dict[int, int]] = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    # The specification asks for quota and file-size limits to look like a full device.
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error_from_errno(err: int | None) -> int:
    """Map a host ``errno`` to one of the eight error values NBD allows (EIO if unknown)."""
    if err is None:
        return NBD_EIO
    return _ERRNO_TO_NBD.get(err, NBD_EIO)


# --- fixed-size layouts ---------------------------------------------------------------------

#: Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags (18 bytes).
HANDSHAKE: Final = struct.Struct(">QQH")
#: Client flags after the greeting (4 bytes).
CLIENT_FLAGS: Final = struct.Struct(">I")
#: Option request header: IHAVEOPT, option, data length (16 bytes).
OPTION_HEADER: Final = struct.Struct(">QII")
#: Option reply header: magic, option, reply type, data length (20 bytes).
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
#: Reply to NBD_OPT_EXPORT_NAME: export size, transmission flags (10 bytes, then zeroes).
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
#: NBD_INFO_EXPORT payload: type, export size, transmission flags (12 bytes).
INFO_EXPORT: Final = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE payload: type, minimum, preferred, maximum payload (14 bytes).
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")
#: Transmission request: magic, command flags, type, cookie, offset, length (28 bytes).
REQUEST: Final = struct.Struct(">IHHQQI")
#: Simple reply: magic, error, cookie (16 bytes).
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
#: Structured reply chunk header: magic, flags, type, cookie, payload length (20 bytes).
CHUNK_HEADER: Final = struct.Struct(">IHHQI")
#: Chunk header followed by the 64-bit offset of an OFFSET_DATA chunk (28 bytes).
CHUNK_OFFSET_DATA_HEADER: Final = struct.Struct(">IHHQIQ")
#: A whole OFFSET_HOLE chunk: header, offset, hole size (32 bytes).
CHUNK_OFFSET_HOLE: Final = struct.Struct(">IHHQIQI")
#: One block-status descriptor: extent length, status flags (8 bytes).
BLOCK_STATUS_DESCRIPTOR: Final = struct.Struct(">II")

#: The largest value a 32-bit length field can carry.
MAX_U32: Final = 0xFFFFFFFF
