"""`merge FROM TO [base] [rate=SIZE]`: fold the read-only layers FROM..TO down into the layer
under FROM, or, when FROM is the bottom layer and the user names the base (the word `base`
or the base's path), into the base itself; online. `cancel` stops it. FROM and TO name
layers as the table does (their path, or their first word) or by position (1 is the bottom
layer). `rate=SIZE` keeps the copy to SIZE bytes a second (K, M, G suffixes).

While it runs, the stack reads as before: grains are copied into the layer (or the base) under
FROM, the topmost of FROM..TO that holds a grain winning, but the owner index still sends
reads to FROM..TO, which hold the same bytes. Only grains FROM..TO hold are written, and under
those the target's old bytes were hidden, so what clients read never changes. The copied
grains become durable (a layer: layer.sync_bitmap, data then bits; the base: a FLUSH) every
SYNC_EVERY bytes or SYNC_SECONDS, and then the cursor in FROM's merge record says so
(journal.py): a merge stopped by kill -9, `appliance stop` or `cancel` starts again from
there. A record left running is resumed when the stack starts; a cancelled one by the next
`merge` of the same layers.

All copied and durable, the device is suspended for a moment and the layers above learn who
is under them: into a layer, that layer takes TO's UUID and child (it now reads as TO did, so
the layer above TO still chains onto it); into the base, the layer above TO takes the base as
its parent. FROM..TO leave the live table and the index is rebuilt. A crash before that point
leaves the old stack, reading the same, and the record; after it, the new chain on disk, which
the live table (`appliance table NAME`) names.

The copy goes through the I/O engine, DEPTH pieces of CHUNK bytes in flight (each a read, then
a write, O_DIRECT where the devices take it), a finished piece replaced at once whatever the
order they finish in; the durable steps run beside the copy, so the disk never waits for the
merge's own FLUSH. Throttle: every ROUND seconds the merge looks at the device's request counters; if
clients did I/O, it lets its own I/O finish and then waits twice as long as the round took, so
it takes at most a third of the disk's time from them (they keep at least half their
throughput: in its third they still get some, behind its I/O), and keeps only BUSY_DEPTH
pieces in flight, so their requests wait behind less of it.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import threading
import time

from ... import directfd, engine
from ... import io as bio
from ..._fast.cowindex import OwnerIndex
from .. import TargetError, parse_size
from . import journal
from .layer import LayerError

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # bytes per I/O
DEPTH = 16  # pieces in flight
BUSY_DEPTH = 2  # ... while clients do I/O
ROUND = 0.05  # seconds between looks at the clients (and at the rate)
SYNC_EVERY = 256 << 20  # copied bytes made durable (and the cursor recorded) after this many
SYNC_SECONDS = 1.0  # ... or after this long


def start(target, words):
    """The `merge` message: words are FROM TO [base] [rate=SIZE]."""
    if target.merge is not None and target.merge.running:
        raise TargetError("merge: one is running already; `cancel` stops it")
    if not target.ctx.writable:
        raise TargetError("merge: the device is read-only")
    rate, rest = 0, []
    for w in words:
        if w.startswith("rate="):
            rate = parse_size(w[5:], "merge: rate")
        else:
            rest.append(w)
    if len(rest) not in (2, 3):
        raise TargetError("merge takes FROM TO [base] [rate=SIZE]")
    first, last = rest[0], rest[1]
    into_base = len(rest) == 3
    if into_base and rest[2] not in ("base", target.segment.args[0]):
        raise TargetError(f"merge: {rest[2]!r} is not the base; the third word is `base` or "
                          f"{target.segment.args[0]}")
    f, t = _position(target, first), _position(target, last)
    top = len(target.layers) - (1 if target.layers and target.layers[-1].layer.writable else 0)
    if f > t:
        raise TargetError(f"merge: {first} is above {last}; FROM is the lower layer")
    if t > top:
        raise TargetError(f"merge: {last} is the writable layer; push a new layer first, then merge it")
    if into_base and f != 1:
        raise TargetError(f"merge: {first} is not the bottom layer; only FROM..TO starting at the bottom "
                          "layer fold into the base")
    if f == 1 and not into_base:
        raise TargetError(f"merge: {first} is the bottom layer; there is no layer under it to merge into "
                          f"(`merge {first} {last} base` folds it into the base)")
    if into_base and not getattr(target.base, "writable", True):
        raise TargetError(f"merge: the base {target.segment.args[0]} is open read-only")
    m = Merge(target, f - 2, t - 1, rate)
    recorded = _recorded(m.sources[0])
    if recorded is not None and recorded.same_merge(m.record):
        m.resume_at(recorded.cursor)
    target.merge = m
    m.thread.start()
    into = "the base" if m.into is None else m.into.layer.name
    resumed = f", resumed at {m.percent():.1f}%" if m.resumed else ""
    return f"merging {', '.join(s.layer.name for s in m.sources)} into {into}{resumed}"


def resume_recorded(target):
    """A stack starting: resume the merge its layers' record says was running (killed, stopped)."""
    if not target.ctx.writable:
        return
    for i, slot in enumerate(target.layers):
        rec = _recorded(slot)
        if rec is None or not rec.running:
            continue
        ends = [j for j in range(i, len(target.layers)) if target.layers[j].layer.uuid == rec.last]
        under = target.base_id if i == 0 else target.layers[i - 1].layer.uuid
        if (not ends or slot.layer.uuid != rec.first or rec.into != under or rec.into_base != (i == 0)
                or target.layers[ends[0]].layer.writable):
            log.warning("cow: %s records a merge of other layers than this stack has; not resumed", slot.layer.name)
            continue
        m = Merge(target, i - 1, ends[0], rec.rate)
        m.resume_at(rec.cursor)
        target.merge = m
        m.thread.start()
        log.info("cow: resuming the merge of %s at %.1f%%", slot.layer.name, m.percent())
        return


