"""A merge's progress on disk, so an interrupted merge (kill -9, stop, cancel) resumes where it
stopped instead of copying everything again.

The record is one 512-byte sector in the header area of the bottom layer being merged (FROM),
the sector after the header (byte 512; the header area is 4096 bytes and only the first
sector holds the header), written whole and fdatasynced, so it is old or new after a crash:

      0   8  magic b"ACOWMERG"
      8   4  version (1)
     12   4  flags: 1 into the base (else into the layer under FROM),
                    2 running (a start of the stack resumes it; `cancel` clears it)
     16  16  into: the uuid of the layer under FROM, or the base's identity
     32  16  from: FROM's uuid
     48  16  to: TO's uuid
     64   8  cursor: every grain below it that FROM..TO hold is in `into` and durable there
     72   8  rate: bytes per second the merge was asked to keep to (0: as fast as it goes)
     80   4  crc32 of bytes 0..80

The cursor is written only after what it covers is durable (the layer's data and bitmap by
layer.sync_bitmap, or the base after a FLUSH), so a resumed merge may copy a grain twice,
never skip one. It is valid only for the same into, FROM and TO: a merge of another range
starts from 0 and writes its own record.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass

MAGIC = b"ACOWMERG"
VERSION = 1
INTO_BASE = 1
RUNNING = 2
OFFSET = 512
_RECORD = struct.Struct("<8sII16s16s16sQQ")
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class Record:
    into: uuidlib.UUID
    first: uuidlib.UUID
    last: uuidlib.UUID
    cursor: int = 0
    rate: int = 0
    flags: int = 0

    @property
    def into_base(self):
        return bool(self.flags & INTO_BASE)

    @property
    def running(self):
        return bool(self.flags & RUNNING)

    def same_merge(self, other):
        return (self.into, self.first, self.last, self.into_base) == (other.into, other.first, other.last,
                                                                      other.into_base)

    def pack(self):
        body = _RECORD.pack(MAGIC, VERSION, self.flags, self.into.bytes, self.first.bytes, self.last.bytes,
                            self.cursor, self.rate)
        return (body + _CRC.pack(zlib.crc32(body))).ljust(512, b"\0")


class RecordError(ValueError):
    """A record that is there but damaged: `layer check` names it."""


def read(fd, name):
    """The merge record in the header area of the layer on fd; None if it has none."""
    buf = os.pread(fd, 512, OFFSET)
    if not any(buf):
        return None
    if len(buf) < _RECORD.size + _CRC.size:
        raise RecordError(f"{name}: merge record cut short")
    magic, version, flags, into, first, last, cursor, rate = _RECORD.unpack_from(buf)
    if magic != MAGIC:
        raise RecordError(f"{name}: bytes after the header that are not a merge record (magic {magic!r})")
    if version != VERSION:
        raise RecordError(f"{name}: merge record version {version}, this appliance reads version {VERSION}")
    (stored,) = _CRC.unpack_from(buf, _RECORD.size)
    if stored != zlib.crc32(buf[:_RECORD.size]):
        raise RecordError(f"{name}: merge record checksum mismatch")
    return Record(uuidlib.UUID(bytes=into), uuidlib.UUID(bytes=first), uuidlib.UUID(bytes=last), cursor, rate,
                  flags)


def write(fd, record):
    _put(fd, record.pack())


def clear(fd):
    _put(fd, bytes(512))


def _put(fd, sector):
    if os.pwrite(fd, sector, OFFSET) != len(sector):
        raise OSError(f"short write of the merge record at {OFFSET}")
    os.fdatasync(fd)
