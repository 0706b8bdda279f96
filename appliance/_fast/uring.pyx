# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The I/O engine's C side: io_uring through liburing, or a pool of nogil worker threads.

Two users:
- the NBD loop (transmit.pyx) owns one `Queue` per connection. It submits `IoOp`s,
  polls `efd` together with its socket, and reaps finished ops itself, so no thread is
  held while the disk works and a buffered read that hits the page cache completes
  inside the submit call (io_uring tries it without blocking first).
- `Ring`, behind appliance/engine.py's Python API: one ring per process and a
  completion thread that calls the `done` callbacks.

`kind()` says which engine runs: "io_uring" where io_uring_queue_init works, "threads"
where it does not (an old kernel, io_uring disabled by sysctl or seccomp) or where the
environment says APPLIANCE_ENGINE=threads (tests cover both that way).
"""

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset, strcmp
from libc.stdlib cimport getenv
from libc.errno cimport errno, EINTR, EAGAIN
from posix.uio cimport iovec

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *, unsigned long, int)
    short POLLIN
from posix.unistd cimport pread, pwrite, fdatasync, read, write, close
from appliance._fast.sync cimport (pthread_mutex_t, pthread_cond_t, pthread_mutex_init,
    pthread_mutex_destroy, pthread_mutex_lock, pthread_mutex_unlock, pthread_cond_init,
    pthread_cond_wait, pthread_cond_signal)

cdef extern from "<sched.h>" nogil:
    ctypedef struct cpu_set_t:
        pass
    int sched_getaffinity(int, size_t, cpu_set_t *)
    int CPU_COUNT(cpu_set_t *)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int, int)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *, const void *, void *(*)(void *) noexcept nogil, void *)
    int pthread_detach(pthread_t)

cdef extern from "<liburing.h>" nogil:
    struct io_uring_sqe:
        pass
    struct io_uring_cqe:
        uint64_t user_data
        int res
    int io_uring_queue_init(unsigned, io_uring *, unsigned)
    void io_uring_queue_exit(io_uring *)
    io_uring_sqe *io_uring_get_sqe(io_uring *)
    int io_uring_submit(io_uring *)
    int io_uring_peek_cqe(io_uring *, io_uring_cqe **)
    int io_uring_wait_cqe(io_uring *, io_uring_cqe **)
    void io_uring_cqe_seen(io_uring *, io_uring_cqe *)
    void io_uring_prep_read(io_uring_sqe *, int, void *, unsigned, uint64_t)
    void io_uring_prep_read_fixed(io_uring_sqe *, int, void *, unsigned, uint64_t, int)
    void io_uring_prep_write_fixed(io_uring_sqe *, int, const void *, unsigned, uint64_t, int)
    int io_uring_register_buffers_sparse(io_uring *, unsigned)
    int io_uring_register_buffers_update_tag(io_uring *, unsigned, const iovec *, const uint64_t *, unsigned)
    void io_uring_prep_write(io_uring_sqe *, int, const void *, unsigned, uint64_t)
    void io_uring_prep_fsync(io_uring_sqe *, int, unsigned)
    void io_uring_prep_nop(io_uring_sqe *)
    void io_uring_prep_poll_add(io_uring_sqe *, int, unsigned)
    int io_uring_submit_and_wait(io_uring *, unsigned)
    void io_uring_sqe_set_data64(io_uring_sqe *, uint64_t)
    void io_uring_sqe_set_flags(io_uring_sqe *, unsigned)
    unsigned IOSQE_ASYNC
    unsigned IORING_FSYNC_DATASYNC
    unsigned IORING_SETUP_SINGLE_ISSUER
    unsigned IORING_SETUP_DEFER_TASKRUN
    unsigned IORING_SETUP_TASKRUN_FLAG
    unsigned IORING_SQ_TASKRUN
    unsigned io_uring_cq_ready(io_uring *)

DEF KIND_URING = 1
DEF KIND_THREADS = 2
DEF WORKERS = 16
DEF POLL_MIN_OPS = 2      # ops at the disk before queue_wait polls (see there)
DEF POLL_START_NS = 4000  # the first poll after waits that ended soon (QEMU's 4 us)

cdef extern from *:
    """
    #define uring_take(p) __atomic_add_fetch((p), 1, __ATOMIC_RELAXED)
    #define uring_give(p) __atomic_sub_fetch((p), 1, __ATOMIC_RELAXED)
    #define uring_flags(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    """
    int uring_take(int *p) nogil
    int uring_give(int *p) nogil
    unsigned uring_flags(unsigned *p) nogil  # the kernel writes them: read anew each time
    uint64_t uring_add "__atomic_add_fetch"(uint64_t *p, uint64_t v, int order) nogil
    uint64_t uring_load "__atomic_load_n"(uint64_t *p, int order) nogil
    int uring_count "__atomic_load_n"(int *p, int order) nogil
    int __ATOMIC_RELAXED