def _recorded(slot):
    try:
        return journal.read(slot.layer.bitmap_fd, slot.layer.name)
    except (journal.RecordError, OSError) as e:
        log.warning("cow: %s", e)
        return None


def cancel(target):
    m = target.merge
    if m is None or not m.running:
        raise TargetError("cancel: no merge is running")
    m.stop(cancel=True)
    return f"merge cancelled at {m.percent():.1f}%; the stack reads as before; the same merge again resumes there"


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
    """One merge: `into` is the index of the layer under FROM (-1: the base), `last` TO's."""

    def __init__(self, target, into, last, rate=0):
        self.target = target
        self.into = target.layers[into] if into >= 0 else None  # None: the base
        self.sources = target.layers[into + 1:last + 1]  # FROM..TO, bottom first
        self.above = target.layers[last + 1] if last + 1 < len(target.layers) else None
        self.rate = rate
        self.grain = target.grain
        self.size = target.length
        into_id = target.base_id if self.into is None else self.into.layer.uuid
        self.record = journal.Record(into_id, self.sources[0].layer.uuid, self.sources[-1].layer.uuid, 0, rate,
                                     journal.INTO_BASE if self.into is None else 0)
        self.runs = self._runs()
        self.total = sum(self._bytes(a, b) for _, a, b in self.runs)
        self.done = 0
        self.resumed = None  # the share already done when this merge started from a record
        self._done_at_start = 0  # for the ETA and the rate: what this run copied
        self.started = time.monotonic()
        self.state = "running"
        self.error = None
        self._cancel = False
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cow-merge", daemon=True)

    @property
    def running(self):
        return self.state == "running"

    def _runs(self):
        """[(source number from 1, start, end)] of the grains FROM..TO hold; the topmost wins."""
        owners = OwnerIndex(-(-self.size // self.grain))
        for n, slot in enumerate(self.sources, 1):
            owners.set_runs(n, slot.layer.allocated_runs())
        return [r for r in owners.owner_runs(0, -(-self.size // self.grain)) if r[0]]

    def _bytes(self, a, b):
        return min(b * self.grain, self.size) - a * self.grain

    def resume_at(self, cursor):
        """Skip what a record says is done: the grains below `cursor`."""
        self.record = journal.Record(self.record.into, self.record.first, self.record.last, cursor,
                                     self.rate, self.record.flags)
        self.done = sum(self._bytes(a, min(b, cursor)) for _, a, b in self.runs if a < cursor)
        self.resumed = self.percent()

    def stop(self, cancel=False):
        self._cancel = cancel
        self._stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(60)

    def percent(self):
        return 100.0 * self.done / self.total if self.total else 100.0

    def status(self):
        out = {"merge": self.state, "merge_progress": f"{self.percent():.1f}%",
               "merge_into": "base" if self.into is None else self.into.layer.name}
        if self.resumed is not None:
            out["merge_resumed_from"] = f"{self.resumed:.1f}%"
        copied = self.done - self._done_at_start
        if self.running and copied > 0:
            elapsed = time.monotonic() - self.started
            out["merge_eta"] = f"{elapsed * (self.total - self.done) / copied:.0f}s"
        if self.rate:
            out["merge_rate"] = self.rate
        if self.error:
            out["merge_error"] = self.error
        return out

    def _run(self):
        with engine.background():
            self._merge()

    def _merge(self):
        self.started, self._done_at_start = time.monotonic(), self.done
        try:
            self._write_record(running=True)
            if self._copy() and self._finish():
                self.state = "done"
            else:
                self.state = "cancelled"
        except (LayerError, OSError, TargetError) as e:
            self.error = str(e)
            self.state = "failed"
            log.error("cow merge of %s failed: %s", self.sources[0].layer.name, e)
        except Exception as e:  # a bug: said in status, not a merge that reads "running" for ever
            self.error = repr(e)
            self.state = "failed"
            log.exception("cow merge of %s failed", self.sources[0].layer.name)
        finally:
            if self.into is not None:
                self.into.layer.folding = False  # cancelled or failed: it takes no more bits

    def _write_record(self, running, cursor=None):
        r = self.record
        flags = (r.flags | journal.RUNNING) if running else (r.flags & ~journal.RUNNING)
        self.record = journal.Record(r.into, r.first, r.last, r.cursor if cursor is None else cursor, r.rate, flags)
        journal.write(self.sources[0].layer.bitmap_fd, self.record)

    # the copy

    def _pieces(self):
        """(source slot, first grain, end grain, zero) of what is left to copy, at most CHUNK each."""
        chunk = CHUNK
        if self.rate:  # a few batches a second: the rate holds over short spans, the cursor moves often
            chunk = min(CHUNK, max(self.grain, self.rate // (4 * DEPTH)))
        step = max(1, chunk // self.grain)
        cursor = self.record.cursor
        for owner, a, b in self.runs:
            if b <= cursor:
                continue
            src = self.sources[owner - 1]
            for za, zb, zero in _split_zero(src.layer, max(a, cursor), b):
                for c in range(za, zb, step):
                    yield src, c, min(c + step, zb), zero

    def _copy(self):
        """Copy every grain FROM..TO hold that is not done yet. False if stopped."""
        if self.into is not None:
            self.into.layer.begin_fold()
        # page aligned, so O_DIRECT takes them; freed with the last view the engine's I/Os hold
        free = [mmap.mmap(-1, CHUNK) for _ in range(DEPTH)]
        target = self.target.base if self.into is None else self.into.data
        at = self.target.base_start if self.into is None else self.into.layer.data_offset
        self._writer = _direct(target, self._aligned(at))
        self._readers = {id(s): _direct(s.data, self._aligned(s.layer.data_offset)) for s in self.sources}
        try:
            return self._copy_window(free)
        finally:
            for mine, dev in [(self._writer, target)] + [(self._readers[id(s)], s.data) for s in self.sources]:
                if mine is not dev:
                    os.close(mine.fd)

    def _aligned(self, offset):
        """Every piece at `offset` + a grain boundary, of whole 4 KiB: what O_DIRECT takes on
        any disk (512 may not do on a 4K-sector one)."""
        return not (offset % 4096 or self.grain % 4096 or self.size % 4096)

    def _copy_window(self, free):
        """DEPTH pieces in flight, each a read then a write through the engine. They complete
        in any order and a finished one is replaced at once (one slow piece does not hold the
        others' slots); its bits are marked as it finishes, but the cursor moves only over
        pieces that all finished, in order. Making the copy durable and recording the cursor
        runs beside the copy (_Syncs), so the pieces keep the disk busy during the FLUSH."""
        pieces = self._pieces()
        cond = threading.Condition()
        ended = collections.deque()  # copies the engine finished, not looked at yet
        flying = {}  # number -> copy, started and not looked at yet
        finished = {}  # number -> end grain: finished, but a piece before it is still flying
        issued = lowest = 0  # numbers: of the next piece; of the first not under the cursor
        more = True
        cursor = self.record.cursor
        syncs = _Syncs(self)
        last_sync, unsynced = time.monotonic(), 0
        round_start, round_ios = time.monotonic(), self._client_ios()
        depth = DEPTH  # BUSY_DEPTH while clients do I/O: they queue behind less of the merge's
        try:
            while True:
                while more and len(flying) < depth and not self._stop.is_set():
                    piece = next(pieces, None)
                    if piece is None:
                        more = False
                        break
                    flying[issued] = self._start(issued, piece, free.pop(), cond, ended)
                    issued += 1
                if not flying:
                    break  # everything copied, or stopped with nothing in flight: `cursor` says which
                with cond:
                    while not ended:
                        cond.wait()
                    batch = list(ended)
                    ended.clear()
                for c in batch:
                    del flying[c.number]
                    free.append(c.buf)
                    if c.error:
                        raise OSError(int(c.error), f"merge: copying grains failed: {os.strerror(int(c.error))}")
                    src, a, b, zero = c.piece
                    if self.into is not None:
                        (self.into.layer.mark_zero if zero else self.into.layer.mark_allocated)(a, b)
                    n = self._bytes(a, b)
                    self.done += n
                    unsynced += n
                    finished[c.number] = b
                while lowest in finished:
                    cursor = finished.pop(lowest)
                    lowest += 1
                syncs.check()
                if (unsynced >= SYNC_EVERY or time.monotonic() - last_sync >= SYNC_SECONDS) and syncs.idle():
                    syncs.start(cursor)
                    last_sync, unsynced = time.monotonic(), 0
                took = time.monotonic() - round_start
                if took >= ROUND or self.rate:  # a rate is held piece by piece
                    busy = self._client_ios() != round_ios
                    depth = BUSY_DEPTH if busy else DEPTH
                    if busy or self.rate:
                        self._drain(flying, cond)  # none of the merge's I/O in flight while it waits
                        self._throttle(took, busy)
                    round_start, round_ios = time.monotonic(), self._client_ios()
        finally:
            self._drain(flying, cond)  # on an error too: a read finishing later would write through a closed fd
            syncs.wait()  # none writes the record after this: the last one below, or _finish's clear
        self._durable(cursor)  # where the pieces taken in order end: the runs' end only if all were copied
        return not self._stop.is_set()

    def _drain(self, flying, cond):
        """Wait for every piece in flight (their buffers are the engine's until then)."""
        with cond:
            while not all(c.finished for c in flying.values()):
                cond.wait()

    def _client_ios(self):
        return self.target.ios + getattr(self.target.ctx.device.gate, "fast_ios", 0)

    def _throttle(self, took, clients_busy):
        # clients keep two thirds of the disk's time: during the merge's third they still get
        # some, but wait behind its I/O, and what they keep must be at least half
        wait = 2 * took if clients_busy else 0.0
        if self.rate:  # the user's rate, over this run
            ahead = (self.done - self._done_at_start) / self.rate - (time.monotonic() - self.started)
            wait = max(wait, ahead)
        if wait > 0:
            self._stop.wait(wait)

    def _start(self, number, piece, buf, cond, ended):
        """One piece: read from its layer, then write to the target (or zero it there); `ended`
        gets it when it finished."""
        c = _Copy(number, piece, buf)

        def finish(error=0):
            with cond:
                c.error, c.finished = error, True
                ended.append(c)
                cond.notify_all()

        src, a, b, zero = piece
        lo, hi = a * self.grain, min(b * self.grain, self.size)
        if zero:
            if self.into is None:
                self.target.base.submit(bio.IO(bio.WRITE_ZEROES, self.target.base_start + lo, hi - lo, None, 0,
                                               lambda io: finish(io.error)))
            else:
                finish()  # the bit says it: nothing to write
            return c
        view = memoryview(buf)[:hi - lo]
        dev = self._writer
        offset = (self.target.base_start if self.into is None else self.into.layer.data_offset) + lo

        def read_done(io):
            if io.error:
                finish(io.error)
            else:
                dev.submit(bio.IO(bio.WRITE, offset, hi - lo, view, 0, lambda w: finish(w.error)))

        self._readers[id(src)].submit(bio.IO(bio.READ, src.layer.data_offset + lo, hi - lo, view, 0, read_done))
        return c

    def _durable(self, cursor):
        """What was copied reaches the disk, then the cursor that says so."""
        if self.into is not None:
            self.into.layer.sync_bitmap()
        else:
            pending = _Pending()
            pending.add()
            self.target.base.submit(bio.IO(bio.FLUSH, 0, 0, None, 0, pending.io_done))
            error = pending.wait()
            if error:
                raise OSError(int(error), f"merge: FLUSH of the base {self.target.segment.args[0]} failed: "
                              f"{os.strerror(int(error))}")
        self._write_record(running=not self._cancel, cursor=cursor)

    # the switch

    def _finish(self):
        """Everything copied and durable: the layers above learn what is under them, FROM..TO go.
        False if stopped while waiting for the device (the next start finishes it)."""
        target = self.target
        device = target.ctx.device
        lock = device.control_lock
        while not lock.acquire(timeout=0.1):  # a reload holding it may be waiting for this merge to stop
            if self._stop.is_set():
                return False
        try:
            was_suspended = device.suspended
            device.suspend()
            try:
                last = self.sources[-1].layer
                if self.into is None:
                    if self.above is not None:
                        self.above.layer.rebase(target.base_id)
                else:
                    self.into.layer.end_fold(last.uuid, self.above.layer.uuid if self.above else None)
                target.layers = [s for s in target.layers if s not in self.sources]
                target.build_index()
                target.refresh_fast_map()  # the owner numbers changed: before any read is let through
            finally:
                if not was_suspended:
                    device.resume()
        finally:
            lock.release()
        try:
            journal.clear(self.sources[0].layer.bitmap_fd)  # FROM left the stack: its record is done with
        except OSError as e:
            log.warning("cow: %s: cannot clear its merge record: %s", self.sources[0].layer.name, e)
        for slot in self.sources:
            target.close_slot(slot)
        into = "the base" if self.into is None else self.into.layer.name
        log.info("cow: merged %s into %s", ", ".join(s.layer.name for s in self.sources), into)
        return True


def _direct(dev, aligned):
    """The copy reads and writes around the page cache (directfd), where its pieces are 4 KiB
    aligned; a FLUSH on the device's own fd makes the writes durable (fdatasync is per file)."""
    return directfd.reopen(dev, "cow merge") if aligned else dev


class _Copy:
    __slots__ = ("number", "piece", "buf", "error", "finished")

    def __init__(self, number, piece, buf):
        self.number, self.piece, self.buf, self.error, self.finished = number, piece, buf, 0, False


class _Syncs:
    """The merge's durable steps (Merge._durable: the FLUSH or the bitmap sync, then the
    record), one at a time on a thread of their own, while the copy goes on. A step covers the
    cursor it was given: every piece under it finished before the step began."""

    def __init__(self, merge):
        self.merge = merge
        self.thread = None
        self.error = None

    def idle(self):
        return self.thread is None or not self.thread.is_alive()

    def start(self, cursor):
        def run():
            try:
                self.merge._durable(cursor)
            except BaseException as e:  # raised in the copy's thread by check()
                self.error = e

        self.thread = threading.Thread(target=run, name="cow-merge-sync", daemon=True)
        self.thread.start()

    def check(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.check()


class _Pending:
    """Counts I/Os in flight from the engine's threads; wait() returns the first error."""

    def __init__(self):
        self.count = 0
        self.error = 0
        self.cond = threading.Condition()

    def add(self):
        with self.cond:
            self.count += 1

    def io_done(self, io):
        self.done(io.error)

    def done(self, error=0):
        with self.cond:
            if error and not self.error:
                self.error = error
            self.count -= 1
            if self.count == 0:
                self.cond.notify_all()

    def wait(self):
        with self.cond:
            while self.count:
                self.cond.wait()
            return self.error


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
