"""Disks: stable names, waiting for them, and noticing when they go and come back.

A table may name a disk (wherever a target takes a device) as
  /dev/sdb, /dev/disk/by-id/wwn-0x5000c500a1b2c3d4-part1   a path
  wwn:0x5000c500a1b2c3d4   wwn:0x5000c500a1b2c3d4-part1      the disk's World Wide Name
  serial:ZFN0ABCD          serial:ZFN0ABCD-part2             the disk's serial number
wwn: and serial: are looked up in sysfs (and in udev's database when udevd
runs), so they work where /dev/disk/by-id does not exist (containers, early
boot, machines without udevd). A by-id path whose link is missing falls back
to the same lookup for wwn-* names.

Kernel block events (pyudev, netlink source "kernel": no udevd needed) go to
the daemon's run loop. A disk that is removed, or whose capacity drops below
what we opened, fails: its descriptor is replaced by one on which every read
and write fails (so no thread, fast path included, can touch a descriptor
number the kernel hands out again), the fast maps over it are rebuilt without
it, and I/O to it ends with EIO. When a disk with the same name comes back
with enough capacity it is reopened onto the same descriptor number and the
devices over it serve again. A target that must know (a mirror leg, a
multipath path) may define `disk_failed(dev)` / `disk_restored(dev)`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
import time

from .blockdev import DeviceError, _open
from .table import TableError, parse_line
from .targets import target_class

log = logging.getLogger(__name__)

PREFIXES = ("wwn:", "serial:")
BY_ID = "/dev/disk/by-id/"
_PART = re.compile(r"^(.*)-part(\d+)$")


def is_disk_word(word):
    return word.startswith("/dev/") or word.startswith(PREFIXES)


def disk_words(table):
    """The disks in table lines, in order, once each: of the words each target says name its
    underlying devices (Target.device_words), those that name a disk. A file a target creates
    itself, such as ramback's <ram> in /dev/shm, is not a disk to wait for."""
    out = {}
    for lineno, line in enumerate(table, 1):
        try:
            seg = parse_line(line, lineno)
        except TableError:
            continue  # a comment, or a line that loading the table refuses with its reason
        for w in target_class(seg.target).device_words(list(seg.args)):
            if is_disk_word(w):
                out[w] = None
    return list(out)


# ---- lookup ---------------------------------------------------------------------


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return None


def _norm_wwn(v):
    v = v.strip().lower()
    for prefix in ("naa.", "eui.", "0x"):
        if v.startswith(prefix):
            v = v[len(prefix) :]
    return v


