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
  kernel worker io_uring would hand it to; a write of several buffered pieces
  (a mirror's copies) hands all but the first to kernel workers
  (IOSQE_ASYNC) and copies the first itself meanwhile, so the copies run on
  two cores instead of one after the other. A write may be several pieces of one
  buffer on several fds (a fan-out): it is answered when all are done, after the
  descriptor's write_done (a read after its read_done); a failed piece of a
  descriptor with errors_slow sends the request to the slow path whole. FUA is
  the write, then fdatasync once it is done. A FLUSH on a device whose descriptors can all flush is an fdatasync
  of each fd in the engine too, so it never holds up the connection's other
  requests.
- The slow path: everything else goes to `dispatch` in Python (with the GIL),
  which maps it through the target stack and replies later, from whatever
  thread completes it, through reply()/reply_read()/send_raw(). `unplug()` is
  called after slow requests were dispatched and before the loop waits or ends.
- Waiting: the loop sleeps in queue_wait(): with io_uring one io_uring_enter
  submits the new I/Os and waits for a completion, the socket (polled by the
  ring) or a wake (an eventfd slow-path replies write, polled by the ring);
  with the worker pool, poll() on the socket and the eventfd. What woke it is
  reaped at once, so a readable socket is read in the same round.
- Sending: replies.pyx (every reply is sent whole without blocking from the
  thread that has it; the loop gathers the fast replies of one round into one
  sendmsg; a client that stops reading is dropped, SEND_STALL seconds (60) with
  no byte taken among the reasons).
- TLS: with a `tls` session (tls.pyx, OpenSSL), the loop reads plaintext out of
  the client's records (rq_recv) and replies are encrypted as they are sent,
  all without the GIL; the loop ends with close_notify.
- Memory: each request in flight has its own page-aligned buffer (O_DIRECT
  needs no bounce), taken from the daemon's buffer budget (budget.pyx; a READ
  takes room for its reply too, should it wait in the sender's queue): a
  request that finds no room is held, and the loop reads no further request
  until room is given back anywhere in the daemon. Free requests keep buffers
  up to KEEP_BUF (1 MiB) for the next one, KEEP_BYTES (8 MiB) of them in all;
  a larger buffer is freed as soon as its request is answered, and everything
  when the connection closes. With io_uring, a kept buffer is registered with the
  connection's ring (slot: its request's index), so an O_DIRECT read or write into
  it does not pin its pages again on every I/O; it is unregistered before it is
  freed. Where the kernel refuses (no sparse buffer table, RLIMIT_MEMLOCK), the
  connection stops asking and uses plain reads and writes.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memmove
from libc.stdlib cimport malloc, calloc, free
from libc.errno cimport errno, EINTR, EAGAIN, EIO, EINVAL, ENOMEM
from posix.uio cimport iovec
from posix.unistd cimport pwrite
from appliance._fast.sync cimport (pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_wait, pthread_cond_broadcast)
from appliance._fast.gate cimport Gate, FastSeg
from appliance._fast.fastops cimport FdPiece, fast_fn
from appliance._fast.uring cimport (IoOp, Queue, OP_READ, OP_WRITE, OP_FSYNC, queue_init, queue_exit,
    queue_submit, queue_flush, queue_reap, queue_wait, queue_wake, queue_set_buffer, now_ns)
from appliance._fast.pagebuf cimport buf_alloc, buf_free
from appliance._fast.wire cimport (nbd_errno, put16, put32, put64, be16toh, be32toh, be64toh,
    HEADER, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
    REPLY_TYPE_OFFSET_DATA, CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES,
    CMD_BLOCK_STATUS, F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO, NBD_EPERM, NBD_ENOMEM,
    NBD_EINVAL, NBD_ENOSPC)
from appliance._fast.replies cimport (Replies, rq_init, rq_free, rq_sendv, rq_sendv_paid, rq_drop, rq_sender,
    rq_close, rq_drain, rq_simple, rq_data, rq_error, rq_recv, rq_tls_close)
