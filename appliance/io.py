"""The request that travels down a target stack, and the classes of its errors.

An `IO` is device-mapper's bio and request in one: an operation on a byte
range of one device, with a buffer and a completion hook. Whoever finishes
the I/O calls `complete(error)`; that runs `endio`, which the owner set.
Inside a mapped device the core hands targets clones of a request's pieces
(see `device.py`): a fresh clone for every map attempt.

Offsets are in bytes. NBD clients may address single bytes; targets with a
coarser unit (chunks, regions) deal with partial units themselves.
"""

from __future__ import annotations

import errno

# operations
READ = 0
WRITE = 1
FLUSH = 3
TRIM = 4
CACHE = 5
WRITE_ZEROES = 6
BLOCK_STATUS = 7  # buf receives [(length, flags)] extents; no target map() sees it

OP_NAMES = {READ: "read", WRITE: "write", FLUSH: "flush", TRIM: "trim", CACHE: "cache",
            WRITE_ZEROES: "write_zeroes", BLOCK_STATUS: "block_status"}
WRITE_OPS = (WRITE, WRITE_ZEROES, TRIM)

# flags, numbered as NBD's command flags so the server passes them through
FUA = 1  # forced unit access: durable before completion
NO_HOLE = 2  # write_zeroes must allocate
FAST_ZERO = 16  # write_zeroes must fail with ENOTSUP rather than be slow

# what a target's map() returns
REMAPPED = 1  # the clone goes to clone.dev at clone.offset (prep_map chose the device, map translated)
SUBMITTED = 0  # the target owns the clone now and will complete it
KILL = -1  # fail it (clone.error, or EIO)
REQUEUE = -2  # park this piece; it is mapped again (a fresh clone) on resume or when the device is kicked

# what a target's end_io() returns (REQUEUE too)
DONE = 0  # pass the completion up
INCOMPLETE = 1  # the target took the clone back and called device.remap() or device.requeue() on it


# Error classes, after Linux's blk_path_error(): who should act on a failure.
PATH = "path"  # the transport or the device below failed; another path or leg may succeed
TARGET = "target"  # the storage answered no; retrying elsewhere gives the same answer
RESOURCE = "resource"  # out of something for now; the same request may succeed later

ERROR_CLASSES = {
    errno.ECONNRESET: PATH,
    errno.EPIPE: PATH,
    errno.ETIMEDOUT: PATH,
    errno.ENOTCONN: PATH,
    errno.ENXIO: PATH,
    errno.ESHUTDOWN: PATH,  # NBD's "the server is shutting down": that server goes, the storage stays
    errno.ENOSPC: TARGET,
    errno.EDQUOT: TARGET,
    errno.EROFS: TARGET,
    errno.EINVAL: TARGET,
    errno.EPERM: TARGET,
    errno.EIO: TARGET,  # the storage's own medium error; a lost disk and an NBD server's EIO reply say PATH
    errno.EAGAIN: RESOURCE,
    errno.ENOMEM: RESOURCE,
}


class Error(int):
    """An errno that knows its class. It is an int, so replies and comparisons take it as one."""

    def __new__(cls, code, kind=None):
        self = super().__new__(cls, code)
        self.kind = kind or ERROR_CLASSES.get(code, TARGET)
        return self

    def __repr__(self):
        return f"{error_name(self)}({self.kind})"

    __str__ = int.__repr__  # the number, as a plain errno prints (int's own str is repr)


def error(code, kind=None):
    """`code` as a classed Error (0 stays 0); a plain errno gets its class from ERROR_CLASSES."""
    if not code:
        return 0
    if kind is None and isinstance(code, Error):
        return code
    return Error(code, kind)


def path_error(code=errno.EIO):
    """The device below is gone or unreachable (a lost disk, a dropped connection)."""
    return Error(code, PATH)


def error_class(code):
    """The class of an error (an Error or a plain errno); None for success."""
    if not code:
        return None
    return getattr(code, "kind", None) or ERROR_CLASSES.get(code, TARGET)


class IO:
    __slots__ = ("op", "offset", "length", "buf", "flags", "error", "endio", "dev", "private", "target", "parent")

    def __init__(self, op, offset, length, buf=None, flags=0, endio=None):
        self.op = op
        self.offset = offset
        self.length = length
        # READ: a writable buffer of `length` bytes to fill. WRITE: the data.
        self.buf = buf
        self.flags = flags
        self.error = 0
        self.endio = endio
        self.dev = None  # where a REMAPPED clone goes
        self.private = None  # the target's per-I/O data; it survives a remap or requeue of the piece
        self.target = None
        self.parent = None

    def complete(self, error=0):
        if error and not self.error:
            self.error = error if isinstance(error, Error) else Error(error)
        endio = self.endio
        if endio is not None:
            endio(self)

    @property
    def is_write(self):
        return self.op in WRITE_OPS

    @property
    def error_class(self):
        return error_class(self.error)

    def __repr__(self):
        return f"<IO {OP_NAMES.get(self.op, self.op)} {self.offset}+{self.length} err={self.error}>"


def error_name(code: int) -> str:
    return errno.errorcode.get(code, str(int(code)))
