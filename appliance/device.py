"""Mapped devices: a table of targets, the order of suspend and resume, and the
request path (split, map, end_io, join).

The core owns what dm's core owns: the table, each segment's offset, device
references and the suspend/resume sequence, so no target re-implements them.
"""

from __future__ import annotations

import errno
import logging
import threading

from . import io as bio
from ._fast.gate import Gate
from .blockdev import DeviceError
from .power.state import NO_POWER as NO_POWER_MODE
from .request_queue import RequestQueue, merged_io, scatter
from .table import TableError, parse_table, table_size
from .targets import TargetError, target_class

log = logging.getLogger(__name__)



class DeviceBusy(RuntimeError):
    pass


class Table:
    """A constructed table: segments with their live targets."""

    def __init__(self, segments, targets, dispatch=None):
        self.segments = segments
        self.targets = targets
        self.size = table_size(segments)
        self.starts = [s.offset for s in segments]
        # dispatch(members, segment, table): the device maps what the queue lets go
        self.queue = RequestQueue(targets, lambda members, seg: dispatch(members, seg, self))

    def find(self, offset):
        """Index of the segment holding byte `offset`."""
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def fastmap(self):
        out = []
        for seg, t in zip(self.segments, self.targets):
            fm = t.fast_map()
            if fm is None or any(getattr(d, "failed", None) for d in t.iterate_devices()):
                out.append((seg.offset, seg.offset + seg.size, 0, -1, 0, 1))
            else:
                kind, fd, fd_offset, align, *extra = fm  # extra: a ramback's ChunkState
                out.append((seg.offset, seg.offset + seg.size, kind, fd, fd_offset, align, *extra))
        return out

    def text(self):
        return [seg.text(tuple(t.status_table())) for seg, t in zip(self.segments, self.targets)]

    def destroy(self):
        for t in self.targets:
            try:
                t.dtr()
            except Exception:
                log.exception("%s: dtr failed", t.name)


class TableContext:
    """What a target's constructor may use: open devices by path or @NAME."""

    def __init__(self, device, registry, pool, direct=False, exclusive=True, writable=True):
        self.device = device
        self.registry = registry
        self.pool = pool
        self.direct = direct
        self.exclusive = exclusive
        self.writable = writable

    def get_device(self, word):
        if word.startswith("@"):
            return self.registry.hold(word[1:], self.device)
        try:
            # a read_only device's files open O_RDONLY: nothing below it can write them
            return self.pool.get(word, writable=self.writable, direct=self.direct,
                                 exclusive=self.exclusive)
        except DeviceError as e:  # already one sentence naming the path, without "[Errno N]"
            raise TargetError(e.strerror) from None
        except OSError as e:
            raise TargetError(str(e)) from None

    @property
    def daemon_config(self):
        """The daemon's [daemon] settings (state_dir, shm_dir, control), or None outside a daemon."""
        return getattr(self.registry, "daemon_config", None)

    @property
    def ramback_mode(self):
        """(mode, reason) a ramback starts in: the daemon's power monitor decides
        (appliance.power); with none attached, as without a [power] section."""
        power = getattr(self.registry, "power", None)
        return power.ramback_mode() if power is not None else NO_POWER_MODE

    def put_device(self, dev):
        if isinstance(dev, MappedDevice):
            self.registry.release(dev, self.device)
        else:
            self.pool.put(dev)


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

    __slots__ = ("request", "target", "offset", "length", "buf", "private")

    def __init__(self, request, target, offset, length, buf):
        self.request = request
        self.target = target
        self.offset = offset  # in the segment, as the target's map() sees it
        self.length = length
        self.buf = buf
        self.private = None


