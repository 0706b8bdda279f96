"""A mapped device's request queue: where adjacent requests merge before map.

Requests that lie in one segment whose target queues (it wants merged
requests, or it declares a queue depth) wait here. They leave when the
target has room (fewer than `queue_depth` of the queue's requests in
flight; 0 = no limit) and the submitter is not holding a batch back (a
plugged NBD connection unplugs after each batch it read). On the way out,
contiguous requests of the same operation and flags merge into one, up to
MAX_MERGE bytes, as Linux's elevator back-merges bios; the core completes
each of them separately after.

For a target that wants merged requests, a run that continues one still in
flight (it starts where that one ends) waits for it to complete, unless it
is MAX_MERGE already: a client streams its requests in a few at a time, as
it hears of completions, and dispatching each few at once would send the
target a stream of small pieces however busy it is. Waiting costs the
stream nothing, as one run of it is always in flight. When that run
completes, the next one, if it holds fewer requests than the one that
completed, waits up to REFILL more for the client to answer the completion
with new requests (CFQ's slice_idle, for a stream that merged): without it,
runs alternate between the many that came while one was away and the few
that came after.

Requests in other segments never enter the queue (and the fast path never
leaves C), so the queue costs only the targets that ask for it.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time

from . import io as bio

MAX_MERGE = 1 << 20
MERGEABLE = (bio.READ, bio.WRITE, bio.WRITE_ZEROES, bio.TRIM)
# seconds a stream's next run, smaller than the one that just completed, may wait for the client
# to answer that completion with more (as CFQ's slice_idle waits for a process's next request)
REFILL = 0.002


class _Clock:
    """One thread for the process that calls queues' run() at their deadlines (REFILL)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.heap = []  # (deadline, n, queue)
        self.n = 0
        self.thread = None

    def at(self, deadline, queue):
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="request-queue-clock", daemon=True)
                self.thread.start()
            self.n += 1
            heapq.heappush(self.heap, (deadline, self.n, queue))
            self.cond.notify()

    def _run(self):
        while True:
            with self.cond:
                while not self.heap or self.heap[0][0] > time.monotonic():
                    self.cond.wait(self.heap[0][0] - time.monotonic() if self.heap else None)
                _, _, queue = heapq.heappop(self.heap)
            try:
                queue.run()
            except Exception:  # a held run must never be left waiting: the clock goes on
                logging.getLogger("appliance.device").exception("request queue run failed")


_clock = _Clock()


