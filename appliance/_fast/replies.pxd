from libc.stdint cimport uint32_t, uint64_t
from posix.uio cimport iovec
from appliance._fast.sync cimport pthread_mutex_t, pthread_cond_t
from appliance._fast.tls cimport TlsChan

# A reply that could not be sent at once, waiting for the connection's sender thread.
cdef struct OutMsg:
    OutMsg *next
    size_t cap                  # bytes allocated, OutMsg included
    size_t length
    size_t sent
    char *data

# A connection's outgoing side: replies go out whole, from any thread, never cut by another;
# what the socket does not take at once waits here for the sender thread (rq_sender).
# With TLS, replies are encrypted under qlock, in the order they go out; the loop's reads
# (rq_recv) take qlock too, as the SSL is one for both directions.
cdef struct Replies:
    int fd
    pthread_mutex_t send_lock   # held by whoever writes to the socket
    pthread_mutex_t qlock
    pthread_cond_t qcond
    OutMsg *qhead
    OutMsg *qtail
    OutMsg *spares              # sent big replies' buffers, kept for the next ones
    int nspares
    int sender_busy
    size_t qbytes
    int closing
    int dead                    # the client is gone or stopped reading: no more replies
    TlsChan *tls                # NULL: plaintext

cdef void rq_init(Replies *q, int fd) noexcept nogil
cdef void rq_free(Replies *q) noexcept nogil
cdef int rq_sendv(Replies *q, iovec *iov, int n) noexcept nogil
cdef int rq_sendv_paid(Replies *q, iovec *iov, int n, size_t paid) noexcept nogil
cdef void rq_drop(Replies *q) noexcept nogil
cdef void rq_sender(Replies *q) noexcept nogil
cdef void rq_close(Replies *q) noexcept nogil
cdef void rq_drain(Replies *q) noexcept nogil
cdef int rq_recv(Replies *q, char *buf, size_t n) noexcept nogil
cdef void rq_tls_close(Replies *q) noexcept nogil
cdef int rq_simple(Replies *q, uint64_t cookie, uint32_t error, char *data, size_t length) noexcept nogil
cdef int rq_data(Replies *q, bint structured, uint64_t cookie, uint64_t offset, char *data,
                 size_t length) noexcept nogil
cdef int rq_error(Replies *q, bint structured, uint64_t cookie, uint32_t error,
                  bint structured_cmd) noexcept nogil
