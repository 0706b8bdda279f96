from libc.stdint cimport int64_t, uint64_t
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC
from appliance._fast.sync cimport pthread_mutex_t

cdef extern from "<liburing.h>" nogil:
    struct io_uring_sq:
        unsigned *kflags
    struct io_uring:
        io_uring_sq sq

# what an IoOp does
cdef enum:
    OP_READ = 0
    OP_WRITE = 1
    OP_FSYNC = 2   # fdatasync
    OP_POLL = 3    # the queue's own: readiness of its owner's socket, or of efd

# One I/O on an fd. The submitter owns it until it comes back from reap().
cdef struct IoOp:
    int op
    int fd
    char *buf
    uint64_t len
    uint64_t off
    int64_t res        # bytes transferred or -errno, set by the engine
    int tag            # the submitter's: which request this belongs to
    int fua            # a write that must be followed by fdatasync (the loop does the second step)
    int punt           # io_uring: start it in a kernel worker (IOSQE_ASYNC), not inline
    int buf_index      # the queue's registered buffer that holds buf..buf+len, or -1
    IoOp *next         # engine-internal list link
    void *owner        # engine-internal: the Queue it completes to

# A submitter's end of the engine: one per NBD connection. queue_wait() sleeps until an
# op completes, someone calls queue_wake(), or the owner's socket has bytes (sock_ready).
cdef struct Queue:
    int kind           # 1 io_uring, 2 threads
    io_uring ring
    int efd            # written by queue_wake (and by the worker pool)
    int queued         # SQEs prepared, not yet submitted
    int sock_ready     # the socket was readable when last looked at
    IoOp sock_poll     # io_uring: the socket's poll, while armed
    IoOp wake_poll     # io_uring: efd's poll, while armed
    int sock_armed
    int wake_armed
    pthread_mutex_t lock
    IoOp *done_head    # threads: completed, not reaped yet
    IoOp *done_tail
    int nbufs          # io_uring: slots for registered buffers (0: none could be had)
    uint64_t poll_max_ns  # io_uring: the longest queue_wait polls before it sleeps (0: never)
    uint64_t poll_ns      # how long it polls now, between 0 and poll_max_ns (adaptive)
    int ops            # io_uring: ops submitted and not reaped yet
    uint64_t busy_ns   # when queue_wait last found POLL_MIN_OPS ops out (CLOCK_MONOTONIC)

cdef int queue_init(Queue *q, unsigned entries, unsigned nbufs, uint64_t poll_max_ns) noexcept nogil
cdef int queue_set_buffer(Queue *q, int slot, char *buf, size_t len) noexcept nogil
cdef void queue_exit(Queue *q) noexcept nogil
cdef int queue_submit(Queue *q, IoOp *op) noexcept nogil
cdef void queue_flush(Queue *q) noexcept nogil
cdef int queue_reap(Queue *q, IoOp **out, int max) noexcept nogil
cdef void queue_wait(Queue *q, int sockfd) noexcept nogil
cdef void queue_wake(Queue *q) noexcept nogil


cdef inline uint64_t now_ns() noexcept nogil:
    """CLOCK_MONOTONIC in ns (the loop's and the engine's timings)."""
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return <uint64_t>t.tv_sec * 1000000000 + <uint64_t>t.tv_nsec
