# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""TLS for NBD with OpenSSL, driven from here so the transmission phase runs without the GIL.

A TlsSession is one server-side SSL. During the handshake (protocol.ServerHandshake, sans-IO)
it works on memory BIOs: feed() takes the records the client sent, outgoing() gives the ones
to send, do_handshake()/read()/write() behave as ssl.SSLObject's and raise ssl's exceptions.
When the handshake is done, the transmission loop attach()es the session to the socket: the
SSL then reads through a BIO that recv()s from the socket without waiting (after what came
during the handshake and was not read yet), and writes into a sink the replies code sends
(replies.pyx: records go out whole, in order, from whichever thread has a reply).

Kernel TLS (TCP_ULP "tls") would move the records into the kernel; kernels without the tls
module (this project's test machines) cannot, so the records are OpenSSL's, here.
"""

from libc.string cimport memcpy
from libc.stdlib cimport malloc, realloc, free
from libc.limits cimport INT_MAX
from libc.errno cimport errno, EAGAIN, EINTR, EIO
from posix.uio cimport iovec
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

import os
import ssl

cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_get_error()
    void ERR_clear_error()
    const char *ERR_reason_error_string(unsigned long)
    void ERR_error_string_n(unsigned long, char *, size_t)

cdef extern from "<openssl/bio.h>" nogil:
    ctypedef struct BIO_METHOD:
        pass
    const BIO_METHOD *BIO_s_mem()
    BIO *BIO_new(const BIO_METHOD *)
    int BIO_free(BIO *)
    int BIO_read(BIO *, void *, int)
    int BIO_write(BIO *, const void *, int)
    size_t BIO_ctrl_pending(BIO *)
    int BIO_get_new_index()
    BIO_METHOD *BIO_meth_new(int, const char *)
    int BIO_meth_set_write(BIO_METHOD *, int (*)(BIO *, const char *, int) noexcept nogil)
    int BIO_meth_set_read(BIO_METHOD *, int (*)(BIO *, char *, int) noexcept nogil)
    int BIO_meth_set_ctrl(BIO_METHOD *, long (*)(BIO *, int, long, void *) noexcept nogil)
    void BIO_set_data(BIO *, void *)
    void *BIO_get_data(BIO *)
    void BIO_set_init(BIO *, int)
    void BIO_set_retry_read(BIO *)
    void BIO_clear_retry_flags(BIO *)
    int BIO_TYPE_SOURCE_SINK
    int BIO_CTRL_FLUSH
    int BIO_set_mem_eof_return(BIO *, int)

cdef extern from "<openssl/x509.h>" nogil:
    ctypedef struct X509:
        pass
    ctypedef struct X509_NAME:
        pass
    ctypedef struct X509_STORE:
        pass
    void X509_free(X509 *)
    X509_NAME *X509_get_subject_name(const X509 *)
    int X509_NAME_get_text_by_NID(X509_NAME *, int, char *, int)
    int NID_commonName
    const char *X509_verify_cert_error_string(long)
    int X509_STORE_set_flags(X509_STORE *, unsigned long)
    unsigned long X509_V_FLAG_CRL_CHECK
    long X509_V_OK

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_METHOD:
        pass
    const SSL_METHOD *TLS_server_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *)
    void SSL_CTX_free(SSL_CTX *)
    int SSL_CTX_set_min_proto_version(SSL_CTX *, int)
    int TLS1_2_VERSION
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *, const char *)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *, const char *, int)
    int SSL_CTX_check_private_key(const SSL_CTX *)
    int SSL_FILETYPE_PEM
    int SSL_CTX_load_verify_locations(SSL_CTX *, const char *, const char *)
    void SSL_CTX_set_verify(SSL_CTX *, int, void *)
    int SSL_VERIFY_PEER
    int SSL_VERIFY_FAIL_IF_NO_PEER_CERT
    X509_STORE *SSL_CTX_get_cert_store(const SSL_CTX *)
    unsigned long SSL_CTX_set_options(SSL_CTX *, unsigned long)
    unsigned long SSL_OP_NO_RENEGOTIATION
    unsigned long SSL_OP_IGNORE_UNEXPECTED_EOF
    unsigned long SSL_OP_NO_COMPRESSION
    int SSL_CTX_set_num_tickets(SSL_CTX *, size_t)
    long SSL_CTX_set_session_cache_mode(SSL_CTX *, long)
    long SSL_SESS_CACHE_OFF
    void SSL_CTX_set_read_ahead(SSL_CTX *, int)
    SSL *SSL_new(SSL_CTX *)
    void SSL_free(SSL *)
    void SSL_set_bio(SSL *, BIO *, BIO *)
    void SSL_set_accept_state(SSL *)
    int SSL_do_handshake(SSL *)
    int SSL_read(SSL *, void *, int)
    int SSL_write(SSL *, const void *, int)
    int SSL_shutdown(SSL *)
    int SSL_get_error(const SSL *, int)
    int SSL_ERROR_WANT_READ
    int SSL_ERROR_ZERO_RETURN
    int SSL_ERROR_SYSCALL
    X509 *SSL_get1_peer_certificate(const SSL *)
    long SSL_get_verify_result(const SSL *)
    const char *SSL_get_version(const SSL *)
    const char *SSL_get_cipher_name(const SSL *)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int, void *, size_t, int)
    int MSG_DONTWAIT

# nbdkit's --tls-certificates layout
CA, CERT, KEY, CRL = "ca-cert.pem", "server-cert.pem", "server-key.pem", "ca-crl.pem"

DEF RECORD = 16384          # TLS's largest record: small pieces are gathered up to this
# A sink larger than this is freed once sent. It keeps what a 1 MiB read's records take (the
# sink doubles up to 2 MiB for it): mapped afresh for every such reply (glibc maps blocks
# from 128 KiB up, heap.py), its page faults and zeroing cost a fifth of the throughput.
DEF SINK_KEEP = 2 * 1024 * 1024 + 65536


# the socket BIO of the transmission phase

cdef int chan_read(BIO *b, char *out, int n) noexcept nogil:
    cdef TlsChan *c = <TlsChan *>BIO_get_data(b)
    cdef ssize_t r
    BIO_clear_retry_flags(b)
    if c.pre_off < c.pre_len:  # what came with the handshake's last records goes first
        r = c.pre_len - c.pre_off
        if r > n:
            r = n
        memcpy(out, c.pre + c.pre_off, r)
        c.pre_off += r
        if c.pre_off == c.pre_len:
            free(c.pre)
            c.pre = NULL
            c.pre_len = c.pre_off = 0
        return <int>r
    while True:
        r = recv(c.fd, out, n, MSG_DONTWAIT)
        if r >= 0:
            return <int>r
        if errno == EINTR:
            continue
        if errno == EAGAIN:  # EWOULDBLOCK on Linux
            BIO_set_retry_read(b)
        else:
            c.recv_err = errno
        return -1


cdef int chan_write(BIO *b, const char *data, int n) noexcept nogil:
    """Records go to the sink; the caller sends them (never cut by another reply)."""
    cdef TlsChan *c = <TlsChan *>BIO_get_data(b)
    cdef size_t cap
    cdef char *p
    BIO_clear_retry_flags(b)
    if c.sink_len + n > c.sink_cap:
        cap = c.sink_cap * 2 if c.sink_cap else 2 * RECORD + 1024
        while cap < c.sink_len + n:
            cap *= 2
        p = <char *>realloc(c.sink, cap)
        if p == NULL:
            c.sink_failed = 1
            return -1
        c.sink = p
        c.sink_cap = cap
    memcpy(c.sink + c.sink_len, data, n)
    c.sink_len += n
    return n


cdef long chan_ctrl(BIO *b, int cmd, long num, void *ptr) noexcept nogil:
    return 1 if cmd == BIO_CTRL_FLUSH else 0


cdef BIO_METHOD *chan_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "nbd transmission")
if chan_method == NULL:
    raise MemoryError("cannot make the OpenSSL BIO method")
BIO_meth_set_read(chan_method, chan_read)
BIO_meth_set_write(chan_method, chan_write)
BIO_meth_set_ctrl(chan_method, chan_ctrl)


# the transmission loop's side (the caller holds the replies' lock)

cdef int tls_recv(TlsChan *c, char *buf, size_t n) noexcept nogil:
    """As recv() without waiting: > 0 plaintext bytes, 0 the client closed (close_notify or
    EOF), -1 with errno EAGAIN (no whole record yet) or another (the stream is broken)."""
    cdef int r
    ERR_clear_error()
    r = SSL_read(c.ssl, buf, <int>(n if n < INT_MAX else INT_MAX))
    if r > 0:
        return r
    r = SSL_get_error(c.ssl, r)
    ERR_clear_error()
    if r == SSL_ERROR_WANT_READ:
        errno = EAGAIN
        return -1
    if r == SSL_ERROR_ZERO_RETURN:
        return 0
    errno = c.recv_err if c.recv_err else EIO
    return -1


cdef int ssl_write(TlsChan *c, const char *p, size_t n) noexcept nogil:
    cdef int r
    while n:
        r = SSL_write(c.ssl, p, <int>(n if n < INT_MAX else INT_MAX))
        if r <= 0:
            ERR_clear_error()
            return -1
        p += r
        n -= r
    return 0


cdef int tls_encrypt(TlsChan *c, iovec *iov, int n) noexcept nogil:
    """One reply's pieces into records at the end of the sink. Small pieces share a record
    (a reply's header and its 4 KiB of data are one record, not two). 0, or -1: broken."""
    cdef char gather[RECORD]
    cdef size_t fill = 0, len, k
    cdef const char *p
    cdef int i
    ERR_clear_error()
    for i in range(n):
        p = <const char *>iov[i].iov_base
        len = iov[i].iov_len
        if fill + len <= RECORD:
            memcpy(gather + fill, p, len)
            fill += len
            continue
        # a large piece: top the gathered record up from it, then the rest goes straight
        k = RECORD - fill
        memcpy(gather + fill, p, k)
        if ssl_write(c, gather, RECORD) < 0 or ssl_write(c, p + k, len - k) < 0:
            return -1
        fill = 0
    if fill and ssl_write(c, gather, fill) < 0:
        return -1
    return -1 if c.sink_failed else 0


cdef int tls_close(TlsChan *c) noexcept nogil:
    """close_notify into the sink (NBD_CMD_DISC, or the loop ends): 0, or -1."""
    ERR_clear_error()
    if SSL_shutdown(c.ssl) < 0:
        ERR_clear_error()
        return -1
    return 0


cdef void tls_sink_done(TlsChan *c) noexcept nogil:
    """The sink's records were sent or copied: empty it, and free a large one."""
    c.sink_len = 0
    if c.sink_cap > SINK_KEEP:
        free(c.sink)
        c.sink = NULL
        c.sink_cap = 0


# errors as Python's ssl module raises them, so the sans-IO handshake handles both alike

cdef str _reason():
    cdef unsigned long e = ERR_get_error()
    cdef unsigned long last = e
    cdef const char *s
    while e:  # the first is the cause; later ones repeat it from higher up
        e = ERR_get_error()
    if last == 0:
        return "unknown TLS error"
    s = ERR_reason_error_string(last)
    return s.decode() if s != NULL else f"error 0x{last:x}"


cdef object _error(SSL *s, int code):
    cdef long verify
    reason = _reason()
    if s != NULL:
        verify = SSL_get_verify_result(s)
        if verify != X509_V_OK:
            reason = f"{reason} ({X509_verify_cert_error_string(verify).decode()})"
    ex = ssl.SSLError(code, reason)
    ex.reason = reason
    return ex


cdef class TlsContext:
    """The server's certificates (nbdkit's layout in `directory`): TLS 1.2 at least; with
    `verify_peer`, a client certificate signed by the CA (and not in ca-crl.pem, if there is
    one) is required."""

    def __cinit__(self, directory, bint verify_peer):
        cdef X509_STORE *store
        self.verify_peer = verify_peer
        self.ctx = SSL_CTX_new(TLS_server_method())
        if self.ctx == NULL:
            raise MemoryError()
        SSL_CTX_set_min_proto_version(self.ctx, TLS1_2_VERSION)
        # no renegotiation (a client could make the server work for nothing); a client that
        # closes the socket without close_notify has simply disconnected (NBD frames its own
        # requests: nothing is cut unnoticed)
        SSL_CTX_set_options(self.ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF
                            | SSL_OP_NO_COMPRESSION)
        # no resumption: no TLS 1.3 tickets, no TLS 1.2 session cache (it would keep up to
        # 20480 sessions of clients long gone)
        SSL_CTX_set_num_tickets(self.ctx, 0)
        SSL_CTX_set_session_cache_mode(self.ctx, SSL_SESS_CACHE_OFF)
        SSL_CTX_set_read_ahead(self.ctx, 1)   # fewer recv() calls: whole records and more
        ERR_clear_error()
        cert = os.fsencode(os.path.join(directory, CERT))
        key = os.fsencode(os.path.join(directory, KEY))
        if SSL_CTX_use_certificate_chain_file(self.ctx, cert) != 1:
            raise self._fail(cert)
        if SSL_CTX_use_PrivateKey_file(self.ctx, key, SSL_FILETYPE_PEM) != 1:
            raise self._fail(key)
        if SSL_CTX_check_private_key(self.ctx) != 1:
            raise self._fail(key, "does not match the certificate")
        if verify_peer:
            ca = os.fsencode(os.path.join(directory, CA))
            if SSL_CTX_load_verify_locations(self.ctx, ca, NULL) != 1:
                raise self._fail(ca)
            crl = os.fsencode(os.path.join(directory, CRL))
            if os.path.exists(crl):
                if SSL_CTX_load_verify_locations(self.ctx, crl, NULL) != 1:
                    raise self._fail(crl)
                store = SSL_CTX_get_cert_store(self.ctx)
                X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK)
            SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL)

    def _fail(self, path, what=None):
        return ssl.SSLError(f"{os.fsdecode(path)}: {what or _reason()}")

    def __dealloc__(self):
        SSL_CTX_free(self.ctx)

    def server_session(self):
        """A server-side session for one connection that just sent NBD_OPT_STARTTLS."""
        return TlsSession(self)


