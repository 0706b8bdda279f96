# cython: language_level=3
"""The daemon-wide cap on buffer memory (declarations in budget.pxd).

A request's buffer is taken from the budget when the loop starts the request and given back
when it is answered; reply bytes copied for a client that reads slowly count until they are
sent. A request that finds no room is not failed: its loop stops reading requests and sleeps
until a buffer is given back (budget_give wakes every waiting loop). A request may always go
when nothing else holds the budget, so one larger than the cap still runs, alone.
"""

from appliance._fast.sync cimport pthread_mutex_t, pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock
from appliance._fast.uring cimport queue_wake

cdef pthread_mutex_t lock
cdef size_t limit = 1 << 30
cdef size_t used = 0
cdef size_t peak = 0
cdef unsigned long long waits = 0
cdef Waiter *waiting = NULL
pthread_mutex_init(&lock, NULL)


cdef inline void unlink(Waiter *w) noexcept nogil:
    if w.prev != NULL:
        w.prev.next = w.next
    else:
        global waiting
        waiting = w.next
    if w.next != NULL:
        w.next.prev = w.prev
    w.next = w.prev = NULL
    w.listed = 0


cdef int budget_take(size_t n, Waiter *w) noexcept nogil:
    """1: n bytes are the caller's; 0: no room now, w is woken when there may be."""
    global used, peak, waits, waiting
    pthread_mutex_lock(&lock)
    w.woken = 0
    if used == 0 or used + n <= limit:
        used += n
        if used > peak:
            peak = used
        if w.listed:
            unlink(w)
        pthread_mutex_unlock(&lock)
        return 1
    if not w.listed:
        waits += 1
        w.prev = NULL
        w.next = waiting
        if waiting != NULL:
            waiting.prev = w
        waiting = w
        w.listed = 1
    pthread_mutex_unlock(&lock)
    return 0


cdef void budget_force(size_t n) noexcept nogil:
    global used, peak
    pthread_mutex_lock(&lock)
    used += n
    if used > peak:
        peak = used
    pthread_mutex_unlock(&lock)


cdef void budget_give(size_t n) noexcept nogil:
    global used
    cdef Waiter *w
    if n == 0:
        return
    pthread_mutex_lock(&lock)
    used -= n
    if used < limit:
        while waiting != NULL:  # every waiting loop tries again; the first ones get the room
            w = waiting
            unlink(w)
            w.woken = 1
            queue_wake(w.q)
    pthread_mutex_unlock(&lock)


cdef void budget_forget(Waiter *w) noexcept nogil:
    """The loop ends: not to be woken any more."""
    pthread_mutex_lock(&lock)
    if w.listed:
        unlink(w)
    pthread_mutex_unlock(&lock)


def set_limit(size_t n):
    """[export] buffer_memory (bytes); a smaller limit applies as buffers are given back."""
    global limit
    with nogil:
        pthread_mutex_lock(&lock)
        limit = n
        pthread_mutex_unlock(&lock)


def stats():
    """For status: {"limit", "used", "peak" (bytes), "waits" (times a loop waited for room)}."""
    cdef size_t l, u, p
    cdef unsigned long long n
    with nogil:
        pthread_mutex_lock(&lock)
        l, u, p, n = limit, used, peak, waits
        pthread_mutex_unlock(&lock)
    return {"limit": l, "used": u, "peak": p, "waits": n}
