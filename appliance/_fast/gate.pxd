from libc.stdint cimport uint64_t
from appliance._fast.sync cimport pthread_mutex_t, pthread_cond_t
from appliance._fast.fastops cimport FastDesc

cdef struct FastSeg:
    uint64_t start      # bytes, in the mapped device
    uint64_t end
    int fast            # 0: the slow path serves this segment
    FastDesc desc       # the target's descriptor (fastops.pxd)

cdef class Gate:
    cdef pthread_mutex_t lock
    cdef pthread_cond_t idle
    cdef int suspended
    cdef long inflight
    cdef FastSeg *segs
    cdef int nsegs
    cdef list deferred
    cdef list keep      # the FastOps the fast map was built from (their state stays alive)
    cdef readonly unsigned long long fast_ios

    cdef int fast_enter(self, uint64_t offset, uint64_t length) noexcept nogil
    cdef void exit(self) noexcept nogil
