"""historical-service-time: a moving average of each path's service time (dm-historical-service-time).

Selector arguments: [<base_weight> [<threshold_multiplier>]]. base_weight (0-1023, in
1024ths, default 972 = 0.95) is how much of the average survives a sample; a sample
that took k whole 16 ms steps keeps base^(k+1) of it (none after 63 steps), as dm's
table of weights. threshold_multiplier (default 0: off) makes two paths count as equal,
and the one with fewer requests in flight win, unless one's average is more than that
many times the other's.

The estimate for a path is (1 + in flight) x its average, so a 5 ms path gets a request
only once a 0.1 ms one has some 50 in flight. Overlapping requests count as if serial
(a request's service time starts no earlier than the path's last completion), so a
busy path's average is the time between its completions. A path that has finished
nothing for longer than its average x the number of paths (and at least STALE_MIN) is stale: an idle stale path
is probed with the next request (it may have become fast again; of two idle paths the
longer unprobed goes), and a stale path that would win is only given its equal share
(fewer in flight wins). Path argument: [<repeat_count>].
Status INFO per path: the average (ns), requests in flight, the stale deadline (ns).
"""

from __future__ import annotations

import time

from ... import TargetError, parse_int
from . import Selector

BUCKET = 0.016  # seconds a weight step stands for (dm: 2^24 ns)
STEPS = 64  # dm's HST_WEIGHT_COUNT: a sample of 63 steps or more replaces the average
DEFAULT_BASE = 972
FIRST_ESTIMATE = 1e-9  # a new path's average (dm: 1 ns): it is tried before it is judged
# a path is stale no sooner than this after its last completion: completions here reach the
# selector through engine threads and the GIL, in bursts with gaps of a few ms on a loaded machine,
# so dm's bare "average x paths" (0.2 ms for a 0.1 ms path) would call a healthy path stale and
# hand the slow one an equal share
STALE_MIN = 0.010


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
        self.weights = [(self.base / 1024.0) ** (k + 1) for k in range(STEPS - 1)] + [0.0]
        self.order = []  # the last chosen goes to the end: ties go to the others

    def add_path(self, path, args):
        super().add_path(path, args)
        path.ps.update(hst=FIRST_ESTIMATE, stale_after=0.0, last_finish=0.0)
        self.order.append(path)

    def select(self, paths, nbytes):
        now = time.monotonic()
        best = None
        for p in sorted(paths, key=self.order.index):
            if best is None or self._compare(p, best, now) < 0:
                best = p
        self.order.remove(best)
        self.order.append(best)
        return best

    def _compare(self, a, b, now):
        """< 0: a is the better path for the next request, > 0: b is, 0: no difference."""
        hst_a, hst_b = a.ps["hst"], b.ps["hst"]
        out_a, out_b = a.in_flight, b.in_flight
        stale_a, stale_b = a.ps["stale_after"] < now, b.ps["stale_after"] < now
        if max(hst_a, hst_b) <= self.threshold * min(hst_a, hst_b):
            return out_a - out_b  # too close to call: fewer outstanding wins
        if (not out_a and stale_a) or (not out_b and stale_b) or (not out_a and not out_b):
            # an idle stale path is probed; of two idle paths, the longer unprobed
            return (not out_b) * a.ps["stale_after"] - (not out_a) * b.ps["stale_after"]
        b_better = (1 + out_a) * hst_a > (1 + out_b) * hst_b
        if stale_b if b_better else stale_a:
            return out_a - out_b  # the winner has gone quiet: no more than its share
        return 1 if b_better else -1

    def end_io(self, path, nbytes, started):
        now = time.monotonic()
        ps = path.ps
        start = max(started, ps["last_finish"])  # overlapping requests count as if serial
        ps["last_finish"] = now
        sample = max(now - start, 0.0)
        weight = self.weights[min(int(sample / BUCKET), STEPS - 1)]
        ps["hst"] = ps["hst"] * weight + sample * (1 - weight)
        ps["stale_after"] = now + max(len(path.group.usable()) * ps["hst"], STALE_MIN)

    def status(self, path=None, table=False):
        if path is None:
            return ["2", str(self.base), str(self.threshold)]
        if table:
            return [str(path.ps["repeat_count"])]
        ps = path.ps
        return [str(int(ps["hst"] * 1e9)), str(path.in_flight), str(int(ps["stale_after"] * 1e9))]
