"""historical-service-time: a moving average of each path's service time (dm-historical-service-time).

Selector arguments: [<base_weight> [<threshold_multiplier>]]. base_weight (0-1023, in
1024ths, default 972 = 0.95) is how much of the average survives each 16 ms of a new
sample; threshold_multiplier (default 0: off) makes two paths count as equal unless one's
average is that many times the other's. The estimate for a path is (1 + in flight) x its
average. A path that has finished nothing for longer than its average x the number of
paths is stale: an idle stale path is probed with the next request (it may have become
fast again), and a busy stale one is not preferred. Path argument: [<repeat_count>].
Status INFO per path: the average (ns), requests in flight, the stale deadline (ns).
"""

from __future__ import annotations

import time

from ... import TargetError, parse_int
from . import Selector

BUCKET = 0.016  # seconds a weight step stands for (dm: 2^24 ns)
DEFAULT_BASE = 972


class HistoricalServiceTime(Selector):
    name = "historical-service-time"
    info_args = 3

    def __init__(self, args):
        if len(args) > 2:
            raise TargetError(f"{self.name} takes [<base_weight> [<threshold_multiplier>]], got {len(args)} arguments")
        self.base = parse_int(args[0], f"{self.name} base_weight") if args else DEFAULT_BASE
        if self.base >= 1024:
            raise TargetError(f"{self.name} base_weight must be below 1024, got {self.base}")
        self.threshold = parse_int(args[1], f"{self.name} threshold_multiplier") if len(args) > 1 else 0
        self.npaths = 0

    def add_path(self, path, args):
        super().add_path(path, args)
        path.ps.update(hst=0.001, stale_after=0.0, last_finish=0.0)
        self.npaths += 1

    def select(self, paths, nbytes):
        now = time.monotonic()
        idle_stale = [p for p in paths if not p.in_flight and p.ps["stale_after"] < now]
        if idle_stale:
            best = min(idle_stale, key=lambda p: p.ps["stale_after"])  # the longest unprobed
        else:
            best = min(paths, key=lambda p: self._estimate(p, paths))
        return best

    def _estimate(self, p, paths):
        hst = p.ps["hst"]
        if self.threshold > 1:
            others = [q.ps["hst"] for q in paths if q is not p]
            if others and all(max(hst, o) <= self.threshold * min(hst, o) for o in others):
                return p.in_flight  # too close to call: fewer outstanding wins
        return (1 + p.in_flight) * hst

    def end_io(self, path, nbytes, started):
        now = time.monotonic()
        ps = path.ps
        start = max(started, ps["last_finish"])  # overlapping requests count as if serial
        ps["last_finish"] = now
        sample = max(now - start, 0.0)
        weight = (self.base / 1024.0) ** max(1.0, sample / BUCKET) if sample < 64 * BUCKET else 0.0
        ps["hst"] = ps["hst"] * weight + sample * (1 - weight)
        ps["stale_after"] = now + max(self.npaths, 1) * ps["hst"]

    def status(self, path=None, table=False):
        if path is None:
            return ["2", str(self.base), str(self.threshold)]
        if table:
            return [str(path.ps["repeat_count"])]
        ps = path.ps
        return [str(int(ps["hst"] * 1e9)), str(path.in_flight), str(int(ps["stale_after"] * 1e9))]
