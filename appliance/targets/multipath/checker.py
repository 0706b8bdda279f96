"""The path checker (multipathd's, per map): every polling_interval, read each path's first
4 KiB; reinstate a failed path that answers, fail an active one that does not.

A read, not a handshake or a stat: a server that accepts connections but answers every
read with an error is no path. A failed remote path is read through a connection of the
probe's own (and its device must have reconnected too); an active one through its device.
A probe that gets no answer within checker_timeout counts as failed (its late answer is
dropped); meanwhile the next paths wait, which is why timers.py, not this thread, keeps time.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from types import SimpleNamespace

from ... import io as bio
from ...blockdev import DeviceError
from ...nbd import constants as C
from ...nbd.connection import Connection, connect

log = logging.getLogger("appliance.multipath")

PROBE_BYTES = 4096


class Checker:
    def __init__(self, target, interval):
        self.target = target
        self.interval = interval
        self._stop = threading.Event()
        self._now = threading.Event()  # probe at once (a disk came back)
        self._thread = threading.Thread(target=self._run, name="multipath-checker", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._now.set()
        if self._thread is not threading.current_thread():
            self._thread.join(self.interval + 5)

    def poke(self):
        self._now.set()

    def _run(self):
        while not self._stop.is_set():
            self._now.wait(self.interval)
            self._now.clear()
            if self._stop.is_set():
                return
            try:
                self.check_all()
            except Exception:  # the checker must outlive a bug in one probe
                log.exception("multipath checker failed")

    def check_all(self):
        t = self.target
        for path in list(t.all_paths()):
            if self._stop.is_set():
                return
            if path.by_message:
                continue  # an operator took it out; only reinstate_path brings it back
            error = self.probe(path)
            t.checked(path, error)
        t.interval_passed()

    def probe(self, path):
        """0, or why the path failed its probe (an errno or a sentence)."""
        if path.dev is None:
            try:
                self.target.open_path(path)
            except Exception as e:
                return str(e)
        dev = path.dev
        why = getattr(dev, "failed", None)  # a remote path that is reconnecting, a lost disk
        if why:
            return why
        n = min(PROBE_BYTES, dev.size)
        if getattr(dev, "kind", None) == "nbd" and not path.active:
            return self._read_fresh(dev.address, n)
        done = threading.Event()
        io = bio.IO(bio.READ, 0, n, bytearray(n), 0, lambda _io: done.set())
        try:
            dev.submit(io)
        except Exception as e:
            return str(e)
        deadline = time.monotonic() + self.target.checker_timeout
        while not done.wait(0.1):  # in slices: a table being removed does not wait for a probe
            if self._stop.is_set() or time.monotonic() > deadline:
                return bio.path_error(errno.ETIMEDOUT)
        return io.error

    def _read_fresh(self, address, n):
        """Read n bytes at 0 of a remote export on a new connection, then let it go: 0 or why not."""
        timeout = min(address.timeout, self.target.checker_timeout)
        try:
            sock, neg = connect(address, timeout)
        except DeviceError as e:
            return e.strerror
        conn = Connection(sock, neg, f"{address} checker", timeout)
        done = threading.Event()
        result = []
        req = SimpleNamespace(offset=0, buf=bytearray(n), extents=None, deadline=time.monotonic() + timeout,
                              done=lambda error: (result.append(error), done.set()))
        receiver = threading.Thread(target=conn.receive, name="multipath-probe", daemon=True)
        receiver.start()
        if conn.send(C.NBD_CMD_READ, 0, 0, n, None, req):
            done.wait(timeout + 1)  # the connection's own deadline ends it before this
        conn.disconnect()
        conn.sender.join(1)
        conn.drop(errno.ENOTCONN, "probe done")
        receiver.join(1)
        conn.close()
        return bio.error(result[0]) if result else bio.path_error(errno.ETIMEDOUT)