class Sysfs:
    """Block devices as sysfs and udev's database describe them. Roots are parameters for tests."""

    def __init__(self, sys="/sys", udevdb="/run/udev/data", dev="/dev"):
        self.sys, self.udevdb, self.dev = sys, udevdb, dev

    def names(self):
        try:
            return sorted(os.listdir(os.path.join(self.sys, "class/block")))
        except OSError:
            return []

    def _dir(self, name):
        return os.path.join(self.sys, "class/block", name)

    def uevent(self, name):
        out = {}
        for line in (_read(os.path.join(self._dir(name), "uevent")) or "").splitlines():
            k, _, v = line.partition("=")
            out[k] = v
        return out

    def udev_props(self, name):
        ue = self.uevent(name)
        data = _read(os.path.join(self.udevdb, f"b{ue.get('MAJOR')}:{ue.get('MINOR')}")) or ""
        return {k: v for k, _, v in (line[2:].partition("=") for line in data.splitlines() if line.startswith("E:"))}

    def node(self, name):
        return os.path.join(self.dev, self.uevent(name).get("DEVNAME") or name)

    def size(self, name):
        """Capacity in bytes (sysfs counts 512-byte sectors), 0 if unknown."""
        v = _read(os.path.join(self._dir(name), "size"))
        return int(v) * 512 if v and v.isdigit() else 0

    def capacity(self, rdev):
        """Bytes of the block device with this dev_t, from sysfs (no open), or None if unknown."""
        v = _read(os.path.join(self.sys, f"dev/block/{os.major(rdev)}:{os.minor(rdev)}/size"))
        return int(v) * 512 if v and v.isdigit() else None

    def has_media(self, path):
        """False for a block device of capacity 0 (an unbound loop device, an empty drive)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return not stat.S_ISBLK(st.st_mode) or self.capacity(st.st_rdev) != 0

    def is_partition(self, name):
        return _read(os.path.join(self._dir(name), "partition")) is not None

    def partition(self, disk, number):
        d = self._dir(disk)
        try:
            children = os.listdir(d)
        except OSError:
            return None
        for child in children:
            if child.startswith(disk) and _read(os.path.join(d, child, "partition")) == str(number):
                return child
        return None

    def wwns(self, name):
        props = self.udev_props(name)
        found = [props.get("ID_WWN_WITH_EXTENSION"), props.get("ID_WWN")]
        d = self._dir(name)
        found += [_read(os.path.join(d, "wwid")), _read(os.path.join(d, "device/wwid"))]
        return {_norm_wwn(v) for v in found if v}

    def serials(self, name):
        props = self.udev_props(name)
        found = [props.get("ID_SERIAL_SHORT"), props.get("ID_SERIAL"), props.get("ID_SCSI_SERIAL")]
        d = self._dir(name)
        found += [_read(os.path.join(d, "serial")), _read(os.path.join(d, "device/serial"))]
        pg80 = os.path.join(d, "device/vpd_pg80")  # SCSI unit serial number page: 4 header bytes
        try:
            with open(pg80, "rb") as f:
                raw = f.read()
            found.append(raw[4:].decode("ascii", "replace").strip(" \0"))
        except OSError:
            pass
        return {v for v in found if v}

    def find(self, word):
        """The device node a disk name stands for, or None while no such disk is attached."""
        if word.startswith("/dev/"):
            if os.path.exists(word):
                return word if self.has_media(word) else None
            if word.startswith(BY_ID) and word[len(BY_ID) :].startswith("wwn-"):
                return self.find("wwn:" + word[len(BY_ID) + 4 :])
            return None
        kind, _, ident = word.partition(":")
        m = _PART.match(ident)
        ident, part = (m.group(1), int(m.group(2))) if m else (ident, None)
        if kind == "wwn":
            want = _norm_wwn(ident)
            match = [n for n in self.names() if not self.is_partition(n) and want in self.wwns(n)]
        elif kind == "serial":
            match = [n for n in self.names() if not self.is_partition(n) and ident in self.serials(n)]
        else:
            return None
        if not match:
            return None
        if len(match) > 1:  # multipath: one disk, several paths; a later issue picks among them
            log.warning("%s matches %s; using %s", word, ", ".join(match), match[0])
        name = match[0] if part is None else self.partition(match[0], part)
        if name is None:
            return None
        node = self.node(name)
        return node if os.path.exists(node) else None

    def name_of(self, devnum):
        """Kernel name of the block device with this dev_t, or None."""
        want = f"{os.major(devnum)}:{os.minor(devnum)}"
        for n in self.names():
            if _read(os.path.join(self._dir(n), "dev")) == want:
                return n
        return None


SYSFS = Sysfs()


def find(word):
    return SYSFS.find(word)


def resolve(word):
    """For DevicePool: the path to open for a table word; raises if a named disk is absent."""
    if not word.startswith(PREFIXES) and not (word.startswith(BY_ID) and not os.path.exists(word)):
        return word
    node = SYSFS.find(word)
    if node is None:
        raise DeviceError(errno.ENOENT, f"{word}: no such disk attached")
    return node


# ---- kernel events ---------------------------------------------------------------


class Monitor:
    """Kernel block uevents -> `callback(action, kernel_name, devnum, size_bytes)` from a thread."""

    def __init__(self, callback):
        import pyudev

        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source="kernel")
        self.monitor.filter_by("block")
        self.callback = callback
        self._stop = threading.Event()
        self.monitor.start()
        self.thread = threading.Thread(target=self._run, name="udev", daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                dev = self.monitor.poll(timeout=0.5)
            except Exception:
                log.exception("udev monitor failed; disk hot-plug is not watched any more")
                return
            if dev is None:
                continue
            size = SYSFS.size(dev.sys_name) if dev.action != "remove" else 0
            log.debug("uevent %s %s %s size=%d", dev.action, dev.sys_name, dev.device_number, size)
            self.callback(dev.action, dev.sys_name, dev.device_number, size)

    def stop(self):
        self._stop.set()


def wait_for(words, timeout, progress=None):
    """Wait until every disk in `words` is attached, at most `timeout` seconds; return those still missing.
    `progress(missing, seconds_left)` is called about once a second."""
    missing = [w for w in words if find(w) is None]
    if not missing or timeout <= 0:
        return missing
    events = threading.Event()
    try:
        mon = Monitor(lambda *a: events.set())
    except Exception as e:  # no netlink (unusual): poll sysfs instead
        log.warning("cannot watch kernel events (%s); polling for disks", e)
        mon = None
    deadline = time.monotonic() + timeout
    try:
        while missing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if progress:
                progress(missing, left)
            events.wait(min(1.0, left))
            events.clear()
            missing = [w for w in missing if find(w) is None]
    finally:
        if mon:
            mon.stop()
    return missing


# ---- failing and re-attaching open disks -----------------------------------------


_POISON = None


def _poison_fd():
    """A descriptor on which read fails (EISDIR) and write fails (EBADF): "/" opened read-only."""
    global _POISON
    if _POISON is None:
        _POISON = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _POISON


class Disks:
    """The open disks of a daemon: fail them when the kernel takes them away, reopen them when they return."""

    def __init__(self, pool, registry):
        self.pool = pool
        self.registry = registry
        self.lost = {}  # FileDevice -> (why, time.time())

    def users(self, fdev):
        out = []
        for md in list(self.registry.devices.values()):
            table = md.table
            if table and any(fdev in t.iterate_devices() for t in table.targets):
                out.append(md)
        return out

    def _notify_targets(self, fdev, hook):
        for md in self.users(fdev):
            for t in md.table.targets:
                fn = getattr(t, hook, None)
                if fn is not None and fdev in t.iterate_devices():
                    try:
                        fn(fdev)
                    except Exception:
                        log.exception("%s: %s.%s failed", md.name, t.name, hook)

    def fail(self, fdev, why):
        if fdev.failed:
            return
        fdev.failed = why
        # releases the kernel's disk (and its O_EXCL claim) at once; the number stays ours
        os.dup2(_poison_fd(), fdev.fd, inheritable=False)
        self.lost[fdev] = (why, time.time())
        users = self.users(fdev)
        log.error("disk %s (%s) %s: I/O to %s fails until it returns", fdev.word, fdev.path, why,
                  ", ".join(md.name for md in users) or "no device")
        for md in users:
            md.refresh_fastmap()
        self._notify_targets(fdev, "disk_failed")

    def reattach(self, fdev):
        node = find(fdev.word)
        if node is None:
            return False
        try:
            new = _open(node, fdev.writable, fdev.direct, fdev.exclusive)
        except DeviceError as e:
            log.warning("disk %s is back at %s but cannot be reopened: %s", fdev.word, node, e)
            return False
        if new.size < fdev.size:
            os.close(new.fd)
            log.warning("disk %s is back at %s with %d bytes, fewer than the %d it had; not re-attached",
                        fdev.word, node, new.size, fdev.size)
            return False
        os.dup2(new.fd, fdev.fd, inheritable=False)
        os.close(new.fd)
        old_key, new_key = os.path.realpath(fdev.path), os.path.realpath(node)
        if old_key != new_key:
            with self.pool._lock:
                self.pool._devices.pop(old_key, None)
                self.pool._devices[new_key] = fdev
            fdev.path = node
        fdev.rdev = os.fstat(fdev.fd).st_rdev
        fdev.logical_block = new.logical_block
        fdev.failed = None
        self.lost.pop(fdev, None)
        users = self.users(fdev)
        log.warning("disk %s is back (%s): re-attached to %s", fdev.word, node, ", ".join(md.name for md in users) or "no device")
        for md in users:
            md.refresh_fastmap()
        self._notify_targets(fdev, "disk_restored")
        return True

    def event(self, action, name, devnum, size):
        """One kernel event; True if anything changed."""
        changed = False
        if action in ("remove", "change"):
            for fdev in self.pool.devices():
                if fdev.failed or getattr(fdev, "rdev", None) != devnum:
                    continue
                if action == "remove":
                    self.fail(fdev, f"was removed ({name})")
                    changed = True
                elif size < fdev.size:
                    self.fail(fdev, f"shrank to {size} bytes ({name})")
                    changed = True
        if action in ("add", "change", "move", "online") and size > 0:
            changed |= self.retry()
        return changed

    def retry(self):
        changed = False
        for fdev in list(self.lost):
            if fdev.refs > 0 and self.reattach(fdev):
                changed = True
        for fdev in [f for f in self.lost if f.refs <= 0]:  # closed by a reload meanwhile
            del self.lost[fdev]
        return changed

    def status(self):
        return [{"disk": f.word, "path": f.path, "state": f"missing: {why}", "since": since,
                 "devices": [md.name for md in self.users(f)]} for f, (why, since) in list(self.lost.items())]
