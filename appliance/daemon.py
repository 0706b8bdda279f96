"""The daemon: assemble the configured devices, export them, and run one loop
that acts on signals and on control requests that change the whole set
(reload, stop). Signal handlers only queue an event (Patroni's shape).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time

from . import config as cfg
from . import sdnotify
from .blockdev import DevicePool
from .control import ControlError, ControlServer
from .device import MappedDevice, Registry
from .nbd.server import Catalog, Server
from .table import TableError

log = logging.getLogger("appliance")


class AssemblyError(Exception):
    pass


class Daemon:
    def __init__(self, config, config_arg=None):
        self.config = config
        self.config_arg = config_arg
        self.pool = DevicePool()
        self.registry = Registry()
        self.catalog = Catalog()
        self.server = Server(self.catalog)
        self.control = None
        self.events = queue.Queue()
        self.lock = threading.RLock()  # one control operation at a time
        self.started = time.time()
        self.last_reload = None  # (time, error or None)
        self.stopping = False
        self.endpoints = []

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
        """Build every device, or none: a bad config never half-starts the daemon."""
        if self.config.needs_default_image:
            path, size = self.config.needs_default_image
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.truncate(size)
                log.info("created the embedded default's sparse image %s (%d bytes)", path, size)
        built = []
        try:
            for dc in self.config.device_order():
                dev = self._build(dc)
                self.registry.add(dev)
                built.append(dev)
        except BaseException:
            for dev in reversed(built):
                self.registry.remove(dev.name)
                dev.remove()
            raise
        self._publish()

    def _publish(self):
        exported = [self.registry.get(d.name) for d in self.config.devices if d.export]
        self.catalog.set([d for d in exported if d is not None])

    def open_listeners(self):
        ex = self.config.export
        self.endpoints = []
        if ex.unix:
            self.server.listen_unix(ex.unix)
            self.endpoints.append(("unix", ex.unix))
        if ex.tcp:
            host, port = ex.tcp
            port = self.server.listen_tcp(host, port)
            self.endpoints.append(("tcp", f"{host}:{port}"))

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
            lines.append(f"  {d.name:<12} {_size(dev.size):>10}  " + "  ".join(uris))
        return lines

    # the loop

    def run(self, *, on_ready=None):
        for sig, event in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
            signal.signal(sig, lambda *_a, e=event: self.events.put((e, None)))
        self.assemble()
        try:
            self.control = ControlServer(self.config.daemon.control, self.handle)
            self.control.start()
            self.open_listeners()
        except BaseException:
            self.teardown()
            raise
        log.info("serving %d device(s) from %s", len(self.config.devices), self.config.source)
        if on_ready:
            on_ready(self)
        sdnotify.notify("READY=1", f"STATUS={self.summary()}")
        while True:
            event, reply = self.events.get()
            if event == "stop":
                self.stopping = True
                sdnotify.notify("STOPPING=1", "STATUS=stopping: draining devices")
                self.teardown()
                if reply:
                    reply.put(None)
                return 0
            if event == "reload":
                sdnotify.notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}")
                error = self.reload()
                sdnotify.notify("READY=1", f"STATUS={self.summary()}")
                if reply:
                    reply.put(error)

    def teardown(self):
        self.server.stop("daemon stopping")
        if self.control:
            self.control.stop()
        for dc in reversed(self.config.device_order()):
            dev = self.registry.remove(dc.name)
            if dev is not None:
                try:
                    dev.resume()  # let deferred I/O finish before the drain
                    dev.remove()
                except Exception:
                    log.exception("%s: teardown failed", dc.name)
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
                self._apply(new)
            except (AssemblyError, TableError, OSError) as e:
                log.error("reload refused: %s", e)
                self.last_reload = (time.time(), str(e))
                return str(e)
        self.last_reload = (time.time(), None)
        log.info("reloaded %s", new.source)
        return None

    def _apply(self, new):
        old = {d.name: d for d in self.config.devices}
        fresh = {d.name: d for d in new.devices}
        changed = [d for d in new.device_order() if d.name in old and old[d.name] != d]
        added = [d for d in new.device_order() if d.name not in old]
        removed = [d for d in reversed(self.config.device_order()) if d.name not in fresh]
        for d in removed:
            dev = self.registry.get(d.name)
            busy = [h.name for h in dev.holders if h.name in fresh]
            if busy:
                raise AssemblyError(f"cannot remove {d.name}: {', '.join(busy)} still stacks on it")
        if new.daemon.control != self.config.daemon.control:
            raise AssemblyError("daemon.control cannot change on reload; restart the daemon")
        # load every changed table first: any error leaves the running set untouched
        loaded = []
        created = []
        try:
            for d in added:
                dev = self._build(d)
                self.registry.add(dev)
                created.append(dev)
            for d in changed:
                dev = self.registry.get(d.name)
                if tuple(old[d.name].table) != tuple(d.table) or (old[d.name].direct, old[d.name].exclusive) != (d.direct, d.exclusive):
                    dev.direct, dev.exclusive = d.direct, d.exclusive
                    try:
                        dev.load(list(d.table))
                    except TableError as e:
                        raise AssemblyError(f"device {d.name}: table {e}") from None
                    loaded.append(dev)
        except BaseException:
            for dev in loaded:
                dev.clear()
            for dev in reversed(created):
                self.registry.remove(dev.name)
                dev.remove()
            raise
        # commit: suspend, swap, resume each changed device; clients stay connected
        for dev in loaded:
            dev.suspend()
            dev.resume()
        for d in changed:
            dev = self.registry.get(d.name)
            dev.read_only, dev.description = d.read_only, d.description
        for d in removed:
            self.server.disconnect(d.name, "device removed by reload")
            dev = self.registry.remove(d.name)
            dev.resume()
            dev.remove()
        listeners_changed = new.export != self.config.export
        self.config = new
        self._publish()
        if listeners_changed:
            self.server.stop_listening()
            self.server = _rebind(self.server, self.catalog)
            self.open_listeners()

    # control requests

    def handle(self, req):
        cmd = req["cmd"]
        fn = getattr(self, f"cmd_{cmd.replace('-', '_')}", None)
        if fn is None:
            raise ControlError(f"unknown command {cmd!r}")
        if cmd in ("reload", "stop"):
            reply = queue.Queue()
            self.events.put((cmd, reply))
            error = reply.get()
            if error:
                raise ControlError(f"reload refused: {error}")
            return {}
        with self.lock:
            return fn(req)

    def _device(self, req):
        name = req.get("name")
        dev = self.registry.get(name)
        if dev is None:
            raise ControlError(f"no device named {name!r}; devices: {', '.join(self.registry.devices) or 'none'}")
        return dev

    def cmd_ls(self, req):
        return {"devices": [{"name": n, "size": d.size, "exported": n in self.catalog.names()} for n, d in self.registry.devices.items()]}

    def cmd_status(self, req):
        names = [req["name"]] if req.get("name") else list(self.registry.devices)
        devices = []
        for n in names:
            dev = self._device({"name": n})
            st = dev.status()
            st["exported"] = n in self.catalog.names()
            st["clients"] = len(self.server.clients(n))
            st["lines"] = dev.status_lines()
            devices.append(st)
        return {
            "daemon": {
                "pid": os.getpid(),
                "config": self.config.source,
                "uptime": round(time.time() - self.started, 1),
                "exports": [f"{k}:{w}" for k, w in self.endpoints],
                "last_reload": self.last_reload and {"time": self.last_reload[0], "error": self.last_reload[1]},
            },
            "devices": devices,
        }

    def cmd_table(self, req):
        return {"table": self._device(req).table_lines()}

    def cmd_message(self, req):
        dev = self._device(req)
        try:
            out = dev.message(int(req.get("sector", 0)), list(req.get("words", [])))
        except ValueError as e:
            raise ControlError(str(e)) from None
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

    def summary(self):
        n = len(self.registry.devices)
        return f"{n} device{'s' if n != 1 else ''}, exports {', '.join(f'{k}:{w}' for k, w in self.endpoints) or 'none'}"


def _rebind(server, catalog):
    """A new Server for new listeners; connected sessions stay with the old one."""
    new = Server(catalog)
    new.sessions = server.sessions
    new._lock = server._lock
    return new


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
