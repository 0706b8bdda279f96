"""disk: the dirty-region log on a log device (dm-log.c's disk_log), so a crash costs a resync
of the regions that were being written, not of the whole mirror.

Layout of the log device, in 4 KiB blocks:
  block 0   header: magic "APMIRLG1", u32 version (2), u32 primary leg, u64 region size
            (bytes), u64 region count, u32 number of legs, the mirror's 16-byte UUID, then per
            leg (the sidecar record of a raw leg): u8 dead, u16 length, its word from the table,
            u8 length, its identity (legs.identity: the file's inode, the disk's WWN); crc32
            of the block's first 4092 bytes in its last 4 (all little-endian). Version 1 (no
            UUID, no identities) is read and written again as version 2.
  block 1.. bitmap: bit r (byte r // 8, bit r % 8) set = region r may differ between the legs
            (a write was in flight, or a leg missed writes there); clear = the legs are equal.
A zeroed device is formatted on first use: every region set (the initial sync) unless
`nosync`. The log is read when the table is first resumed, not when it is loaded: the live
table may still be writing it (dm reads it in resume too).
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
import zlib

from ... import TargetError
from .... import io as bio
from ..sync_io import sync_io
from .core import CoreLog

BLOCK = 4096
MAGIC = b"APMIRLG1"
VERSION = 2
MAX_IDENTITY = 64  # bytes of a leg's identity kept
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, primary, region_size, region_count, legs
_LEG = struct.Struct("<BH")  # dead, length of the word


def log_bytes(region_count):
    """How big the log device must be for `region_count` regions."""
    bitmap = (region_count + 7) // 8
    return BLOCK + (bitmap + BLOCK - 1) // BLOCK * BLOCK


class DiskLog(CoreLog):
    name = "disk"
    durable_marks = True

    def ctr(self, region_size, region_count, sync=None, dev=None, lock=None, word=None):
        super().ctr(region_size, region_count, sync, dev, lock, word)
        if dev.size < log_bytes(region_count):
            raise TargetError(f"the log device is too small: {dev.size} bytes, "
                              f"{log_bytes(region_count)} needed for {region_count} regions")
        self.bitmap = bytearray(log_bytes(region_count) - BLOCK)
        self.touched = set()  # bitmap blocks changed since the last flush
        self.header_changed = False
        self.loaded = False
        self.formatted = False  # this table formatted the device
        header = self._read_header()  # a device that is not a log for this table is refused at load
        if header:
            _, self.recorded, self.recorded_ids, self.uuid = header

    # the bitmap on disk is `marked | out_of_sync`: every region that may differ

    def _set(self, region, on):
        byte, bit = region >> 3, 1 << (region & 7)
        old = self.bitmap[byte]
        new = old | bit if on else old & ~bit
        if new != old:
            self.bitmap[byte] = new
            self.touched.add(byte // BLOCK)

    def _update(self, region):
        self._set(region, region in self.marked or region in self.out_of_sync)

    def mark_region(self, region):
        super().mark_region(region)
        self._update(region)

    def clear_region(self, region):
        super().clear_region(region)
        self._update(region)

    def set_region_sync(self, region, in_sync):
        super().set_region_sync(region, in_sync)
        self._update(region)

    def set_primary(self, leg):
        if leg != self.primary:
            super().set_primary(leg)
            self.header_changed = True

    def resume(self):
        super().resume()
        if not self.loaded:
            self._load()
            self.loaded = True

    def _read_header(self):
        """(primary, [(word, dead)] per leg, {word: identity}, uuid) from the header, or None
        for a zeroed device; TargetError if it is not a log for this table's regions."""
        head = bytearray(BLOCK)
        if sync_io(self.dev, bio.READ, 0, BLOCK, head):
            raise TargetError("cannot read the log device")
        if not any(head):
            return None
        magic, version, primary, region_size, count, nlegs = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise TargetError("the log device holds something else than a mirror log (zero it to format it)")
        if struct.unpack_from("<I", head, BLOCK - 4)[0] != zlib.crc32(head[: BLOCK - 4]):
            raise TargetError("the mirror log's header is damaged (bad checksum)")
        if version not in (1, VERSION):
            raise TargetError(f"the mirror log is version {version}; this appliance reads versions 1 and {VERSION}")
        if (region_size, count) != (self.region_size, self.region_count):
            raise TargetError(f"the mirror log is for {count} regions of {region_size // 512} sectors; "
                              f"the table has {self.region_count} of {self.region_size // 512}")
        legs, ids, pos = [], {}, _HEADER.size
        mirror_uuid = None
        if version >= 2:
            mirror_uuid = str(uuid.UUID(bytes=bytes(head[pos : pos + 16])))
            pos += 16
        for _ in range(nlegs):
            dead, n = _LEG.unpack_from(head, pos)
            pos += _LEG.size
            word = bytes(head[pos : pos + n]).decode(errors="replace")
            legs.append((word, bool(dead)))
            pos += n
            if version >= 2:
                n = head[pos]
                ids[word] = bytes(head[pos + 1 : pos + 1 + n]).decode(errors="replace")
                pos += 1 + n
        return primary, legs, ids, mirror_uuid

    def _header(self):
        head = bytearray(BLOCK)
        _HEADER.pack_into(head, 0, MAGIC, VERSION, self.primary, self.region_size, self.region_count,
                          len(self.legs))
        pos = _HEADER.size
        if self.uuid is None:  # a version 1 log gets one now
            self.uuid = str(uuid.uuid4())
        head[pos : pos + 16] = uuid.UUID(self.uuid).bytes
        pos += 16
        for word, dead in self.legs:
            raw, ident = word.encode(), self.identities.get(word, "").encode()[:MAX_IDENTITY]
            _LEG.pack_into(head, pos, dead, len(raw))
            pos += _LEG.size
            head[pos : pos + len(raw)] = raw
            pos += len(raw)
            head[pos] = len(ident)
            head[pos + 1 : pos + 1 + len(ident)] = ident
            pos += 1 + len(ident)
        struct.pack_into("<I", head, BLOCK - 4, zlib.crc32(head[: BLOCK - 4]))
        return bytes(head)

    def set_legs(self, legs):
        words = sum(_LEG.size + len(w.encode()) + 1 + MAX_IDENTITY for w, _ in legs)
        if _HEADER.size + 16 + words > BLOCK - 4:
            raise TargetError(f"the legs' names take {words} bytes: more than the log's header holds")
        super().set_legs(legs)
        self.header_changed = True

    def set_identities(self, ids):
        if dict(ids) != self.identities:
            super().set_identities(ids)
            self.header_changed = True

    def set_leg_dead(self, index, dead):
        if self.legs[index][1] != dead:
            super().set_leg_dead(index, dead)
            self.header_changed = True

    def _load(self):
        try:
            header = self._read_header()
            if header is None:
                self._format()
                return
            primary, self.recorded, self.recorded_ids, self.uuid = header
            self._check(sync_io(self.dev, bio.READ, BLOCK, len(self.bitmap), self.bitmap), "read")
        except (TargetError, OSError) as e:
            # no log to trust: every region may differ, and the status says why
            self.failed = self.failed or str(e)
            self.out_of_sync = set(range(self.region_count))
            return
        self.primary = primary
        if self.sync_arg == "sync":  # told to resync it all
            self.bitmap[:] = b"\xff" * len(self.bitmap)
            self.touched = set(range(len(self.bitmap) // BLOCK))
        # regions set on disk may differ: a write was in flight at the crash, or a leg missed it
        self.out_of_sync = {r for r in range(self.region_count) if self.bitmap[r >> 3] & (1 << (r & 7))}
        try:
            self.flush()
        except OSError:
            pass  # failed says why; the regions stay out of sync in memory

    def _format(self):
        self.formatted = True
        self.uuid = str(uuid.uuid4())
        if self.sync_arg != "nosync":
            for r in range(self.region_count):
                self._set(r, True)
        self.touched = set(range(len(self.bitmap) // BLOCK))
        self.header_changed = True
        self.flush()

    def flush(self):
        """Write the changed bitmap blocks and the header, then make them durable. The blocks
        are copied under the mirror's lock (writers change the bitmap under it); the I/O runs
        outside it."""
        with self.lock:
            touched, self.touched = self.touched, set()
            blocks = [(b, bytes(self.bitmap[b * BLOCK : (b + 1) * BLOCK])) for b in sorted(touched)]
            head = None
            if self.header_changed:
                self.header_changed = False
                head = self._header()
        if not blocks and head is None:
            return
        try:
            for b, data in blocks:
                self._check(sync_io(self.dev, bio.WRITE, BLOCK + b * BLOCK, BLOCK, data), "write")
            if head is not None:
                self._check(sync_io(self.dev, bio.WRITE, 0, BLOCK, head), "write")
            self._check(sync_io(self.dev, bio.FLUSH), "flush")
        except OSError:
            with self.lock:  # not durable: the next flush writes them again
                self.touched |= touched
                self.header_changed = self.header_changed or head is not None
            raise
        self.failed = None

    def _check(self, error, what):
        if error:
            self.failed = f"cannot {what} the log device: {os.strerror(int(error))}"
            raise OSError(int(error) or errno.EIO, self.failed)

    def status(self):
        return ["3", "disk", self.word, "D" if self.failed else "A"]

    def status_table(self):
        words = [self.word, str(self.region_size // 512)] + ([self.sync_arg] if self.sync_arg else [])
        return ["disk", str(len(words)), *words]
