"""The cow target's request path: reads split by owner, writes with copy-up, zeroes, FLUSH.

Reads: the owner index gives runs of grains owned by one layer (or by none: the base); each
run is one I/O on that layer's data (or the base), and runs a layer holds as zeros are
filled in memory. Writes: grains the writable layer holds as data are written in place;
every other grain the write touches is locked (a per-grain lock, the seed's "lock around
sect+doop?", also held in the index so the fast path's first writes keep off it) so that two
writes never race a copy-up; a partial grain is copied up first (read from its owner, merged,
written whole). Most of this runs on the fast path (cowindex.pyx) when it can: reads, in-place
writes and first writes of whole grains; this is the rest, and the path for every request
when the fast path declines. The bits go into the writable layer's bitmap once the
data is written, and into the index; a FLUSH (or a FUA write) syncs the bitmap after the data
(layer.sync_bitmap). A write that finds a grain locked waits for that grain and starts again.
"""

from __future__ import annotations

import errno
import logging
import threading

from ... import engine
from ... import io as bio
from .layer import LayerError

log = logging.getLogger(__name__)


class Join:
    """Completes `done(error)` once every part has finished; the first error wins."""

    __slots__ = ("pending", "error", "done", "lock")

    def __init__(self, done):
        self.pending = 1  # the caller's own reference, dropped by finish()
        self.error = 0
        self.done = done
        self.lock = threading.Lock()

    def add(self):
        with self.lock:
            self.pending += 1

    def part_done(self, error=0):
        with self.lock:
            if error and not self.error:
                self.error = error
            self.pending -= 1
            last = self.pending == 0
        if last:
            self.done(self.error)

    def finish(self):
        self.part_done(0)


