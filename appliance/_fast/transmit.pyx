# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The NBD transmission phase: one loop per connection, without the GIL.

The loop reads request headers in batches, checks each one the way the spec
asks (range, size, flags, read-only), and serves what the gate's fast map
covers (plain reads and writes of files and disks) with pread/pwrite and a
gathered send. Everything else goes to `dispatch` in Python, which maps it
through the target stack and replies later, from whatever thread completes
it, through the reply methods here. Replies on one connection are
serialized by `send_lock`, so a reply is never interleaved with another.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset, memmove
from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EINTR, EAGAIN, EIO, EINVAL, ENOSPC, EPERM, ENOMEM, EOVERFLOW
from posix.unistd cimport pread, pwrite, fdatasync
from posix.uio cimport iovec
from appliance._fast.sync cimport (pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_wait, pthread_cond_broadcast)
from appliance._fast.gate cimport Gate, FastSeg, FAST_FD, FAST_ZERO, FAST_RAMBACK
from appliance._fast.chunkstate cimport rb_read, rb_write

cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)
    uint64_t be64toh(uint64_t)
    uint16_t htobe16(uint16_t)
    uint32_t htobe32(uint32_t)
    uint64_t htobe64(uint64_t)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **, size_t, size_t)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t recv(int, void *, size_t, int)
    ssize_t sendmsg(int, const msghdr *, int)
    int MSG_NOSIGNAL
    int MSG_WAITALL
    int MSG_DONTWAIT

DEF REQUEST_MAGIC = 0x25609513
DEF SIMPLE_REPLY_MAGIC = 0x67446698
DEF STRUCTURED_REPLY_MAGIC = 0x668e33ef
DEF HEADER = 28
DEF RBUF = 65536
# A write longer than this is not even read to be discarded: the stream is
# hostile or broken, and the connection is closed.
DEF HARD_MAX = 64 * 1024 * 1024
# Replies queued for a client that does not read them are capped: past this
# the client is dropped rather than the daemon's memory filled.
DEF QUEUE_MAX = 256 * 1024 * 1024

DEF CMD_READ = 0
DEF CMD_WRITE = 1
DEF CMD_DISC = 2
DEF CMD_FLUSH = 3
DEF CMD_TRIM = 4
DEF CMD_CACHE = 5
DEF CMD_WRITE_ZEROES = 6
DEF CMD_BLOCK_STATUS = 7

DEF F_FUA = 1
DEF F_NO_HOLE = 2
DEF F_DF = 4
DEF F_REQ_ONE = 8
DEF F_FAST_ZERO = 16

DEF REPLY_FLAG_DONE = 1
DEF REPLY_TYPE_OFFSET_DATA = 1
DEF REPLY_TYPE_ERROR = 32769

# NBD's error numbers
DEF NBD_EPERM = 1
DEF NBD_EIO = 5
DEF NBD_ENOMEM = 12
DEF NBD_EINVAL = 22
DEF NBD_ENOSPC = 28
DEF NBD_EOVERFLOW = 75
DEF NBD_ENOTSUP = 95
DEF NBD_ESHUTDOWN = 108


cpdef int nbd_errno(int e) noexcept nogil:
    """Map a host errno onto the few values the protocol carries."""
    if e == 0:
        return 0
    if e == 1 or e == 30:  # EPERM, EROFS
        return NBD_EPERM
    if e == 12:
        return NBD_ENOMEM
    if e == 22:
        return NBD_EINVAL
    if e == 28 or e == 122 or e == 27:  # ENOSPC, EDQUOT, EFBIG
        return NBD_ENOSPC
    if e == 75:
        return NBD_EOVERFLOW
    if e == 95:
        return NBD_ENOTSUP
    if e == 108:
        return NBD_ESHUTDOWN
    return NBD_EIO


cdef inline void put16(char *p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)

cdef inline void put32(char *p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)

cdef inline void put64(char *p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)


cdef inline int consumed(iovec **iovp, int n, size_t sent) noexcept nogil:
    """Drop `sent` bytes off the front of an iovec array after a short send; returns the
    entries left (the first one trimmed)."""
    cdef iovec *iov = iovp[0]
    while n > 0 and sent >= iov[0].iov_len:
        sent -= iov[0].iov_len
        iov += 1
        n -= 1
    if n > 0:
        iov[0].iov_base = <char *>iov[0].iov_base + sent
        iov[0].iov_len -= sent
    iovp[0] = iov
    return n


