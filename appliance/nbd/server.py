"""The NBD socket server: listeners, one thread per connection.

A thin adapter. The handshake is protocol.ServerHandshake fed from the
socket; the transmission phase is _fast.transmit.Connection (a loop thread
and a sender thread per connection), which serves the fast map itself with
up to DEPTH requests in flight and hands everything else to
`Session.dispatch` here. A TLS connection's session (OpenSSL's, set up by the
handshake) goes to the Connection, which reads and writes its records itself.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time

from .. import heap, io as bio
from ..config import ExportConfig
from .._fast import budget
from .._fast.transmit import Connection
from . import constants as C
from . import tls as nbd_tls
from .protocol import (
    NEED_DATA,
    Aborted,
    ConnectionClosed,
    ExportInfo,
    ExportSelected,
    RemoteProtocolError,
    ServerHandshake,
)

log = logging.getLogger("appliance.nbd")

MAX_BLOCK = 64 * 1024 * 1024  # as nbdkit; larger READ/WRITE get EINVAL
DEPTH = 128  # requests in flight per connection
MAX_EXTENTS = 2048
MAX_PLUG = 16  # requests a connection's batch holds back at most (well under its in-flight depth)


class Catalog:
    """The exports a handshake may choose from: exported mapped devices by name."""

    def __init__(self):
        self._devices = {}
        self._allowed = {}
        self._lock = threading.Lock()

    def set(self, devices, allowed=None):
        """`allowed`: {device name: AllowedClients} for the devices that restrict their clients."""
        with self._lock:
            self._devices = {d.name: d for d in devices}
            self._allowed = dict(allowed or {})

    def allowed_clients(self, name):
        with self._lock:
            return self._allowed.get(name)

    def device(self, name):
        with self._lock:
            if name == "" and self._devices:
                return next(iter(self._devices.values()))  # the default export
            return self._devices.get(name)

    def lookup(self, name):
        dev = self.device(name)
        return export_info(dev) if dev is not None and dev.table is not None else None

    def names(self):
        with self._lock:
            return list(self._devices)


def export_info(dev):
    align = dev.align
    return ExportInfo(
        name=dev.name,
        size=dev.size,
        description=dev.description,
        read_only=not dev.writable,
        min_block=align,
        preferred_block=max(4096, align),
        max_block=MAX_BLOCK,
    )


class Session:
    """One connection's transmission phase: the slow-path dispatcher.

    Plugging: once the connection has called `unplug()` (it does after every batch of
    slow requests it dispatched), requests are held until the next unplug and reach the
    device queue together. A connection that never unplugs has each request submitted
    at once."""

    _unplugs = False
    _plug = ()
    address = cn = None  # a TCP client's address and certificate name

    def __init__(self, server, sock, device, selected, trailing, tls=None):
        self.server = server
        self.sock = sock
        self.device = device
        self.peer = _peer(sock)
        self.contexts = sorted(selected.meta_contexts.items())  # [(id, name)] the client selected
        info = selected.export
        self.conn = Connection(
            sock.fileno(),
            device.gate,
            self.dispatch,
            info.size,
            info.read_only,
            selected.structured_replies,
            max_block=MAX_BLOCK,
            depth=DEPTH,
            initial=trailing,
            unplug=self.unplug,
            tls=tls,
            poll_us=server.export.poll_max_us,
        )

    def dispatch(self, conn, cmd, flags, cookie, offset, length, payload):
        if cmd == C.NBD_CMD_READ:
            buf = bytearray(length)

            def done(io):
                if io.error:
                    conn.reply(cookie, io.error, True)
                else:
                    conn.reply_read(cookie, offset, buf)

            io = bio.IO(bio.READ, offset, length, memoryview(buf), 0, done)
        elif cmd == C.NBD_CMD_BLOCK_STATUS:
            if not self.contexts:
                conn.reply(cookie, errno.EINVAL, True)
                return
            self._block_status_request(conn, cookie, offset, length, flags)
            return
        else:
            io_flags = flags & (bio.FUA | bio.NO_HOLE | bio.FAST_ZERO)
            io = bio.IO(_OPS[cmd], offset, length, payload, io_flags, lambda io: conn.reply(cookie, io.error))
        if self._unplugs:
            # the loop unplugs after this batch: the device queue sees it whole and merges it
            self._plug.append(io)
            if len(self._plug) >= MAX_PLUG:
                self.unplug()  # held requests count as in flight: never fill the connection's depth
        else:
            self.device.submit(io)

    def unplug(self):
        """The transmission loop read a batch and is about to wait for the client (or the
        stream ended): hand the batch to the device queue in one go."""
        self._unplugs = True
        plug, self._plug = self._plug, []
        if plug:
            self.device.submit_batch(plug)

    def _block_status_request(self, conn, cookie, offset, length, flags):
        """One BLOCK_STATUS request per selected context (io.buf names it; None is
        base:allocation); one reply chunk each, the last one marked done."""
        results = {}
        lock = threading.Lock()

        def done(io, cid):
            with lock:
                results[cid] = io
                last = len(results) == len(self.contexts)
            if last:
                self._block_status(conn, cookie, [(cid, results[cid]) for cid, _ in self.contexts], flags)

        for cid, name in self.contexts:
            context = None if name == C.NBD_META_BASE_ALLOCATION else name
            self.device.submit(bio.IO(bio.BLOCK_STATUS, offset, length, context, 0,
                                      lambda io, cid=cid: done(io, cid)))

    def _block_status(self, conn, cookie, replies, flags):
        """The extents the device reported (BLOCK_STATUS passed the gate like any request)."""
        for _, io in replies:
            if io.error:
                conn.reply(cookie, io.error, True)
                return
        chunks = []
        for i, (cid, io) in enumerate(replies):
            extents = io.buf[:MAX_EXTENTS]
            if flags & C.NBD_CMD_FLAG_REQ_ONE:
                extents = extents[:1]
            body = struct.pack(">I", cid) + b"".join(struct.pack(">II", n, f) for n, f in extents)
            done = C.NBD_REPLY_FLAG_DONE if i == len(replies) - 1 else 0
            head = struct.pack(">IHHQI", C.NBD_STRUCTURED_REPLY_MAGIC, done, C.NBD_REPLY_TYPE_BLOCK_STATUS, 0, len(body))
            chunks.append(head[:8] + struct.pack("=Q", cookie) + head[16:] + body)  # the cookie's bytes, as received
        conn.send_raw(b"".join(chunks))

    def run(self):
        sender = threading.Thread(target=self.conn.sender, name="nbd-send", daemon=True)
        sender.start()
        try:
            reason = self.conn.run()
        finally:
            sender.join()
            # the connection's buffers go now, and with them its reference to this session
            # (dispatch is a bound method): nothing waits for the garbage collector
            self.conn.release()
        log.info("%s: %s: %s", self.device.name, self.peer, reason)


_OPS = {
    C.NBD_CMD_WRITE: bio.WRITE,
    C.NBD_CMD_FLUSH: bio.FLUSH,
    C.NBD_CMD_TRIM: bio.TRIM,
    C.NBD_CMD_CACHE: bio.CACHE,
    C.NBD_CMD_WRITE_ZEROES: bio.WRITE_ZEROES,
}


def _close(s, name):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
    if name.startswith("unix:"):
        try:
            os.unlink(name[5:])
        except OSError:
            pass


# accept() failing for want of descriptors or memory: the client waits in the backlog while
# the listener backs off (retrying at once would spin on the same error)
_SCARCE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PAUSE_MIN, PAUSE_MAX = 0.05, 1.0
_LIMIT, _NO_THREAD = "limit", "no thread"  # why _admit refused a connection


def _client(sock, addr):
    """Who counts as one client for max_connections_per_client: a TCP peer's address, a unix
    peer's user id (unix peers have no address)."""
    if sock.family == socket.AF_UNIX:
        try:
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return "uid ?"
        return f"uid {uid}"
    return addr[0]


