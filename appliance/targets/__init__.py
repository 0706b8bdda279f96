"""Targets: the small types a table maps ranges of a device to.

The table keyword, the module name and the class name are the same word
(`linear` is `appliance.targets.linear.Linear`). A target implements only the
operations it needs; `Target` supplies the defaults, as dm's core does.
"""

from __future__ import annotations

import importlib
import pkgutil

from .. import io as bio


class TargetError(ValueError):
    """A constructor or message that fails says why in one sentence (dm's ti->error)."""


class Target:
    """Base class. `begin` and `length` are the segment's, in bytes."""

    name = None

    def __init__(self, ctx, segment):
        self.ctx = ctx
        self.segment = segment
        self.begin = segment.offset
        self.length = segment.size
        self.devices = []  # what iterate_devices reports

    # construction
    def ctr(self, args):
        pass

    def dtr(self):
        for dev in self.devices:
            self.ctx.put_device(dev)
        self.devices = []

    # the request path
    def map(self, io):
        io.error = io.error or 5
        return bio.KILL

    def end_io(self, io, error):
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
        if offset + self.length > dev.size:
            raise TargetError(
                f"device {word} is too small: {dev.size // 512} sectors, "
                f"the table needs {(offset + self.length + 511) // 512}"
            )


def _word(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def parse_int(word, what, minimum=0):
    try:
        value = int(word, 0)
    except (TypeError, ValueError):
        raise TargetError(f"{what} {word!r} is not a number") from None
    if value < minimum:
        raise TargetError(f"{what} must be at least {minimum}, got {value}")
    return value


_registry = None


def known_targets() -> dict[str, str]:
    """keyword -> module name, for every module in this package."""
    global _registry
    if _registry is None:
        _registry = {m.name: m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return _registry


def target_class(keyword):
    if keyword not in known_targets():
        raise TargetError(f"unknown target {keyword!r}; targets: {', '.join(sorted(known_targets()))}")
    module = importlib.import_module(f"{__name__}.{keyword}")
    return getattr(module, keyword.capitalize())
