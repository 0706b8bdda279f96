# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A mirror's regions that writes may reach without the GIL, its fast-path write, and its
fast-path read of the regions in sync.

The Python region hash (targets/mirror/regions.py) owns the dirty-region log. It *grants* a
region here once the region's mark is durable on the log; from then on a client write that
lies in granted regions is fanned out by the NBD loop itself: one engine piece per leg, the
same buffer to every leg's fd, answered when all are done (fastops.pxd: several pieces of one
write, write_done, errors_slow). Everything else declines to the slow path: a region not
granted (its mark is not durable yet, it is being resynced, it was cleared), FUA, a leg that
is dead (`enabled` off), and any write a leg failed (errors_slow: Python writes it again and
fails the leg).

Reads: a region the Python side says is in sync on every leg (`set_in_sync`) is read by the
NBD loop from one leg, the one with the fewest fast reads in flight, the primary first among
equals (as the slow path balances). It declines while a leg is dead (`enabled` off), and a
read a leg failed goes to the slow path whole (errors_slow), which retries it on another leg
and repairs the one that failed. A region goes out of sync (`set_in_sync(r, False)`) before
the Python side changes its state (a leg missed a write, a read there failed, a resync or a
verify takes it); a read changes nothing, so one still in flight then is one that raced the
event that put the region out of sync, as it could on the slow path, and nothing waits for it.

A region leaves the map only by `revoke` (or `sweep`, which revokes idle ones), which waits
until no fast write is in flight there: after it, the Python side alone decides about the
region again (clear its mark after a flush of the legs, resync it). So a write reaches a leg
only while its region's mark is durable, exactly as on the slow path.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from appliance._fast.sync cimport (pthread_mutex_t, pthread_cond_t, pthread_mutex_init,
    pthread_mutex_lock, pthread_mutex_unlock, pthread_cond_init, pthread_cond_wait,
    pthread_cond_broadcast)
from appliance._fast.fastops cimport FAST_DECLINE, FastDesc, FastOps, FdPiece

DEF MAX_LEGS = 8


cdef struct LegC:
    int fd
    uint64_t offset
    int buffered


cdef struct RegionC:
    pthread_mutex_t lock
    pthread_cond_t idle      # a region's fast writes reached zero (a revoke waits for it)
    uint64_t region_size
    uint64_t count
    uint8_t *granted         # 1: the region's mark is durable; fast writes may go
    uint8_t *touched         # a fast write ended there since the last sweep
    uint32_t *pending        # fast writes in flight
    int waiters
    int enabled              # every leg is alive
    int nlegs
    LegC legs[MAX_LEGS]
    uint64_t writes          # fast writes done
    uint64_t failed          # fast writes a leg failed (handed to the slow path)
    uint8_t *in_sync         # 1: equal on every leg; fast reads may go
    int primary              # the leg reads prefer among equals
    uint32_t reading[MAX_LEGS]   # fast reads in flight per leg
    uint64_t leg_reads[MAX_LEGS] # fast reads served per leg
    uint64_t reads_failed    # fast reads a leg failed (handed to the slow path)


cdef int mirror_write(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out,
                      int room) noexcept nogil:
    cdef RegionC *s = <RegionC *>d.state
    cdef uint64_t r, r0 = off / s.region_size, r1 = (off + n - 1) / s.region_size
    cdef int i
    if fua or room < s.nlegs:  # FUA: the slow path (an fdatasync error must fail the leg)
        return FAST_DECLINE
    pthread_mutex_lock(&s.lock)
    if not s.enabled:
        pthread_mutex_unlock(&s.lock)
        return FAST_DECLINE
    for r in range(r0, r1 + 1):
        if not s.granted[r]:
            pthread_mutex_unlock(&s.lock)
            return FAST_DECLINE
    for r in range(r0, r1 + 1):
        s.pending[r] += 1
    pthread_mutex_unlock(&s.lock)
    for i in range(s.nlegs):
        out[i].fd = s.legs[i].fd
        out[i].off = s.legs[i].offset + off
        out[i].len = n
        out[i].buf = buf
        out[i].buffered = s.legs[i].buffered
    return s.nlegs


