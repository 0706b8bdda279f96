"""A mirror's legs: where each copy lives and what state it is in."""

from __future__ import annotations

import os
import stat
import time

from ... import udev

ALIVE, DEAD, RESYNCING = "alive", "dead", "resyncing"


class Leg:
    """One copy of the data: a device (file, disk, @NAME or NBD export) from `offset` on.

    `stale` holds the regions where this leg may not have the latest data (it missed writes
    while dead, the initial sync has not reached them, a read there failed): it is never read
    there, and the resync copies them to it from a leg that is not stale."""

    def __init__(self, index, word, dev, offset):
        self.index = index
        self.word = word
        self.dev = dev
        self.offset = offset
        self.identity = identity(dev)
        self.dead = False
        self.why = None  # why it is dead
        self.died = 0.0  # when (monotonic)
        self.comes_back = False  # died of a path error: reinstated when its device is back
        self.seen_down = False  # its device said it was down since it died
        self.stale = set()
        self.note = None  # what the log said of it at the first resume (status shows it)
        self.inflight = 0  # the balance of reads: I/O in flight on it

    @property
    def state(self):
        if self.dead:
            return DEAD
        return RESYNCING if self.stale else ALIVE

    @property
    def letter(self):
        """dm's health character: A alive, D dead (a write failed), S out of sync."""
        return {ALIVE: "A", DEAD: "D", RESYNCING: "S"}[self.state]

    def fail(self, why, path):
        self.dead = True
        self.why = why
        self.died = time.monotonic()
        self.comes_back = path
        self.seen_down = False

    def back_by_itself(self):
        """A leg that died of a path error is back when its device says so (an NBD export that
        reconnected, a disk udev reported back)."""
        if not self.dead or not self.comes_back:
            return False
        failed = getattr(self.dev, "failed", None)
        if failed:
            self.seen_down = True
            return False
        return self.seen_down or time.monotonic() - self.died > 2.0


def identity(dev):
    return _identity(dev)[:64]  # as much as the disk log keeps


def _identity(dev):
    """What stands behind a leg's word, so that another file or disk put under the same name is
    not taken for the leg the log knows: a file's file system and inode; a disk's WWN or serial
    (udev's, sysfs'), else its device number, and its partition number. "" for a remote export
    or a mapped device: their word is all there is."""
    fd = getattr(dev, "fd", None)
    if fd is None:
        return ""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return f"file:{os.fstatvfs(fd).f_fsid:x}:{st.st_ino}"
    sysfs = udev.SYSFS
    name = sysfs.name_of(st.st_rdev)
    ids = sorted(sysfs.wwns(name) or sysfs.serials(name)) if name else []
    if not ids:
        return f"disk:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    part = sysfs.uevent(name).get("PARTN")  # a partition shares its disk's WWN
    return f"disk:{ids[0]}" + (f":part{part}" if part else "")