# Loops that poll at once, at most: one CPU is always left to the threads that do the
# work the pollers wait for (other connections, the slow path, the clients on this
# machine), and one more to each background job running (a target's copy of its data,
# engine.background), which would otherwise lose its CPU to a spin; a loop that finds no
# room sleeps at once. None on a single CPU. The CPUs are counted when a connection
# starts (queue_init): the ones the daemon may run on then.
cdef int max_pollers = 0
cdef int pollers = 0
cdef int jobs = 0
# what polling cost and caught, for status: ns spent polling, polls that saw news in time,
# polls that gave up and slept
cdef uint64_t poll_spent = 0, poll_caught = 0, poll_missed = 0


def poll_stats():
    return {"cpu_seconds": round(uring_load(&poll_spent, __ATOMIC_RELAXED) / 1e9, 3),
            "caught": uring_load(&poll_caught, __ATOMIC_RELAXED),
            "gave_up": uring_load(&poll_missed, __ATOMIC_RELAXED),
            "background_jobs": uring_count(&jobs, __ATOMIC_RELAXED)}


def background(int n):
    """A background job started (n = 1) or ended (n = -1): see max_pollers."""
    if n > 0:
        uring_take(&jobs)
    else:
        uring_give(&jobs)

cdef int _kind = 0


cdef int probe() noexcept nogil:
    cdef io_uring r
    if io_uring_queue_init(4, &r, 0) != 0:
        return KIND_THREADS
    io_uring_queue_exit(&r)
    return KIND_URING


cdef int decide() noexcept nogil:
    global _kind
    cdef const char *env
    if _kind == 0:
        env = getenv("APPLIANCE_ENGINE")
        _kind = KIND_THREADS if env != NULL and strcmp(env, "threads") == 0 else probe()
    return _kind


def kind():
    """"io_uring" or "threads": the engine this process uses."""
    return "io_uring" if decide() == KIND_URING else "threads"


# ---- the worker pool (the fallback) ------------------------------------------------

cdef pthread_mutex_t pool_lock
cdef pthread_cond_t pool_cond
cdef IoOp *pool_head = NULL
cdef IoOp *pool_tail = NULL
cdef int pool_started = 0
pthread_mutex_init(&pool_lock, NULL)
pthread_cond_init(&pool_cond, NULL)


cdef void run_op(IoOp *op) noexcept nogil:
    """Do one op whole in the calling thread: short transfers continue, EOF ends a read."""
    cdef int64_t r
    cdef uint64_t done = 0
    if op.op == OP_FSYNC:
        op.res = 0 if fdatasync(op.fd) == 0 else -errno
        return
    while done < op.len:
        if op.op == OP_READ:
            r = pread(op.fd, op.buf + done, op.len - done, op.off + done)
        else:
            r = pwrite(op.fd, op.buf + done, op.len - done, op.off + done)
        if r < 0:
            if errno == EINTR:
                continue
            op.res = -errno
            return
        if r == 0:
            break
        done += r
    op.res = done


cdef void *worker(void *arg) noexcept nogil:
    global pool_head, pool_tail
    cdef IoOp *op
    cdef Queue *q
    cdef uint64_t one = 1
    while True:
        pthread_mutex_lock(&pool_lock)
        while pool_head == NULL:
            pthread_cond_wait(&pool_cond, &pool_lock)
        op = pool_head
        pool_head = op.next
        if pool_head == NULL:
            pool_tail = NULL
        pthread_mutex_unlock(&pool_lock)
        run_op(op)
        q = <Queue *>op.owner
        op.next = NULL
        pthread_mutex_lock(&q.lock)
        if q.done_tail == NULL:
            q.done_head = op
        else:
            q.done_tail.next = op
        q.done_tail = op
        # under the lock: once the owner has reaped its last op it may close efd (queue_exit
        # takes the lock), and a write after that could land on a reused descriptor
        write(q.efd, &one, 8)
        pthread_mutex_unlock(&q.lock)
    return NULL


