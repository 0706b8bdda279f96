"""The mirror's dirty-region logs against a plain model (hypothesis): marks, clears, sync
states, the resync's search, flushes and reopens of the disk log (what a crash leaves)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from appliance.blockdev import DevicePool
from appliance.targets import TargetError
from appliance.targets.mirror.logs.core import CoreLog
from appliance.targets.mirror.logs.disk import DiskLog, log_bytes

REGION = 1 << 20
COUNT = 70  # more than 64: the bitmap's bytes and the last, partial byte


class LogModel(RuleBasedStateMachine):
    """Model: `marked` and `out_of_sync` sets; on disk, after a flush, every region in either
    (a crash or a reopen finds them out of sync, and nothing else)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.RLock()

    @initialize(nosync=st.booleans(), disk=st.booleans())
    def start(self, nosync, disk):
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.path = f"{self.dir.name}/log.img"
        with open(self.path, "wb") as f:
            f.truncate(log_bytes(COUNT))
        self.pool = DevicePool()
        self.dev = self.pool.get(self.path, exclusive=False)
        self.disk = disk
        self.log = self._open("nosync" if nosync else None)
        self.marked = set()
        self.oos = set() if nosync else set(range(COUNT))
        self.on_disk = set(self.oos)

    def _open(self, sync=None):
        log = DiskLog() if self.disk else CoreLog()
        log.ctr(REGION, COUNT, sync, self.dev if self.disk else None, self.lock)
        log.resume()
        return log

    def teardown(self):
        if hasattr(self, "pool"):
            self.pool.put(self.dev)
            self.dir.cleanup()

    @rule(r=st.integers(0, COUNT - 1))
    def mark(self, r):
        self.log.mark_region(r)
        self.marked.add(r)

    @rule(r=st.integers(0, COUNT - 1))
    def clear(self, r):
        self.log.clear_region(r)
        self.marked.discard(r)

    @rule(r=st.integers(0, COUNT - 1), in_sync=st.booleans())
    def set_sync(self, r, in_sync):
        self.log.set_region_sync(r, in_sync)
        (self.oos.discard if in_sync else self.oos.add)(r)

    @rule()
    def flush(self):
        self.log.flush()
        self.on_disk = self.marked | self.oos

    @rule()
    def reopen(self):
        """A crash after the last flush: a disk log knows what was on disk; a core log nothing."""
        if self.disk:
            self.log = self._open()
            self.oos = set(self.on_disk)
        else:
            self.log = self._open()
            self.oos = set(range(COUNT))
        self.marked = set()
        self.on_disk = set(self.oos)

    @rule()
    def resync_pass(self):
        """One pass of get_resync_work from a resume yields every region out of sync, in order."""
        self.log.resume()
        got = []
        while (r := self.log.get_resync_work()) is not None:
            got.append(r)
        assert got == sorted(self.oos)

    @invariant()
    def agrees(self):
        if not hasattr(self, "log"):
            return
        assert self.log.get_sync_count() == COUNT - len(self.oos)
        for r in range(COUNT):
            assert self.log.is_clean(r) == (r not in self.marked)
            assert self.log.in_sync(r) == (r not in self.oos)


LogModel.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_the_logs_follow_a_plain_model_through_marks_syncs_flushes_and_crashes = LogModel.TestCase


def test_a_disk_log_refuses_a_device_that_holds_something_else(tmp_path):
    path = tmp_path / "log.img"
    path.write_bytes(b"not a log" + bytes(log_bytes(COUNT)))
    pool = DevicePool()
    dev = pool.get(str(path), exclusive=False)
    try:
        with pytest.raises(TargetError, match="holds something else than a mirror log"):
            DiskLog().ctr(REGION, COUNT, None, dev, threading.RLock())
    finally:
        pool.put(dev)


def test_a_disk_log_refuses_a_log_made_for_another_region_size(tmp_path):
    path = tmp_path / "log.img"
    with open(path, "wb") as f:
        f.truncate(log_bytes(COUNT * 2))
    pool = DevicePool()
    dev = pool.get(str(path), exclusive=False)
    try:
        log = DiskLog()
        log.ctr(REGION, COUNT, None, dev, threading.RLock())
        log.resume()  # formats it
        with pytest.raises(TargetError, match="is for 70 regions of 2048 sectors; the table has 140 of 1024"):
            DiskLog().ctr(REGION // 2, COUNT * 2, None, dev, threading.RLock())
    finally:
        pool.put(dev)
