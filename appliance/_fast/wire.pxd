# The NBD transmission phase's wire format: magics, commands, flags, error numbers and
# big-endian field helpers, shared by the loop (transmit.pyx) and its replies (replies.pyx).
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.uio cimport iovec

cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)
    uint64_t be64toh(uint64_t)
    uint16_t htobe16(uint16_t)
    uint32_t htobe32(uint32_t)
    uint64_t htobe64(uint64_t)

cdef enum:
    REQUEST_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    STRUCTURED_REPLY_MAGIC = 0x668e33ef
    HEADER = 28

    CMD_READ = 0
    CMD_WRITE = 1
    CMD_DISC = 2
    CMD_FLUSH = 3
    CMD_TRIM = 4
    CMD_CACHE = 5
    CMD_WRITE_ZEROES = 6
    CMD_BLOCK_STATUS = 7

    F_FUA = 1
    F_NO_HOLE = 2
    F_DF = 4
    F_REQ_ONE = 8
    F_FAST_ZERO = 16

    REPLY_FLAG_DONE = 1
    REPLY_TYPE_OFFSET_DATA = 1
    REPLY_TYPE_ERROR = 32769

    # NBD's error numbers
    NBD_EPERM = 1
    NBD_EIO = 5
    NBD_ENOMEM = 12
    NBD_EINVAL = 22
    NBD_ENOSPC = 28
    NBD_EOVERFLOW = 75
    NBD_ENOTSUP = 95
    NBD_ESHUTDOWN = 108

cpdef int nbd_errno(int e) noexcept nogil


cdef inline void put16(char *p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)

cdef inline void put32(char *p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)

cdef inline void put64(char *p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)


cdef inline int consumed(iovec **iovp, int n, size_t sent) noexcept nogil:
    """Drop `sent` bytes off the front of an iovec array after a short send; returns the
    entries left (the first one trimmed)."""
    cdef iovec *iov = iovp[0]
    while n > 0 and sent >= iov[0].iov_len:
        sent -= iov[0].iov_len
        iov += 1
        n -= 1
    if n > 0:
        iov[0].iov_base = <char *>iov[0].iov_base + sent
        iov[0].iov_len -= sent
    iovp[0] = iov
    return n
