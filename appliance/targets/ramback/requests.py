"""ramback's request path: map() for every operation the core hands it.

- READ: loaded chunks are copied out of RAM at once; a read that needs a load goes to a
  load worker, which loads what it needs itself (it does not queue behind populate).
- WRITE, WRITE_ZEROES: see the package docstring for the two ways a write goes. A write
  in writeback mode first waits while dirty data is at the limit (throttled, not failed).
- FLUSH: at once in writeback mode with sync=ram (the promise); otherwise a sweep writes
  back everything dirty and flushes backing, in a thread of its own.
- TRIM is advisory and ignored (RAM and backing keep equal bytes); CACHE loads the range.
"""

from __future__ import annotations

import errno
import logging
import threading

from ... import io as bio
from ..._fast.chunkstate import DIRTY, EMPTY, FLUSHING

log = logging.getLogger("appliance.ramback")

WRITETHROUGH = "writethrough"
WRITEBACK = "writeback"


class RequestPath:
    """Mixed into Ramback: needs cs, locks, populate, flusher, mode, sync, shift, length."""

    def fast_map(self):
        return self.cs.fast_ops()

    def _chunks(self, io):
        return io.offset >> self.shift, ((io.offset + max(io.length, 1) - 1) >> self.shift) + 1

    def map(self, io):
        op = io.op
        if op == bio.READ:
            return self._read(io)
        if op in (bio.WRITE, bio.WRITE_ZEROES):
            return self._write(io)
        if op == bio.FLUSH:
            if self.mode == WRITEBACK and self.sync == "ram":
                io.complete(0)  # the promise: RAM speed, the UPS covers the rest
            else:
                threading.Thread(target=self._flush_io, args=(io,), name=f"ramback-sync {self.label}", daemon=True).start()
            return bio.SUBMITTED
        if op == bio.CACHE:
            c0, c1 = self._chunks(io)
            self._loads.submit(self.populate.load_for, c0, c1)
        io.complete(0)  # TRIM is advisory: RAM and backing keep their bytes and stay equal
        return bio.SUBMITTED

    def _read(self, io):
        c0, c1 = self._chunks(io)
        if not self.cs.any_empty(c0, c1):
            self.cs.copy_out(io.offset, _bytes_view(io.buf))
            io.complete(0)
        else:
            self._loads.submit(self._read_loading, io, c0, c1)
        return bio.SUBMITTED

    def _read_loading(self, io, c0, c1):
        try:
            err = self.populate.load_for(c0, c1)
            if not err:
                self.cs.copy_out(io.offset, _bytes_view(io.buf))
        except Exception:
            log.exception("%s: read", self.label)
            err = errno.EIO
        io.complete(err)

    def _write(self, io):
        if self.refused is not None:
            io.error = errno.ESHUTDOWN
            return bio.KILL
        c0, c1 = self._chunks(io)
        through = self.mode == WRITETHROUGH or (io.flags & bio.FUA and self.sync == "backing")
        if not through:
            self._throttle(c1 - c0)
            if self.refused is not None:
                io.error = errno.ESHUTDOWN
                return bio.KILL
            if not self.cs.any_empty(c0, c1):
                self._copy(io, c0, c1)
                io.complete(0)
                return bio.SUBMITTED
        entry = self.locks.request(c0, c1)  # the place in line is taken now, in arrival order
        self._writes.submit(self._locked_write, io, entry, c0, c1, through)
        return bio.SUBMITTED

    def _copy(self, io, c0, c1):
        cs = self.cs
        cs.mark_dirty(c0, c1)
        if io.op == bio.WRITE_ZEROES:
            cs.zero(io.offset, io.length)
        else:
            cs.copy_in(io.offset, _bytes_view(io.buf))
        cs.mark_dirty(c0, c1)

    def _locked_write(self, io, entry, c0, c1, through):
        err = 0
        try:
            self.locks.wait(entry)
            cs = self.cs
            end = io.offset + io.length
            for c in {c0, c1 - 1}:  # partial chunks at either end must hold backing's bytes first
                whole = io.offset <= c << self.shift and end >= min((c + 1) << self.shift, self.length)
                if not whole and cs.state(c) == EMPTY:
                    err = err or self.populate.load(c, c + 1, locked=True)
            if not err:
                self._copy(io, c0, c1)
                if through:
                    err = self.flusher.write_run(c0, c1, io.flags & bio.FUA)
        except Exception:
            log.exception("%s: write", self.label)
            err = errno.EIO
        finally:
            self.locks.release(entry)
        io.complete(err)

    def _throttle(self, nchunks):
        cs = self.cs
        waited = False
        while self.running and self.refused is None:
            dirty = cs.count(DIRTY) + cs.count(FLUSHING)
            if dirty == 0 or dirty + nchunks <= cs.limit_chunks:
                return
            if not waited:
                self.throttled += 1
                waited = True
            with self.flusher.progress:
                self.flusher.progress.wait(0.2)

    def _flush_io(self, io):
        try:
            err = self.flusher.sweep()
        except Exception:
            log.exception("%s: flush", self.label)
            err = errno.EIO
        io.complete(err)

    def block_status(self, offset, length):
        return [(length, 0)]

def _bytes_view(buf):
    view = memoryview(buf)
    return view if view.format == "B" and view.contiguous else view.cast("B")

