"""One client connection to an NBD server, in the transmission phase.

`connect()` opens the socket and runs the handshake (protocol.ClientHandshake); a `Connection`
then sends requests from its sender thread and reads replies (transmission.ClientTransmission)
in the thread that calls `receive()`, ending each request with its errno. A connection that
drops (EOF, a protocol error, a request older than the timeout) ends everything in flight on it
and is never used again: client.py makes a new one.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time
from collections import deque

from .. import io as bio
from ..blockdev import DeviceError
from . import constants as C
from .protocol import NEED_DATA, ClientHandshake, Negotiated, RemoteProtocolError
from .transmission import BlockStatus, ClientTransmission, ReadData, ReadHole, ReplyDone

log = logging.getLogger("appliance.nbd.client")

RECV_SIZE = 256 * 1024
SMALL_WRITE = 64 * 1024  # payloads up to this size go out in one send with the headers
# the errno a server's NBD error value stands for (the same numbers on Linux); others: EIO
_ERRNOS = {C.NBD_EPERM, C.NBD_EIO, C.NBD_ENOMEM, C.NBD_EINVAL, C.NBD_ENOSPC, C.NBD_EOVERFLOW,
           C.NBD_ENOTSUP, C.NBD_ESHUTDOWN}


def reply_error(value):
    """A server's error value as a classed errno (0 for none). EIO is a path error, as Linux's
    blk_path_error() judges an I/O error: that server, its disk or the way to it failed, and
    another path to the storage may serve (NBD has no medium error to tell apart). The others
    keep io.ERROR_CLASSES' class: ENOSPC, EINVAL, EPERM are the storage's answer."""
    if not value:
        return 0
    code = value if value in _ERRNOS else errno.EIO
    return bio.path_error(code) if code == errno.EIO else bio.error(code)


def connect(a, timeout):
    """A new connection to Address `a`, through the handshake: (socket, Negotiated), or a
    DeviceError saying what failed."""
    where = a.socket or f"{a.host}:{a.port}"
    try:
        if a.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(a.socket)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((a.host, a.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        raise DeviceError(e.errno or errno.ECONNREFUSED,
                          f"{a}: cannot connect to {where}: {e.strerror or e}") from None
    try:
        hs = ClientHandshake(a.export)
        while (event := hs.next_event()) is NEED_DATA:
            sock.sendall(hs.data_to_send())
            hs.receive_data(sock.recv(65536))
        sock.sendall(hs.data_to_send())
        if not isinstance(event, Negotiated):
            raise RemoteProtocolError("server closed the connection during the handshake")
        sock.settimeout(None)  # receive() polls; a send stuck on a full socket is woken by drop()
        return sock, event
    except RemoteProtocolError as e:
        try:
            sock.sendall(hs.data_to_send())  # the soft disconnect, when there is one
        except OSError:
            pass
        sock.close()
        raise DeviceError(errno.EPROTO, f"{a}: {e.reason}") from None
    except OSError as e:
        sock.close()
        raise DeviceError(e.errno or errno.EIO, f"{a}: handshake with {where} failed: "
                          f"{'timed out' if isinstance(e, TimeoutError) else e.strerror or e}") from None


class Connection:
    """One socket in the transmission phase. Requests go out through its sender thread, so
    submit() never blocks, not even from a completion on a receive thread (a retry from end_io)
    while the server waits for us to read its replies."""

    def __init__(self, sock, negotiated, name, timeout):
        self.name = name  # for log lines: the URI and the connection's slot
        self.timeout = timeout
        self.sock = sock
        self.fd = sock.fileno()
        self.tx = ClientTransmission(negotiated.structured_replies, negotiated.trailing_data)
        self.allocation_id = allocation_id(negotiated)
        self.lock = threading.Lock()  # inflight, queue, dead
        self.wake = threading.Condition(self.lock)
        # cookie -> request (.offset, .buf, .extents, .deadline, .done), in send order: the
        # first is the oldest
        self.inflight: dict = {}
        self.queue: deque = deque()  # (header, payload or None) not sent yet
        self.last = False  # NBD_CMD_DISC is queued: the sender stops after it
        self.dead = None  # why it dropped
        self.expired = None  # why the caller gave up on it (expire())
        self.sender = threading.Thread(target=self._send_loop, name="nbd-client-send", daemon=True)
        self.sender.start()

    def send(self, cmd, flags, offset, length, payload, req):
        """Queue one request; False if the connection is down. Its reply, or the drop of the
        connection, then ends `req`."""
        with self.lock:
            if self.dead or self.last:
                return False
            cookie, header = self.tx.request(cmd, flags, offset, length)
            self.inflight[cookie] = req
            self.queue.append((header, payload))
            if len(self.queue) == 1:
                self.wake.notify()
        return True

    def disconnect(self):
        """The soft disconnect: NBD_CMD_DISC after whatever is queued."""
        with self.lock:
            if self.dead or self.last:
                return
            self.queue.append((self.tx.request(C.NBD_CMD_DISC, 0, 0, 0)[1], None))
            self.last = True
            self.wake.notify()

    def _send_loop(self):
        while True:
            with self.lock:
                while not self.queue and not self.dead and not self.last:
                    self.wake.wait()
                if self.dead or not self.queue:
                    return
                batch = list(self.queue)
                self.queue.clear()
            try:
                small = bytearray()  # headers and small payloads go out together
                for header, payload in batch:
                    small += header
                    if payload is None:
                        continue
                    if len(payload) <= SMALL_WRITE:
                        small += payload
                    else:
                        self.sock.sendall(small)
                        small.clear()
                        self.sock.sendall(payload)
                self.sock.sendall(small)
            except OSError as e:
                self.drop(errno.ECONNRESET, f"send failed: {e.strerror or e}")
                return

    def drop(self, error, reason):
        """Take the connection down; every request in flight ends with `error`."""
        with self.lock:
            if self.dead:
                return
            self.dead = reason
            victims = list(self.inflight.values())
            self.inflight.clear()
            self.queue.clear()
            self.wake.notify()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked on a full socket
        except OSError:
            pass
        for req in victims:
            req.done(error)

    def close(self):
        self.sender.join()  # no sender is inside the socket when its fd goes
        self.sock.close()

    def receive(self):
        """Read replies and end their requests until the connection drops."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        buf = bytearray(RECV_SIZE)
        tick = min(0.5, self.timeout / 10)
        while not self.dead:
            if not poller.poll(tick * 1000):
                self._check_deadline()
                continue
            try:
                n = self.sock.recv_into(buf)
            except OSError as e:
                self.drop(errno.ECONNRESET, f"receive failed: {e.strerror or e}")
                return
            self.tx.receive_data(memoryview(buf)[:n])
            try:
                while (event := self.tx.next_event()) is not NEED_DATA:
                    self._on_event(event)
            except RemoteProtocolError as e:
                self.drop(errno.ECONNRESET, e.reason)
                return
            self._check_deadline()

    def expire(self, reason):
        """Give up on every request in flight (the caller's own timeout ran out): they end with
        ETIMEDOUT. Done by the receiving thread at its next tick, so no reply lands in a buffer
        after its request has ended."""
        self.expired = reason

    def _check_deadline(self):
        if self.expired:
            self.drop(errno.ETIMEDOUT, self.expired)
            return
        with self.lock:
            oldest = next(iter(self.inflight.values()), None)
        if oldest is not None and time.monotonic() > oldest.deadline:
            self.drop(errno.ETIMEDOUT, f"no reply in {self.timeout:g} s")

    def _on_event(self, event):
        req = self.inflight.get(event.cookie)
        if req is None:  # dropped meanwhile (close); its end was told already
            return
        if isinstance(event, ReadData):
            start = event.offset - req.offset
            req.buf[start:start + len(event.data)] = event.data
        elif isinstance(event, ReadHole):
            start = event.offset - req.offset
            req.buf[start:start + event.length] = bytes(event.length)
        elif isinstance(event, BlockStatus):
            if event.context_id == self.allocation_id:
                req.extents.extend(event.extents)
        elif isinstance(event, ReplyDone):
            with self.lock:
                if self.inflight.pop(event.cookie, None) is None:
                    return
            error = reply_error(event.error)
            if error and event.message:
                log.debug("%s: server error %d: %s", self.name, event.error, event.message)
            req.done(error)


def allocation_id(neg):
    """The id the server gave base:allocation on this connection, or None."""
    for cid, name in neg.meta_contexts.items():
        if name == C.NBD_META_BASE_ALLOCATION:
            return cid
    return None
