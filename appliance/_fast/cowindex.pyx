# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Grain maps for the cow target: runs of grains, never one entry per grain.

A `GrainMap` holds sorted, disjoint runs [start, end) of grains with a small value (no run:
value 0), coalesced so that touching runs of one value are one run. The runs sit in leaves of
up to LEAF runs, the leaves in one sorted array of pointers (and one of their first grains,
which the search runs over): a lookup is two binary searches (O(log runs)), an update moves at
most one leaf's runs and, when a leaf splits or goes, the arrays of leaves. Memory is ~18-36
bytes per run, whatever the device's size: a 2 TiB device with a few runs costs a few KiB (a
byte per grain would be 512 MiB).

Two kinds:
- `LayerBits`: one layer's bitmap (layer.py has the on-disk format): value 1 data, 3 reads as
  zeros. Loaded from disk without a Python object per grain or per run (holes skipped), it
  renders the bitmap pages that changed (`take_dirty`) for layer.sync_bitmap.
- `OwnerIndex`: the stack's merged index, value owner << 1 | zero (owner: the layer's number
  from the bottom, 1..; no run: the base). overlaybd merges its layer indexes the same way: a
  read looks up one map, however deep the stack is.

Each map has its own mutex; the fast path's lookups take the index's without the GIL. A write
that changes the writable layer's bits changes the index in the same step (`LayerBits.mark`,
both locks), so a reader never sees the one without the other.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memset, memmove, memcpy
from posix.unistd cimport pread, pwrite, lseek
from libc.errno cimport errno, ENXIO, EINTR

from appliance._fast.sync cimport pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock, pthread_mutex_unlock
from appliance._fast.fastops cimport FAST_DECLINE, FastDesc, FastOps, FdPiece

MAX_LAYERS = 255  # owner numbers in the fast path's table; 0 is the base

cdef enum:
    SEEK_DATA_ = 3   # Linux's lseek whence values
    SEEK_HOLE_ = 4
    PAGE = 4096                 # the bitmap's page (layer.py)
    GRAINS_PER_PAGE = 16384     # two bytes per 8 grains
    SCAN = 4 << 20              # bytes of bitmap read at a time when loading

cdef enum:  # LayerBits values: the on-disk bits, allocated | zero << 1
    V_DATA = 1
    V_ZERO = 3

DATA, ZERO = V_DATA, V_ZERO


# ---- the run map ------------------------------------------------------------------------

cdef int map_init(RunMap *m) noexcept nogil:
    m.leaf = NULL
    m.first = NULL
    m.nleaf = 0
    m.cap = 0
    m.nruns = 0
    return 0


cdef void map_clear(RunMap *m) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(m.nleaf):
        free(m.leaf[i])
    free(m.leaf)
    free(m.first)
    map_init(m)


cdef Py_ssize_t find_leaf(RunMap *m, uint64_t g) noexcept nogil:
    """The last leaf whose first run starts at or before g (0 if none does)."""
    cdef Py_ssize_t lo = 0, hi = m.nleaf - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if m.first[mid] <= g:
            lo = mid
        else:
            hi = mid - 1
    return lo


cdef int find_in(Leaf *l, uint64_t g) noexcept nogil:
    """The last run of l starting at or before g, or -1."""
    cdef int lo = -1, hi = l.n - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if l.start[mid] <= g:
            lo = mid
        else:
            hi = mid - 1
    return lo


cdef void seek(RunMap *m, uint64_t g, Py_ssize_t *li, int *ri) noexcept nogil:
    """(li, ri): the first run that ends after g (li == nleaf: none)."""
    cdef Py_ssize_t i
    cdef int r
    if m.nleaf == 0:
        li[0] = 0
        ri[0] = 0
        return
    i = find_leaf(m, g)
    r = find_in(m.leaf[i], g)
    if r < 0:
        r = 0
    elif m.leaf[i].end[r] <= g:
        r += 1
    if r >= m.leaf[i].n:
        i += 1
        r = 0
    li[0] = i
    ri[0] = r


