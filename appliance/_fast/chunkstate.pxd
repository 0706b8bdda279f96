from libc.stdint cimport uint8_t, uint32_t, int64_t, uint64_t

# Chunk states: one byte per chunk, stored in the ramback store next to the
# data so they survive the daemon (see appliance/targets/ramback/store.py).
#   0 EMPTY     not loaded from backing yet: the RAM copy means nothing
#   1 CLEAN     RAM == backing
#   2 DIRTY     RAM is newer than backing
#   3 FLUSHING  being written back; completion makes it CLEAN unless a write
#               re-dirtied it meanwhile. A restart treats it as DIRTY.
# Only EMPTY -> anything is one-way: a loaded chunk never becomes EMPTY again.
cdef enum:
    CS_EMPTY = 0
    CS_CLEAN = 1
    CS_DIRTY = 2
    CS_FLUSHING = 3

cdef struct RbFast:
    char *data            # the store's data area, chunk 0 first
    uint8_t *state        # the store's state bytes
    uint64_t length       # bytes of the segment
    int64_t nchunks
    uint32_t shift        # log2(chunk size)
    int64_t count[4]      # chunks in each state (atomic)
    uint32_t *groups      # 4 counts per group of 4096 chunks, one per state (atomic)
    int64_t ngroups
    int64_t limit_chunks  # the fast write path declines at DIRTY + FLUSHING >= this
    int write_ok          # fast writes allowed: writeback, not refused
    int fua_ok            # FUA writes allowed on the fast path (sync=ram)
    int64_t writers       # fast writes in progress (a mode change waits for 0)
    int wake_fd           # eventfd written when DIRTY goes from 0 to 1 (-1: none)
    uint64_t fast_reads
    uint64_t fast_writes

cdef int rb_read(RbFast *f, uint64_t off, char *dst, uint64_t n) noexcept nogil
cdef int rb_write(RbFast *f, uint64_t off, const char *src, uint64_t n, int fua) noexcept nogil

cdef class Mapping:
    cdef char *addr
    cdef readonly uint64_t size
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

cdef class ChunkState:
    cdef RbFast f
    cdef object mapping
    cdef _check(self, int64_t c0, int64_t c1)
