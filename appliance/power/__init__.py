"""Power: UPS events from NUT drive every ramback device.

`state` is the sans-IO state machine (observations in, a plan out), `ups`
polls upsd with nut2, `monitor` runs the threads and applies the plan to the
rambacks, `command` is `appliance power` (upsmon's NOTIFYCMD, wait-clean).
See "Power" in README.md.
"""

from .state import EVENTS, NO_POWER, NO_UPS, describe

__all__ = ["EVENTS", "NO_POWER", "NO_UPS", "Monitor", "describe"]


def __getattr__(name):
    # the monitor imports nut2; the CLI's `power` and `status` do not need it
    if name == "Monitor":
        from .monitor import Monitor

        return Monitor
    raise AttributeError(name)
