# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Fast-path descriptors for the plain cases: a range of an open fd, and zeros.

See fastops.pxd for the contract. A target with state of its own (ramback's chunk
states) implements its functions next to that state and fills a FastOps the same way.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memset

import fcntl
import os


cdef class FastOps:
    """A fast-path descriptor, handed from a target's fast_map() to the gate."""

    @property
    def align(self):
        return self.desc.align


cdef int fd_io(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out, int room) noexcept nogil:
    if room < 1:
        return FAST_DECLINE
    out[0].fd = d.fd
    out[0].off = d.fd_offset + off
    out[0].len = n
    out[0].buf = buf
    out[0].buffered = d.buffered
    return 1


cdef int zero_read(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out, int room) noexcept nogil:
    memset(buf, 0, n)
    return 0


cdef int discard(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out, int room) noexcept nogil:
    return 0


def fd_range(int fd, uint64_t offset, uint32_t align=1):
    """Reads and writes go to `fd` at `offset` + the offset in the segment (dm-linear)."""
    if align < 1 or (align & (align - 1)):
        raise ValueError(f"alignment {align} is not a power of two")
    cdef FastOps ops = FastOps.__new__(FastOps)
    ops.desc.read = fd_io
    ops.desc.write = fd_io
    ops.desc.flush = fd_io
    ops.desc.fd = fd
    ops.desc.fd_offset = offset
    ops.desc.align = align
    ops.desc.buffered = not (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    return ops


def zeros():
    """Reads return zeros, writes are discarded (dm-zero)."""
    cdef FastOps ops = FastOps.__new__(FastOps)
    ops.desc.read = zero_read
    ops.desc.write = discard
    ops.desc.flush = discard
    ops.desc.fd = -1
    ops.desc.align = 1
    return ops
