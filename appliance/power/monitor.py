"""The power monitor: the threads around the state machine (`state.py`).

- `power-poll` asks upsd every poll_interval, or at once when asked, and queues
  what it learnt. It holds no lock anyone else takes, so a hung upsd delays
  nothing but the next poll.
- `power` takes observations (polls, and pushes from `appliance power EVENT`)
  off one queue, feeds the machine, and applies the plan to every ramback in
  every device's live table: mode, refused writes, dirty limit. It applies it
  to each device holding that device's control lock, so no table is swapped
  or destroyed under it; a device whose lock a suspend or reload holds is
  tried again BUSY_RETRY later, and the others do not wait for it.
- `power-drain` keeps draining while on battery, flushes the backing devices
  once clean, and says "safe to power off" on low battery.

The rambacks are found by duck typing: any target whose `name` is "ramback",
with set_mode, set_power_limit, refuse_writes, drain and status_info.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from .. import io as bio
from . import state as st
from .ups import Ups, Unreachable

log = logging.getLogger("appliance.power")

TICK = 1.0  # the run loop applies the plan at least this often (limits, new tables)
DRAIN_SLICE = 0.5  # seconds per drain() call, so a change of plan is seen quickly
PUSH_WAIT = 1.0  # a push answers once applied, or after this long
FLUSH_TIMEOUT = 60.0  # per backing device
REMIND = 60.0  # seconds between "still unreachable" errors
BUSY_RETRY = 0.1  # seconds to wait for a device's control lock, and before trying a busy device again
_UNSET = object()


def rambacks(registry):
    """(device name, target) for every ramback in every device's live table."""
    return [rt for dev in list(registry.devices.values()) for rt in _rambacks_of(dev)]


def _rambacks_of(dev):
    table = dev.table
    return [(dev.name, t) for t in (table.targets if table is not None else ()) if getattr(t, "name", None) == "ramback"]


class _Applied:
    """What the monitor last told one ramback."""

    __slots__ = ("target", "key", "refuse", "limit", "bandwidth")

    def __init__(self, target):
        self.target = target
        self.key = None  # (state, mode) of the plan last applied
        self.refuse = None
        self.limit = _UNSET
        self.bandwidth = 0.0  # the last flush bandwidth measured, kept while idle


