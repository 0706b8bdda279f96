# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A connection's replies: sent without blocking from the thread that has them.

Every reply is sent whole from the thread that has it, without waiting for the
client; what the socket does not take is copied to a queue the connection's
sender thread writes out, so a reply is never cut by another. A client that
stops reading is dropped when its queued replies pass QUEUE_MAX (256 MiB), or
when its socket takes no byte for SEND_STALL seconds (60, set by the loop);
the daemon and the other clients carry on.

With TLS (tls.pyx), a reply is encrypted into records as it is sent, under the same lock
that keeps replies whole; queued replies are queued as records.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EINTR, EAGAIN
from posix.uio cimport iovec
from appliance._fast.sync cimport (pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_wait, pthread_cond_broadcast)
from appliance._fast.pagebuf cimport MAP_MIN, buf_alloc, buf_free
from appliance._fast.wire cimport (put16, put32, put64, consumed, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_ERROR)
from appliance._fast.tls cimport TlsChan, tls_recv, tls_encrypt, tls_close, tls_sink_done
from appliance._fast.budget cimport budget_force, budget_give

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_trylock(pthread_mutex_t *)

cdef extern from *:
    """
    #include <errno.h>
    static inline void set_errno(int e) { errno = e; }
    """
    void set_errno(int) nogil

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
    ssize_t sendmsg(int, const msghdr *, int)
    int shutdown(int, int)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    int SHUT_RDWR

# Replies queued for a client that does not read them are capped: past this the client is
# dropped rather than the daemon's memory filled.
DEF QUEUE_MAX = 256 * 1024 * 1024
# Big replies' buffers (mapped, pagebuf's MAP_MIN and up) are kept for the next ones, up to
# SPARES of them: a 1 MiB read's reply mostly waits here (the socket takes a few hundred KiB
# at once), and a fresh mapping each time cost page faults and zeroed pages, more CPU than the
# read itself.
DEF SPARES = 4
DEF SPARE_MAX = 4 * 1024 * 1024 + 4096


cdef void rq_init(Replies *q, int fd) noexcept nogil:
    memset(q, 0, sizeof(Replies))
    q.fd = fd
    pthread_mutex_init(&q.send_lock, NULL)
    pthread_mutex_init(&q.qlock, NULL)
    pthread_cond_init(&q.qcond, NULL)


cdef void rq_free(Replies *q) noexcept nogil:
    """Free what is still queued (the connection is over)."""
    cdef OutMsg *m
    while q.qhead != NULL:
        m = q.qhead
        q.qhead = m.next
        budget_give(m.length)
        buf_free(<char *>m, m.cap)
    q.qtail = NULL
    q.qbytes = 0
    while q.spares != NULL:
        m = q.spares
        q.spares = m.next
        buf_free(<char *>m, m.cap)
    q.nspares = 0


cdef OutMsg *out_alloc(Replies *q, size_t size) noexcept nogil:
    """A buffer for a reply of `size` bytes (OutMsg included); qlock held."""
    cdef OutMsg *m
    cdef OutMsg **at = &q.spares
    cdef size_t cap = size
    if size >= MAP_MIN:
        while at[0] != NULL:
            if at[0].cap >= size:
                m = at[0]
                at[0] = m.next
                q.nspares -= 1
                return m
            at = &at[0].next
        cap = MAP_MIN  # mapped: a power of two, so a kept one fits replies of about its size
        while cap < size:
            cap <<= 1
    m = <OutMsg *>buf_alloc(cap)
    if m != NULL:
        m.cap = cap
    return m


cdef void out_free(Replies *q, OutMsg *m) noexcept nogil:
    """A sent reply's buffer: kept if big and there is room; qlock held."""
    if m.cap >= MAP_MIN and m.cap <= SPARE_MAX and q.nspares < SPARES:
        m.next = q.spares
        q.spares = m
        q.nspares += 1
    else:
        buf_free(<char *>m, m.cap)


DEF DROP = -2  # push(): the client must be dropped (call rq_drop without qlock)


cdef int rq_sendv(Replies *q, iovec *iov, int n) noexcept nogil:
    """Send one whole reply without waiting for the client, from any thread: what the
    socket takes now goes now, the rest (or all, if replies are queued already or the
    socket is in use) is copied to the sender thread's queue. -1: the client is gone."""
    return rq_sendv_paid(q, iov, n, 0)


