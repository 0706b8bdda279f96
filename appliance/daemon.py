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
import shlex
import signal
import ssl
import threading
import time

from . import config as cfg
from ._fast import budget
from . import drain, engine, sdnotify, size_text, udev
from .blockdev import DevicePool
from .control import ControlError, ControlServer
from .device import MappedDevice, Registry
from .nbd.access import AllowedClients
from .nbd.server import Catalog, Server
from .power.monitor import Monitor as PowerMonitor
from .schema import is_loopback
from .table import TableError
from .watchdog import Watchdog

log = logging.getLogger("appliance")


def _warn_insecure(export, port):
    """check-config refuses such a listener unless tls = "require" or insecure = true: say at every start what that means."""
    host = export.tcp[0]
    if not is_loopback(host) and export.tls != "require":
        log.warning("export tcp:%s:%d is INSECURE (insecure = true): plaintext NBD without authentication; "
                    "anyone who reaches it can read and write every export", host, port)


STATUS_PERIOD = 5.0  # seconds between STATUS= refreshes (sent only when the text changed)
BUSY_RETRY = 0.1  # seconds before the run loop tries again an event that found the device lock held
DISK_RETRY = 10.0  # seconds between attempts to reopen a lost disk, besides kernel events
CLIENT_DRAIN = 10.0  # seconds stop waits for connected clients to finish what is in flight


# daemon settings a reload cannot apply: (key, why)
RESTART_ONLY = (
    ("control", "the CLI and upsmon find the daemon there"),
    ("state_dir", "ramback's dirty-data markers of the running devices are there"),
    ("shm_dir", "the running rambacks' RAM stores are there"),
)


READ_ONLY = ("ls", "status", "table")  # control commands that never wait for the daemon's lock
OWN_LOCK = ("resume",)  # ... and those that take only the device's own lock (see the docstring)


class AssemblyError(Exception):
    pass


