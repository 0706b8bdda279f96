"""The power monitor against a real NUT (dummy-ups + upsd), driving stand-in
rambacks: small objects with the ramback target's power interface that record
what they were told. The real target is driven in test_power_ramback.py."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from nut import MON, MON_PW, nut, nut_server  # noqa: F401  (fixtures)
from conftest import wait_for

from appliance.config import PowerConfig
from appliance.power.monitor import Monitor


class StandInRamback:
    """The ramback target's power interface, recorded; drain() flushes at `bandwidth`."""

    name = "ramback"

    def __init__(self, mode="writethrough", dirty=0, bandwidth=100 << 20):
        self.mode = mode
        self.dirty = dirty
        self.bandwidth = bandwidth
        self.calls = []  # (monotonic time, method, args)
        self.refusing = None
        self.limit = None
        self.backing = StandInDevice()
        self.lock = threading.Lock()
        self.hold = None  # an Event: drain() waits for it (a drain pass that takes its time)
        self.held = threading.Event()  # set while a drain() call waits for `hold`

    def _record(self, *call):
        with self.lock:
            self.calls.append((time.monotonic(), *call))

    def set_mode(self, mode, reason):
        self._record("set_mode", mode, reason)
        self.mode = mode

    def set_power_limit(self, limit, reason):
        self._record("set_power_limit", limit, reason)
        self.limit = limit

    def refuse_writes(self, reason):
        self._record("refuse_writes", reason)
        self.refusing = reason

    def drain(self, timeout):
        self._record("drain", timeout)
        if self.hold is not None:
            self.held.set()
            self.hold.wait(10)
            self.held.clear()
        time.sleep(min(timeout, 0.05))
        self.dirty = max(0, self.dirty - int(self.bandwidth * 0.05))
        return self.dirty == 0

    def status_info(self):
        return {"mode": self.mode, "dirty_bytes": self.dirty, "flush_bandwidth": self.bandwidth,
                "drain_eta_seconds": self.dirty / self.bandwidth, "dirty_limit_bytes": self.limit}

    def iterate_devices(self):
        return [self.backing]

    def first(self, method, *args, after=0.0):
        """Time of the first call of `method` (with these leading args) after `after`."""
        with self.lock:
            for t, m, *a in self.calls:
                if m == method and t >= after and tuple(a[: len(args)]) == args:
                    return t
        return None


class StandInDevice:
    def __init__(self):
        self.flushes = 0

    def submit(self, io):
        self.flushes += 1
        io.complete(0)


def registry(*targets):
    return SimpleNamespace(devices={f"r{i}": SimpleNamespace(name=f"r{i}", table=SimpleNamespace(targets=[t]))
                                    for i, t in enumerate(targets)})


def power(ups, poll=0.3, hold=1.0, user=MON, password=MON_PW, policy="writethrough", factor=0.5):
    return PowerConfig(ups, user, password, poll, hold, policy, factor)


@pytest.fixture
def monitor():
    started = []

    def make(config, *targets):
        m = Monitor(config, registry(*targets))
        m.start()
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


def test_a_poll_that_says_on_battery_switches_within_one_poll_interval(nut, monitor):
    r = StandInRamback(mode="writethrough", dirty=0)
    m = monitor(power(nut.ident, poll=0.5), r)
    wait_for(lambda: r.mode == "writeback")
    r.dirty = 20 << 20
    nut.status("OB DISCHRG")  # returns once upsd shows it
    seen = time.monotonic()
    wait_for(lambda: r.mode == "writethrough", timeout=2)
    assert r.first("set_mode", "writethrough") - seen <= 0.5 + 0.5  # a poll interval, and scheduling
    wait_for(lambda: r.dirty == 0, timeout=5)
    assert m.snapshot()["state"] == "on_battery"


