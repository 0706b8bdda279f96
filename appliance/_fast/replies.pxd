from libc.stdint cimport uint32_t, uint64_t
from posix.uio cimport iovec
from appliance._fast.sync cimport pthread_mutex_t, pthread_cond_t

# A reply that could not be sent at once, waiting for the connection's sender thread.
cdef struct OutMsg:
    OutMsg *next
    size_t length
    size_t sent
    char *data

# A connection's outgoing side: replies go out whole, from any thread, never cut by another;
# what the socket does not take at once waits here for the sender thread (rq_sender).
cdef struct Replies:
    int fd
    pthread_mutex_t send_lock   # held by whoever writes to the socket
    pthread_mutex_t qlock
    pthread_cond_t qcond
    OutMsg *qhead
    OutMsg *qtail
    int sender_busy
    size_t qbytes
    int closing
    int dead                    # the client is gone or stopped reading: no more replies

cdef void rq_init(Replies *q, int fd) noexcept nogil
cdef void rq_free(Replies *q) noexcept nogil
cdef int rq_sendv(Replies *q, iovec *iov, int n) noexcept nogil
cdef void rq_drop(Replies *q) noexcept nogil
cdef void rq_sender(Replies *q) noexcept nogil
cdef void rq_close(Replies *q) noexcept nogil
cdef void rq_drain(Replies *q) noexcept nogil
cdef int rq_simple(Replies *q, uint64_t cookie, uint32_t error, char *data, size_t length) noexcept nogil
cdef int rq_data(Replies *q, bint structured, uint64_t cookie, uint64_t offset, char *data,
                 size_t length) noexcept nogil
cdef int rq_error(Replies *q, bint structured, uint64_t cookie, uint32_t error,
                  bint structured_cmd) noexcept nogil
