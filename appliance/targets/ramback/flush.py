"""Writing dirty chunks back: the background flusher, writethrough writes and sweeps.

Every write to backing follows one protocol, the seed's "clear the dirty bit before
launching and track in-flight separately", made crash-safe by a persisted state:

    hold the range lock of the run
    DIRTY -> FLUSHING            (begin_flush; a restart would see DIRTY)
    write RAM[run] to backing
    FLUSHING -> CLEAN            (end_flush; a chunk an application write re-dirtied
                                  meanwhile is DIRTY, not FLUSHING, and stays DIRTY)

Runs are coalesced: a run is up to FLUSH_IO bytes of DIRTY chunks, bridging short
stretches of CLEAN chunks (their RAM equals backing, so writing them costs a little
bandwidth and saves a request). EMPTY chunks are never written: their RAM means nothing.

The background flusher walks the device with a cursor, wrapping around, so every
dirty chunk is reached within one sweep of the device (a chunk never stays dirty
forever), and it sleeps only when nothing is dirty.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time

from ... import io as bio
from ..._fast.chunkstate import DIRTY, FLUSHING
from ...power.state import WRITEBACK

log = logging.getLogger("appliance.ramback")

FLUSH_IO = 8 << 20  # bytes per coalesced backing write, at most
GAP_BYTES = 256 << 10  # CLEAN bytes a run may bridge
# In writeback mode, while dirty data stays under BACKGROUND of the dirty limit, it may age up
# to EXPIRE seconds before a pass writes it back (Linux's dirty_background_ratio and
# dirty_expire_centisecs): rewrites of the same chunks coalesce, and a burst of application
# writes does not share two cores with its own writeback. Writethrough mode, refused writes,
# a drain() in progress or more dirty data than that: write back at once, continuously.
BACKGROUND = 0.25
EXPIRE = 10.0


def backing_io(dev, op, offset, length, buf=None, flags=0):
    """One I/O on the backing device, waited for. Returns 0 or an errno."""
    execute = getattr(dev, "execute", None)
    if execute is not None:  # a file or disk: synchronous, the GIL released in the syscall
        return execute(bio.IO(op, offset, length, buf, flags))
    done = threading.Event()
    box = []

    def endio(io):
        box.append(io.error)
        done.set()

    dev.submit(bio.IO(op, offset, length, buf, flags, endio))
    done.wait()
    return box[0]


class Bandwidth:
    """Backing write bandwidth, measured on the flushes themselves: bytes over busy time,
    both decayed with a half-life of HALF_LIFE seconds of wall time, so it follows a disk
    that slows down without jumping with every request."""

    ASSUMED = 64 << 20  # until the first flush is measured
    HALF_LIFE = 5.0

    def __init__(self):
        self.bytes = 0.0
        self.seconds = 0.0
        self.measured = False
        self.at = time.monotonic()

    def add(self, nbytes, seconds):
        now = time.monotonic()
        decay = 0.5 ** ((now - self.at) / self.HALF_LIFE)
        self.at = now
        self.bytes = self.bytes * decay + nbytes
        self.seconds = self.seconds * decay + max(seconds, 1e-6)
        self.measured = True

    @property
    def value(self):
        return self.bytes / self.seconds if self.measured else self.ASSUMED


class Flusher:
    def __init__(self, rb):
        self.rb = rb
        self.bw = Bandwidth()
        self.cursor = 0
        self.stored = 0  # chunks written back, since this table started
        self.errors = 0
        self.last_error = None
        self.sweeps = 0
        self.progress = threading.Condition()  # notified after every run written
        self.thread = None
        self.stop_flag = False
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._last_log = 0.0
        self.dirty_since = None  # when the current pass's oldest dirty data was first seen
        self.state = "idle"  # for the status: idle, aging (writeback, under BACKGROUND), flushing
        self.urgent_until = 0.0  # drain() asks for everything now

    # the protocol

    def write_run(self, a, b, flags=0):
        """Write chunks [a, b) back; the caller holds their range lock. Returns 0 or an errno."""
        rb = self.rb
        cs = rb.cs
        if cs.begin_flush(a, b) == 0:
            return 0
        shift = rb.shift
        off = a << shift
        end = min(b << shift, rb.length)
        t0 = time.monotonic()
        err = backing_io(rb.backing, bio.WRITE, off, end - off, rb.store.view[off:end], flags)
        dt = time.monotonic() - t0
        cs.end_flush(a, b, not err)
        if err:
            self.errors += 1
            self.last_error = f"{os.strerror(err)} writing {end - off} bytes at {off}"
            if time.monotonic() - self._last_log > 5:
                self._last_log = time.monotonic()
                log.error("%s: flush to backing failed: %s; the chunks stay dirty", rb.label, self.last_error)
        else:
            self.bw.add(end - off, dt)
            self.stored += b - a
        rb.update_limit()
        with self.progress:
            self.progress.notify_all()
        return err

    def flush_locked(self, a, b, flags=0):
        with self.rb.locks.hold(a, b):
            return self.write_run(a, b, flags)

    def sweep(self, progress=None):
        """Write back everything dirty now, from the first chunk to the last, then flush
        backing's cache: what FLUSH means in writethrough mode or with sync=backing. Chunks
        dirtied behind the sweep are newer than the request and are left to the flusher.
        Returns 0 or the first errno."""
        rb = self.rb
        cs = rb.cs
        n = cs.nchunks
        pos = 0
        maxn = max(1, FLUSH_IO >> rb.shift)
        gap = GAP_BYTES >> rb.shift
        first = 0
        while pos < n:
            run = cs.next_run(pos, n, (1 << DIRTY) | (1 << FLUSHING), maxn, gap)
            if run is None:
                break
            a, b = run
            err = self.flush_locked(a, b)
            first = first or err
            pos = b
            if progress is not None:
                progress()
        err = backing_io(rb.backing, bio.FLUSH, 0, 0)
        return first or err

    # the background thread

    def start(self):
        if self.thread is not None:
            return
        self.stop_flag = False
        self.rb.cs.set_wake_fd(self.wake_fd)
        self.thread = threading.Thread(target=self._run, name=f"ramback-flush {self.rb.label}", daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread is None:
            return
        self.stop_flag = True
        self.kick()
        self.thread.join()
        self.thread = None
        self.rb.cs.set_wake_fd(-1)  # start() set it; the store may outlive this table

    def kick(self):
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    def close(self):
        os.close(self.wake_fd)

    def _sleep(self, seconds):
        r, _, _ = select.select([self.wake_fd], [], [], seconds)
        if r:
            try:
                os.eventfd_read(self.wake_fd)
            except BlockingIOError:
                pass

    def _deferral(self):
        """Seconds the next pass may still wait (0: start now)."""
        rb = self.rb
        now = time.monotonic()
        if self.dirty_since is None:
            self.dirty_since = now
        cs = rb.cs
        dirty = (cs.count(DIRTY) + cs.count(FLUSHING)) << rb.shift
        if rb.mode != WRITEBACK or rb.refused is not None or now < self.urgent_until:
            return 0.0
        if dirty >= rb.limit_bytes * BACKGROUND:
            return 0.0
        return self.dirty_since + EXPIRE - now

    def _run(self):
        rb = self.rb
        cs = rb.cs
        n = cs.nchunks
        maxn = max(1, FLUSH_IO >> rb.shift)
        gap = GAP_BYTES >> rb.shift
        while not self.stop_flag:
            try:
                rb.tick()
                if cs.count(DIRTY) == 0:
                    self.state = "idle"
                    self._sleep(1.0)
                    continue
                if self.cursor == 0:  # a pass starts when its oldest data is due
                    wait = self._deferral()
                    if wait > 0:
                        self.state = "aging"
                        self._sleep(min(wait, 0.5))
                        continue
                    self.state = "flushing"
                run = cs.next_run(self.cursor, n, 1 << DIRTY, maxn, gap)
                if run is None:
                    if self.cursor == 0:  # counted but not found: a write between its two marks
                        self._sleep(0.01)
                    self.cursor = 0
                    self.sweeps += 1
                    self.dirty_since = None  # what is dirty now was dirtied during this pass
                    continue
                a, b = run
                self.cursor = b
                if self.flush_locked(a, b):
                    self._sleep(1.0)  # backing fails: retry, but do not spin
            except Exception:
                log.exception("%s: flusher", rb.label)
                self._sleep(1.0)


def counts_line(cs):
    e, c, d, f = cs.counts()
    return f"{e} empty, {c} clean, {d} dirty, {f} flushing"

