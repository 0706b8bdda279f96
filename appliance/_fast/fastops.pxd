from libc.stdint cimport uint32_t, uint64_t

# The fast path's descriptor: what a target offers the NBD loop so that requests inside its
# segment are served without the GIL. The gate keeps one per fast segment (gate.pxd); a
# target's fast_map() returns a FastOps that carries it (fastops.pyx has the plain ones).

# One piece of a request the loop sends to the I/O engine: `len` bytes at `off` on `fd`,
# to or from `buf` (inside the request's page-aligned buffer).
cdef struct FdPiece:
    int fd
    uint64_t off
    uint64_t len
    char *buf
    int buffered        # fd is not O_DIRECT: a write only copies into the page cache

cdef enum:
    FAST_DECLINE = -1   # not here: the slow path (map()) serves the request

# read/write of [off, off+n) of the segment (off relative to the segment's start) with the
# data at buf. Return FAST_DECLINE, 0 (served here and now), or the number of pieces
# (at most `room`) written to `out` for the engine. FUA applies to the pieces too (the loop
# follows each written piece with fdatasync). A cow-like target returns several pieces.
# flush is called with off 0, buf NULL, n 0; its pieces name the fds to fdatasync.
ctypedef int (*fast_fn)(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua,
                        FdPiece *out, int room) noexcept nogil

# A write whose pieces `write` returned is done on all of them (err: the first error, a host
# errno, or 0), before it is answered. For descriptors that are `alone` (their state counts the
# writes in flight: a region map that must know when none is). A write returning several
# pieces of one buffer on several fds is a fan-out (copies of the data).
ctypedef void (*fast_done_fn)(FastDesc *d, uint64_t off, uint64_t n, int err) noexcept nogil

# A READ whose pieces `read` returned (at least one) is done (err as for write_done), for
# descriptors that are `alone`: `fd` is its first piece's (a mirror counts the reads in flight
# on each leg, to balance them).
ctypedef void (*fast_read_done_fn)(FastDesc *d, uint64_t off, uint64_t n, int fd, int err) noexcept nogil

cdef struct FastDesc:
    fast_fn read
    fast_fn write
    fast_fn flush       # NULL: FLUSH takes the slow path; else 0 or fd pieces to fdatasync
    void *state         # the target's own (kept alive by the FastOps' owner)
    int fd              # for descriptors that map onto one fd
    uint64_t fd_offset
    uint32_t align      # every piece's offset, length and place in the buffer (O_DIRECT)
    int alone           # may act and then decline: a request must not span another segment
    int buffered        # fd is not O_DIRECT
    fast_done_fn write_done  # NULL: nothing to tell
    int errors_slow     # a piece's error is not the reply: the request is served again by the
                        # slow path (map()), which decides what the error means (a fan-out
                        # may succeed on the other copies)
    fast_read_done_fn read_done  # NULL: nothing to tell

cdef class FastOps:
    cdef FastDesc desc
    cdef object owner   # what `state` points into
