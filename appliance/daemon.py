"""The daemon: assemble the configured devices, export them, and run one loop
that acts on signals and on control requests that change the whole set
(reload, stop). Signal handlers only queue an event (Patroni's shape).

Whatever changes devices (a control command, a reload, a kernel disk event)
holds `Daemon.lock`, so no two of them interleave; what only reads (status,
ls, table) does not wait for it, and neither does `resume`: it takes only the
device's own control lock, as dm locks each device, so resuming a lower device
releases a suspend or reload of one above it that waits for I/O held below. The run loop never blocks on it for a disk
event (the event waits for the next turn), so the watchdog is fed while a long
suspend holds it. The power monitor acts on a device's rambacks holding that
device's own control lock, which every table change (suspend, load, resume)
holds as well, so a plan never lands on a table being swapped out.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time

from . import drain, sdnotify, udev
from .assembly import Assembly
from .blockdev import DevicePool
from .commands import Commands
from .control import ControlServer
from .device import Registry
from .nbd.server import Catalog, Server
from .power.monitor import Monitor as PowerMonitor
from .reload import Reload
from .watchdog import Watchdog

log = logging.getLogger("appliance")


STATUS_PERIOD = 5.0  # seconds between STATUS= refreshes (sent only when the text changed)
BUSY_RETRY = 0.1  # seconds before the run loop tries again an event that found the device lock held
DISK_RETRY = 10.0  # seconds between attempts to reopen a lost disk, besides kernel events
CLIENT_DRAIN = 10.0  # seconds stop waits for connected clients to finish what is in flight


class Daemon(Assembly, Reload, Commands):
    """Assembly (appliance/assembly.py), reload (reload.py) and control commands (commands.py)
    are mixed in; here: the state they share, the run loop and teardown."""

    def __init__(self, config, config_arg=None):
        self.config = config
        self.config_arg = config_arg
        self.pool = DevicePool(resolve=udev.resolve)
        self.registry = Registry()
        self.lock = threading.RLock()  # changes to devices (see the module's docstring)
        self.power = self.registry.power = PowerMonitor(config.power, self.registry)
        self.registry.daemon_config = config.daemon  # state_dir, shm_dir: ramback's store and marker
        self.registry.config = config  # the sections targets read ([multipath])
        self.catalog = Catalog()
        self.server = Server(self.catalog, config.export)
        self.control = None
        # SimpleQueue: its put() may be called from a signal handler (a Queue's may deadlock there)
        self.events = queue.SimpleQueue()
        self.pending = []  # disk events that found the device lock held: retried by the loop
        self.started = time.time()
        self.last_reload = None  # (time, error or None)
        self.stopping = False
        self.endpoints = []
        self.waiting = {}  # device name -> the disks (or @devices) it waits for
        self.disks = udev.Disks(self.pool, self.registry)
        self.monitor = None  # udev.Monitor: kernel block events -> ("disk", event)
        self.watchdog = None
        self._status_sent = None

    # the loop

    def run(self, *, on_ready=None):
        for sig, event in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
            signal.signal(sig, lambda *_a, e=event: self.events.put((e, None)))
        self.assemble()
        try:
            self.control = ControlServer(self.config.daemon.control, self.handle)
            self.control.start()
            self.power.start()
            self.open_listeners()
        except BaseException:
            self.teardown()
            raise
        try:
            self.monitor = udev.Monitor(lambda *event: self.events.put(("disk", event)))
        except Exception as e:
            log.warning("cannot watch kernel block events (%s): lost disks are noticed by their I/O errors only", e)
        interval = sdnotify.watchdog_interval()
        if interval:
            self.watchdog = Watchdog(interval, lambda: list(self.registry.devices.values()))
        log.info("serving %d device(s) from %s", len(self.registry.devices), self.config.source)
        if on_ready:
            on_ready(self)
        # every device is assembled and every listener accepts: only now READY
        self._status_sent = self.summary()
        sdnotify.notify("READY=1", f"STATUS={self._status_sent}")
        next_status = next_retry = time.monotonic()
        while True:
            now = time.monotonic()
            timeout = min(next_status, next_retry) - now
            if self.pending:
                timeout = min(timeout, BUSY_RETRY)
            if self.watchdog:
                self.watchdog.tick()
                timeout = min(timeout, self.watchdog.timeout())
            try:
                event, arg = self.events.get(timeout=max(0.0, timeout))
            except queue.Empty:
                event, arg = None, None
            now = time.monotonic()
            if self.pending and self._disk_events():
                next_status = now
            if event == "stop":
                self.stopping = True
                sdnotify.notify("STOPPING=1", "STATUS=stopping: closing exports, draining devices")
                self.teardown()
                sdnotify.notify("STATUS=stopped: every device drained and closed")
                if arg:
                    arg.put(None)
                return 0
            if event == "reload":
                sdnotify.notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")
                error = self.reload()
                self._status_sent = self.summary()
                sdnotify.notify("READY=1", f"STATUS={self._status_sent}")
                if arg:
                    arg.put(error)
            elif event == "disk":
                self.pending.append(arg)
                if self._disk_events():
                    next_status = now
            if now >= next_retry:
                next_retry = now + DISK_RETRY
                if (self.disks.lost or self.waiting) and self.lock.acquire(blocking=False):
                    try:
                        if self.disks.retry() | self._attach_waiting():
                            next_status = now
                    finally:
                        self.lock.release()
                elif self.disks.lost or self.waiting:
                    next_retry = now + BUSY_RETRY  # a control command holds the devices: soon again
            if now >= next_status:
                next_status = now + STATUS_PERIOD
                text = self.summary()
                if text != self._status_sent:
                    self._status_sent = text
                    sdnotify.notify(f"STATUS={text}")

    def _disk_events(self):
        """Act on the kernel events taken so far, unless the device lock is held (then they wait
        for the next turn of the loop). True if a device changed."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            events, self.pending = self.pending, []
            changed = False
            for arg in events:
                changed |= self.disks.event(*arg)
            return changed | self._attach_waiting()
        finally:
            self.lock.release()

    def teardown(self):
        """Stop accepting clients; let connected ones get answers for what is in flight; then,
        top-down, flush each device and remove it (a ramback's dtr drains it to backing), which
        closes and fsyncs its backing devices. Progress goes to STATUS= while it runs."""
        self.power.stop()
        if self.monitor:
            self.monitor.stop()
        drain.announce_stop(self.registry.devices.values())  # before clients drain: nothing may wait for a path
        self.server.stop("daemon stopping")
        # every device resumed first, bottom-up: I/O held by a suspended device finishes, and no
        # flush of a device stacked on it waits below for a resume that would come only after it
        for dc in self.config.device_order():
            dev = self.registry.get(dc.name)
            if dev is not None:
                try:
                    dev.resume()
                except Exception:
                    log.exception("%s: resume before teardown failed", dc.name)
        deadline = time.monotonic() + CLIENT_DRAIN
        while self.server.clients() and time.monotonic() < deadline:
            time.sleep(0.05)
        progress = drain.StopProgress(self)
        try:
            for dc in reversed(self.config.device_order()):
                dev = self.registry.get(dc.name)
                if dev is None:
                    continue
                progress.now = dc.name
                try:
                    drain.flush(dev)
                    dev.remove()
                except Exception:
                    log.exception("%s: teardown failed", dc.name)
                self.registry.remove(dc.name)
            for fdev in self.pool.devices():  # none, unless a target leaked one
                try:
                    os.fsync(fdev.fd)
                except OSError:
                    pass
        finally:
            progress.stop()
        if self.control:
            self.control.stop()
        log.info("stopped")
