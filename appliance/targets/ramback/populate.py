"""Loading the store from backing: in the background, and at once for a read that needs it.

A load reads a run of EMPTY chunks from backing into a buffer without any lock, then
installs, under the range lock, only the chunks that are still EMPTY (the seed's
populate race: a write that landed meanwhile made its chunks DIRTY, and its data
wins). Reading unlocked is sound because backing's bytes of an EMPTY chunk never
change: only flushes and writethrough writes touch backing, and both work on chunks
that are loaded or that the write covers whole and has already marked DIRTY.

The background loader reads POPULATE_IO-byte runs back to back (the disk is never
idle while populating). A read of an EMPTY chunk does not queue behind it: it loads
what it needs itself, so it waits for at most one background read at the disk.
In writethrough mode the loader pauses while dirty data waits: the drain comes first.
"""

from __future__ import annotations

import logging
import threading
import time

from ... import io as bio
from ..._fast.chunkstate import DIRTY, EMPTY, FLUSHING
from ...power.state import WRITETHROUGH
from .flush import backing_io

log = logging.getLogger("appliance.ramback")

POPULATE_IO = 8 << 20


class Populate:
    def __init__(self, rb):
        self.rb = rb
        self.cursor = 0
        self.loaded_bytes = 0  # loaded by this table, for the rate
        self.started = None
        self.done_at = None
        self.errors = 0
        self.last_error = None
        self.thread = None
        self.stop_flag = False
        self.wake = threading.Event()
        self._rate = 0.0
        self._t0 = None
        self._b0 = 0

    def read_run(self, a, b, buf=None):
        """Backing's bytes of chunks [a, b): (errno, buffer)."""
        rb = self.rb
        off = a << rb.shift
        end = min(b << rb.shift, rb.length)
        if buf is None:
            buf = bytearray(end - off)
        view = memoryview(buf)[: end - off]
        return backing_io(rb.backing, bio.READ, off, end - off, view), view

    def load(self, a, b, locked=False, buf=None):
        """Load the EMPTY chunks of [a, b). `locked`: the caller holds the range lock already.
        Returns 0 or an errno."""
        rb = self.rb
        err, view = self.read_run(a, b, buf)
        if err:
            self.errors += 1
            self.last_error = f"read of chunks {a}..{b} failed: errno {err}"
            return err
        if locked:
            n = rb.cs.install(a, b, view)
        else:
            with rb.locks.hold(a, b):
                n = rb.cs.install(a, b, view)
        self.loaded_bytes += n << rb.shift
        return 0

    def load_for(self, c0, c1, locked=False):
        """Make every chunk of [c0, c1) loaded (a read, or a partial write, needs it)."""
        run = self.rb.cs.next_run(c0, c1, 1 << EMPTY)
        if run is None:
            return 0
        # one backing read from the first EMPTY chunk to the last one of the range
        last = c1
        while last > run[0] and self.rb.cs.state(last - 1) != EMPTY:
            last -= 1
        return self.load(run[0], last, locked)

    # the background thread

    def start(self):
        if self.thread is not None or self.rb.cs.count(EMPTY) == 0:
            return
        self.stop_flag = False
        self.started = self.started or time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"ramback-populate {self.rb.label}", daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread is None:
            return
        self.stop_flag = True
        self.wake.set()
        self.thread.join()
        self.thread = None

    def _run(self):
        rb = self.rb
        cs = rb.cs
        n = cs.nchunks
        maxn = max(1, POPULATE_IO >> rb.shift)
        buf = bytearray(min(POPULATE_IO, maxn << rb.shift))
        self._t0, self._b0 = time.monotonic(), self.loaded_bytes
        while not self.stop_flag and cs.count(EMPTY) > 0:
            try:
                if rb.mode == WRITETHROUGH and cs.count(DIRTY) + cs.count(FLUSHING) > 0:
                    self.wake.wait(0.2)  # the drain has the disk first
                    self.wake.clear()
                    continue
                run = cs.next_run(self.cursor, n, 1 << EMPTY, maxn)
                if run is None:
                    self.cursor = 0
                    continue
                a, b = run
                self.cursor = b
                if self.load(a, b, buf=buf):
                    log.error("%s: populate: %s; retrying", rb.label, self.last_error)
                    self.wake.wait(1.0)
                self._measure()
            except Exception:
                log.exception("%s: populate", rb.label)
                self.wake.wait(1.0)
        if cs.count(EMPTY) == 0 and self.done_at is None:
            self.done_at = time.monotonic()
            log.info("%s: populated: %d chunks loaded from backing", rb.label, cs.nchunks)

    def _measure(self):
        now = time.monotonic()
        if now - self._t0 >= 1.0:
            rate = (self.loaded_bytes - self._b0) / (now - self._t0)
            self._rate = rate if not self._rate else 0.5 * self._rate + 0.5 * rate
            self._t0, self._b0 = now, self.loaded_bytes

    def rate(self):
        if self._rate:
            return self._rate
        if self._t0 and time.monotonic() > self._t0:
            return (self.loaded_bytes - self._b0) / (time.monotonic() - self._t0)
        return 0.0