cdef int map_lookup(RunMap *m, uint64_t g0, uint64_t g1, uint16_t *val, uint64_t *end, int room) noexcept nogil:
    """Split grains [g0, g1) into pieces of one value (0 between runs), neighbours of one value
    joined: piece i is [end[i-1] (or g0), end[i]) with val[i]. Returns how many (at most room;
    then the last one may end before g1 and the caller asks again from there)."""
    cdef Py_ssize_t li
    cdef int ri, n = 0
    cdef uint64_t pos = g0, s, e
    cdef uint16_t v
    cdef Leaf *l
    seek(m, g0, &li, &ri)
    while pos < g1:
        if li < m.nleaf:
            l = m.leaf[li]
            s = l.start[ri]
        else:
            s = g1
        if s > pos:  # a gap: no run
            v = 0
            e = s
        else:
            v = l.val[ri]
            e = l.end[ri]
            ri += 1
            if ri >= l.n:
                li += 1
                ri = 0
        if e > g1:
            e = g1
        if n and val[n - 1] == v:
            end[n - 1] = e
        else:
            if n == room:
                break
            val[n] = v
            end[n] = e
            n += 1
        pos = e
    return n


cdef uint16_t map_value(RunMap *m, uint64_t g) noexcept nogil:
    cdef uint16_t v
    cdef uint64_t e
    map_lookup(m, g, g + 1, &v, &e, 1)
    return v


cdef int leaf_insert(RunMap *m, Py_ssize_t li, int pos, uint64_t s, uint64_t e, uint16_t v) noexcept nogil:
    """Put run [s, e) v at position pos of leaf li (li == nleaf: a new last leaf). -1: no memory."""
    cdef Leaf *l
    cdef Leaf *r
    cdef Leaf **grown
    cdef uint64_t *firsts
    cdef int half
    if li >= m.nleaf or m.leaf[li].n == LEAF:
        if m.nleaf == m.cap:
            grown = <Leaf **>realloc(m.leaf, (m.cap * 2 + 8) * sizeof(Leaf *))
            if grown == NULL:
                return -1
            m.leaf = grown
            firsts = <uint64_t *>realloc(m.first, (m.cap * 2 + 8) * sizeof(uint64_t))
            if firsts == NULL:
                return -1
            m.first = firsts
            m.cap = m.cap * 2 + 8
        r = <Leaf *>malloc(sizeof(Leaf))
        if r == NULL:
            return -1
        r.n = 0
        if li >= m.nleaf or pos == LEAF:  # a new leaf after li: appending keeps leaves full
            li = m.nleaf if li >= m.nleaf else li + 1
            memmove(m.leaf + li + 1, m.leaf + li, (m.nleaf - li) * sizeof(Leaf *))
            memmove(m.first + li + 1, m.first + li, (m.nleaf - li) * sizeof(uint64_t))
            m.leaf[li] = r
            m.nleaf += 1
            pos = 0
        else:  # split the full leaf: its upper half goes to r, after it
            l = m.leaf[li]
            half = LEAF // 2
            r.n = LEAF - half
            memcpy(r.start, l.start + half, r.n * sizeof(uint64_t))
            memcpy(r.end, l.end + half, r.n * sizeof(uint64_t))
            memcpy(r.val, l.val + half, r.n * sizeof(uint16_t))
            l.n = half
            memmove(m.leaf + li + 2, m.leaf + li + 1, (m.nleaf - li - 1) * sizeof(Leaf *))
            memmove(m.first + li + 2, m.first + li + 1, (m.nleaf - li - 1) * sizeof(uint64_t))
            m.leaf[li + 1] = r
            m.first[li + 1] = r.start[0]
            m.nleaf += 1
            if pos > half:
                li += 1
                pos -= half
    l = m.leaf[li]
    memmove(l.start + pos + 1, l.start + pos, (l.n - pos) * sizeof(uint64_t))
    memmove(l.end + pos + 1, l.end + pos, (l.n - pos) * sizeof(uint64_t))
    memmove(l.val + pos + 1, l.val + pos, (l.n - pos) * sizeof(uint16_t))
    l.start[pos] = s
    l.end[pos] = e
    l.val[pos] = v
    l.n += 1
    m.nruns += 1
    m.first[li] = l.start[0]
    return 0


cdef void leaf_remove(RunMap *m, Py_ssize_t li, int i, int j) noexcept nogil:
    """Drop runs [i, j) of leaf li; a leaf left empty goes."""
    cdef Leaf *l = m.leaf[li]
    if j <= i:
        m.first[li] = l.start[0]  # (a caller may have moved the first run's start)
        return
    memmove(l.start + i, l.start + j, (l.n - j) * sizeof(uint64_t))
    memmove(l.end + i, l.end + j, (l.n - j) * sizeof(uint64_t))
    memmove(l.val + i, l.val + j, (l.n - j) * sizeof(uint16_t))
    l.n -= j - i
    m.nruns -= j - i
    if l.n == 0:
        free(l)
        memmove(m.leaf + li, m.leaf + li + 1, (m.nleaf - li - 1) * sizeof(Leaf *))
        memmove(m.first + li, m.first + li + 1, (m.nleaf - li - 1) * sizeof(uint64_t))
        m.nleaf -= 1
    else:
        m.first[li] = l.start[0]


