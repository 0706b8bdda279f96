"""Range locks over chunk numbers, granted in arrival order among overlapping ranges.

A request takes its place in line when it is made (`request`, which never blocks), so
the order in which the NBD loop mapped two overlapping writes is the order in which
they reach backing, while ranges that do not overlap never wait for each other. The
cost of every operation grows with the number of ranges held or waiting (the I/O in
flight), never with the size of the device: the seed's per-chunk locking and its
serialized writethrough queue are both gone.

Who takes them: writes that touch an EMPTY chunk (against a load), writethrough
writes and every flush of a run, held until its backing write is done (so an older
flush never lands over a newer writethrough write), and every load, held from before
it picks its EMPTY chunks until they are read and installed.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class Entry:
    __slots__ = ("start", "end", "granted")

    def __init__(self, start, end):
        self.start = start
        self.end = end
        self.granted = False

    def overlaps(self, other):
        return self.start < other.end and other.start < self.end

    def __repr__(self):
        return f"<range {self.start}..{self.end} {'held' if self.granted else 'waiting'}>"


class RangeLocks:
    def __init__(self):
        self._cond = threading.Condition()
        self._line = []  # held and waiting entries, in arrival order

    def request(self, start, end):
        """Join the line for chunks [start, end); granted at once if nothing earlier overlaps."""
        e = Entry(start, max(end, start + 1))
        with self._cond:
            e.granted = not any(o.overlaps(e) for o in self._line)
            self._line.append(e)
        return e

    def wait(self, e, timeout=None):
        """Block until `e` is granted. False on timeout (the entry stays in line)."""
        with self._cond:
            return self._cond.wait_for(lambda: e.granted, timeout)

    def release(self, e):
        with self._cond:
            self._line.remove(e)
            woke = False
            for i, w in enumerate(self._line):
                if not w.granted and not any(o.overlaps(w) for o in self._line[:i]):
                    w.granted = True
                    woke = True
            if woke:
                self._cond.notify_all()

    @contextmanager
    def hold(self, start, end):
        e = self.request(start, end)
        try:
            self.wait(e)
            yield e
        finally:
            self.release(e)

    def __len__(self):
        return len(self._line)
