"""What stop needs besides the run loop: a FLUSH through a device, and progress while devices drain.

Dirty data and drain ETAs are what targets report in status_info() (`dirty_bytes`,
`drain_eta_seconds`: ramback does).
"""

from __future__ import annotations

import logging
import os
import threading

from . import io as bio
from . import sdnotify, size_text

log = logging.getLogger("appliance")


def dirty_bytes(devices):
    """Sum of `dirty_bytes` in the targets' status_info (ramback reports it); None if no target has any."""
    total = None
    for dev in list(devices):
        table = dev.table
        for t in table.targets if table else ():
            try:
                v = t.status_info().get("dirty_bytes")
            except Exception:
                continue
            if isinstance(v, int):
                total = (total or 0) + v
    return total


def drain_eta(devices):
    eta = 0.0
    for dev in list(devices):
        for t in dev.table.targets if dev.table else ():
            try:
                eta = max(eta, t.status_info().get("drain_eta_seconds") or 0.0)
            except Exception:
                continue
    return eta


def announce_stop(devices):
    """Tell the targets that define `daemon_stopping()` that the daemon stops: one that holds I/O
    for a better moment (multipath with no path) must end it now, or stop would wait forever."""
    for dev in list(devices):
        for t in dev.table.targets if dev.table else ():
            hook = getattr(t, "daemon_stopping", None)
            if hook is not None:
                try:
                    hook()
                except Exception:
                    log.exception("%s: %s.daemon_stopping failed", dev.name, t.name)


def flush(dev):
    """A FLUSH through the device's whole stack; waits for it. Errors are logged, not raised."""
    done = threading.Event()
    io = bio.IO(bio.FLUSH, 0, 0, None, 0, lambda io: done.set())
    dev.submit(io)
    done.wait()
    if io.error:
        log.error("%s: flush before close failed: %s", dev.name, os.strerror(io.error))


class StopProgress:
    """While stop drains: STATUS= with what is being drained and how much is dirty, once a second.
    The watchdog is fed here too: during a stop, TimeoutStopSec is the bound, not WatchdogSec."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.now = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stop-progress", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(1.0):
            dirty = dirty_bytes(self.daemon.registry.devices.values())
            left = len(self.daemon.registry.devices)
            text = f"stopping: closing {self.now or '-'} ({left} device{'s' if left != 1 else ''} left"
            text += f", dirty {size_text(dirty)}" if dirty is not None else ""
            eta = drain_eta(self.daemon.registry.devices.values())
            text += f", drain ETA {eta:.0f}s)" if eta else ")"
            sdnotify.notify(f"STATUS={text}", "WATCHDOG=1")

    def stop(self):
        self._done.set()
        self._thread.join()
