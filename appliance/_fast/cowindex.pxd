# The cow grain maps (cowindex.pyx): what a C fast path cimports to look owners up without the GIL.
#
# A RunMap holds sorted, disjoint, coalesced runs [start, end) of grains with a value (none: 0)
# in leaves of up to LEAF runs. map_lookup splits a grain range into pieces of one value; the
# caller holds the map's lock (GrainMap.lock) around it. The stack's OwnerIndex has value
# owner << 1 | zero (0: the base); a layer's LayerBits 1 (data) or 3 (reads as zeros).

from libc.stdint cimport uint8_t, uint16_t, uint64_t, int64_t
from appliance._fast.sync cimport pthread_mutex_t

cdef enum:
    LEAF = 64

cdef struct Leaf:
    int n
    uint16_t val[LEAF]
    uint64_t start[LEAF]
    uint64_t end[LEAF]

cdef struct RunMap:
    Leaf **leaf
    uint64_t *first         # first[i] == leaf[i].start[0]: the search over leaves stays in one array
    Py_ssize_t nleaf
    Py_ssize_t cap
    Py_ssize_t nruns

cdef int map_lookup(RunMap *m, uint64_t g0, uint64_t g1, uint16_t *val, uint64_t *end, int room) noexcept nogil
cdef int map_assign(RunMap *m, uint64_t a, uint64_t b, uint16_t v) noexcept nogil


cdef class GrainMap:
    cdef RunMap m
    cdef pthread_mutex_t lock
    cdef readonly uint64_t grains
    cdef check(self, uint64_t a, uint64_t b)


cdef class LayerBits(GrainMap):
    cdef uint8_t *dirty     # one bit per bitmap page changed since the last take_dirty
    cdef uint64_t npages
    cdef readonly int64_t stray
    cdef readonly int past
    cdef int failed         # a bitmap sync failed: no more bits (layer.py)
    cdef int scan(self, int fd, uint64_t offset, uint64_t length) noexcept nogil
    cdef int mark_c(self, uint64_t a, uint64_t b, bint zero, pthread_mutex_t *ilock, RunMap *imap,
                    int owner) noexcept nogil
    cdef void render(self, uint64_t page, unsigned char[::1] image) noexcept


cdef struct Held:
    uint64_t a
    uint64_t b

cdef class OwnerIndex(GrainMap):
    # grains the Python path holds for a copy-up or first write, and the lock a fast-path
    # first write holds from its check of them to its bits (see cowindex.pyx)
    cdef pthread_mutex_t wlock
    cdef Held *held
    cdef int nheld, capheld
    cdef pthread_mutex_t *lock_ptr(self) noexcept nogil
    cdef RunMap *map_ptr(self) noexcept nogil