cdef void mirror_write_done(FastDesc *d, uint64_t off, uint64_t n, int err) noexcept nogil:
    cdef RegionC *s = <RegionC *>d.state
    cdef uint64_t r, r0 = off / s.region_size, r1 = (off + n - 1) / s.region_size
    cdef int wake = 0
    pthread_mutex_lock(&s.lock)
    for r in range(r0, r1 + 1):
        s.pending[r] -= 1
        s.touched[r] = 1
        wake = wake or s.pending[r] == 0
    if err:
        s.failed += 1
    else:
        s.writes += 1
    if wake and s.waiters:
        pthread_cond_broadcast(&s.idle)
    pthread_mutex_unlock(&s.lock)


cdef int mirror_read(FastDesc *d, uint64_t off, char *buf, uint64_t n, int fua, FdPiece *out,
                     int room) noexcept nogil:
    cdef RegionC *s = <RegionC *>d.state
    cdef uint64_t r, r0 = off / s.region_size, r1 = (off + n - 1) / s.region_size
    cdef int i, best
    if room < 1:
        return FAST_DECLINE
    pthread_mutex_lock(&s.lock)
    if not s.enabled:
        pthread_mutex_unlock(&s.lock)
        return FAST_DECLINE
    for r in range(r0, r1 + 1):
        if not s.in_sync[r]:
            pthread_mutex_unlock(&s.lock)
            return FAST_DECLINE
    best = s.primary
    for i in range(s.nlegs):
        if s.reading[i] < s.reading[best]:
            best = i
    s.reading[best] += 1
    pthread_mutex_unlock(&s.lock)
    out[0].fd = s.legs[best].fd
    out[0].off = s.legs[best].offset + off
    out[0].len = n
    out[0].buf = buf
    out[0].buffered = s.legs[best].buffered
    return 1


cdef void mirror_read_done(FastDesc *d, uint64_t off, uint64_t n, int fd, int err) noexcept nogil:
    cdef RegionC *s = <RegionC *>d.state
    cdef int i
    pthread_mutex_lock(&s.lock)
    for i in range(s.nlegs):  # two legs on one fd (one file, two offsets) share the count
        if s.legs[i].fd == fd and s.reading[i]:
            s.reading[i] -= 1
            if err:
                s.reads_failed += 1
            else:
                s.leg_reads[i] += 1
            break
    pthread_mutex_unlock(&s.lock)


