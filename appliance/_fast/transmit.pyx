# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The NBD transmission phase: one loop thread per connection, without the GIL.

The loop reads request headers in batches and checks each one the way the spec
asks (range, size, flags, read-only). It keeps reading while earlier requests
are in flight, up to `depth` of them (128), and replies to each as it
completes, out of order as the protocol allows.

- The fast path: the gate looks a READ or WRITE up once (Gate.fast_enter) and
  the loop calls the segments' descriptors (fastops.pxd). A descriptor either
  serves the request at once (zero, ramback's RAM copy) or returns fd pieces,
  which go to the connection's I/O engine queue (uring.pyx): io_uring, so many
  reads and writes are at the disk at once, or the worker pool where io_uring
  is unavailable. On a buffered (not O_DIRECT) fd, a read the page cache holds
  is served inline (preadv2 RWF_NOWAIT; what is not cached goes to the ring),
  and a write is copied into the page cache inline, which is cheaper than the
  kernel worker io_uring would hand it to. A write may be several pieces of one
  buffer on several fds (a fan-out): it is answered when all are done, after the
  descriptor's write_done; a failed piece of a descriptor with errors_slow sends
  the request to the slow path whole. FUA is the write, then fdatasync once it
  is done. A FLUSH on a device whose descriptors can all flush is an fdatasync
  of each fd in the engine too, so it never holds up the connection's other
  requests.
- The slow path: everything else goes to `dispatch` in Python (with the GIL),
  which maps it through the target stack and replies later, from whatever
  thread completes it, through reply()/reply_read()/send_raw(). `unplug()` is
  called after slow requests were dispatched and before the loop waits.
- Waiting: the loop sleeps in queue_wait(): with io_uring one io_uring_enter
  submits the new I/Os and waits for a completion, the socket (polled by the
  ring) or a wake (an eventfd slow-path replies write, polled by the ring);
  with the worker pool, poll() on the socket and the eventfd.
- Sending: every reply is sent without blocking from the thread that has it
  (the loop gathers the fast replies of one round into one sendmsg);
  what the socket does not take is copied to a queue the connection's sender
  thread writes out, so a reply is never cut by another. A client that stops
  reading is dropped when its queued replies pass QUEUE_MAX (256 MiB), or when
  its socket takes no byte for SEND_STALL seconds (60); the daemon and the
  other clients carry on.
- Memory: each request in flight has its own page-aligned buffer (O_DIRECT
  needs no bounce). Free requests keep buffers up to KEEP_BUF (1 MiB) for the
  next one, KEEP_BYTES (8 MiB) of them in all; a larger buffer is freed as soon
  as its request is answered, and everything when the connection closes.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset, memmove
from libc.stdlib cimport malloc, calloc, free
from libc.errno cimport errno, EINTR, EAGAIN, EIO, EINVAL, ENOMEM
from posix.uio cimport iovec
from posix.unistd cimport pwrite
from appliance._fast.sync cimport (pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_wait, pthread_cond_broadcast)
from appliance._fast.gate cimport Gate, FastSeg
from appliance._fast.fastops cimport FdPiece, fast_fn
from appliance._fast.uring cimport (IoOp, Queue, OP_READ, OP_WRITE, OP_FSYNC, queue_init, queue_exit,
    queue_submit, queue_flush, queue_reap, queue_wait, queue_wake)

cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)
    uint64_t be64toh(uint64_t)
    uint16_t htobe16(uint16_t)
    uint32_t htobe32(uint32_t)
    uint64_t htobe64(uint64_t)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **, size_t, size_t)

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int, const iovec *, int, long, int)
    int RWF_NOWAIT

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *, size_t, int, int, int, long)
    int munmap(void *, size_t)
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS
    void *MAP_FAILED

cdef extern from "<sys/time.h>" nogil:
    struct timeval:
        long tv_sec
        long tv_usec

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
    int setsockopt(int, int, int, const void *, socklen_t)
    int shutdown(int, int)
    int MSG_NOSIGNAL
    int MSG_WAITALL
    int MSG_DONTWAIT
    int SOL_SOCKET
    int SO_SNDTIMEO
    int SHUT_RDWR