cdef class TlsSession:
    """One connection's TLS, as ssl.SSLObject over MemoryBIOs until attach()."""

    def __cinit__(self, TlsContext context):
        self.context = context
        self.ssl = SSL_new(context.ctx)
        self.rbio = BIO_new(BIO_s_mem())
        self.wbio = BIO_new(BIO_s_mem())
        if self.ssl == NULL or self.rbio == NULL or self.wbio == NULL:
            BIO_free(self.rbio)
            BIO_free(self.wbio)
            raise MemoryError()
        BIO_set_mem_eof_return(self.rbio, -1)  # empty means "wait for more", not EOF
        SSL_set_bio(self.ssl, self.rbio, self.wbio)
        SSL_set_accept_state(self.ssl)
        self.chan.ssl = self.ssl
        self.chan.fd = -1

    def __dealloc__(self):
        SSL_free(self.ssl)  # and its BIOs
        free(self.chan.pre)
        free(self.chan.sink)

    # the handshake (sans-IO)

    def feed(self, const unsigned char[:] data):
        """Records the client sent."""
        if self.attached:
            raise RuntimeError("the session belongs to the transmission phase")
        if data.shape[0] and BIO_write(self.rbio, &data[0], data.shape[0]) != data.shape[0]:
            raise MemoryError()

    def outgoing(self):
        """Records to send to the client."""
        cdef size_t n = 0 if self.attached else BIO_ctrl_pending(self.wbio)
        out = PyBytes_FromStringAndSize(NULL, n)
        if n:
            BIO_read(self.wbio, PyBytes_AS_STRING(out), n)
        return out

    def do_handshake(self):
        cdef int r
        ERR_clear_error()
        r = SSL_do_handshake(self.ssl)
        if r == 1:
            return
        r = SSL_get_error(self.ssl, r)
        if r == SSL_ERROR_WANT_READ:
            ERR_clear_error()
            raise ssl.SSLWantReadError("the TLS handshake needs more records")
        raise _error(self.ssl, r)

    def read(self, int n=65536):
        cdef int r
        out = PyBytes_FromStringAndSize(NULL, n)
        ERR_clear_error()
        r = SSL_read(self.ssl, PyBytes_AS_STRING(out), n)
        if r > 0:
            return out[:r]
        r = SSL_get_error(self.ssl, r)
        if r == SSL_ERROR_WANT_READ:
            ERR_clear_error()
            raise ssl.SSLWantReadError("no whole record yet")
        if r == SSL_ERROR_ZERO_RETURN:
            raise ssl.SSLZeroReturnError("the client closed TLS (close_notify)")
        raise _error(NULL, r)

    def write(self, const unsigned char[:] data):
        ERR_clear_error()
        if data.shape[0] and SSL_write(self.ssl, &data[0], data.shape[0]) != data.shape[0]:
            raise _error(NULL, 0)

    @property
    def peer_cn(self):
        """The common name of the client's verified certificate, or None."""
        cdef X509 *cert = SSL_get1_peer_certificate(self.ssl)
        cdef char buf[256]
        cdef int n
        if cert == NULL:
            return None
        n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, buf, sizeof(buf))
        X509_free(cert)
        return buf[:n].decode(errors="replace") if n >= 0 else None

    @property
    def version(self):
        return SSL_get_version(self.ssl).decode()

    @property
    def cipher(self):
        return SSL_get_cipher_name(self.ssl).decode()

    # the transmission phase

    cdef TlsChan *attach(self, int fd) except NULL:
        """From now on records come from fd, and go to the sink. Records that came with the
        handshake's last ones and OpenSSL did not read yet are read first."""
        cdef BIO *b
        cdef size_t n
        if self.attached:
            raise RuntimeError("the session is attached already")
        if BIO_ctrl_pending(self.wbio):
            raise RuntimeError("handshake records not sent before the transmission phase")
        b = BIO_new(chan_method)
        if b == NULL:
            raise MemoryError()
        n = BIO_ctrl_pending(self.rbio)
        if n:
            self.chan.pre = <char *>malloc(n)
            if self.chan.pre == NULL:
                BIO_free(b)
                raise MemoryError()
            BIO_read(self.rbio, self.chan.pre, n)
            self.chan.pre_len = n
        self.chan.fd = fd
        BIO_set_data(b, &self.chan)
        BIO_set_init(b, 1)
        SSL_set_bio(self.ssl, b, b)  # frees the memory BIOs
        self.rbio = self.wbio = NULL
        self.attached = 1
        return &self.chan
