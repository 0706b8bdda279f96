"""service-time: the path that would finish the request soonest (dm-service-time).

Path arguments: [<repeat_count> [<relative_throughput>]]; relative_throughput is 0-100
(default 1): a path's bytes in flight, this request's included, divided by it estimate
how long the request waits there. A path of throughput 0 is used only when every usable
path has 0. Paths of equal throughput (the default) are judged by bytes in flight alone,
so a slow path holds about as many requests as a fast one: give each path its measured
throughput (in proportion) for the fast one to take most. repeat_count is kept for the
table; every request is judged anew. Status INFO per path: bytes in flight and
relative_throughput.
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
        start = (paths.index(self.last) + 1) % len(paths) if self.last in paths else 0
        best = None
        for p in paths[start:] + paths[:start]:  # the last chosen is tried last: ties go round
            if best is None or _compare(p, best, nbytes) < 0:
                best = p
        self.last = best
        return best

    def status(self, path=None, table=False):
        if path is None:
            return ["0"]
        if table:
            return [str(path.ps["repeat_count"]), str(path.ps["relative_throughput"])]
        return [str(path.in_flight_bytes), str(path.ps["relative_throughput"])]


def _compare(a, b, nbytes):
    """< 0: a would finish the request sooner than b (dm's st_compare_load)."""
    rt_a, rt_b = a.ps["relative_throughput"], b.ps["relative_throughput"]
    if rt_a == rt_b:
        return a.in_flight_bytes - b.in_flight_bytes  # equal paths: the less loaded
    if a.in_flight_bytes == b.in_flight_bytes or not rt_a or not rt_b:
        return rt_b - rt_a  # the faster one (a path of throughput 0 only when all are)
    # (in flight + this) / throughput, cross-multiplied as dm does (no division)
    st_a = (a.in_flight_bytes + nbytes) * rt_b
    st_b = (b.in_flight_bytes + nbytes) * rt_a
    return st_a - st_b if st_a != st_b else rt_b - rt_a
