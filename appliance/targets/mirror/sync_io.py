"""One I/O on an underlying device, waited for: for the threads of the mirror that may block
(the log's writer, the resync), never for an engine thread's completion."""

from __future__ import annotations

import threading

from ... import io as bio


def sync_io(dev, op, offset=0, length=0, buf=None, flags=0):
    """Submit and wait; the classed error, or 0."""
    done = threading.Event()
    io = bio.IO(op, offset, length, buf, flags, lambda _io: done.set())
    dev.submit(io)
    done.wait()
    return io.error
