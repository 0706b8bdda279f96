"""The log-writes log: its on-disk format, writing it, reading it, and replaying it.

Modelled on dm-log-writes' log, in bytes instead of sectors because NBD clients
may address single bytes. Everything is little-endian and sector aligned:

    sector 0        superblock: magic "APLWLOG1", version u64, entries u64,
                    flags u64 (1 = the log device filled up: later I/O is missing),
                    sector size u32
    then, per entry one header sector: offset u64, length u64 (bytes on the
                    device), flags u64, data_len u64; followed by data_len bytes
                    of data padded to the sector size (a write's data, a mark's name)

Entry flags: FLUSH 1, FUA 2, DISCARD 4, MARK 8, ZEROES 16 (dm has METADATA at 16;
a write-zeroes is ours). A write has none of FLUSH/DISCARD/MARK/ZEROES.

The superblock's entry count is rewritten after each entry, so a log read at any
moment (or after a kill -9) holds whole entries only. That is also why a new table
can continue a log after a crash: its end is where the counted entries end.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
import sys
from dataclasses import dataclass

MAGIC = b"APLWLOG1"
VERSION = 1
SECTOR = 512
_SUPER = struct.Struct("<8sQQQI")
_ENTRY = struct.Struct("<QQQQ")

FLUSH, FUA, DISCARD, MARK, ZEROES = 1, 2, 4, 8, 16
SUPER_FULL = 1
MAX_MARK = 255  # bytes of a mark's name
SESSION_MARK = "session-"  # the mark a table logs before it appends to a log that has entries


class LogError(ValueError):
    """A log that cannot be read or replayed: one sentence naming the file and what is wrong."""


def _round_up(n):
    return (n + SECTOR - 1) // SECTOR * SECTOR


def entry_size(data_len):
    return SECTOR + _round_up(data_len)


def kind(flags):
    for bit, name in ((MARK, "mark"), (FLUSH, "flush"), (DISCARD, "discard"), (ZEROES, "zeroes")):
        if flags & bit:
            return name
    return "write"


def flag_names(flags):
    return ",".join(n for bit, n in ((FLUSH, "flush"), (FUA, "fua"), (DISCARD, "discard"), (MARK, "mark"),
                                     (ZEROES, "zeroes")) if flags & bit) or "-"


class LogWriter:
    """Appends entries to a log file or disk with pwrite on its fd.

    Not thread-safe: the target calls it under the lock that orders its completions.
    Writes are synchronous on purpose: an entry is on the log before the I/O it
    records is acknowledged upward. O_DIRECT logs get a page-aligned buffer.
    """

    def __init__(self, fd, size, direct=False):
        self.fd = fd
        self.size = size - size % SECTOR
        self.direct = direct
        self.entries = 0
        self.next = SECTOR  # byte offset of the next entry
        self.full = False

    def start(self):
        """A new, empty log."""
        self.entries, self.next, self.full = 0, SECTOR, False
        self._super()

    def follow(self, log):
        """Append after the entries of `log`, the one already on this device (a Log read whole)."""
        self.entries, self.next, self.full = len(log.entries), log.end, log.full

    def append(self, flags, offset, length, data=b""):
        """Write one entry. Returns False, and marks the log full, when it does not fit."""
        if self.full:
            return False
        need = entry_size(len(data))
        if self.next + need > self.size:
            self.full = True
            self._super()
            return False
        buf = bytearray(need)
        _ENTRY.pack_into(buf, 0, offset, length, flags, len(data))
        buf[SECTOR : SECTOR + len(data)] = data
        self._pwrite(buf, self.next)
        self.next += need
        self.entries += 1
        self._super()
        return True

    def _super(self):
        buf = bytearray(SECTOR)
        _SUPER.pack_into(buf, 0, MAGIC, VERSION, self.entries, SUPER_FULL if self.full else 0, SECTOR)
        self._pwrite(buf, 0)

    def _pwrite(self, buf, offset):
        if self.direct:
            bounce = mmap.mmap(-1, len(buf))
            bounce[:] = buf
            buf = bounce
        try:
            view = memoryview(buf)
            done = 0
            while done < len(buf):
                done += os.pwrite(self.fd, view[done:], offset + done)
            view.release()
        finally:
            if self.direct:
                buf.close()


@dataclass(frozen=True)
class Entry:
    index: int
    flags: int
    offset: int
    length: int
    data_pos: int  # where its data starts in the log
    data_len: int

    @property
    def kind(self):
        return kind(self.flags)


class Log:
    """A log opened for reading: `entries` checked against the file, `full` from the superblock."""

    def __init__(self, path):
        self.path = path
        try:
            self.f = open(path, "rb")
        except OSError as e:
            raise LogError(f"{path}: cannot open: {e.strerror}") from None
        try:
            self._read()
        except BaseException:
            self.f.close()
            raise

    def _read(self):
        path = self.path
        head = self.f.read(SECTOR)
        if len(head) < _SUPER.size:
            raise LogError(f"{path}: not a log-writes log (shorter than its superblock)")
        magic, version, count, sflags, sector = _SUPER.unpack_from(head)
        if magic != MAGIC:
            raise LogError(f"{path}: not a log-writes log (bad magic {magic!r})")
        if version != VERSION:
            raise LogError(f"{path}: log version {version}, this appliance reads version {VERSION}")
        if sector != SECTOR:
            raise LogError(f"{path}: sector size {sector}, expected {SECTOR}")
        self.full = bool(sflags & SUPER_FULL)
        size = self.f.seek(0, os.SEEK_END)  # st_size is 0 for a disk; through f, which buffers
        self.entries = []
        pos = SECTOR
        for i in range(count):
            self.f.seek(pos)
            raw = self.f.read(_ENTRY.size)
            if len(raw) < _ENTRY.size:
                raise LogError(f"{path}: entry {i} of {count} is past the end of the log")
            offset, length, flags, data_len = _ENTRY.unpack(raw)
            if pos + entry_size(data_len) > size:
                raise LogError(f"{path}: entry {i} of {count} ({data_len} bytes of data) runs past the end of the log")
            if kind(flags) == "write" and data_len != length:
                raise LogError(f"{path}: entry {i} is a write of {length} bytes with {data_len} bytes of data")
            self.entries.append(Entry(i, flags, offset, length, pos + SECTOR, data_len))
            pos += entry_size(data_len)
        self.end = pos  # where the next entry goes

    def data(self, e):
        self.f.seek(e.data_pos)
        return self.f.read(e.data_len)

    def mark_name(self, e):
        return self.data(e).decode("utf-8", "replace")

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def existing(path):
    """The log already on the file or disk at `path` (a Log: close it), or None if it holds none
    (no superblock magic: a new file, a zeroed disk). Raises LogError for a log that is there but
    cannot be read whole (another version, entries cut short)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror}") from None
    return Log(path)