DEF REQUEST_MAGIC = 0x25609513
DEF SIMPLE_REPLY_MAGIC = 0x67446698
DEF STRUCTURED_REPLY_MAGIC = 0x668e33ef
DEF HEADER = 28
DEF RBUF = 65536
# A write longer than this is not even read to be discarded: the stream is hostile or
# broken, and the connection is closed. Up to here an oversized request gets EINVAL.
DEF HARD_MAX = 128 * 1024 * 1024
# Replies queued for a client that does not read them are capped: past this the client is
# dropped rather than the daemon's memory filled.
DEF QUEUE_MAX = 256 * 1024 * 1024
# A client whose socket takes no byte of a reply for this long is gone (SO_SNDTIMEO).
DEF SEND_STALL = 60
DEF KEEP_BUF = 1024 * 1024
DEF KEEP_BYTES = 8 * 1024 * 1024
DEF MIN_BUF = 4096
# Buffers from here up are mapped and unmapped directly: malloc would keep them in a
# thread's arena after free, and a connection's threads come and go.
DEF MAP_MIN = 256 * 1024
DEF BATCH = 32      # requests taken before the loop reaps completions again
DEF REAP = 64

# why the loop stopped reading
DEF REASON_EOF = 1
DEF REASON_RECV = 2
DEF REASON_MAGIC = 3
DEF REASON_DISC = 4
DEF REASON_HARD = 5
DEF REASON_PAYLOAD = 6
DEF REASON_DEAD = 7

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


cdef int64_t pwrite_all(int fd, char *buf, uint64_t n, uint64_t off) noexcept nogil:
    """All of buf at off: the byte count, or -errno."""
    cdef uint64_t done = 0
    cdef ssize_t r
    while done < n:
        r = pwrite(fd, buf + done, n - done, off + done)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        done += r
    return done


cdef int64_t read_cached(int fd, char *buf, uint64_t n, uint64_t off) noexcept nogil:
    """What of [off, off+n) the page cache has, without waiting for the disk: the byte
    count, or 0 when not even the start is cached (or on any error: the ring retries)."""
    cdef iovec iov
    cdef ssize_t r
    iov.iov_base = buf
    iov.iov_len = n
    r = preadv2(fd, &iov, 1, off, RWF_NOWAIT)
    return r if r > 0 else 0


cdef char *buf_alloc(size_t size) noexcept nogil:
    """Page-aligned memory (O_DIRECT wants it) that buf_free gives back to the system if big."""
    cdef void *p = NULL
    if size >= MAP_MIN:
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        return NULL if p == MAP_FAILED else <char *>p
    if posix_memalign(&p, 4096, size) != 0:
        return NULL
    return <char *>p


cdef void buf_free(char *p, size_t size) noexcept nogil:
    if p == NULL:
        return
    if size >= MAP_MIN:
        munmap(p, size)
    else:
        free(p)


