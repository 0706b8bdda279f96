"""The resync's copy: regions streamed from a good leg to the stale ones, CHUNK at a time, with
DEPTH chunks in flight, through each leg's device (the I/O engine for files and disks, the NBD
client for remote legs). A chunk's writes start from its read's completion, and a finished
chunk's buffer takes the next one at once: the legs stay busy with large I/Os, and Python runs
per chunk, never per block.

The resync thread starts the chunks (and so decides the pace: resync_rate, client priority)
and finishes the regions; the completions only count and hand back buffers.
"""

from __future__ import annotations

import mmap
import threading

from ... import io as bio

CHUNK = 1 << 20
DEPTH = 8


class RegionCopy:
    """One region's copy: [start, start+length) of the mirror, read from `src` and written to
    every leg of `dsts`."""

    def __init__(self, region, start, length, src, dsts):
        self.region, self.start, self.length, self.src, self.dsts = region, start, length, src, dsts
        self.next = 0  # where the next chunk starts, in the region
        self.left = (length + CHUNK - 1) // CHUNK  # chunks not finished
        self.read_error = 0
        self.write_errors = {}  # leg -> its first error
        self.aborted = False  # stopped before every chunk was started (a pause)

    @property
    def started_all(self):
        return self.next >= self.length

    @property
    def done(self):
        """The legs that now hold the region."""
        if self.read_error or self.aborted:
            return []
        return [d for d in self.dsts if d not in self.write_errors]


class Stream:
    """DEPTH page-aligned buffers and the chunks in flight in them."""

    def __init__(self):
        self.cond = threading.Condition()
        self.free = [mmap.mmap(-1, CHUNK) for _ in range(DEPTH)]
        self.inflight = 0
        self.finished = []  # RegionCopy whose chunks are all done

    def start(self, c):
        """Start c's next chunk (resync thread; a buffer is free). Returns its length."""
        with self.cond:
            if c.read_error:  # the source failed: the rest of the region is not read
                self._drop_rest(c)
                return 0
            buf = self.free.pop()
            off = c.next
            n = min(CHUNK, c.length - off)
            c.next += n
            self.inflight += 1
        view = memoryview(buf)[:n]
        c.src.dev.submit(bio.IO(bio.READ, c.src.offset + c.start + off, n, view, 0,
                                lambda io: self._read(c, off, n, buf, view, io)))
        return n

    def abort(self, c):
        """Start no more of c (a pause): it finishes with what is in flight, not in sync."""
        with self.cond:
            c.aborted = True
            self._drop_rest(c)

    def _drop_rest(self, c):
        """(cond held) Count c's chunks not started as finished."""
        unstarted = (c.length - c.next + CHUNK - 1) // CHUNK
        c.next = c.length
        c.left -= unstarted
        if unstarted and c.left == 0:
            self.finished.append(c)
            self.cond.notify_all()

    def _read(self, c, off, n, buf, view, io):
        if io.error:
            with self.cond:
                c.read_error = c.read_error or io.error
            self._chunk_done(c, buf)
            return
        dsts = [d for d in c.dsts if d not in c.write_errors]
        if not dsts:
            self._chunk_done(c, buf)
            return
        left = [len(dsts)]
        for dst in dsts:
            dst.dev.submit(bio.IO(bio.WRITE, dst.offset + c.start + off, n, view, 0,
                                  lambda w, dst=dst: self._wrote(c, dst, buf, left, w)))

    def _wrote(self, c, dst, buf, left, io):
        with self.cond:
            if io.error:
                c.write_errors.setdefault(dst, io.error)
            left[0] -= 1
            last = left[0] == 0
        if last:
            self._chunk_done(c, buf)

    def _chunk_done(self, c, buf):
        with self.cond:
            self.free.append(buf)
            self.inflight -= 1
            c.left -= 1
            if c.left == 0:
                self.finished.append(c)
            self.cond.notify_all()

    def take_finished(self):
        with self.cond:
            out, self.finished = self.finished, []
        return out

    def wait(self, timeout=None):
        """Until a chunk finishes (or timeout)."""
        with self.cond:
            if not self.finished:
                self.cond.wait(timeout)