class Monitor:
    def __init__(self, config, registry, *, clock=time.monotonic, wall=time.time):
        self.config = config
        self.registry = registry
        self.clock = clock
        self.wall = wall
        if config is None or config.ups == "none":
            self.machine = st.StaticState(config)
            self.ups = None
        else:
            self.machine = st.PowerState(config.ups, config.online_hold, config.on_unreachable)
            timeout = min(max(config.poll_interval, 1.0), 5.0)
            self.ups = Ups(config.ups, config.user, config.password, timeout)
        self.lock = threading.Lock()  # the fields below; never held while calling out
        self.plan = self.machine.plan(clock())
        self.last_event = None  # (event, source, wall time)
        self.clean = None  # as of the drain worker's last pass; None while not draining
        self.safe = False  # cleared in the same step that changes the state (see _step)
        self.epoch = 0  # counts state changes: a drain pass begun before one says nothing after it
        self.unreachable_since = None
        self.reminded = 0.0
        self.applied = {}  # id(target) -> _Applied
        self.pending = False  # the last plan found a device busy: not applied to it yet
        self.queue = queue.Queue()
        self.stopping = threading.Event()
        self.poll_now = threading.Event()
        self.drain_kick = threading.Event()
        self.threads = []

    # life cycle

    def start(self):
        jobs = [("power", self._run), ("power-drain", self._drain_loop)]
        if self.ups is not None:
            jobs.append(("power-poll", self._poll_loop))
        else:
            (log.info if self.config is None else log.warning)("power: %s", self.plan.reason)
        for name, fn in jobs:
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self):
        self.stopping.set()
        self.queue.put((None, None))
        self.poll_now.set()
        self.drain_kick.set()
        for t in self.threads:
            t.join(2.0)  # a poll stuck on a dead upsd ends at its own timeout; it is a daemon thread
        self.threads = []

    # for the daemon

    def cache_mode(self):
        """(mode, reason) a ramback built now starts in (TableContext.cache_mode)."""
        with self.lock:
            return self.plan.mode, self.plan.reason

    def push(self, event, ups=None, message=None, wait=PUSH_WAIT):
        """An event from upsmon (NOTIFYTYPE); answers once applied or after `wait` seconds."""
        event = event.strip().upper()
        log.info("power: upsmon event %s%s%s", event, f" for {ups}" if ups else "", f": {message}" if message else "")
        if self.ups is None:
            return {"ignored": f"no UPS is monitored: {self.plan.reason}"}
        if ups and ups.split("@")[0] != self.ups.name:
            log.warning("power: ignoring %s for UPS %s: this daemon watches %s", event, ups, self.ups.ident)
            return {"ignored": f"this daemon watches {self.ups.ident}, not {ups}"}
        if event not in st.PUSH:
            return {"ignored": f"{event} does not concern line power"}
        if st.PUSH[event] is None:
            self.poll_now.set()
            return self._brief()
        ack = threading.Event()
        self.queue.put((st.push(event, self.clock(), self.wall()), ack))
        ack.wait(wait)
        return self._brief()

    def manual_mode(self, device, words):
        """`appliance message DEV 0 writeback` went through: say so loudly when power says otherwise."""
        with self.lock:
            plan = self.plan
        if words[:1] == [st.WRITEBACK] and plan.mode == st.WRITETHROUGH:
            log.warning("power: %s set to writeback by hand although power says writethrough (%s): "
                        "data in RAM is at risk on power loss%s", device, plan.reason,
                        "; the power monitor puts it back" if plan.enforce else "")

    def _brief(self):
        with self.lock:
            return {"state": self.plan.state, "mode": self.plan.mode, "reason": self.plan.reason}

    def snapshot(self):
        """The `power` object of `status --json`."""
        with self.lock:
            plan, m, ev = self.plan, self.machine, self.last_event
            clean = self.clean
            safe = self.safe and plan.state == st.LOW_BATTERY
        dirty, eta, n = 0, 0.0, 0
        for _, t in rambacks(self.registry):
            try:
                info = t.status_info()
            except Exception:
                continue
            n += 1
            dirty += info.get("dirty_bytes") or 0
            eta = max(eta, info.get("drain_eta_seconds") or 0.0)
        return {
            "state": plan.state,
            "ups": m.ups,
            "battery.runtime": m.runtime,
            "battery.charge": m.charge,
            "last_event": ev and ev[0],
            "last_event_source": ev and ev[1],
            "last_event_time": ev and ev[2],
            "mode": plan.mode,
            "reason": plan.reason,
            "error": m.detail if plan.state == st.UNKNOWN else None,
            "on_unreachable": self.config.on_unreachable if self.ups else None,
            "hold_remaining_seconds": plan.wake,
            "refusing_writes": plan.refuse,
            "rambacks": n,
            "dirty_bytes": dirty,
            "drain_eta_seconds": eta,
            "clean": clean,
            "safe_to_power_off": safe,
        }

    def wait_clean(self, timeout):
        """Drain every ramback and flush its backing; -> {"clean": bool, ...} within `timeout`."""
        deadline = self.clock() + timeout
        while True:
            targets = rambacks(self.registry)
            left = deadline - self.clock()
            if _drain(targets, max(0.05, min(DRAIN_SLICE, left))) and _flush_backing(targets):
                return {"clean": True, "rambacks": len(targets)}
            if self.clock() >= deadline:
                dirty = sum(_info(t).get("dirty_bytes") or 0 for _, t in targets)
                return {"clean": False, "rambacks": len(targets), "dirty_bytes": dirty}

    # the run loop

    def _run(self):
        acks = []
        plan = self.plan
        while True:
            try:
                plan = self._step()
            except Exception:  # the monitor must outlive any one bad tick
                log.exception("power: applying the power plan failed")
            if not self.pending:  # a push is answered once its plan is applied
                for a in acks:
                    a.set()
                acks = []
            timeout = TICK if plan.wake is None else min(TICK, plan.wake + 0.01)
            if self.pending:
                timeout = BUSY_RETRY
            try:
                item = self.queue.get(timeout=timeout)
            except queue.Empty:
                continue
            while True:  # take every queued observation before acting once
                obs, ack = item
                if obs is None:
                    return
                self._feed(obs)
                if ack is not None:
                    acks.append(ack)
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break

    def _feed(self, obs):
        with self.lock:
            before = self.machine.reported
            changed = self.machine.feed(obs)
            if changed or obs.source == "push":
                self.last_event = (obs.event, obs.source, obs.wall)
        now = self.clock()
        if obs.state == st.UNKNOWN:
            if self.unreachable_since is None or changed:
                self.unreachable_since = self.reminded = now
                log.error("power: UPS %s UNREACHABLE (%s): power state unknown, on_unreachable = %s",
                          self.machine.ups, obs.detail, self.config.on_unreachable)
            elif now - self.reminded >= REMIND:
                self.reminded = now
                log.error("power: UPS %s still unreachable after %.0f s (%s)",
                          self.machine.ups, now - self.unreachable_since, obs.detail)
        elif self.unreachable_since is not None:
            log.warning("power: UPS %s reachable again after %.0f s: %s",
                        self.machine.ups, now - self.unreachable_since, obs.event)
            self.unreachable_since = None
        if changed:
            log.warning("power: %s -> %s (%s by %s)", before, changed, obs.event, obs.source)

    def _step(self):
        now = self.clock()
        with self.lock:
            old, plan = self.plan, self.machine.plan(now)
            self.plan = plan
            if old.state != plan.state:
                # what the drain worker found holds only for the state it drained in
                self.epoch += 1
                self.clean, self.safe = None, False
        if (old.state, old.mode) != (plan.state, plan.mode):
            log.warning("power: %s: rambacks %s (%s)", plan.state, plan.mode, plan.reason)
        self.pending = self._apply(plan)
        if plan.drain or self.clean is not None:
            self.drain_kick.set()
        return plan

    def _apply(self, plan):
        """Apply the plan to every ramback; True if a device was busy (try it again soon)."""
        limits = self._limits(plan, rambacks(self.registry))
        seen, busy = {}, False
        for dev in list(self.registry.devices.values()):
            lock = getattr(dev, "control_lock", None)
            if lock is not None and not lock.acquire(timeout=BUSY_RETRY):
                busy = True  # a suspend or reload holds it: what we told its rambacks stands
                seen.update((id(t), a) for _, t in _rambacks_of(dev) if (a := self.applied.get(id(t))))
                continue
            try:
                for name, t in _rambacks_of(dev):
                    seen[id(t)] = self._apply_one(plan, name, t, limits)
            finally:
                if lock is not None:
                    lock.release()
        self.applied = seen
        return busy

    def _apply_one(self, plan, name, t, limits):
        key = (plan.state, plan.mode)
        a = self.applied.get(id(t))
        if a is None or a.target is not t:
            a = _Applied(t)
        try:
            if a.key != key or plan.enforce:  # else a manual switch stands until the next change
                mode = _info(t).get("mode")
                if mode != plan.mode:
                    if a.key == key:
                        log.warning("power: %s: mode %s undone: %s", name, mode, plan.reason)
                    t.set_mode(plan.mode, plan.reason)
                a.key = key
            if a.refuse != plan.refuse:
                t.refuse_writes(plan.refuse)
                a.refuse = plan.refuse
            if limits is not None:
                self._set_limit(name, t, a, limits)
        except Exception:
            log.exception("power: %s: applying the power plan failed", name)
        return a

    def _limits(self, plan, targets):
        """(runtime, safety factor, how many) for the dirty limit, or None to leave limits be."""
        if self.ups is None or plan.state == st.UNKNOWN:
            return None
        return self.machine.runtime, self.config.safety_factor, max(len(targets), 1)

    def _set_limit(self, name, t, a, limits):
        runtime, factor, n = limits
        a.bandwidth = _info(t).get("flush_bandwidth") or a.bandwidth
        if runtime is None:
            limit, why = None, "the UPS does not report battery.runtime"
        elif not a.bandwidth:
            limit, why = None, "no flush bandwidth measured yet"
        else:
            # n rambacks drain in the same battery time, perhaps to the same disk
            limit = int(runtime * a.bandwidth * factor / n)
            why = (f"battery.runtime {runtime:g} s x flush {a.bandwidth / 2**20:.1f} MiB/s"
                   f" x safety_factor {factor:g}" + (f" / {n} rambacks" if n > 1 else ""))
        old = a.limit
        if old is _UNSET or (old is None) != (limit is None) or (limit is not None and abs(limit - old) > 0.01 * old):
            t.set_power_limit(limit, why)
            a.limit = limit
            log.info("power: %s: dirty limit %s (%s)", name, "none" if limit is None else f"{limit} bytes", why)

    # the poller

    def _poll_loop(self):
        interval = self.config.poll_interval
        while not self.stopping.is_set():
            started = self.clock()
            self.queue.put((self._poll(), None))
            self.poll_now.wait(max(0.0, interval - (self.clock() - started)))
            self.poll_now.clear()

    def _poll(self):
        now, wall = self.clock(), self.wall()
        try:
            status, runtime, charge = self.ups.poll()
        except Unreachable as e:
            return st.Observation(st.UNKNOWN, "poll", "unreachable", now, wall, detail=str(e))
        except Exception as e:  # whatever upsd or nut2 did, the poller carries on
            log.exception("power: polling %s failed", self.ups.ident)
            self.ups.close()
            return st.Observation(st.UNKNOWN, "poll", "unreachable", now, wall, detail=f"{type(e).__name__}: {e}")
        state, latch, detail = st.classify(status)
        return st.Observation(state, "poll", status, now, wall, runtime, charge, detail, latch)

    # the drainer

    def _drain_loop(self):
        flushed = None  # the state in which the backing was last flushed clean
        while not self.stopping.is_set():
            self.drain_kick.wait(TICK)
            self.drain_kick.clear()
            with self.lock:
                plan, epoch = self.plan, self.epoch
            if not plan.drain:
                with self.lock:
                    self.clean, self.safe = None, False
                flushed = None
                continue
            targets = rambacks(self.registry)
            started = self.clock()
            clean = _drain(targets, DRAIN_SLICE)
            if clean and flushed != plan.state:
                # new writes may have reached backing since the last flush (writethrough
                # on battery), so flush again when the state changes, before "safe"
                clean = _flush_backing(targets)
                flushed = plan.state if clean else None
            elif not clean:
                flushed = None
            with self.lock:
                if epoch != self.epoch:  # the state changed while we drained: start over
                    flushed = None
                    continue
                safe = clean and plan.state == st.LOW_BATTERY
                was, self.clean, self.safe = self.safe, clean, safe
            if safe and not was:
                log.warning("power: every ramback is clean and its backing flushed: safe to power off")
            if not clean:
                if self.clock() - started < 0.1:
                    self.stopping.wait(0.1)  # a drain that fails at once must not spin
                self.drain_kick.set()


