from libc.stdint cimport uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec
from appliance._fast.sync cimport pthread_mutex_t, pthread_cond_t
from appliance._fast.gate cimport Gate
from appliance._fast.uring cimport IoOp, Queue
from appliance._fast.replies cimport Replies
from appliance._fast.tls cimport TlsSession
from appliance._fast.budget cimport Waiter

cdef enum:
    MAX_PIECES = 8      # engine I/Os one fast request may need
    BATCH_REPLIES = 32  # fast replies gathered into one sendmsg

# One request of the connection being served by the fast path (or being received).
cdef struct Req:
    uint64_t cookie
    uint64_t offset
    uint32_t length
    uint16_t cmd
    uint16_t flags
    char *buf           # page aligned, for O_DIRECT; kept for the next request if small
    size_t cap
    size_t budget       # bytes of the daemon's buffer budget its buffer holds while in flight
    size_t paid         # and a READ's for its reply, should the reply wait in the sender's queue
    int pending         # engine I/Os not finished
    int err             # the first error of any piece (host errno)
    int next_free
    int seg             # the gate segment a fast request started in
    int retry           # a descriptor it used has errors_slow
    int fixed           # buf is registered with the engine's queue, slot = the request's index
    IoOp ops[MAX_PIECES]

# Fast replies the loop gathers while it reaps, sent with one sendmsg: fewer system calls
# here and fewer wakeups for the client. Their requests are freed once sent (or queued).
cdef struct Batch:
    int n
    int niov
    size_t paid         # budget its READs took for their replies, should the socket not take them
    Req *reqs[BATCH_REPLIES]
    char hdr[BATCH_REPLIES][28]
    iovec iov[2 * BATCH_REPLIES]

cdef class Connection:
    cdef readonly int fd
    cdef Gate gate
    cdef object dispatch
    cdef object unplug
    cdef readonly bint structured
    cdef readonly bint read_only
    cdef readonly uint64_t size
    cdef uint32_t max_block
    # receive buffer: headers are parsed from here in batches
    cdef char *rbuf
    cdef size_t rstart, rend, rcap
    # requests: a fixed table of `depth`, free ones on a stack (the last freed has a warm buffer)
    cdef Req *reqs
    cdef readonly int depth
    cdef uint32_t poll_us
    cdef int free_head
    cdef int nfast      # fast requests with I/O in the engine (loop thread only)
    cdef size_t ncached # bytes of buffers free requests keep
    cdef Queue q
    cdef bint fixed_refused  # the engine registers no more buffers for this connection
    cdef uint64_t copy_ns    # what a buffered write's copy costs here, averaged (fan-outs only)
    cdef Batch batch
    cdef bint q_ready
    cdef bint eof
    # a request read and checked that waits for room in the daemon's buffer budget
    cdef bint held
    cdef uint16_t held_cmd, held_flags
    cdef uint64_t held_cookie, held_offset
    cdef uint32_t held_length, held_e
    cdef bint starved   # get_req found no room in the budget
    cdef Waiter waiter
    cdef int why        # why the loop stopped reading (a REASON_ code)
    cdef uint64_t why_value
    cdef bint slow_since_wait
    cdef Replies out
    cdef TlsSession tls     # None: plaintext
    cdef pthread_mutex_t lock
    cdef pthread_cond_t idle
    cdef int inflight   # slow-path requests not answered yet
    cdef readonly object close_reason
    cdef readonly unsigned long long requests
    cdef readonly unsigned long long fast_requests

    cdef ssize_t recv_some(self, char *buf, size_t n) noexcept nogil
    cdef int take(self, char *dst, size_t length) noexcept nogil
    cdef int next_header(self) noexcept nogil
    cdef Req *get_req(self, size_t length, size_t reply) noexcept nogil
    cdef void unregister(self, Req *r) noexcept nogil
    cdef void put_req(self, Req *r) noexcept nogil
    cdef void done_one(self) noexcept nogil
    cdef int start_fast(self, Req *r) noexcept nogil
    cdef void finish(self, Req *r) noexcept nogil
    cdef void redo_slow(self, Req *r) noexcept nogil
    cdef void flush_replies(self) noexcept nogil
    cdef int reap(self) noexcept nogil
    cdef void op_done(self, IoOp *op) noexcept nogil
    cdef void piece_done(self, Req *r) noexcept nogil
    cdef void wait(self, bint want_socket) noexcept nogil
    cdef int one_request(self) noexcept nogil
    cdef int start_request(self, uint16_t cmd, uint16_t flags, uint64_t cookie, uint64_t offset,
                           uint32_t length, uint32_t e) noexcept nogil
    cdef int hold(self, uint16_t cmd, uint16_t flags, uint64_t cookie, uint64_t offset,
                  uint32_t length, uint32_t e) noexcept nogil
    cdef void dispatch_slow(self, uint16_t cmd, uint16_t flags, uint64_t cookie, uint64_t offset,
                            uint32_t length, Req *r) noexcept with gil
    cdef void free_all(self) noexcept nogil
    cdef void unplug_slow(self) noexcept with gil
    cdef int check(self, uint16_t cmd, uint16_t flags, uint64_t offset, uint32_t length) noexcept nogil