cdef int rq_sendv_paid(Replies *q, iovec *iov, int n, size_t paid) noexcept nogil:
    """rq_sendv, for a reply whose sender took `paid` bytes of the buffer budget for it: they
    count for its copy in the queue, and what is sent at once is given back."""
    cdef int r
    pthread_mutex_lock(&q.qlock)
    if q.dead:
        pthread_mutex_unlock(&q.qlock)
        budget_give(paid)
        return -1
    if q.tls == NULL:
        r = push(q, iov, n, &paid)
    elif tls_encrypt(q.tls, iov, n) < 0:
        tls_sink_done(q.tls)
        r = DROP  # a reply that cannot be encrypted whole breaks the stream
    else:
        r = push_sink(q, &paid)
    pthread_mutex_unlock(&q.qlock)
    budget_give(paid)
    if r == DROP:
        rq_drop(q)
    return -1 if r else 0


cdef int push(Replies *q, iovec *iov, int n, size_t *paid) noexcept nogil:
    """rq_sendv's sending, qlock held: 0 sent or queued, -1 the client is gone, DROP. A copy
    in the queue counts in the buffer budget: out of `paid` first (what is left of it is the
    caller's to give back)."""
    cdef msghdr msg
    cdef ssize_t sent
    cdef size_t total = 0, off = 0
    cdef int i
    cdef OutMsg *m
    if q.qhead == NULL and not q.sender_busy and pthread_mutex_trylock(&q.send_lock) == 0:
        memset(&msg, 0, sizeof(msg))
        while n > 0:
            msg.msg_iov = iov
            msg.msg_iovlen = n
            sent = sendmsg(q.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
            if sent < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    q.dead = 1
                break
            n = consumed(&iov, n, sent)
        pthread_mutex_unlock(&q.send_lock)
        if n == 0 or q.dead:
            return -1 if q.dead else 0
    # copy what is left; a partly sent reply goes first (the queue is empty then)
    for i in range(n):
        total += iov[i].iov_len
    if q.qbytes and q.qbytes + total > QUEUE_MAX:
        return DROP
    m = out_alloc(q, sizeof(OutMsg) + total)
    if m == NULL:
        return DROP  # cannot keep the stream whole: drop the client
    q.qbytes += total
    if total > paid[0]:  # counted in the daemon's buffer memory until sent
        budget_force(total - paid[0])
        paid[0] = 0
    else:
        paid[0] -= total
    m.next = NULL
    m.length = total
    m.sent = 0
    m.data = <char *>m + sizeof(OutMsg)
    for i in range(n):
        memcpy(m.data + off, iov[i].iov_base, iov[i].iov_len)
        off += iov[i].iov_len
    if q.qtail == NULL:
        q.qhead = m
    else:
        q.qtail.next = m
    q.qtail = m
    pthread_cond_broadcast(&q.qcond)
    return 0


cdef int push_sink(Replies *q, size_t *paid) noexcept nogil:
    """The TLS records OpenSSL wrote (a reply, or its answer to a record it read) go out
    as a reply would; qlock held."""
    cdef iovec iov[1]
    cdef int r = 0
    if q.tls.sink_len:
        iov[0].iov_base = q.tls.sink
        iov[0].iov_len = q.tls.sink_len
        r = push(q, iov, 1, paid)
    tls_sink_done(q.tls)
    return r


cdef int rq_recv(Replies *q, char *buf, size_t n) noexcept nogil:
    """TLS: the loop's recv(), plaintext out of the client's records (tls_recv)."""
    cdef int r, e, d = 0
    cdef size_t paid = 0
    pthread_mutex_lock(&q.qlock)
    r = tls_recv(q.tls, buf, n)
    e = errno
    if q.tls.sink_len and not q.dead:  # e.g. a TLS 1.3 key update's answer
        d = push_sink(q, &paid)
    pthread_mutex_unlock(&q.qlock)
    if d == DROP:
        rq_drop(q)
    set_errno(e)  # what tls_recv said, not what sending its answer did
    return r


cdef void rq_tls_close(Replies *q) noexcept nogil:
    """After rq_drain: end TLS cleanly with close_notify, so the client knows its stream is
    whole (the sender thread has ended: the record is sent here, within SEND_STALL)."""
    cdef iovec iov[1]
    pthread_mutex_lock(&q.qlock)
    if q.tls != NULL and not q.dead and tls_close(q.tls) == 0 and q.tls.sink_len:
        iov[0].iov_base = q.tls.sink
        iov[0].iov_len = q.tls.sink_len
        pthread_mutex_lock(&q.send_lock)
        send_blocking(q, iov, 1)
        pthread_mutex_unlock(&q.send_lock)
    if q.tls != NULL:
        tls_sink_done(q.tls)
    pthread_mutex_unlock(&q.qlock)


cdef void rq_drop(Replies *q) noexcept nogil:
    """The client is gone or stopped reading: no more replies, and the loop, the sender
    and the client all see the socket shut."""
    pthread_mutex_lock(&q.qlock)
    q.dead = 1
    pthread_cond_broadcast(&q.qcond)
    pthread_mutex_unlock(&q.qlock)
    shutdown(q.fd, SHUT_RDWR)


cdef int send_blocking(Replies *q, iovec *iov, int n) noexcept nogil:
    """Write all of iov; the caller holds send_lock. 0 ok, -1 the client is gone (or took
    no byte for SEND_STALL seconds)."""
    cdef msghdr msg
    cdef ssize_t sent
    if q.dead:
        return -1
    memset(&msg, 0, sizeof(msg))
    while n > 0:
        msg.msg_iov = iov
        msg.msg_iovlen = n
        sent = sendmsg(q.fd, &msg, MSG_NOSIGNAL)
        if sent < 0:
            if errno == EINTR:
                continue
            return -1
        n = consumed(&iov, n, sent)
    return 0


cdef void rq_sender(Replies *q) noexcept nogil:
    """The sender thread: writes queued replies, blocking on the client so nobody else does.
    Runs until the connection is closed (rq_close) and the queue is empty."""
    cdef OutMsg *m
    cdef iovec iov[1]
    cdef int r
    while True:
        pthread_mutex_lock(&q.qlock)
        while q.qhead == NULL and not q.closing:
            pthread_cond_wait(&q.qcond, &q.qlock)
        m = q.qhead
        if m == NULL or q.dead:
            pthread_mutex_unlock(&q.qlock)
            break
        q.qhead = m.next
        if q.qhead == NULL:
            q.qtail = NULL
        q.qbytes -= m.length
        q.sender_busy = 1
        pthread_mutex_unlock(&q.qlock)
        pthread_mutex_lock(&q.send_lock)
        iov[0].iov_base = m.data
        iov[0].iov_len = m.length
        r = send_blocking(q, iov, 1)
        pthread_mutex_unlock(&q.send_lock)
        budget_give(m.length)
        if r < 0:
            rq_drop(q)
        pthread_mutex_lock(&q.qlock)
        out_free(q, m)
        q.sender_busy = 0
        pthread_cond_broadcast(&q.qcond)
        pthread_mutex_unlock(&q.qlock)


cdef void rq_close(Replies *q) noexcept nogil:
    """No more replies will come: the sender thread ends once the queue is empty."""
    pthread_mutex_lock(&q.qlock)
    q.closing = 1
    pthread_cond_broadcast(&q.qcond)
    pthread_mutex_unlock(&q.qlock)


cdef void rq_drain(Replies *q) noexcept nogil:
    """rq_close, then wait until the sender thread wrote out what is queued (or the client
    is gone)."""
    pthread_mutex_lock(&q.qlock)
    q.closing = 1
    pthread_cond_broadcast(&q.qcond)
    while (q.qhead != NULL or q.sender_busy) and not q.dead:
        pthread_cond_wait(&q.qcond, &q.qlock)
    pthread_mutex_unlock(&q.qlock)


cdef int rq_simple(Replies *q, uint64_t cookie, uint32_t error, char *data, size_t length) noexcept nogil:
    cdef char hdr[16]
    cdef iovec iov[2]
    put32(hdr, SIMPLE_REPLY_MAGIC)
    put32(hdr + 4, error)
    memcpy(hdr + 8, &cookie, 8)  # the cookie is opaque: echo its bytes
    iov[0].iov_base = hdr
    iov[0].iov_len = 16
    iov[1].iov_base = data
    iov[1].iov_len = length if not error else 0
    return rq_sendv(q, iov, 2 if length and not error else 1)


cdef int rq_data(Replies *q, bint structured, uint64_t cookie, uint64_t offset, char *data,
                 size_t length) noexcept nogil:
    cdef char hdr[28]
    cdef iovec iov[2]
    if not structured:
        return rq_simple(q, cookie, 0, data, length)
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
    return rq_sendv(q, iov, 2)


cdef int rq_error(Replies *q, bint structured, uint64_t cookie, uint32_t error,
                  bint structured_cmd) noexcept nogil:
    """An error reply: structured for READ and BLOCK_STATUS when negotiated, as the spec asks."""
    cdef char hdr[26]
    cdef iovec iov[1]
    if not (structured and structured_cmd):
        return rq_simple(q, cookie, error, NULL, 0)
    put32(hdr, STRUCTURED_REPLY_MAGIC)
    put16(hdr + 4, REPLY_FLAG_DONE)
    put16(hdr + 6, REPLY_TYPE_ERROR)
    memcpy(hdr + 8, &cookie, 8)
    put32(hdr + 16, 6)
    put32(hdr + 20, error)
    put16(hdr + 24, 0)
    iov[0].iov_base = hdr
    iov[0].iov_len = 26
    return rq_sendv(q, iov, 1)
