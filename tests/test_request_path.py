"""The core's request path in-process: split and join, retry on another device, requeue.

Test targets are registered from here (targets.register) and sit in a real
MappedDevice over real files; only the target is the test's own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import types

import pytest

from appliance import request_path as core
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


class Failover(Target):
    """failover <dev> <dev>: every write goes to the first device, and on a path error is
    retried on the second (multipath's shape, reduced to what the core must support)."""

    def ctr(self, args):
        self.paths = [self.get_device(w) for w in args]
        self.start = 8192  # both devices hold the segment at this byte offset

    def prep_map(self, clone):
        return self.paths[clone.private or 0]

    def map(self, clone):
        clone.offset += self.start
        return bio.REMAPPED

    def end_io(self, clone, error):
        if error and bio.error_class(error) == bio.PATH and not clone.private:
            clone.private = 1  # per-I/O data: which path is next
            self.ctx.device.remap(clone)
            return bio.INCOMPLETE
        return bio.DONE


def test_a_retry_on_another_device_lands_at_the_original_offset(image):
    register("failover", Failover)
    a, b = image("a.img", 1 << 20), image("b.img", 1 << 20)
    pool = DevicePool()
    dev = mapped("mp", f"0 64 failover {a} {b}", pool=pool)
    first = dev.table.targets[0].paths[0]
    first.failed = "disk removed"  # the first path's disk is gone: its I/O fails with a path error
    io = wait_io(dev, bio.WRITE, 8192, 4096, b"\x42" * 4096)
    assert io.error == 0
    with open(b, "rb") as f:
        data = f.read()
    assert data[8192 + 8192 : 8192 + 8192 + 4096] == b"\x42" * 4096  # segment start + request offset
    assert data.count(b"\x42") == 4096
    with open(a, "rb") as f:
        assert f.read().count(b"\x42") == 0


def test_a_lost_disk_fails_with_a_path_error_and_an_error_target_with_a_target_error(image):
    a = image("a.img", 1 << 20)
    dev = mapped("d", f"0 8 linear {a} 0", "8 8 error")
    dev.table.targets[0].dev.failed = "disk removed"
    io = wait_io(dev, bio.READ, 0, 4096, bytearray(4096))
    assert io.error == errno.EIO and io.error_class == bio.PATH
    io = wait_io(dev, bio.READ, 4096, 4096, bytearray(4096))
    assert io.error == errno.EIO and io.error_class == bio.TARGET


class Counting(Target):
    """linear-like onto a file, counting its map() calls."""

    maps = 0

    def ctr(self, args):
        self.get_device(args[0])

    def map(self, clone):
        type(self).maps += 1
        return bio.REMAPPED


class ParkOnce(Target):
    """Parks every piece on its first attempt (a path group that is not ready yet)."""

    attempts = 0

    def ctr(self, args):
        self.get_device(args[0])
        self.start = 16 * 512  # a second translation would land at 16384

    def map(self, clone):
        type(self).attempts += 1
        if clone.private is None:
            clone.private = "parked"
            return bio.REQUEUE
        clone.offset += self.start
        return bio.REMAPPED


@pytest.mark.parametrize("how", ["resume", "kick"])
def test_a_requeued_piece_is_mapped_again_on_resume_and_finished_pieces_are_not_rerun(image, how):
    register("counting", Counting)
    register("park_once", ParkOnce)
    Counting.maps = ParkOnce.attempts = 0
    a = image("a.img", 1 << 20)
    dev = mapped("rq", f"0 8 counting {a}", f"8 8 park_once {a}")
    done = threading.Event()
    io = bio.IO(bio.WRITE, 0, 8192, b"\x11" * 4096 + b"\x22" * 4096, 0, lambda _io: done.set())
    dev.submit(io)
    assert not done.wait(0.3), "a parked piece completed without being mapped again"
    assert dev.status()["requeued"] == 1
    if how == "resume":
        dev.suspend()  # nothing is in flight: the parked piece does not hold the suspend
        dev.resume()
    else:
        dev.kick()
    assert done.wait(10) and io.error == 0
    assert Counting.maps == 1 and ParkOnce.attempts == 2
    with open(a, "rb") as f:
        data = f.read(16384)
    assert data[:4096] == b"\x11" * 4096  # the first piece, written once
    assert data[8192:12288] == b"\x22" * 4096  # the parked piece, from its original offset


class ParkAlways(Target):
    """Parks every piece (a multipath map with no path, holding I/O)."""

    def map(self, clone):
        return bio.REQUEUE


def test_a_piece_parked_across_a_reload_is_split_on_the_new_table(image):
    # dm's noflush reload: what a target held goes to the new table's targets, at its own
    # device offsets (the old table's target is gone)
    register("park_always", ParkAlways)
    a, b = image("a.img", 1 << 20), image("b.img", 1 << 20)
    dev = mapped("rs", "0 32 park_always")
    done = threading.Event()
    io = bio.IO(bio.WRITE, 4096, 8192, b"\x33" * 8192, 0, lambda _io: done.set())
    dev.submit(io)
    short = bio.IO(bio.WRITE, 12288, 4096, b"\x44" * 4096, 0, lambda _io: None)
    dev.submit(short)
    assert not done.wait(0.3) and dev.status()["requeued"] == 2
    dev.load([f"0 10 linear {a} 0", f"10 14 linear {b} 0"])  # 12 KiB: `short` is past its end
    dev.suspend(noflush=True)
    dev.resume()
    assert done.wait(10) and io.error == 0
    assert short.error == errno.ENOSPC
    with open(a, "rb") as f:
        assert f.read(5120)[4096:] == b"\x33" * 1024  # up to sector 10 on the first segment
    with open(b, "rb") as f:
        assert f.read(8192) == b"\x33" * 7168 + bytes(1024)  # the rest from the second's start


def test_read_only_refuses_writes_also_through_a_stacked_device_and_opens_files_read_only(image):
    a = image("a.img", 1 << 20)
    registry, pool = Registry(), DevicePool()
    low = mapped("low", f"0 2048 linear {a} 0", registry=registry, pool=pool, read_only=True)
    top = mapped("top", "0 2048 linear @low 0", registry=registry, pool=pool)
    for op in (bio.WRITE, bio.TRIM, bio.WRITE_ZEROES):
        for dev in (low, top):
            io = wait_io(dev, op, 0, 4096, b"x" * 4096 if op == bio.WRITE else None)
            assert io.error == errno.EPERM, (dev.name, op)
    assert wait_io(top, bio.READ, 0, 4096, bytearray(4096)).error == 0
    fd = low.table.targets[0].dev.fd
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


def test_a_batch_of_adjacent_requests_merges_and_each_gets_its_own_data(image):
    a = image("a.img", 1 << 20)
    with open(a, "r+b") as f:
        f.write(b"".join(bytes([i]) * 4096 for i in range(16)))
    dev = mapped("batch", f"0 2048 delay {a} 0 10")  # delay wants merged requests, as a disk would
    events, ios = [], []
    for i in range(16):
        ev = threading.Event()
        events.append(ev)
        ios.append(bio.IO(bio.READ, i * 4096, 4096, memoryview(bytearray(4096)), 0, lambda _io, ev=ev: ev.set()))
    ev = threading.Event()
    events.append(ev)
    ios.append(bio.IO(bio.WRITE, 65536 * 4, 4096, b"\x77" * 4096, 0, lambda _io, ev=ev: ev.set()))
    dev.submit_batch(ios)  # what an NBD connection hands over at unplug
    assert all(e.wait(10) for e in events)
    assert all(io.error == 0 for io in ios)
    for i, io in enumerate(ios[:16]):
        assert bytes(io.buf) == bytes([i]) * 4096, i
    q = dev.status()["queue"]
    assert q == {"in": 17, "merged": 15, "dispatched": 2, "queued": 0}, q
    with open(a, "rb") as f:
        f.seek(65536 * 4)
        assert f.read(4096) == b"\x77" * 4096


def test_a_direct_file_takes_aligned_and_unaligned_buffers(image):
    import mmap

    a = image("direct.img", 1 << 20)
    pool = DevicePool()
    disk = pool.get(a, direct=True)
    aligned = mmap.mmap(-1, 8192)
    aligned[:] = b"\x61" * 8192
    unaligned = memoryview(bytearray(8192 + 1))[1:]  # one byte past an allocation: not aligned
    unaligned[:] = b"\x62" * 8192
    for buf, offset in ((aligned, 0), (unaligned, 8192)):
        io = bio.IO(bio.WRITE, offset, 8192, buf, bio.FUA)
        done = threading.Event()
        io.endio = lambda _io: done.set()
        disk.submit(io)
        assert done.wait(10) and io.error == 0
    for buf in (mmap.mmap(-1, 16384), memoryview(bytearray(16384 + 1))[1:]):
        done = threading.Event()
        io = bio.IO(bio.READ, 0, 16384, buf, 0, lambda _io: done.set())
        disk.submit(io)
        assert done.wait(10) and io.error == 0
        assert bytes(buf[:8192]) == b"\x61" * 8192 and bytes(buf[8192:16384]) == b"\x62" * 8192
    io = bio.IO(bio.READ, 512 + 1, 512, bytearray(512))
    disk.submit(io)
    assert io.error == errno.EINVAL and io.error_class == bio.TARGET  # O_DIRECT needs aligned offsets
    pool.put(disk)


def test_a_classed_error_prints_as_its_number_and_names_itself():
    """Errors end up in log lines and status strings: an errno nobody named must print too."""
    assert str(bio.Error(errno.EIO)) == "5" and f"{bio.Error(999)}" == "999"
    assert repr(bio.path_error()) == "EIO(path)" and bio.error_name(bio.Error(999)) == "999"