cdef void tidy(RunMap *m, Py_ssize_t li) noexcept nogil:
    """Join a leaf that has become small with a neighbour, so leaves stay mostly full (memory
    per run bounded) after runs were removed."""
    cdef Py_ssize_t a
    cdef Leaf *l
    cdef Leaf *r
    if li < 0 or li >= m.nleaf or m.leaf[li].n >= LEAF // 4:
        return
    if li > 0 and m.leaf[li - 1].n + m.leaf[li].n <= LEAF:
        a = li - 1
    elif li + 1 < m.nleaf and m.leaf[li].n + m.leaf[li + 1].n <= LEAF:
        a = li
    else:
        return
    l, r = m.leaf[a], m.leaf[a + 1]
    memcpy(l.start + l.n, r.start, r.n * sizeof(uint64_t))
    memcpy(l.end + l.n, r.end, r.n * sizeof(uint64_t))
    memcpy(l.val + l.n, r.val, r.n * sizeof(uint16_t))
    l.n += r.n
    free(r)
    memmove(m.leaf + a + 1, m.leaf + a + 2, (m.nleaf - a - 2) * sizeof(Leaf *))
    memmove(m.first + a + 1, m.first + a + 2, (m.nleaf - a - 2) * sizeof(uint64_t))
    m.nleaf -= 1


cdef int map_erase(RunMap *m, uint64_t a, uint64_t b) noexcept nogil:
    """No run covers [a, b) any more (runs across its ends are cut). -1: no memory."""
    cdef Py_ssize_t li, first
    cdef int ri, j, rc = 0
    cdef bint done, gone
    cdef Leaf *l
    cdef uint64_t e
    cdef uint16_t v
    seek(m, a, &li, &ri)
    first = li
    while li < m.nleaf:
        l = m.leaf[li]
        if l.start[ri] >= b:
            break
        if l.start[ri] < a:
            if l.end[ri] > b:  # [a, b) inside one run: it splits in two
                e, v = l.end[ri], l.val[ri]
                l.end[ri] = a
                rc = leaf_insert(m, li, ri + 1, b, e, v)
                break
            l.end[ri] = a
            ri += 1
        else:
            j = ri
            while j < l.n and l.end[j] <= b:
                j += 1
            # runs [ri, j) lie inside [a, b); run j, if any, ends after b
            done = j < l.n
            if done and l.start[j] < b:
                l.start[j] = b
            gone = ri == 0 and j == l.n
            leaf_remove(m, li, ri, j)
            if done:
                break
            if not gone:  # the rest of this leaf is gone; on to the next one
                li += 1
            ri = 0  # (a leaf that went entirely: the next one now has its index)
            continue
        if ri >= m.leaf[li].n:
            li += 1
            ri = 0
    tidy(m, first + 1)
    tidy(m, first)
    return rc


cdef int map_insert(RunMap *m, uint64_t a, uint64_t b, uint16_t v) noexcept nogil:
    """Run [a, b) v into a gap, joined with touching neighbours of the same value."""
    cdef Py_ssize_t li, rl
    cdef int ri, rr
    cdef Leaf *l
    cdef bint left, right
    if m.nleaf == 0:
        return leaf_insert(m, 0, 0, a, b, v)
    li = find_leaf(m, a)
    l = m.leaf[li]
    ri = find_in(l, a)  # the run before the gap, or -1 (then no run starts before a)
    if ri + 1 < l.n:
        rl, rr = li, ri + 1
    else:
        rl, rr = li + 1, 0
    left = ri >= 0 and l.end[ri] == a and l.val[ri] == v
    right = rl < m.nleaf and m.leaf[rl].start[rr] == b and m.leaf[rl].val[rr] == v
    if left and right:
        l.end[ri] = m.leaf[rl].end[rr]
        leaf_remove(m, rl, rr, rr + 1)
        tidy(m, rl)
    elif left:
        l.end[ri] = b
    elif right:
        m.leaf[rl].start[rr] = a
        m.first[rl] = m.leaf[rl].start[0]
    else:
        return leaf_insert(m, li, ri + 1, a, b, v)
    return 0


