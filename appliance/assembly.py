"""Assembly: build the configured devices bottom-up (all or none at start), wait for the disks
that are not attached yet and build what waits on them when they come, and open the NBD
listeners. Mixed into the Daemon (appliance/daemon.py)."""

from __future__ import annotations

import logging
import os
import ssl

from . import sdnotify, size_text, udev
from .device import MappedDevice
from .nbd.server import Server
from .schema import is_loopback
from .table import TableError

log = logging.getLogger("appliance")


def warn_insecure(export, port):
    """check-config refuses such a listener unless tls = "require" or insecure = true: say at every start what that means."""
    host = export.tcp[0]
    if not is_loopback(host) and export.tls != "require":
        log.warning("export tcp:%s:%d is INSECURE (insecure = true): plaintext NBD without authentication; "
                    "anyone who reaches it can read and write every export", host, port)


class AssemblyError(Exception):
    pass


class Assembly:
    """Mixed into Daemon: needs config, registry, pool, catalog, server, waiting, endpoints."""

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
        self.catalog.set([d for d in exported if d is not None])

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
            warn_insecure(ex, port)

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