class MappedDevice:
    kind = "mapped"

    def __init__(self, name, registry, pool, *, read_only=False, description="", direct=False, exclusive=True):
        self.name = name
        self.registry = registry
        self.pool = pool
        self.read_only = read_only
        self.description = description
        self.direct = direct
        self.exclusive = exclusive
        self.gate = Gate()
        self.table = None
        self.inactive = None
        self.suspended = False
        self.holders = {}  # device -> how many of its segments stack on this one
        self._control = threading.RLock()  # one suspend/load/resume at a time
        self.errors = 0
        self._requeue_lock = threading.Lock()
        self._requeued = {}  # _Request -> True: requests with parked pieces, in order
        self._kick_timer = None

    # table life cycle

    @property
    def size(self):
        return self.table.size if self.table else 0

    @property
    def align(self):
        """The alignment every request needs: the largest of the devices below (O_DIRECT)."""
        a = 1
        if self.table:
            for t in self.table.targets:
                for d in t.iterate_devices():
                    a = max(a, getattr(d, "align", 1))
        return a

    def load(self, lines, read_only=None):
        """Construct a table into the inactive slot (dmsetup load). Raises TableError.
        `read_only`: what the device will be when this table goes live (default: as now)."""
        segments = parse_table(lines)
        writable = not (self.read_only if read_only is None else read_only)
        ctx = TableContext(self, self.registry, self.pool, self.direct, self.exclusive, writable)
        targets = []
        try:
            for seg in segments:
                t = target_class(seg.target)(ctx, seg)
                try:
                    t.ctr(list(seg.args))
                except BaseException:
                    t.dtr()
                    raise
                targets.append(t)
        except (TargetError, OSError) as e:
            for t in targets:
                t.dtr()
            raise TableError(seg.line, f"{seg.target}: {e}") from None
        except BaseException:
            for t in targets:
                t.dtr()
            raise
        with self._control:
            if self.inactive is not None:
                self.inactive.destroy()
            self.inactive = Table(segments, targets, self._dispatch_queued)

    def clear(self):
        with self._control:
            if self.inactive is not None:
                self.inactive.destroy()
                self.inactive = None

    def suspend(self, noflush=False):
        """Stop new I/O (it is deferred, not failed) and wait for what is in flight."""
        with self._control:
            if self.suspended:
                return
            self.gate.close()
            if self.table:
                for t in self.table.targets:
                    t.presuspend(noflush)
            self.gate.wait_idle()
            if self.table:
                for t in self.table.targets:
                    t.postsuspend()
            self.suspended = True

    def resume(self):
        """Swap in a loaded table (if any) and let I/O through again."""
        with self._control:
            if self.inactive is not None:
                if not self.suspended and self.table is not None:
                    self.suspend()
                old, self.table, self.inactive = self.table, self.inactive, None
                self.gate.close()  # a fresh device's gate was never closed
                self.gate.set_fastmap(self.table.fastmap())
                if old is not None:
                    old.destroy()
                self.suspended = True
            if not self.suspended:
                return
            for t in self.table.targets:
                t.resume()
            self.suspended = False
            deferred = self.gate.open()
        self._resubmit(deferred)
        self.kick()  # parked pieces are mapped again on resume

    def refresh_fastmap(self):
        """Rebuild the fast map from the live table (a backing disk failed or came back)."""
        with self._control:
            if self.table is None:
                return
            if self.suspended:  # closed and idle already; resume() reopens
                self.gate.set_fastmap(self.table.fastmap())
                return
            self.gate.close()
            self.gate.wait_idle()
            self.gate.set_fastmap(self.table.fastmap())
            deferred = self.gate.open()
        self._resubmit(deferred)

    def remove(self):
        if self.holders:
            raise DeviceBusy(f"{self.name} is in use by {', '.join(sorted(d.name for d in self.holders))}")
        self.suspend()
        with self._control:
            if self.table:
                self.table.destroy()
                self.table = None
            self.clear()

    # the request path

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
            self._map(_Piece(req, table.targets[i], pos - seg.offset, n, buf))

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
        with req.lock:
            pieces, req.parked = req.parked, []
        for piece in pieces:
            self._map(piece, piece.private)

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
            req.queue.done(req.segment)
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
        """BLOCK_STATUS passes the gate like any request: a reload cannot close a file under it."""
        out = []
        try:
            end = io.offset + io.length
            i = table.find(io.offset)
            pos = io.offset
            while pos < end and i < len(table.segments):
                seg = table.segments[i]
                n = min(seg.offset + seg.size, end) - pos
                try:
                    extents = table.targets[i].block_status(pos - seg.offset, n)
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

    # reporting

    def status(self):
        table = self.table
        segs = []
        if table:
            for seg, t in zip(table.segments, table.targets):
                segs.append({"start": seg.start, "length": seg.length, "type": seg.target, "status": t.status_info()})
        return {
            "name": self.name,
            "size": self.size,
            "read_only": self.read_only,
            "description": self.description,
            "suspended": self.suspended,
            "inactive_table": self.inactive is not None,
            "in_flight": self.gate.in_flight,
            "deferred": self.gate.deferred_count,
            "fast_ios": self.gate.fast_ios,
            "errors": self.errors,
            "queue": table.queue.status() if table else None,
            "requeued": len(self._requeued),
            "holders": sorted(d.name for d in self.holders),
            "segments": segs,
        }

    def status_lines(self):
        table = self.table
        if not table:
            return []
        return [f"{seg.start} {seg.length} {seg.target} {t.status_line()}".rstrip() for seg, t in zip(table.segments, table.targets)]

    def table_lines(self):
        return self.table.text() if self.table else []

    def message(self, sector, argv):
        table = self.table
        if table is None:
            raise TargetError(f"{self.name} has no table")
        i = table.find(sector * 512)
        return table.targets[i].message(argv)


from .targets import Target as _Target  # noqa: E402

_default_end_io = _Target.end_io


class Registry:
    """The daemon's mapped devices by name, for `@NAME` in tables."""

    def __init__(self):
        self.devices = {}
        self._lock = threading.Lock()
        self.power = None  # the daemon's power monitor, for TableContext.ramback_mode
        self.daemon_config = None  # the daemon's [daemon] section, for TableContext.daemon_config

    def add(self, dev):
        with self._lock:
            if dev.name in self.devices:
                raise DeviceBusy(f"device {dev.name} exists")
            self.devices[dev.name] = dev

    def get(self, name):
        return self.devices.get(name)

    def hold(self, name, holder):
        with self._lock:
            dev = self.devices.get(name)
            if dev is None or dev.table is None:
                raise TargetError(f"no device @{name}")
            if dev is holder:
                raise TargetError(f"@{name} cannot stack on itself")
            dev.holders[holder] = dev.holders.get(holder, 0) + 1
            return dev

    def release(self, dev, holder):
        with self._lock:
            n = dev.holders.get(holder, 0) - 1
            if n > 0:
                dev.holders[holder] = n
            else:
                dev.holders.pop(holder, None)

    def remove(self, name):
        with self._lock:
            return self.devices.pop(name, None)
