"""ramback's request path: map() for every operation the core hands it.

- READ: loaded chunks are copied out of RAM at once; a read that needs a load goes to a
  load worker, which loads what it needs itself (it does not queue behind populate).
- WRITE, WRITE_ZEROES: see the package docstring for the two ways a write goes. A write
  in writeback mode first gets room under the dirty limit (_admit): it waits while
  dirty data is at the limit, and fails with EIO only when backing fails or makes no
  progress for STALL seconds.
- FLUSH: at once in writeback mode with sync=ram (the promise); otherwise it waits for
  a sweep that writes back everything dirty and flushes backing, shared with the
  FLUSHes that arrive meanwhile (flush.Syncs).
- TRIM is advisory and ignored (RAM and backing keep equal bytes); CACHE loads the range.
"""

from __future__ import annotations

import errno
import logging
import time

from ... import io as bio
from ..._fast.chunkstate import CLEAN, DIRTY, EMPTY, FLUSHING
from ...power.state import WRITEBACK, WRITETHROUGH

log = logging.getLogger("appliance.ramback")

STALL = 30.0  # seconds a writer at the dirty limit waits for a flush to make progress
THROUGH = -1  # _admit: write this one through to backing


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
            if self.mode == WRITEBACK and self.sync == "ram" and self.marked:
                io.complete(0)  # the promise: RAM speed, the UPS covers the rest
            else:
                self.flusher.syncs.request(io.complete)
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
        through = self.mode == WRITETHROUGH or not self.marked or (io.flags & bio.FUA and self.sync == "backing")
        reserved = 0
        if not through:
            reserved = self._admit(c0, c1)
            if reserved == THROUGH:
                through, reserved = True, 0
            elif reserved < THROUGH:
                io.error = -reserved
                return bio.KILL
            elif not self.cs.any_empty(c0, c1):
                self._copy(io, c0, c1)
                self._unreserve(reserved)
                io.complete(0)
                return bio.SUBMITTED
        entry = self.locks.request(c0, c1)  # the place in line is taken now, in arrival order
        self._writes.submit(self._locked_write, io, entry, c0, c1, through, reserved)
        return bio.SUBMITTED

    def _copy(self, io, c0, c1):
        """Put a write's data in RAM and mark its chunks DIRTY.

        Loaded chunks (CLEAN, DIRTY, FLUSHING) are marked before the copy and again after.
        A flush that began before the copy ended either ended before the second mark, which
        makes the chunk DIRTY again, or ends after it and finds it DIRTY, not FLUSHING, so it
        stays DIRTY (end_flush). The first mark means that a kill during the copy leaves the
        chunk DIRTY, never CLEAN with RAM different from backing.

        EMPTY chunks (only on the locked path: the caller holds the range lock, and the write
        covers them whole, the partial ones were loaded first) are marked only after the copy.
        Until then they stay EMPTY, so:
        - a kill -9 during the copy leaves them EMPTY, and the restart loads backing's bytes
          into them (the write was not acknowledged): never zeros flushed over backing;
        - readers, the compiled fast path included, see EMPTY and load, which waits for the
          range lock we hold; they never see RAM the copy has not written yet;
        - no flush can clean them before the copy: flushes take DIRTY chunks only;
        - populate cannot load backing over the new data: its loads take the range lock we
          hold, and once marked the chunks are not EMPTY, so no load touches them again.
        """
        cs = self.cs
        if cs.any_empty(c0, c1):
            loaded = (1 << CLEAN) | (1 << DIRTY) | (1 << FLUSHING)
            pos = c0
            while (run := cs.next_run(pos, c1, loaded)) is not None:
                cs.mark_dirty(*run)
                pos = run[1]
        else:
            cs.mark_dirty(c0, c1)
        if io.op == bio.WRITE_ZEROES:
            cs.zero(io.offset, io.length)
        else:
            cs.copy_in(io.offset, _bytes_view(io.buf))
        cs.mark_dirty(c0, c1)

    def _locked_write(self, io, entry, c0, c1, through, reserved):
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
            self._unreserve(reserved)
            self.locks.release(entry)
        io.complete(err)

    # the dirty limit

    def _admit(self, c0, c1):
        """Room under the dirty limit for a writeback write of chunks [c0, c1).

        Returns the chunks reserved for it (release them with _unreserve once the write has
        marked them, or failed), THROUGH when it must be written through instead (the device
        is suspending: a reload or a stop must not wait for the flusher), or a negative errno.
        Chunks the write finds DIRTY already cost nothing. Reserving at map time, before a
        worker marks the chunks, is what keeps writes queued behind a load from passing the
        limit all together."""
        cs = self.cs
        need = cs.count_range(c0, c1, (1 << EMPTY) | (1 << CLEAN))
        waited_from = None
        flusher = self.flusher
        while True:
            if self.refused is not None:
                return -errno.ESHUTDOWN
            if self.suspending or not self.running:
                return THROUGH
            with self._room:
                dirty = cs.count(DIRTY) + cs.count(FLUSHING) + self.reserved
                if need == 0 or dirty == 0 or dirty + need <= self.limit_chunks:
                    self.reserved += need
                    self._fast_limit()
                    return need
            now = time.monotonic()
            if waited_from is None:
                waited_from = now
                self.throttled += 1
            if flusher.failing or now - max(waited_from, flusher.progress_at) > STALL:
                self.failed_writes += 1
                why = flusher.failing or f"no write to backing completed for {STALL:.0f} s"
                log.error("%s: a write at the dirty limit fails with EIO: backing: %s", self.label, why)
                return -errno.EIO
            with flusher.progress:
                flusher.progress.wait(0.2)

    def _unreserve(self, n):
        if n:
            with self._room:
                self.reserved -= n
                self._fast_limit()
            with self.flusher.progress:
                self.flusher.progress.notify_all()

    def _fast_limit(self):
        """The compiled fast path sees the limit less what slow writes have reserved (with _room)."""
        self.cs.limit_chunks = max(1, self.limit_chunks - self.reserved)

    def block_status(self, offset, length):
        return [(length, 0)]

def _bytes_view(buf):
    view = memoryview(buf)
    return view if view.format == "B" and view.contiguous else view.cast("B")