def sessions(log):
    """How many times a table started logging on `log`: 1, plus one per session mark."""
    return 1 + sum(1 for e in log.entries if e.kind == "mark" and log.mark_name(e).startswith(SESSION_MARK))


def select(log, *, limit=None, end_mark=None, to_flush=None, last_flush=False, durable=False):
    """The entries a replay applies, in order, for the stop rule given (at most one)."""
    entries = log.entries
    if limit is not None:
        if limit < 0:
            raise LogError(f"--limit must be at least 0, got {limit}")
        return entries[:limit]
    if end_mark is not None:
        for e in entries:
            if e.kind == "mark" and log.mark_name(e) == end_mark:
                return entries[: e.index + 1]
        raise LogError(f"{log.path}: no mark named {end_mark!r} in the log")
    flushes = [e.index for e in entries if e.kind == "flush"]
    if to_flush is not None:
        if to_flush < 1 or to_flush > len(flushes):
            raise LogError(f"{log.path}: --to-flush {to_flush}: the log has {len(flushes)} flush entries")
        return entries[: flushes[to_flush - 1] + 1]
    if last_flush or durable:
        upto = flushes[-1] + 1 if flushes else 0
        chosen = entries[:upto]
        if durable:  # a FUA write is durable on its own; the writes around it are not
            chosen += [e for e in entries[upto:] if e.flags & FUA and e.kind in ("write", "zeroes", "discard")]
        return chosen
    return entries


