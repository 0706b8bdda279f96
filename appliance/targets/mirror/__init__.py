"""mirror: dm-raid1. The segment's data on two or more legs (files, disks, @NAME devices, NBD
exports), with a dirty-region log so a crash or a lost leg costs a resync of the regions that
may differ, not of the whole device.

Writes go to every live leg in parallel, after their regions are marked in the log (regions.py),
and complete when every leg answered. A leg that fails a write is dead (with handle_errors; the
client's write succeeds if one leg took it) and the regions it missed are stale on it. Reads go
to one leg that is not stale there, the one with the fewest I/Os in flight; a read error is
retried on another leg (a fresh clone through the core), and the leg that failed has that
region rewritten from a good leg (read repair): at once after an error of the `target` class
(the storage answered), when it is back after a `path` error (the leg is failed then). The
resync (resync.py) copies stale regions from a good leg in the background. The table, log types
and messages are dm's; see README "Mirrors".

When every leg is a file or disk, writes to regions whose marks are durable do not come here:
the NBD loop fans them out to the legs' fds itself (fast_map, _fast/regionmap.pyx); the first
error of such a write brings it here whole, to be written again and judged (handle_errors).
Reads of regions in sync, with every leg alive, do not come here either: the NBD loop reads one
leg, balanced as _choose does; a read error brings the read here whole (retry, read repair).
"""

from __future__ import annotations

import errno
import logging
import threading

from ... import io as bio
from ..._fast.regionmap import RegionMap
from .. import Target, TargetError
from . import table
from .control import Control
from .legs import Leg
from .logs import log_class
from .logs.disk import log_bytes
from .regions import RegionHash
from .resync import Resync

log = logging.getLogger("appliance.mirror")

_READS = (bio.READ, bio.CACHE)


class _Write:
    __slots__ = ("clone", "regions", "remaining", "ok", "error", "failed")

    def __init__(self, clone, regions, n):
        self.clone, self.regions, self.remaining = clone, regions, n
        self.ok, self.error, self.failed = 0, 0, False