cdef int start_pool() noexcept nogil:
    global pool_started
    cdef pthread_t t
    cdef int i
    pthread_mutex_lock(&pool_lock)
    if not pool_started:
        for i in range(WORKERS):
            if pthread_create(&t, NULL, worker, NULL) != 0:
                break
            pthread_detach(t)
            pool_started += 1
    i = pool_started
    pthread_mutex_unlock(&pool_lock)
    return i > 0


# ---- a submitter's queue ----------------------------------------------------------

cdef int queue_init(Queue *q, unsigned entries, unsigned nbufs, uint64_t poll_max_ns) noexcept nogil:
    """0 ok, else -errno. Uses io_uring if the process does, else the worker pool. Only the
    thread that calls this may submit, reap and wait on the queue. `nbufs`: slots for the
    submitter's registered buffers (queue_set_buffer), where the kernel has them.
    `poll_max_ns`: how long queue_wait may poll for news before it sleeps (io_uring only)."""
    global max_pollers
    cdef cpu_set_t cpus
    memset(q, 0, sizeof(Queue))
    pthread_mutex_init(&q.lock, NULL)
    q.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if q.efd < 0:
        return -errno
    q.kind = KIND_THREADS
    q.sock_ready = 1
    # one thread submits and waits (the owner), so completions can wait for it to ask
    # for them: no interrupt of whatever it is doing (Linux 6.1; without, where older).
    # TASKRUN_FLAG: the kernel says in the ring when such completions wait, so a poll
    # sees them without a system call, and a reap enters the kernel only then
    if decide() == KIND_URING and (
            io_uring_queue_init(entries, &q.ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
                                | IORING_SETUP_TASKRUN_FLAG) == 0
            or io_uring_queue_init(entries, &q.ring, 0) == 0):
        q.kind = KIND_URING
        q.poll_max_ns = poll_max_ns
        if poll_max_ns and sched_getaffinity(0, sizeof(cpus), &cpus) == 0:
            max_pollers = CPU_COUNT(&cpus) - 1
        # an empty table to fill as buffers come (Linux 5.19; none before: plain reads)
        if nbufs and io_uring_register_buffers_sparse(&q.ring, nbufs) == 0:
            q.nbufs = nbufs
    if q.kind == KIND_THREADS and not start_pool():
        close(q.efd)
        return -11
    return 0


cdef int queue_set_buffer(Queue *q, int slot, char *buf, size_t len) noexcept nogil:
    """Register buf..buf+len in the kernel as buffer `slot` (buf NULL: forget the slot's, as
    must be done before that memory is freed). A read or write into a registered buffer
    (an op whose buf_index names it) skips pinning its pages on every O_DIRECT I/O. 0 if
    ops may now name the slot, -1 if not (no table, or the kernel refused, e.g. over
    RLIMIT_MEMLOCK): they go as plain reads and writes then."""
    cdef iovec iov
    if slot < 0 or slot >= q.nbufs:
        return -1
    iov.iov_base = buf
    iov.iov_len = len if buf != NULL else 0
    if io_uring_register_buffers_update_tag(&q.ring, slot, &iov, NULL, 1) != 1:
        return -1
    return 0 if buf != NULL else -1


cdef void queue_exit(Queue *q) noexcept nogil:
    """Only once nothing is in flight."""
    if q.kind == KIND_URING:
        io_uring_queue_exit(&q.ring)
    q.nbufs = 0
    pthread_mutex_lock(&q.lock)
    if q.efd >= 0:
        close(q.efd)
    q.efd = -1
    pthread_mutex_unlock(&q.lock)
    pthread_mutex_destroy(&q.lock)
    q.kind = 0


cdef io_uring_sqe *get_sqe(Queue *q) noexcept nogil:
    cdef io_uring_sqe *sqe = io_uring_get_sqe(&q.ring)
    if sqe == NULL:  # the submission ring is full: hand it what it has
        io_uring_submit(&q.ring)
        q.queued = 0
        sqe = io_uring_get_sqe(&q.ring)
    return sqe


