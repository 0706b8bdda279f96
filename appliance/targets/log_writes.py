"""log-writes <dev> <log_dev>: dm-log-writes. Pass every I/O to <dev>; record every
write, discard, write-zeroes, FLUSH and FUA that completes there, in order, on
<log_dev> (format: appliance/logwrites.py). `appliance log-writes replay` turns
the log back into a device image, up to any flush or mark.

The log says what was durable when, as dm's does: a completed write waits in
memory until the next FLUSH is issued, which takes every write completed so far;
when that FLUSH completes, its writes are logged and then the flush entry. A
write that completes while the flush is in flight belongs to the next flush. A
FUA write is logged as soon as it completes. When several flushes are in flight,
the one that completes logs the writes of every flush issued before it as well
(all of them were complete before it was issued), so the log never puts an older
write after a newer one. Discards and write-zeroes are logged like writes,
without data. The message `mark NAME` logs a mark at once.

<log_dev> must be a file or disk, not @NAME: entries are written with pwrite on
its fd, under the lock that orders completions, before the I/O they record is
acknowledged. Submitting them as I/O would complete on an engine thread that
might be the one waiting.

A table does not wipe a log that has entries (dm-log-writes starts a new log at every
load; here a daemon restarted after a crash, Restart=on-failure, would erase the only
record of what was durable before it). When the table is first resumed (not at load:
the live table may still be logging to the same file) it appends after the entries
there, first a mark `session-N` (N counts the starts on this log), so a replay can
stop at the end of any earlier session. Only a log device with no log on it (no
superblock: a new file, a zeroed first sector) starts a new log. A log that is there
but cannot be read whole refuses the table, rather than being overwritten.
When the log is full the target says so in status and the daemon log, stops
logging, and keeps serving I/O, as dm does. Writes still waiting for a flush
are logged, without a flush entry, when the table is destroyed.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
from types import SimpleNamespace

from .. import io as bio
from .. import logwrites as lw
from . import DeviceArg, Target, TargetError, _word

log = logging.getLogger(__name__)


class _Flush:
    """A FLUSH in flight and the completed writes it makes durable."""

    __slots__ = ("batch",)

    def __init__(self, batch):
        self.batch = batch


class LogWrites(Target):
    name = "log-writes"

    @classmethod
    def parse(cls, args):
        if len(args) != 2:
            raise TargetError("log-writes takes <dev> <log_dev>")
        if args[1].startswith("@"):
            raise TargetError(f"the log device {args[1]} must be a file or disk, not a mapped device")
        return SimpleNamespace(devices=[DeviceArg(args[0], 0), DeviceArg(args[1], 0)])

    @classmethod
    def validate(cls, segment, check):
        """<dev> holds the segment; <log_dev> only its header and one entry."""
        dev, log_dev = cls.parse(list(segment.args)).devices
        check(dev.word, segment.size)
        check(log_dev.word, 2 * lw.SECTOR)
        if os.path.realpath(dev.word) == os.path.realpath(log_dev.word):
            raise TargetError(f"the log device {log_dev.word} is the device being logged")

    def ctr(self, args):
        self.parse(args)
        self.dev = self.get_device(args[0])
        self.check_fits(self.dev, 0, args[0])
        self.log_dev = self.get_device(args[1])
        if self.log_dev is self.dev:
            raise TargetError(f"the log device {args[1]} is the device being logged")
        if getattr(self.log_dev, "fd", None) is None:
            raise TargetError(f"the log device {args[1]} must be a file or disk")
        if self.log_dev.size < 2 * lw.SECTOR:
            raise TargetError(f"the log device {args[1]} is too small: {self.log_dev.size} bytes, "
                              f"at least {2 * lw.SECTOR} needed")
        if self.log_dev.direct and self.log_dev.align > lw.SECTOR:
            raise TargetError(f"the log device {args[1]} has {self.log_dev.align}-byte blocks; "
                              f"the log is written in {lw.SECTOR}-byte sectors (use direct = false)")
        try:  # a log it could not continue refuses the table now, not at resume
            old = lw.existing(self.log_dev.path)
        except lw.LogError as e:
            raise TargetError(f"the log device holds a log it cannot continue: {e}; move it away, or zero "
                              "its first sector to start a new log") from None
        if old is not None:
            old.close()
        self.writer = lw.LogWriter(self.log_dev.fd, self.log_dev.size, self.log_dev.direct)
        self._lock = threading.Lock()
        self._pending = []  # completed writes no flush has taken yet: (flags, offset, length, data)
        self._flushes = []  # flushes in flight, in issue order
        self._started = False
        self.error = None  # why logging stopped

    def dtr(self):
        lock = getattr(self, "_lock", None)
        if lock is not None and self._started:
            with lock:
                for f in self._flushes:
                    self._log_batch(f.batch)
                self._flushes = []
                self._log_batch(self._pending)
                self._pending = []
        super().dtr()

    def resume(self):
        with self._lock:
            if self._started:
                return
            self._started = True
            try:
                old = lw.existing(self.log_dev.path)
                if old is None:
                    self.writer.start()
                    return
                with old:
                    self.writer.follow(old)
                    if old.entries:
                        mark = f"{lw.SESSION_MARK}{lw.sessions(old) + 1}"
                        log.info("log-writes %s: %d entries there; appending after them from mark %s",
                                 self.log_dev.path, len(old.entries), mark)
                        self._log_batch([(lw.MARK, 0, 0, mark.encode())])
            except lw.LogError as e:
                self._stop(f"cannot continue the log: {e}")
            except OSError as e:
                self._stop(f"cannot write the log device: {e.strerror}")

    # the request path

    def map(self, io):
        if io.op == bio.FLUSH:
            with self._lock:
                flush = _Flush(self._pending)
                self._pending = []
                self._flushes.append(flush)
            endio = lambda c: self._flush_done(io, flush, c)  # noqa: E731
        elif io.op in (bio.WRITE, bio.WRITE_ZEROES, bio.TRIM):
            endio = lambda c: self._write_done(io, c)  # noqa: E731
        else:
            endio = lambda c: io.complete(c.error)  # noqa: E731
        clone = bio.IO(io.op, io.offset, io.length, io.buf, io.flags, endio)
        self.dev.submit(clone)
        return bio.SUBMITTED

    def _write_done(self, io, c):
        if not c.error and self.error is None:
            flags = lw.FUA if io.flags & bio.FUA else 0
            if io.op == bio.WRITE:
                data = bytes(io.buf)  # the client's buffer is gone once we complete
            else:
                flags |= lw.DISCARD if io.op == bio.TRIM else lw.ZEROES
                data = b""
            entry = (flags, io.offset, io.length, data)
            with self._lock:
                if flags & lw.FUA:
                    self._log_batch([entry])
                elif self.error is None:  # a stopped log holds nothing in memory
                    self._pending.append(entry)
        io.complete(c.error)

    def _flush_done(self, io, flush, c):
        with self._lock:
            if flush in self._flushes:
                i = self._flushes.index(flush)
                if c.error:
                    # not durable: the next flush in flight, or the next one issued, takes them
                    del self._flushes[i]
                    if i < len(self._flushes):
                        self._flushes[i].batch[:0] = flush.batch
                    else:
                        self._pending[:0] = flush.batch
                else:
                    done, self._flushes = self._flushes[: i + 1], self._flushes[i + 1 :]
                    for f in done:
                        self._log_batch(f.batch)
            # else a later flush completed first and logged this one's writes
            if not c.error:
                self._log_batch([(lw.FLUSH, 0, 0, b"")])
        io.complete(c.error)

    def _log_batch(self, entries):
        """Append entries in order (with the lock held); the first failure stops logging."""
        for flags, offset, length, data in entries:
            if self.error is not None:
                return
            try:
                if not self.writer.append(flags, offset, length, data):
                    self._stop(f"log device full after {self.writer.entries} entries; "
                               "logging stopped, I/O continues unlogged")
            except OSError as e:
                self._stop(f"writing the log failed after {self.writer.entries} entries "
                           f"({e.strerror}); logging stopped, I/O continues unlogged")

    def _stop(self, why):
        self.error = why
        self._pending = []
        for f in self._flushes:
            f.batch = []
        log.error("log-writes %s: %s", self.log_dev.path, why)

    # suspend and resume, reporting, messages

    def block_status(self, offset, length):
        return self.dev.block_status(offset, length)

    def message(self, argv):
        if len(argv) != 2 or argv[0] != "mark":
            raise TargetError("log-writes messages: mark <name>")
        name = argv[1].encode()
        if not name or len(name) > lw.MAX_MARK:
            raise TargetError(f"a mark name is 1 to {lw.MAX_MARK} bytes, got {len(name)}")
        with self._lock:
            if self.error is not None:
                raise TargetError(f"not logging: {self.error}")
            self._log_batch([(lw.MARK, 0, 0, name)])
            if self.error is not None:
                raise TargetError(self.error)
            return f"mark {argv[1]} is entry {self.writer.entries - 1}"

    def status_info(self):
        with self._lock:
            info = {
                "entries": self.writer.entries,
                "log_bytes": self.writer.next,
                "log_size": self.writer.size,
                "waiting_for_flush": len(self._pending) + sum(len(f.batch) for f in self._flushes),
                "log_full": self.writer.full,
                "logging": self.error is None,
            }
            if self.error is not None:
                info["error"] = self.error
        return info

    def status_line(self):
        return " ".join(f"{k}={shlex.quote(v) if isinstance(v, str) else _word(v)}"
                        for k, v in self.status_info().items())
