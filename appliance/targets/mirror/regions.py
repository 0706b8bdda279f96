"""The mirror's regions in flight (dm-region-hash.c): writes pending per region, the marks that
must be durable before a write reaches the legs, lazy clears, and regions under recovery.

Every write marks its regions in the log first. With a log that must reach its device (`disk`),
writes whose regions are not yet durably marked wait in a batch; one writer thread flushes the
log once for the whole batch and then issues them, so a burst of writes costs one log write.
A region is cleared some time (CLEAR_DELAY) after its last write completed on every leg, if it
is in sync, and only after the legs were flushed: a clear on the log must never claim data
that could still be lost from a leg's cache. A region under recovery takes no new writes
(they wait for that region only), and recovery starts once its pending writes are done.

With legs that are all files or disks, a region whose mark is durable is granted to the
compiled fast path (`fast`, _fast/regionmap.pyx): the NBD loop then writes it to every leg
itself. The region comes back here (revoke, waiting for the fast writes in flight) before it
may be cleared or recovered: a region idle for a sweep (CLEAR_DELAY) is revoked and cleared as
any other. So a write reaches a leg only while its region's mark is durable, on either path.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import defaultdict

from ... import io as bio

log = logging.getLogger("appliance.mirror")

CLEAR_DELAY = 1.0


class RegionHash:
    def __init__(self, mirror, log_, durable_marks):
        self.mirror = mirror
        self.log = log_
        self.durable_marks = durable_marks  # marks wait for log.flush() before the write goes
        self.lock = threading.Condition(mirror.lock)
        self.pending = defaultdict(int)  # region -> writes in flight
        self.recovering = set()
        self.waiting = defaultdict(list)  # region under recovery -> writes waiting for it
        self.durable = set()  # marked, and the mark is on the log device
        self.marking = set()  # marked, the mark not yet flushed
        self.batch = []  # callables to run after the next log flush
        self.clearable = {}  # region -> completion sequence number of its last write
        self.seq = 0
        self.log_writes = 0  # log flushes that wrote something
        self._round = None  # the sequence number a leg flush in flight covers
        self._flushed = None  # the sequence number the last completed leg flush covers
        self._stop = False
        self._thread = None
        self.fast = None  # the fast path's RegionMap, if the legs allow one

    def start(self):
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="mirror-log", daemon=True)
            self._thread.start()

    def stop(self):
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    # writes

    def start_write(self, regions, issue):
        """Called with the lock held. Returns True if the write may go now; otherwise it waits
        (for a region under recovery or for its marks to be durable) and `issue()` runs later."""
        for r in regions:
            if r in self.recovering:
                self.waiting[r].append((regions, issue))
                return False
        need_flush = False
        for r in regions:
            self.pending[r] += 1
            self.clearable.pop(r, None)
            if r in self.durable and self.log.marks_hold():
                continue
            if r not in self.marking:
                self.log.mark_region(r)
                if not self.durable_marks:
                    self.durable.add(r)
                    continue
                self.marking.add(r)
            need_flush = True
        if need_flush:
            self.after_flush(issue)
            return False
        self._grant(regions)
        return True

    def _grant(self, regions):
        """Durably marked regions go to the fast path (lock held)."""
        if self.fast is not None:
            for r in regions:
                if r in self.durable and r not in self.recovering and r not in self.clearable:
                    self.fast.grant(r)

    def _revoked(self, regions):
        """Regions the fast path gave back (lock held): clearable once no slow write is in
        flight there either (end_write makes them clearable otherwise)."""
        if regions:
            self.seq += 1
        for r in regions:
            if not self.pending.get(r):
                self.clearable[r] = self.seq

    def after_flush(self, fn):
        """Run `fn` once the log is on its device with everything marked so far (lock held)."""
        self.batch.append(fn)
        self.lock.notify_all()

    def end_write(self, regions):
        """A write completed on every leg (lock held)."""
        self.seq += 1
        for r in regions:
            self.pending[r] -= 1
            if self.pending[r] == 0:
                del self.pending[r]
                if self.fast is not None and self.fast.is_granted(r):
                    continue  # fast writes may still come: the sweep gives it back
                self.clearable[r] = self.seq
                if r in self.recovering:
                    self.lock.notify_all()

    # recovery

    def begin_recovery(self, r):
        """Stop new writes to region r and wait for those in flight (not with the lock held)."""
        with self.lock:
            self.recovering.add(r)
            if self.fast is not None:
                self.fast.set_in_sync(r, False)  # reads take the slow path while it is copied
        if self.fast is not None and self.fast.revoke(r):  # waits for its fast writes
            with self.lock:
                self._revoked([r])
        with self.lock:
            while self.pending.get(r):
                self.lock.wait()

    def end_recovery(self, r):
        with self.lock:
            self.recovering.discard(r)
            if self.fast is not None:
                self.fast.set_in_sync(r, self.mirror.region_in_sync(r))
            waiting = self.waiting.pop(r, [])
            go = [issue for regions, issue in waiting if self.start_write(regions, issue)]
        for issue in go:
            issue()

    # the log writer

    def _run(self):
        last_round = last_sweep = time.monotonic()
        while True:
            with self.lock:
                if not self.batch and not self._stop and self._flushed is None:
                    self.lock.wait(CLEAR_DELAY)
                if self._stop and not self.batch:
                    break
                batch, self.batch = self.batch, []
                marked, self.marking = self.marking, set()
                flushed, self._flushed = self._flushed, None
                if flushed is not None:
                    self._apply_clears(flushed)
                now = time.monotonic()
                if self.fast is not None and now - last_sweep >= CLEAR_DELAY:
                    last_sweep = now
                    self._revoked(self.fast.sweep())
                start_round = self._round is None and bool(self.clearable) and now - last_round >= CLEAR_DELAY
                if start_round:
                    self._round = self.seq
            if start_round:
                last_round = time.monotonic()
                self._flush_legs(self._round)
            error = self._flush()
            with self.lock:
                if not error:
                    self.durable |= marked
                    self._grant(marked)
                else:
                    self.marking |= marked  # not durable: the next flush tries again
            for fn in batch:
                try:
                    fn(error)
                except Exception:
                    log.exception("mirror: a write after the log flush failed")
        self._flush()

    def _flush_legs(self, seq):
        """Start a FLUSH on every live leg; when all are done, the regions whose writes had
        completed by `seq` may be cleared. Asynchronous: marks do not wait behind it. A log
        in memory needs no flush of the legs: its clears promise nothing after a crash."""
        if not self.durable_marks:
            self._legs_flushed(seq, True)
            return
        self.mirror.flush_legs_async(lambda ok: self._legs_flushed(seq, ok))

    def _legs_flushed(self, seq, ok):
        with self.lock:
            self._round = None
            if ok:
                self._flushed = seq
            self.lock.notify_all()

    def _apply_clears(self, seq):
        """Clear the in-sync regions whose last write completed by `seq` (lock held): the legs
        were flushed after that."""
        for r in [r for r, s in self.clearable.items() if s <= seq and r not in self.recovering]:
            del self.clearable[r]
            if self.mirror.region_in_sync(r):
                self.log.clear_region(r)
                self.durable.discard(r)

    def note_synced(self, r):
        """The resync made region r equal on every leg (lock held): clear it, lazily."""
        self.seq += 1
        self.clearable[r] = self.seq

    def _flush(self):
        try:
            with self.lock:
                changed = bool(getattr(self.log, "touched", None)) or getattr(self.log, "header_changed", False)
            self.log.flush()
            self.log_writes += changed
            return 0
        except OSError as e:
            log.error("mirror: %s", e.strerror or e)
            return bio.error(e.errno or errno.EIO)

    def flush_now(self):
        """Clear what may be cleared and write the log (postsuspend, dtr): with the log writer
        stopped and no write in flight."""
        with self.lock:
            if self.fast is not None:
                self._revoked(self.fast.revoke_all())
            seq = self.seq
        if not self.durable_marks or self.mirror.flush_legs():
            with self.lock:
                self._apply_clears(seq)
        with self.lock:
            self.durable |= self.marking
            self.marking = set()
        self._flush()