cdef class RegionMap:
    """The regions granted to the fast path, and the descriptor that writes them.

    legs: [(fd, offset, buffered)], every leg of the mirror, in order."""

    cdef RegionC c

    def __cinit__(self, uint64_t region_size, uint64_t count, legs):
        cdef int i
        if not 0 < len(legs) <= MAX_LEGS:
            raise ValueError(f"a fast mirror write has 1 to {MAX_LEGS} legs")
        pthread_mutex_init(&self.c.lock, NULL)
        pthread_cond_init(&self.c.idle, NULL)
        self.c.region_size = region_size
        self.c.count = count
        self.c.granted = <uint8_t *>calloc(count, 1)
        self.c.touched = <uint8_t *>calloc(count, 1)
        self.c.pending = <uint32_t *>calloc(count, sizeof(uint32_t))
        self.c.in_sync = <uint8_t *>calloc(count, 1)  # none until the mirror says so
        if (self.c.granted == NULL or self.c.touched == NULL or self.c.pending == NULL
                or self.c.in_sync == NULL):
            raise MemoryError()
        self.c.nlegs = len(legs)
        for i in range(self.c.nlegs):
            fd, offset, buffered = legs[i]
            self.c.legs[i].fd = fd
            self.c.legs[i].offset = offset
            self.c.legs[i].buffered = 1 if buffered else 0
        self.c.enabled = 1

    def __dealloc__(self):
        free(self.c.granted)
        free(self.c.touched)
        free(self.c.pending)
        free(self.c.in_sync)

    def fast_ops(self, uint32_t align):
        """The fast-path descriptor (reads and writes; FLUSH stays on the slow path). The
        owner keeps this map alive as long as the descriptor is in a gate."""
        cdef FastOps ops = FastOps.__new__(FastOps)
        ops.desc.read = mirror_read
        ops.desc.read_done = mirror_read_done
        ops.desc.write = mirror_write
        ops.desc.write_done = mirror_write_done
        ops.desc.errors_slow = 1
        ops.desc.alone = 1
        ops.desc.state = &self.c
        ops.desc.fd = -1
        ops.desc.align = align
        ops.owner = self
        return ops

    def grant(self, uint64_t r):
        """Region r's mark is durable: writes there may take the fast path."""
        if r >= self.c.count:
            raise IndexError(r)
        pthread_mutex_lock(&self.c.lock)
        self.c.granted[r] = 1
        self.c.touched[r] = 1  # kept for a whole sweep at least
        pthread_mutex_unlock(&self.c.lock)

    def is_granted(self, uint64_t r):
        return r < self.c.count and self.c.granted[r] != 0

    def revoke(self, uint64_t r):
        """Take region r back and wait until no fast write is in flight there. True if it was
        granted."""
        cdef int was
        if r >= self.c.count:
            raise IndexError(r)
        with nogil:
            pthread_mutex_lock(&self.c.lock)
            was = self.c.granted[r]
            self.c.granted[r] = 0
            self.c.touched[r] = 0
            self.c.waiters += 1
            while self.c.pending[r]:
                pthread_cond_wait(&self.c.idle, &self.c.lock)
            self.c.waiters -= 1
            pthread_mutex_unlock(&self.c.lock)
        return bool(was)

    def sweep(self):
        """Revoke the granted regions no fast write reached since the last sweep (and none is
        in flight on); returns them. The others are kept, their `touched` reset."""
        cdef uint64_t r
        out = []
        pthread_mutex_lock(&self.c.lock)
        for r in range(self.c.count):
            if self.c.granted[r]:
                if self.c.touched[r] or self.c.pending[r]:
                    self.c.touched[r] = 0
                else:
                    self.c.granted[r] = 0
                    out.append(r)
        pthread_mutex_unlock(&self.c.lock)
        return out

    def revoke_all(self):
        """Every granted region taken back (none may be in flight: the device is idle)."""
        cdef uint64_t r
        out = [r for r in range(self.c.count) if self.c.granted[r]]
        for r in out:
            self.revoke(r)
        return out

    def set_in_sync(self, uint64_t r, bint in_sync):
        """Region r is equal on every leg (fast reads may go there), or no longer: then no new
        fast read starts there (one in flight raced what made it so; see the module's doc)."""
        if r >= self.c.count:
            raise IndexError(r)
        pthread_mutex_lock(&self.c.lock)
        self.c.in_sync[r] = 1 if in_sync else 0
        pthread_mutex_unlock(&self.c.lock)

    def is_in_sync(self, uint64_t r):
        return r < self.c.count and self.c.in_sync[r] != 0

    @property
    def primary(self):
        return self.c.primary

    @primary.setter
    def primary(self, int leg):
        """The leg fast reads go to when the legs have as many in flight (set_primary)."""
        if not 0 <= leg < self.c.nlegs:
            raise IndexError(leg)
        pthread_mutex_lock(&self.c.lock)
        self.c.primary = leg
        pthread_mutex_unlock(&self.c.lock)

    @property
    def leg_reads(self):
        """Fast reads each leg served."""
        return [self.c.leg_reads[i] for i in range(self.c.nlegs)]

    @property
    def reads_failed(self):
        return self.c.reads_failed

    @property
    def enabled(self):
        return bool(self.c.enabled)

    @enabled.setter
    def enabled(self, value):
        """Off: new writes and reads decline (a leg is dead: the slow path marks what it
        misses, and reads only the legs that live)."""
        pthread_mutex_lock(&self.c.lock)
        self.c.enabled = 1 if value else 0
        pthread_mutex_unlock(&self.c.lock)

    @property
    def writes(self):
        return self.c.writes

    @property
    def failed(self):
        return self.c.failed