cdef int queue_submit(Queue *q, IoOp *op) noexcept nogil:
    """Queue one op; io_uring ops go to the kernel at the next queue_flush() or queue_wait()."""
    global pool_head, pool_tail
    cdef io_uring_sqe *sqe
    op.owner = q
    op.next = NULL
    op.res = 0
    if q.kind == KIND_URING:
        sqe = get_sqe(q)
        if sqe == NULL:
            return -11
        if op.op == OP_READ:
            if op.buf_index >= 0 and op.buf_index < q.nbufs:
                io_uring_prep_read_fixed(sqe, op.fd, op.buf, <unsigned>op.len, op.off, op.buf_index)
            else:
                io_uring_prep_read(sqe, op.fd, op.buf, <unsigned>op.len, op.off)
        elif op.op == OP_WRITE:
            if op.buf_index >= 0 and op.buf_index < q.nbufs:
                io_uring_prep_write_fixed(sqe, op.fd, op.buf, <unsigned>op.len, op.off, op.buf_index)
            else:
                io_uring_prep_write(sqe, op.fd, op.buf, <unsigned>op.len, op.off)
        else:
            io_uring_prep_fsync(sqe, op.fd, IORING_FSYNC_DATASYNC)
        io_uring_sqe_set_data64(sqe, <uint64_t>op)
        if op.punt:
            io_uring_sqe_set_flags(sqe, IOSQE_ASYNC)
        q.queued += 1
        q.ops += 1
        return 0
    pthread_mutex_lock(&pool_lock)
    if pool_tail == NULL:
        pool_head = op
    else:
        pool_tail.next = op
    pool_tail = op
    pthread_cond_signal(&pool_cond)
    pthread_mutex_unlock(&pool_lock)
    return 0


cdef void queue_flush(Queue *q) noexcept nogil:
    if q.kind == KIND_URING and q.queued:
        io_uring_submit(&q.ring)
        q.queued = 0


cdef int queue_reap(Queue *q, IoOp **out, int max) noexcept nogil:
    """Up to `max` finished ops, without waiting. Each op's `res` is set."""
    cdef io_uring_cqe *cqe
    cdef IoOp *op
    cdef int n = 0
    if q.kind == KIND_URING:
        while n < max and io_uring_peek_cqe(&q.ring, &cqe) == 0:
            op = <IoOp *>cqe.user_data
            op.res = cqe.res
            io_uring_cqe_seen(&q.ring, cqe)
            if op == &q.sock_poll:
                q.sock_armed = 0
                q.sock_ready = 1
            elif op == &q.wake_poll:
                q.wake_armed = 0
                drain_efd(q)
            else:
                out[n] = op
                n += 1
                q.ops -= 1
        return n
    pthread_mutex_lock(&q.lock)
    while n < max and q.done_head != NULL:
        op = q.done_head
        q.done_head = op.next
        if q.done_head == NULL:
            q.done_tail = NULL
        out[n] = op
        n += 1
    pthread_mutex_unlock(&q.lock)
    return n


cdef void drain_efd(Queue *q) noexcept nogil:
    cdef uint64_t v
    read(q.efd, &v, 8)


cdef void arm(Queue *q, IoOp *op, int fd) noexcept nogil:
    cdef io_uring_sqe *sqe = get_sqe(q)
    if sqe != NULL:
        op.op = OP_POLL
        io_uring_prep_poll_add(sqe, fd, POLLIN)
        io_uring_sqe_set_data64(sqe, <uint64_t>op)


cdef inline bint news(Queue *q) noexcept nogil:
    """Completions wait: posted, or (DEFER_TASKRUN) waiting for this thread to post them."""
    return (uring_flags(q.ring.sq.kflags) & IORING_SQ_TASKRUN) != 0 or io_uring_cq_ready(&q.ring) != 0


