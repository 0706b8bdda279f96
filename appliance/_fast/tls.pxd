from posix.uio cimport iovec

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef struct BIO:
        pass

# A TLS connection in transmission phase: OpenSSL's SSL over the client's socket. Records come
# in through recv() on fd (after `pre`, what arrived during the handshake); records going out
# collect in `sink` for the caller to send. Every call on one TlsChan must hold the lock of
# its connection's replies (replies.pyx): reads and writes share the SSL.
cdef struct TlsChan:
    SSL *ssl
    int fd
    char *pre
    size_t pre_len
    size_t pre_off
    int recv_err        # errno of the last failed recv
    char *sink
    size_t sink_len
    size_t sink_cap
    int sink_failed     # the sink could not grow: the stream is broken

cdef int tls_recv(TlsChan *c, char *buf, size_t n) noexcept nogil
cdef int tls_encrypt(TlsChan *c, iovec *iov, int n) noexcept nogil
cdef int tls_close(TlsChan *c) noexcept nogil
cdef void tls_sink_done(TlsChan *c) noexcept nogil

cdef class TlsContext:
    cdef SSL_CTX *ctx
    cdef readonly bint verify_peer

cdef class TlsSession:
    cdef SSL *ssl
    cdef BIO *rbio          # the handshake's memory BIOs, until attach()
    cdef BIO *wbio
    cdef TlsChan chan
    cdef readonly TlsContext context
    cdef bint attached
    cdef TlsChan *attach(self, int fd) except NULL
