"""service-time: the path that would finish the request soonest (dm-service-time).

Path arguments: [<repeat_count> [<relative_throughput>]]; relative_throughput is 0-100
(default 1): a path's bytes in flight, this request's included, divided by it estimate
how long the request waits there. A path of throughput 0 is used only when every usable
path has 0. Status INFO per path: bytes in flight and relative_throughput.
"""

from __future__ import annotations

from ... import TargetError, parse_int
from . import Selector, _repeat_count

MAX_THROUGHPUT = 100


class ServiceTime(Selector):
    name = "service-time"
    table_args = 2
    info_args = 2

    def __init__(self, args):
        super().__init__(args)
        self.last = None

    def add_path(self, path, args):
        repeat = _repeat_count(self.name, args[:1], 1)
        if len(args) > 2:
            raise TargetError(f"{self.name}: a path takes at most 2 arguments, got {len(args)}")
        throughput = parse_int(args[1], f"{self.name} relative_throughput") if len(args) > 1 else 1
        if throughput > MAX_THROUGHPUT:
            raise TargetError(f"{self.name} relative_throughput must be at most {MAX_THROUGHPUT}, got {throughput}")
        path.ps = {"repeat_count": repeat, "relative_throughput": throughput}

    def select(self, paths, nbytes):
        fast = [p for p in paths if p.ps["relative_throughput"]] or paths
        start = (fast.index(self.last) + 1) % len(fast) if self.last in fast else 0
        order = fast[start:] + fast[:start]
        # (in flight + this) / throughput, compared by cross-multiplying as dm does (no division)
        best = order[0]
        for p in order[1:]:
            rt_p, rt_b = p.ps["relative_throughput"] or 1, best.ps["relative_throughput"] or 1
            if (p.in_flight_bytes + nbytes) * rt_b < (best.in_flight_bytes + nbytes) * rt_p:
                best = p
        self.last = best
        return best

    def status(self, path=None, table=False):
        if path is None:
            return ["0"]
        if table:
            return [str(path.ps["repeat_count"]), str(path.ps["relative_throughput"])]
        return [str(path.in_flight_bytes), str(path.ps["relative_throughput"])]
