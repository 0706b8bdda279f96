"""The mirror's end of the cluster log over a Unix socket: dm's cluster_do_request. One request
at a time; a reply overdue by `timeout` is asked for again; when the service is gone the client
reconnects every `pause` seconds, registers the log again (CTR + RESUME) and carries on, up to
`bound` seconds in all, then fails the request (the mirror then fails the write it could not
mark, never writing a region unmarked)."""

from __future__ import annotations

import errno
import logging
import socket
import time

from . import protocol

log = logging.getLogger("appliance.cluster")


class LogClient:
    def __init__(self, path, uuid, ctr_args, timeout=15.0, pause=2.0, bound=10.0):
        self.path, self.pause, self.bound = path, pause, bound
        self.proto = protocol.Client(uuid, ctr_args, timeout)
        self.sock = None

    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.proto.connection_made(time.monotonic())

    def _drop(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.proto.connection_lost()

    def call(self, rtype, data=b""):
        """The reply's data; OSError(-error) if the log refused, ETIMEDOUT past the bound."""
        start = time.monotonic()
        self.proto.request(rtype, data, start)
        while True:
            try:
                if self.sock is None:
                    self._connect()
                if out := self.proto.data_to_send():
                    self.sock.sendall(out)
                self.sock.settimeout(max(0.01, self.proto.deadline - time.monotonic()))
                try:
                    got = self.sock.recv(65536)
                except socket.timeout:
                    self.proto.check_timeout(time.monotonic())
                    continue
                if not got:
                    raise ConnectionResetError(errno.ECONNRESET, "log service closed the connection")
                self.proto.receive_data(got, time.monotonic())
                ev = self.proto.next_event()
                if isinstance(ev, protocol.Reply):
                    if ev.error:
                        raise OSError(-ev.error, f"cluster log {rtype.name}: {errno.errorcode.get(-ev.error, ev.error)}")
                    return ev.data
                if isinstance(ev, protocol.Gone):
                    raise ConnectionRefusedError(-ev.error, "log service refused CTR")
            except (ConnectionError, FileNotFoundError) as e:
                self._drop()
                if time.monotonic() - start >= self.bound:
                    self.proto.pending = None
                    raise OSError(errno.ETIMEDOUT, f"cluster log service at {self.path} gone "
                                                   f"for {self.bound:g}s: {e}") from None
                log.warning("cluster log service not found (%s); attempting to contact it", e)
                time.sleep(self.pause)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
