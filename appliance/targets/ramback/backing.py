"""I/O on ramback's backing device, asynchronous, several requests in flight.

A file or disk is read and written through the process's I/O engine
(appliance/engine.py), straight between the store's memory and the fd: the store's
data starts on a page boundary and chunks are at least a page, so every run of
chunks is page aligned and O_DIRECT needs no bounce copy. An `@NAME` backing goes
through that device's own request path (dev.submit).

`submit(op, offset, view, flags, done)` calls `done(0 or errno)` once, on an engine
or device thread: the callback must never wait for another backing I/O.
"""

from __future__ import annotations

import errno
import threading

from ... import engine
from ... import io as bio


class BackingIO:
    def __init__(self, dev):
        self.dev = dev
        self.fd = getattr(dev, "fd", None)  # a FileDevice; None for @NAME
        self.align = dev.logical_block if self.fd is not None and dev.direct else 1

    def submit(self, op, offset, view, flags, done):
        dev = self.dev
        n = 0 if view is None else len(view)
        if self.fd is None:
            dev.submit(bio.IO(op, offset, n, view, flags, lambda io: done(io.error)))
            return
        if dev.failed:  # the disk went away (udev)
            done(errno.EIO)
            return
        if (offset | n) % self.align:  # O_DIRECT refuses it; the device says so as it always did
            done(dev.execute(bio.IO(op, offset, n, view, flags)))
            return
        eng = engine.get()
        if op == bio.FLUSH:
            eng.fsync(self.fd, lambda r: done(-r if r < 0 else 0))
        elif op == bio.READ:
            eng.read(self.fd, view, offset, lambda r: done(_err(r, n)))
        elif op == bio.WRITE and flags & bio.FUA:
            def written(r):
                err = _err(r, n)
                if err:
                    done(err)
                else:
                    eng.fsync(self.fd, lambda r: done(-r if r < 0 else 0))

            eng.write(self.fd, view, offset, written)
        elif op == bio.WRITE:
            eng.write(self.fd, view, offset, lambda r: done(_err(r, n)))
        else:
            raise ValueError(f"ramback does not send {bio.OP_NAMES.get(op, op)} to backing")

    def io(self, op, offset=0, view=None, flags=0):
        """One I/O, waited for. Returns 0 or an errno."""
        ev = threading.Event()
        box = [0]

        def done(err):
            box[0] = err
            ev.set()

        self.submit(op, offset, view, flags, done)
        ev.wait()
        return box[0]


def _err(result, n):
    if result < 0:
        return -result
    return 0 if result == n else errno.EIO  # short: backing ends early


class InFlight:
    """One caller's I/Os in flight: at most `depth`, and the first error among them."""

    def __init__(self, depth):
        self.depth = depth
        self.n = 0
        self.err = 0
        self._cond = threading.Condition()

    def acquire(self):
        with self._cond:
            while self.n >= self.depth:
                self._cond.wait()
            self.n += 1

    def release(self, err=0):
        with self._cond:
            self.n -= 1
            self.err = self.err or err
            self._cond.notify_all()

    def wait(self):
        """Until nothing is in flight; returns the first error and forgets it."""
        with self._cond:
            while self.n:
                self._cond.wait()
            err, self.err = self.err, 0
            return err