cdef void queue_wait(Queue *q, int sockfd) noexcept nogil:
    """Submit what is queued and sleep until an op completes, queue_wake() is called, or
    (sockfd >= 0) sockfd is readable, which sets sock_ready. io_uring waits for all three
    in one io_uring_enter (the socket and efd are polled by the ring); the worker pool
    by poll().

    With io_uring it may poll the ring for up to poll_ns before it sleeps (QEMU's adaptive
    polling): on a virtual machine a sleeping thread takes tens of microseconds to wake (its
    idle CPU halts and the host must run it again), which is as long as a fast disk takes
    for an I/O, and the scheduler then tends to put the loop on the CPU of a client on the
    same machine, where the two take turns. It polls while the disk is busy with
    POLL_MIN_OPS or more of its ops, and for up to poll_max_ns after that, which covers the
    client's next requests after a batch of replies. The poll time doubles from 4 us while
    the busy disk's news comes within poll_max_ns of the wait's start, and drops to nothing
    when a wait outlasts that, so a slow disk is not polled for. A client at queue depth 1
    keeps one op at the disk: its loop does not poll, as its own wake-up is most of the
    round trip and polling did not shorten it (bench/direct.py); nor does an idle one. Nor
    does a loop that finds no room among max_pollers. A poller the scheduler preempts goes
    on polling, as QEMU's does: its busy CPU is what makes the scheduler move a thread that
    shares it (the client) to an idle one, where holding off the poll kept the two taking
    turns on one CPU (docs/HACKING.md).
    """
    cdef pollfd fds[2]
    cdef uint64_t t0, waited
    cdef bint polled, busy
    if q.kind == KIND_URING:
        if sockfd >= 0 and not q.sock_armed:
            arm(q, &q.sock_poll, sockfd)
            q.sock_armed = 1
        if not q.wake_armed:
            arm(q, &q.wake_poll, q.efd)
            q.wake_armed = 1
        if q.poll_max_ns == 0:  # the default: sleep at once, without reading the clock
            io_uring_submit_and_wait(&q.ring, 1)
            q.queued = 0
            return
        t0 = now_ns()
        busy = q.ops >= POLL_MIN_OPS
        if busy:
            q.busy_ns = t0
        if not busy and t0 - q.busy_ns > q.poll_max_ns:
            io_uring_submit_and_wait(&q.ring, 1)
            q.queued = 0
            return
        polled = 0
        if q.poll_ns:
            if uring_take(&pollers) <= max_pollers - uring_count(&jobs, __ATOMIC_RELAXED):
                polled = 1
                io_uring_submit(&q.ring)
                q.queued = 0
                while not news(q) and now_ns() - t0 < q.poll_ns:
                    pass
                uring_add(&poll_spent, now_ns() - t0, __ATOMIC_RELAXED)
                uring_add(&poll_caught if news(q) else &poll_missed, 1, __ATOMIC_RELAXED)
            uring_give(&pollers)
        io_uring_submit_and_wait(&q.ring, 1)  # at once when the poll saw news
        q.queued = 0
        if q.poll_ns and not polled:
            return  # no room to poll: this wait says nothing about the poll time
        waited = now_ns() - t0
        if waited <= q.poll_ns:
            pass  # the poll caught it
        elif waited > q.poll_max_ns:
            q.poll_ns = 0  # polling this long would not have caught it
        elif busy and q.poll_ns < q.poll_max_ns:
            q.poll_ns = q.poll_ns * 2 if q.poll_ns else POLL_START_NS
            if q.poll_ns > q.poll_max_ns:
                q.poll_ns = q.poll_max_ns
        return
    fds[0].fd = q.efd
    fds[0].events = POLLIN
    fds[0].revents = 0
    fds[1].fd = sockfd
    fds[1].events = POLLIN
    fds[1].revents = 0
    if poll(fds, 2 if sockfd >= 0 else 1, -1) > 0:
        if fds[0].revents:
            drain_efd(q)
        if sockfd >= 0 and fds[1].revents:
            q.sock_ready = 1


cdef void queue_wake(Queue *q) noexcept nogil:
    """Make queue_wait return (any thread)."""
    cdef uint64_t one = 1
    write(q.efd, &one, 8)


# ---- the Python API's ring (appliance/engine.py) ------------------------------------