from appliance._fast.tls cimport TlsSession
from appliance._fast.budget cimport budget_take, budget_give, budget_forget

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int, const iovec *, int, long, int)
    int RWF_NOWAIT

cdef extern from "<sys/time.h>" nogil:
    struct timeval:
        long tv_sec
        long tv_usec

cdef extern from "<sys/socket.h>" nogil:
    ctypedef int socklen_t
    ssize_t recv(int, void *, size_t, int)
    int setsockopt(int, int, int, const void *, socklen_t)
    int MSG_DONTWAIT
    int SOL_SOCKET
    int SO_SNDTIMEO

DEF RBUF = 65536
# A write longer than this is not even read to be discarded: the stream is hostile or
# broken, and the connection is closed. Up to here an oversized request gets EINVAL.
DEF HARD_MAX = 128 * 1024 * 1024
# A client whose socket takes no byte of a reply for this long is gone (SO_SNDTIMEO).
DEF SEND_STALL = 60
DEF KEEP_BUF = 1024 * 1024
DEF KEEP_BYTES = 8 * 1024 * 1024
DEF MIN_BUF = 4096
DEF BATCH = 32      # requests taken before the loop reaps completions again
# A fan-out's other copies go to io_uring's kernel workers only when a copy costs more than
# handing it over (a worker's wake and switch): on ext4 with large folios a 4 KiB buffered
# write walks its folio's buffer heads (~13 us), on small folios it is ~1.5 us.
DEF PUNT_NS = 5000
DEF REAP = 64

# why the loop stopped reading
DEF REASON_EOF = 1
DEF REASON_RECV = 2
DEF REASON_MAGIC = 3
DEF REASON_DISC = 4
DEF REASON_HARD = 5
DEF REASON_PAYLOAD = 6
DEF REASON_DEAD = 7


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


