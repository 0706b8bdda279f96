"""The systemd watchdog, fed only while the data path answers.

A timer that pings regardless would keep a wedged daemon alive. Instead the
run loop starts a probe round every quarter of WatchdogSec: a small read
through each live device's request path (the same gate, target map and
backing device an NBD request takes), done by a probe thread. The loop sends
WATCHDOG=1 only when the previous round has finished, so a stuck gate, target
or disk (and a stuck run loop) stops the pings and systemd restarts the
service. A read that fails still counts as an answer: a failed disk is
reported in status, it does not wedge anything.

A device held by a suspend (its own or one below it in the stack) is skipped
from the moment the suspend begins: a suspend is an administrator's choice,
not a wedge, even while it waits for slow I/O in flight to finish.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time

from . import io as bio
from . import sdnotify

log = logging.getLogger(__name__)

PROBE_BYTES = 4096
STRIDE = 7919 * PROBE_BYTES  # rotate the probed block so it is not always cached


def held(dev, _depth=0):
    """True if I/O to `dev` waits on a suspend (its own or one below it). The gate closes when a
    suspend begins; `dev.suspended` turns true only once I/O in flight has finished, which may take
    as long as the slowest request below, so the gate is what says a suspend holds the device."""
    if dev.gate.is_suspended or _depth > 32:
        return dev.gate.is_suspended
    table = getattr(dev, "table", None)
    if table is None:
        return False
    for t in table.targets:
        for below in t.iterate_devices():
            if hasattr(below, "gate") and held(below, _depth + 1):
                return True
    return False


class Probe:
    """One round: a read from every live device, waited for in its own thread."""

    def __init__(self, devices, serial):
        self.devices = devices
        self.serial = serial
        self.done = threading.Event()
        self.started = time.monotonic()
        self.waiting_on = None  # name of the device the round is waiting for
        threading.Thread(target=self._run, name="watchdog-probe", daemon=True).start()

    def _run(self):
        try:
            for dev in self.devices:
                self._read(dev)
        except Exception:
            log.exception("watchdog probe failed")
        finally:
            self.waiting_on = None
            self.done.set()

    def _read(self, dev):
        size = dev.size
        if dev.table is None or size == 0 or held(dev):
            return
        n = min(PROBE_BYTES, size)
        offset = (self.serial * STRIDE) % (size - n + 1) // PROBE_BYTES * PROBE_BYTES
        buf = mmap.mmap(-1, PROBE_BYTES)  # page aligned, for O_DIRECT backing devices
        answered = threading.Event()
        self.waiting_on = dev.name
        dev.submit(bio.IO(bio.READ, offset, n, memoryview(buf)[:n], 0, lambda io: answered.set()))
        while not answered.wait(0.05):
            if held(dev):  # suspended after we got in line: the probe waits for the resume, we do not
                return


class Watchdog:
    """Fed by the run loop: `timeout()` says how long the loop may sleep, `tick()` acts."""

    def __init__(self, interval, devices):
        self.interval = interval
        self.period = interval / 4
        self.devices = devices  # callable: the mapped devices to probe
        self.round = None
        self.serial = 0
        self.next = time.monotonic()
        self.pings = 0
        self.stalled_logged = False

    def timeout(self):
        return max(0.0, self.next - time.monotonic())

    def tick(self):
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.period
        r = self.round
        if r is not None and not r.done.is_set():
            age = now - r.started
            if age > self.interval / 2 and not self.stalled_logged:
                log.error(
                    "data path not answering: a probe read of %s has waited %.1fs; withholding the watchdog ping",
                    r.waiting_on or "a device",
                    age,
                )
                self.stalled_logged = True
            return
        # the last round answered (the first ping needs none: assembly just did I/O)
        if self.stalled_logged:
            log.warning("data path answers again; watchdog pings resume")
            self.stalled_logged = False
        sdnotify.notify("WATCHDOG=1")
        self.pings += 1
        self.serial += 1
        self.round = Probe(list(self.devices()), self.serial)
