from libc.stdint cimport uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec
from appliance._fast.sync cimport pthread_mutex_t, pthread_cond_t
from appliance._fast.gate cimport Gate

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_equal(pthread_t, pthread_t)
    int pthread_mutex_trylock(pthread_mutex_t *)

# A reply that could not be sent at once, waiting for the connection's sender thread.
cdef struct OutMsg:
    OutMsg *next
    size_t length
    size_t sent
    char *data

cdef class Connection:
    cdef readonly int fd
    cdef Gate gate
    cdef object dispatch
    cdef readonly bint structured
    cdef readonly bint read_only
    cdef readonly uint64_t size
    cdef uint32_t max_block
    cdef uint16_t allowed_cmds
    # receive buffer: headers are parsed from here in batches
    cdef char *rbuf
    cdef size_t rstart, rend, rcap
    # data buffer for the fast path, page aligned for O_DIRECT
    cdef char *iobuf
    cdef size_t iocap
    cdef pthread_mutex_t send_lock
    # replies from other threads that the socket would not take at once
    cdef pthread_mutex_t qlock
    cdef pthread_cond_t qcond
    cdef OutMsg *qhead
    cdef OutMsg *qtail
    cdef bint sender_busy
    cdef size_t qbytes
    cdef bint closing
    cdef pthread_t loop_thread
    cdef bint looping
    cdef pthread_mutex_t lock
    cdef pthread_cond_t idle
    cdef int inflight
    cdef int max_inflight
    cdef bint dead
    cdef readonly object close_reason
    cdef readonly unsigned long long requests
    cdef readonly unsigned long long fast_requests

    cdef int fill(self, size_t need) noexcept nogil
    cdef int take(self, char *dst, size_t length) noexcept nogil
    cdef int ensure_iobuf(self, size_t length) noexcept nogil
    cdef int sendv(self, iovec *iov, int n) noexcept nogil
    cdef int send_blocking(self, iovec *iov, int n) noexcept nogil
    cdef int post(self, iovec *iov, int n) noexcept nogil
    cdef int send_simple(self, uint64_t cookie, uint32_t error, char *data, size_t length) noexcept nogil
    cdef int send_data(self, uint64_t cookie, uint64_t offset, char *data, size_t length) noexcept nogil
    cdef int send_error(self, uint64_t cookie, uint32_t error, bint structured_cmd) noexcept nogil
    cdef void done_one(self) noexcept nogil
    cdef int fast(self, uint16_t cmd, uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t length) noexcept nogil
    cdef int ramback_after(self, int i, uint64_t end) noexcept nogil
    cdef int check(self, uint16_t cmd, uint16_t flags, uint64_t offset, uint32_t length) noexcept nogil
