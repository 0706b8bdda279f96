"""The path checker (multipathd's, per map): every polling_interval, read each path's first
4 KiB; reinstate a failed path that answers, fail an active one that does not; count the
intervals with no usable path for no_path_retry.

A read, not a handshake or a stat: a server that accepts connections but answers every
read with an error is no path. A remote path's device reconnects by itself, so the probe
reads through it: the read proves the connection it reached. A probe that gets no answer
within the interval counts as failed (its late answer is dropped).
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from ... import io as bio

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
        done = threading.Event()
        io = bio.IO(bio.READ, 0, n, bytearray(n), 0, lambda _io: done.set())
        try:
            dev.submit(io)
        except Exception as e:
            return str(e)
        deadline = time.monotonic() + max(self.interval, 1.0)
        while not done.wait(0.1):  # in slices: a table being removed does not wait for a probe
            if self._stop.is_set() or time.monotonic() > deadline:
                return bio.path_error(errno.ETIMEDOUT)
        return io.error
