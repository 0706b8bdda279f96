from libc.stdint cimport uint32_t, uint64_t
from appliance._fast.sync cimport pthread_mutex_t, pthread_cond_t
from appliance._fast.chunkstate cimport RbFast

# segment kinds, as in appliance/targets/__init__.py
cdef enum:
    FAST_NONE = 0
    FAST_FD = 1
    FAST_ZERO = 2
    FAST_RAMBACK = 3  # reads and writeback writes served from a ramback store (chunkstate.pyx)

cdef struct FastSeg:
    uint64_t start      # bytes, in the mapped device
    uint64_t end
    int kind
    int fd
    uint64_t fd_offset  # byte on fd that `start` maps to
    uint32_t align      # every request must be aligned to this (O_DIRECT)
    RbFast *ram         # FAST_RAMBACK: the store's states and data

cdef class Gate:
    cdef pthread_mutex_t lock
    cdef pthread_cond_t idle
    cdef int suspended
    cdef long inflight
    cdef FastSeg *segs
    cdef int nsegs
    cdef list deferred
    cdef list keep      # objects the fast map points into (ramback ChunkStates)
    cdef readonly unsigned long long fast_ios

    cdef int fast_enter(self, uint64_t offset, uint64_t length) noexcept nogil
    cdef void exit(self) noexcept nogil
