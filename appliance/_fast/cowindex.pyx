# cython: boundscheck=False, wraparound=False
"""The merged owner map of a stack of copy-on-write layers: one byte per grain, the number of
the topmost layer that holds it (0: none, read the base). overlaybd merges its layers' indexes
the same way: a read looks up one array, however deep the stack is.

The array is a plain contiguous bytearray (`OwnerIndex.owners`), so a C fast path can take its
address and call `owner_runs_c` without the GIL."""

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memset

from appliance._fast.fastops cimport FAST_DECLINE, FastDesc, FastOps, FdPiece

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


# ---- the fast-path descriptor (fastops.pxd): reads only ----------------------------------
# Writes (copy-up, the bitmap) and FLUSH (the bitmap sync) decline to the Python path. A read
# splits into runs of one owner (and one zero state): zero runs are filled here, the others
# become one engine piece each, on the layer's data fd or the base's. An owner number the
# descriptor does not know (a layer pushed since it was built) declines; the target rebuilds
# the descriptor while the device is suspended, whenever its layers change.

cdef struct CowLayerC:
    int fd
    uint64_t data_offset
    const unsigned char *zero
    int buffered


cdef struct CowC:
    const unsigned char *owners
    int shift
    int nlayers
    int base_fd             # -1: the base is not an fd (a mapped device, a remote export)
    uint64_t base_offset
    int base_buffered
    CowLayerC layers[256]   # by owner number; 0 unused (the base)


cdef class CowFast:
    cdef CowC c
    cdef object keep        # the index and the zero bitmaps the pointers point into


cdef int cow_read(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out, int room) noexcept nogil:
    cdef CowC *st = <CowC *> d.state
    cdef int s = st.shift, np = 0
    cdef uint64_t end = off + n, g = off >> s, g1 = ((end - 1) >> s) + 1, e, lo, hi
    cdef unsigned char o
    cdef int z
    cdef const unsigned char *zero
    while g < g1:
        o = st.owners[g]
        if o > st.nlayers:
            return FAST_DECLINE
        zero = st.layers[o].zero if o else NULL
        z = (zero[g >> 3] >> (g & 7)) & 1 if o else 0
        e = g + 1
        while e < g1 and st.owners[e] == o and (not o or ((zero[e >> 3] >> (e & 7)) & 1) == z):
            e += 1
        lo = g << s
        if lo < off:
            lo = off
        hi = e << s
        if hi > end:
            hi = end
        if z:
            memset(buf + (lo - off), 0, hi - lo)
        else:
            if np >= room or (o == 0 and st.base_fd < 0):
                return FAST_DECLINE
            if o == 0:
                out[np].fd = st.base_fd
                out[np].off = st.base_offset + lo
                out[np].buffered = st.base_buffered
            else:
                out[np].fd = st.layers[o].fd
                out[np].off = st.layers[o].data_offset + lo
                out[np].buffered = st.layers[o].buffered
            out[np].len = hi - lo
            out[np].buf = buf + (lo - off)
            np += 1
        g = e
    return np


def read_descriptor(OwnerIndex index, int shift, layers, base, uint32_t align):
    """A FastOps serving reads of a cow stack: `layers` [(fd, data_offset, zero bitmap, buffered)]
    bottom first; `base` (fd, offset, buffered), fd -1 if the base is no fd."""
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"{len(layers)} layers; at most {MAX_LAYERS}")
    cdef CowFast st = CowFast.__new__(CowFast)
    cdef const unsigned char[::1] view
    cdef int i
    st.keep = [index.owners] + [z for _, _, z, _ in layers]
    view = index.owners
    st.c.owners = &view[0]
    st.c.shift = shift
    st.c.nlayers = len(layers)
    st.c.base_fd, st.c.base_offset, st.c.base_buffered = base
    for i, (fd, offset, zero, buffered) in enumerate(layers, 1):
        view = zero
        st.c.layers[i].fd = fd
        st.c.layers[i].data_offset = offset
        st.c.layers[i].zero = &view[0]
        st.c.layers[i].buffered = buffered
    cdef FastOps ops = FastOps.__new__(FastOps)
    ops.desc.read = cow_read
    ops.desc.write = NULL
    ops.desc.flush = NULL
    ops.desc.state = &st.c
    ops.desc.fd = -1
    ops.desc.fd_offset = 0
    ops.desc.align = align
    ops.desc.alone = 1  # it may fill zeros and then decline
    ops.owner = st
    return ops