cdef int map_assign(RunMap *m, uint64_t a, uint64_t b, uint16_t v) noexcept nogil:
    """Grains [a, b) take value v (0: no run)."""
    if a >= b:
        return 0
    if map_erase(m, a, b) < 0:
        return -1
    if v:
        return map_insert(m, a, b, v)
    return 0


cdef class GrainMap:
    """Runs of grains [0, grains) with a value, 0 where no run is. Thread-safe."""

    def __cinit__(self, uint64_t grains, *args):
        map_init(&self.m)
        pthread_mutex_init(&self.lock, NULL)
        self.grains = grains

    def __dealloc__(self):
        map_clear(&self.m)
        pthread_mutex_destroy(&self.lock)

    cdef check(self, uint64_t a, uint64_t b):
        if a > b or b > self.grains:
            raise ValueError(f"grains [{a}, {b}) outside 0..{self.grains}")

    def assign(self, uint64_t a, uint64_t b, uint16_t value):
        self.check(a, b)
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self.lock)
            rc = map_assign(&self.m, a, b, value)
            pthread_mutex_unlock(&self.lock)
        if rc:
            raise MemoryError()

    def clear(self):
        with nogil:
            pthread_mutex_lock(&self.lock)
            map_clear(&self.m)
            pthread_mutex_unlock(&self.lock)

    def value(self, uint64_t g):
        self.check(g, g + 1)
        cdef uint16_t v
        with nogil:
            pthread_mutex_lock(&self.lock)
            v = map_value(&self.m, g)
            pthread_mutex_unlock(&self.lock)
        return v

    def pieces(self, uint64_t g0, uint64_t g1):
        """[(value, start, end)] covering [g0, g1), one per change of value (0 between runs)."""
        self.check(g0, g1)
        cdef uint16_t val[64]
        cdef uint64_t end[64]
        cdef int n, i
        cdef uint64_t pos = g0
        out = []
        while pos < g1:
            with nogil:
                pthread_mutex_lock(&self.lock)
                n = map_lookup(&self.m, pos, g1, val, end, 64)
                pthread_mutex_unlock(&self.lock)
            for i in range(n):
                out.append((val[i], pos, end[i]))
                pos = end[i]
        return out

    def totals(self):
        """{value: grains}, over the runs."""
        cdef dict out = {}
        cdef Py_ssize_t i
        cdef int j
        cdef Leaf *l
        pthread_mutex_lock(&self.lock)
        try:
            for i in range(self.m.nleaf):
                l = self.m.leaf[i]
                for j in range(l.n):
                    out[l.val[j]] = out.get(l.val[j], 0) + (l.end[j] - l.start[j])
        finally:
            pthread_mutex_unlock(&self.lock)
        return out

    @property
    def runs(self):
        return self.m.nruns

    @property
    def memory(self):
        """Bytes the runs take (the leaves and the array of them)."""
        return self.m.nleaf * sizeof(Leaf) + self.m.cap * (sizeof(Leaf *) + sizeof(uint64_t))


# ---- a layer's bitmap -------------------------------------------------------------------

cdef inline uint64_t pair_bits(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint64_t>p[1] << 8)


