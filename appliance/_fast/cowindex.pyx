# cython: boundscheck=False, wraparound=False
"""The merged owner map of a stack of copy-on-write layers: one byte per grain, the number of
the topmost layer that holds it (0: none, read the base). overlaybd merges its layers' indexes
the same way: a read looks up one array, however deep the stack is.

The array is a plain contiguous bytearray (`OwnerIndex.owners`), so a C fast path can take its
address and call `owner_runs_c` without the GIL."""

from libc.string cimport memset

MAX_LAYERS = 255  # one byte per grain; 0 is the base


cdef Py_ssize_t owner_runs_c(const unsigned char *owners, Py_ssize_t g0, Py_ssize_t g1,
                             unsigned char *run_owner, Py_ssize_t *run_end, Py_ssize_t max_runs) noexcept nogil:
    """Split grains [g0, g1) into runs of one owner: run i is [end of run i-1 (or g0), run_end[i])
    owned by run_owner[i]. Returns the number of runs (at most max_runs; the last run then ends
    where the scan stopped, and the caller asks again from there)."""
    cdef Py_ssize_t n = 0, g = g0
    cdef unsigned char o
    while g < g1 and n < max_runs:
        o = owners[g]
        g += 1
        while g < g1 and owners[g] == o:
            g += 1
        run_owner[n] = o
        run_end[n] = g
        n += 1
    return n


cdef class OwnerIndex:
    """grain -> owner layer number. Updated by the target under its own lock; read from any thread."""

    def __init__(self, Py_ssize_t grains):
        self.grains = grains
        self.owners = bytearray(grains)

    def set_runs(self, unsigned char owner, runs):
        """owner takes grains [a, b) for every (a, b) in runs."""
        cdef unsigned char[::1] view = self.owners
        cdef Py_ssize_t a, b
        for a, b in runs:
            if a < 0 or b > self.grains or a > b:
                raise ValueError(f"grains [{a}, {b}) outside 0..{self.grains}")
            with nogil:
                memset(&view[0] + a, owner, b - a)

    def set(self, Py_ssize_t a, Py_ssize_t b, unsigned char owner):
        self.set_runs(owner, ((a, b),))

    def owner(self, Py_ssize_t g):
        return self.owners[g]

    def owner_runs(self, Py_ssize_t g0, Py_ssize_t g1):
        """[(owner, start, end)] covering grains [g0, g1), one tuple per change of owner."""
        cdef unsigned char[::1] view = self.owners
        cdef unsigned char ro[64]
        cdef Py_ssize_t re[64]
        cdef Py_ssize_t n, i, start
        if g0 < 0 or g1 > self.grains or g0 > g1:
            raise ValueError(f"grains [{g0}, {g1}) outside 0..{self.grains}")
        out = []
        start = g0
        while start < g1:
            with nogil:
                n = owner_runs_c(&view[0], start, g1, ro, re, 64)
            for i in range(n):
                out.append((ro[i], start, re[i]))
                start = re[i]
        return out

    def counts(self):
        """Grains per owner number (a list of 256)."""
        cdef unsigned char[::1] view = self.owners
        cdef Py_ssize_t g
        cdef Py_ssize_t c[256]
        memset(c, 0, sizeof(c))
        with nogil:
            for g in range(self.grains):
                c[view[g]] += 1
        return [c[i] for i in range(256)]
