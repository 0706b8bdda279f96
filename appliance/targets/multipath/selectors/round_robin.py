"""round-robin: each path in turn, `repeat_count` requests at a time (dm-round-robin).

Path argument: [<repeat_count>], default 1 (alternate every request). The target maps
merged requests, so alternating per request does not break a sequential stream into
small pieces: what reaches each path is already merged.
"""

from __future__ import annotations

from . import Selector


class RoundRobin(Selector):
    name = "round-robin"

    def __init__(self, args):
        super().__init__(args)
        self.current = None
        self.left = 0  # requests the current path takes before the next one's turn

    def fail_path(self, path):
        if path is self.current:
            self.current = None

    def select(self, paths, nbytes):
        cur = self.current
        if cur is not None and self.left > 0 and cur in paths:
            self.left -= 1
            return cur
        nxt = paths[(paths.index(cur) + 1) % len(paths)] if cur in paths else paths[0]
        self.current = nxt
        self.left = max(nxt.ps["repeat_count"], 1) - 1
        return nxt
