# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A connection's replies: sent without blocking from the thread that has them.

Every reply is sent whole from the thread that has it, without waiting for the
client; what the socket does not take is copied to a queue the connection's
sender thread writes out, so a reply is never cut by another. A client that
stops reading is dropped when its queued replies pass QUEUE_MAX (256 MiB), or
when its socket takes no byte for SEND_STALL seconds (60, set by the loop);
the daemon and the other clients carry on.
"""

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EINTR, EAGAIN
from posix.uio cimport iovec
from appliance._fast.sync cimport (pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock,
    pthread_cond_init, pthread_cond_wait, pthread_cond_broadcast)
from appliance._fast.pagebuf cimport buf_alloc, buf_free
from appliance._fast.wire cimport (put16, put32, put64, consumed, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_ERROR)

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_trylock(pthread_mutex_t *)

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
        buf_free(<char *>m, sizeof(OutMsg) + m.length)
    q.qtail = NULL
    q.qbytes = 0


cdef int rq_sendv(Replies *q, iovec *iov, int n) noexcept nogil:
    """Send one whole reply without waiting for the client, from any thread: what the
    socket takes now goes now, the rest (or all, if replies are queued already or the
    socket is in use) is copied to the sender thread's queue. -1: the client is gone."""
    cdef msghdr msg
    cdef ssize_t sent
    cdef size_t total = 0, off = 0
    cdef int i
    cdef OutMsg *m
    pthread_mutex_lock(&q.qlock)
    if q.dead:
        pthread_mutex_unlock(&q.qlock)
        return -1
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
            pthread_mutex_unlock(&q.qlock)
            return -1 if q.dead else 0
    # copy what is left; a partly sent reply goes first (the queue is empty then)
    for i in range(n):
        total += iov[i].iov_len
    if q.qbytes and q.qbytes + total > QUEUE_MAX:
        pthread_mutex_unlock(&q.qlock)
        rq_drop(q)
        return -1
    m = <OutMsg *>buf_alloc(sizeof(OutMsg) + total)
    if m == NULL:
        pthread_mutex_unlock(&q.qlock)
        rq_drop(q)  # cannot keep the stream whole: drop the client
        return -1
    q.qbytes += total
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
    pthread_mutex_unlock(&q.qlock)
    return 0


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
        buf_free(<char *>m, sizeof(OutMsg) + m.length)
        if r < 0:
            rq_drop(q)
        pthread_mutex_lock(&q.qlock)
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