cdef class Ring:
    """io_uring for Python callers: read/write/fsync submit at once; `run()` (a thread of
    its own) reaps and calls `done(result)` with the GIL. Submission holds the GIL, so
    there is one submitter at a time and one reaper, as liburing asks."""

    cdef io_uring ring
    cdef dict pending
    cdef uint64_t next_id
    cdef bint open
    cdef readonly unsigned long long submitted, completed

    def __cinit__(self, unsigned entries=256):
        cdef int r = io_uring_queue_init(entries, &self.ring, 0)
        if r != 0:
            raise OSError(-r, "io_uring_queue_init failed")
        self.open = True
        self.pending = {}
        self.next_id = 1

    def __dealloc__(self):
        if self.open:
            io_uring_queue_exit(&self.ring)

    cdef int _prep(self, uint64_t key, int op, int fd, char *buf, uint64_t n, uint64_t offset) except -1:
        cdef io_uring_sqe *sqe = io_uring_get_sqe(&self.ring)
        if sqe == NULL:
            io_uring_submit(&self.ring)
            sqe = io_uring_get_sqe(&self.ring)
            if sqe == NULL:
                raise OSError(11, "io_uring submission queue full")
        if op == OP_READ:
            io_uring_prep_read(sqe, fd, buf, <unsigned>n, offset)
        elif op == OP_WRITE:
            io_uring_prep_write(sqe, fd, buf, <unsigned>n, offset)
        elif op == OP_FSYNC:
            io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC if n else 0)
        else:
            io_uring_prep_nop(sqe)
        io_uring_sqe_set_data64(sqe, key)
        io_uring_submit(&self.ring)
        return 0

    cdef _start(self, int op, int fd, view, uint64_t offset, uint64_t done, callback):
        cdef unsigned char[::1] mv
        cdef const unsigned char[::1] cmv
        cdef char *p = NULL
        cdef uint64_t n = 0
        if view is not None:
            if op == OP_READ:
                mv = view
                n = mv.shape[0]
                p = <char *>&mv[0] if n else NULL
            else:
                cmv = view
                n = cmv.shape[0]
                p = <char *>&cmv[0] if n else NULL
        key = self.next_id
        self.next_id += 1
        self.pending[key] = (op, fd, view, offset, done, callback)
        self.submitted += 1
        self._prep(key, op, fd, p + done if p != NULL else NULL, n - done, offset + done)

    def read(self, int fd, buf, uint64_t offset, done):
        self._start(OP_READ, fd, memoryview(buf).cast("B"), offset, 0, done)

    def write(self, int fd, buf, uint64_t offset, done):
        self._start(OP_WRITE, fd, memoryview(buf).cast("B"), offset, 0, done)

    def fsync(self, int fd, done, datasync=True):
        key = self.next_id
        self.next_id += 1
        self.pending[key] = (OP_FSYNC, fd, None, 0, 0, done)
        self.submitted += 1
        self._prep(key, OP_FSYNC, fd, NULL, 1 if datasync else 0, 0)

    def stop(self):
        """Wake run() and make it return."""
        self._prep(0, 99, -1, NULL, 0, 0)

    def run(self):
        """The completion thread's body."""
        import logging
        cdef io_uring_cqe *cqe
        cdef int r, res
        cdef uint64_t key
        while True:
            with nogil:
                r = io_uring_wait_cqe(&self.ring, &cqe)
                if r == 0:
                    key = cqe.user_data
                    res = cqe.res
                    io_uring_cqe_seen(&self.ring, cqe)
            if r != 0:
                if r == -EINTR:
                    continue
                raise OSError(-r, "io_uring_wait_cqe failed")
            if key == 0:
                return
            op, fd, view, offset, done, callback = self.pending.pop(key)
            if res > 0 and op != OP_FSYNC and done + res < len(view):
                # a short transfer that is not at end of file: go on from where it stopped
                self.pending[key] = (op, fd, view, offset, done + res, callback)
                self._resume(key)
                continue
            self.completed += 1
            result = res if res < 0 else (done + res if op != OP_FSYNC else 0)
            view = None  # the buffer is the caller's again: it may close or reuse it in the callback
            try:
                callback(result)
            except BaseException:
                logging.getLogger("appliance.engine").exception("an I/O completion callback failed")

    cdef _resume(self, uint64_t key):
        cdef unsigned char[::1] mv
        cdef const unsigned char[::1] cmv
        cdef char *p
        op, fd, view, offset, done, callback = self.pending[key]
        if op == OP_READ:
            mv = view
            p = <char *>&mv[0]
        else:
            cmv = view
            p = <char *>&cmv[0]
        self._prep(key, op, fd, p + <uint64_t>done, len(view) - done, offset + done)

    @property
    def in_flight(self):
        return len(self.pending)
