"""Remote devices: an underlying device that is an NBD export on another server.

A table names one by its URI (`nbd+unix:///export?socket=PATH`, `nbd://host[:port]/export`);
targets sit on it as on a file (`submit`, `size`, `align`, `block_status`, `failed`). Each of
its connections is a connection.Connection (the socket, the sender thread, the replies); this
module maps I/O onto NBD requests, spreads them over the connections, and reconnects.

Requests are pipelined (cookies) and their replies matched out of order. When the server
advertises multi-conn, several connections share the requests (its FLUSH then covers them all).
Each connection has one thread that receives its replies and, when the connection drops,
reconnects with backoff. The client never queues: requests in flight on a dropped connection
fail with ECONNRESET (ETIMEDOUT if the server stopped answering), and new requests fail with
ENOTCONN while no connection is up. Whether to retry, wait or fail over is the caller's policy
(multipath, mirror).
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from .. import io as bio
from ..blockdev import DeviceError
from . import constants as C
from .connection import Connection, allocation_id, connect
from .uri import Address, is_uri, parse_uri  # noqa: F401 (is_uri: for TableContext)

log = logging.getLogger("appliance.nbd.client")

MULTI_CONN_DEFAULT = 4  # connections when the server advertises multi-conn, as nbdcopy
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
_CMDS = {bio.READ: C.NBD_CMD_READ, bio.WRITE: C.NBD_CMD_WRITE, bio.FLUSH: C.NBD_CMD_FLUSH,
         bio.TRIM: C.NBD_CMD_TRIM, bio.CACHE: C.NBD_CMD_CACHE,
         bio.WRITE_ZEROES: C.NBD_CMD_WRITE_ZEROES}


# -------------------------------------------------------------------- requests

class _Request:
    """One NBD request in flight: where its data goes and who hears of its end."""

    __slots__ = ("offset", "buf", "done", "deadline", "extents")

    def __init__(self, offset, buf, done, deadline):
        self.offset, self.buf, self.done, self.deadline = offset, buf, done, deadline
        self.extents = None  # BLOCK_STATUS: what base:allocation said


class _Join:
    """The pieces of a request bigger than the server's maximum, and their joint end."""

    def __init__(self, io, pieces):
        self.io, self.pending, self.error, self.lock = io, pieces, 0, threading.Lock()

    def piece_done(self, error):
        with self.lock:
            self.error = self.error or error
            self.pending -= 1
            last = self.pending == 0
        if last:
            self.io.complete(self.error)


# ---------------------------------------------------------------------- device

