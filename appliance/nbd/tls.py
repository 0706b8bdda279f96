"""TLS for NBD over TCP: the server's SSLContext from nbdkit's certificate directory, and the
transmission phase of a TLS connection.

The handshake (STARTTLS and the TLS handshake) is protocol.ServerHandshake's, over
ssl.MemoryBIO. After it, a Relay moves records between the client's socket and one end of a
socketpair; the transmission loop serves the other end as it would a plain client. The relay
holds the GIL for every record: the encrypted data path is not yet out of the GIL as the plain
one is (OpenSSL driven from Cython on the socket is what is left to do).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading

# nbdkit's --tls-certificates layout
CA, CERT, KEY, CRL = "ca-cert.pem", "server-cert.pem", "server-key.pem", "ca-crl.pem"
CHUNK = 256 * 1024
SEND_TIMEOUT = 60  # s: a client that takes no record for this long is dropped (as the plain loop does)


def context(directory, verify_peer):
    """The server context: TLS 1.2 at least; with `verify_peer`, a client certificate signed by
    the CA (and not in its CRL, if there is one) is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.path.join(directory, CERT), os.path.join(directory, KEY))
    if verify_peer:
        ctx.load_verify_locations(os.path.join(directory, CA))
        crl = os.path.join(directory, CRL)
        if os.path.exists(crl):
            ctx.load_verify_locations(crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Relay:
    """Records between `net` (the client) and `inner` (what the transmission loop serves)."""

    def __init__(self, net, tls, incoming, outgoing, trailing):
        self.net, self.tls, self._in, self._out = net, tls, incoming, outgoing
        self.inner, self._outer = socket.socketpair()
        self._lock = threading.Lock()  # one SSLObject, two directions
        net.settimeout(None)
        net.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        if trailing:  # requests that came with the last option's records
            self._outer.sendall(trailing)
        self._threads = [threading.Thread(target=f, name=f"nbd-tls-{n}", daemon=True)
                         for n, f in (("in", self._from_client), ("out", self._to_client))]
        for t in self._threads:
            t.start()

    def _from_client(self):
        try:
            while True:
                data = self.net.recv(CHUNK)
                if not data:
                    return
                plain, end = [], False
                with self._lock:
                    self._in.write(data)
                    while True:
                        try:
                            chunk = self.tls.read(CHUNK)
                        except ssl.SSLWantReadError:
                            break
                        except ssl.SSLZeroReturnError:
                            end = True
                            break
                        if not chunk:
                            end = True
                            break
                        plain.append(chunk)
                    records = self._out.read()  # e.g. a key update's answer
                    if records:
                        self.net.sendall(records)
                if plain:
                    self._outer.sendall(b"".join(plain))
                if end:
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            _shutdown(self._outer, socket.SHUT_WR)  # the loop sees the client's EOF

    def _to_client(self):
        try:
            while True:
                data = self._outer.recv(CHUNK)
                if not data:  # the loop closed the connection (DISC, error): close TLS cleanly
                    with self._lock:
                        try:
                            self.tls.unwrap()
                        except ssl.SSLError:
                            pass
                        self.net.sendall(self._out.read())
                    return
                with self._lock:
                    self.tls.write(data)
                    self.net.sendall(self._out.read())
        except (OSError, ssl.SSLError):
            return
        finally:
            _shutdown(self.net, socket.SHUT_RDWR)  # ends _from_client's recv

    def join(self):
        """After the loop closed `inner`: wait for both directions to end."""
        for t in self._threads:
            t.join()
        self._outer.close()


def _shutdown(s, how):
    try:
        s.shutdown(how)
    except OSError:
        pass
