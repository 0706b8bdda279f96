"""flakey <dev> <offset> <up_interval> <down_interval> [<#features> <features>...]: dm-flakey.

Like linear, except that it misbehaves periodically. From construction the
device is up (I/O passes to <dev>) for <up_interval> seconds, then down for
<down_interval> seconds, and the cycle repeats. While down, with no features,
every request fails with EIO. Features (dm-flakey's, a count then the words):

  error_reads          reads fail with EIO (writes pass unless another feature says)
  drop_writes          writes are acknowledged but never reach <dev>
  error_writes         writes fail with EIO
  corrupt_bio_byte <Nth_byte> <r|w> <value> <flags>
                       set byte Nth (1-based) of each matching read's data (after the
                       read) or write's data (on a copy, before the write) to <value>;
                       a request matches when it has every bit of <flags> set (flags
                       are NBD command flags, 1 = FUA; 0 matches everything)
  random_read_corrupt <p>, random_write_corrupt <p>
                       with probability p / 1000000000 set one random byte of a
                       read's / write's data to a random value

"Writes" are writes, write-zeroes, trims and flushes (dm's write direction).
Every request is judged when it is mapped, so this target never offers a
fast map.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from types import SimpleNamespace

from .. import SECTOR_SIZE
from .. import io as bio
from . import DeviceArg, Target, TargetError, _word, parse_int

UINT_MAX = 2**32 - 1
PROBABILITY_BASE = 1_000_000_000
MAX_FEATURE_ARGS = 11

_WRITE_OPS = (bio.WRITE, bio.WRITE_ZEROES, bio.TRIM, bio.FLUSH)


def _uint(word, what, minimum=0, maximum=UINT_MAX):
    value = parse_int(word, what, minimum)
    if value > maximum:
        raise TargetError(f"{what} must be at most {maximum}, got {value}")
    return value


def _parse_features(p, rest):
    """The optional feature words, into `p` (flakey's parsed arguments)."""
    if not rest:
        p.error_reads = p.error_writes = True
        return
    count = _uint(rest[0], "#features", 0, MAX_FEATURE_ARGS)
    words = rest[1:]
    if count != len(words):
        raise TargetError(f"#features is {count} but {len(words)} feature argument(s) follow")
    p.explicit_features = True
    p.zero_features = count == 0
    i = 0
    seen = set()

    def take():
        nonlocal i
        w = words[i]
        i += 1
        return w

    while i < len(words):
        name = words[i].lower()
        i += 1
        if name in seen:
            raise TargetError(f"feature {name} is duplicated")
        seen.add(name)
        if name == "error_reads":
            p.error_reads = True
        elif name == "drop_writes":
            if p.error_writes:
                raise TargetError("feature drop_writes conflicts with feature error_writes")
            p.drop_writes = True
        elif name == "error_writes":
            if p.drop_writes:
                raise TargetError("feature error_writes conflicts with feature drop_writes")
            p.error_writes = True
        elif name == "corrupt_bio_byte":
            if len(words) - i < 4:
                raise TargetError("feature corrupt_bio_byte needs 4 arguments: <Nth_byte> <r|w> <value> <flags>")
            p.corrupt_byte = _uint(take(), "corrupt_bio_byte Nth_byte", 1)
            direction = take().lower()
            if direction not in ("r", "w"):
                raise TargetError(f"corrupt_bio_byte direction {direction!r} must be r or w")
            p.corrupt_dir = direction
            p.corrupt_value = _uint(take(), "corrupt_bio_byte value", 0, 255)
            p.corrupt_flags = _uint(take(), "corrupt_bio_byte flags")
        elif name in ("random_read_corrupt", "random_write_corrupt"):
            if i >= len(words):
                raise TargetError(f"feature {name} needs a probability (0-{PROBABILITY_BASE})")
            setattr(p, name, _uint(take(), f"{name} probability", 0, PROBABILITY_BASE))
        else:
            raise TargetError(
                f"unknown feature {words[i - 1]!r}; features: error_reads drop_writes error_writes "
                "corrupt_bio_byte random_read_corrupt random_write_corrupt"
            )
    corrupts_writes = (p.corrupt_byte and p.corrupt_dir == "w") or p.random_write_corrupt
    corrupts_reads = (p.corrupt_byte and p.corrupt_dir == "r") or p.random_read_corrupt
    if p.drop_writes and corrupts_writes:
        raise TargetError("drop_writes is incompatible with corrupting writes (corrupt_bio_byte w, random_write_corrupt)")
    if p.error_writes and corrupts_writes:
        raise TargetError("error_writes is incompatible with corrupting writes (corrupt_bio_byte w, random_write_corrupt)")
    if p.error_reads and corrupts_reads:
        raise TargetError("error_reads is incompatible with corrupting reads (corrupt_bio_byte r, random_read_corrupt)")
    if not (p.error_reads or p.drop_writes or p.error_writes or p.corrupt_byte
            or p.random_read_corrupt or p.random_write_corrupt):
        # `0` features: as dm, the down interval fails everything
        p.error_reads = p.error_writes = True


class Flakey(Target):
    name = "flakey"

    @classmethod
    def parse(cls, args):
        if len(args) < 4:
            raise TargetError("flakey takes <dev> <offset> <up_interval> <down_interval> [<#features> <features>...]")
        p = SimpleNamespace(dev_word=args[0], start=parse_int(args[1], "offset") * SECTOR_SIZE)
        p.up_interval = _uint(args[2], "up_interval")
        p.down_interval = _uint(args[3], "down_interval")
        if p.up_interval + p.down_interval == 0:
            raise TargetError("up_interval and down_interval are both zero")
        p.period = p.up_interval + p.down_interval

        p.error_reads = False
        p.drop_writes = False
        p.error_writes = False
        p.corrupt_byte = 0  # 1-based; 0 = off
        p.corrupt_dir = None  # "r" or "w"
        p.corrupt_value = 0
        p.corrupt_flags = 0
        p.random_read_corrupt = 0
        p.random_write_corrupt = 0
        p.explicit_features = False  # a feature count was given
        p.zero_features = False  # ... and it was 0
        _parse_features(p, list(args[4:]))
        p.devices = [DeviceArg(p.dev_word, p.start)]
        return p

    def ctr(self, args):
        p = self.parse(args)
        vars(self).update((k, v) for k, v in vars(p).items() if k != "devices")
        self.dev = self.get_device(self.dev_word)
        self.check_fits(self.dev, self.start, self.dev_word)

        self._lock = threading.Lock()
        self.failed = 0
        self.dropped = 0
        self.corrupted = 0
        self.started = time.monotonic()

    # the cycle

    def _phase(self, now=None):
        return ((now if now is not None else time.monotonic()) - self.started) % self.period

    def is_up(self, now=None):
        return self._phase(now) < self.up_interval

    def seconds_to_switch(self, now=None):
        if self.up_interval == 0 or self.down_interval == 0:
            return None  # it never switches
        phase = self._phase(now)
        left = self.up_interval - phase if phase < self.up_interval else self.period - phase
        return round(left, 3)

    def _count(self, what):
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    # the request path

    def map(self, clone):
        clone.private = None
        if self.is_up():
            return self._remap(clone)
        if clone.op in _WRITE_OPS:
            if self.drop_writes:
                self._count("dropped")
                clone.complete(0)
                return bio.SUBMITTED
            if self.error_writes:
                self._count("failed")
                clone.error = errno.EIO
                return bio.KILL
            if clone.op == bio.WRITE and clone.length:
                corrupt = self._corruptions(clone, "w", self.random_write_corrupt)
                if corrupt:
                    data = bytearray(clone.buf)  # a copy: never touch the caller's buffer
                    for pos, value in corrupt:
                        data[pos] = value
                    clone.buf = data  # the clone is this attempt's own
                    self._count("corrupted")
            return self._remap(clone)
        # reads (and cache hints)
        if self.error_reads:
            self._count("failed")
            clone.error = errno.EIO
            return bio.KILL
        if clone.op == bio.READ and clone.length:
            clone.private = "down"  # end_io decides whether to corrupt it
        return self._remap(clone)

    def _remap(self, clone):
        clone.offset += self.start
        return bio.REMAPPED

    def _flags_match(self, io):
        return (io.flags & self.corrupt_flags) == self.corrupt_flags

    def _corruptions(self, io, direction, probability):
        out = []
        if self.corrupt_byte and self.corrupt_dir == direction and self._flags_match(io):
            if self.corrupt_byte <= io.length:
                out.append((self.corrupt_byte - 1, self.corrupt_value))
        if probability and random.randrange(PROBABILITY_BASE) < probability:
            out.append((random.randrange(io.length), random.randrange(256)))
        return out

    def end_io(self, clone, error):
        if clone.private == "down" and not error:
            corrupt = self._corruptions(clone, "r", self.random_read_corrupt)
            if corrupt:
                for pos, value in corrupt:
                    clone.buf[pos] = value
                self._count("corrupted")
        return bio.DONE

    def fast_map(self):
        return None  # every request is judged by map(); the NBD loop never bypasses it

    def block_status(self, offset, length):
        return self.dev.block_status(self.start + offset, length)

    # reporting

    def status_info(self):
        with self._lock:
            failed, dropped, corrupted = self.failed, self.dropped, self.corrupted
        return {
            "up": self.is_up(),
            "seconds_to_switch": self.seconds_to_switch(),
            "failed": failed,
            "dropped": dropped,
            "corrupted": corrupted,
        }

    def status_line(self):
        info = self.status_info()
        if info["seconds_to_switch"] is None:
            info["seconds_to_switch"] = "never"
        return " ".join(f"{k}={_word(v)}" for k, v in info.items())

    def status_table(self):
        out = [self.dev_word, str(self.start // SECTOR_SIZE), str(self.up_interval), str(self.down_interval)]
        if not self.explicit_features:
            return out
        if self.zero_features:
            return out + ["0"]
        feats = []
        if self.error_reads:
            feats.append("error_reads")
        if self.drop_writes:
            feats.append("drop_writes")
        elif self.error_writes:
            feats.append("error_writes")
        if self.corrupt_byte:
            feats += ["corrupt_bio_byte", str(self.corrupt_byte), self.corrupt_dir, str(self.corrupt_value),
                      str(self.corrupt_flags)]
        if self.random_read_corrupt:
            feats += ["random_read_corrupt", str(self.random_read_corrupt)]
        if self.random_write_corrupt:
            feats += ["random_write_corrupt", str(self.random_write_corrupt)]
        return out + [str(len(feats))] + feats