class Requests:
    """Mixed into Cow: needs layers (bottom first, the last writable), index, shift, grain, length,
    base, base_start, _lock, _busy, counters."""

    # reads

    def read(self, offset, length, buf, done):
        """Fill buf with [offset, offset+length) of the stack; done(error)."""
        end = offset + length
        s = self.shift
        runs = self.index.runs_with_zero(offset >> s, ((end - 1) >> s) + 1)
        if len(runs) == 1 and not runs[0][1]:  # the usual case: one layer (or the base) holds it all, as data
            dev, at = self._where(runs[0][0], offset)
            dev.submit(bio.IO(bio.READ, at, length, buf, 0, lambda io: done(io.error)))
            return
        join = Join(done)
        view = memoryview(buf)
        for owner, zero, a, b in runs:
            lo, hi = max(a << s, offset), min(b << s, end)
            if zero:
                view[lo - offset:hi - offset] = bytes(hi - lo)
            else:
                dev, at = self._where(owner, lo)
                self._submit(dev, bio.READ, at, view[lo - offset:hi - offset], join)
        join.finish()

    def _where(self, owner, offset):
        """(device, offset on it) of the stack's byte `offset` in layer `owner` (0: the base)."""
        if owner == 0:
            return self.base, self.base_start + offset
        slot = self.layers[owner - 1]
        return slot.data, slot.layer.data_offset + offset

    def _submit(self, dev, op, offset, buf, join, flags=0):
        join.add()
        dev.submit(bio.IO(op, offset, len(buf), buf, flags, lambda io: join.part_done(io.error)))

    # writes

    def write(self, offset, buf, flags, done):
        """Write buf at offset into the writable layer, copying up partial grains; done(error)."""
        length = len(buf)
        s = self.shift
        g0, g1 = offset >> s, ((offset + length - 1) >> s) + 1
        top = self.layers[-1]
        owner_top = len(self.layers)
        with self._lock:
            # grains the writable layer does not hold as data: copied up or written first here.
            # Looked up under the lock that _release takes, so a grain a write just made the
            # top's is seen as such (and then written in place, as the fast path does)
            locked = [g for owner, zero, a, b in self.index.runs_with_zero(g0, g1)
                      if owner != owner_top or zero for g in range(a, b)]
            for g in locked:
                if g in self._busy:  # a copy-up or first write of this grain is in flight
                    self._busy[g].append(lambda: self.write(offset, buf, flags, done))
                    return
            for g in locked:
                self._busy[g] = []
            for a, b in _runs(locked):  # and the fast path's first writes leave them alone
                self.index.hold(a, b)
        view = memoryview(buf)
        end = offset + length

        def finished(error):
            if not error and locked:
                try:
                    for a, b in _runs(locked):
                        top.layer.mark_allocated(a, b, self.index, owner_top)
                except LayerError as e:
                    log.error("%s", e)
                    error = bio.error(errno.EIO)
            self._release(locked)
            if not error and flags & bio.FUA:
                error = self.sync(top)
            done(error)

        join = Join(finished)
        held = set(locked)
        copy = [g for g in sorted({g0, g1 - 1}) if g in held and not self._covers(offset, end, g)]
        lo, hi = offset, end
        if copy and copy[0] == g0:
            lo = min(end, self._grain_end(g0))
        if copy and copy[-1] == g1 - 1:
            hi = max(lo, (g1 - 1) << s)
        for g in copy:
            self._copy_up(g, offset, view, join)
        if lo < hi:
            self._submit(top.data, bio.WRITE, top.layer.data_offset + lo, view[lo - offset:hi - offset], join)
        join.finish()

    def _grain_end(self, g):
        return min((g + 1) << self.shift, self.length)  # the device's last grain may be short

    def _covers(self, lo, hi, g):
        return lo <= g << self.shift and hi >= self._grain_end(g)

    def _copy_up(self, g, offset, view, join):
        """Read grain g from its owner, lay the write's bytes over it, write it whole to the top."""
        join.add()
        glo, ghi = g << self.shift, self._grain_end(g)
        grain = bytearray(ghi - glo)
        top = self.layers[-1]
        wlo, whi = max(glo, offset), min(ghi, offset + len(view))

        def read_done(error):
            if error:
                join.part_done(error)
                return
            grain[wlo - glo:whi - glo] = view[wlo - offset:whi - offset]
            self.copy_ups += 1
            top.data.submit(bio.IO(bio.WRITE, top.layer.data_offset + glo, len(grain), grain, 0,
                                   lambda io: join.part_done(io.error)))

        self.read(glo, ghi - glo, grain, read_done)

    def _release(self, grains):
        waiters = []
        with self._lock:
            for a, b in _runs(grains):
                self.index.release(a, b)
            for g in grains:
                waiters += self._busy.pop(g, ())
        for retry in waiters:
            retry()

    # zeroes, discards

    def zero(self, offset, length, flags, done):
        """WRITE_ZEROES or TRIM: whole grains become "zero" in the writable layer (no data written,
        nothing copied up); the partial grains at the ends are written as zeros."""
        s, mask = self.shift, self.grain - 1
        end = offset + length
        a = (offset + mask) >> s
        b = end >> s if end < self.length else ((end + mask) >> s)  # the device's last grain may be short
        top = self.layers[-1]

        def finished(error):
            if not error and flags & bio.FUA:
                error = self.sync(top)
            done(error)

        join = Join(finished)
        if a < b:
            try:
                top.layer.mark_zero(a, b, self.index, len(self.layers))
            except LayerError as e:
                log.error("%s", e)
                join.part_done(bio.error(errno.EIO))
                return
            head, tail = (offset, min(a << s, end)), (max(b << s, offset), end)
        else:
            head, tail = (offset, end), (end, end)
        for lo, hi in (head, tail):
            if lo < hi:
                join.add()
                self.write(lo, bytes(hi - lo), flags & ~bio.FUA, join.part_done)
        join.finish()

    # flush

    def flush(self, done):
        top = self.layers[-1]
        engine.get().fsync(top.data.fd, lambda r: done(bio.error(-r) if r < 0 else self.sync(top)))

    def sync(self, slot):
        """The writable layer's bitmap to disk, after its data; 0 or a classed error."""
        try:
            slot.layer.sync_bitmap()
            return 0
        except (LayerError, OSError) as e:
            log.error("%s: bitmap sync failed: %s", slot.layer.name, e)
            return bio.error(errno.EIO)


def _runs(grains):
    """[(start, end)] of a sorted list of grains."""
    out = []
    for g in grains:
        if out and out[-1][1] == g:
            out[-1][1] = g + 1
        else:
            out.append([g, g + 1])
    return [tuple(r) for r in out]
