"""Targets: the small types a table maps ranges of a device to.

The table keyword, the module name and the class name are the same word
(`linear` is `appliance.targets.linear.Linear`); a keyword of several words has
dashes where the module has underscores (`log-writes` is
`appliance.targets.log_writes.LogWrites`), as dm's own names do. A target implements only the
operations it needs; `Target` supplies the defaults, as dm's core does.
"""

from __future__ import annotations

import errno
import importlib
import pkgutil
import re
from types import SimpleNamespace
from typing import NamedTuple

from .. import io as bio


class TargetError(ValueError):
    """A constructor or message that fails says why in one sentence (dm's ti->error)."""


class DeviceArg(NamedTuple):
    """An underlying device a table line names: the word as written (a path, a `wwn:`/`serial:`
    disk name or `@NAME`) and the byte offset on it where the segment's range starts."""

    word: str
    offset: int


class Target:
    """Base class. `begin` and `length` are the segment's, in bytes.

    The request path (see README "Tables" and appliance/device.py): for every map attempt
    the core makes a fresh clone of the target's piece of a request, in segment
    coordinates; `prep_map(clone)` chooses the device below, `map(clone)` translates the
    clone onto it (or completes it, parks it, fails it), and `end_io(clone, error)` sees
    the result first and may take the clone back for a retry."""

    name = None
    # the device's request queue merges adjacent requests before map() (as a disk's would)
    wants_merged = False
    # at most this many of the queue's requests in flight at the target; the rest wait and
    # merge (0: no limit). A target may set it per instance in ctr().
    queue_depth = 0

    def __init__(self, ctx, segment):
        self.ctx = ctx
        self.segment = segment
        self.begin = segment.offset
        self.length = segment.size
        self.devices = []  # what iterate_devices reports

    # construction
    @classmethod
    def parse(cls, args):
        """Check the arguments without opening anything; return what ctr needs, as a namespace
        whose `devices` lists the DeviceArgs. The one parser: ctr, validate and device_words
        all use it, so check-config and the daemon cannot disagree on what is well formed."""
        return SimpleNamespace(devices=[])

    @classmethod
    def device_words(cls, args):
        """The words of `args` that name underlying devices: the disks the daemon waits for are
        among them. A file the target creates itself (ramback's <ram>) is not one."""
        try:
            return [d.word for d in cls.parse(args).devices]
        except TargetError:
            return []  # loading the table says what is wrong

    @classmethod
    def validate(cls, segment, check):
        """What ctr would refuse, short of opening anything: parse the arguments, then
        `check(word, bytes needed)` each underlying device (it raises what ctr would)."""
        parsed = cls.parse(list(segment.args))
        for dev in parsed.devices:
            check(dev.word, dev.offset + segment.size)
        return parsed

    def ctr(self, args):
        pass

    def dtr(self):
        for dev in self.devices:
            self.ctx.put_device(dev)
        self.devices = []

    # the request path
    def prep_map(self, clone):
        """The device the clone goes to (clone.dev when map() returns REMAPPED)."""
        return self.devices[0] if self.devices else None

    def map(self, clone):
        """Translate the clone (clone.offset += where the segment starts on clone.dev) and
        return REMAPPED; or complete it and return SUBMITTED; KILL with clone.error; REQUEUE."""
        clone.error = clone.error or errno.EIO
        return bio.KILL

    def end_io(self, clone, error):
        """DONE; REQUEUE (park it: mapped again on resume or kick); or INCOMPLETE after calling
        ctx.device.remap(clone) or ctx.device.requeue(clone, delay). clone.private, the
        target's per-I/O data, survives into the next attempt."""
        return bio.DONE

    def fast_map(self):
        """A fast-path descriptor (appliance/_fast/fastops.pxd) the NBD loop serves this
        segment's reads and writes through without the GIL, or None: every request goes
        to map(). A target whose state the loop must not bypass implements the descriptor's
        functions next to that state (ramback) or offers none (delay, flakey)."""
        return None

    def block_status(self, offset, length):
        """Extents [(length, flags)] for [offset, offset+length) of this segment; flags are NBD's
        base:allocation bits (1 hole, 2 reads as zero)."""
        return [(length, 0)]

    def context_status(self, context, offset, length):
        """Extents [(length, value)] of another NBD metadata context. `qemu:allocation-depth`
        (qemu-nbd's meaning: 0 unallocated, 1 in the top layer, 2 the one below...): a target
        that stacks nothing holds all of its range at depth 1."""
        return [(length, 1)]

    # suspend and resume
    def presuspend(self, noflush=False):
        pass

    def postsuspend(self):
        pass

    def resume(self):
        pass

    # reporting and control
    def status_info(self) -> dict:
        return {}

    def status_line(self) -> str:
        info = self.status_info()
        return " ".join(f"{k}={_word(v)}" for k, v in info.items())

    def status_table(self) -> list[str]:
        return list(self.segment.args)

    def message(self, argv) -> str:
        raise TargetError(f"{self.name}: no messages supported")

    def iterate_devices(self):
        return list(self.devices)

    # helpers for subclasses
    def get_device(self, word):
        dev = self.ctx.get_device(word)
        self.devices.append(dev)
        return dev

    def check_fits(self, dev, offset, word):
        check_size(word, dev.size, offset + self.length)


def _word(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def check_size(word, size, needed):
    """A device of `size` bytes must hold `needed` bytes (ctr and check-config say it alike)."""
    if needed > size:
        raise TargetError(f"device {word} is too small: {size // 512} sectors, the table needs {(needed + 511) // 512}")


def parse_int(word, what, minimum=0):
    try:
        value = int(word, 0)
    except (TypeError, ValueError):
        raise TargetError(f"{what} {word!r} is not a number") from None
    if value < minimum:
        raise TargetError(f"{what} must be at least {minimum}, got {value}")
    return value


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.I)


def parse_size(word, what):
    """'4K' -> 4096: bytes, or binary K, M, G, T (a bare number is bytes)."""
    m = _SIZE.fullmatch(word.strip())
    if not m:
        raise TargetError(f"{what} {word!r} is not a size (bytes, or with K, M, G, T)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


_registry = None


def known_targets() -> dict[str, str]:
    """keyword -> module name, for every module in this package, and every package that defines
    its class: a package may hold a target's parts before the target itself exists (cow's
    layer format), and its keyword must not load until it does."""
    global _registry
    if _registry is None:
        _registry = {
            m.name.replace("_", "-"): m.name for m in pkgutil.iter_modules(__path__)
            if not m.name.startswith("_") and (not m.ispkg or hasattr(_module(m.name), _class_name(m.name)))
        }
    return _registry


_registered = {}  # keyword -> class, targets registered in-process (tests, plug-ins)


def register(keyword, cls):
    """Make `cls` the target for `keyword` in this process (a test's own target)."""
    _registered[keyword] = cls
    known_targets()[keyword] = cls.__module__


def target_class(keyword):
    if keyword in _registered:
        return _registered[keyword]
    if keyword not in known_targets():
        raise TargetError(f"unknown target {keyword!r}; targets: {', '.join(sorted(known_targets()))}")
    module = known_targets()[keyword]
    return getattr(_module(module), _class_name(module))


def _module(name):
    return importlib.import_module(f"{__name__}.{name}")


def _class_name(module):
    return "".join(w.capitalize() for w in module.split("_"))
