"""Mapped devices: a table of targets and the order of suspend and resume. The
request path (queue, split, map, end_io, join) is request_path.py's.

The core owns what dm's core owns: the table, each segment's offset, device
references and the suspend/resume sequence, so no target re-implements them.
"""

from __future__ import annotations

import logging
import threading

from ._fast.gate import Gate
from .blockdev import DeviceError
from .nbd import client as nbd_client
from .power.state import NO_POWER as NO_POWER_MODE
from .request_path import RequestPath
from .request_queue import RequestQueue
from .table import TableError, parse_table, table_size
from .targets import TargetError, target_class

log = logging.getLogger(__name__)



def _writable(dev):
    """A device below a table: a file opened read-write (writable), a mapped device (writable:
    its own table decides), a remote export (read_only: the server's NBD_FLAG_READ_ONLY)."""
    return getattr(dev, "writable", True) and not getattr(dev, "read_only", False)


class DeviceBusy(RuntimeError):
    pass


class Table:
    """A constructed table: segments with their live targets."""

    def __init__(self, segments, targets, dispatch=None, read_only=False):
        self.segments = segments
        self.targets = targets
        self.read_only = read_only  # what the device is while this table is live (dm's table mode)
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
        """[(start, end, FastOps or None)] for the gate: each target's fast-path descriptor,
        none for a segment whose device failed (its requests then fail in map())."""
        out = []
        for seg, t in zip(self.segments, self.targets):
            ops = t.fast_map()
            if ops is not None and any(getattr(d, "failed", None) for d in t.iterate_devices()):
                ops = None
            out.append((seg.offset, seg.offset + seg.size, ops))
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
            if nbd_client.is_uri(word):  # a remote export: nbd://, nbd+unix://
                return nbd_client.pool.get(word)
            # a read_only device's files open O_RDONLY: nothing below it can write them
            return self.pool.get(word, writable=self.writable, direct=self.direct,
                                 exclusive=self.exclusive)
        except DeviceError as e:  # already one sentence naming the path, without "[Errno N]"
            raise TargetError(e.strerror) from None
        except OSError as e:
            raise TargetError(str(e)) from None

    def settings(self, section):
        """The daemon's [section] settings (a config dataclass; `multipath`...), or None outside a
        daemon: the target then uses its defaults."""
        config = getattr(self.registry, "config", None)
        return getattr(config, section, None) if config is not None else None

    @property
    def daemon_config(self):
        """The daemon's [daemon] settings (state_dir, shm_dir, control), or None outside a daemon."""
        return getattr(self.registry, "daemon_config", None)

    @property
    def cache_mode(self):
        """(writeback|writethrough, reason) a write-caching target starts in: the daemon's power
        monitor decides (appliance.power); with none attached, as without a [power] section."""
        power = getattr(self.registry, "power", None)
        return power.cache_mode() if power is not None else NO_POWER_MODE

    def put_device(self, dev):
        if isinstance(dev, MappedDevice):
            self.registry.release(dev, self.device)
        elif dev.kind == "nbd":
            nbd_client.pool.put(dev)
        else:
            self.pool.put(dev)


class MappedDevice(RequestPath):
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

    @property
    def writable(self):
        """False if the device is read_only, or its live table reaches only devices that refuse
        writes (a read-only file, a read_only device, a read-only NBD export): every write would
        fail below it, so the handshake says read-only, as a disk whose every member is read-only
        is. A table of no devices (zero, error) is writable, as before."""
        if self.read_only:
            return False
        table = self.table
        below = [d for t in table.targets for d in t.iterate_devices()] if table else []
        return not below or any(_writable(d) for d in below)

    @property
    def control_lock(self):
        """Held while the table changes (suspend, load, resume, clear): whoever acts on the live
        table's targets from outside (the power monitor) holds it, so the table stays live meanwhile."""
        return self._control

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
            self.inactive = Table(segments, targets, self._dispatch_queued, read_only=not writable)

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
                self.read_only = self.table.read_only
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
            "read_only": not self.writable,  # set, or every device below refuses writes
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


class Registry:
    """The daemon's mapped devices by name, for `@NAME` in tables."""

    def __init__(self):
        self.devices = {}
        self._lock = threading.Lock()
        self.power = None  # the daemon's power monitor, for TableContext.cache_mode
        self.daemon_config = None  # the daemon's [daemon] section, for TableContext.daemon_config
        self.config = None  # the daemon's whole config, for TableContext.settings

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
