"""Reload (SIGHUP, `appliance reload`, `systemctl reload`): re-read the config and apply what
changed, all or nothing. Mixed into the Daemon (appliance/daemon.py), whose run loop calls it."""

from __future__ import annotations

import logging
import os
import time

from . import config as cfg
from . import udev
from .assembly import AssemblyError, warn_insecure
from .power.monitor import Monitor as PowerMonitor
from .table import TableError

log = logging.getLogger("appliance")


# daemon settings a reload cannot apply: (key, why)
RESTART_ONLY = (
    ("control", "the CLI and upsmon find the daemon there"),
    ("state_dir", "ramback's dirty-data markers of the running devices are there"),
    ("shm_dir", "the running rambacks' RAM stores are there"),
)


class Reload:
    """Mixed into Daemon: needs config, config_arg, lock, registry, server, power, waiting,
    endpoints, last_reload, and Assembly's _build, _attach_waiting, _publish, _tls."""

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
        # commit: suspend, swap, resume each changed device; clients stay connected. noflush, as
        # multipathd reloads: I/O a target holds (multipath with no path) is not failed but
        # mapped again on the new table
        was_writable = {name: dev.writable for name, dev in self.registry.devices.items()}
        for dev, _ in loaded:
            if dev.suspended:
                # suspended by the administrator: as dm's reload, the table waits in the inactive
                # slot (with its read_only) and goes live at `appliance resume`
                log.info("%s is suspended: its new table goes live when it is resumed", dev.name)
                continue
            dev.suspend(noflush=True)
            dev.resume()  # read_only comes with the table
        for d in changed:
            dev = self.registry.get(d.name)
            dev.description = d.description
            if old[d.name].export and not d.export:
                self.server.disconnect(d.name, "device no longer exported")
        self._disconnect_made_read_only(was_writable, "reload")
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

    def _disconnect_made_read_only(self, was_writable, by):
        """What a client negotiated no longer holds: it must reconnect to learn it. A device
        stacked on one made read_only is read-only too, though its own table did not change."""
        for name, dev in list(self.registry.devices.items()):
            if was_writable.get(name) and not dev.writable:
                self.server.disconnect(name, f"device made read-only by {by}")

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
                    warn_insecure(export, port)
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