def _info(t):
    try:
        return t.status_info() or {}
    except Exception:
        log.exception("power: %s status_info failed", getattr(t, "name", t))
        return {}


def _drain(targets, timeout):
    """Ask every ramback to drain for up to `timeout` s; True if all are clean."""
    clean = True
    for name, t in targets:
        try:
            done = t.drain(timeout)
        except Exception:
            log.exception("power: %s: drain failed", name)
            done = False
        clean = clean and bool(done) and not _info(t).get("dirty_bytes")
    return clean


def _flush_backing(targets):
    """FLUSH every device the rambacks sit on; True if all succeeded in time."""
    devices = {}
    for _, t in targets:
        for dev in t.iterate_devices():
            devices[id(dev)] = dev
    ok = True
    for dev in devices.values():
        done = threading.Event()
        io = bio.IO(bio.FLUSH, 0, 0, None, 0, lambda _io: done.set())
        try:
            dev.submit(io)
        except Exception:
            log.exception("power: flush of %s failed", getattr(dev, "name", dev))
            ok = False
            continue
        if not done.wait(FLUSH_TIMEOUT) or io.error:
            log.error("power: flush of %s %s", getattr(dev, "name", dev),
                      f"failed (errno {io.error})" if done.is_set() else f"took over {FLUSH_TIMEOUT:g} s")
            ok = False
    return ok
