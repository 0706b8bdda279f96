"""A mapped device's request path: the gate, the queue, split, map, end_io, join, requeue.

The map contract, as request-based dm splits it. The core splits a request at segment
boundaries into pieces and, for every map attempt, hands the target a fresh clone of its
piece (in segment coordinates), so a retry starts from the original offset: `prep_map`
chooses the device below, `map` translates the clone onto it, `end_io` sees the result
first and may take the clone back (`remap` now, `requeue` until a resume or a kick). A
request completes once, with the first error of any piece; pieces that completed are never
re-run, and a request whose unfinished pieces are all parked holds no suspend. A piece parked
under a table that a reload replaced is split again on the new one (dm's noflush reload
requeues into the new table).
"""

from __future__ import annotations

import errno
import logging
import threading

from . import io as bio
from .request_queue import merged_io, scatter
from .targets import Target

log = logging.getLogger("appliance.device")

_default_end_io = Target.end_io


class _Request:
    """A request on its way through the targets: the pieces it was split into and their join.

    `members` are the requests it answers: one, or several the queue merged. `holds` is how
    many gate entries it holds (one per member; 0 while every unfinished piece is parked)."""

    __slots__ = ("io", "members", "queue", "segment", "pending", "error", "parked", "holds", "lock")

    def __init__(self, io, members, queue=None):
        self.io = io
        self.members = members
        self.queue = queue  # the queue it left, or None if it bypassed the queue
        self.segment = None
        self.pending = 0
        self.error = 0
        self.parked = []  # pieces waiting for a kick or a resume
        self.holds = len(members)
        self.lock = threading.Lock()


class _Piece:
    """One segment's part of a request, kept across map attempts: each attempt maps a fresh clone."""

    __slots__ = ("request", "target", "offset", "length", "buf", "private", "start")

    def __init__(self, request, target, offset, length, buf, start):
        self.request = request
        self.target = target
        self.offset = offset  # in the segment, as the target's map() sees it
        self.length = length
        self.buf = buf
        self.private = None
        self.start = start  # in the device: where it lands in another table


