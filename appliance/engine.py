"""The I/O engine: asynchronous reads, writes and syncs on underlying files and disks.

Every underlying file and disk is read and written through one engine per
process, so no request holds a thread while the disk works. `get()` returns it.
Completions run `done(result)` on an engine thread, with the GIL: `result` is
the byte count (a short count only at end of file) or a negative errno.

This module is the interface. The engine behind it is io_uring where the
kernel has it (`_fast.uring.Ring`: one ring, and one completion thread that
calls the callbacks), and a pool of worker threads otherwise; `kind` says
which. APPLIANCE_ENGINE=threads in the environment forces the pool (tests run
both). The NBD loop uses the same choice for its own per-connection queues.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from ._fast import uring

WORKERS = 16

_engine = None
_lock = threading.Lock()


class ThreadEngine:
    """Workers doing the system calls; the fallback where io_uring is not available."""

    kind = "threads"

    def __init__(self, workers=WORKERS):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="engine")

    def read(self, fd, buf, offset, done):
        self._pool.submit(self._run, _pread, fd, buf, offset, done)

    def write(self, fd, buf, offset, done):
        self._pool.submit(self._run, _pwrite, fd, buf, offset, done)

    def fsync(self, fd, done, datasync=True):
        self._pool.submit(self._run, _fsync, fd, datasync, 0, done)

    @staticmethod
    def _run(fn, fd, a, b, done):
        try:
            result = fn(fd, a, b)
        except OSError as e:
            result = -(e.errno or 5)
        done(result)

    def status(self):
        return {"kind": self.kind, "workers": WORKERS}


class UringEngine:
    """io_uring: submission from the caller's thread, completions on one thread of ours."""

    kind = "io_uring"

    def __init__(self):
        self._ring = uring.Ring(256)
        self.read = self._ring.read
        self.write = self._ring.write
        self.fsync = self._ring.fsync
        threading.Thread(target=self._ring.run, name="engine-uring", daemon=True).start()

    def status(self):
        return {"kind": self.kind, "in_flight": self._ring.in_flight, "submitted": self._ring.submitted}


def _pread(fd, buf, offset):
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _pwrite(fd, buf, offset):
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
    return done


def _fsync(fd, datasync, _):
    (os.fdatasync if datasync else os.fsync)(fd)
    return 0


def get():
    """The process's engine, started on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = UringEngine() if uring.kind() == "io_uring" else ThreadEngine()
        return _engine


def poll_stats():
    """What the NBD loops' polling for completions took and caught (uring.pyx's queue_wait):
    CPU seconds spent polling, polls that saw news in time, polls that gave up and slept,
    and the background jobs running now (each leaves the pollers one CPU fewer)."""
    return uring.poll_stats()


@contextlib.contextmanager
def background():
    """Around a target's background job (a copy of its data that runs for seconds or more):
    while it runs, the NBD loops leave it a CPU of its own rather than spend it polling
    (uring.pyx's max_pollers)."""
    uring.background(1)
    try:
        yield
    finally:
        uring.background(-1)