def replay(log, dev_path, entries):
    """Apply `entries` to the file or disk at dev_path in order, then fsync it.
    Discards replay as zeros, which is what a trimmed file reads as. Returns counts by kind."""
    if not os.path.exists(dev_path) and os.path.abspath(dev_path).startswith("/dev/"):
        # a mistyped disk name must not become a regular file in /dev that takes the writes
        raise LogError(f"{dev_path}: no such device")
    try:
        fd = os.open(dev_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise LogError(f"{dev_path}: cannot open for replay: {e.strerror}") from None
    counts = {}
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
            for e in entries:
                if e.kind not in ("flush", "mark") and e.offset + e.length > size:
                    raise LogError(f"{dev_path}: {size} bytes, too small for entry {e.index} "
                                   f"at {e.offset}+{e.length}")
        elif not stat.S_ISREG(st.st_mode):
            raise LogError(f"{dev_path}: not a regular file or block device")
        for e in entries:
            k = e.kind
            counts[k] = counts.get(k, 0) + 1
            if k == "write":
                _pwrite_all(fd, log.data(e), e.offset)
            elif k in ("zeroes", "discard"):
                done = 0
                while done < e.length:
                    n = min(e.length - done, 1 << 20)
                    _pwrite_all(fd, bytes(n), e.offset + done)
                    done += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return counts


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, view[done:], offset + done)


# the command line: `appliance log-writes list|replay`


def add_parser(sub):
    """`appliance log-writes ...`: the flags follow dm's replay-log (--limit, --end-mark)."""
    p = sub.add_parser("log-writes", help="list or replay a log-writes log")
    cmds = p.add_subparsers(dest="log_writes_command", required=True)
    s = cmds.add_parser("list", help="the entries of a log: index, kind, sector, length, flags, mark")
    s.add_argument("log")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_list)
    s = cmds.add_parser("replay", help="apply a log's writes in order to DEV (a file is created if missing; a missing /dev/... is an error)")
    s.add_argument("log")
    s.add_argument("dev")
    stop = s.add_mutually_exclusive_group()
    stop.add_argument("--limit", type=int, metavar="N", help="apply the first N entries")
    stop.add_argument("--end-mark", "--to", dest="end_mark", metavar="MARK",
                      help="stop after the mark named MARK")
    stop.add_argument("--to-flush", type=int, metavar="N", help="stop after the Nth flush entry (from 1)")
    stop.add_argument("--last-flush", action="store_true", help="stop after the last flush entry")
    stop.add_argument("--durable", action="store_true",
                      help="what a power cut at the end of the log keeps: up to the last flush, "
                           "plus every FUA write after it")
    s.set_defaults(fn=cmd_replay)


def _warn_full(log):
    if log.full:
        print(f"appliance: warning: {log.path}: the log device filled up after entry "
              f"{len(log.entries) - 1}; later I/O is not in the log", file=sys.stderr)


def cmd_list(args):
    try:
        with Log(args.log) as log:
            rows = [{"index": e.index, "kind": e.kind, "offset": e.offset, "length": e.length,
                     "flags": flag_names(e.flags), "mark": log.mark_name(e) if e.kind == "mark" else None}
                    for e in log.entries]
            if args.json:
                print(json.dumps({"entries": rows, "full": log.full}, indent=1))
                return 0
            _warn_full(log)
    except LogError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 1
    print(f"{'index':>6} {'kind':8} {'sector':>12} {'offset':>14} {'length':>10} {'flags':14} mark")
    for r in rows:
        sector = str(r["offset"] // SECTOR) if r["offset"] % SECTOR == 0 else f"{r['offset'] / SECTOR:.3f}"
        print(f"{r['index']:>6} {r['kind']:8} {sector:>12} {r['offset']:>14} {r['length']:>10} "
              f"{r['flags']:14} {r['mark'] or ''}".rstrip())
    return 0


def cmd_replay(args):
    try:
        with Log(args.log) as log:
            _warn_full(log)
            entries = select(log, limit=args.limit, end_mark=args.end_mark, to_flush=args.to_flush,
                             last_flush=args.last_flush, durable=args.durable)
            counts = replay(log, args.dev, entries)
    except LogError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 1
    what = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
    print(f"replayed {len(entries)} of {len(log.entries)} entries onto {args.dev}: {what}")
    return 0