class Mirror(Control, Target):
    name = "mirror"

    @classmethod
    def parse(cls, args):
        return table.parse(args)

    @classmethod
    def validate(cls, segment, check):
        p = cls.parse(list(segment.args))
        for leg in p.legs:
            check(leg.word, leg.offset + segment.size)
        if p.log_dev:
            check(p.log_dev, log_bytes(table.region_count(segment.size, p.region_size)))
        return p

    def ctr(self, args):
        p = self.parse(args)
        self.region_size = p.region_size
        self.region_count = table.region_count(self.length, p.region_size)
        self.handle_errors = "handle_errors" in p.features
        self.keep_log = "keep_log" in p.features
        self.features = p.features
        self.lock = threading.RLock()
        self.legs = []
        for i, d in enumerate(p.legs):
            dev = self.get_device(d.word)
            self.check_fits(dev, d.offset, d.word)
            self.legs.append(Leg(i, d.word, dev, d.offset))
        log_dev = self.get_device(p.log_dev) if p.log_dev else None
        self.log = log_class(p.log_type)()
        self.log.attach(self, p)
        self.log.ctr(p.region_size, self.region_count, p.sync, log_dev, self.lock, p.log_dev)
        known = {word for word, _ in self.log.recorded or ()}
        if known and not known & {leg.word for leg in self.legs}:
            raise TargetError(f"the log device {p.log_dev} is the log of a mirror of other legs "
                              f"({', '.join(sorted(known))})")
        if known and not [leg for leg in self.legs if self._known(leg)]:
            raise TargetError(f"the log device {p.log_dev} is the log of other files or disks than "
                              f"the legs now at {', '.join(sorted(known))} (copies, or other disks under "
                              "those names); zero the log device to start this mirror over")
        self.log.set_legs([(leg.word, False) for leg in self.legs])  # refused now if they do not fit
        self.primary = 0
        self.repairs = 0
        self.to_repair = set()  # (leg, region) a read error found bad: a repair once resynced
        self.client_ios = 0
        self.started = False
        self.regions = RegionHash(self, self.log, durable_marks=self.log.durable_marks)
        self.regions.fast = self.fastmap = self._region_map()
        self.resync = Resync(self)

    def _region_map(self):
        """The fast path's region map, if every leg is an fd the NBD loop can write and the
        log's marks stand until cleared."""
        fds = [getattr(leg.dev, "fd", None) for leg in self.legs]
        if None in fds or len(self.legs) > 8 or self.log.marks_lapse:
            return None
        self.fast_align = max(getattr(leg.dev, "align", 1) for leg in self.legs)
        if any(leg.offset % self.fast_align for leg in self.legs):
            return None
        return RegionMap(self.region_size, self.region_count,
                         [(fd, leg.offset, not getattr(leg.dev, "direct", False)) for fd, leg in zip(fds, self.legs)])

    def fast_map(self):
        return self.fastmap.fast_ops(self.fast_align) if self.fastmap is not None else None

    def dtr(self):
        if getattr(self, "started", False):
            self.resync.stop()
            self.regions.stop()
            self.regions.flush_now()
        super().dtr()

    # suspend and resume

    def presuspend(self, noflush=False):
        self.resync.pause()  # a region under recovery holds client writes: finish it first

    def postsuspend(self):
        self.regions.stop()
        self.regions.flush_now()  # dm flushes the log on postsuspend

    def resume(self):
        with self.lock:
            self.log.resume()
            if not self.started:
                self.started = True
                self._first_resume()
        self.regions.start()
        self.resync.resume()

    def _known(self, leg):
        """The log records this leg: its word, and the same file or disk behind it (a log or a
        leg that keeps no identity compares by word)."""
        recorded = dict(self.log.recorded or ())
        was = self.log.recorded_ids.get(leg.word)
        return leg.word in recorded and (not was or not leg.identity or was == leg.identity)

    def _first_resume(self):
        """What each leg holds, from the log (lock held). Where the legs may differ (the regions
        out of sync) only the primary is trusted; a leg the log records as dead missed writes
        there; a leg the log does not know at all (another mirror's, a new disk) may differ
        anywhere, so it is fully resynced. The status says which and why."""
        log_, everything = self.log, set(range(self.region_count))
        recorded = dict(log_.recorded or ())
        words = [w for w, _ in log_.recorded or ()]
        want = words[log_.primary] if log_.primary < len(words) else None
        trusted = [leg for leg in self.legs if not recorded or (self._known(leg) and not recorded[leg.word])]
        by_word = {leg.word: leg for leg in self.legs}
        if want in by_word and by_word[want] in trusted:
            self.primary = by_word[want].index
        elif recorded:
            self.primary = (trusted or [leg for leg in self.legs if self._known(leg)])[0].index
        else:
            self.primary = log_.primary if log_.primary < len(self.legs) else 0
        for leg in self.legs:
            if recorded and not self._known(leg):
                leg.stale = set(everything)
                leg.note = ("not a leg of this mirror's log: fully resynced" if leg.word not in recorded else
                            "another file or disk than the log recorded under this name: fully resynced")
                for r in everything:
                    log_.set_region_sync(r, False)
            elif recorded.get(leg.word):
                leg.stale = set(log_.out_of_sync)
                leg.note = "dead when the log was last written: resynced where the log says the legs differ"
            elif leg.index != self.primary:
                leg.stale = set(log_.out_of_sync)
            if leg.note:
                log.warning("mirror: leg %s: %s", leg.word, leg.note)
        log_.set_legs([(leg.word, False) for leg in self.legs])
        log_.set_identities({leg.word: leg.identity for leg in self.legs})
        self._set_primary_index(self.primary)
        if self.fastmap is not None:  # the fast path reads where the log says the legs are equal
            for r in range(self.region_count):
                self.fastmap.set_in_sync(r, log_.in_sync(r))

    # the request path

    def region_range(self, offset, length):
        return range(offset // self.region_size, (offset + max(length, 1) - 1) // self.region_size + 1)

    def region_in_sync(self, r):
        return self.log.in_sync(r)

    def set_region_sync(self, r, in_sync):
        """Region r is equal on every leg, or no longer (lock held). The fast path stops reading
        it before the log says it is out of sync, and reads it again only once the log says it
        is in sync and no resync or verify holds it (RegionHash.end_recovery)."""
        if self.fastmap is not None and not in_sync:
            self.fastmap.set_in_sync(r, False)
        self.log.set_region_sync(r, in_sync)
        if self.fastmap is not None and in_sync and r not in self.regions.recovering:
            self.fastmap.set_in_sync(r, True)

    def _set_primary_index(self, index):
        """The leg reads prefer and the resync copies from (lock held)."""
        self.primary = index
        self.log.set_primary(index)
        if self.fastmap is not None:
            self.fastmap.primary = index

    def prep_map(self, clone):
        if clone.op not in _READS:
            return None  # map() writes every leg itself
        p = clone.private or {"tried": set(), "bad": [], "error": 0, "leg": None}
        clone.private = p
        p["leg"] = self._choose(self.region_range(clone.offset, clone.length), p["tried"])
        return p["leg"].dev if p["leg"] else None

    def _choose(self, regions, tried):
        """The leg to read from: live, not stale in any of the regions, not tried yet; the
        fewest I/Os in flight, the primary first among equals."""
        best = None
        with self.lock:
            for leg in self.legs:
                if leg.dead or leg.index in tried or (leg.stale and any(r in leg.stale for r in regions)):
                    continue
                key = (leg.inflight, leg.index != self.primary)
                if best is None or key < best[0]:
                    best = (key, leg)
            if best is None:
                return None
            best[1].inflight += 1
            return best[1]

    def map(self, clone):
        self.client_ios += 1
        if clone.op in _READS:
            leg = clone.private["leg"]
            if leg is None:
                clone.error = clone.private["error"] or bio.path_error(errno.ENXIO)
                return bio.KILL
            clone.offset += leg.offset
            return bio.REMAPPED
        if clone.op == bio.WRITE_ZEROES and clone.flags & bio.FAST_ZERO:
            clone.error = bio.error(errno.ENOTSUP)  # fast on every leg cannot be promised
            return bio.KILL
        if clone.op == bio.FLUSH:
            self._flush(clone)
        else:
            self._write(clone)
        return bio.SUBMITTED

    def end_io(self, clone, error):
        if clone.op not in _READS:
            return bio.DONE
        p = clone.private
        leg = p["leg"]
        with self.lock:
            leg.inflight -= 1
        regions = self.region_range(clone.offset - leg.offset, clone.length)
        if not error:
            if p["bad"]:
                self._repair(p["bad"], regions)
            return bio.DONE
        p["tried"].add(leg.index)
        p["error"] = p["error"] or error
        if bio.error_class(error) == bio.PATH and self.handle_errors:
            # the leg is gone (or its transport says so): it is failed, and reinstated when its
            # device is back
            self.fail_leg(leg, f"read failed: {bio.error_name(error)}", path=True)
        if leg not in p["bad"]:
            # either way the region is rewritten on it from the leg that answers: at once for an
            # error the storage answered (read repair), when it is back for a failed leg (a
            # remote server's EIO may come classed as a path error; its data is suspect too)
            p["bad"].append(leg)
        with self.lock:
            others = any(not x.dead and x.index not in p["tried"] for x in self.legs)
        if not others:
            return bio.DONE
        self.ctx.device.remap(clone)
        return bio.INCOMPLETE

    def _repair(self, legs, regions):
        """Legs that failed a read there take the region again from a good leg (the resync
        copies it, to a dead leg once it is back; the region's writes wait meanwhile, so the
        copy cannot undo a newer write)."""
        with self.lock:
            for leg in legs:
                for r in regions:
                    leg.stale.add(r)
                    self.set_region_sync(r, False)
                    self.to_repair.add((leg.index, r))
        self.resync.kick()

    def _write(self, clone):
        regions = self.region_range(clone.offset, clone.length)

        def issue(error=0):
            if error:
                with self.lock:
                    self.regions.end_write(regions)
                clone.complete(error)  # the log could not record it: the legs never saw it
                return
            self._issue(clone, regions)

        with self.lock:
            go = self.regions.start_write(regions, issue)
        if go:
            issue()

    def _issue(self, clone, regions):
        with self.lock:
            live = [leg for leg in self.legs if not leg.dead]
            for leg in self.legs:
                if leg.dead:
                    self._missed(leg, regions)
                else:
                    leg.inflight += 1
            if not live:
                self.regions.end_write(regions)
        if not live:
            clone.complete(bio.path_error(errno.ENXIO))
            return
        w = _Write(clone, regions, len(live))
        for leg in live:
            io = bio.IO(clone.op, clone.offset + leg.offset, clone.length, clone.buf, clone.flags,
                        lambda io, leg=leg: self._leg_done(w, leg, io))
            leg.dev.submit(io)

    def _missed(self, leg, regions):
        """`leg` did not take a write to `regions` (lock held): stale there until resynced."""
        for r in regions:
            leg.stale.add(r)
            self.set_region_sync(r, False)

    def _leg_done(self, w, leg, io):
        error = io.error
        with self.lock:  # the leg is failed before the last completion can see w.failed
            leg.inflight -= 1
            if error:
                self._missed(leg, w.regions)
                w.error = w.error or error
                if self.handle_errors and error != errno.ENOTSUP:
                    w.failed = self.fail_leg(leg, f"{bio.OP_NAMES[io.op]} failed: {bio.error_name(error)}",
                                             path=bio.error_class(error) == bio.PATH) or w.failed
            else:
                w.ok += 1
            w.remaining -= 1
            last = w.remaining == 0
        if not last:
            return
        result = w.error
        if w.ok and self.handle_errors and w.error != errno.ENOTSUP:
            result = 0  # one leg took it: the others are dead and stale there
        if w.clone.op == bio.FLUSH:
            self._complete(w, result)
            return
        with self.lock:
            self.regions.end_write(w.regions)
        self._complete(w, result)

    def _complete(self, w, result):
        if w.failed:
            # a leg died under this write: the log must say so before the write is acknowledged
            with self.lock:
                self.regions.after_flush(lambda e: w.clone.complete(result or e))
        else:
            w.clone.complete(result)

    def _flush(self, clone):
        with self.lock:
            live = [leg for leg in self.legs if not leg.dead]
            for leg in live:
                leg.inflight += 1
        if not live:
            clone.complete(bio.path_error(errno.ENXIO))
            return
        w = _Write(clone, (), len(live))
        for leg in live:
            leg.dev.submit(bio.IO(bio.FLUSH, 0, 0, None, 0, lambda io, leg=leg: self._leg_done(w, leg, io)))

    def flush_legs(self):
        """FLUSH every live leg and wait; True if all succeeded."""
        done = threading.Event()
        result = []

        def end(ok):
            result.append(ok)
            done.set()

        self.flush_legs_async(end)
        done.wait()
        return result[0]

    def flush_legs_async(self, then):
        """FLUSH every live leg; `then(ok)` once all answered (ok: none failed)."""
        with self.lock:
            live = [leg for leg in self.legs if not leg.dead]
        if not live:
            then(False)
            return
        state = {"left": len(live), "ok": True}
        lock = threading.Lock()

        def one(io):
            with lock:
                state["left"] -= 1
                state["ok"] = state["ok"] and not io.error
                last = state["left"] == 0
            if last:
                then(state["ok"])

        for leg in live:
            leg.dev.submit(bio.IO(bio.FLUSH, 0, 0, None, 0, one))

    # legs

    def fail_leg(self, leg, why, path=False):
        """Mark a leg dead; True if it was alive: the writes it missed complete only once the
        log records it (regions.after_flush), so a restart never trusts it there."""
        with self.lock:
            if leg.dead:
                return False
            leg.fail(why, path)
            if not self.keep_log:
                # dm without keep_log: no record is kept of what the leg misses from now on, so
                # when it comes back it is copied whole (the log says so too, for a restart)
                leg.stale = set(range(self.region_count))
                for r in range(self.region_count):
                    self.set_region_sync(r, False)
            if self.fastmap is not None:
                self.fastmap.enabled = False  # the slow path marks what a dead leg misses
            self.log.set_leg_dead(leg.index, True)
            log.error("mirror: leg %s is dead: %s", leg.word, why)
            live = [x for x in self.legs if not x.dead]
            if leg.index == self.primary and live:
                new = min(live, key=lambda x: (len(x.stale), x.index))
                self.primary = new.index
                self._set_primary_index(new.index)
                log.warning("mirror: leg %s is the primary now", new.word)
            self.regions.after_flush(lambda e: None)  # the log records it now
            return True

    def reinstate_leg(self, leg):
        with self.lock:
            if not leg.dead:
                return False
            leg.dead, leg.why = False, None
            if self.fastmap is not None:
                self.fastmap.enabled = not any(x.dead for x in self.legs)
            self.log.set_leg_dead(leg.index, False)
            self.regions.after_flush(lambda e: None)
            self.log.resume()  # the resync looks at every region again
            log.warning("mirror: leg %s is back; %d regions to resync", leg.word, len(leg.stale))
        self.resync.kick()
        return True

    def leg(self, word):
        for leg in self.legs:
            if word in (leg.word, str(leg.index)):
                return leg
        raise TargetError(f"no leg {word!r} in this mirror; legs: {', '.join(x.word for x in self.legs)}")
