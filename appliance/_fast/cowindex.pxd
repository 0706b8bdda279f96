# The cow owner index (cowindex.pyx): what a C fast path cimports to look up owners without the GIL.

cdef Py_ssize_t owner_runs_c(const unsigned char *owners, Py_ssize_t g0, Py_ssize_t g1,
                             unsigned char *run_owner, Py_ssize_t *run_end, Py_ssize_t max_runs) noexcept nogil


cdef class OwnerIndex:
    cdef public bytearray owners
    cdef readonly Py_ssize_t grains
