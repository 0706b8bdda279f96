"""ramback <ram> <backing> [chunk=BYTES] [max_dirty=BYTES|SECONDSs] [sync=ram|backing]
[on_mismatch=refuse|discard]: a RAM disk kept on a real disk.

Reads and writes are served from RAM (a shared-memory store that survives the
daemon, store.py); a flusher writes dirty chunks back in coalesced runs, at once in
writethrough mode and after at most EXPIRE seconds of ageing in writeback mode
(flush.py); a new store loads from backing in the background while I/O goes on
(populate.py); both go through the I/O engine, several requests in flight (backing.py).
Writes that need a lock, loads, the dirty limit and FLUSH: requests.py.

Modes (`appliance message NAME 0 writeback|writethrough|flush`):
- writeback: writes, FUA and FLUSH complete at RAM speed (sync=backing: FLUSH and
  FUA wait for backing). This is ramback's promise, and it rests on a UPS.
- writethrough: a write completes once it is on backing; entering it drains what is
  dirty while I/O goes on. The starting mode is the power monitor's
  (TableContext.cache_mode): writethrough when there is no [power] section.

How a write goes (the invariants the compiled fast path shares, chunkstate.pyx):
- all of its chunks loaded, writeback, under the dirty limit: mark DIRTY, copy, mark
  DIRTY again, complete. No lock. The NBD loop does this itself without the GIL.
- otherwise it takes its place in the range-lock line at once (locks.py), so
  overlapping writes keep the order they arrived in, and a worker holds the lock
  while it loads a partial EMPTY chunk at either end, copies (EMPTY chunks it covers
  whole are marked DIRTY only after the copy: requests.py _copy), and for writethrough
  writes the whole chunks back with the flush protocol before completing. Writing
  whole chunks through the flush protocol is what makes it safe against a writeback
  write landing in the same chunk meanwhile; the flush lock keeps an older flush
  from landing after it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from ..._fast.chunkstate import DIRTY, FLUSHING
from ...power.state import NO_POWER, WRITEBACK, WRITETHROUGH
from .. import DeviceArg, Target, TargetError
from .backing import BackingIO
from .flush import Flusher
from .limit import DirtyLimit, format_limit, parse_limit, parse_size
from .locks import RangeLocks
from .populate import Populate
from .requests import RequestPath
from .store import Marker, backing_identity, default_dir, layout, open_store

log = logging.getLogger("appliance.ramback")

USAGE = ("ramback takes <ram> <backing> [chunk=BYTES] [max_dirty=BYTES|SECONDSs] [sync=ram|backing] "
         "[on_mismatch=refuse|discard]")
OPTIONS = ("chunk", "max_dirty", "sync", "on_mismatch")
DEFAULT_MAX_DIRTY = "30s"
WRITE_WORKERS = 16
LOAD_WORKERS = 8


class Ramback(RequestPath, Target):
    name = "ramback"

    def __init__(self, ctx, segment):
        super().__init__(ctx, segment)
        self.store = None
        self.flusher = None
        self.populate = None
        self.warning = None
        self.refused = None
        self.running = False

    # construction

    @classmethod
    def parse(cls, args):
        if len(args) < 2:
            raise TargetError(USAGE)
        opts = {}
        for arg in args[2:]:
            key, eq, value = arg.partition("=")
            if not eq or key not in OPTIONS:
                raise TargetError(f"unknown ramback option {arg!r}; options: {', '.join(k + '=' for k in OPTIONS)}")
            if key in opts:
                raise TargetError(f"option {key}= given twice")
            opts[key] = value
        chunk = parse_size(opts.get("chunk", "4096"), "chunk")
        if chunk < 4096 or chunk & (chunk - 1) or chunk > 1 << 30:
            raise TargetError(f"chunk={opts.get('chunk')} must be a power of two from 4096 bytes to 1 GiB")
        sync = opts.get("sync", "ram")
        if sync not in ("ram", "backing"):
            raise TargetError(f"sync={sync} must be ram or backing")
        mismatch = opts.get("on_mismatch", "refuse")
        if mismatch not in ("refuse", "discard"):
            raise TargetError(f"on_mismatch={mismatch} must be refuse or discard")
        max_dirty = parse_limit(opts.get("max_dirty", DEFAULT_MAX_DIRTY))
        _check_floor(max_dirty, chunk_floor(chunk), chunk)
        if args[0] != "-" and not os.path.isabs(args[0]):
            # check-config runs where the admin is; the daemon, in / under systemd
            raise TargetError(f"RAM store {args[0]}: not an absolute path")
        # <ram> is created here, not waited for: only <backing> is an underlying device
        return SimpleNamespace(ram=args[0], backing=args[1], chunk=chunk, sync=sync, mismatch=mismatch,
                               max_dirty=max_dirty, devices=[DeviceArg(args[1], 0)])

    @classmethod
    def validate(cls, segment, check):
        """Besides <backing>: a <ram> path that open_store would refuse. ("-" is a store under
        daemon.shm_dir, whose directory ctr creates.) Whether an existing store belongs to this
        table is left to ctr: it needs the backing's identity from an open."""
        p = super().validate(segment, check)
        if p.ram == "-":
            return p
        where = os.path.dirname(os.path.abspath(p.ram))
        if os.path.exists(p.ram):
            mode = os.stat(p.ram).st_mode
            if stat.S_ISDIR(mode):
                raise TargetError(f"cannot open RAM store {p.ram}: {os.strerror(errno.EISDIR)}")
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise TargetError(f"RAM store {p.ram} is not a regular file or block device")
        elif not os.path.isdir(where):
            raise TargetError(f"cannot open RAM store {p.ram}: no directory {where}")
        else:
            total = layout(segment.size, p.chunk)[3]
            room = os.statvfs(where)
            if room.f_bavail * room.f_frsize < total:
                raise TargetError(f"not enough room for a {total}-byte RAM store in {where}")
        return p

    def ctr(self, args):
        p = self.parse(args)
        ram, word, chunk, mismatch = p.ram, p.backing, p.chunk, p.mismatch
        self.sync = p.sync
        self.max_dirty = p.max_dirty
        self.chunk_size = chunk
        self.shift = chunk.bit_length() - 1
        self.backing = self.get_device(word)
        self.check_fits(self.backing, 0, word)
        self.backing_io = BackingIO(self.backing)

        daemon = getattr(self.ctx, "daemon_config", None)
        devname = getattr(self.ctx.device, "name", "ramback")
        self.label = f"{devname}@{self.segment.start}" if self.segment.start else devname
        if ram == "-":
            where = getattr(daemon, "shm_dir", None) or default_dir(getattr(daemon, "control", None))
            path = os.path.join(where, f"{devname}-{self.segment.start}.store")
        else:
            path = ram
        want = {"length": self.length, "chunk_size": chunk, **backing_identity(self.backing, word)}
        marker = Marker(getattr(daemon, "state_dir", None), f"{devname}-{self.segment.start}")
        previous = marker.read()
        self.store = open_store(path, want, create_dir=ram == "-", discard=mismatch == "discard")
        self.cs = self.store.cs
        self.length = self.cs.length
        if self.store.locks is None:
            self.store.locks = RangeLocks()
        self.locks = self.store.locks
        self.marker = marker
        self.limit = DirtyLimit(self.max_dirty, floor=chunk_floor(chunk))
        self.flusher = Flusher(self)
        self.populate = Populate(self)
        self._say_how_attached(previous)

        # a reloaded table keeps the mode of the one it replaces; a new one starts in the power
        # monitor's (writethrough without a [power] section)
        inherited = self.store.shared.get("mode") if self.store.refs > 1 else None
        self.mode, self.mode_reason = inherited or getattr(self.ctx, "cache_mode", None) or NO_POWER
        self.store.shared["mode"] = (self.mode, self.mode_reason)
        self._mode_lock = threading.RLock()  # _keep_marker may apply the mode inside set_mode
        self._writes = ThreadPoolExecutor(WRITE_WORKERS, thread_name_prefix=f"ramback-write {self.label}")
        self._loads = ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix=f"ramback-load {self.label}")
        self.throttled = 0
        self.failed_writes = 0  # writes at the dirty limit failed because backing failed
        self.reserved = 0  # chunks slow writes have room for and have not marked yet (requests.py)
        self._room = threading.Lock()
        self.suspending = False
        self.marked = False  # the marker says what RAM may hold: writeback may go on
        self._marker_at = 0.0
        self._floor_said = False
        self.update_limit()

    def _say_how_attached(self, previous):
        how = self.store.how
        e, c, d, f = self.cs.counts()
        if self.store.refs > 1:
            log.info("%s: the new table shares the live RAM store %s", self.label, self.store.path)
        elif how in ("created", "discarded") and previous is not None and (
                "unreadable" in previous or previous.get("mode") == WRITEBACK or previous.get("dirty_bytes")):
            if "unreadable" in previous:  # a marker cut short by a crash says no less than a whole one
                what = (f"its marker {self.marker.path} is unreadable ({previous['unreadable']}), so RAM may have "
                        f"held data backing does not have")
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(previous.get("updated", 0)))
                what = (f"the previous run held data in RAM that backing may not have "
                        f"(mode {previous.get('mode')}, {previous.get('dirty_bytes', '?')} dirty bytes as of {when})")
            self.warning = (
                f"DIRTY DATA LOST: {what}, and its RAM store {self.store.path} is gone; backing holds what was "
                f"flushed, check the filesystem on it (fsck) before trusting it"
            )
            log.error("%s: %s", self.label, self.warning)
        elif how == "attached unclean":
            log.warning("%s: re-attached RAM store %s after an unclean stop: %d dirty chunks to flush, %d to load",
                        self.label, self.store.path, d, e)
        elif how == "attached clean":
            log.info("%s: re-attached RAM store %s (clean)", self.label, self.store.path)
        else:
            log.info("%s: new RAM store %s: %d chunks of %d bytes to load from backing", self.label, self.store.path, e, self.chunk_size)

    def dtr(self):
        if self.store is not None:
            self._stop_threads()
            for pool in (getattr(self, "_writes", None), getattr(self, "_loads", None)):
                if pool is not None:
                    pool.shutdown(wait=True)
            if self.store.refs == 1 and self.flusher is not None:
                self._drain_for_stop()
            # the wake fd is the running flusher's (Flusher.stop took it back): a table that was
            # only loaded, never resumed, shares the live table's store and leaves it alone
            if self.flusher is not None:
                self.flusher.close()
            self.cs = None
            self.store.release()
            self.store = None
        super().dtr()

    def _drain_for_stop(self):
        cs = self.cs
        dirty = cs.count(DIRTY) + cs.count(FLUSHING)
        if dirty:
            log.info("%s: draining %d dirty chunks (%d bytes) to backing before stopping", self.label, dirty, dirty << self.shift)
        t0 = time.monotonic()
        said = [t0]

        def progress():  # the control socket is gone by now: the log shows the drain
            now = time.monotonic()
            if now - said[0] >= 5:
                said[0] = now
                left = (cs.count(DIRTY) + cs.count(FLUSHING)) << self.shift
                bw = self.flusher.bw.value
                log.info("%s: draining: %d bytes left, about %.0f s at %.1f MiB/s", self.label, left, left / bw, bw / 2**20)

        err = 0
        for _ in range(3):
            err = self.flusher.sweep(progress)
            if not err and cs.count(DIRTY) + cs.count(FLUSHING) == 0:
                break
        left = cs.count(DIRTY) + cs.count(FLUSHING)
        if left:
            log.error("%s: could not drain: %d chunks (%d bytes) stay dirty in the RAM store %s (%s); "
                      "they are flushed when the daemon starts again, unless the store is lost",
                      self.label, left, left << self.shift, self.store.path, os.strerror(err) if err else "?")
            return
        self.store.write_header(clean=1, stopped=int(time.time()))
        self.marker.remove()
        if dirty:
            log.info("%s: drained in %.1f s", self.label, time.monotonic() - t0)

    # threads

    def resume(self):
        self.suspending = False
        if self.running:
            return
        self._keep_marker(force=True)  # on disk before the first writeback write is acknowledged
        self.running = True
        self.update_limit()  # the shared store's limit is the live table's: set once live
        self.flusher.start()
        self.populate.start()
        self._apply_mode()

    def presuspend(self, noflush=False):
        # writers waiting at the dirty limit write through instead (requests.py _admit): the
        # suspend waits for I/O in flight, and must not wait for the flusher to make room
        self.suspending = True
        with self.flusher.progress:
            self.flusher.progress.notify_all()

    def postsuspend(self):
        self._stop_threads()

    def _stop_threads(self):
        if not self.running:
            return
        self.running = False
        self.cs.disable_writes()
        self.populate.stop()
        self.flusher.stop()

    def tick(self):
        """From the flusher, now and then: the limit and the marker."""
        self.update_limit()
        self._keep_marker()
        if self.populate.thread is not None and not self.populate.thread.is_alive():
            self.populate.thread = None

    def _keep_marker(self, force=False, mode=None):
        cs = self.cs
        mode = mode or self.mode
        dirty = (cs.count(DIRTY) + cs.count(FLUSHING)) << self.shift
        needed = mode == WRITEBACK or dirty > 0
        now = time.monotonic()
        if needed and (force or now - self._marker_at > 5):  # a failed write is retried, not spun on
            ok = self.marker.write(mode=mode, dirty_bytes=dirty, store=self.store.path,
                                   backing=self.store.header["backing_path"])
            self._marker_at = now
            # writeback waits for the marker: without it a reboot would lose data silently. A
            # failed refresh leaves the last marker in place, and that one still warns.
            ok = ok or self.marker.present is True
            if not ok and mode == WRITEBACK:
                log.error("%s: writes go through to backing until the marker %s can be written",
                          self.label, self.marker.path)
            if ok != self.marked:
                self.marked = ok
                with self._mode_lock:
                    self._apply_mode()
        elif not needed and self.marker.present is not False:
            self.marker.remove()
            self.marked = False

    def update_limit(self):
        bw = self.flusher.bw
        limit, why, raised = self.limit.effective(bw.value, bw.measured)
        self.limit_bytes, self.limit_reason, self.limit_raised = limit, why, raised
        self.limit_chunks = max(1, limit >> self.shift)
        if self.cs is not None and self.running:  # a table only loaded must not change the live one's
            with self._room:
                self._fast_limit()
        if raised != self._floor_said:
            self._floor_said = raised
            if raised:  # the UPS (or max_dirty in seconds) asked for less than chunk= allows
                log.warning("%s: dirty limit %s is raised to %d bytes, the least chunk=%d works with: "
                            "a power loss may leave more dirty data than asked for; use a smaller chunk",
                            self.label, why.split(" (raised")[0], limit, self.chunk_size)

    # modes, for messages and the power monitor

    def set_mode(self, mode, reason="message"):
        if mode not in (WRITEBACK, WRITETHROUGH):
            raise TargetError(f"mode must be writeback or writethrough, not {mode!r}")
        with self._mode_lock:
            if mode == WRITEBACK:
                # the marker goes down first: a write acknowledged in RAM only must never exist
                # without it (after a reboot it is what says data may have been lost)
                self._keep_marker(force=True, mode=WRITEBACK)
            self.mode = mode
            self.mode_reason = reason
            self.store.shared["mode"] = (mode, reason)
            self._apply_mode()
        log.info("%s: mode %s (%s)", self.label, mode, reason)
        self.flusher.kick()

    def _apply_mode(self):
        self.cs.fua_ok = self.sync == "ram"  # here, not in ctr: a table being loaded shares a live store
        if self.mode == WRITEBACK and self.marked and self.refused is None and self.running:
            self.cs.enable_writes()
        else:
            self.cs.disable_writes()  # returns once no fast write is in progress

    def set_power_limit(self, limit, reason):
        self.limit.power = None if limit is None else (int(limit), reason)
        self.update_limit()

    def refuse_writes(self, reason):
        """reason: new writes fail with ESHUTDOWN (the UPS is about to go); None: accept again."""
        with self._mode_lock:
            self.refused = reason
            self._apply_mode()
        if reason:
            log.warning("%s: refusing writes: %s", self.label, reason)
        with self.flusher.progress:
            self.flusher.progress.notify_all()

    def drain(self, timeout=None):
        """Wait until nothing is dirty, at most `timeout` seconds. True when clean."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cs = self.cs
        self.flusher.urgent_until = time.monotonic() + (timeout if timeout is not None else 3600) + 1.0
        self.flusher.kick()
        with self.flusher.progress:
            while cs.count(DIRTY) + cs.count(FLUSHING):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.flusher.progress.wait(min(left, 0.5) if left is not None else 0.5)
        return True

    def message(self, argv):
        if not argv:
            raise TargetError("ramback messages: writeback, writethrough, flush, max_dirty <BYTES|SECONDSs>")
        cmd = argv[0]
        if cmd in (WRITEBACK, WRITETHROUGH) and len(argv) == 1:
            self.set_mode(cmd, "set by message")
            return f"mode {cmd}"
        if cmd == "flush" and len(argv) == 1:
            err = 0
            for _ in range(3):
                err = self.flusher.sweep()
                if err or self.cs.count(DIRTY) + self.cs.count(FLUSHING) == 0:
                    break
            if err:
                raise TargetError(f"flush failed: {os.strerror(err)}; dirty chunks remain")
            left = self.cs.count(DIRTY) + self.cs.count(FLUSHING)
            return "clean" if not left else f"flushed; {left} chunks written meanwhile are dirty"
        if cmd == "max_dirty" and len(argv) == 2:
            limit = parse_limit(argv[1])
            _check_floor(limit, self.limit.floor, self.chunk_size)
            self.max_dirty = self.limit.configured = limit
            self.update_limit()
            return f"max_dirty {format_limit(self.max_dirty)}: {self.limit_bytes} bytes"
        raise TargetError(f"unknown ramback message {' '.join(argv)!r}; messages: writeback, writethrough, flush, max_dirty <value>")

    # reporting

    def status_info(self):
        cs = self.cs
        if cs is None:
            return {"mode": self.mode if hasattr(self, "mode") else None, "stopped": True}
        e, c, d, f = cs.counts()
        n = cs.nchunks
        dirty = d + f
        dirty_bytes = min(dirty << self.shift, self.length)
        bw = self.flusher.bw
        rate = self.populate.rate()
        empty_bytes = e << self.shift
        return {
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "sync": self.sync,
            "populated": e == 0,
            "chunks": n,
            "chunk_size": self.chunk_size,
            "loaded": n - e,
            "stored": self.flusher.stored,
            "dirty": dirty,
            "inflight": f,
            "dirty_bytes": dirty_bytes,
            "flush_bandwidth": int(bw.value) if bw.measured else 0,
            "drain_eta_seconds": round(dirty_bytes / bw.value, 1) if dirty_bytes else 0.0,
            "flush_state": self.flusher.state if self.running else "stopped",
            "dirty_limit_bytes": self.limit_bytes,
            "dirty_limit_reason": self.limit_reason,
            "dirty_limit_raised_to_floor": self.limit_raised,
            "max_dirty": format_limit(self.max_dirty),
            "throttled_writes": self.throttled,
            "failed_writes": self.failed_writes,
            "backing_failing": self.flusher.failing,
            "flush_sweeps": self.flusher.syncs.count,
            "marker": self.marker.path if self.marked else None,
            "populate_progress": round((n - e) / n, 4),
            "populate_bandwidth": int(rate),
            "populate_eta_seconds": (round(empty_bytes / rate, 1) if rate else None) if e else 0.0,
            "populate_seconds": round(self.populate.done_at - self.populate.started, 3) if self.populate.done_at else None,
            "writes_refused": self.refused,
            "store": self.store.path,
            "store_attach": self.store.how,
            "flush_errors": self.flusher.errors,
            "last_flush_error": self.flusher.last_error,
            "load_errors": self.populate.errors,
            "fast_reads": cs.fast_reads,
            "fast_writes": cs.fast_writes,
            "warning": self.warning,
        }

    def status_line(self):
        i = self.status_info()
        if i.get("stopped"):
            return "stopped"
        words = [f"{k}={_word(i[k])}" for k in ("mode", "populated", "chunks", "loaded", "stored", "dirty", "inflight",
                                                "dirty_bytes", "drain_eta_seconds")]
        if i["warning"]:
            words.append("warning=DIRTY-DATA-LOST")
        if i["writes_refused"]:
            words.append("writes=refused")
        if i["backing_failing"]:
            words.append("backing=FAILING")
        if i["dirty_limit_raised_to_floor"]:
            words.append("dirty_limit=raised-to-chunk-floor")
        return " ".join(words)


def chunk_floor(chunk):
    """The least dirty limit a chunk size works with: a flush run's worth (16 chunks, at
    least 1 MiB); below it writers only wait."""
    return max(16 * chunk, 1 << 20)


def _check_floor(limit, floor, chunk):
    """A max_dirty in bytes below what the chunk size allows is refused, not quietly raised."""
    kind, value = limit
    if kind == "bytes" and value < floor:
        raise TargetError(f"max_dirty={value} is below {floor} bytes, the least chunk={chunk} works with "
                          f"(16 chunks, at least 1 MiB); use a smaller chunk or a larger max_dirty")


def _word(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)
