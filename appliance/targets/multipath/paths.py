"""Paths and priority groups: what the target knows of each, and what status shows.

A path is `dm_st` active or failed (may it take I/O) and `chk_st` ready, faulty or
shaky (what the checker last found; shaky: it failed again within marginal_window of
being reinstated, so it is kept out for a while that doubles with each relapse). `reason` says
why a failed path is down.
"""

from __future__ import annotations

import time

EMA = 0.2  # weight of the newest sample in service_time_ms


class Path:
    def __init__(self, word, group, args):
        self.word = word
        self.group = group
        self.args = args
        self.dev = None  # None until it opens (a remote path down when the table loads)
        self.active = False
        self.chk_st = "faulty"
        self.reason = "not opened yet"
        self.by_message = False  # failed by `fail_path`: only `reinstate_path` brings it back
        self.failures = 0
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.started = {}  # attempt -> when it went to this path, oldest first (fast_io_fail_tmo)
        self.aborted_at = 0.0  # when fast_io_fail_tmo last gave up on its requests
        self.requests = 0
        self.bytes = 0
        self.service_time = 0.0  # seconds, a moving average
        self.reinstated_at = None
        self.marginal = 0  # failures within marginal_window of a reinstate, in a row
        self.held_until = 0.0  # a shaky path stays out until then
        self.ps = {}  # the selector's per-path state

    def start(self, nbytes, attempt, now):
        self.in_flight += 1
        self.in_flight_bytes += nbytes
        self.started[attempt] = now
        self.requests += 1
        self.bytes += nbytes

    def end(self, nbytes, attempt):
        self.in_flight -= 1
        self.in_flight_bytes -= nbytes
        started = self.started.pop(attempt)
        self.service_time += EMA * ((time.monotonic() - started) - self.service_time)

    def oldest(self):
        """When the oldest request in flight on it went there, or None."""
        return next(iter(self.started.values()), None)

    def fail(self, reason, marginal_window):
        """Out of rotation. True if it was active. A path that fails within marginal_window of
        coming back is marginal: held out marginal_window x 2^(k-1) after its k-th relapse in a row."""
        was = self.active
        self.active = False
        self.reason = reason
        if was:
            self.failures += 1
            now = time.monotonic()
            if self.reinstated_at is not None and now - self.reinstated_at < marginal_window:
                self.marginal += 1
                self.held_until = now + marginal_window * (2 ** min(self.marginal - 1, 6))
                self.chk_st = "shaky"
            else:
                self.chk_st = "faulty"
        return was

    def reinstate(self):
        self.active = True
        self.chk_st = "ready"
        self.reason = None
        self.by_message = False
        self.reinstated_at = time.monotonic()

    def info(self):
        return {
            "dev": self.word,
            "dm_st": "active" if self.active else "failed",
            "chk_st": self.chk_st,
            "failures": self.failures,
            "in_flight": self.in_flight,
            "service_time_ms": round(self.service_time * 1000, 3),
            "requests": self.requests,
            "avg_request_bytes": self.bytes // self.requests if self.requests else 0,
            "reason": self.reason,
            "marginal": self.marginal,
        }


class Group:
    def __init__(self, number, selector, selector_words):
        self.number = number  # 1-based, as dm's messages count
        self.selector = selector
        self.selector_words = selector_words  # <selector> <#args> <args>... as in the table
        self.paths = []
        self.bypassed = False  # disable_group

    def usable(self):
        return [p for p in self.paths if p.active]