cdef class Connection:
    """One client in transmission phase. `dispatch(conn, cmd, flags, cookie, offset, length, payload)`
    is called with the GIL for everything the fast path does not serve, and must
    arrange exactly one reply through reply()/reply_read()/send_raw(). `unplug()`, if
    given, is called with the GIL after slow requests were dispatched, before the loop
    waits for the client."""

    def __cinit__(self, int fd, Gate gate, dispatch, uint64_t size, bint read_only, bint structured,
                  uint32_t max_block=64 * 1024 * 1024, int depth=128, bytes initial=b"", unplug=None):
        cdef int i
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.fd = fd
        self.gate = gate
        self.dispatch = dispatch
        self.unplug = unplug
        self.size = size
        self.read_only = read_only
        self.structured = structured
        self.max_block = max_block
        self.depth = depth
        self.rcap = RBUF
        self.rbuf = <char *>malloc(RBUF)
        self.reqs = <Req *>calloc(depth, sizeof(Req))
        if self.rbuf == NULL or self.reqs == NULL:
            raise MemoryError()
        for i in range(depth):
            self.reqs[i].next_free = i + 1 if i + 1 < depth else -1
        self.free_head = 0
        if len(initial) > RBUF:
            raise ValueError("too much trailing handshake data")
        memcpy(self.rbuf, <char *>initial, len(initial))
        self.rstart = 0
        self.rend = len(initial)
        pthread_mutex_init(&self.send_lock, NULL)
        pthread_mutex_init(&self.qlock, NULL)
        pthread_cond_init(&self.qcond, NULL)
        self.qhead = NULL
        self.qtail = NULL
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.idle, NULL)
        self.q.efd = -1
        self.close_reason = None

    def __dealloc__(self):
        self.free_all()

    cdef void free_all(self) noexcept nogil:
        cdef OutMsg *m
        cdef int i
        while self.qhead != NULL:
            m = self.qhead
            self.qhead = m.next
            buf_free(<char *>m, sizeof(OutMsg) + m.length)
        self.qtail = NULL
        self.qbytes = 0
        free(self.rbuf)
        self.rbuf = NULL
        if self.reqs != NULL:
            for i in range(self.depth):
                buf_free(self.reqs[i].buf, self.reqs[i].cap)
            free(self.reqs)
            self.reqs = NULL

    # receiving

    cdef int next_header(self) noexcept nogil:
        """A whole header at rbuf+rstart without waiting: 1 yes, 0 not yet, -1 EOF, -2 error."""
        cdef ssize_t n
        while self.rend - self.rstart < HEADER:
            if not self.q.sock_ready:
                return 0  # nothing new since the last EAGAIN: no recv to learn that again
            if self.rstart and self.rcap - self.rstart < HEADER * 4:
                memmove(self.rbuf, self.rbuf + self.rstart, self.rend - self.rstart)
                self.rend -= self.rstart
                self.rstart = 0
            n = recv(self.fd, self.rbuf + self.rend, self.rcap - self.rend, MSG_DONTWAIT)
            if n > 0:
                self.rend += n
            elif n == 0:
                return -1
            elif errno == EAGAIN:
                self.q.sock_ready = 0
                return 0
            elif errno != EINTR:
                return -2
        return 1

    cdef int take(self, char *dst, size_t length) noexcept nogil:
        """Read `length` payload bytes into dst (dst may be NULL: discard). 1 ok, 0/-1 EOF/error.
        While the client is slow to send them, the requests in flight go on and are answered:
        none may wait for this one (a suspend waits for them)."""
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
            n = recv(self.fd, dst if dst != NULL else scratch, chunk, MSG_DONTWAIT)
            if n > 0:
                length -= n
                if dst != NULL:
                    dst += n
            elif n == 0:
                return 0
            elif errno == EAGAIN:
                self.q.sock_ready = 0
                self.reap()
                self.flush_replies()
                if self.slow_since_wait:
                    self.unplug_slow()
                queue_wait(&self.q, self.fd)
            elif errno != EINTR:
                return -1
        return 1

    # requests and their buffers

    cdef Req *get_req(self, size_t length) noexcept nogil:
        """A free request whose buffer holds `length` bytes; NULL if none is free or no memory."""
        cdef Req *r
        cdef void *p = NULL
        cdef size_t cap
        if self.free_head < 0:
            return NULL
        r = &self.reqs[self.free_head]
        if r.cap < length:
            cap = MIN_BUF
            while cap < length:
                cap <<= 1
            p = buf_alloc(cap)
            if p == NULL:
                return NULL
            if r.buf != NULL:
                self.ncached -= r.cap
            buf_free(r.buf, r.cap)
            r.buf = <char *>p
            r.cap = cap
        elif r.buf != NULL:
            self.ncached -= r.cap
        self.free_head = r.next_free
        r.pending = 0
        r.err = 0
        return r

    cdef void put_req(self, Req *r) noexcept nogil:
        # a large buffer goes at once: one big request must not pin its size for the
        # connection's life (nor many of them, on a long-lived connection)
        if r.buf != NULL and (r.cap > KEEP_BUF or self.ncached + r.cap > KEEP_BYTES):
            buf_free(r.buf, r.cap)
            r.buf = NULL
            r.cap = 0
        if r.buf != NULL:
            self.ncached += r.cap
        r.next_free = self.free_head
        self.free_head = <int>(r - self.reqs)

    # sending

    cdef int sendv(self, iovec *iov, int n) noexcept nogil:
        """Send one whole reply without waiting for the client, from any thread: what the
        socket takes now goes now, the rest (or all, if replies are queued already or the
        socket is in use) is copied to the sender thread's queue. -1: the client is gone."""
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
        if self.qbytes and self.qbytes + total > QUEUE_MAX:
            pthread_mutex_unlock(&self.qlock)
            self.drop()
            return -1
        m = <OutMsg *>buf_alloc(sizeof(OutMsg) + total)
        if m == NULL:
            pthread_mutex_unlock(&self.qlock)
            self.drop()  # cannot keep the stream whole: drop the client
            return -1
        self.qbytes += total
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

    cdef void drop(self) noexcept nogil:
        """The client is gone or stopped reading: no more replies, and the loop, the sender
        and the client all see the socket shut."""
        pthread_mutex_lock(&self.qlock)
        self.dead = 1
        pthread_cond_broadcast(&self.qcond)
        pthread_mutex_unlock(&self.qlock)
        shutdown(self.fd, SHUT_RDWR)

    cdef int send_blocking(self, iovec *iov, int n) noexcept nogil:
        """Write all of iov; the caller holds send_lock. 0 ok, -1 the client is gone (or took
        no byte for SEND_STALL seconds)."""
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
                return -1
            n = consumed(&iov, n, sent)
        return 0

    def sender(self):
        """The thread that writes queued replies, blocking on the client so nobody else does.
        Runs until the connection is closed and the queue is empty."""
        cdef OutMsg *m
        cdef iovec iov[1]
        cdef int r
        with nogil:
            while True:
                pthread_mutex_lock(&self.qlock)
                while self.qhead == NULL and not self.closing:
                    pthread_cond_wait(&self.qcond, &self.qlock)
                m = self.qhead
                if m == NULL or self.dead:
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
                r = self.send_blocking(iov, 1)
                pthread_mutex_unlock(&self.send_lock)
                buf_free(<char *>m, sizeof(OutMsg) + m.length)
                if r < 0:
                    self.drop()
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
        cdef uint64_t one = 1
        pthread_mutex_lock(&self.lock)
        self.inflight -= 1
        pthread_cond_broadcast(&self.idle)
        if self.q_ready:
            queue_wake(&self.q)  # room for another request: wake the loop
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
        return self.inflight + self.nfast

    # the fast path

    cdef int start_fast(self, Req *r) noexcept nogil:
        """Serve r (READ, WRITE or FLUSH) through the fast map: 1 taken (answered now or
        when its I/O completes), 0 not ours (the slow path serves it; r's payload is
        untouched). A FLUSH is fast when every segment's descriptor can flush: it is
        then an fdatasync of each distinct fd, in the engine, so it blocks nothing."""
        cdef FastSeg *seg
        cdef FdPiece pieces[MAX_PIECES]
        cdef fast_fn fn
        cdef uint64_t pos, end, n
        cdef int i, k, np = 0, j, m
        cdef char *p = r.buf
        cdef IoOp *op
        cdef bint flush = r.cmd == CMD_FLUSH
        if flush:
            i = self.gate.fast_enter(0, self.size)
            pos, end = 0, self.size
        else:
            i = self.gate.fast_enter(r.offset, r.length)
            pos, end = r.offset, r.offset + r.length
        if i < 0:
            return 0
        r.seg = i
        r.retry = 0
        while pos < end:
            seg = &self.gate.segs[i]
            r.retry = r.retry or seg.desc.errors_slow
            n = (seg.end if seg.end < end else end) - pos
            fn = seg.desc.flush if flush else (seg.desc.read if r.cmd == CMD_READ else seg.desc.write)
            k = -1 if fn == NULL else fn(&seg.desc, 0 if flush else pos - seg.start, p, 0 if flush else n,
                                         r.flags & F_FUA, &pieces[np], MAX_PIECES - np)
            if k < 0:
                # only a descriptor that is alone in the request may act before it declines
                self.gate.exit()
                return 0
            if flush:  # one fdatasync per fd
                for j in range(np, np + k):
                    for m in range(np):
                        if pieces[m].fd == pieces[j].fd:
                            break
                    else:
                        pieces[np] = pieces[j]
                        np += 1
            else:
                np += k
                p += n
            pos += n
            i += 1
        # pending counts the pieces, plus one held until all are on their way
        self.nfast += 1
        r.pending = np + 1
        for j in range(np):
            op = &r.ops[j]
            op.op = OP_FSYNC if flush else (OP_READ if r.cmd == CMD_READ else OP_WRITE)
            op.fd = pieces[j].fd
            op.buf = pieces[j].buf
            op.len = pieces[j].len
            op.off = pieces[j].off
            op.tag = <int>(r - self.reqs)
            op.fua = r.cmd == CMD_WRITE and (r.flags & F_FUA) != 0
            if op.op == OP_READ and pieces[j].buffered:
                # from the page cache if it is all there: at once, without the ring's
                # round trip; what is not cached goes to the ring and the disk
                op.res = read_cached(op.fd, op.buf, op.len, op.off)
                if op.res > 0:
                    self.op_done(op)  # a short one is resubmitted for the rest
                    continue
            if op.op == OP_WRITE and pieces[j].buffered:
                # into the page cache: at once, here. io_uring would hand a buffered write on
                # ext4 to a kernel worker (it cannot be tried without blocking), a thread
                # switch that costs more than the copy
                op.res = pwrite_all(op.fd, op.buf, op.len, op.off)
                self.op_done(op)
            elif queue_submit(&self.q, op) != 0:
                if not r.err:
                    r.err = EAGAIN
                self.piece_done(r)
        self.piece_done(r)
        return 1

    cdef void finish(self, Req *r) noexcept nogil:
        """Answer a fast request: an error at once, a success into the batch; an error of a
        descriptor with errors_slow makes it a slow request instead."""
        cdef Batch *b = &self.batch
        cdef char *h
        cdef FastSeg *seg = &self.gate.segs[r.seg]
        if r.cmd == CMD_WRITE and seg.desc.write_done != NULL:  # alone: the one segment
            seg.desc.write_done(&seg.desc, r.offset - seg.start, r.length, r.err)
        self.gate.exit()
        if r.err and r.retry:
            self.redo_slow(r)
            return
        if r.err:
            self.send_error(r.cookie, nbd_errno(r.err), r.cmd == CMD_READ)
            self.put_req(r)
            return
        if b.n == BATCH_REPLIES:
            self.flush_replies()
        h = b.hdr[b.n]
        memcpy(h + 8, &r.cookie, 8)  # the cookie is opaque: echo its bytes
        if r.cmd == CMD_READ and self.structured:
            put32(h, STRUCTURED_REPLY_MAGIC)
            put16(h + 4, REPLY_FLAG_DONE)
            put16(h + 6, REPLY_TYPE_OFFSET_DATA)
            put32(h + 16, <uint32_t>(8 + r.length))
            put64(h + 20, r.offset)
            b.iov[b.niov].iov_len = 28
        else:
            put32(h, SIMPLE_REPLY_MAGIC)
            put32(h + 4, 0)
            b.iov[b.niov].iov_len = 16
        b.iov[b.niov].iov_base = h
        b.niov += 1
        if r.cmd == CMD_READ:
            b.iov[b.niov].iov_base = r.buf
            b.iov[b.niov].iov_len = r.length
            b.niov += 1
        b.reqs[b.n] = r
        b.n += 1

    cdef void redo_slow(self, Req *r) noexcept nogil:
        """A fast request that failed goes to the slow path whole, with its payload (the
        target maps it again and decides what the error means)."""
        pthread_mutex_lock(&self.lock)
        self.inflight += 1
        pthread_mutex_unlock(&self.lock)
        self.slow_since_wait = 1
        self.dispatch_slow(r.cmd, r.flags, r.cookie, r.offset, r.length, r)

    cdef void flush_replies(self) noexcept nogil:
        cdef Batch *b = &self.batch
        cdef int i
        if b.n == 0:
            return
        self.sendv(b.iov, b.niov)
        for i in range(b.n):
            self.put_req(b.reqs[i])
        b.n = 0
        b.niov = 0

    cdef int reap(self) noexcept nogil:
        """Finish what the engine completed, without waiting. Returns how many ops came back."""
        cdef IoOp *ops[REAP]
        cdef int n, i, total = 0
        while True:
            n = queue_reap(&self.q, ops, REAP)
            if n == 0:
                return total
            total += n
            for i in range(n):
                self.op_done(ops[i])
            queue_flush(&self.q)

    cdef void op_done(self, IoOp *op) noexcept nogil:
        """One op of a request came back (res set): go on with it, or count it done and
        answer the request when it was its last."""
        cdef Req *r = &self.reqs[op.tag]
        if op.res < 0:
            if not r.err:
                r.err = <int>-op.res
        elif op.op != OP_FSYNC and <uint64_t>op.res < op.len:
            if op.res == 0:
                if not r.err:
                    r.err = EIO  # the file is shorter than the table says
            else:  # a short transfer: go on from where it stopped
                op.buf += op.res
                op.off += op.res
                op.len -= op.res
                if queue_submit(&self.q, op) == 0:
                    return
                r.err = EAGAIN
        elif op.op == OP_WRITE and op.fua and not r.err:
            op.op = OP_FSYNC  # FUA: the data is written; now make it durable
            if queue_submit(&self.q, op) == 0:
                return
            r.err = EAGAIN
        self.piece_done(r)

    cdef void piece_done(self, Req *r) noexcept nogil:
        r.pending -= 1
        if r.pending == 0:
            self.nfast -= 1
            self.finish(r)

    cdef void wait(self, bint want_socket) noexcept nogil:
        """Sleep until the engine or a slow-path reply has news, or (want_socket) the client
        sent more."""
        queue_wait(&self.q, self.fd if want_socket else -1)

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
            return NBD_EINVAL  # over the advertised maximum: EOVERFLOW is for DF reads only
        if length == 0:
            return NBD_EINVAL
        if offset > self.size or length > self.size - offset:
            if cmd == CMD_WRITE or cmd == CMD_WRITE_ZEROES:
                return NBD_ENOSPC
            return NBD_EINVAL
        return 0

    cdef int one_request(self) noexcept nogil:
        """Take one request whose header is at rbuf+rstart: check it, read its payload, then
        serve it on the fast path or dispatch it. 0 go on, -1 stop reading (why is set)."""
        cdef uint32_t magic, length, e
        cdef uint16_t flags, cmd
        cdef uint64_t cookie, offset
        cdef char *h = self.rbuf + self.rstart
        cdef Req *r = NULL
        cdef int rc
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
            self.why = REASON_MAGIC
            self.why_value = magic
            return -1
        if cmd == CMD_DISC:
            self.why = REASON_DISC
            return -1
        self.requests += 1
        e = self.check(cmd, flags, offset, length)
        if cmd == CMD_WRITE:
            if length > HARD_MAX:
                self.why = REASON_HARD
                self.why_value = length
                return -1
            if not e:
                r = self.get_req(length)
                if r == NULL:
                    e = NBD_ENOMEM
            rc = self.take(r.buf if r != NULL else NULL, length)
            if rc <= 0:
                if r != NULL:
                    self.put_req(r)
                self.why = REASON_PAYLOAD
                return -1
        if e:
            if r != NULL:
                self.put_req(r)
            self.send_error(cookie, e, cmd == CMD_READ or cmd == CMD_BLOCK_STATUS)
            return 0
        if cmd == CMD_READ or cmd == CMD_FLUSH:
            r = self.get_req(length)
            if r == NULL:
                self.send_error(cookie, NBD_ENOMEM, cmd == CMD_READ)
                return 0
        if r != NULL:
            r.cookie = cookie
            r.offset = offset
            r.length = length
            r.cmd = cmd
            r.flags = flags
            if self.start_fast(r):
                self.fast_requests += 1
                return 0
        # the slow path
        pthread_mutex_lock(&self.lock)
        self.inflight += 1
        pthread_mutex_unlock(&self.lock)
        self.slow_since_wait = 1
        self.dispatch_slow(cmd, flags, cookie, offset, length, r)
        return 0

    cdef void unplug_slow(self) noexcept with gil:
        """Slow requests were dispatched and the loop is about to wait for the client: let
        the device queue go on with what it has (merge a batch first)."""
        self.slow_since_wait = 0
        if self.unplug is None:
            return
        try:
            self.unplug()
        except BaseException as ex:
            import logging
            logging.getLogger("appliance.nbd").exception("unplug failed: %s", ex)

    cdef void dispatch_slow(self, uint16_t cmd, uint16_t flags, uint64_t cookie, uint64_t offset,
                            uint32_t length, Req *r) noexcept with gil:
        """Hand a request to Python; r (if any) holds a WRITE's payload and is given back."""
        payload = r.buf[:length] if cmd == CMD_WRITE else None
        if r != NULL:
            self.put_req(r)
        try:
            self.dispatch(self, cmd, flags, cookie, offset, length, payload)
        except BaseException as ex:
            import logging
            logging.getLogger("appliance.nbd").exception("dispatch failed: %s", ex)
            self.reply(cookie, EIO, cmd == CMD_READ or cmd == CMD_BLOCK_STATUS)

    # the loop

    def run(self):
        """Serve until the client disconnects or the stream is broken. Returns the reason."""
        cdef int rc, taken, reaped
        cdef timeval tv
        rc = queue_init(&self.q, 2 * self.depth)
        if rc < 0:
            import os
            pthread_mutex_lock(&self.qlock)
            self.closing = 1  # the sender thread ends too
            pthread_cond_broadcast(&self.qcond)
            pthread_mutex_unlock(&self.qlock)
            raise OSError(-rc, f"cannot start the I/O engine queue: {os.strerror(-rc)}")
        self.q_ready = 1
        tv.tv_sec = SEND_STALL
        tv.tv_usec = 0
        setsockopt(self.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv))
        with nogil:
            while True:
                taken = 0
                while not self.eof and taken < BATCH and self.nfast + self.inflight < self.depth:
                    rc = self.next_header()
                    if rc == 0:
                        break
                    if rc < 0:
                        self.eof = 1
                        self.why = REASON_EOF if rc == -1 else REASON_RECV
                        break
                    if self.one_request() < 0:
                        self.eof = 1
                        break
                    taken += 1
                if taken == BATCH:
                    queue_flush(&self.q)
                reaped = self.reap()
                self.flush_replies()
                if self.dead and not self.eof:
                    self.eof = 1
                    self.why = REASON_DEAD
                if self.eof and self.nfast == 0:
                    break
                if taken or reaped:
                    continue
                if self.slow_since_wait:
                    self.unplug_slow()
                    continue
                self.wait(not self.eof and self.nfast + self.inflight < self.depth)
            # answer everything still in flight on the slow path before the socket goes
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
            pthread_mutex_lock(&self.lock)
            self.q_ready = 0
            queue_exit(&self.q)
            pthread_mutex_unlock(&self.lock)
        if self.close_reason is None:
            self.close_reason = self._reason()
        return self.close_reason

    def _reason(self):
        if self.why == REASON_EOF:
            return "client closed the connection"
        if self.why == REASON_RECV:
            return "receive failed"
        if self.why == REASON_MAGIC:
            return f"bad request magic 0x{self.why_value:08x}"
        if self.why == REASON_DISC:
            return "client sent NBD_CMD_DISC"
        if self.why == REASON_HARD:
            return f"write of {self.why_value} bytes is over the hard limit; closing"
        if self.why == REASON_PAYLOAD:
            return "client closed the connection in the middle of a write payload"
        if self.why == REASON_DEAD:
            return "client stopped reading its replies (or went away); dropped"
        return "closed"

    def release(self):
        """After run() and the sender: free the buffers and let go of the session, so a
        closed connection costs nothing even before the garbage collector runs."""
        if self.q_ready:
            raise RuntimeError("release() while the connection runs")
        self.dispatch = None
        self.unplug = None
        self.gate = None
        self.free_all()


