from appliance._fast.uring cimport Queue

# The daemon's buffer memory for requests in flight and for replies waiting for slow clients,
# shared by every connection. A loop that finds no room waits (its Waiter is woken through its
# queue when room is made); replies are never held back, only counted.
cdef struct Waiter:
    Waiter *next
    Waiter *prev
    Queue *q
    int listed
    int woken           # set with the queue's wake: the loop must try again even if it reaped the wake

cdef int budget_take(size_t n, Waiter *w) noexcept nogil
cdef void budget_force(size_t n) noexcept nogil
cdef void budget_give(size_t n) noexcept nogil
cdef void budget_forget(Waiter *w) noexcept nogil