cdef class Connection:
    """One client in transmission phase. `dispatch(conn, cmd, flags, cookie, offset, length, payload)`
    is called with the GIL for everything the fast path does not serve, and must
    arrange exactly one reply through reply()/reply_read()/reply_error()/send_raw()."""

    def __cinit__(self, int fd, Gate gate, dispatch, uint64_t size, bint read_only, bint structured,
                  uint32_t max_block=32 * 1024 * 1024, int max_inflight=64, bytes initial=b""):
        self.fd = fd
        self.gate = gate
        self.dispatch = dispatch
        self.size = size
        self.read_only = read_only
        self.structured = structured
        self.max_block = max_block
        self.max_inflight = max_inflight
        self.rcap = RBUF
        self.rbuf = <char *>malloc(RBUF)
        if self.rbuf == NULL:
            raise MemoryError()
        if len(initial) > RBUF:
            raise ValueError("too much trailing handshake data")
        memcpy(self.rbuf, <char *>initial, len(initial))
        self.rstart = 0
        self.rend = len(initial)
        self.iobuf = NULL
        self.iocap = 0
        pthread_mutex_init(&self.send_lock, NULL)
        pthread_mutex_init(&self.qlock, NULL)
        pthread_cond_init(&self.qcond, NULL)
        self.qhead = NULL
        self.qtail = NULL
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.idle, NULL)
        self.close_reason = None

    def __dealloc__(self):
        cdef OutMsg *m
        while self.qhead != NULL:
            m = self.qhead
            self.qhead = m.next
            free(m)
        free(self.rbuf)
        free(self.iobuf)

    # receiving

    cdef int fill(self, size_t need) noexcept nogil:
        """Make `need` bytes available at rbuf+rstart. 1 ok, 0 clean EOF, -1 error."""
        cdef ssize_t n
        if self.rend - self.rstart >= need:
            return 1
        if self.rstart and self.rcap - self.rstart < need:
            memmove(self.rbuf, self.rbuf + self.rstart, self.rend - self.rstart)
            self.rend -= self.rstart
            self.rstart = 0
        while self.rend - self.rstart < need:
            n = recv(self.fd, self.rbuf + self.rend, self.rcap - self.rend, 0)
            if n > 0:
                self.rend += n
            elif n == 0:
                return 0
            elif errno != EINTR:
                return -1
        return 1

    cdef int take(self, char *dst, size_t length) noexcept nogil:
        """Read `length` payload bytes into dst (dst may be NULL: discard). 1 ok, 0/-1 EOF/error."""
        cdef size_t have = self.rend - self.rstart, chunk
        cdef ssize_t n
        cdef char scratch[4096]
        if have > length:
            have = length
        if dst != NULL:
            memcpy(dst, self.rbuf + self.rstart, have)
        self.rstart += have
        length -= have
        if dst != NULL:
            dst += have
        while length:
            chunk = length
            if dst == NULL and chunk > sizeof(scratch):
                chunk = sizeof(scratch)
            n = recv(self.fd, dst if dst != NULL else scratch, chunk, MSG_WAITALL)
            if n > 0:
                length -= n
                if dst != NULL:
                    dst += n
            elif n == 0:
                return 0
            elif errno != EINTR:
                return -1
        return 1

    cdef int ensure_iobuf(self, size_t length) noexcept nogil:
        cdef void *p = NULL
        cdef size_t cap
        if length <= self.iocap:
            return 1
        cap = 65536
        while cap < length:
            cap <<= 1
        if posix_memalign(&p, 4096, cap) != 0:
            return 0
        free(self.iobuf)
        self.iobuf = <char *>p
        self.iocap = cap
        return 1

    # sending

    cdef int sendv(self, iovec *iov, int n) noexcept nogil:
        """Send one whole reply. The connection's own loop thread may block on its
        client; any other thread (a completion, a resume releasing held I/O, a
        control request) must never wait for a client that stopped reading."""
        if self.looping and pthread_equal(pthread_self(), self.loop_thread):
            # let queued replies out first, so none is cut by this one
            pthread_mutex_lock(&self.qlock)
            while (self.qhead != NULL or self.sender_busy) and not self.dead:
                pthread_cond_wait(&self.qcond, &self.qlock)
            pthread_mutex_lock(&self.send_lock)  # free: posters hold qlock, the sender is idle
            pthread_mutex_unlock(&self.qlock)
            n = self.send_blocking(iov, n)
            pthread_mutex_unlock(&self.send_lock)
            return n
        return self.post(iov, n)

    cdef int send_blocking(self, iovec *iov, int n) noexcept nogil:
        """Write all of iov; the caller holds send_lock. 0 ok, -1 the client is gone."""
        cdef msghdr msg
        cdef ssize_t sent
        if self.dead:
            return -1
        memset(&msg, 0, sizeof(msg))
        while n > 0:
            msg.msg_iov = iov
            msg.msg_iovlen = n
            sent = sendmsg(self.fd, &msg, MSG_NOSIGNAL)
            if sent < 0:
                if errno == EINTR:
                    continue
                self.dead = 1
                return -1
            n = consumed(&iov, n, sent)
        return 0

    cdef int post(self, iovec *iov, int n) noexcept nogil:
        """Send what the socket takes now, without waiting; queue the rest (or all of it,
        if replies are already queued or the socket is in use) for the sender thread."""
        cdef msghdr msg
        cdef ssize_t sent
        cdef size_t total = 0, off = 0
        cdef int i
        cdef OutMsg *m
        pthread_mutex_lock(&self.qlock)
        if self.dead:
            pthread_mutex_unlock(&self.qlock)
            return -1
        if self.qhead == NULL and not self.sender_busy and pthread_mutex_trylock(&self.send_lock) == 0:
            memset(&msg, 0, sizeof(msg))
            while n > 0:
                msg.msg_iov = iov
                msg.msg_iovlen = n
                sent = sendmsg(self.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
                if sent < 0:
                    if errno == EINTR:
                        continue
                    if errno != EAGAIN:
                        self.dead = 1
                    break
                n = consumed(&iov, n, sent)
            pthread_mutex_unlock(&self.send_lock)
            if n == 0 or self.dead:
                pthread_mutex_unlock(&self.qlock)
                return -1 if self.dead else 0
        # copy what is left; a partly sent reply goes first (the queue is empty then)
        for i in range(n):
            total += iov[i].iov_len
        if self.qbytes + total > QUEUE_MAX:
            self.dead = 1
            pthread_cond_broadcast(&self.qcond)
            pthread_mutex_unlock(&self.qlock)
            return -1
        self.qbytes += total
        m = <OutMsg *>malloc(sizeof(OutMsg) + total)
        if m == NULL:
            self.dead = 1  # cannot keep the stream whole: drop the client
            pthread_cond_broadcast(&self.qcond)
            pthread_mutex_unlock(&self.qlock)
            return -1
        m.next = NULL
        m.length = total
        m.sent = 0
        m.data = <char *>m + sizeof(OutMsg)
        for i in range(n):
            memcpy(m.data + off, iov[i].iov_base, iov[i].iov_len)
            off += iov[i].iov_len
        if self.qtail == NULL:
            self.qhead = m
        else:
            self.qtail.next = m
        self.qtail = m
        pthread_cond_broadcast(&self.qcond)
        pthread_mutex_unlock(&self.qlock)
        return 0

    def sender(self):
        """The thread that writes queued replies, blocking on the client so nobody else does.
        Runs until the connection is closed and the queue is empty."""
        cdef OutMsg *m
        cdef iovec iov[1]
        with nogil:
            while True:
                pthread_mutex_lock(&self.qlock)
                while self.qhead == NULL and not self.closing:
                    pthread_cond_wait(&self.qcond, &self.qlock)
                m = self.qhead
                if m == NULL:
                    pthread_mutex_unlock(&self.qlock)
                    break
                self.qhead = m.next
                if self.qhead == NULL:
                    self.qtail = NULL
                self.qbytes -= m.length
                self.sender_busy = 1
                pthread_mutex_unlock(&self.qlock)
                pthread_mutex_lock(&self.send_lock)
                iov[0].iov_base = m.data
                iov[0].iov_len = m.length
                self.send_blocking(iov, 1)
                pthread_mutex_unlock(&self.send_lock)
                free(m)
                pthread_mutex_lock(&self.qlock)
                self.sender_busy = 0
                pthread_cond_broadcast(&self.qcond)
                pthread_mutex_unlock(&self.qlock)

    cdef int send_simple(self, uint64_t cookie, uint32_t error, char *data, size_t length) noexcept nogil:
        cdef char hdr[16]
        cdef iovec iov[2]
        put32(hdr, SIMPLE_REPLY_MAGIC)
        put32(hdr + 4, error)
        memcpy(hdr + 8, &cookie, 8)  # the cookie is opaque: echo its bytes
        iov[0].iov_base = hdr
        iov[0].iov_len = 16
        iov[1].iov_base = data
        iov[1].iov_len = length if not error else 0
        return self.sendv(iov, 2 if length and not error else 1)

    cdef int send_data(self, uint64_t cookie, uint64_t offset, char *data, size_t length) noexcept nogil:
        cdef char hdr[28]
        cdef iovec iov[2]
        if not self.structured:
            return self.send_simple(cookie, 0, data, length)
        put32(hdr, STRUCTURED_REPLY_MAGIC)
        put16(hdr + 4, REPLY_FLAG_DONE)
        put16(hdr + 6, REPLY_TYPE_OFFSET_DATA)
        memcpy(hdr + 8, &cookie, 8)
        put32(hdr + 16, <uint32_t>(8 + length))
        put64(hdr + 20, offset)
        iov[0].iov_base = hdr
        iov[0].iov_len = 28
        iov[1].iov_base = data
        iov[1].iov_len = length
        return self.sendv(iov, 2)

    cdef int send_error(self, uint64_t cookie, uint32_t error, bint structured_cmd) noexcept nogil:
        """An error reply: structured for READ and BLOCK_STATUS when negotiated, as the spec asks."""
        cdef char hdr[26]
        cdef iovec iov[1]
        if not (self.structured and structured_cmd):
            return self.send_simple(cookie, error, NULL, 0)
        put32(hdr, STRUCTURED_REPLY_MAGIC)
        put16(hdr + 4, REPLY_FLAG_DONE)
        put16(hdr + 6, REPLY_TYPE_ERROR)
        memcpy(hdr + 8, &cookie, 8)
        put32(hdr + 16, 6)
        put32(hdr + 20, error)
        put16(hdr + 24, 0)
        iov[0].iov_base = hdr
        iov[0].iov_len = 26
        return self.sendv(iov, 1)

    cdef void done_one(self) noexcept nogil:
        pthread_mutex_lock(&self.lock)
        self.inflight -= 1
        pthread_cond_broadcast(&self.idle)
        pthread_mutex_unlock(&self.lock)

    # replies from the slow path (Python, any thread). Each ends one request.

    def reply(self, uint64_t cookie, int error=0, bint structured_cmd=False):
        """A reply with no data: `error` is a host errno (0 for success)."""
        cdef uint32_t e = nbd_errno(error)
        with nogil:
            if e:
                self.send_error(cookie, e, structured_cmd)
            else:
                self.send_simple(cookie, 0, NULL, 0)
            self.done_one()

    def reply_read(self, uint64_t cookie, uint64_t offset, const unsigned char[::1] data):
        cdef size_t n = data.shape[0]
        cdef char *p = <char *>&data[0] if n else NULL
        with nogil:
            self.send_data(cookie, offset, p, n)
            self.done_one()

    def send_raw(self, const unsigned char[::1] data):
        """A reply the caller encoded itself (block status)."""
        cdef iovec iov[1]
        iov[0].iov_base = <void *>&data[0]
        iov[0].iov_len = data.shape[0]
        with nogil:
            self.sendv(iov, 1)
            self.done_one()

    def abort(self, reason, force=False):
        """Stop serving: the loop ends once the requests in flight are answered. With
        force, replies not yet sent are dropped too (a client that stopped reading)."""
        import socket
        if self.close_reason is None:
            self.close_reason = reason
        try:
            s = socket.socket(fileno=self.fd)  # borrowed: detach, never close it here
            try:
                s.shutdown(socket.SHUT_RDWR if force else socket.SHUT_RD)
            finally:
                s.detach()
        except OSError:
            pass

    @property
    def in_flight(self):
        return self.inflight

    # the loop

    cdef int fast(self, uint16_t cmd, uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t length) noexcept nogil:
        """Serve a read or write from the fast map. 1 served, 0 not ours (payload kept in iobuf)."""
        cdef FastSeg *seg
        cdef uint64_t pos, end, n, fo
        cdef ssize_t r
        cdef int i, err = 0, lo, hi, mid
        cdef char *p
        if not self.gate.fast_enter(offset, length):
            return 0
        # find the first segment; the map cannot change until exit()
        lo = 0
        hi = self.gate.nsegs - 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if self.gate.segs[mid].start <= offset:
                lo = mid
            else:
                hi = mid - 1
        i = lo
        pos = offset
        end = offset + length
        p = self.iobuf
        # ramback serves a request whole or declines it before touching anything (a load
        # needed, writethrough, the dirty cap): one that is not inside a single ramback
        # segment goes to the slow path, so nothing is ever left half done here
        seg = &self.gate.segs[i]
        if seg.kind == FAST_RAMBACK or (end > seg.end and self.ramback_after(i, end)):
            if end > seg.end or seg.kind != FAST_RAMBACK:
                r = 0
            elif cmd == CMD_READ:
                r = rb_read(seg.ram, offset - seg.start, p, length)
            else:
                r = rb_write(seg.ram, offset - seg.start, p, length, flags & F_FUA)
            self.gate.exit()
            if not r:
                return 0
            if cmd == CMD_READ:
                self.send_data(cookie, offset, self.iobuf, length)
            else:
                self.send_simple(cookie, 0, NULL, 0)
            return 1
        while pos < end and not err:
            seg = &self.gate.segs[i]
            n = seg.end - pos
            if n > end - pos:
                n = end - pos
            fo = seg.fd_offset + (pos - seg.start)
            if seg.kind == FAST_ZERO:
                if cmd == CMD_READ:
                    memset(p, 0, n)
            elif cmd == CMD_READ:
                while n:
                    r = pread(seg.fd, p, n, fo)
                    if r > 0:
                        p += r
                        pos += r
                        fo += r
                        n -= r
                    elif r == 0:
                        err = EIO  # the file is shorter than the table says
                        break
                    elif errno != EINTR:
                        err = errno
                        break
                i += 1
                continue
            else:
                while n:
                    r = pwrite(seg.fd, p, n, fo)
                    if r > 0:
                        p += r
                        pos += r
                        fo += r
                        n -= r
                    elif r < 0 and errno != EINTR:
                        err = errno
                        break
                if not err and flags & F_FUA and fdatasync(seg.fd) != 0:
                    err = errno
                i += 1
                continue
            p += n
            pos += n
            i += 1
        self.gate.exit()
        if err:
            self.send_error(cookie, nbd_errno(err), cmd == CMD_READ)
        elif cmd == CMD_READ:
            self.send_data(cookie, offset, self.iobuf, length)
        else:
            self.send_simple(cookie, 0, NULL, 0)
        return 1

    cdef int ramback_after(self, int i, uint64_t end) noexcept nogil:
        """1 if a segment after i that [.., end) reaches is a ramback one."""
        i += 1
        while i < self.gate.nsegs and self.gate.segs[i].start < end:
            if self.gate.segs[i].kind == FAST_RAMBACK:
                return 1
            i += 1
        return 0

    cdef int check(self, uint16_t cmd, uint16_t flags, uint64_t offset, uint32_t length) noexcept nogil:
        """The spec's checks, before any target sees the request. Returns an NBD errno or 0."""
        cdef uint16_t allowed = 0
        if cmd == CMD_READ:
            allowed = F_DF if self.structured else 0
        elif cmd == CMD_WRITE:
            allowed = F_FUA
        elif cmd == CMD_WRITE_ZEROES:
            allowed = F_FUA | F_NO_HOLE | F_FAST_ZERO
        elif cmd == CMD_TRIM:
            allowed = F_FUA
        elif cmd == CMD_BLOCK_STATUS:
            allowed = F_REQ_ONE
        if not self.read_only:
            # SEND_FUA is advertised on writable exports, and then the spec says the
            # server MUST accept FUA on every command (clients are known to set it)
            allowed |= F_FUA
        if flags & ~allowed:
            return NBD_EINVAL
        if cmd == CMD_FLUSH:
            return NBD_EINVAL if (offset or length) else 0
        if cmd > CMD_BLOCK_STATUS or cmd == CMD_DISC:
            return NBD_EINVAL
        if cmd == CMD_BLOCK_STATUS and not self.structured:
            return NBD_EINVAL
        if self.read_only and (cmd == CMD_WRITE or cmd == CMD_TRIM or cmd == CMD_WRITE_ZEROES):
            return NBD_EPERM
        if (cmd == CMD_READ or cmd == CMD_WRITE) and length > self.max_block:
            return NBD_EOVERFLOW
        if length == 0:
            return NBD_EINVAL
        if offset > self.size or length > self.size - offset:
            if cmd == CMD_WRITE or cmd == CMD_WRITE_ZEROES:
                return NBD_ENOSPC
            return NBD_EINVAL
        return 0

    def run(self):
        """Serve until the client disconnects or the stream is broken. Returns the reason."""
        cdef uint32_t magic, length, e
        cdef uint16_t flags, cmd
        cdef uint64_t cookie, offset
        cdef int rc
        cdef bint served
        cdef char *h
        cdef object reason = None
        cdef object payload
        self.loop_thread = pthread_self()
        self.looping = 1
        with nogil:
            while True:
                rc = self.fill(HEADER)
                if rc <= 0:
                    with gil:
                        reason = "client closed the connection" if rc == 0 else "receive failed"
                    break
                h = self.rbuf + self.rstart
                memcpy(&magic, h, 4)
                memcpy(&flags, h + 4, 2)
                memcpy(&cmd, h + 6, 2)
                memcpy(&cookie, h + 8, 8)
                memcpy(&offset, h + 16, 8)
                memcpy(&length, h + 24, 4)
                magic = be32toh(magic)
                flags = be16toh(flags)
                cmd = be16toh(cmd)
                offset = be64toh(offset)
                length = be32toh(length)
                self.rstart += HEADER
                if magic != REQUEST_MAGIC:
                    with gil:
                        reason = f"bad request magic 0x{magic:08x}"
                    break
                if cmd == CMD_DISC:
                    with gil:
                        reason = "client sent NBD_CMD_DISC"
                    break
                self.requests += 1
                e = self.check(cmd, flags, offset, length)
                if cmd == CMD_WRITE:
                    if length > HARD_MAX:
                        with gil:
                            reason = f"write of {length} bytes is over the hard limit; closing"
                        break
                    if e:
                        rc = self.take(NULL, length)
                    else:
                        if not self.ensure_iobuf(length):
                            e = NBD_ENOMEM
                            rc = self.take(NULL, length)
                        else:
                            rc = self.take(self.iobuf, length)
                    if rc <= 0:
                        with gil:
                            reason = "client closed the connection in the middle of a write payload"
                        break
                if e:
                    self.send_error(cookie, e, cmd == CMD_READ or cmd == CMD_BLOCK_STATUS)
                    continue
                served = 0
                if cmd == CMD_READ:
                    if not self.ensure_iobuf(length):
                        self.send_error(cookie, NBD_ENOMEM, 1)
                        continue
                    served = self.fast(cmd, flags, cookie, offset, length)
                elif cmd == CMD_WRITE:
                    served = self.fast(cmd, flags, cookie, offset, length)
                if served:
                    self.fast_requests += 1
                    continue
                # the slow path: bound what is in flight, then hand it to Python
                pthread_mutex_lock(&self.lock)
                while self.inflight >= self.max_inflight:
                    pthread_cond_wait(&self.idle, &self.lock)
                self.inflight += 1
                pthread_mutex_unlock(&self.lock)
                with gil:
                    payload = self.iobuf[:length] if cmd == CMD_WRITE else None
                    try:
                        self.dispatch(self, cmd, flags, cookie, offset, length, payload)
                    except BaseException as ex:
                        import logging
                        logging.getLogger("appliance.nbd").exception("dispatch failed: %s", ex)
                        self.reply(cookie, EIO, cmd == CMD_READ or cmd == CMD_BLOCK_STATUS)
                    payload = None
            # answer everything still in flight before the socket goes
            pthread_mutex_lock(&self.lock)
            while self.inflight > 0:
                pthread_cond_wait(&self.idle, &self.lock)
            pthread_mutex_unlock(&self.lock)
            # and let the sender thread write out what is queued, then stop
            pthread_mutex_lock(&self.qlock)
            self.closing = 1
            pthread_cond_broadcast(&self.qcond)
            while (self.qhead != NULL or self.sender_busy) and not self.dead:
                pthread_cond_wait(&self.qcond, &self.qlock)
            pthread_mutex_unlock(&self.qlock)
        if self.close_reason is None:
            self.close_reason = reason
        return self.close_reason
