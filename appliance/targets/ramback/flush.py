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
The background flusher and a sweep keep DEPTH runs in flight each, written straight
from the store's memory (backing.py): the disk always has the next run queued.

The background flusher walks the device with a cursor, wrapping around, so every
dirty chunk is reached within one sweep of the device (a chunk never stays dirty
forever), and it sleeps only when nothing is dirty.

FLUSH requests that need backing (writethrough, sync=backing) share sweeps (Syncs): a
FLUSH waits for the next sweep that starts after it arrived, and every FLUSH that
arrived meanwhile is answered by that same sweep.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time

from ... import io as bio
from ..._fast.chunkstate import DIRTY, FLUSHING
from ...power.state import WRITEBACK
from .backing import InFlight

log = logging.getLogger("appliance.ramback")

FLUSH_IO = 8 << 20  # bytes per coalesced backing write, at most
DEPTH = 4  # runs in flight, per sweep and for the background flusher
GAP_BYTES = 256 << 10  # CLEAN bytes a run may bridge
# In writeback mode, while dirty data stays under BACKGROUND of the dirty limit, it may age up
# to EXPIRE seconds before a pass writes it back (Linux's dirty_background_ratio and
# dirty_expire_centisecs): rewrites of the same chunks coalesce, and a burst of application
# writes does not share two cores with its own writeback. Writethrough mode, refused writes,
# a drain() in progress or more dirty data than that: write back at once, continuously.
BACKGROUND = 0.25
EXPIRE = 10.0


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
        self.failing = None  # the last backing write failed, and none succeeded since: what failed
        self.progress_at = time.monotonic()  # the last run written back (or the start)
        self.sweeps = 0
        self.progress = threading.Condition()  # notified after every run written
        self.thread = None
        self.stop_flag = False
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._last_log = 0.0
        self._last_done = 0.0  # for the busy time of runs that overlap
        self._background = InFlight(DEPTH)
        self.dirty_since = None  # when the current pass's oldest dirty data was first seen
        self.state = "idle"  # for the status: idle, aging (writeback, under BACKGROUND), flushing
        self.urgent_until = 0.0  # drain() asks for everything now
        self.syncs = Syncs(self)

    # the protocol

    def _start_run(self, a, b, flags, then):
        """Write chunks [a, b) back; the caller holds their range lock. then(0 or errno) runs
        when it is done, on an I/O thread."""
        rb = self.rb
        cs = rb.cs
        if cs.begin_flush(a, b) == 0:
            then(0)
            return
        shift = rb.shift
        off = a << shift
        end = min(b << shift, rb.length)
        t0 = time.monotonic()

        def done(err):
            cs.end_flush(a, b, not err)
            self._account(a, b, end - off, t0, err)
            then(err)

        rb.backing_io.submit(bio.WRITE, off, rb.store.view[off:end], flags, done)

    def _account(self, a, b, nbytes, t0, err):
        rb = self.rb
        now = time.monotonic()
        if err:
            self.errors += 1
            self.last_error = f"{os.strerror(err)} writing {nbytes} bytes at {a << rb.shift}"
            self.failing = self.last_error
            if now - self._last_log > 5:
                self._last_log = now
                log.error("%s: flush to backing failed: %s; the chunks stay dirty", rb.label, self.last_error)
        else:
            # busy time, not latency: with runs in flight together, each counts from when the
            # one before it ended
            self.bw.add(nbytes, now - max(t0, self._last_done))
            self._last_done = now
            self.stored += b - a
            self.failing = None
            self.progress_at = now
        rb.update_limit()
        with self.progress:
            self.progress.notify_all()

    def write_run(self, a, b, flags=0):
        """Write chunks [a, b) back and wait; the caller holds their range lock. 0 or an errno."""
        ev = threading.Event()
        box = [0]

        def then(err):
            box[0] = err
            ev.set()

        self._start_run(a, b, flags, then)
        ev.wait()
        return box[0]

    def _run_async(self, a, b, inflight):
        """Take the range lock of [a, b) and start writing it back, once `inflight` has room;
        the lock is released when the write is done."""
        locks = self.rb.locks
        inflight.acquire()
        entry = locks.request(a, b)
        locks.wait(entry)

        def then(err):
            locks.release(entry)
            inflight.release(err)

        try:
            self._start_run(a, b, 0, then)
        except BaseException:
            then(errno.EIO)
            raise

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
        inflight = InFlight(DEPTH)
        try:
            while pos < n:
                run = cs.next_run(pos, n, (1 << DIRTY) | (1 << FLUSHING), maxn, gap)
                if run is None:
                    break
                a, b = run
                self._run_async(a, b, inflight)
                pos = b
                if progress is not None:
                    progress()
        finally:
            first = inflight.wait()
        err = rb.backing_io.io(bio.FLUSH)
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
        self._background.wait()
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
                    self._background.wait()  # the next pass must not find these runs FLUSHING
                    if self.cursor == 0:  # counted but not found: a write between its two marks
                        self._sleep(0.01)
                    self.cursor = 0
                    self.sweeps += 1
                    self.dirty_since = None  # what is dirty now was dirtied during this pass
                    continue
                a, b = run
                self.cursor = b
                self._run_async(a, b, self._background)
                if self.failing:
                    self._background.wait()
                    self._sleep(1.0)  # backing fails: retry, but do not spin
            except Exception:
                log.exception("%s: flusher", rb.label)
                self._sleep(1.0)


def counts_line(cs):
    e, c, d, f = cs.counts()
    return f"{e} empty, {c} clean, {d} dirty, {f} flushing"



class Syncs:
    """FLUSH requests that need a sweep, sharing sweeps: one thread at a time runs them.
    A request that arrives while a sweep runs waits for the next one (the running sweep
    may have passed the chunks it must see written), and every request waiting when a
    sweep starts is answered by that sweep."""

    def __init__(self, flusher):
        self.flusher = flusher
        self.count = 0  # sweeps run for FLUSH requests
        self._lock = threading.Lock()
        self._waiting = []
        self._running = False

    def request(self, done):
        """done(0 or errno) once a sweep that started after this call has finished."""
        with self._lock:
            self._waiting.append(done)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._loop, name=f"ramback-sync {self.flusher.rb.label}", daemon=True).start()

    def _loop(self):
        while True:
            with self._lock:
                batch, self._waiting = self._waiting, []
                if not batch:
                    self._running = False
                    return
            self.count += 1
            try:
                err = self.flusher.sweep()
            except Exception:
                log.exception("%s: flush", self.flusher.rb.label)
                err = errno.EIO
            for done in batch:
                done(err)
