"""The power state machine, sans-IO.

It eats observations of the UPS, from a poll of upsd or a push from upsmon's
NOTIFYCMD, and the clock; it says what every ramback should be (a `Plan`):
its mode and why, whether it drains, whether it refuses writes. It never
talks to upsd and never touches a device; `appliance.power.monitor` does
both, so this file is tested with a fake clock and nothing else.

The line is trusted again only after `online_hold` seconds of steady line
power: every observation that is not "online" restarts the hold, so a
flapping line stays in writethrough. FSD and SHUTDOWN latch the low-battery
state until the line has been steady for the hold time after them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import size_text

ONLINE, ON_BATTERY, LOW_BATTERY, UNKNOWN, NONE = "online", "on_battery", "low_battery", "unknown", "none"
WRITEBACK, WRITETHROUGH = "writeback", "writethrough"

NO_POWER = (WRITETHROUGH, "no [power] section: no UPS, no promise")
NO_UPS = (WRITEBACK, "ups = none: data in RAM is at risk on power loss")

# upsmon's NOTIFYTYPE -> what it says about the line; None: not about the line
PUSH = {
    "ONLINE": ONLINE,
    "ONBATT": ON_BATTERY,
    "LOWBATT": LOW_BATTERY,
    "FSD": LOW_BATTERY,
    "SHUTDOWN": LOW_BATTERY,
    "COMMBAD": UNKNOWN,
    "NOCOMM": UNKNOWN,
    "COMMOK": None,  # upsmon reaches upsd again: poll at once, the poll says the rest
}
EVENTS = ("ONBATT", "ONLINE", "LOWBATT", "FSD", "SHUTDOWN", "COMMBAD", "COMMOK")
LATCHING = frozenset({"FSD", "SHUTDOWN"})  # the host is going down: no way back but a steady line

# state -> (mode, why); online is writeback only once the line is steady
MODE = {
    ONLINE: (WRITEBACK, "on line power"),
    ON_BATTERY: (WRITETHROUGH, "on battery: every write goes to backing, dirty data drains"),
    LOW_BATTERY: (WRITETHROUGH, "low battery: draining for shutdown"),
}
DRAINS = frozenset({ON_BATTERY, LOW_BATTERY})  # states in which the monitor keeps draining
ENFORCED = frozenset({ON_BATTERY, LOW_BATTERY})  # a manual `writeback` is undone in these


@dataclass(frozen=True)
class Observation:
    """One thing learnt about the UPS. `at` is monotonic, `wall` is time.time()."""

    state: str | None  # ONLINE..UNKNOWN, or None (a push that only asks for a poll)
    source: str  # "poll" | "push"
    event: str  # the push's NOTIFYTYPE, or the polled ups.status
    at: float
    wall: float
    runtime: float | None = None
    charge: float | None = None
    detail: str = ""  # why the UPS is unknown
    latch: bool = False


@dataclass(frozen=True)
class Plan:
    """What every ramback should be now."""

    state: str  # what status reports
    mode: str
    reason: str
    drain: bool = False
    refuse: str | None = None  # a reason while writes are refused
    enforce: bool = False  # re-assert the mode on every tick
    wake: float | None = None  # seconds until the plan changes by itself (the hold ends)


def classify(status: str) -> tuple[str, bool, str]:
    """ups.status ("OL CHRG", "OB DISCHRG LB", ...) -> (state, latch, detail), as upsmon
    reads it: critical is OB with LB, or FSD. "OL LB" is line power with a weak battery."""
    flags = set(status.split())
    if "FSD" in flags:
        return LOW_BATTERY, True, ""
    if "OB" in flags:
        return (LOW_BATTERY if "LB" in flags else ON_BATTERY), False, ""
    if "OL" in flags:
        return ONLINE, False, ""
    return UNKNOWN, False, f"ups.status {status!r} says neither OL nor OB"


def push(event: str, at: float, wall: float) -> Observation:
    """An upsmon NOTIFYTYPE as an observation (KeyError for one that says nothing here)."""
    state = PUSH[event]
    detail = "upsmon reports COMMBAD: it cannot reach the UPS" if state == UNKNOWN else ""
    return Observation(state, "push", event, at, wall, detail=detail, latch=event in LATCHING)


class PowerState:
    """The machine for a configured UPS. `feed()` observations, ask `plan(now)`."""

    def __init__(self, ups: str, online_hold: float, on_unreachable: str):
        self.ups = ups
        self.hold = online_hold
        self.policy = on_unreachable
        self.state = UNKNOWN
        self.detail = "waiting for the first poll of upsd"
        self.first = True  # a first poll that says OL is trusted at once
        self.line_since = None  # monotonic time of the first OL of the current run
        self.latched = None  # the event (FSD, SHUTDOWN) that latched low battery
        self.runtime = None
        self.charge = None
        self.last = None  # the last Observation that changed or confirmed the state

    def feed(self, obs: Observation) -> str | None:
        """Take an observation; return the reported state if it changed, else None."""
        before = self.reported
        if obs.state is None:
            return None
        if obs.source == "poll":
            self.runtime, self.charge = obs.runtime, obs.charge
        if obs.latch and not self.latched:
            self.latched = obs.event
        if obs.state == ONLINE:
            if self.line_since is None:
                # at start-up nothing says the line was ever off: no hold
                self.line_since = obs.at - self.hold if self.first else obs.at
        elif not (obs.state == UNKNOWN and self.policy == WRITEBACK):
            # Everything but line power restarts the hold. An unreachable UPS under
            # on_unreachable = writeback is taken on trust: it does not restart it.
            self.line_since = None
        if obs.state != UNKNOWN:
            self.first = False  # the line has been seen; from now on it must prove itself
        self.state = obs.state
        self.detail = obs.detail
        self.last = obs
        after = self.reported
        return after if after != before else None

    def steady(self, now: float) -> bool:
        return self.state == ONLINE and self.line_since is not None and now - self.line_since >= self.hold

    @property
    def reported(self) -> str:
        return LOW_BATTERY if self.latched else self.state

    def plan(self, now: float) -> Plan:
        if self.latched and self.steady(now):
            self.latched = None
        state = self.reported
        if state == UNKNOWN:
            if self.last is None:
                return Plan(state, WRITETHROUGH, f"{self.ups}: {self.detail}")
            mode = self.policy
            return Plan(state, mode, f"UPS {self.ups} unreachable ({self.detail}); on_unreachable = {mode}")
        if state == ONLINE and not self.steady(now):
            left = self.line_since + self.hold - now
            return Plan(
                state,
                WRITETHROUGH,
                f"line power back for {now - self.line_since:.0f} s; writeback after {self.hold:g} s steady",
                wake=max(left, 0.0),
            )
        mode, why = MODE[state]
        if self.latched:
            why = f"{self.latched}: shutting down; draining and refusing writes until the line is steady"
        refuse = None
        if state == LOW_BATTERY:
            refuse = (f"{self.latched or 'low battery'}: writes refused so nothing is acknowledged"
                      " that the battery cannot save")
        wake = None
        if self.latched and self.state == ONLINE and self.line_since is not None:
            wake = max(self.line_since + self.hold - now, 0.0)
        return Plan(state, mode, why, drain=state in DRAINS, refuse=refuse, enforce=state in ENFORCED, wake=wake)


class StaticState:
    """No [power] section, or ups = "none": one plan for ever."""

    def __init__(self, config):
        self.state = NONE
        self.ups = None if config is None else config.ups
        self.mode, self.why = NO_POWER if config is None else NO_UPS
        self.runtime = self.charge = self.last = None
        self.detail = ""

    def feed(self, obs):
        return None

    @property
    def reported(self):
        return NONE

    def plan(self, now):
        return Plan(NONE, self.mode, self.why)


def describe(p: dict) -> str:
    """The `power:` line of `appliance status`, from the status JSON's power object."""
    line = f"power: {p['state'].replace('_', ' ')}"
    facts = []
    if p.get("ups") and p["ups"] != "none":
        facts.append(f"ups {p['ups']}")
    if p.get("battery.runtime") is not None:
        facts.append(f"runtime {p['battery.runtime']:g} s")
    if p.get("battery.charge") is not None:
        facts.append(f"charge {p['battery.charge']:g}%")
    if p.get("last_event"):
        facts.append(f"last {p['last_event']} by {p['last_event_source']}")
    if facts:
        line += f" ({', '.join(facts)})"
    line += f"; {p['mode']}: {p['reason']}"
    if p.get("rambacks"):
        line += f"; {p['rambacks']} ramback(s), {size_text(p.get('dirty_bytes') or 0)} dirty"
        if p.get("drain_eta_seconds"):
            line += f", drain ETA {p['drain_eta_seconds']:.0f} s"
    if p.get("safe_to_power_off"):
        line += "; safe to power off"
    return line

