"""The power state machine on its own: observations in, a plan out, a fake clock."""

from types import SimpleNamespace

import pytest

from appliance.power import state as st


def machine(hold=30, policy="writethrough"):
    return st.PowerState("ups@localhost", hold, policy)


def poll(m, status, at, runtime=600, charge=100):
    state, latch, detail = st.classify(status)
    return m.feed(st.Observation(state, "poll", status, at, at, runtime, charge, detail, latch))


def unreachable(m, at):
    return m.feed(st.Observation(st.UNKNOWN, "poll", "unreachable", at, at, detail="upsd down"))


def push(m, event, at):
    return m.feed(st.push(event, at, at))


@pytest.mark.parametrize(
    "status, state, latch",
    [
        ("OL", st.ONLINE, False),
        ("OL CHRG", st.ONLINE, False),
        ("OL LB", st.ONLINE, False),  # line power, weak battery: upsmon does not call it critical
        ("OB DISCHRG", st.ON_BATTERY, False),
        ("OB DISCHRG LB", st.LOW_BATTERY, False),
        ("OL FSD", st.LOW_BATTERY, True),
        ("OB LB FSD", st.LOW_BATTERY, True),
        ("WAIT", st.UNKNOWN, False),
        ("OFF", st.UNKNOWN, False),
    ],
)
def test_ups_status_is_read_as_upsmon_reads_it(status, state, latch):
    assert st.classify(status)[:2] == (state, latch)


def test_writethrough_until_the_first_poll_then_writeback_at_once():
    m = machine()
    assert m.plan(0).mode == "writethrough"
    assert "first poll" in m.plan(0).reason
    poll(m, "OL", 0.5)
    plan = m.plan(0.5)
    assert (plan.state, plan.mode, plan.drain, plan.refuse) == ("online", "writeback", False, None)


def test_on_battery_is_writethrough_and_drains_and_is_enforced():
    m = machine()
    poll(m, "OL", 0)
    assert push(m, "ONBATT", 1) == "on_battery"
    plan = m.plan(1)
    assert (plan.mode, plan.drain, plan.enforce, plan.refuse) == ("writethrough", True, True, None)


def test_writeback_returns_only_after_the_hold():
    m = machine(hold=30)
    poll(m, "OL", 0)
    poll(m, "OB", 10)
    poll(m, "OL", 20)
    assert m.plan(20).mode == "writethrough"
    assert m.plan(49.9).mode == "writethrough"
    assert m.plan(49.9).wake == pytest.approx(0.1)
    poll(m, "OL", 45)  # polls in between do not restart the hold
    assert m.plan(50).mode == "writeback"


def test_a_flapping_line_stays_writethrough():
    m = machine(hold=5)
    poll(m, "OL", 0)
    t = 1.0
    for _ in range(20):  # a second on battery, three on line, again and again
        poll(m, "OB", t)
        assert m.plan(t).mode == "writethrough"
        poll(m, "OL", t + 1)
        assert m.plan(t + 4).mode == "writethrough"
        t += 4
    assert m.plan(t + 5).mode == "writeback"


def test_low_battery_refuses_writes_and_line_power_lifts_the_refusal():
    m = machine(hold=10)
    poll(m, "OL", 0)
    poll(m, "OB LB", 1)
    plan = m.plan(1)
    assert (plan.state, plan.mode, plan.drain) == ("low_battery", "writethrough", True)
    assert plan.refuse
    poll(m, "OL", 2)
    plan = m.plan(2)
    assert (plan.state, plan.mode, plan.refuse) == ("online", "writethrough", None)


@pytest.mark.parametrize("event", ["FSD", "SHUTDOWN"])
def test_fsd_and_shutdown_latch_until_the_line_is_steady(event):
    m = machine(hold=10)
    poll(m, "OL", 0)
    assert push(m, event, 1) == "low_battery"
    poll(m, "OL", 1.5)  # the UPS is still on line: the host is going down anyway
    assert m.plan(2).state == "low_battery" and m.plan(2).refuse
    assert m.plan(11).state == "low_battery"
    plan = m.plan(11.5)
    assert (plan.state, plan.mode, plan.refuse) == ("online", "writeback", None)


def test_fsd_in_ups_status_latches_too():
    m = machine(hold=10)
    poll(m, "OL", 0)
    poll(m, "OL FSD", 1)
    poll(m, "OL FSD", 20)
    assert m.plan(25).state == "low_battery"
    poll(m, "OL", 30)
    assert m.plan(39).state == "low_battery"
    assert m.plan(40).state == "online"


def test_unreachable_applies_the_policy_and_recovery_holds():
    for policy in ("writethrough", "writeback"):
        m = machine(hold=10, policy=policy)
        poll(m, "OL", 0)
        assert unreachable(m, 1) == "unknown"
        plan = m.plan(1)
        assert (plan.state, plan.mode) == ("unknown", policy)
        assert "upsd down" in plan.reason
        poll(m, "OL", 5)
        # writethrough: the line must prove itself again; writeback: it was trusted all along
        assert m.plan(5).mode == ("writethrough" if policy == "writethrough" else "writeback")
        assert m.plan(15).mode == "writeback"


def test_a_first_poll_that_fails_does_not_count_as_the_line_going_off():
    m = machine(hold=30)
    unreachable(m, 0)
    assert m.plan(0).mode == "writethrough"
    poll(m, "OL", 1)
    assert m.plan(1).mode == "writeback"


def test_commbad_push_is_unknown_and_commok_only_asks_for_a_poll():
    m = machine()
    poll(m, "OL", 0)
    assert push(m, "COMMBAD", 1) == "unknown"
    assert m.plan(1).mode == "writethrough"
    assert st.push("COMMOK", 2, 2).state is None
    assert m.feed(st.push("COMMOK", 2, 2)) is None


def test_runtime_and_charge_come_from_polls_only():
    m = machine()
    poll(m, "OL", 0, runtime=321, charge=77)
    push(m, "ONBATT", 1)
    assert (m.runtime, m.charge) == (321, 77)
    unreachable(m, 2)
    assert m.runtime is None


def test_without_power_or_with_ups_none_the_mode_is_fixed():
    no = st.StaticState(None)
    assert (no.plan(0).state, no.plan(0).mode) == ("none", "writethrough")
    assert "no [power] section" in no.plan(0).reason
    none = st.StaticState(SimpleNamespace(ups="none"))
    assert (none.plan(0).state, none.plan(0).mode) == ("none", "writeback")
    assert "at risk" in none.plan(0).reason


def test_the_status_line_says_the_state_and_the_drain():
    p = {
        "state": "on_battery", "ups": "ups@localhost", "battery.runtime": 300.0, "battery.charge": 80.0,
        "last_event": "ONBATT", "last_event_source": "push", "mode": "writethrough", "reason": "on battery",
        "rambacks": 2, "dirty_bytes": 3 << 20, "drain_eta_seconds": 4.2, "safe_to_power_off": False,
    }
    line = st.describe(p)
    assert line.startswith("power: on battery (ups ups@localhost, runtime 300 s, charge 80%, last ONBATT by push)")
    assert "3.0 MiB dirty" in line and "drain ETA 4 s" in line
