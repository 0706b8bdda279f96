# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Ramback's chunk states and store mapping, and the two nogil loops that
serve populated reads and writeback writes straight from the store.

The state bytes live in the store (a shared-memory file) and are changed only
by compare-and-swap, so the NBD loop (no GIL, no lock) and the Python side
(flusher, populate, slow-path writes) can change them at the same time. The
per-state totals and per-group counts live in process memory; `recount()`
rebuilds them from the bytes when a store is attached.

The rules every writer of the store follows (the reasons are in
appliance/targets/ramback/__init__.py):
- a write marks its chunks DIRTY, copies the data, then marks them DIRTY
  again. The first mark keeps a crash in the middle from leaving a CLEAN
  chunk whose RAM differs from backing; the second turns a FLUSHING chunk
  whose flush may have read the old bytes back into DIRTY.
- a write never copies into an EMPTY chunk it does not cover whole, and one
  that touches any EMPTY chunk holds the range lock the populate install
  holds. The fast path below declines every request that touches an EMPTY
  chunk, so it needs no lock: EMPTY is the only state that never comes back.
- flush: DIRTY -> FLUSHING, write RAM to backing, FLUSHING -> CLEAN (only if
  still FLUSHING).
"""

from libc.stdint cimport uint8_t, uint32_t, int64_t, uint64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport calloc, free
from posix.unistd cimport write, usleep
from libc.errno cimport errno
from appliance._fast.fastops cimport FastOps, FastDesc, FdPiece, FAST_DECLINE

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *, size_t, int, int, int, long)
    int munmap(void *, size_t)
    int msync(void *, size_t, int)
    int madvise(void *, size_t, int)
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_ANONYMOUS, MAP_POPULATE, MS_SYNC
    void *MAP_FAILED

cdef extern from *:
    """
    #define rb_cas8(p, expect, desired) ({ unsigned char _e = (expect); \
        __atomic_compare_exchange_n((p), &_e, (desired), 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); })
    #define rb_load8(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define rb_add(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
    #define rb_load(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
    #define rb_store(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
    """
    int rb_cas8(uint8_t *p, uint8_t expect, uint8_t desired) nogil
    uint8_t rb_load8(uint8_t *p) nogil
    int64_t rb_add(int64_t *p, int64_t v) nogil
    uint32_t rb_add32 "rb_add"(uint32_t *p, uint32_t v) nogil
    uint64_t rb_addu "rb_add"(uint64_t *p, uint64_t v) nogil
    int64_t rb_load(int64_t *p) nogil
    int rb_load_int "rb_load"(int *p) nogil
    void rb_store_int "rb_store"(int *p, int v) nogil

DEF GROUP_SHIFT = 12
DEF GROUP_MASK = 4095

EMPTY = CS_EMPTY
CLEAN = CS_CLEAN
DIRTY = CS_DIRTY
FLUSHING = CS_FLUSHING
GROUP_CHUNKS = 1 << GROUP_SHIFT


# ---- the transitions ------------------------------------------------------

cdef inline void account(RbFast *f, int64_t c, int old, int new) noexcept nogil:
    cdef uint64_t one = 1
    cdef int64_t g = c >> GROUP_SHIFT
    # count the new state first, so a scan never sees a group empty of a state one of its chunks has
    rb_add32(&f.groups[g * 4 + new], 1)
    rb_add32(&f.groups[g * 4 + old], <uint32_t>-1)
    rb_add(&f.count[old], -1)
    if rb_add(&f.count[new], 1) == 0 and new == CS_DIRTY and f.wake_fd >= 0:
        write(f.wake_fd, &one, 8)  # the flusher sleeps on this when nothing is dirty


cdef inline int trans(RbFast *f, int64_t c, uint8_t old, uint8_t new) noexcept nogil:
    if not rb_cas8(&f.state[c], old, new):
        return 0
    account(f, c, old, new)
    return 1


cdef int64_t mark_dirty(RbFast *f, int64_t c0, int64_t c1) noexcept nogil:
    """Every chunk of [c0, c1) -> DIRTY. Returns how many were not DIRTY."""
    cdef int64_t c, changed = 0
    cdef uint8_t s
    for c in range(c0, c1):
        while True:
            s = rb_load8(&f.state[c])
            if s == CS_DIRTY:
                break
            if trans(f, c, s, CS_DIRTY):
                changed += 1
                break
    return changed


cdef inline int any_empty(RbFast *f, int64_t c0, int64_t c1) noexcept nogil:
    cdef int64_t c
    if rb_load(&f.count[CS_EMPTY]) == 0:
        return 0
    for c in range(c0, c1):
        if rb_load8(&f.state[c]) == CS_EMPTY:
            return 1
    return 0


cdef inline int64_t group_has(RbFast *f, int64_t g, int mask) noexcept nogil:
    cdef int s
    cdef int64_t n = 0
    for s in range(4):
        if mask & (1 << s):
            n += rb_add32(&f.groups[g * 4 + s], 0)
    return n


cdef int64_t find_first(RbFast *f, int64_t pos, int64_t end, int mask) noexcept nogil:
    """The first chunk in [pos, end) whose state is in `mask` (bit 1 << state), or -1.
    Groups whose counts say they hold none are skipped whole."""
    cdef int64_t g, gend, c
    while pos < end:
        g = pos >> GROUP_SHIFT
        gend = (g + 1) << GROUP_SHIFT
        if gend > end:
            gend = end
        if group_has(f, g, mask):
            for c in range(pos, gend):
                if (1 << rb_load8(&f.state[c])) & mask:
                    return c
        pos = gend
    return -1


cdef int64_t run_end(RbFast *f, int64_t start, int64_t end, int mask, int64_t maxn, int64_t gap) noexcept nogil:
    """Extend a run that starts at a chunk in `mask`: through chunks in `mask`, and across at
    most `gap` CLEAN chunks in a row when more of `mask` follows; at most `maxn` chunks."""
    cdef int64_t c = start + 1, last = start + 1, clean = 0, limit = start + maxn
    cdef uint8_t s
    if limit > end:
        limit = end
    while c < limit:
        s = rb_load8(&f.state[c])
        if (1 << s) & mask:
            last = c + 1
            clean = 0
        elif s == CS_CLEAN and clean < gap:
            clean += 1
        else:
            break
        c += 1
    return last


# ---- the fast path (the NBD loop, no GIL, no lock) ------------------------

cdef int rb_read(RbFast *f, uint64_t off, char *dst, uint64_t n) noexcept nogil:
    """Copy [off, off+n) of the segment out of RAM if every chunk is loaded. 1 done, 0 declined."""
    cdef int64_t c0, c1
    if n == 0 or off + n > f.length:
        return 0
    c0 = off >> f.shift
    c1 = ((off + n - 1) >> f.shift) + 1
    if any_empty(f, c0, c1):
        return 0  # a load is needed: the slow path does it first
    memcpy(dst, f.data + off, n)
    rb_addu(&f.fast_reads, 1)
    return 1


cdef int rb_write(RbFast *f, uint64_t off, const char *src, uint64_t n, int fua) noexcept nogil:
    """A writeback write into loaded chunks under the dirty cap. 1 done, 0 declined.

    Why this is safe without a lock: the chunks are all loaded, and loaded chunks are
    only ever touched by other writers (same protocol) and the flusher, whose
    DIRTY -> FLUSHING -> CLEAN turns back to DIRTY on our second mark. A mode change
    clears write_ok and then waits for `writers` to reach 0; both sides use sequentially
    consistent atomics, so either we see write_ok == 0 or the changer sees us."""
    cdef int64_t c0, c1, dirty
    if n == 0 or off + n > f.length or not rb_load_int(&f.write_ok):
        return 0
    rb_add(&f.writers, 1)
    if not rb_load_int(&f.write_ok) or (fua and not f.fua_ok):
        rb_add(&f.writers, -1)
        return 0
    c0 = off >> f.shift
    c1 = ((off + n - 1) >> f.shift) + 1
    dirty = rb_load(&f.count[CS_DIRTY]) + rb_load(&f.count[CS_FLUSHING])
    # at the cap: the slow path throttles (blocks) the writer. Fast writers already past this
    # check can overshoot the cap by at most one request each.
    if dirty > 0 and dirty + (c1 - c0) > rb_load(&f.limit_chunks):
        rb_add(&f.writers, -1)
        return 0
    if any_empty(f, c0, c1):
        rb_add(&f.writers, -1)
        return 0
    mark_dirty(f, c0, c1)
    memcpy(f.data + off, src, n)
    mark_dirty(f, c0, c1)
    rb_addu(&f.fast_writes, 1)
    rb_add(&f.writers, -1)
    return 1


cdef int rb_fast_read(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out, int room) noexcept nogil:
    return 0 if rb_read(<RbFast *>d.state, off, buf, n) else FAST_DECLINE


cdef int rb_fast_write(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out, int room) noexcept nogil:
    return 0 if rb_write(<RbFast *>d.state, off, buf, n, fua) else FAST_DECLINE


# ---- the store's memory -------------------------------------------------------

cdef class Mapping:
    """A shared mapping of `size` bytes of fd (fd -1: anonymous, for tests); a writable buffer.
    The memory stays mapped while anything (a memoryview, a ChunkState) refers to this."""

    def __cinit__(self, int fd, uint64_t size):
        cdef void *p
        if size == 0:
            raise ValueError("cannot map 0 bytes")
        with nogil:
            if fd < 0:
                p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
            else:
                # populated at once: no page fault per 4 KiB on the first touch, by a flush's pwrite
                # (which would fault the whole store in page by page) or by the fast path
                p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)
        if p == MAP_FAILED:
            import os
            raise OSError(errno, f"mmap of {size} bytes failed: {os.strerror(errno)}")
        self.addr = <char *>p
        self.size = size

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.size)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        self.shape[0] = <Py_ssize_t>self.size
        self.strides[0] = 1
        buffer.buf = self.addr
        buffer.obj = self
        buffer.len = <Py_ssize_t>self.size
        buffer.readonly = 0
        buffer.itemsize = 1
        buffer.format = "B"
        buffer.ndim = 1
        buffer.shape = self.shape
        buffer.strides = self.strides
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer *buffer):
        pass

    def sync(self, uint64_t offset=0, uint64_t length=0):
        """msync a page-aligned range (all by default): for stores on pmem or a disk file."""
        if length == 0:
            length = self.size - offset
        with nogil:
            msync(self.addr + offset, length, MS_SYNC)


cdef class ChunkState:
    """The states of `nchunks` chunks at `state_offset` of a Mapping, the data at
    `data_offset`; `length` bytes of segment, chunks of 1 << shift bytes."""

    def __cinit__(self, Mapping mapping, uint64_t state_offset, uint64_t data_offset, uint64_t length, int shift):
        cdef int64_t nchunks = <int64_t>((length + (1 << shift) - 1) >> shift)
        if shift < 9 or shift > 30:
            raise ValueError("chunk shift out of range")
        if state_offset + nchunks > data_offset or data_offset + (<uint64_t>nchunks << shift) > mapping.size:
            raise ValueError("the mapping is too small for this layout")
        self.mapping = mapping
        memset(&self.f, 0, sizeof(RbFast))
        self.f.data = mapping.addr + data_offset
        self.f.state = <uint8_t *>(mapping.addr + state_offset)
        self.f.length = length
        self.f.nchunks = nchunks
        self.f.shift = shift
        self.f.ngroups = (nchunks + GROUP_MASK) >> GROUP_SHIFT
        self.f.groups = <uint32_t *>calloc(self.f.ngroups * 4, sizeof(uint32_t))
        if self.f.groups == NULL:
            raise MemoryError()
        self.f.limit_chunks = nchunks
        self.f.wake_fd = -1
        self.recount()

    def __dealloc__(self):
        free(self.f.groups)

    def fast_ops(self):
        """The fast-path descriptor (fastops.pxd) serving loaded chunks from RAM. It serves a
        request whole or declines it before touching anything, and only alone: a request
        that also reaches another segment goes to the slow path, so none is left half done."""
        cdef FastOps ops = FastOps.__new__(FastOps)
        ops.desc.read = rb_fast_read
        ops.desc.write = rb_fast_write
        ops.desc.state = &self.f
        ops.desc.fd = -1
        ops.desc.align = 1
        ops.desc.alone = 1
        ops.owner = self
        return ops

    # attaching

    def recount(self):
        """Rebuild the counts from the state bytes, turning FLUSHING (a flush the previous
        run did not finish) and any byte that is no state into DIRTY. Returns how many
        FLUSHING chunks there were. Only while nothing else uses this state."""
        cdef int64_t c, g, flushing = 0
        cdef uint8_t s
        with nogil:
            memset(self.f.groups, 0, self.f.ngroups * 4 * sizeof(uint32_t))
            memset(self.f.count, 0, sizeof(self.f.count))
            for c in range(self.f.nchunks):
                s = self.f.state[c]
                if s > CS_DIRTY:
                    if s == CS_FLUSHING:
                        flushing += 1
                    s = CS_DIRTY
                    self.f.state[c] = s
                self.f.groups[(c >> GROUP_SHIFT) * 4 + s] += 1
                self.f.count[s] += 1
        return flushing

    def reset(self, int state=CS_EMPTY):
        """Every chunk to `state` (a fresh store). Only while nothing else uses this state."""
        with nogil:
            memset(self.f.state, state, self.f.nchunks)
        self.recount()

    # the counters

    @property
    def nchunks(self):
        return self.f.nchunks

    @property
    def chunk_size(self):
        return 1 << self.f.shift

    @property
    def length(self):
        return self.f.length

    def count(self, int state):
        return rb_load(&self.f.count[state])

    def counts(self):
        return [rb_load(&self.f.count[s]) for s in range(4)]

    @property
    def fast_reads(self):
        return self.f.fast_reads

    @property
    def fast_writes(self):
        return self.f.fast_writes

    @property
    def limit_chunks(self):
        return self.f.limit_chunks

    @limit_chunks.setter
    def limit_chunks(self, int64_t n):
        self.f.limit_chunks = n if n > 1 else 1

    @property
    def fua_ok(self):
        return bool(self.f.fua_ok)

    @fua_ok.setter
    def fua_ok(self, bint ok):
        rb_store_int(&self.f.fua_ok, ok)

    @property
    def write_ok(self):
        return bool(rb_load_int(&self.f.write_ok))

    def set_wake_fd(self, int fd):
        self.f.wake_fd = fd

    def enable_writes(self):
        rb_store_int(&self.f.write_ok, 1)

    def disable_writes(self):
        """Turn the fast write path off and wait until no fast write is in progress."""
        with nogil:
            rb_store_int(&self.f.write_ok, 0)
            while rb_load(&self.f.writers) != 0:
                usleep(100)

    # states

    def state(self, int64_t c):
        return rb_load8(&self.f.state[c])

    def states(self, int64_t c0, int64_t c1):
        return bytes([rb_load8(&self.f.state[c]) for c in range(c0, c1)])

    def any_empty(self, int64_t c0, int64_t c1):
        cdef int r
        self._check(c0, c1)
        with nogil:
            r = any_empty(&self.f, c0, c1)
        return bool(r)

    def count_range(self, int64_t c0, int64_t c1, int mask):
        """How many chunks of [c0, c1) have a state in `mask` (1 << state bits)."""
        cdef int64_t c, n = 0
        self._check(c0, c1)
        with nogil:
            for c in range(c0, c1):
                if (1 << rb_load8(&self.f.state[c])) & mask:
                    n += 1
        return n

    def mark_dirty(self, int64_t c0, int64_t c1):
        cdef int64_t n
        self._check(c0, c1)
        with nogil:
            n = mark_dirty(&self.f, c0, c1)
        return n

    def begin_flush(self, int64_t c0, int64_t c1):
        """DIRTY -> FLUSHING for the chunks of [c0, c1) that are DIRTY. Returns how many."""
        cdef int64_t c, n = 0
        self._check(c0, c1)
        with nogil:
            for c in range(c0, c1):
                n += trans(&self.f, c, CS_DIRTY, CS_FLUSHING)
        return n

    def end_flush(self, int64_t c0, int64_t c1, bint ok):
        """FLUSHING -> CLEAN (ok) or DIRTY (the write failed) for [c0, c1). A chunk a write
        re-dirtied meanwhile is DIRTY already and stays so. Returns how many became CLEAN."""
        cdef int64_t c, n = 0
        self._check(c0, c1)
        with nogil:
            for c in range(c0, c1):
                if trans(&self.f, c, CS_FLUSHING, CS_CLEAN if ok else CS_DIRTY) and ok:
                    n += 1
        return n

    def install(self, int64_t c0, int64_t c1, const unsigned char[::1] src=None):
        """Copy the chunks of [c0, c1) that are still EMPTY from `src` (backing's bytes of
        exactly that range) and mark them CLEAN; src None: backing's bytes were read straight
        into the store, only mark them. The caller holds the range lock, so no write can turn
        one of them DIRTY in between. Returns how many chunks it installed."""
        cdef int64_t c, n = 0
        cdef uint64_t pos, clen, base = <uint64_t>c0 << self.f.shift
        cdef bint copy = src is not None
        self._check(c0, c1)
        if copy and <uint64_t>src.shape[0] < min(<uint64_t>c1 << self.f.shift, self.f.length) - base:
            raise ValueError("install: the buffer is shorter than the range")
        with nogil:
            for c in range(c0, c1):
                if rb_load8(&self.f.state[c]) != CS_EMPTY:
                    continue
                if copy:
                    pos = <uint64_t>c << self.f.shift
                    clen = 1 << self.f.shift
                    if pos + clen > self.f.length:
                        clen = self.f.length - pos
                    memcpy(self.f.data + pos, &src[0] + (pos - base), clen)
                n += trans(&self.f, c, CS_EMPTY, CS_CLEAN)
        return n

    def next_run(self, int64_t pos, int64_t end, int mask, int64_t maxn=1 << 30, int64_t gap=0):
        """(start, end) of the first run at or after `pos` (before `end`) of chunks whose state
        is in `mask`, bridging at most `gap` CLEAN chunks in a row, at most `maxn` long; None
        if there is none."""
        cdef int64_t start, stop = -1
        if end > self.f.nchunks:
            end = self.f.nchunks
        if pos < 0:
            pos = 0
        with nogil:
            start = find_first(&self.f, pos, end, mask)
            if start >= 0:
                stop = run_end(&self.f, start, end, mask, maxn if maxn > 0 else 1, gap)
        return None if start < 0 else (start, stop)

    # data

    def copy_in(self, uint64_t off, const unsigned char[::1] src):
        cdef uint64_t n = src.shape[0]
        if off + n > self.f.length:
            raise ValueError("copy_in past the end")
        if n:
            with nogil:
                memcpy(self.f.data + off, &src[0], n)

    def zero(self, uint64_t off, uint64_t n):
        if off + n > self.f.length:
            raise ValueError("zero past the end")
        with nogil:
            memset(self.f.data + off, 0, n)

    def copy_out(self, uint64_t off, unsigned char[::1] dst):
        cdef uint64_t n = dst.shape[0]
        if off + n > self.f.length:
            raise ValueError("copy_out past the end")
        if n:
            with nogil:
                memcpy(&dst[0], self.f.data + off, n)

    def fast_read(self, uint64_t off, unsigned char[::1] dst):
        """The NBD loop's read, callable from Python (tests)."""
        cdef int r
        with nogil:
            r = rb_read(&self.f, off, <char *>&dst[0], dst.shape[0])
        return bool(r)

    def fast_write(self, uint64_t off, const unsigned char[::1] src, bint fua=False):
        """The NBD loop's write, callable from Python (tests)."""
        cdef int r
        with nogil:
            r = rb_write(&self.f, off, <const char *>&src[0], src.shape[0], fua)
        return bool(r)

    cdef _check(self, int64_t c0, int64_t c1):
        if c0 < 0 or c1 > self.f.nchunks or c0 > c1:
            raise IndexError(f"chunk range {c0}..{c1} outside 0..{self.f.nchunks}")
