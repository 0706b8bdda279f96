"""`merge FROM TO`: fold the read-only layers FROM..TO down into the layer under FROM, online;
`cancel` stops it. FROM and TO name layers as the table does (their path, or their first word)
or by position (1 is the bottom layer).

While it runs, the stack reads as before: grains are copied into the layer under FROM (the
topmost of FROM..TO that holds a grain wins), but the owner index still sends reads to the
layers above it, which hold the same bytes. The copied grains become durable in the order
layer.sync_bitmap gives (data, then bits), every few MiB and at the end. Only then, with the
device suspended for a moment, does the layer under FROM take TO's UUID and child (it now reads
as TO did, so the layer above TO still chains onto it), FROM..TO leave the live table and the
index is rebuilt. A kill -9 or a cancel before that point leaves a stack that reads the same;
the merge can be started again (it copies again from the start).

Throttle: when clients did I/O since the last chunk, the merge sleeps as long as the chunk
took, so it takes at most half the disk's time from them.
"""

from __future__ import annotations

import logging
import threading
import time

from ..._fast.cowindex import OwnerIndex
from .. import TargetError
from .layer import LayerError, pread_full, pwrite_full

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes copied per step
SYNC_EVERY = 64 << 20  # bitmap synced after this many bytes copied


def start(target, first, last):
    if target.merge is not None and target.merge.running:
        raise TargetError("merge: one is running already; `cancel` stops it")
    if not target.ctx.writable:
        raise TargetError("merge: the device is read-only")
    f, t = _position(target, first), _position(target, last)
    top = len(target.layers) - (1 if target.layers and target.layers[-1].layer.writable else 0)
    if f > t:
        raise TargetError(f"merge: {first} is above {last}; FROM is the lower layer")
    if t > top:
        raise TargetError(f"merge: {last} is the writable layer; push a new layer first, then merge it")
    if f == 1:
        raise TargetError(f"merge: {first} is the bottom layer; there is no layer under it to merge into")
    target.merge = Merge(target, f - 2, t - 1)
    target.merge.thread.start()
    return (f"merging {', '.join(s.layer.name for s in target.merge.sources)} into "
            f"{target.merge.into.layer.name}")


def cancel(target):
    m = target.merge
    if m is None or not m.running:
        raise TargetError("cancel: no merge is running")
    m.stop()
    return f"merge cancelled at {m.percent():.1f}%; the stack reads as before"


def _position(target, word):
    for i, slot in enumerate(target.layers, 1):
        if word in (slot.words[0], " ".join(slot.words)):
            return i
    try:
        n = int(word)
    except ValueError:
        raise TargetError(f"merge: no layer {word!r} in this stack") from None
    if not 1 <= n <= len(target.layers):
        raise TargetError(f"merge: layer position {n} outside 1..{len(target.layers)}")
    return n


class Merge:
    def __init__(self, target, into, last):
        self.target = target
        self.into = target.layers[into]  # the layer under FROM
        self.sources = target.layers[into + 1:last + 1]  # FROM..TO, bottom first
        self.above = target.layers[last + 1] if last + 1 < len(target.layers) else None
        self.total = 0
        self.done = 0
        self.started = time.monotonic()
        self.state = "running"
        self.error = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cow-merge", daemon=True)

    @property
    def running(self):
        return self.state == "running"

    def stop(self):
        self._stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(30)  # a merge that is finishing waits for the device's suspend

    def percent(self):
        return 100.0 * self.done / self.total if self.total else 100.0

    def status(self):
        out = {"merge": self.state, "merge_progress": f"{self.percent():.1f}%"}
        elapsed = time.monotonic() - self.started
        if self.running and self.done:
            out["merge_eta"] = f"{elapsed * (self.total - self.done) / self.done:.0f}s"
        if self.error:
            out["merge_error"] = self.error
        return out

    def _run(self):
        try:
            if self._copy():
                self._finish()
                self.state = "done"
            else:
                self.state = "cancelled"
        except (LayerError, OSError, TargetError) as e:
            self.error = str(e)
            self.state = "failed"
            log.error("cow merge into %s failed: %s", self.into.layer.name, e)
        finally:
            self.into.layer.folding = False  # cancelled or failed: it takes no more bits

    def _copy(self):
        """Copy every grain FROM..TO hold into the layer under them. False if cancelled."""
        into = self.into.layer
        grain = into.grain
        owners = OwnerIndex(into.grains)  # which of the sources holds each grain: the topmost wins
        for n, slot in enumerate(self.sources, 1):
            owners.set_runs(n, slot.layer.allocated_runs())
        runs = [r for r in owners.owner_runs(0, into.grains) if r[0]]
        self.total = sum(min(b * grain, into.size) - a * grain for _, a, b in runs)
        into.begin_fold()
        step = max(1, CHUNK // grain)
        since_sync = 0
        for owner, a, b in runs:
            src = self.sources[owner - 1].layer
            for za, zb, zero in _split_zero(src, a, b):
                for c in range(za, zb, step):
                    if self._stop.is_set():
                        into.sync_bitmap()
                        return False
                    d = min(c + step, zb)
                    t0 = time.monotonic()
                    ios = self.target.ios
                    lo, hi = c * grain, min(d * grain, into.size)
                    if zero:
                        into.mark_zero(c, d)
                    else:
                        data = pread_full(src.data_fd, hi - lo, src.data_offset + lo)
                        pwrite_full(into.data_fd, data, into.data_offset + lo)
                        into.mark_allocated(c, d)
                        since_sync += hi - lo
                    self.done += hi - lo
                    if since_sync >= SYNC_EVERY:
                        into.sync_bitmap()
                        since_sync = 0
                    if self.target.ios != ios:  # clients are busy: leave them at least half
                        self._stop.wait(time.monotonic() - t0)
        into.sync_bitmap()
        return True

    def _finish(self):
        """Everything copied and durable: the layer under FROM becomes TO, FROM..TO go."""
        target = self.target
        device = target.ctx.device
        was_suspended = device.suspended
        device.suspend()
        try:
            last = self.sources[-1].layer
            child = self.above.layer.uuid if self.above else None
            self.into.layer.end_fold(last.uuid, child)
            target.layers = [s for s in target.layers if s not in self.sources]
            target.build_index()
            target.refresh_fast_map()  # the owner numbers changed: before any read is let through
        finally:
            if not was_suspended:
                device.resume()
        for slot in self.sources:
            target.close_slot(slot)
        log.info("cow: merged %s into %s", ", ".join(s.layer.name for s in self.sources), self.into.layer.name)


def _split_zero(layer, a, b):
    """[(start, end, zero)] of grains [a, b) of `layer`: runs it holds as data or as zeros."""
    out, pos = [], a
    for za, zb in layer.zero_runs(a, b):
        if za > pos:
            out.append((pos, za, False))
        out.append((za, zb, True))
        pos = zb
    if pos < b:
        out.append((pos, b, False))
    return out

