"""queue-length: the path with the fewest requests in flight (dm-queue-length).

Path argument: [<repeat_count>] (kept for the table; every request is judged anew).
Ties go to the path after the one chosen last, so idle paths take turns.
Status INFO per path: its requests in flight.
"""

from __future__ import annotations

from . import Selector


class QueueLength(Selector):
    name = "queue-length"
    info_args = 1

    def __init__(self, args):
        super().__init__(args)
        self.last = None

    def select(self, paths, nbytes):
        start = (paths.index(self.last) + 1) % len(paths) if self.last in paths else 0
        order = paths[start:] + paths[:start]
        best = min(order, key=lambda p: p.in_flight)
        self.last = best
        return best

    def status(self, path=None, table=False):
        if path is None or table:
            return super().status(path, table)
        return [str(path.in_flight)]
