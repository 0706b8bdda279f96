"""delay <dev> <offset> <delay_ms> [<write_dev> <write_offset> <write_delay_ms>
[<flush_dev> <flush_offset> <flush_delay_ms>]] [serialize]: dm-delay.

Reads go to <dev> at <offset> after <delay_ms>. With the write triple, writes
(writes, write-zeroes, trims) and flushes go to <write_dev> at <write_offset>
after <write_delay_ms>; with the flush triple too, flushes go there instead.
Without them everything uses the first triple. Offsets are in sectors, delays
in milliseconds.

Requests are delayed concurrently: a queue depth of 16 at 5 ms finishes in
about 5 ms. The trailing word `serialize` (not dm's) makes the target a
single spindle instead: one request at a time, each waits for the one before
it, delay included.

One worker thread per target holds the delayed clones (a heap of due times,
or a FIFO when serialized) and submits each to its device when it is due.
The target wants merged requests, as a disk does; serialized, it takes one
at a time from the device queue, so what waits there merges. Suspending lets every
queued request through at once (dm-delay flushes its queue in presuspend) and
resuming delays again. The target never offers a fast map.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import threading
import time
from types import SimpleNamespace

from .. import SECTOR_SIZE
from .. import io as bio
from . import DeviceArg, Target, TargetError, parse_int

log = logging.getLogger(__name__)

READ, WRITE, FLUSH = 0, 1, 2
_CLASS_NAMES = ("read", "write", "flush")
_CLASS_PLURALS = ("reads", "writes", "flushes")
_MAX_DELAY_MS = 2**32 - 1


class _Path:
    """Where one class of request goes: a device, an offset on it, a delay."""

    __slots__ = ("word", "dev", "start", "delay_ms")

    def __init__(self, word, dev, start, delay_ms):
        self.word = word
        self.dev = dev
        self.start = start
        self.delay_ms = delay_ms

    def words(self):
        return [self.word, str(self.start // SECTOR_SIZE), str(self.delay_ms)]


class Delay(Target):
    name = "delay"
    wants_merged = True  # as a disk's queue would: adjacent requests wait and go as one

    @classmethod
    def parse(cls, args):
        args = list(args)
        serialize = bool(args) and args[-1] == "serialize"
        if serialize:
            args.pop()
        if len(args) not in (3, 6, 9):
            raise TargetError(
                "delay takes <dev> <offset> <delay_ms> [<write_dev> <write_offset> <write_delay_ms> "
                f"[<flush_dev> <flush_offset> <flush_delay_ms>]] [serialize]: 3, 6 or 9 arguments, got {len(args)}"
            )
        labels = (("", "offset", "delay_ms"), ("write_dev", "write_offset", "write_delay_ms"),
                  ("flush_dev", "flush_offset", "flush_delay_ms"))
        paths = []
        for k in range(len(args) // 3):
            dev_word, off_word, delay_word = args[3 * k : 3 * k + 3]
            _, off_name, delay_name = labels[k]
            start = parse_int(off_word, off_name) * SECTOR_SIZE
            delay_ms = parse_int(delay_word, delay_name)
            if delay_ms > _MAX_DELAY_MS:
                raise TargetError(f"{delay_name} must be at most {_MAX_DELAY_MS}, got {delay_ms}")
            paths.append((dev_word, start, delay_ms))
        return SimpleNamespace(serialize=serialize, paths=paths,
                               devices=[DeviceArg(word, start) for word, start, _ in paths])

    def ctr(self, args):
        # every number is checked before anything is opened
        parsed = self.parse(args)
        self.serialize = parsed.serialize
        if self.serialize:
            self.queue_depth = 1  # one spindle: the rest wait in the device queue and merge
        self.paths = []
        opened = {}
        for dev_word, start, delay_ms in parsed.paths:
            if dev_word not in opened:
                opened[dev_word] = self.get_device(dev_word)
            dev = opened[dev_word]
            self.check_fits(dev, start, dev_word)
            self.paths.append(_Path(dev_word, dev, start, delay_ms))
        read = self.paths[0]
        write = self.paths[1] if len(self.paths) > 1 else read
        flush = self.paths[2] if len(self.paths) > 2 else write
        self.by_class = (read, write, flush)

        self._cond = threading.Condition(threading.Lock())
        self._heap = []  # (due, seq, io, path, class) when concurrent
        self._fifo = collections.deque()  # (io, path, class) when serialized
        self._seq = itertools.count()
        self._queued = [0, 0, 0]  # per class
        self._delayed = [0, 0, 0]
        self._may_delay = True
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serial_worker if self.serialize else self._timer_worker,
            name=f"delay {args[0]}",
            daemon=True,
        )
        self._thread.start()

    def dtr(self):
        thread = getattr(self, "_thread", None)
        if thread is not None:
            with self._cond:
                self._stopping = True
                self._may_delay = False  # whatever is still queued goes now, not failed
                self._cond.notify_all()
            if thread is not threading.current_thread():
                thread.join(60)
                if thread.is_alive():
                    log.error("delay: the worker did not finish its queue in 60 s")
            self._thread = None
        super().dtr()

    # the request path

    @staticmethod
    def _class(io):
        if io.op == bio.FLUSH:
            return FLUSH
        if io.op in bio.WRITE_OPS:
            return WRITE
        return READ

    def prep_map(self, clone):
        return self.by_class[self._class(clone)].dev

    def map(self, clone):
        cls = self._class(clone)
        path = self.by_class[cls]
        clone.offset += path.start
        if not self.serialize and (path.delay_ms == 0 or not self._may_delay):
            return bio.REMAPPED
        with self._cond:
            if self._stopping:
                clone.error = errno.EIO
                return bio.KILL
            self._queued[cls] += 1
            self._delayed[cls] += 1
            if self.serialize:
                self._fifo.append((clone, path, cls))
                self._cond.notify()
            else:
                due = time.monotonic() + path.delay_ms / 1000.0
                heapq.heappush(self._heap, (due, next(self._seq), clone, path, cls))
                if self._heap[0][2] is clone:
                    self._cond.notify()  # the new head: the worker sleeps less
        return bio.SUBMITTED

    def _dispatch(self, clone, path, done=None):
        """Send a delayed clone on to its device; `done` is set when it completes."""
        endio = clone.endio
        completed = []

        def finished(c):
            completed.append(True)
            try:
                endio(c)
            finally:
                if done is not None:
                    done.set()

        clone.endio = finished
        try:
            path.dev.submit(clone)
        except Exception:
            log.exception("delay: submitting %r to %s failed", clone, path.word)
            if not completed:  # never leave a request unanswered, never answer one twice
                clone.complete(errno.EIO)

    def _timer_worker(self):
        cond = self._cond
        while True:
            with cond:
                while True:
                    if self._heap:
                        if not self._may_delay:
                            break
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        cond.wait(wait)
                    elif self._stopping:
                        return
                    else:
                        cond.wait()
                now = time.monotonic()
                due = []
                while self._heap and (not self._may_delay or self._heap[0][0] <= now):
                    _, _, io, path, cls = heapq.heappop(self._heap)
                    self._queued[cls] -= 1
                    due.append((io, path))
            for io, path in due:
                try:
                    self._dispatch(io, path)
                except Exception:  # a completion hook above us failed; keep serving the rest
                    log.exception("delay: completing %r failed", io)

    def _serial_worker(self):
        cond = self._cond
        while True:
            with cond:
                while not self._fifo:
                    if self._stopping:
                        return
                    cond.wait()
                io, path, cls = self._fifo[0]
                # the spindle's service time: interrupted by a suspend or dtr
                deadline = time.monotonic() + path.delay_ms / 1000.0
                while self._may_delay:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        break
                    cond.wait(wait)
                self._fifo.popleft()
                self._queued[cls] -= 1
            done = threading.Event()
            try:
                self._dispatch(io, path, done)
            except Exception:
                log.exception("delay: completing %r failed", io)
                continue
            done.wait()

    # suspend and resume

    def presuspend(self, noflush=False):
        with self._cond:
            self._may_delay = False
            self._cond.notify_all()

    def resume(self):
        with self._cond:
            if not self._stopping:
                self._may_delay = True

    def fast_map(self):
        return None  # every request is judged by map(); the NBD loop never bypasses it

    def block_status(self, offset, length):
        read = self.by_class[READ]
        return read.dev.block_status(read.start + offset, length)

    # reporting

    def status_info(self):
        with self._cond:
            queued = list(self._queued)
            delayed = list(self._delayed)
            may_delay = self._may_delay
        info = {"queued": sum(queued)}
        for cls, name in enumerate(_CLASS_NAMES):
            info[f"{name}_delay_ms"] = self.by_class[cls].delay_ms
        for cls, name in enumerate(_CLASS_PLURALS):
            info[f"{name}_queued"] = queued[cls]
        for cls, name in enumerate(_CLASS_PLURALS):
            info[f"{name}_delayed"] = delayed[cls]
        info["serialize"] = self.serialize
        info["delaying"] = may_delay
        return info

    def status_table(self):
        words = []
        for p in self.paths:
            words += p.words()
        if self.serialize:
            words.append("serialize")
        return words
