"""The I/O engine: asynchronous reads, writes and syncs on underlying files and disks.

Every underlying file and disk is read and written through one engine per
process, so no request holds a thread while the disk works. `get()` returns it.
Completions run `done(result)` on an engine thread, with the GIL: `result` is
the byte count (a short count only at end of file) or a negative errno.

This module is the interface. The engine behind it is io_uring where the
kernel has it, and a pool of worker threads otherwise; `kind` says which.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

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
            _engine = ThreadEngine()
        return _engine