cdef int mark_runs(RunMap *m, pthread_mutex_t *lock, uint8_t *dirty, uint64_t a, uint64_t b, bint zero,
                   pthread_mutex_t *ilock, RunMap *imap, int owner) noexcept nogil:
    """A layer's grains [a, b) take data (or zero), their bitmap pages become dirty, and, with
    an index, the index gives them to owner: one step under both locks (layer, then index)."""
    cdef uint64_t p
    cdef int rc
    if a >= b:
        return 0
    pthread_mutex_lock(lock)
    rc = map_assign(m, a, b, V_ZERO if zero else V_DATA)
    for p in range(a // GRAINS_PER_PAGE, (b - 1) // GRAINS_PER_PAGE + 1):
        dirty[p >> 3] |= 1 << (p & 7)
    if ilock != NULL and rc == 0:
        pthread_mutex_lock(ilock)
        rc = map_assign(imap, a, b, (owner << 1) | zero)
        pthread_mutex_unlock(ilock)
    pthread_mutex_unlock(lock)
    return rc


cdef class LayerBits(GrainMap):
    """A layer's "allocated" and "zero" bits as runs (values DATA, ZERO), the bitmap pages
    changed since the last sync, and what loading found wrong (`stray`: the first grain marked
    zero but not allocated, -1 if none; `past`: bits set past the last grain)."""

    def __cinit__(self, uint64_t grains, *args):
        self.npages = (grains + GRAINS_PER_PAGE - 1) // GRAINS_PER_PAGE
        self.dirty = <uint8_t *>calloc((self.npages + 7) // 8 + 1, 1)  # 1 bit per 64 MiB of 4 KiB grains
        if self.dirty == NULL:
            raise MemoryError()
        self.stray = -1
        self.past = 0
        self.failed = 0

    def __dealloc__(self):
        free(self.dirty)

    def load(self, int fd, uint64_t offset, uint64_t length):
        """Read the bitmap at [offset, offset+length) of fd: runs only where bits are set; the
        file's holes (a sparse layer) are skipped unread."""
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self.lock)
            map_clear(&self.m)
            self.stray = -1
            self.past = 0
            rc = self.scan(fd, offset, length)
            pthread_mutex_unlock(&self.lock)
        if rc < 0:
            raise OSError(-rc, "reading the bitmap")

    cdef int scan(self, int fd, uint64_t offset, uint64_t length) noexcept nogil:
        cdef uint8_t *buf = <uint8_t *>malloc(SCAN)
        cdef uint64_t end = offset + length, pos = offset, data, hole, at, k, g, run_lo = 0, run_hi = 0
        cdef int64_t r
        cdef uint16_t run_val = 0, v
        cdef uint64_t word, bits
        cdef int j, rc = 0
        if buf == NULL:
            return -12
        while pos < end and rc == 0:
            r = lseek(fd, pos, SEEK_DATA_)
            if r < 0:
                if errno == ENXIO:
                    break  # nothing but holes from here
                r = pos  # no SEEK_DATA here (a block device): read it all
            data = r
            if data >= end:
                break
            data = offset + ((data - offset) & ~(<uint64_t>PAGE - 1))
            r = lseek(fd, data, SEEK_HOLE_)
            hole = end if r < 0 or <uint64_t>r > end else <uint64_t>r
            if hole <= data:
                hole = data + PAGE if data + PAGE < end else end
            at = data
            while at < hole:
                r = pread(fd, buf, SCAN if hole - at > SCAN else hole - at, at)
                if r < 0:
                    if errno == EINTR:
                        continue
                    rc = -errno
                    break
                if r == 0:
                    break  # past the end of the file: zeros (check_sizes names a short file)
                r &= ~1
                k = 0
                while k < <uint64_t>r:
                    if k + 8 <= <uint64_t>r:
                        memcpy(&word, buf + k, 8)
                        if word == 0:
                            k += 8
                            continue
                    bits = pair_bits(buf + k)
                    g = ((at - offset + k) >> 1) << 3
                    k += 2
                    if bits == 0:
                        continue
                    if bits == 0x00FF and run_val == V_DATA and run_hi == g and g + 8 <= self.grains:
                        run_hi += 8  # eight grains of data: the common case of a full layer
                        continue
                    for j in range(8):
                        v = ((bits >> j) & 1) | (((bits >> (8 + j)) & 1) << 1)
                        if v == 0:
                            continue
                        if g + j >= self.grains:
                            self.past = 1
                            continue
                        if v == 2:  # zero without allocated: damage; the grain is not here
                            if self.stray < 0:
                                self.stray = g + j
                            continue
                        if run_val == v and run_hi == g + j:
                            run_hi += 1
                            continue
                        if run_val and map_insert(&self.m, run_lo, run_hi, run_val) < 0:
                            rc = -12
                        run_lo = g + j
                        run_hi = g + j + 1
                        run_val = v
                at += r
            pos = hole
        if run_val and rc == 0 and map_insert(&self.m, run_lo, run_hi, run_val) < 0:
            rc = -12
        free(buf)
        return rc

    def mark(self, uint64_t a, uint64_t b, bint zero, OwnerIndex index=None, int owner=0):
        """Grains [a, b) hold data (or read as zeros) in this layer; with `index`, the stack's
        index says so too (owner's number), in the same step."""
        self.check(a, b)
        cdef int rc
        cdef pthread_mutex_t *ilock = NULL
        cdef RunMap *imap = NULL
        if index is not None:
            ilock, imap = index.lock_ptr(), index.map_ptr()
        with nogil:
            rc = self.mark_c(a, b, zero, ilock, imap, owner)
        if rc:
            raise MemoryError()

    cdef int mark_c(self, uint64_t a, uint64_t b, bint zero, pthread_mutex_t *ilock, RunMap *imap,
                    int owner) noexcept nogil:
        return mark_runs(&self.m, &self.lock, self.dirty, a, b, zero, ilock, imap, owner)

    def take_dirty(self):
        """[(page, image)] of the bitmap pages changed since the last call: their on-disk bytes
        now (two bytes per 8 grains: the allocated bits, then the zero bits)."""
        out = []
        cdef uint64_t p
        cdef bytearray image
        pthread_mutex_lock(&self.lock)
        try:
            for p in range(self.npages):
                if self.dirty[p >> 3] >> (p & 7) & 1:
                    self.dirty[p >> 3] &= ~(1 << (p & 7))
                    image = bytearray(PAGE)
                    self.render(p, image)
                    out.append((p, image))
        finally:
            pthread_mutex_unlock(&self.lock)
        return out

    cdef void render(self, uint64_t page, unsigned char[::1] image) noexcept:
        cdef uint64_t g0 = page * GRAINS_PER_PAGE, g1 = g0 + GRAINS_PER_PAGE, g, pos = g0
        cdef uint16_t val[64]
        cdef uint64_t end[64]
        cdef int n, i
        if g1 > self.grains:
            g1 = self.grains
        while pos < g1:
            n = map_lookup(&self.m, pos, g1, val, end, 64)
            for i in range(n):
                if val[i]:
                    for g in range(pos - g0, end[i] - g0):
                        image[(g >> 3) << 1] |= 1 << (g & 7)
                        if val[i] & 2:
                            image[((g >> 3) << 1) + 1] |= 1 << (g & 7)
                pos = end[i]

    def fail(self):
        """A bitmap sync failed: the fast path makes no more first writes into this layer."""
        self.failed = 1


# ---- the stack's index ------------------------------------------------------------------

cdef class OwnerIndex(GrainMap):
    """grain -> (owner layer number, reads as zeros). Built from the layers' bits bottom first,
    so the topmost holder wins; the writable layer's marks update it (LayerBits.mark)."""

    def __cinit__(self, uint64_t grains, *args):
        pthread_mutex_init(&self.wlock, NULL)
        self.held = NULL
        self.nheld = 0
        self.capheld = 0

    def __dealloc__(self):
        free(self.held)
        pthread_mutex_destroy(&self.wlock)

    def hold(self, uint64_t a, uint64_t b):
        """The Python path takes grains [a, b) for a copy-up or first write (its own per-grain
        lock says who waits); a fast-path first write leaves them alone until release()."""
        cdef Held *grown
        cdef bint ok = True
        with nogil:
            pthread_mutex_lock(&self.wlock)
            if self.nheld == self.capheld:
                grown = <Held *>realloc(self.held, (self.capheld * 2 + 16) * sizeof(Held))
                if grown != NULL:
                    self.held = grown
                    self.capheld = self.capheld * 2 + 16
            ok = self.nheld < self.capheld
            if ok:
                self.held[self.nheld].a = a
                self.held[self.nheld].b = b
                self.nheld += 1
            pthread_mutex_unlock(&self.wlock)
        if not ok:
            raise MemoryError()

    def release(self, uint64_t a, uint64_t b):
        cdef int i
        with nogil:
            pthread_mutex_lock(&self.wlock)
            for i in range(self.nheld):
                if self.held[i].a == a and self.held[i].b == b:
                    self.nheld -= 1
                    self.held[i] = self.held[self.nheld]
                    break
            pthread_mutex_unlock(&self.wlock)

    cdef pthread_mutex_t *lock_ptr(self) noexcept nogil:
        return &self.lock

    cdef RunMap *map_ptr(self) noexcept nogil:
        return &self.m

    def overlay(self, int owner, LayerBits bits):
        """owner takes every grain `bits` holds, with its zero state."""
        cdef int rc = 0, j
        cdef Py_ssize_t i
        cdef Leaf *l
        with nogil:
            pthread_mutex_lock(&bits.lock)
            pthread_mutex_lock(&self.lock)
            for i in range(bits.m.nleaf):
                l = bits.m.leaf[i]
                for j in range(l.n):
                    if rc == 0:
                        rc = map_assign(&self.m, l.start[j], l.end[j], (owner << 1) | (l.val[j] >> 1))
            pthread_mutex_unlock(&self.lock)
            pthread_mutex_unlock(&bits.lock)
        if rc:
            raise MemoryError()

    def set_runs(self, int owner, runs):
        """owner takes grains [a, b) for every (a, b) in runs (as data)."""
        for a, b in runs:
            self.assign(a, b, owner << 1)

    def set(self, uint64_t a, uint64_t b, int owner):
        self.assign(a, b, owner << 1)

    def owner(self, uint64_t g):
        return self.value(g) >> 1

    def owner_runs(self, uint64_t g0, uint64_t g1):
        """[(owner, start, end)] covering grains [g0, g1), one per change of owner."""
        out = []
        for v, a, b in self.pieces(g0, g1):
            if out and out[len(out) - 1][0] == v >> 1:  # (no negative indexes: wraparound=False)
                out[len(out) - 1] = (v >> 1, out[len(out) - 1][1], b)
            else:
                out.append((v >> 1, a, b))
        return out

    def runs_with_zero(self, uint64_t g0, uint64_t g1):
        """[(owner, zero, start, end)] covering [g0, g1): one per change of owner or zero state."""
        return [(v >> 1, v & 1, a, b) for v, a, b in self.pieces(g0, g1)]


# ---- the fast-path descriptor (fastops.pxd) ---------------------------------------------
# Reads: the index's pieces of one owner and zero state; zero pieces are filled here, the
# others become one engine piece each, on the layer's data fd or the base's.
# Writes, when every grain is the writable layer's data: one piece in place on its data fd (no
# bit changes). First writes of whole grains (not the writable layer's data yet, none of them
# held by the Python path), on a buffered data fd: written here, inline as the loop writes any
# buffered piece, then their bits and the index in one step, all under the index's wlock, so
# the Python path (which holds a grain before it copies it up: hold()) never copies up a grain
# under a first write, and a first write never lands under a copy-up. The order is the Python
# path's: the data is written before the bit that exposes it is set, and bits reach the disk
# only through layer.sync_bitmap (data fdatasync, then the bitmap) on FLUSH, which stays on the
# Python path. Anything else declines: partial grains (copy-up), FUA (the bitmap may hold bits
# this write's durability needs), O_DIRECT (an inline write would wait for the disk), a layer
# whose bitmap sync failed. An owner the descriptor does not know (a layer pushed since it was
# built) declines; the target rebuilds the descriptor, with the device suspended, whenever its
# layers change.

cdef struct CowLayerC:
    int fd
    uint64_t data_offset
    int buffered


cdef struct CowC:
    RunMap *index
    pthread_mutex_t *lock
    pthread_mutex_t *wlock  # the index's: first writes against the Python path's held grains
    Held **held
    int *nheld
    RunMap *top_bits        # the writable layer's bits (NULL: no first writes here)
    pthread_mutex_t *top_lock
    uint8_t *top_dirty
    int *top_failed
    int shift
    uint64_t size           # bytes: the last grain may be short
    int nlayers
    int top                 # the writable layer's number; 0: none
    int base_fd             # -1: the base is not an fd (a mapped device, a remote export)
    uint64_t base_offset
    int base_buffered
    CowLayerC layers[256]   # by owner number; 0 unused (the base)


cdef class CowFast:
    cdef CowC c
    cdef object keep        # the index and bits the pointers point into


cdef int cow_read(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out, int room) noexcept nogil:
    cdef CowC *st = <CowC *> d.state
    cdef int s = st.shift, np = 0, k, i, o
    cdef uint64_t end = off + n, g = off >> s, g1 = ((end - 1) >> s) + 1, lo, hi
    cdef uint16_t val[16]
    cdef uint64_t ends[16]
    while g < g1:
        pthread_mutex_lock(st.lock)
        k = map_lookup(st.index, g, g1, val, ends, 16)
        pthread_mutex_unlock(st.lock)
        for i in range(k):
            o = val[i] >> 1
            if o > st.nlayers:
                return FAST_DECLINE
            lo = g << s
            if lo < off:
                lo = off
            hi = ends[i] << s
            if hi > end:
                hi = end
            g = ends[i]
            if val[i] & 1:
                memset(buf + (lo - off), 0, hi - lo)
                continue
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
    return np


cdef bint is_held(CowC *st, uint64_t a, uint64_t b) noexcept nogil:
    cdef int i
    cdef Held *h = st.held[0]
    for i in range(st.nheld[0]):
        if h[i].a < b and a < h[i].b:
            return True
    return False


cdef int first_write(CowC *st, uint64_t off, char *buf, uint64_t n) noexcept nogil:
    """Whole grains [off, off+n) into the writable layer, here and now: 0, or FAST_DECLINE
    (nothing marked; the Python path does it all again)."""
    cdef uint64_t mask = (<uint64_t>1 << st.shift) - 1, end = off + n, done = 0
    cdef uint64_t g = off >> st.shift, g1 = ((end - 1) >> st.shift) + 1
    cdef CowLayerC *top = &st.layers[st.top]
    cdef ssize_t r
    cdef int rc = 0
    if st.top_bits == NULL or not top.buffered or st.top_failed[0]:
        return FAST_DECLINE
    if off & mask or (end & mask and end != st.size):
        return FAST_DECLINE  # a partial grain: copy-up
    pthread_mutex_lock(st.wlock)
    if is_held(st, g, g1):
        pthread_mutex_unlock(st.wlock)
        return FAST_DECLINE
    while done < n:
        r = pwrite(top.fd, buf + done, n - done, top.data_offset + off + done)
        if r < 0:
            if errno == EINTR:
                continue
            rc = FAST_DECLINE  # the Python path tries again and reports the error
            break
        done += r
    if rc == 0 and mark_runs(st.top_bits, st.top_lock, st.top_dirty, g, g1, 0, st.lock, st.index, st.top) < 0:
        rc = FAST_DECLINE
    pthread_mutex_unlock(st.wlock)
    return rc


cdef int cow_write(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out, int room) noexcept nogil:
    cdef CowC *st = <CowC *> d.state
    cdef int s = st.shift, k
    cdef uint64_t g = off >> s, g1 = ((off + n - 1) >> s) + 1
    cdef uint16_t val
    cdef uint64_t e
    if st.top == 0 or fua or room < 1:
        return FAST_DECLINE
    pthread_mutex_lock(st.lock)
    k = map_lookup(st.index, g, g1, &val, &e, 1)
    pthread_mutex_unlock(st.lock)
    if k != 1 or e < g1 or val != (st.top << 1):
        return first_write(st, off, buf, n)
    out[0].fd = st.layers[st.top].fd
    out[0].off = st.layers[st.top].data_offset + off
    out[0].len = n
    out[0].buf = buf
    out[0].buffered = st.layers[st.top].buffered
    return 1


def descriptor(OwnerIndex index, int shift, uint64_t size, layers, base, LayerBits top, uint32_t align):
    """A FastOps for a cow stack of `size` bytes: `layers` [(fd, data_offset, buffered)] bottom
    first; `base` (fd, offset, buffered), fd -1 if the base is no fd; `top` the writable (last)
    layer's bits, None if there is none (writes decline)."""
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"{len(layers)} layers; at most {MAX_LAYERS}")
    cdef CowFast st = CowFast.__new__(CowFast)
    cdef int i
    st.keep = (index, top)
    st.c.index = index.map_ptr()
    st.c.lock = index.lock_ptr()
    st.c.wlock = &index.wlock
    st.c.held = &index.held
    st.c.nheld = &index.nheld
    st.c.top_bits = NULL
    if top is not None:
        st.c.top_bits = &top.m
        st.c.top_lock = &top.lock
        st.c.top_dirty = top.dirty
        st.c.top_failed = &top.failed
    st.c.shift = shift
    st.c.size = size
    st.c.nlayers = len(layers)
    st.c.top = len(layers) if top is not None else 0
    st.c.base_fd, st.c.base_offset, st.c.base_buffered = base
    for i, (fd, offset, buffered) in enumerate(layers, 1):
        st.c.layers[i].fd = fd
        st.c.layers[i].data_offset = offset
        st.c.layers[i].buffered = buffered
    cdef FastOps ops = FastOps.__new__(FastOps)
    ops.desc.read = cow_read
    ops.desc.write = cow_write
    ops.desc.flush = NULL
    ops.desc.state = &st.c
    ops.desc.fd = -1
    ops.desc.fd_offset = 0
    ops.desc.align = align
    ops.desc.alone = 1  # a read may fill zeros and then decline
    ops.owner = st
    return ops