def test_a_push_switches_within_a_second_whatever_the_poll_interval(nut, monitor):
    r = StandInRamback()
    m = monitor(power(nut.ident, poll=30), r)
    wait_for(lambda: r.mode == "writeback")
    t = time.monotonic()
    answer = m.push("ONBATT", ups="dummy@localhost")
    assert answer["mode"] == "writethrough"
    assert r.first("set_mode", "writethrough", after=t) - t < 1.0
    snap = m.snapshot()
    assert (snap["state"], snap["last_event"], snap["last_event_source"]) == ("on_battery", "ONBATT", "push")


def test_a_push_about_another_ups_is_ignored(nut, monitor):
    r = StandInRamback()
    m = monitor(power(nut.ident, poll=30), r)
    wait_for(lambda: r.mode == "writeback")
    assert "ignored" in m.push("ONBATT", ups="other@localhost")
    assert r.mode == "writeback"


def test_line_power_returns_writeback_only_after_the_hold(nut, monitor):
    r = StandInRamback()
    m = monitor(power(nut.ident, poll=0.3, hold=2.0), r)
    wait_for(lambda: r.mode == "writeback")
    nut.status("OB")
    wait_for(lambda: r.mode == "writethrough", timeout=2)
    nut.status("OL")
    back = time.monotonic()
    wait_for(lambda: m.snapshot()["state"] == "online", timeout=2)
    assert r.mode == "writethrough"
    wait_for(lambda: r.mode == "writeback", timeout=5)
    assert time.monotonic() - back >= 2.0


def test_a_flapping_line_stays_in_writethrough(nut, monitor):
    r = StandInRamback()
    m = monitor(power(nut.ident, poll=0.2, hold=3.0), r)
    wait_for(lambda: r.mode == "writeback")
    start = time.monotonic()
    for i in range(8):  # bounded: 8 flaps of about a second
        m.push("ONBATT" if i % 2 == 0 else "ONLINE")
        time.sleep(0.5)
        assert r.mode == "writethrough", f"writeback {time.monotonic() - start:.1f}s into the flapping"
    switches = [c for c in r.calls if c[1] == "set_mode" and c[0] >= start]
    assert [c[2] for c in switches] == ["writethrough"]  # switched once, never back


def test_a_manual_writeback_on_battery_is_undone(nut, monitor):
    r = StandInRamback()
    m = monitor(power(nut.ident, poll=30), r)
    wait_for(lambda: r.mode == "writeback")
    m.push("ONBATT")
    r.mode = "writeback"  # `appliance message r0 0 writeback`
    wait_for(lambda: r.mode == "writethrough", timeout=2.5)


def test_low_battery_refuses_writes_drains_flushes_and_says_safe(nut, monitor):
    r = StandInRamback(dirty=30 << 20, bandwidth=100 << 20)
    m = monitor(power(nut.ident, poll=0.3), r)
    wait_for(lambda: m.snapshot()["state"] == "online")
    nut.status("OB LB")
    wait_for(lambda: r.refusing, timeout=2)
    assert r.mode == "writethrough"
    wait_for(lambda: m.snapshot()["safe_to_power_off"], timeout=5)
    assert r.dirty == 0 and r.backing.flushes >= 1
    assert m.wait_clean(5)["clean"]
    # line power returns while the drain worker is busy in a drain pass: from the moment status
    # says "online" it must not say "safe to power off", whatever that pass found before
    r.hold = threading.Event()
    wait_for(r.held.is_set, timeout=3)
    try:
        nut.status("OL")
        snap = wait_for(lambda: (s := m.snapshot())["state"] == "online" and s, timeout=2)
        assert not snap["safe_to_power_off"], snap
        wait_for(lambda: r.refusing is None, timeout=2)
        assert not m.snapshot()["safe_to_power_off"]
    finally:
        r.hold.set()
    time.sleep(0.2)  # the held pass ends: what it found belongs to the old state
    assert not m.snapshot()["safe_to_power_off"]


