"""multipath <#features> <features>... <#hw_handler_args> ... <#groups> <first_group>
[<selector> <#selector_args> <args>... <#paths> <#path_args> [<path> <path_args>...]...]...:
dm-multipath, request based.

One device over several paths to the same storage: local files or disks, `@NAME`
devices, remote NBD exports. The table is dm's (args.py). The device queue merges
requests before map (wants_merged), so the selector (selectors/) chooses a path per
merged request and load balancing never splits a sequential stream. Paths sit in
priority groups; I/O goes to the current group, and when it has no usable path to the
first group that has one.

Errors are judged by class (appliance.io): a path error fails the path and maps the
request again on another, unseen by the client; a storage error (ENOSPC, a medium
error, a remote server's error reply) goes to the client and the path stays up. With no
usable path, requests are held (bounded by [multipath] queue_max_bytes) while
queue_if_no_path, or for no_path_retry x polling_interval from the loss of the last path;
otherwise, or when the wait ends, they fail. A reload keeps them held and maps them on the
new table (multipathd reloads with noflush). The checker (checker.py) reinstates paths that
answer again and keeps marginal ones out for a growing time; timers.py fails a path that
holds a request unanswered past fast_io_fail_tmo and ends the no_path_retry wait.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import threading
import time

from ... import io as bio
from ...blockdev import DeviceError
from ...config import MultipathConfig
from ...nbd.client import is_uri as nbd_uri
from .. import Target, TargetError
from . import args as table_args
from . import messages, status
from .checker import Checker
from .paths import Group, Path
from .selectors import selector_class
from .timers import Timers

log = logging.getLogger("appliance.multipath")

# requests in flight per path before the rest wait in the device queue, where they merge (as at a
# disk's queue): without it, a client that never pauses gets every request mapped alone
QUEUE_DEPTH_PER_PATH = 8
RESOURCE_RETRIES = 5  # a path out of memory for now: tried again, after a growing delay


class _Attempt:
    """clone.private: the path this attempt went to, and retry counts across attempts."""

    __slots__ = ("path", "started", "path_retries", "resource_retries")

    def __init__(self):
        self.path = None
        self.started = 0.0
        self.path_retries = 0
        self.resource_retries = 0


class Multipath(Target):
    name = "multipath"
    wants_merged = True  # map after merging: a path gets whole runs, not their pieces

    @classmethod
    def parse(cls, args):
        return table_args.parse(args)

    @classmethod
    def device_words(cls, args):
        """The disks the map waits for: none while one of its paths is there (as multipathd, a
        map is made of the paths present; the others start failed and the checker opens them
        when they appear), all of them while none is."""
        words = super().device_words(args)
        return [] if any(_present(w) for w in words) else words

    @classmethod
    def validate(cls, segment, check):
        """What ctr refuses: a path that is there but does not hold the segment, or no path that
        can be opened. A path that cannot be opened now starts failed; with no path there at all,
        every one is checked, so a map that waits for its disks says so."""
        parsed = cls.parse(list(segment.args))
        words = [d.word for d in parsed.devices]
        present = [w for w in words if _present(w)] or words
        unreachable = []
        for word in present:
            try:
                check(word, segment.size)
            except DeviceError as e:
                unreachable.append(e)
        if len(unreachable) == len(present):
            raise unreachable[0]
        return parsed

    def ctr(self, args):
        p = self.parse(args)
        self._take_settings()
        self.queue_if_no_path = p.queue_if_no_path
        self.no_path_retry = p.no_path_retry
        self.kept_features = p.kept_features
        self.hw_handler = p.hw_handler
        self.groups = []
        for n, g in enumerate(p.groups, 1):
            group = Group(n, selector_class(g.selector)(g.selector_args),
                          [g.selector, str(len(g.selector_args)), *g.selector_args])
            for word, path_args in g.paths:
                path = Path(word, group, path_args)
                group.selector.add_path(path, path_args)
                group.paths.append(path)
            self.groups.append(group)
        self.queue_depth = QUEUE_DEPTH_PER_PATH * max(len(g.paths) for g in self.groups)
        self.current = None
        self.next_group = self.groups[p.first_group - 1]
        self._lock = threading.Lock()
        self._held = collections.deque()  # clones waiting for a path
        self._held_bytes = 0
        self._no_path_since = None  # when the last usable path was lost (no_path_retry's clock)
        self._retry_expired = False  # no_path_retry ran out (or fail_if_no_path): until a path returns
        self._no_queue = False  # a flushing suspend: nothing waits for a path meanwhile
        self._parking = False  # a noflush suspend: what waits for a path goes back to the device
        self._stopping = False  # the daemon stops: nothing waits for a path any more
        self._failback_at = None
        self.target_errors = 0
        self.queue_full = 0
        reasons = []
        for path in self.all_paths():
            try:
                self.open_path(path)
            except _Unreachable as e:  # down now: the checker opens it when it answers
                path.reason = str(e)
                reasons.append(str(e))
                continue
            path.reinstate()
            path.reinstated_at = None  # coming up with the table is no reinstate
        if not any(p.dev for p in self.all_paths()):
            raise TargetError(f"no path can be opened: {reasons[0]}")
        self.checker = Checker(self, self.polling_interval)
        self.timers = Timers(self)

    def _take_settings(self):
        settings = self.ctx.settings("multipath") if hasattr(self.ctx, "settings") else None
        s = settings or MultipathConfig()  # outside a daemon: the defaults
        self.polling_interval = float(s.polling_interval)
        self.queue_max_bytes = int(s.queue_max_bytes)
        self.marginal_window = float(s.marginal_window)
        self.failback = str(s.failback)
        self.fast_io_fail_tmo = float(s.fast_io_fail_tmo)
        self.checker_timeout = float(s.checker_timeout)

    def reconfigure(self):
        """A reload may have changed [multipath] (multipathd's reconfigure): the running map takes
        the new settings, keeping its paths and their state."""
        with self._lock:
            self._take_settings()
        self.checker.interval = self.polling_interval
        self.checker.poke()  # the next probe by the new interval, not after the old one

    def dtr(self):
        checker = getattr(self, "checker", None)
        if checker is not None:
            checker.stop()
            self.timers.stop()
            self._stopping = True
            self._fail_held()
        super().dtr()

    def all_paths(self):
        return [p for g in self.groups for p in g.paths]

    def open_path(self, path):
        """Open the path's device; a path smaller than the segment is a table error."""
        try:
            dev = self.get_device(path.word)
        except TargetError as e:
            raise _Unreachable(str(e)) from None
        try:
            self.check_fits(dev, 0, path.word)
            if getattr(dev, "read_only", False) and getattr(self.ctx, "writable", False):
                # as dm refuses a read-only disk in a writable table; down, not a table error:
                # a server may come back writable
                raise _Unreachable(f"{path.word}: read-only, and the map is writable")
        except TargetError:
            self.devices.remove(dev)
            self.ctx.put_device(dev)
            raise
        path.dev = dev

    # choosing a path (under the lock)

    def _group(self):
        nxt, self.next_group = self.next_group, None
        if nxt is not None and nxt.usable():
            self.current = nxt
            return nxt
        cur = self.current
        if cur is not None and not cur.bypassed and cur.usable():
            return cur
        for bypassed in (False, True):  # a disabled group only when nothing else is left
            for g in self.groups:
                if g.bypassed == bypassed and g.usable():
                    self.current = g
                    return g
        return None

    def _select(self, a, nbytes):
        g = self._group()
        if g is None:
            return None
        path = g.selector.select(g.usable(), nbytes)
        a.started = time.monotonic()
        path.start(nbytes, a, a.started)
        g.selector.start_io(path, nbytes)
        return path

    def _queueing(self):
        if self._no_queue or self._stopping:
            return False
        if self.queue_if_no_path:
            return True
        return bool(self.no_path_retry) and not self._retry_expired

    def _usable(self):
        return any(g.usable() for g in self.groups)

    def checks_left(self):
        """no_path_retry's wait left, in polling intervals (multipathd's `N chk`)."""
        if not self.no_path_retry or self._retry_expired:
            return 0
        if self._no_path_since is None:
            return self.no_path_retry
        left = self._no_path_since + self.no_path_retry * self.polling_interval - time.monotonic()
        return max(0, math.ceil(left / self.polling_interval))

    # the request path

    def prep_map(self, clone):
        a = clone.private if isinstance(clone.private, _Attempt) else _Attempt()
        clone.private = a
        with self._lock:
            a.path = self._select(a, clone.length)
        return a.path.dev if a.path else None

    def map(self, clone):
        a = clone.private
        if a.path is not None:
            return bio.REMAPPED  # the offset stays: a path is the whole storage
        with self._lock:
            a.path = self._select(a, clone.length)  # one may have come back since prep_map
            if a.path is not None:
                clone.dev = a.path.dev
                return bio.REMAPPED
            if self._no_path_since is None:
                self._no_path_since = time.monotonic()
            if self._queueing() and self._parking:
                return bio.REQUEUE  # the device keeps it for the table that resumes
            if self._queueing():
                if self._held_bytes + clone.length > self.queue_max_bytes:
                    self.queue_full += 1
                    clone.error = bio.Error(errno.EIO, bio.RESOURCE)  # NBD clients retry ENOMEM: EIO ends it
                    return bio.KILL
                self._held.append(clone)
                self._held_bytes += clone.length
                return bio.SUBMITTED
        clone.error = bio.path_error(errno.EIO)
        return bio.KILL

    def end_io(self, clone, error):
        a = clone.private
        path = a.path if isinstance(a, _Attempt) else None
        if path is None:
            return bio.DONE  # never reached a path (no path left, the queue was full)
        a.path = None
        with self._lock:
            path.end(clone.length, a)
            path.group.selector.end_io(path, clone.length, a.started)
        if not error:
            return bio.DONE
        kind = bio.error_class(error)
        if kind == bio.PATH and a.path_retries < 4 * len(self.all_paths()):
            a.path_retries += 1
            self.fail_path(path, f"I/O error {_why(error)}")
            self.ctx.device.remap(clone)  # another path, or held, or failed if none is left
            return bio.INCOMPLETE
        if kind == bio.RESOURCE and a.resource_retries < RESOURCE_RETRIES:
            a.resource_retries += 1
            self.ctx.device.requeue(clone, delay=0.05 * a.resource_retries)
            return bio.INCOMPLETE
        with self._lock:
            self.target_errors += 1  # the storage said no: every path would say the same
        return bio.DONE

    # paths failing and coming back

    def fail_path(self, path, reason, by_message=False):
        with self._lock:
            was = path.fail(reason, self.marginal_window)
            path.by_message = path.by_message or by_message
            if was:
                path.group.selector.fail_path(path)
                if self._no_path_since is None and not self._usable():
                    self._no_path_since = time.monotonic()
        if was:
            log.warning("%s: path %s failed: %s", self.ctx.device.name, path.word, reason)

    def reinstate(self, path):
        with self._lock:
            if path.active or path.dev is None:
                return
            alone = not path.group.usable()
            path.reinstate()
            path.group.selector.reinstate_path(path)
            self._no_path_since = None
            self._retry_expired = False
            cur = self.current
            if cur is not None and path.group.number < cur.number and not path.group.bypassed:
                if self.failback == "immediate" or (self.failback == "followover" and alone):
                    self.next_group = path.group
                elif self.failback.isdigit():
                    self._failback_at = time.monotonic() + int(self.failback)
        log.warning("%s: path %s reinstated", self.ctx.device.name, path.word)
        self._release_held()

    def checked(self, path, error):
        """The checker's verdict on one path: 0 (it read) or why not."""
        if error:
            if path.active:
                self.fail_path(path, f"checker: {_why(error)}")
            else:
                with self._lock:
                    path.reason = f"checker: {_why(error)}"
                    if path.chk_st != "shaky":
                        path.chk_st = "faulty"
            return
        now = time.monotonic()
        if path.active:
            with self._lock:
                if path.marginal and now - (path.reinstated_at or 0) > self.marginal_window:
                    path.marginal = 0  # it stayed up: no longer marginal
            return
        if now < path.held_until:
            with self._lock:
                path.reason = f"marginal: kept out {path.held_until - now:.0f} s more"
            return
        self.reinstate(path)

    def interval_passed(self):
        """A checker interval went by: a failback timer."""
        with self._lock:
            if self._failback_at is not None and time.monotonic() >= self._failback_at:
                self._failback_at = None
                self.next_group = next((g for g in self.groups if not g.bypassed and g.usable()), None)
        self._release_held()

    def no_path_retry_expired(self):
        """timers.py: no_path_retry x polling_interval went by since the last path was lost."""
        with self._lock:
            if (self.queue_if_no_path or not self.no_path_retry or self._retry_expired
                    or self._no_path_since is None or self._usable()):
                return
            self._retry_expired = True
        log.warning("%s: no path for %d x polling_interval (no_path_retry): failing queued I/O",
                    self.ctx.device.name, self.no_path_retry)
        self._fail_held()

    def path_hung(self, path):
        """timers.py: a request waited fast_io_fail_tmo on this path. It fails, and what it holds
        is given up on (a remote path drops its connections: the requests end with a path error
        and are mapped again on another path); a local device's requests still end by themselves."""
        reason = f"no answer in {self.fast_io_fail_tmo:g} s (fast_io_fail_tmo)"
        self.fail_path(path, reason)
        abort = getattr(path.dev, "abort", None)
        if abort is not None:
            abort(f"{reason}, given up by multipath")

    def daemon_stopping(self):
        """As multipath.conf's `queue_without_daemon no`: with nobody left to bring a path back,
        what waits for one fails now, and so does what comes later with no path."""
        self._stopping = True
        self._fail_held()

    def disk_failed(self, dev):
        """udev: a local path's disk is gone; fail it now, not at the next probe."""
        for path in self.all_paths():
            if path.dev is dev:
                self.fail_path(path, f"disk {getattr(dev, 'failed', None) or 'removed'}")

    def disk_restored(self, dev):
        self.checker.poke()  # probed now, and reinstated if it reads

    def _release_held(self):
        with self._lock:
            if not self._held or not any(g.usable() for g in self.groups):
                return
            held, self._held = self._held, collections.deque()
            self._held_bytes = 0
        for clone in held:
            self.ctx.device.remap(clone)

    def _fail_held(self):
        with self._lock:
            held, self._held = self._held, collections.deque()
            self._held_bytes = 0
        for clone in held:
            clone.complete(bio.path_error(errno.EIO))

    # suspend and resume

    def presuspend(self, noflush=False):
        if not noflush:  # as dm: a flushing suspend does not wait for a path to return
            self._no_queue = True
            self._fail_held()
            return
        # noflush (a reload, as multipathd's): what waits for a path goes back to the device,
        # which maps it again on resume, on the new table if one is loaded
        with self._lock:
            self._parking = True
            held, self._held = self._held, collections.deque()
            self._held_bytes = 0
        for clone in held:
            self.ctx.device.requeue(clone)

    def resume(self):
        self._no_queue = False
        self._parking = False

    def block_status(self, offset, length):
        with self._lock:
            path = next((p for p in self.all_paths() if p.active), None)
        if path is None:
            return [(length, 0)]
        return path.dev.block_status(offset, length)

    # messages and status (messages.py, status.py)

    def message(self, argv):
        return messages.message(self, argv)

    def status_line(self):
        return status.status_line(self)

    def status_table(self):
        return status.status_table(self)

    def status_info(self):
        return status.status_info(self)

class _Unreachable(TargetError):
    """A path that cannot be opened now (a remote server down): not a table error."""


def _present(word):
    """Whether a path's device is there now, short of opening it: a disk that is attached, a file
    that exists. An `@NAME` device or a remote export counts as there (the daemon makes the one,
    the table's load reaches the other)."""
    from ... import udev  # udev knows the targets: imported late

    if udev.is_disk_word(word):
        return udev.find(word) is not None
    if word.startswith("@") or nbd_uri(word):
        return True
    return os.path.exists(word)


def _why(error):
    if isinstance(error, int) and error > 0:
        return f"{bio.error_name(error)} ({os.strerror(error)})"
    return str(error)