def _drop(sock):
    try:
        sock.close()
    except OSError:
        pass


def _peer(sock):
    try:
        name = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return "unix:" + (name or sock.getsockname() or "?")


class Server:
    """Listeners and connections. `catalog` says which devices are exported; `export` (the
    [export] section, replaced on reload) sets the limits new connections meet."""

    def __init__(self, catalog, export=None):
        self.catalog = catalog
        self.export = export or ExportConfig(unix=None, tcp=None)
        self.tls_context = None  # set_export makes it
        self.listeners = []
        self.sessions = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._count = {}  # listener name, ("client", key) -> connections open (handshaking or connected)

    @staticmethod
    def tls_for(export):
        """The SSLContext `export` asks for (None: no TLS), certificates read now (start,
        reload: renewed ones are picked up). Raises OSError or ssl.SSLError."""
        return None if export.tls == "off" else nbd_tls.context(export.tls_certificates, export.tls_verify_peer)

    def set_export(self, export, tls_context):
        """Limits and certificates for the connections to come; connected clients keep theirs
        (the buffer memory cap is the whole daemon's, at once)."""
        self.export, self.tls_context = export, tls_context
        budget.set_limit(export.buffer_memory)

    # listening

    def listen_unix(self, path, mode=0o660, group=None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
            # who may connect is who may open the socket: its mode and group are the access control
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
            s.listen(128)
        except OSError:
            s.close()
            raise
        self._start_listener(s, f"unix:{path}")
        return path

    def listen_tcp(self, host, port):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(128)
        self._start_listener(s, f"tcp:{host}:{s.getsockname()[1]}")
        return s.getsockname()[1]

    def adopt(self, sock, name):
        """A listening socket handed over by systemd socket activation."""
        self._start_listener(sock, name)

    def _start_listener(self, s, name):
        self.listeners.append((s, name))
        threading.Thread(target=self._accept_loop, args=(s, name), name=f"nbd-accept {name}", daemon=True).start()

    def _accept_loop(self, s, name):
        pause = 0  # > 0 while the process is short of descriptors, memory or threads
        while not self._stopping:
            try:
                sock, addr = s.accept()
            except OSError as e:
                if self._stopping or (s, name) not in self.listeners:  # closed: by stop or close_listener
                    return
                if e.errno in _SCARCE:
                    pause = self._short_of(name, f"cannot accept: {e.strerror}", pause)
                else:  # one client's trouble (ECONNABORTED, EPROTO...): the next may be fine
                    log.info("%s: accept: %s", name, e)
                continue
            if sock.family != socket.AF_UNIX:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:  # reset already
                    _drop(sock)
                    continue
            if self._admit(sock, addr, name) is _NO_THREAD:
                pause = self._short_of(name, "cannot start a connection thread", pause)
            else:
                if pause:
                    log.warning("%s: accepting connections again", name)
                pause = 0

    def _short_of(self, name, what, pause):
        """Back off before the next accept; say so once per shortage. -> the next pause."""
        if not pause:
            log.error("%s: %s; waiting connections stay queued until it passes", name, what)
        time.sleep(pause or PAUSE_MIN)
        return min(max(pause * 2, PAUSE_MIN), PAUSE_MAX)

    def _admit(self, sock, addr, listener):
        """Count the connection against the limits and start its thread, or refuse it: closed
        before the greeting, with a log line. -> None if admitted, else why not (_LIMIT, _NO_THREAD)."""
        ex = self.export
        client = ("client", _client(sock, addr))
        with self._lock:
            on_listener = self._count.get(listener, 0)
            from_client = self._count.get(client, 0)
            if on_listener >= ex.max_connections:
                refused = _LIMIT
                why = f"the listener has {on_listener} connections (max_connections = {ex.max_connections})"
            elif ex.max_connections_per_client and from_client >= ex.max_connections_per_client:
                refused = _LIMIT
                why = (f"{client[1]} has {from_client} connections "
                       f"(max_connections_per_client = {ex.max_connections_per_client})")
            else:
                why = refused = None
                self._count[listener] = on_listener + 1
                self._count[client] = from_client + 1
        if why is None:
            try:
                threading.Thread(target=self._serve, args=(sock, (listener, client)), name="nbd-conn", daemon=True).start()
                return None
            except RuntimeError as e:  # no thread to be had: the listener lives on
                self._release((listener, client))
                refused = _NO_THREAD
                why = f"cannot start a thread ({e})"
        log.warning("%s: refused on %s: %s", _peer(sock), listener, why)
        _drop(sock)
        return refused

    def _release(self, keys):
        with self._lock:
            for key in keys:
                n = self._count[key] - 1
                if n:
                    self._count[key] = n
                else:
                    del self._count[key]

    # one connection

    def _serve(self, sock, counted):
        peer = _peer(sock)
        try:
            result = self._handshake(sock, peer)
            if result is None:
                return
            selected, trailing, hs = result
            device = self.catalog.device(selected.export.name)
            if device is None:
                log.warning("%s: export %s went away during the handshake", peer, selected.export.name)
                return
            session = Session(self, sock, device, selected, trailing, hs.tls)
            session.peer = peer
            if sock.family != socket.AF_UNIX:  # who it is, for allowed_clients on reload
                session.address = peer.rsplit(":", 1)[0]
                session.cn = hs.tls.peer_cn if hs.tls is not None else None
            with self._lock:
                if self._stopping:
                    session.conn.release()
                    return
                self.sessions.add(session)
            log.info("%s: %s: connected%s%s", device.name, peer,
                     f" ({hs.tls.version}, {hs.tls.cipher})" if hs.tls is not None else "",
                     " (structured replies)" if selected.structured_replies else "")
            try:
                session.run()
            finally:
                with self._lock:
                    self.sessions.discard(session)
                    idle = not self.sessions
                if idle:
                    heap.release_free_memory()  # the last client left: RSS back to what is used
        except Exception:
            log.exception("%s: connection failed", peer)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            self._release(counted)

    def _handshake(self, sock, peer):
        ctx = self.tls_context if sock.family != socket.AF_UNIX else None  # TLS is for TCP listeners
        hs = ServerHandshake(self.catalog, tls=ctx, tls_required=self.export.tls == "require",
                             authorize=self._authorizer(sock, peer))
        limit = self.export.handshake_timeout
        deadline = time.monotonic() + limit

        def in_time():
            # one deadline for the whole handshake: a client dripping a byte at a time gains nothing
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout
            sock.settimeout(left)

        try:
            in_time()
            sock.sendall(hs.data_to_send())
            while True:
                event = hs.next_event()
                out = hs.data_to_send()
                if out:
                    in_time()
                    sock.sendall(out)
                if event is NEED_DATA:
                    in_time()
                    hs.receive_data(sock.recv(65536))
                    continue
                if isinstance(event, ExportSelected):
                    sock.settimeout(None)
                    return event, hs.trailing_data, hs
                if isinstance(event, ConnectionClosed):
                    log.info("%s: closed the connection during the handshake", peer)
                    return None
                if isinstance(event, Aborted):
                    return None
        except RemoteProtocolError as e:
            log.warning("%s: closing: %s", peer, e.reason if hasattr(e, "reason") else e)
            if hs.tls is not None:  # a TLS alert says why, to a client that can read it
                try:
                    sock.sendall(hs.tls.outgoing())
                except OSError:
                    pass
        except socket.timeout:
            log.warning("%s: closing: handshake not finished in %gs (handshake_timeout)", peer, limit)
        except OSError as e:
            log.info("%s: handshake ended: %s", peer, e)
        return None

    def _authorizer(self, sock, peer):
        """The handshake's check of the export's allowed_clients (TCP clients only: a unix
        socket's mode and group say who reaches it)."""
        if sock.family == socket.AF_UNIX:
            return None
        address = peer.rsplit(":", 1)[0]

        def authorize(name, cn):
            allowed = self.catalog.allowed_clients(name)
            why = allowed.refusal(name, address, cn) if allowed is not None else None
            if why:
                log.warning("%s: refused: %s", peer, why)
            return why

        return authorize

    # control

    def clients(self, device_name=None):
        with self._lock:
            return [s for s in self.sessions if device_name is None or s.device.name == device_name]

    def disconnect(self, device_name, reason):
        for s in self.clients(device_name):
            s.conn.abort(reason)

    def disconnect_unallowed(self):
        """After a reload: the clients the allowed_clients of their export no longer name."""
        for s in self.clients():
            allowed = self.catalog.allowed_clients(s.device.name)
            if allowed is not None and s.address is not None:
                why = allowed.refusal(s.device.name, s.address, s.cn)
                if why:
                    log.warning("%s: disconnected by reload: %s", s.peer, why)
                    s.conn.abort(why)

    def close_listener(self, name):
        """Stop accepting on one listener (a reload dropped it); sessions and other listeners stay."""
        for entry in [e for e in self.listeners if e[1] == name]:
            self.listeners.remove(entry)
            _close(*entry)

    def stop_listening(self):
        self._stopping = True
        listeners, self.listeners = self.listeners, []
        for s, name in listeners:
            _close(s, name)

    def stop(self, reason="server stopping"):
        self.stop_listening()
        for s in self.clients():
            s.conn.abort(reason)
