"""Loading the store from backing: in the background, and at once for a read that needs it.

A load reads backing's bytes straight into the store's memory (no bounce buffer),
and only into chunks that are EMPTY and stay EMPTY until the read is done: it holds
the range lock of the chunks from before it picks them until it marks them CLEAN.
That closes the seed's populate race: a write into an EMPTY chunk holds the same
lock (requests.py), so it either comes first, and the chunk is no longer EMPTY when
the load looks, or waits until the load has installed the chunk. Loaded chunks are
never read into again (a lock-free writeback write may be writing them).

The background loader keeps DEPTH reads of POPULATE_IO bytes in flight (the disk is
never idle while populating). A read of an EMPTY chunk does not queue behind it: it
loads what it needs itself, so it waits for at most the background reads of the same
chunks. In writethrough mode the loader pauses while dirty data waits: the drain comes
first.
"""

from __future__ import annotations

import logging
import threading
import time

from ... import engine
from ... import io as bio
from ..._fast.chunkstate import DIRTY, EMPTY, FLUSHING
from ...power.state import WRITETHROUGH
from .backing import InFlight

log = logging.getLogger("appliance.ramback")

POPULATE_IO = 8 << 20
DEPTH = 4  # background reads in flight


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
        self._inflight = InFlight(DEPTH)

    def _start_load(self, a, b, entry, inflight):
        """Read the EMPTY chunks of [a, b) into the store; the caller holds the range lock of
        [a, b): `entry`, released once every read is done, or None (the caller releases it).
        One read per stretch of EMPTY chunks, each taking a place in `inflight`."""
        rb = self.rb
        cs = rb.cs
        runs = []
        pos = a
        while (run := cs.next_run(pos, b, 1 << EMPTY)) is not None:
            runs.append(run)
            pos = run[1]
        left = [len(runs)]
        guard = threading.Lock()
        if not runs:
            if entry is not None:
                rb.locks.release(entry)
            return
        for x, y in runs:
            inflight.acquire()
            off = x << rb.shift
            end = min(y << rb.shift, rb.length)

            def done(err, x=x, y=y):
                if err:
                    self.errors += 1
                    self.last_error = f"read of chunks {x}..{y} failed: errno {err}"
                else:
                    self.loaded_bytes += cs.install(x, y) << rb.shift
                with guard:
                    left[0] -= 1
                    last = left[0] == 0
                if last and entry is not None:
                    rb.locks.release(entry)
                inflight.release(err)

            rb.backing_io.submit(bio.READ, off, rb.store.view[off:end], 0, done)

    def load(self, a, b, locked=False):
        """Load the EMPTY chunks of [a, b) and wait. `locked`: the caller holds the range lock
        already. Returns 0 or an errno."""
        rb = self.rb
        inflight = InFlight(DEPTH)
        if locked:
            self._start_load(a, b, None, inflight)
        else:
            entry = rb.locks.request(a, b)
            rb.locks.wait(entry)
            self._start_load(a, b, entry, inflight)
        return inflight.wait()

    def load_for(self, c0, c1, locked=False):
        """Make every chunk of [c0, c1) loaded (a read, or a partial write, needs it)."""
        if self.rb.cs.next_run(c0, c1, 1 << EMPTY) is None:
            return 0
        return self.load(c0, c1, locked)

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
        with engine.background():
            self._populate()

    def _populate(self):
        rb = self.rb
        cs = rb.cs
        n = cs.nchunks
        maxn = max(1, POPULATE_IO >> rb.shift)
        inflight = self._inflight
        self._t0, self._b0 = time.monotonic(), self.loaded_bytes
        while not self.stop_flag and cs.count(EMPTY) > 0:
            try:
                if rb.mode == WRITETHROUGH and cs.count(DIRTY) + cs.count(FLUSHING) > 0:
                    self.wake.wait(0.2)  # the drain has the disk first
                    self.wake.clear()
                    continue
                run = cs.next_run(self.cursor, n, 1 << EMPTY, maxn)
                if run is None:
                    # chunks being read are EMPTY until their read is done: let them finish
                    # before the next pass looks
                    self._retry_pause(inflight.wait())
                    self.cursor = 0
                    continue
                a, b = run
                self.cursor = b
                entry = rb.locks.request(a, b)
                rb.locks.wait(entry)
                self._start_load(a, b, entry, inflight)
                if inflight.err:
                    self._retry_pause(inflight.wait())
                self._measure()
            except Exception:
                log.exception("%s: populate", rb.label)
                self.wake.wait(1.0)
        inflight.wait()
        if cs.count(EMPTY) == 0 and self.done_at is None:
            self.done_at = time.monotonic()
            log.info("%s: populated: %d chunks loaded from backing", rb.label, cs.nchunks)

    def _retry_pause(self, err):
        if err:
            log.error("%s: populate: %s; retrying", self.rb.label, self.last_error)
            self.wake.wait(1.0)

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
