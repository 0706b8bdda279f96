# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The gate every request of a mapped device passes, and its fast map.

Suspend closes the gate: new requests are deferred (kept, not failed) and the
suspender waits for the in-flight count to reach zero. Resume opens it and
hands the deferred requests back to be mapped against the new table.

The fast map is a flat copy of the live table for the targets that are plain
offsets onto an open file (linear over a file or disk, zero). The NBD
transmission loop serves requests that fall entirely inside it without the
GIL. The map is only replaced while the gate is closed and idle, so a request
that got in keeps a valid map until it leaves.
"""

from libc.stdlib cimport malloc, free
from appliance._fast.sync cimport (pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_wait, pthread_cond_broadcast)
from appliance._fast.chunkstate cimport ChunkState


cdef class Gate:
    def __cinit__(self):
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.idle, NULL)
        self.segs = NULL
        self.nsegs = 0
        self.deferred = []
        self.keep = []

    def __dealloc__(self):
        if self.segs != NULL:
            free(self.segs)

    cdef int fast_enter(self, uint64_t offset, uint64_t length) noexcept nogil:
        """Let a request in on the fast path: 1 if [offset, offset+length) lies in fast
        segments and the gate is open, else 0 (the caller takes the slow path)."""
        cdef int lo = 0, hi = self.nsegs - 1, mid, i
        cdef uint64_t end = offset + length, pos, n
        pthread_mutex_lock(&self.lock)
        if self.suspended or self.nsegs == 0:
            pthread_mutex_unlock(&self.lock)
            return 0
        while lo < hi:  # the last segment starting at or before offset
            mid = (lo + hi + 1) >> 1
            if self.segs[mid].start <= offset:
                lo = mid
            else:
                hi = mid - 1
        i = lo
        pos = offset
        while pos < end:
            if i >= self.nsegs or self.segs[i].kind == FAST_NONE or self.segs[i].start > pos:
                pthread_mutex_unlock(&self.lock)
                return 0
            # the piece in this segment is one pread/pwrite: O_DIRECT wants its file offset,
            # its length and its place in the (page-aligned) buffer aligned
            n = (self.segs[i].end if self.segs[i].end < end else end) - pos
            if ((self.segs[i].fd_offset + pos - self.segs[i].start) | n | (pos - offset)) & (self.segs[i].align - 1):
                pthread_mutex_unlock(&self.lock)
                return 0
            pos = self.segs[i].end
            i += 1
        self.inflight += 1
        self.fast_ios += 1
        pthread_mutex_unlock(&self.lock)
        return 1

    cdef void exit(self) noexcept nogil:
        pthread_mutex_lock(&self.lock)
        self.inflight -= 1
        if self.inflight == 0:
            pthread_cond_broadcast(&self.idle)
        pthread_mutex_unlock(&self.lock)

    # the slow path, from Python

    def enter_or_defer(self, io):
        """True: the request may proceed (call leave() when done). False: the device is
        suspended and the request was kept for resume()."""
        pthread_mutex_lock(&self.lock)
        if self.suspended:
            self.deferred.append(io)
            pthread_mutex_unlock(&self.lock)
            return False
        self.inflight += 1
        pthread_mutex_unlock(&self.lock)
        return True

    def leave(self):
        with nogil:
            self.exit()

    def probe(self, uint64_t offset, uint64_t length):
        """For tests: would the fast path take [offset, offset+length)? (fast_enter, then exit)"""
        cdef int r
        with nogil:
            r = self.fast_enter(offset, length)
            if r:
                self.exit()
        return bool(r)

    def defer(self, io):
        """Keep a request that went through the gate and must wait for resume (a requeue)."""
        pthread_mutex_lock(&self.lock)
        self.deferred.append(io)
        self.inflight -= 1
        if self.inflight == 0:
            pthread_cond_broadcast(&self.idle)
        pthread_mutex_unlock(&self.lock)

    def close(self):
        pthread_mutex_lock(&self.lock)
        self.suspended = 1
        pthread_mutex_unlock(&self.lock)

    def wait_idle(self):
        with nogil:
            pthread_mutex_lock(&self.lock)
            while self.inflight > 0:
                pthread_cond_wait(&self.idle, &self.lock)
            pthread_mutex_unlock(&self.lock)

    def open(self):
        """Open the gate and return the requests deferred while it was closed."""
        pthread_mutex_lock(&self.lock)
        self.suspended = 0
        deferred, self.deferred = self.deferred, []
        pthread_mutex_unlock(&self.lock)
        return deferred

    def set_fastmap(self, segments):
        """segments: [(start, end, kind, fd, fd_offset, align[, ChunkState])] sorted, in bytes.
        FAST_RAMBACK segments carry the ChunkState they serve from. Only while closed and idle."""
        cdef FastSeg *segs = NULL
        cdef int i, n = len(segments)
        cdef list keep = []
        if n:
            segs = <FastSeg *>malloc(n * sizeof(FastSeg))
            if segs == NULL:
                raise MemoryError()
            for i, seg in enumerate(segments):
                start, end, kind, fd, fd_offset, align = seg[:6]
                segs[i].ram = NULL
                if kind == FAST_RAMBACK:
                    if len(seg) < 7 or not isinstance(seg[6], ChunkState):
                        free(segs)
                        raise ValueError("a FAST_RAMBACK segment needs its ChunkState")
                    segs[i].ram = (<ChunkState>seg[6]).fast()
                    keep.append(seg[6])
                if align < 1 or (align & (align - 1)):
                    free(segs)
                    raise ValueError(f"alignment {align} is not a power of two")
                segs[i].start = start
                segs[i].end = end
                segs[i].kind = kind
                segs[i].fd = fd
                segs[i].fd_offset = fd_offset
                segs[i].align = align
        pthread_mutex_lock(&self.lock)
        if not self.suspended or self.inflight:
            pthread_mutex_unlock(&self.lock)
            free(segs)
            raise RuntimeError("the fast map is replaced only while suspended and idle")
        if self.segs != NULL:
            free(self.segs)
        self.segs = segs
        self.nsegs = n
        self.keep = keep
        pthread_mutex_unlock(&self.lock)

    @property
    def in_flight(self):
        return self.inflight

    @property
    def is_suspended(self):
        return bool(self.suspended)

    @property
    def deferred_count(self):
        return len(self.deferred)
