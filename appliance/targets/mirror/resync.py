"""The mirror's background work: resync (copy stale regions from a good leg), online verify
(compare the legs region by region, as DRBD's online verify), and legs that come back by
themselves.

One thread starts the copy; the I/O runs in the engine (copy.py: 4 MiB chunks, 8 in flight,
regions one after another without a pause, up to WINDOW of them open; written O_DIRECT to file
and disk legs). A region is copied with its writes held (RegionHash.begin_recovery: new writes
to that region wait, those in flight finish first), read from a leg that is not stale there (the
primary first) and written to every live leg that is stale there, and flushed on them (one flush
for the regions whose copies ended together); then the region is in sync once no leg, live or
dead, is stale there. The copy is paced to `rate` bytes/s, or, with no rate (0), adaptively:
after a slice of the copy (8 MiB) during which clients did I/O, it rests as long as that slice
took, so clients keep at least half the time.
"""

from __future__ import annotations

import logging
import threading
import time

from ... import engine
from ... import io as bio
from .copy import Direct, RegionCopy, Stream
from .sync_io import sync_io

log = logging.getLogger("appliance.mirror")

POLL = 0.2  # how often an idle resync looks at dead legs
MAX_REPORTED = 100  # differing regions a verify lists
WINDOW = 64 << 20  # bytes of regions open at once (being copied or flushed; their writes wait)
SLICE = 8 << 20  # adaptive pace: clients that did I/O while this much was copied get as long alone


