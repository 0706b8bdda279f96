"""The request that travels down a target stack.

An `IO` is device-mapper's bio and request in one: an operation on a byte
range of one device, with a buffer and a completion hook. Whoever finishes
the I/O calls `complete(error)`; that runs `endio`, which the owner set. A
target that needs the I/O back after the device below is done with it (to
retry on another path, to wait for every mirror leg, to copy up into a
layer) gets it through `end_io` in the core, see `device.py`.

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

OP_NAMES = {READ: "read", WRITE: "write", FLUSH: "flush", TRIM: "trim", CACHE: "cache", WRITE_ZEROES: "write_zeroes"}

# flags, numbered as NBD's command flags so the server passes them through
FUA = 1  # forced unit access: durable before completion
NO_HOLE = 2  # write_zeroes must allocate
FAST_ZERO = 16  # write_zeroes must fail with ENOTSUP rather than be slow

# what a target's map() returns
REMAPPED = 1  # the target set io.dev and io.offset; the core submits it there
SUBMITTED = 0  # the target owns the I/O now and will complete it
KILL = -1  # fail it (io.error, or EIO)
REQUEUE = -2  # hold it until the device is resumed, then map again

# what a target's end_io() returns
DONE = 0  # pass the completion up
INCOMPLETE = 1  # the target took the I/O over again (a retry); it will complete later


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
        self.dev = None  # where a REMAPPED io goes
        self.private = None  # the target's, for end_io
        self.target = None
        self.parent = None

    def clone(self, offset, length, buf, endio=None):
        c = IO(self.op, offset, length, buf, self.flags, endio)
        c.parent = self
        return c

    def complete(self, error=0):
        if error and not self.error:
            self.error = error
        endio = self.endio
        if endio is not None:
            endio(self)

    @property
    def is_write(self):
        return self.op in (WRITE, WRITE_ZEROES, TRIM)

    def __repr__(self):
        return f"<IO {OP_NAMES.get(self.op, self.op)} {self.offset}+{self.length} err={self.error}>"


def error_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))