class Daemon:
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

    # assembly

    def _build(self, dc):
        dev = MappedDevice(
            dc.name,
            self.registry,
            self.pool,
            read_only=dc.read_only,
            description=dc.description,
            direct=dc.direct,
            exclusive=dc.exclusive,
        )
        try:
            dev.load(list(dc.table))
        except TableError as e:
            raise AssemblyError(f"device {dc.name}: table {e}") from None
        dev.resume()
        return dev

    def assemble(self):
        """Build every device, or none: a bad config never half-starts the daemon. A device whose
        disk is not attached (after waiting daemon.disk_timeout for it) waits, with those stacked on it."""
        if self.config.needs_default_image:
            path, size = self.config.needs_default_image
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.truncate(size)
                log.info("created the embedded default's sparse image %s (%d bytes)", path, size)
        self._wait_for_disks()
        built = []
        try:
            for dc in self.config.device_order():
                missing = self._missing(dc)
                if missing:
                    self.waiting[dc.name] = missing
                    log.warning("%s waits for %s", dc.name, ", ".join(missing))
                    continue
                dev = self._build(dc)
                self.registry.add(dev)
                built.append(dev)
        except BaseException:
            for dev in reversed(built):
                self.registry.remove(dev.name)
                dev.remove()
            raise
        self._publish()

    def _missing(self, dc):
        """What a device waits for: its disks that are not attached, and waiting devices it stacks on."""
        return [w for w in udev.disk_words(dc.table) if udev.find(w) is None] + [
            f"@{r}" for r in dc.refs if r in self.waiting
        ]

    def _wait_for_disks(self):
        words = sorted({w for dc in self.config.devices for w in udev.disk_words(dc.table)})

        def progress(missing, left):
            sdnotify.notify(
                f"STATUS=waiting {left:.0f}s more for disk(s): {', '.join(missing)}",
                "WATCHDOG=1",  # alive: there is nothing to probe yet
                f"EXTEND_TIMEOUT_USEC={int((left + 30) * 1e6)}",
            )

        missing = udev.wait_for(words, self.config.daemon.disk_timeout, progress)
        if missing:
            log.warning("still missing after %ss: %s", self.config.daemon.disk_timeout, ", ".join(missing))

    def _attach_waiting(self):
        """Build the waiting devices whose disks are here now. True if any was built."""
        built = False
        for dc in self.config.device_order():
            if dc.name not in self.waiting:
                continue
            missing = self._missing(dc)
            if missing:
                self.waiting[dc.name] = missing
                continue
            try:
                dev = self._build(dc)
            except (AssemblyError, OSError) as e:
                log.error("%s: its disks are here but it cannot be built: %s", dc.name, e)
                self.waiting[dc.name] = [f"(error: {e})"]
                continue
            self.registry.add(dev)
            del self.waiting[dc.name]
            log.info("%s: disks attached; device assembled", dc.name)
            built = True
        if built:
            self._publish()
        return built

    def _publish(self):
        exported = [self.registry.get(d.name) for d in self.config.devices if d.export]
        allowed = {d.name: AllowedClients(d.allowed_clients) for d in self.config.devices if d.allowed_clients}
        self.catalog.set([d for d in exported if d is not None], allowed)

    def _tls(self, export):
        try:
            return Server.tls_for(export)
        except (OSError, ssl.SSLError) as e:
            raise AssemblyError(f"export.tls_certificates: cannot use {export.tls_certificates}: {e}") from None

    def open_listeners(self):
        ex = self.config.export
        self.server.set_export(ex, self._tls(ex))
        self.endpoints = []
        if ex.unix:
            self.server.listen_unix(ex.unix, ex.unix_mode, ex.unix_group)
            self.endpoints.append(("unix", ex.unix))
        if ex.tcp:
            host, port = ex.tcp
            port = self.server.listen_tcp(host, port)
            self.endpoints.append(("tcp", f"{host}:{port}"))
            _warn_insecure(ex, port)

    def connect_hints(self):
        lines = []
        for d in self.config.devices:
            if not d.export:
                continue
            dev = self.registry.get(d.name)
            uris = []
            for kind, where in self.endpoints:
                if kind == "unix":
                    uris.append(f"nbd+unix:///{d.name}?socket={where}")
                else:
                    uris.append(f"nbd://{where}/{d.name}")
            size = "waiting" if dev is None else size_text(dev.size)  # for a disk (udev)
            lines.append(f"  {d.name:<12} {size:>10}  " + "  ".join(uris))
        return lines

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

    # reload: all or nothing

    def reload(self):
        try:
            new = cfg.load_or_default(self.config_arg)
        except cfg.ConfigError as e:
            log.error("reload refused: %s", e)
            self.last_reload = (time.time(), str(e))
            return str(e)
        with self.lock:
            try:
                self.registry.config = new  # tables loaded by this reload see its settings
                self._apply(new)
            except Exception as e:  # whatever it is, the running set stays and the daemon lives
                self.registry.config = self.config
                log.error("reload refused: %s", e)
                self.last_reload = (time.time(), str(e))
                return str(e)
            self._reconfigure_targets()
            self._attach_waiting()
        self.last_reload = (time.time(), None)
        log.info("reloaded %s", new.source)
        return None

    def _reconfigure_targets(self):
        """Targets that read a section of the config (TableContext.settings) define
        `reconfigure()`: the running ones take what a reload changed there."""
        for dev in list(self.registry.devices.values()):
            for t in dev.table.targets if dev.table else ():
                hook = getattr(t, "reconfigure", None)
                if hook is not None:
                    try:
                        hook()
                    except Exception:
                        log.exception("%s: %s.reconfigure failed", dev.name, t.name)

    def _apply(self, new):
        old = {d.name: d for d in self.config.devices}
        fresh = {d.name: d for d in new.devices}
        # a waiting device is not built: a change to it only changes what it waits for
        changed = [d for d in new.device_order() if d.name in old and old[d.name] != d and d.name not in self.waiting]
        added = [d for d in new.device_order() if d.name not in old or d.name in self.waiting]
        removed = [d for d in reversed(self.config.device_order()) if d.name not in fresh]
        retabled = {d.name for d in changed if tuple(old[d.name].table) != tuple(d.table)}
        for d in removed:
            dev = self.registry.get(d.name)
            busy = [h.name for h in (dev.holders if dev else ()) if h.name in fresh and h.name not in retabled]
            if busy:
                raise AssemblyError(f"cannot remove {d.name}: {', '.join(busy)} still stacks on it")
        for d in changed:
            absent = [w for w in udev.disk_words(d.table) if udev.find(w) is None]
            if absent:
                raise AssemblyError(f"device {d.name}: disk {', '.join(absent)} is not attached")
        waiting = {}
        for key, why in RESTART_ONLY:
            if getattr(new.daemon, key) != getattr(self.config.daemon, key):
                raise AssemblyError(f"daemon.{key} cannot change on reload ({why}); "
                                    f"restart the daemon to apply it, or put back {getattr(self.config.daemon, key)!r}")
        # bind the new listeners and load every changed table first: any error leaves the
        # running set, its listeners and its config untouched
        tls = self._tls(new.export)  # renewed certificates; unusable ones refuse the reload
        bound, dropped, endpoints = self._bind(new.export)
        loaded = []
        created = []
        power = None
        try:
            for d in added:
                missing = [w for w in udev.disk_words(d.table) if udev.find(w) is None]
                missing += [f"@{r}" for r in d.refs if r in waiting]
                if missing:
                    waiting[d.name] = missing
                    continue
                dev = self._build(d)
                self.registry.add(dev)
                created.append(dev)
            for d in changed:
                dev = self.registry.get(d.name)
                # read_only too: a read_only device's files are open read-only
                if d.name in retabled or (old[d.name].direct, old[d.name].exclusive, old[d.name].read_only) != (
                    d.direct, d.exclusive, d.read_only
                ):
                    before = dev.direct, dev.exclusive
                    dev.direct, dev.exclusive = d.direct, d.exclusive
                    try:
                        dev.load(list(d.table), read_only=d.read_only)
                    except TableError as e:
                        dev.direct, dev.exclusive = before
                        raise AssemblyError(f"device {d.name}: table {e}") from None
                    loaded.append((dev, before))
            if new.power != self.config.power:
                power = PowerMonitor(new.power, self.registry)
        except BaseException:
            for dev, before in loaded:
                dev.clear()
                dev.direct, dev.exclusive = before
            for dev in reversed(created):
                self.registry.remove(dev.name)
                dev.remove()
            for name in bound:
                self.server.close_listener(name)
            raise
        # commit: suspend, swap, resume each changed device; clients stay connected
        for dev, _ in loaded:
            dev.suspend()
            dev.resume()
        for d in changed:
            dev = self.registry.get(d.name)
            dev.read_only, dev.description = d.read_only, d.description
            # what a client negotiated no longer holds: it must reconnect to learn it
            if d.read_only and not old[d.name].read_only:
                self.server.disconnect(d.name, "device made read-only by reload")
            if old[d.name].export and not d.export:
                self.server.disconnect(d.name, "device no longer exported")
        for d in removed:
            self.waiting.pop(d.name, None)
            self.server.disconnect(d.name, "device removed by reload")
            dev = self.registry.remove(d.name)
            if dev is not None:
                dev.resume()
                dev.remove()
                # a request its client sent before the disconnect may have reached the gate after
                # remove() closed it: answer it (no table: ENXIO) so the connection can end
                for io in dev.gate.open():
                    dev.submit(io)
        for name in [n for n in self.waiting if n in fresh and n not in waiting]:
            waiting[name] = self.waiting[name]  # re-checked by _attach_waiting
        self.waiting = waiting
        if power is not None:
            self.power.stop()
            self.power = self.registry.power = power
            self.power.start()
        for name in dropped:
            self.server.close_listener(name)
        self.server.set_export(new.export, tls)  # limits and certificates for new connections
        self.endpoints = endpoints
        self.config = new
        self._publish()
        self.server.disconnect_unallowed()  # allowed_clients may have shrunk

    def _bind(self, export):
        """Listen where `export` adds a listener, keeping those it keeps. -> (names bound now,
        names to close on commit, the endpoints after it). Raises with nothing new left bound."""
        old = self.config.export
        kept = dict(self.endpoints)
        bound, endpoints, where = [], [], None
        try:
            if export.unix:
                where = export.unix
                if export.unix != old.unix:
                    self.server.listen_unix(export.unix, export.unix_mode, export.unix_group)
                    bound.append(f"unix:{export.unix}")
                elif (export.unix_mode, export.unix_group) != (old.unix_mode, old.unix_group):
                    if export.unix_group is not None:
                        os.chown(export.unix, -1, export.unix_group)
                    os.chmod(export.unix, export.unix_mode)
                endpoints.append(("unix", export.unix))
            if export.tcp:
                host, port = export.tcp
                if export.tcp != old.tcp:
                    where = f"{host}:{port}"
                    port = self.server.listen_tcp(host, port)
                    _warn_insecure(export, port)
                    bound.append(f"tcp:{host}:{port}")
                    endpoints.append(("tcp", f"{host}:{port}"))
                else:
                    endpoints.append(("tcp", kept["tcp"]))
        except OSError as e:
            for name in bound:
                self.server.close_listener(name)
            raise AssemblyError(f"cannot listen on {where}: {e.strerror or e}; the listeners stay as they were") from None
        dropped = [f"{k}:{w}" for k, w in self.endpoints if (k, w) not in endpoints]
        return bound, dropped, endpoints

    # control requests

    def handle(self, req):
        """A control request, from a control connection's thread."""
        cmd = req["cmd"]
        fn = getattr(self, f"cmd_{cmd.replace('-', '_')}", None)
        if fn is None and cmd not in ("reload", "stop"):  # those two go through the run loop
            raise ControlError(f"unknown command {cmd!r}")
        if cmd in ("reload", "stop"):
            reply = queue.Queue()
            self.events.put((cmd, reply))
            error = reply.get()
            if error:
                raise ControlError(f"reload refused: {error}")
            return {}
        if cmd.startswith("power") or cmd in READ_ONLY or cmd in OWN_LOCK:  # UPS events never wait behind a reload
            return fn(req)
        with self.lock:
            return fn(req)

    def _device(self, req):
        name = req.get("name")
        dev = self.registry.get(name)
        if dev is None:
            why = f"{name} waits for {' '.join(self.waiting[name])}" if name in self.waiting else f"no device named {name!r}"
            raise ControlError(f"{why}; devices: {', '.join(self.registry.devices) or 'none'}")
        return dev

    def cmd_ls(self, req):
        return {"devices": [{"name": n, "size": d.size, "exported": n in self.catalog.names()} for n, d in self.registry.devices.items()]}

    def cmd_status(self, req):
        name = req.get("name")
        if name and name not in self.waiting:
            self._device(req)  # an unknown name is an error; a waiting device is in daemon.waiting
        names = [name] if name else list(self.registry.devices)
        devices = []
        for n in names:
            dev = self.registry.get(n)
            if dev is None:  # waiting, or removed by a reload since we listed it
                continue
            st = dev.status()
            st["exported"] = n in self.catalog.names()
            st["clients"] = len(self.server.clients(n))
            st["lines"] = dev.status_lines()
            st["table_differs_from_config"] = self._table_differs(n, dev)
            devices.append(st)
        return {
            "daemon": {
                "pid": os.getpid(),
                "config": self.config.source,
                "uptime": round(time.time() - self.started, 1),
                "exports": [f"{k}:{w}" for k, w in self.endpoints],
                "insecure_exports": self.status_insecure(),
                "buffer_memory": budget.stats(),
                "last_reload": self.last_reload and {"time": self.last_reload[0], "error": self.last_reload[1]},
                "summary": self.summary(),
                "waiting": dict(self.waiting),
                "lost_disks": self.disks.status(),
                "watchdog_pings": self.watchdog.pings if self.watchdog else None,
                "io_engine": engine.get().kind,
            },
            "devices": devices,
            "power": self.power.snapshot(),
        }

    def _table_differs(self, name, dev):
        """A target's message changed the live table (a layer pushed): a restart loads the config's."""
        dc = next((d for d in self.config.devices if d.name == name), None)
        if dc is None:
            return False
        words = lambda lines: [w for w in (shlex.split(line, comments=True) for line in lines) if w]  # noqa: E731
        return words(dev.table_lines()) != words(dc.table)

    def cmd_table(self, req):
        return {"table": self._device(req).table_lines()}

    def cmd_message(self, req):
        dev = self._device(req)
        try:
            out = dev.message(int(req.get("sector", 0)), list(req.get("words", [])))
        except ValueError as e:
            raise ControlError(str(e)) from None
        self.power.manual_mode(dev.name, list(req.get("words", [])))
        return {"result": out or ""}

    def cmd_suspend(self, req):
        self._device(req).suspend(noflush=bool(req.get("noflush")))
        return {}

    def cmd_resume(self, req):
        self._device(req).resume()
        return {}

    def cmd_load(self, req):
        dev = self._device(req)
        try:
            dev.load(list(req.get("table", [])))
        except TableError as e:
            raise ControlError(f"{dev.name}: table {e}") from None
        return {}

    def cmd_clear(self, req):
        self._device(req).clear()
        return {}

    def cmd_power(self, req):
        """A UPS event from upsmon's NOTIFYCMD (`appliance power EVENT`)."""
        return self.power.push(str(req.get("event", "")), ups=req.get("ups"), message=req.get("message"))

    def cmd_power_wait_clean(self, req):
        try:
            seconds = float(req.get("seconds", 60))
        except (TypeError, ValueError):
            raise ControlError("power-wait-clean: seconds must be a number") from None
        return self.power.wait_clean(seconds)

    def status_insecure(self):
        """The TCP listeners other machines can reach that serve plaintext (allowed by insecure = true)."""
        if self.config.export.tls == "require":
            return []
        return [f"tcp:{w}" for k, w in self.endpoints if k == "tcp" and not is_loopback(w.rpartition(":")[0])]

    def summary(self):
        """One line for STATUS=: devices, exports, clients, power, dirty data, what waits for a disk."""
        n = len(self.registry.devices)
        parts = [f"{n} device{'s' if n != 1 else ''}"]
        clients = len(self.server.clients())
        insecure = " (INSECURE: plaintext TCP other machines can reach)" if self.status_insecure() else ""
        parts.append(f"exports {', '.join(f'{k}:{w}' for k, w in self.endpoints) or 'none'}{insecure}, {clients} client{'s' if clients != 1 else ''}")
        buffers = budget.stats()
        parts.append(f"buffers {size_text(buffers['used'])} of {size_text(buffers['limit'])}")
        if self.config.power is not None and getattr(self, "power", None) is not None:
            try:
                p = self.power.snapshot()
                parts.append(f"power {p['state']} ({p['mode']})")
            except Exception:
                log.exception("power snapshot failed")
        dirty = drain.dirty_bytes(self.registry.devices.values())
        if dirty is not None:
            parts.append(f"dirty {size_text(dirty)}")
        if self.waiting:
            parts.append("waiting: " + ", ".join(f"{name} for {' '.join(w)}" for name, w in sorted(self.waiting.items())))
        for lost in self.disks.status():
            parts.append(f"disk {lost['disk']} {lost['state']}")
        if self.last_reload and self.last_reload[1]:
            parts.append(f"last reload refused: {self.last_reload[1]}")
        return "; ".join(parts)