cdef class Connection:
    """One client in transmission phase. `dispatch(conn, cmd, flags, cookie, offset, length, payload)`
    is called with the GIL for everything the fast path does not serve, and must
    arrange exactly one reply through reply()/reply_read()/send_raw(). `unplug()`, if
    given, is called with the GIL after slow requests were dispatched, before the loop
    waits for the client or ends. `tls`: the TlsSession the handshake established on fd.
    `poll_us`: how long the loop may poll for news before it sleeps (uring.pyx's queue_wait)."""

    def __cinit__(self, int fd, Gate gate, dispatch, uint64_t size, bint read_only, bint structured,
                  uint32_t max_block=64 * 1024 * 1024, int depth=128, bytes initial=b"", unplug=None,
                  TlsSession tls=None, uint32_t poll_us=0):
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
        self.poll_us = poll_us
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
        rq_init(&self.out, fd)
        if tls is not None:
            self.out.tls = tls.attach(fd)
            self.tls = tls
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.idle, NULL)
        self.q.efd = -1
        self.waiter.q = &self.q
        self.close_reason = None

    def __dealloc__(self):
        self.free_all()

    cdef void free_all(self) noexcept nogil:
        cdef int i
        rq_free(&self.out)
        free(self.rbuf)
        self.rbuf = NULL
        if self.reqs != NULL:
            for i in range(self.depth):
                buf_free(self.reqs[i].buf, self.reqs[i].cap)
            free(self.reqs)
            self.reqs = NULL

    # receiving

    cdef inline ssize_t recv_some(self, char *buf, size_t n) noexcept nogil:
        """recv() without waiting: plaintext, from the socket or out of its TLS records."""
        if self.out.tls != NULL:
            return rq_recv(&self.out, buf, n)
        return recv(self.fd, buf, n, MSG_DONTWAIT)

    cdef int next_header(self) noexcept nogil:
        """A whole header at rbuf+rstart without waiting: 1 yes, 0 not yet, -1 EOF, -2 error."""
        cdef ssize_t n
        cdef size_t want
        while self.rend - self.rstart < HEADER:
            if not self.q.sock_ready:
                return 0  # nothing new since the last EAGAIN: no recv to learn that again
            if self.rstart and self.rcap - self.rstart < HEADER * 4:
                memmove(self.rbuf, self.rbuf + self.rstart, self.rend - self.rstart)
                self.rend -= self.rstart
                self.rstart = 0
            want = self.rcap - self.rend
            n = self.recv_some(self.rbuf + self.rend, want)
            if n > 0:
                self.rend += n
                if <size_t>n < want and self.out.tls == NULL:
                    # the socket had less than we asked for, so it is empty now: the next
                    # look goes through the poll (which fires at once if more came in since)
                    # rather than a recv that would only say EAGAIN, one syscall per wake.
                    # Not under TLS: OpenSSL may hold decrypted bytes the poll cannot see
                    self.q.sock_ready = 0
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
            n = self.recv_some(dst if dst != NULL else scratch, chunk)
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

    cdef Req *get_req(self, size_t length, size_t reply) noexcept nogil:
        """A free request whose buffer holds `length` bytes, with budget for it and for `reply`
        bytes of its reply (a reply the socket does not take at once is copied to the sender's
        queue: it must fit in the budget too). NULL if none is free, no memory, or (starved)
        no room in the budget."""
        cdef Req *r
        cdef void *p = NULL
        cdef size_t cap, need
        self.starved = 0
        if self.free_head < 0:
            return NULL
        r = &self.reqs[self.free_head]
        cap = r.cap
        if r.cap < length:
            cap = MIN_BUF
            while cap < length:
                cap <<= 1
        need = (cap if length else 0) + reply
        if need and not budget_take(need, &self.waiter):
            self.starved = 1
            return NULL
        if r.cap < length:
            p = buf_alloc(cap)
            if p == NULL:
                budget_give(need)
                return NULL
            if r.buf != NULL:
                self.ncached -= r.cap
            self.unregister(r)
            buf_free(r.buf, r.cap)
            r.buf = <char *>p
            r.cap = cap
        elif r.buf != NULL:
            self.ncached -= r.cap
        self.free_head = r.next_free
        r.budget = need - reply
        r.paid = reply
        r.pending = 0
        r.err = 0
        return r

    cdef void unregister(self, Req *r) noexcept nogil:
        """Before r's buffer is freed: the engine must let go of its pages."""
        if r.fixed:
            queue_set_buffer(&self.q, <int>(r - self.reqs), NULL, 0)
            r.fixed = 0

    cdef void put_req(self, Req *r) noexcept nogil:
        budget_give(r.budget + r.paid)
        r.budget = r.paid = 0
        # a large buffer goes at once: one big request must not pin its size for the
        # connection's life (nor many of them, on a long-lived connection)
        if r.buf != NULL and (r.cap > KEEP_BUF or self.ncached + r.cap > KEEP_BYTES):
            self.unregister(r)
            buf_free(r.buf, r.cap)
            r.buf = NULL
            r.cap = 0
        if r.buf != NULL:
            self.ncached += r.cap
            if not r.fixed and not self.fixed_refused:
                # kept, so it will serve again: register it now (a buffer freed after one
                # request costs no registration)
                r.fixed = queue_set_buffer(&self.q, <int>(r - self.reqs), r.buf, r.cap) == 0
                self.fixed_refused = not r.fixed
        r.next_free = self.free_head
        self.free_head = <int>(r - self.reqs)

    # sending (replies.pyx)

    def sender(self):
        """The thread that writes queued replies, blocking on the client so nobody else does.
        Runs until the connection is closed and the queue is empty."""
        with nogil:
            rq_sender(&self.out)

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
                rq_error(&self.out, self.structured, cookie, e, structured_cmd)
            else:
                rq_simple(&self.out, cookie, 0, NULL, 0)
            self.done_one()

    def reply_read(self, uint64_t cookie, uint64_t offset, const unsigned char[::1] data):
        cdef size_t n = data.shape[0]
        cdef char *p = <char *>&data[0] if n else NULL
        with nogil:
            rq_data(&self.out, self.structured, cookie, offset, p, n)
            self.done_one()

    def send_raw(self, const unsigned char[::1] data):
        """A reply the caller encoded itself (block status)."""
        cdef iovec iov[1]
        iov[0].iov_base = <void *>&data[0]
        iov[0].iov_len = data.shape[0]
        with nogil:
            rq_sendv(&self.out, iov, 1)
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
        cdef uint64_t pos, end, n, t
        cdef int i, k, np = 0, j, m
        cdef char *p = r.buf
        cdef IoOp *op
        cdef bint flush = r.cmd == CMD_FLUSH
        cdef bint punted = 0
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
        for j in range(np - 1, -1, -1):  # the first piece last (see below)
            if j == 0 and punted:
                queue_flush(&self.q)  # the workers start on theirs now
            op = &r.ops[j]
            op.punt = 0
            op.op = OP_FSYNC if flush else (OP_READ if r.cmd == CMD_READ else OP_WRITE)
            op.fd = pieces[j].fd
            op.buf = pieces[j].buf
            op.len = pieces[j].len
            op.off = pieces[j].off
            op.tag = <int>(r - self.reqs)
            op.fua = r.cmd == CMD_WRITE and (r.flags & F_FUA) != 0
            op.buf_index = -1
            if r.fixed and op.buf >= r.buf and op.buf + op.len <= r.buf + r.cap:
                op.buf_index = op.tag
            if op.op == OP_READ and pieces[j].buffered:
                # from the page cache if it is all there: at once, without the ring's
                # round trip; what is not cached goes to the ring and the disk
                op.res = read_cached(op.fd, op.buf, op.len, op.off)
                if op.res > 0:
                    self.op_done(op)  # a short one is resubmitted for the rest
                    continue
            if op.op == OP_WRITE and pieces[j].buffered and j and self.copy_ns > PUNT_NS:
                # the other copies of a fan-out, when copies are dear: a kernel worker copies
                # them into the page cache while this thread copies the first (below), on
                # another core
                op.punt = 1
                if queue_submit(&self.q, op) != 0:
                    if not r.err:
                        r.err = EAGAIN
                    self.piece_done(r)
                else:
                    punted = 1
            elif op.op == OP_WRITE and pieces[j].buffered:
                # into the page cache: at once, here. io_uring would hand a buffered write on
                # ext4 to a kernel worker (it cannot be tried without blocking), a thread
                # switch that costs more than the copy
                if np > 1:  # a fan-out: what its copies cost decides where the others go
                    t = now_ns()
                    op.res = pwrite_all(op.fd, op.buf, op.len, op.off)
                    self.copy_ns = (7 * self.copy_ns + now_ns() - t) // 8
                else:
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
        elif r.cmd == CMD_READ and seg.desc.read_done != NULL:
            seg.desc.read_done(&seg.desc, r.offset - seg.start, r.length, r.ops[0].fd, r.err)
        self.gate.exit()
        if r.err and r.retry:
            self.redo_slow(r)
            return
        if r.err:
            rq_error(&self.out, self.structured, r.cookie, nbd_errno(r.err), r.cmd == CMD_READ)
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
            b.paid += r.paid  # the reply's budget goes with it
            r.paid = 0
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
        rq_sendv_paid(&self.out, b.iov, b.niov, b.paid)
        b.paid = 0
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
        sent more. What woke it is reaped at once: with io_uring, the socket's readiness is
        a completion too, and seen only once reaped (sock_ready); otherwise the loop would
        find no request, reap the poll, and go round through the ring once more before it
        reads (a system call per wake), then recv again on a stale readiness."""
        queue_wait(&self.q, self.fd if want_socket else -1)
        self.reap()

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
        serve it on the fast path or dispatch it. 0 go on, -1 stop reading (why is set), 1 held
        for room in the buffer budget."""
        cdef uint32_t magic, length, e
        cdef uint16_t flags, cmd
        cdef uint64_t cookie, offset
        cdef char *h = self.rbuf + self.rstart
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
        if cmd == CMD_WRITE and length > HARD_MAX:
            self.why = REASON_HARD
            self.why_value = length
            return -1
        return self.start_request(cmd, flags, cookie, offset, length, e)

    cdef int start_request(self, uint16_t cmd, uint16_t flags, uint64_t cookie, uint64_t offset,
                           uint32_t length, uint32_t e) noexcept nogil:
        """one_request's second half, and a held request's retry: 0 go on, -1 stop reading
        (why is set), 1 no room in the buffer budget (the request is held, its payload unread)."""
        cdef Req *r = NULL
        cdef int rc
        self.held = 0
        if cmd == CMD_WRITE:
            if not e:
                r = self.get_req(length, 0)
                if r == NULL:
                    if self.starved:
                        return self.hold(cmd, flags, cookie, offset, length, e)
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
            rq_error(&self.out, self.structured, cookie, e, cmd == CMD_READ or cmd == CMD_BLOCK_STATUS)
            return 0
        if cmd == CMD_READ or cmd == CMD_FLUSH:
            r = self.get_req(length, length if cmd == CMD_READ else 0)
            if r == NULL:
                if self.starved:
                    return self.hold(cmd, flags, cookie, offset, length, e)
                rq_error(&self.out, self.structured, cookie, NBD_ENOMEM, cmd == CMD_READ)
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

    cdef int hold(self, uint16_t cmd, uint16_t flags, uint64_t cookie, uint64_t offset,
                  uint32_t length, uint32_t e) noexcept nogil:
        self.held = 1
        self.held_cmd, self.held_flags, self.held_cookie = cmd, flags, cookie
        self.held_offset, self.held_length, self.held_e = offset, length, e
        return 1

    cdef void unplug_slow(self) noexcept with gil:
        """Slow requests were dispatched and the loop is about to wait for the client (or
        ends): let the device queue go on with what it has (merge a batch first)."""
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
        rc = queue_init(&self.q, 2 * self.depth, self.depth, <uint64_t>self.poll_us * 1000)
        if rc < 0:
            import os
            rq_close(&self.out)  # the sender thread ends too
            raise OSError(-rc, f"cannot start the I/O engine queue: {os.strerror(-rc)}")
        self.q_ready = 1
        tv.tv_sec = SEND_STALL
        tv.tv_usec = 0
        setsockopt(self.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv))
        with nogil:
            while True:
                taken = 0
                while not self.eof and taken < BATCH and self.nfast + self.inflight < self.depth:
                    if self.held:
                        rc = self.start_request(self.held_cmd, self.held_flags, self.held_cookie,
                                                self.held_offset, self.held_length, self.held_e)
                        if rc == 1:
                            break  # still no room: budget_give wakes the loop
                        if rc < 0:
                            self.eof = 1
                            break
                        taken += 1
                        continue
                    rc = self.next_header()
                    if rc == 0:
                        break
                    if rc < 0:
                        self.eof = 1
                        self.why = REASON_EOF if rc == -1 else REASON_RECV
                        break
                    rc = self.one_request()
                    if rc < 0:
                        self.eof = 1
                        break
                    if rc == 1:
                        break
                    taken += 1
                if taken == BATCH:
                    queue_flush(&self.q)
                reaped = self.reap()
                self.flush_replies()
                if self.out.dead and not self.eof:
                    self.eof = 1
                    self.why = REASON_DEAD
                if self.eof and self.nfast == 0:
                    break
                if taken or reaped:
                    continue
                if self.slow_since_wait:
                    self.unplug_slow()
                    continue
                if self.held and self.waiter.woken:
                    continue  # room was made (reap may have taken the wake itself)
                self.wait(not self.eof and not self.held and self.nfast + self.inflight < self.depth)
            # slow requests of the last batch may still wait in the session's plug (the
            # stream ended in the same read: DISC, garbage, a hang-up): they go to the
            # device now, or the replies waited for below never come
            if self.slow_since_wait:
                self.unplug_slow()
            # answer everything still in flight on the slow path before the socket goes
            pthread_mutex_lock(&self.lock)
            while self.inflight > 0:
                pthread_cond_wait(&self.idle, &self.lock)
            pthread_mutex_unlock(&self.lock)
            # and let the sender thread write out what is queued, then stop
            rq_drain(&self.out)
            rq_tls_close(&self.out)
            budget_forget(&self.waiter)
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
        self.out.tls = NULL
        self.tls = None


