# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The gate every request of a mapped device passes, and its fast map.

Suspend closes the gate: new requests are deferred (kept, not failed) and the
suspender waits for the in-flight count to reach zero. Resume opens it and
hands the deferred requests back to be mapped against the new table.

The fast map is a flat copy of the live table: for each segment whose target
offers a fast-path descriptor (fastops.pxd), the descriptor. The NBD
transmission loop looks a request up here once (fast_enter) and serves it
through the descriptors without the GIL. The map is only replaced while the
gate is closed and idle, so a request that got in keeps a valid map until it
leaves.
"""

from libc.stdlib cimport calloc, free
from appliance._fast.sync cimport (pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_wait, pthread_cond_broadcast)
from appliance._fast.fastops cimport FastOps


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
        """Let a request in on the fast path: the index of the segment holding `offset` if
        [offset, offset+length) lies in fast segments and the gate is open, else -1 (the
        caller takes the slow path). From here to exit() the map cannot change. This is the
        one place the map is searched."""
        cdef int lo = 0, hi = self.nsegs - 1, mid, i
        cdef uint64_t end = offset + length, pos, n
        cdef FastSeg *seg
        pthread_mutex_lock(&self.lock)
        if self.suspended or self.nsegs == 0:
            pthread_mutex_unlock(&self.lock)
            return -1
        while lo < hi:  # the last segment starting at or before offset
            mid = (lo + hi + 1) >> 1
            if self.segs[mid].start <= offset:
                lo = mid
            else:
                hi = mid - 1
        i = lo
        pos = offset
        while pos < end:
            if i >= self.nsegs or not self.segs[i].fast or self.segs[i].start > pos:
                pthread_mutex_unlock(&self.lock)
                return -1
            seg = &self.segs[i]
            # a descriptor that may decline after acting serves requests inside it only
            if seg.desc.alone and (pos != offset or seg.end < end):
                pthread_mutex_unlock(&self.lock)
                return -1
            # O_DIRECT wants each piece's file offset, length and place in the
            # (page-aligned) buffer aligned
            n = (seg.end if seg.end < end else end) - pos
            if ((seg.desc.fd_offset + pos - seg.start) | n | (pos - offset)) & (seg.desc.align - 1):
                pthread_mutex_unlock(&self.lock)
                return -1
            pos = seg.end
            i += 1
        self.inflight += 1
        self.fast_ios += 1
        pthread_mutex_unlock(&self.lock)
        return lo

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
            if r >= 0:
                self.exit()
        return r >= 0

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
        """segments: [(start, end, FastOps or None)] sorted, in bytes (None: the slow path
        serves it). Only while closed and idle."""
        cdef FastSeg *segs = NULL
        cdef int i, n = len(segments)
        cdef list keep = []
        if n:
            segs = <FastSeg *>calloc(n, sizeof(FastSeg))
            if segs == NULL:
                raise MemoryError()
            for i, (start, end, ops) in enumerate(segments):
                segs[i].start = start
                segs[i].end = end
                if ops is not None:
                    segs[i].fast = 1
                    segs[i].desc = (<FastOps?>ops).desc
                    keep.append(ops)
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
