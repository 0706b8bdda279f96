"""The dirty limit: how much data RAM may hold that backing does not have.

Configured in bytes (`max_dirty=2G`) or as a drain time (`max_dirty=30s`, turned into
bytes with the backing write bandwidth measured on the flushes). The power monitor
may set a lower limit from the UPS runtime; the lower of the two is in force, but never
less than the floor (16 chunks). Writers at the limit wait until the flusher makes room,
and fail only when backing does (requests.py _admit).
"""

from __future__ import annotations

import re

from .. import TargetError, parse_size

_SECONDS = re.compile(r"(\d+(?:\.\d+)?)\s*s", re.I)


def parse_limit(word):
    """'30s' -> ('seconds', 30.0); '1G' -> ('bytes', 1073741824)."""
    m = _SECONDS.fullmatch(word.strip())
    if m:
        value = float(m.group(1))
        if value <= 0:
            raise TargetError(f"max_dirty {word!r} must be more than 0 seconds")
        return ("seconds", value)
    n = parse_size(word, "max_dirty")
    if n <= 0:
        raise TargetError(f"max_dirty {word!r} must be more than 0 bytes")
    return ("bytes", n)


def format_limit(limit):
    kind, value = limit
    return f"{value:g}s" if kind == "seconds" else str(value)


class DirtyLimit:
    def __init__(self, configured, floor):
        self.configured = configured  # ('bytes', n) or ('seconds', s)
        self.power = None  # (bytes, reason) from the power monitor, or None
        self.floor = floor  # never below this (16 chunks): flush runs of a useful size

    def effective(self, bandwidth, measured):
        """(bytes, reason, raised to the floor) in force, given the backing write bandwidth
        in bytes/s."""
        kind, value = self.configured
        if kind == "bytes":
            limit, why = value, f"max_dirty={value}"
        else:
            limit = int(value * bandwidth)
            why = f"max_dirty={value:g}s x {'measured' if measured else 'assumed'} flush {bandwidth / 2**20:.1f} MiB/s"
        if self.power is not None and self.power[0] is not None and self.power[0] < limit:
            limit, why = self.power[0], f"power: {self.power[1]}"
        if limit < self.floor:
            return self.floor, why + f" (raised to the floor of {self.floor} bytes: 16 chunks)", True
        return limit, why, False