class NBDDevice:
    """An NBD export as an underlying device."""

    kind = "nbd"

    def __init__(self, address: Address):
        self.address = address
        self.timeout = address.timeout
        self.refs = 0
        self._lock = threading.Lock()
        self._live: list[Connection] = []
        self._rr = 0
        self._closing = threading.Event()
        self._reason = None  # why the last connection dropped or the last attempt failed
        # the table is refused if the export cannot be reached: its size is needed now
        sock, neg = connect(address, self.timeout)
        self.size = neg.size
        self.flags = neg.flags
        self.block_sizes = neg.block_sizes
        self.allocation_id = allocation_id(neg)
        self.max_payload = min(neg.block_sizes[2], 32 << 20) if neg.block_sizes else 32 << 20
        multi = bool(neg.flags & C.NBD_FLAG_CAN_MULTI_CONN)
        wanted = address.connections or MULTI_CONN_DEFAULT
        self.connections = wanted if multi else 1
        if wanted > 1 and address.connections and not multi:
            log.warning("%s: the server does not advertise multi-conn: one connection", address)
        first = self._go_live(sock, neg, 0)  # up before the table goes live, so no I/O fails
        self._threads = []
        for slot in range(self.connections):
            t = threading.Thread(target=self._run, args=(slot, first if slot == 0 else None),
                                 name=f"nbd-client-{slot}", daemon=True)
            self._threads.append(t)
            t.start()
        log.info("%s: connected, %d bytes, %d connection(s)", address, self.size, self.connections)

    # what a target sees

    @property
    def name(self):
        return self.address.uri

    @property
    def align(self):
        """The server's minimum block size."""
        return self.block_sizes[0] if self.block_sizes else 1

    @property
    def read_only(self):
        return bool(self.flags & C.NBD_FLAG_READ_ONLY)

    @property
    def failed(self):
        """Why no connection is up, or None while one is."""
        with self._lock:
            return None if self._live else (self._reason or "not connected")

    def submit(self, io):
        if io.is_write and self.read_only:
            io.complete(errno.EROFS)
            return
        op, flags = _CMDS[io.op], io.flags & (bio.FUA | bio.NO_HOLE | bio.FAST_ZERO)
        if op == C.NBD_CMD_FLUSH and not self.flags & C.NBD_FLAG_SEND_FLUSH:
            io.complete(0)  # a server without a write cache
            return
        if (op == C.NBD_CMD_TRIM and not self.flags & C.NBD_FLAG_SEND_TRIM) or (
                op == C.NBD_CMD_CACHE and not self.flags & C.NBD_FLAG_SEND_CACHE):
            io.complete(0)  # advisory, like a file that cannot punch holes
            return
        if op == C.NBD_CMD_WRITE_ZEROES:
            if flags & bio.FAST_ZERO and not self.flags & C.NBD_FLAG_SEND_FAST_ZERO:
                io.complete(errno.ENOTSUP)
                return
            if not self.flags & C.NBD_FLAG_SEND_WRITE_ZEROES:
                op, flags = C.NBD_CMD_WRITE, flags & bio.FUA
                io_buf = bytes(io.length)
            else:
                io_buf = None
        else:
            io_buf = io.buf
        if flags & bio.FUA and not self.flags & C.NBD_FLAG_SEND_FUA:
            done = self._then_flush(io.complete)  # FUA as the server can give it
            flags &= ~bio.FUA
        else:
            done = io.complete
        if op in (C.NBD_CMD_READ, C.NBD_CMD_WRITE) and io.length > self.max_payload:
            self._split(op, flags, io, io_buf)
            return
        if op == C.NBD_CMD_FLUSH:  # the spec wants 0+0; the core hands targets an offset
            self._send(op, 0, 0, 0, None, done)
        else:
            self._send(op, flags, io.offset, io.length, io_buf, done)

    def abort(self, reason):
        """Give up on what is in flight (a caller's timeout for this server ran out: multipath's
        fast_io_fail_tmo): every connection drops within its tick, its requests end with
        ETIMEDOUT, a path error, and it reconnects by itself."""
        with self._lock:
            live = list(self._live)
        for conn in live:
            conn.expire(reason)

    def block_status(self, offset, length):
        """[(length, flags)] from the server's base:allocation; all data if it has none or
        cannot say now."""
        out, pos, end = [], offset, offset + length
        for _ in range(16):  # a server may answer for less than asked; ask again for the rest
            if pos >= end or self.allocation_id is None:
                break
            got = self._block_status_once(pos, end - pos)
            if not got:
                break
            for n, flags in got:
                n = min(n, end - pos)
                if n <= 0:
                    break
                out.append((n, flags & (C.NBD_STATE_HOLE | C.NBD_STATE_ZERO)))
                pos += n
        if pos < end:
            out.append((end - pos, 0))
        return out

    def close(self):
        with self._lock:
            self._closing.set()  # under the lock: no connection goes live after this
            live = list(self._live)
        for conn in live:
            conn.disconnect()
        for conn in live:
            conn.sender.join(1)
            conn.drop(errno.ENOTCONN, "closed")
        # a slot inside a handshake with a hung server ends by itself when that times out
        deadline = time.monotonic() + 2
        for t in self._threads:
            t.join(max(0, deadline - time.monotonic()))

    # sending

    def _pick(self):
        with self._lock:
            if not self._live:
                return None
            self._rr = (self._rr + 1) % len(self._live)
            return self._live[self._rr]

    def _send(self, cmd, flags, offset, length, payload, done):
        """Send on a live connection; `done(errno)` once the reply is in. ENOTCONN at once when
        no connection is up: the caller decides whether to wait (no queue here)."""
        req = _Request(offset, payload if cmd == C.NBD_CMD_READ else None, done,
                       time.monotonic() + self.timeout)
        for _ in range(self.connections):
            conn = self._pick()
            if conn is None:
                break
            if conn.send(cmd, flags, offset, length, None if cmd == C.NBD_CMD_READ else payload, req):
                return
        done(errno.ENOTCONN)

    def _split(self, op, flags, io, buf):
        view = memoryview(buf)
        pieces = range(0, io.length, self.max_payload)
        join = _Join(io, len(pieces))
        for start in pieces:
            n = min(self.max_payload, io.length - start)
            self._send(op, flags, io.offset + start, n, view[start:start + n], join.piece_done)

    def _then_flush(self, complete):
        def written(error):
            if error or not self.flags & C.NBD_FLAG_SEND_FLUSH:
                complete(error)
            else:
                self._send(C.NBD_CMD_FLUSH, 0, 0, 0, None, complete)
        return written

    def _block_status_once(self, offset, length):
        finished = threading.Event()
        result = []

        def done(error):
            result.append(error)
            finished.set()

        req_len = min(length, 0xFFFFFFFF)
        req = _Request(offset, None, done, time.monotonic() + self.timeout)
        req.extents = []
        conn = self._pick()
        if conn is None or not conn.send(C.NBD_CMD_BLOCK_STATUS, 0, offset, req_len, None, req):
            return None
        if not finished.wait(self.timeout + 1) or result[0]:
            return None
        return req.extents

    # connections

    def _reconnect(self):
        sock, neg = connect(self.address, self.timeout)
        why = None
        if neg.size != self.size:
            why = f"the export's size changed from {self.size} to {neg.size} bytes"
        elif self.connections > 1 and not neg.flags & C.NBD_FLAG_CAN_MULTI_CONN:
            why = "the server no longer advertises multi-conn"
        elif allocation_id(neg) is None and self.allocation_id is not None:
            why = "the server no longer offers base:allocation"
        if why:
            sock.close()
            raise DeviceError(errno.EPROTO, f"{self.address}: {why}")
        return sock, neg

    def _go_live(self, sock, neg, slot):
        """The connection, in the rotation; None (and the socket closed) once close() began."""
        with self._lock:
            if self._closing.is_set():
                sock.close()
                return None
            conn = Connection(sock, neg, f"{self.address} connection {slot}", self.timeout)
            self._live.append(conn)
        return conn

    def _run(self, slot, conn):
        """One connection slot: receive replies; when the connection drops, reconnect."""
        backoff = BACKOFF_FIRST
        said = None  # the last failure logged, so an outage is one line, not one per attempt
        while not self._closing.is_set():
            if conn is None:
                try:
                    conn = self._go_live(*self._reconnect(), slot)
                except DeviceError as e:
                    if e.strerror != said:
                        log.warning("%s (connection %d)", e.strerror, slot)
                        said = e.strerror
                    self._note_down(e.strerror)
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                if conn is None:
                    break
                if said is not None:
                    log.warning("%s: connection %d reconnected", self.address, slot)
            backoff, said = BACKOFF_FIRST, None
            try:
                conn.receive()
            except Exception as e:  # a bug must not leave requests hanging
                log.exception("%s: connection %d failed", self.address, slot)
                conn.drop(errno.EIO, f"client error: {e}")
            with self._lock:
                self._live.remove(conn)
            conn.close()
            if not self._closing.is_set():
                log.warning("%s: connection %d lost: %s", self.address, slot, conn.dead)
                self._note_down(conn.dead)
                said = conn.dead
            conn = None

    def _note_down(self, reason):
        with self._lock:
            self._reason = reason


# ------------------------------------------------------------------------ pool

class Pool:
    """Open remote devices, shared and reference counted per URI across tables (as DevicePool
    shares files)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._devices: dict[str, NBDDevice] = {}

    def get(self, uri: str) -> NBDDevice:
        address = parse_uri(uri)
        with self._lock:
            dev = self._devices.get(uri)
            if dev is None:
                dev = NBDDevice(address)
                self._devices[uri] = dev
            dev.refs += 1
            return dev

    def put(self, dev: NBDDevice) -> None:
        with self._lock:
            dev.refs -= 1
            if dev.refs > 0:
                return
            self._devices.pop(dev.address.uri, None)
        dev.close()


pool = Pool()