class RequestQueue:
    """One per live table: `dispatch(members, segment)` maps a (merged) request."""

    def __init__(self, targets, dispatch):
        self.dispatch = dispatch
        self.merge = [bool(t.wants_merged) for t in targets]
        self.depth = [t.queue_depth or 0 for t in targets]
        self.queues = [bool(m or d) for m, d in zip(self.merge, self.depth)]
        self.busy = [0] * len(targets)
        self.tails = [{} for _ in targets]  # per segment: (op, end offset) -> runs in flight ending there
        self.ended = [{} for _ in targets]  # per segment: (op, end offset) -> (requests, refill deadline)
        self.waiting = []  # [(io, segment)] in arrival order
        self.running = False  # a thread is dispatching
        self.lock = threading.Lock()
        # counters: requests that came in, that were merged into another, that went to map
        self.requests_in = 0
        self.merged = 0
        self.dispatched = 0

    def count_direct(self):
        """A request that bypasses the queue (no target in its range queues)."""
        with self.lock:
            self.requests_in += 1
            self.dispatched += 1

    def add(self, io, segment):
        with self.lock:
            self.requests_in += 1
            self.waiting.append((io, segment))

    def run(self):
        """Dispatch what may go now. One thread at a time dispatches, and a target that
        completes inside map() does not recurse through here: the running thread loops."""
        with self.lock:
            if self.running:
                return  # the running thread takes again after its dispatches
            self.running = True
        while True:
            with self.lock:
                batches = self._take()
                if not batches:
                    self.running = False
                    return
            for members, segment in batches:
                self.dispatch(members, segment)

    def done(self, segment, io, merged=1):
        """A request (`io`: one, or the one `merged` requests merged into) the queue dispatched
        has completed, or was parked (a requeue gives its place back, as dm's): its target has
        room again."""
        with self.lock:
            self.busy[segment] -= 1
            tails = self.tails[segment]
            end = (io.op, io.offset + io.length)
            if tails.get(end, 0) > 1:
                tails[end] -= 1
            else:
                tails.pop(end, None)
            if self.merge[segment]:
                ended = self.ended[segment]
                if len(ended) > 64:
                    ended.clear()  # streams that did not go on
                ended[end] = (merged, time.monotonic() + REFILL)
            more = bool(self.waiting)
        if more:
            self.run()

    def _take(self):
        """Under the lock: the (merged) requests whose targets have room, oldest first."""
        out = []
        now = wake = None
        by_segment = {}
        for io, seg in self.waiting:
            by_segment.setdefault(seg, []).append(io)
        left = []
        for seg, ios in by_segment.items():
            room = self.depth[seg] - self.busy[seg] if self.depth[seg] else len(ios)
            if room <= 0:
                left += [(io, seg) for io in ios]
                continue
            runs = _merge(ios) if self.merge[seg] and len(ios) > 1 else [[io] for io in ios]
            tails, ended = self.tails[seg], self.ended[seg]
            for members in runs:
                first, last = members[0], members[-1]
                key, size = (first.op, first.offset), last.offset + last.length - first.offset
                if room <= 0 or (self.merge[seg] and key in tails and first.op in MERGEABLE and size < MAX_MERGE):
                    left += [(io, seg) for io in members]  # no room, or it grows behind its predecessor
                    continue
                before = ended.pop(key, None) if self.merge[seg] else None
                # a client that sends one request at a time never waits here: only a stream that
                # merged, and whose next run has fewer requests so far
                if before is not None and len(members) < before[0] and size < MAX_MERGE:
                    if now is None:
                        now = time.monotonic()
                    if now < before[1]:  # its predecessor just ended: the client's answer comes
                        ended[key] = before
                        left += [(io, seg) for io in members]
                        wake = min(wake or before[1], before[1])
                        continue
                room -= 1
                end = (first.op, last.offset + last.length)
                tails[end] = tails.get(end, 0) + 1
                out.append((members, seg))
                self.busy[seg] += 1
                self.dispatched += 1
                self.merged += len(members) - 1
        self.waiting = left
        if wake is not None:
            _clock.at(wake, self)
        return out

    def status(self):
        with self.lock:
            return {"in": self.requests_in, "merged": self.merged, "dispatched": self.dispatched,
                    "queued": len(self.waiting)}


def _merge(ios):
    """Runs of contiguous requests with the same op and flags, in order of each run's first arrival."""
    order = {id(io): n for n, io in enumerate(ios)}
    runs = []
    current = None
    size = 0
    for io in sorted(ios, key=lambda x: (x.op, x.flags, x.offset)):
        last = current[-1] if current else None
        if (
            last is not None
            and io.op in MERGEABLE
            and io.op == last.op
            and io.flags == last.flags
            and io.offset == last.offset + last.length
            and size + io.length <= MAX_MERGE
        ):
            current.append(io)
            size += io.length
        else:
            current = [io]
            size = io.length
            runs.append(current)
    runs.sort(key=lambda run: min(order[id(x)] for x in run))
    return runs


def merged_io(members, endio):
    """One IO for a run of contiguous requests; `scatter()` copies a merged read back out."""
    first = members[0]
    length = sum(m.length for m in members)
    if first.op == bio.WRITE:
        buf = b"".join(m.buf for m in members)
    elif first.op == bio.READ:
        buf = memoryview(bytearray(length))
    else:
        buf = None
    return bio.IO(first.op, first.offset, length, buf, first.flags, endio)


def scatter(io, members):
    """A merged read is done: each member gets its part of the data."""
    pos = 0
    for m in members:
        m.buf[: m.length] = io.buf[pos : pos + m.length]
        pos += m.length