class Resync:
    def __init__(self, mirror):
        self.m = mirror
        self.rate = 0  # bytes/s; 0 = adaptive
        self.resynced = 0  # regions copied since the table was loaded
        self.copied = 0  # bytes
        self.active = 0.0  # seconds spent copying or resting for the rate
        self.verify = None  # {"checked", "differing", "running"}
        self._verify_wanted = False
        self._backoff = False  # a copy failed on a leg that stays: rest before the next
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._paused = True
        self._busy = threading.Lock()  # held while a region is worked on
        self._thread = None
        self._chunks = Stream()
        self._since = None  # when the copy running now started

    # control

    def resume(self):
        self._paused = False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mirror-resync", daemon=True)
            self._thread.start()
        self.kick()

    def pause(self):
        """Start no new region; wait for the one being copied."""
        self._paused = True
        with self._busy:
            pass

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def kick(self):
        self._wake.set()

    def start_verify(self):
        if self.verify and self.verify["running"]:
            return f"verify is running: {self.verify['checked']}/{self.m.region_count} regions checked"
        self.verify = {"running": True, "checked": 0, "differing": 0, "regions": []}
        self._verify_wanted = True
        self.kick()
        return f"verify started: {self.m.region_count} regions"

    # reporting

    def progress(self):
        m = self.m
        remaining = m.region_count - m.log.get_sync_count()
        since = self._since
        active = self.active + (time.monotonic() - since if since else 0)
        speed = self.copied / active if active > 0 else 0
        out = {"remaining_regions": remaining, "rate": self.rate or "adaptive",
               "bytes_per_second": int(speed),
               "progress": round(m.log.get_sync_count() / m.region_count, 4) if m.region_count else 1.0}
        if remaining and speed:
            out["eta_seconds"] = round(remaining * m.region_size / speed, 1)
        return out

    def verify_status(self):
        return dict(self.verify) if self.verify else None

    # the thread

    def _run(self):
        while not self._stop.is_set():
            self._reinstate_returned()
            if self._paused:
                self._wait()
                continue
            with self._busy, engine.background():
                if self._paused:
                    continue
                if self._verify_wanted:
                    self._verify_wanted = False
                    self._verify()
                    continue
                self._stream()
            if self._backoff:  # a copy failed on a leg that stays: do not spin on it
                self._backoff = False
                self._stop.wait(1.0)
            self._wait()

    def _wait(self):
        self._wake.wait(POLL)
        self._wake.clear()

    def _reinstate_returned(self):
        for leg in self.m.legs:
            if leg.back_by_itself():
                self.m.reinstate_leg(leg)

    def _legs_for(self, r):
        """(source, [targets]) for region r, or (None, []) if it cannot be copied now."""
        m = self.m
        with m.lock:
            good = [leg for leg in m.legs if not leg.dead and r not in leg.stale]
            stale = [leg for leg in m.legs if not leg.dead and r in leg.stale]
            if not good or not stale:
                return None, []
            good.sort(key=lambda leg: leg.index != m.primary)
            return good[0], stale

    def _span(self, r):
        m = self.m
        start = r * m.region_size
        return start, min(m.region_size, m.length - start)

    def _next_region(self, direct):
        """The next region out of sync that can be copied now, its writes held; None at the end
        of a pass."""
        m = self.m
        while True:
            with m.lock:
                r = m.log.get_resync_work()
            if r is None:
                return None
            if self._legs_for(r)[0] is None:
                continue
            m.regions.begin_recovery(r)
            src, dsts = self._legs_for(r)  # the legs may have changed while writes drained
            if src is None:
                m.regions.end_recovery(r)
                continue
            return RegionCopy(r, *self._span(r), src, dsts, direct)

    def _stream(self):
        """Copy the regions out of sync, one after another without a pause between them
        (copy.py: DEPTH chunks in flight), until a pass finds no more, a copy fails, or the
        resync is paused or stopped. Each region is finished (in sync, its writes let go) as
        soon as its last chunk is done and flushed."""
        m, s = self.m, self._chunks
        direct = Direct()
        cur = None
        open_ = 0  # regions begun and not finished
        most = max(1, WINDOW // m.region_size)
        started = 0  # bytes started in this stream (resync_rate)
        t0 = self._since = time.monotonic()
        slice_t, slice_bytes, slice_ios = t0, 0, m.client_ios
        rest_until = 0.0
        try:
            while True:
                for c in s.take_finished():
                    open_ -= 1
                    self._finish(c)
                halt = self._stop.is_set() or self._paused or self._backoff
                if halt and cur is not None and not cur.started_all:
                    s.abort(cur)
                if cur is None or cur.started_all:
                    if not halt and open_ < most and not s.room:
                        s.wait(POLL)  # a region is taken (its writes held) when a chunk can start
                        continue
                    cur = None if halt or open_ >= most else self._next_region(direct)
                    open_ += cur is not None
                    if cur is None:
                        if not open_:
                            return
                        s.wait(POLL)
                        continue
                now = time.monotonic()
                wait = rest_until - now
                if self.rate:
                    wait = max(wait, started / self.rate - (now - t0))
                if wait > 0:
                    s.wait(wait)
                    continue
                if not s.room:
                    s.wait(POLL)
                    continue
                started += s.start(cur)
                if not self.rate and started - slice_bytes >= SLICE:
                    # adaptive: clients that did I/O during a slice get as long again alone
                    if m.client_ios != slice_ios:
                        rest_until = now + (now - slice_t)
                    slice_t, slice_bytes, slice_ios = time.monotonic(), started, m.client_ios
        finally:
            self.active += time.monotonic() - t0
            self._since = None
            if not open_:  # (else an error: the fds and buffers stay with the I/O in flight)
                direct.close()
                s.release()

    def _finish(self, c):
        m = self.m
        try:
            if c.read_error:
                self._failed(c.src, "resync read", c.read_error)
            for dst, err in c.write_errors.items():
                self._failed(dst, "resync write", err)
            with m.lock:
                self._copied(c)
        finally:
            m.regions.end_recovery(c.region)

    def _copied(self, c):
        """Region c.region is on c.done now (lock held)."""
        m, r = self.m, c.region
        for dst in c.done:
            dst.stale.discard(r)
            if (dst.index, r) in m.to_repair:
                m.to_repair.discard((dst.index, r))
                m.repairs += 1
        if not any(r in leg.stale for leg in m.legs):
            m.set_region_sync(r, True)
            m.regions.note_synced(r)  # the log writer clears it once the legs are flushed
        elif c.read_error or c.write_errors or c.aborted:
            m.set_region_sync(r, False)  # the search comes back to it (after _failed's pause)
        if c.done:
            self.resynced += 1
            self.copied += c.length

    def _failed(self, leg, what, err):
        m = self.m
        log.error("mirror: %s on leg %s failed: %s", what, leg.word, bio.error_name(err))
        if m.handle_errors or bio.error_class(err) == bio.PATH:
            m.fail_leg(leg, f"{what} failed: {bio.error_name(err)}", path=bio.error_class(err) == bio.PATH)
        else:
            self._backoff = True  # do not spin on a leg that keeps failing

    def _verify(self):
        """Compare every in-sync region on the live legs; a region that differs is reported
        and made stale on the legs that differ from the primary, so the resync repairs it."""
        m = self.m
        v = self.verify
        for r in range(m.region_count):
            if self._stop.is_set() or self._paused:
                self._verify_wanted = True  # finish after the resume
                return
            v["checked"] = r
            with m.lock:
                if not m.log.in_sync(r):
                    continue
            m.regions.begin_recovery(r)
            try:
                with m.lock:
                    legs = [leg for leg in m.legs if not leg.dead and r not in leg.stale]
                    legs.sort(key=lambda leg: leg.index != m.primary)
                start, n = self._span(r)
                datas = []
                for leg in legs:
                    buf = bytearray(n)
                    if sync_io(leg.dev, bio.READ, leg.offset + start, n, buf):
                        buf = None
                    datas.append(buf)
                if len(legs) < 2 or datas[0] is None:
                    continue
                bad = [leg for leg, d in zip(legs[1:], datas[1:]) if d != datas[0]]
                if bad:
                    v["differing"] += 1
                    if len(v["regions"]) < MAX_REPORTED:
                        v["regions"].append(r)
                    log.warning("mirror: verify: region %d differs on %s", r, ", ".join(x.word for x in bad))
                    with m.lock:
                        for leg in bad:
                            m._missed(leg, [r])
            finally:
                m.regions.end_recovery(r)
        v["checked"] = m.region_count
        v["running"] = False
        self.kick()