def test_wait_clean_gives_up_at_its_timeout(nut, monitor):
    r = StandInRamback(dirty=1 << 40, bandwidth=1 << 20)
    m = monitor(power(nut.ident, poll=30), r)
    t = time.monotonic()
    answer = m.wait_clean(0.5)
    assert not answer["clean"] and answer["dirty_bytes"] > 0
    assert time.monotonic() - t < 1.5


def test_the_dirty_limit_follows_battery_runtime(nut, monitor):
    a, b = StandInRamback(bandwidth=10 << 20), StandInRamback(bandwidth=40 << 20)
    m = monitor(power(nut.ident, poll=0.3, factor=0.5), a)
    wait_for(lambda: a.limit == 600 * (10 << 20) // 2)
    assert "battery.runtime 600 s" in [c for c in a.calls if c[1] == "set_power_limit"][-1][3]
    nut.set("battery.runtime", 30)
    wait_for(lambda: a.limit == 30 * (10 << 20) // 2, timeout=2)
    # two rambacks share the battery: each gets its share
    m.registry.devices["r1"] = SimpleNamespace(name="r1", table=SimpleNamespace(targets=[b]))
    wait_for(lambda: b.limit == 30 * (40 << 20) // 2 // 2, timeout=3)
    wait_for(lambda: a.limit == 30 * (10 << 20) // 2 // 2, timeout=3)


def test_wrong_credentials_make_the_ups_unknown(nut, monitor):
    r = StandInRamback()
    m = monitor(power(nut.ident, password="wrong"), r)
    wait_for(lambda: "ACCESS-DENIED" in (m.snapshot()["error"] or ""))
    assert m.snapshot()["state"] == "unknown"
    assert r.mode == "writethrough"


def test_a_stale_driver_makes_the_ups_unknown_until_it_recovers(tmp_path, monitor):
    from nut import Nut, need_nut

    need_nut()
    n = Nut(tmp_path, maxage=2).start()
    try:
        r = StandInRamback()
        m = monitor(power(n.ident, poll=0.3, hold=0.5), r)
        wait_for(lambda: r.mode == "writeback")
        n.pause_driver()
        wait_for(lambda: "stale" in (m.snapshot()["error"] or ""), timeout=8)
        assert r.mode == "writethrough"
        n.resume_driver()
        wait_for(lambda: r.mode == "writeback", timeout=5)
    finally:
        n.stop()


def test_a_hung_upsd_does_not_delay_a_push(monitor):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # the kernel completes connections; nobody ever answers
    try:
        r = StandInRamback(mode="writeback")
        m = monitor(power(f"ups@127.0.0.1:{hung.getsockname()[1]}", poll=1.0, user=None), r)
        time.sleep(0.3)  # the first poll is stuck now
        t = time.monotonic()
        m.push("ONBATT")
        assert r.first("set_mode", "writethrough") - t < 1.0
        assert m.snapshot()["state"] == "on_battery"
    finally:
        hung.close()


def test_a_ramback_built_later_gets_the_current_mode(nut, monitor):
    a = StandInRamback()
    m = monitor(power(nut.ident, poll=30), a)
    wait_for(lambda: a.mode == "writeback")
    m.push("ONBATT")
    late = StandInRamback(mode="writeback")  # built from a stale cache_mode during a reload
    m.registry.devices["late"] = SimpleNamespace(name="late", table=SimpleNamespace(targets=[late]))
    wait_for(lambda: late.mode == "writethrough", timeout=2.5)
    assert m.cache_mode()[0] == "writethrough"


def test_without_power_nothing_is_polled_and_the_mode_is_left_to_the_user(monitor):
    r = StandInRamback(mode="writethrough")
    m = monitor(None, r)
    r.mode = "writeback"  # an explicit message
    time.sleep(1.5)
    assert r.mode == "writeback" and not [c for c in r.calls if c[1] == "set_mode"]
    snap = m.snapshot()
    assert (snap["state"], snap["ups"], snap["mode"]) == ("none", None, "writethrough")
    assert "ignored" in m.push("ONBATT")
