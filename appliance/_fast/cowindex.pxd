# The cow owner index (cowindex.pyx): what a C fast path cimports to look up owners without the GIL.
#
# A cow fast-path descriptor needs, besides this: the owners array (OwnerIndex.owners: one byte a
# grain, 0 the base, n the n-th layer from the bottom; rebuilt in place, never moved), the grain
# shift, for every layer number its data fd, data offset and "zero" bitmap (Layer._zero, a
# bytearray that never moves), and the base's fd and offset. Reads: owner_runs_c, then one
# pread a run (the base's runs from the base, zero grains memset). Writes: only when every grain
# is the top layer's and not zero (a pwrite in place); anything else (copy-up, the bitmap) and
# FLUSH stay on the Python path. push and merge change the layers with the device suspended;
# the descriptor is rebuilt then.

cdef Py_ssize_t owner_runs_c(const unsigned char *owners, Py_ssize_t g0, Py_ssize_t g1,
                             unsigned char *run_owner, Py_ssize_t *run_end, Py_ssize_t max_runs) noexcept nogil


cdef class OwnerIndex:
    cdef public bytearray owners
    cdef readonly Py_ssize_t grains
