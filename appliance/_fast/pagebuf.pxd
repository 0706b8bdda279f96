# Request and reply buffers: page aligned (O_DIRECT wants it), and given back to the system
# when big.
from libc.stdlib cimport free

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **, size_t, size_t)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *, size_t, int, int, int, long)
    int munmap(void *, size_t)
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS
    void *MAP_FAILED

cdef enum:
    # Buffers from here up are mapped and unmapped directly, whatever malloc's thresholds:
    # nothing of them stays in a thread's arena after free (a connection's threads come and go).
    MAP_MIN = 256 * 1024


cdef inline char *buf_alloc(size_t size) noexcept nogil:
    """Page-aligned memory that buf_free gives back to the system if big."""
    cdef void *p = NULL
    if size >= MAP_MIN:
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        return NULL if p == MAP_FAILED else <char *>p
    if posix_memalign(&p, 4096, size) != 0:
        return NULL
    return <char *>p


cdef inline void buf_free(char *p, size_t size) noexcept nogil:
    if p == NULL:
        return
    if size >= MAP_MIN:
        munmap(p, size)
    else:
        free(p)
