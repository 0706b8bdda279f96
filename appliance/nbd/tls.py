"""TLS for NBD over TCP: the server's context from nbdkit's certificate directory.

OpenSSL does the TLS (appliance/_fast/tls.pyx): the handshake (NBD_OPT_STARTTLS, then the
TLS handshake, then the options again) is protocol.ServerHandshake's, sans-IO, over the
session's memory BIOs; the established session then goes to the transmission loop, which
reads and writes its records on the socket without the GIL (_fast/transmit.pyx).
"""

from __future__ import annotations

from .._fast.tls import TlsContext


def context(directory, verify_peer):
    """The server context: TLS 1.2 at least; with `verify_peer`, a client certificate signed by
    the CA (and not in its CRL, if there is one) is required. Raises ssl.SSLError naming the
    file that cannot be used."""
    return TlsContext(directory, verify_peer)
