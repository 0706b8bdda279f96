"""Control requests: what each `appliance` command asks of the running daemon (`cmd_*`), and
the status it reports. Mixed into the Daemon (appliance/daemon.py); they arrive on the
control socket's threads (appliance/control.py)."""

from __future__ import annotations

import logging
import os
import queue
import shlex
import time

from . import drain, engine, size_text
from ._fast import budget
from .control import ControlError
from .schema import is_loopback
from .table import TableError

log = logging.getLogger("appliance")

READ_ONLY = ("ls", "status", "table")  # control commands that never wait for the daemon's lock
OWN_LOCK = ("resume",)  # ... and those that take only the device's own lock (see daemon.py's docstring)


class Commands:
    """Mixed into Daemon: needs config, lock, events, registry, catalog, server, power, disks,
    watchdog, waiting, endpoints, started, last_reload."""

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
                "io_polling": dict(engine.poll_stats(), max_us=self.config.export.poll_max_us),
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
        dev = self._device(req)
        was_writable = {name: d.writable for name, d in list(self.registry.devices.items())}
        dev.resume()  # a table loaded read_only (by a reload while suspended) goes live here
        self._disconnect_made_read_only(was_writable, "resume")
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
