"""The core's request path in-process: split and join, retry on another device, requeue.

Test targets are registered from here (targets.register) and sit in a real
MappedDevice over real files; only the target is the test's own.
"""

from __future__ import annotations

import errno
import threading
import time
import types

import pytest

from appliance import device as core
from appliance import io as bio
from appliance.blockdev import DevicePool
from appliance.device import MappedDevice, Registry
from appliance.targets import Target, register


def mapped(name, *lines, registry=None, pool=None, **kw):
    dev = MappedDevice(name, registry or Registry(), pool or DevicePool(), **kw)
    dev.registry.add(dev)
    dev.load(list(lines))
    dev.resume()
    return dev


def wait_io(dev, op, offset, length, buf=None, flags=0, timeout=10):
    done = threading.Event()
    io = bio.IO(op, offset, length, buf, flags, lambda _io: done.set())
    dev.submit(io)
    assert done.wait(timeout), f"{io} did not complete"
    return io


class Released(Target):
    """Completes every clone from its own thread once the test opens `gate`, with `result`."""

    gate = None
    result = 0

    def map(self, clone):
        def finish():
            self.gate.wait()
            clone.complete(self.result)

        threading.Thread(target=finish, daemon=True).start()
        return bio.SUBMITTED


class ReleasedOk(Released):
    result = 0


class ReleasedEio(Released):
    result = errno.EIO


class _SlowRelease:
    """A lock that lets other threads run right after it is released: the window in which a
    piece that is not the last one still holds its error, made wide instead of rare."""

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, *a):
        return self._lock.acquire(*a)

    def release(self):
        self._lock.release()
        time.sleep(0.02)

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def test_two_pieces_completing_at_once_report_the_failed_one(monkeypatch):
    register("released_ok", ReleasedOk)
    register("released_eio", ReleasedEio)
    dev = mapped("split", "0 8 released_ok", "8 8 released_eio")
    slow = types.SimpleNamespace(**vars(threading))
    slow.Lock = _SlowRelease
    monkeypatch.setattr(core, "threading", slow)
    for _ in range(5):
        ReleasedOk.gate = ReleasedEio.gate = threading.Barrier(2)
        io = wait_io(dev, bio.WRITE, 0, 8192, bytes(8192))
        assert io.error == errno.EIO