class RequestPath:
    """Mixed into MappedDevice: needs name, gate, table, read_only, suspended, errors and
    _requeue_lock, _requeued, _kick_timer."""

    def submit(self, io):
        """Take a request in device coordinates; it completes through io.endio."""
        if self.gate.enter_or_defer(io):
            self._start(io, True)

    def submit_batch(self, ios):
        """Several requests at once (an unplugged NBD batch): queued together, so they merge."""
        entered = [io for io in ios if self.gate.enter_or_defer(io)]
        queue = None
        for io in entered:
            queue = self._start(io, False) or queue
        if queue is not None:
            queue.run()

    def _start(self, io, run):
        """A request that got through the gate. Returns the queue it waits in, if it does."""
        table = self.table
        if table is None:
            self._leave(1)
            io.complete(bio.path_error(errno.ENXIO))
            return None
        op = io.op
        if op == bio.BLOCK_STATUS:
            self._block_status(io, table)
            return None
        if self.read_only and op in bio.WRITE_OPS:
            self._leave(1)
            io.complete(errno.EPERM)
            return None
        if op != bio.FLUSH:
            end = io.offset + io.length
            if end > table.size:
                self._leave(1)
                io.complete(errno.ENOSPC if io.is_write else errno.EINVAL)
                return None
            i = table.find(io.offset)
            queue = table.queue
            if queue.queues[i] and end <= table.segments[i].offset + table.segments[i].size:
                queue.add(io, i)
                if run:
                    queue.run()
                return queue
            table.queue.count_direct()
        else:
            table.queue.count_direct()
        self._dispatch(_Request(io, [io]), table)
        return None

    def _dispatch_queued(self, members, segment, table):
        """The queue lets a request (or a run of merged ones) go to map."""
        io = members[0] if len(members) == 1 else merged_io(members, None)
        req = _Request(io, members, table.queue)
        req.segment = segment
        self._dispatch(req, table)

    def _dispatch(self, req, table):
        """Split a request at segment boundaries and map each piece."""
        io = req.io
        if io.op == bio.FLUSH:
            pieces = [(i, 0, 0) for i in range(len(table.targets))]
        else:
            end = io.offset + io.length
            pieces = []
            i = table.find(io.offset)
            pos = io.offset
            while pos < end:
                seg = table.segments[i]
                n = min(seg.offset + seg.size, end) - pos
                pieces.append((i, pos, n))
                pos += n
                i += 1
        req.pending = len(pieces)
        split = len(pieces) > 1 and io.buf is not None
        view = memoryview(io.buf) if split else None
        for i, pos, n in pieces:
            seg = table.segments[i]
            buf = view[pos - io.offset : pos - io.offset + n] if split else io.buf
            self._map(_Piece(req, table.targets[i], pos - seg.offset, n, buf, pos))

    def _map(self, piece, private=None):
        """One map attempt: a fresh clone of the piece, so a retry starts from its own offset."""
        req = piece.request
        t = piece.target
        c = bio.IO(req.io.op, piece.offset, piece.length, piece.buf, req.io.flags, self._clone_done)
        c.parent = piece
        c.target = t
        c.private = private
        try:
            c.dev = t.prep_map(c)
            r = t.map(c)
        except Exception:
            log.exception("%s: %s map failed", self.name, t.name)
            r = bio.KILL
            c.error = c.error or errno.EIO
        if r == bio.REMAPPED:
            c.dev.submit(c)
        elif r == bio.KILL:
            c.complete(c.error or errno.EIO)
        elif r == bio.REQUEUE:
            self._park(piece, c.private)

    def _clone_done(self, c):
        t = c.target
        r = bio.DONE
        if type(t).end_io is not _default_end_io:
            try:
                r = t.end_io(c, c.error)
            except Exception:
                log.exception("%s: %s end_io failed", self.name, t.name)
                r = bio.DONE
        if r == bio.INCOMPLETE:
            return  # the target called remap() or requeue() on it
        if r == bio.REQUEUE:
            self._park(c.parent, c.private)
            return
        self._piece_done(c.parent, c.error)

    # for targets: retries

    def remap(self, clone):
        """Map the clone's piece again now, as a fresh clone (a retry, e.g. on another path:
        prep_map chooses again). For end_io, which then returns INCOMPLETE."""
        self._map(clone.parent, clone.private)

    def requeue(self, clone, delay=None):
        """Park the clone's piece until the device is resumed or kicked (after `delay` seconds,
        if given). For end_io, which then returns INCOMPLETE."""
        self._park(clone.parent, clone.private)
        if delay is not None:
            self.kick(delay)

    def kick(self, delay=None):
        """Map every parked piece again (dm's kick of the requeue list); after `delay` seconds
        if given, by one timer per device however many pieces wait."""
        if delay:
            with self._requeue_lock:
                if self._kick_timer is not None:
                    return
                self._kick_timer = threading.Timer(delay, self._kick_now)
                self._kick_timer.daemon = True
                self._kick_timer.start()
            return
        self._kick_now()

    def _kick_now(self):
        with self._requeue_lock:
            self._kick_timer = None
            if self.suspended:
                return  # resume() kicks
            reqs, self._requeued = self._requeued, {}
        for req in reqs:
            self._remap_parked(req)

    def _park(self, piece, private):
        piece.private = private
        req = piece.request
        with req.lock:
            req.parked.append(piece)
            idle = len(req.parked) == req.pending
            holds = req.holds if idle else 0
            if idle:
                req.holds = 0
            queue, req.queue = req.queue, None
        if queue is not None:  # parked, it is in flight no more: what waits behind it may go
            queue.done(req.segment, req.io, len(req.members))
        with self._requeue_lock:
            self._requeued[req] = True
        self._leave(holds)  # nothing of it is in flight: a suspend need not wait for it

    def _remap_parked(self, req):
        with req.lock:
            enter = req.holds == 0 and bool(req.parked)
        if enter:
            if not self.gate.enter_or_defer(req):
                return  # suspended meanwhile: resume() hands it back
            with req.lock:
                req.holds = 1
        table = self.table
        with req.lock:
            pieces, req.parked = req.parked, []
            again = []
            for piece in pieces:
                if table is None or any(t is piece.target for t in table.targets):
                    again.append((piece, piece.private))
                else:  # its table was replaced: the new one's targets take its range
                    new = self._split_again(piece, table)
                    req.pending += len(new) - 1
                    again += [(p, None) for p in new]
        for piece, private in again:
            if piece.target is None:
                self._piece_done(piece, errno.ENOSPC if req.io.is_write else errno.EINVAL)
            else:
                self._map(piece, private)

    @staticmethod
    def _split_again(piece, table):
        """A parked piece's range as pieces of another table (a FLUSH: one for each target)."""
        req = piece.request
        if req.io.op == bio.FLUSH:
            return [_Piece(req, t, 0, 0, None, 0) for t in table.targets]
        out = []
        pos, end = piece.start, min(piece.start + piece.length, table.size)
        view = memoryview(piece.buf) if piece.buf is not None else None
        i = table.find(pos) if pos < end else 0
        while pos < end:
            seg = table.segments[i]
            n = min(seg.offset + seg.size, end) - pos
            buf = view[pos - piece.start : pos - piece.start + n] if view is not None else None
            out.append(_Piece(req, table.targets[i], pos - seg.offset, n, buf, pos))
            pos += n
            i += 1
        if end < piece.start + piece.length:  # past the new table's end: no target (it fails)
            out.append(_Piece(req, None, 0, piece.start + piece.length - end, None, end))
        return out

    def _piece_done(self, piece, error):
        req = piece.request
        holds = 0
        with req.lock:  # the error is stored under the lock: the last piece must see every error
            req.pending -= 1
            if error and not req.error:
                req.error = bio.error(error)
            last = req.pending == 0
            if not last and req.holds and len(req.parked) == req.pending:
                holds, req.holds = req.holds, 0  # only parked pieces are left
        if holds:
            self._leave(holds)
        if last:
            self._finish(req)

    def _finish(self, req):
        error = req.error
        if error:
            self.errors += 1
        members = req.members
        if len(members) > 1 and not error and req.io.op == bio.READ:
            scatter(req.io, members)
        for io in members:
            io.complete(error)
        if req.queue is not None:  # before leaving the gate: the table is live until then
            req.queue.done(req.segment, req.io, len(req.members))
        self._leave(req.holds)

    def _leave(self, n):
        for _ in range(n):
            self.gate.leave()

    def _resubmit(self, deferred):
        """What the gate kept while closed: new requests, and parked requests to map again."""
        for x in deferred:
            if isinstance(x, _Request):
                self._remap_parked(x)
            else:
                self.submit(x)

    def _block_status(self, io, table):
        """BLOCK_STATUS passes the gate like any request: a reload cannot close a file under it.
        io.buf names the metadata context on the way in (None: base:allocation, the targets'
        block_status; another: their context_status) and holds the extents on the way out."""
        context = io.buf
        out = []
        try:
            end = io.offset + io.length
            i = table.find(io.offset)
            pos = io.offset
            while pos < end and i < len(table.segments):
                seg = table.segments[i]
                n = min(seg.offset + seg.size, end) - pos
                try:
                    t = table.targets[i]
                    extents = (t.context_status(context, pos - seg.offset, n) if context
                               else t.block_status(pos - seg.offset, n))
                except Exception:
                    extents = [(n, 0)]
                for length_, flags in extents:
                    if out and out[-1][1] == flags:
                        out[-1] = (out[-1][0] + length_, flags)
                    else:
                        out.append((length_, flags))
                pos += n
                i += 1
        finally:
            self._leave(1)
        io.buf = out
        io.complete(0)

    def block_status(self, offset, length):
        """Extents [(length, flags)] of [offset, offset+length), through the gate; waits."""
        done = threading.Event()
        io = bio.IO(bio.BLOCK_STATUS, offset, length, None, 0, lambda _io: done.set())
        self.submit(io)
        done.wait()
        return io.buf
