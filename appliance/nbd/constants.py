"""NBD protocol numbers, named as in doc/proto.md of NetworkBlockDevice/nbd.

Plain module-level ints so they can be used directly in struct packing and
compared against wire values; the ``*_NAMES`` maps at the bottom turn a wire
value back into its spec name for log and error messages.
"""

from __future__ import annotations

# --- Magics -----------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # ASCII "NBDMAGIC", a.k.a. INIT_PASSWD
INIT_PASSWD = NBDMAGIC
IHAVEOPT = 0x49484156454F5054  # ASCII "IHAVEOPT": newstyle greeting and option header
NBD_CLISERV_MAGIC = 0x00420281861253  # oldstyle only; never sent by this server
NBD_REP_MAGIC = 0x3E889045565A9  # option reply header (fixed newstyle)
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- Handshake flags (16 bits, server -> client) ----------------------------

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1

# --- Client flags (32 bits, client -> server) -------------------------------

NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# --- Transmission flags (16 bits) -------------------------------------------

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
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12  # extended headers only; never set here

# --- Option types -------------------------------------------------------------

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4  # withdrawn
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11  # not supported by this server (ERR_UNSUP)

# --- Option reply types -----------------------------------------------------

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4

NBD_REP_FLAG_ERROR = 1 << 31  # every error reply type has bit 31 set
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR + 10

# --- Info types (NBD_REP_INFO payload) --------------------------------------

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# --- Command types ----------------------------------------------------------

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8  # experimental RESIZE extension

# --- Command flags ----------------------------------------------------------

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# --- Structured replies -----------------------------------------------------

NBD_REPLY_FLAG_DONE = 1 << 0

NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_FLAG_ERROR = 1 << 15  # every error chunk type has bit 15 set
NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_FLAG_ERROR + 1
NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_FLAG_ERROR + 2

# --- Error values (the wire "error" field, not host errno) ------------------

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- base:allocation metadata context --------------------------------------

NBD_META_BASE_ALLOCATION = "base:allocation"
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
# qemu's: how deep in a stack of layers each range lives (0 unallocated, 1 the top layer, ...)
NBD_META_ALLOCATION_DEPTH = "qemu:allocation-depth"

# --- Limits from the spec ---------------------------------------------------

NBD_MAX_STRING = 4096  # strings (names, messages) MUST be no longer than this
NBD_HANDSHAKE_ZEROES = 124  # padding after an NBD_OPT_EXPORT_NAME reply


def _names(prefix: str, exclude: tuple[str, ...] = ()) -> dict[int, str]:
    return {
        value: name
        for name, value in globals().items()
        if name.startswith(prefix) and isinstance(value, int) and not name.startswith(exclude)
    }


# value -> spec name, for messages ("NBD_OPT_GO", "NBD_REP_ERR_UNKNOWN", ...).
OPT_NAMES = _names("NBD_OPT_")
REP_NAMES = _names("NBD_REP_", exclude=("NBD_REP_MAGIC", "NBD_REP_FLAG_"))
INFO_NAMES = _names("NBD_INFO_")
CMD_NAMES = _names("NBD_CMD_", exclude=("NBD_CMD_FLAG_",))
REPLY_TYPE_NAMES = _names("NBD_REPLY_TYPE_", exclude=("NBD_REPLY_TYPE_FLAG_",))
ERRNO_NAMES = _names("NBD_E")
