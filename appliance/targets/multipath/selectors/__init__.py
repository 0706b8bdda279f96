"""Path selectors: which path of a group takes the next request (dm's dm-ps-*.c).

Each is a small type found by name, as targets are: `round-robin` is
`round_robin.RoundRobin`. A selector is built from its group's selector arguments and
told each path's own arguments (`add_path`). The target asks it for a path among the
group's usable ones (`select`) and tells it when a request starts and ends on one;
the target keeps the counts every selector shares (in flight, bytes in flight) on the
path itself, so a selector keeps only what is its own.

`status(path, table)` gives dm's words: with path=None the selector's own (`0` when
it has none), for a path its INFO words (`info_args` of them) or TABLE words
(`table_args`, the path arguments again, so a table round-trips).
"""

from __future__ import annotations

import importlib

from ... import TargetError, parse_int


class Selector:
    name = None
    table_args = 1  # path arguments printed by status TABLE
    info_args = 0  # per-path words in status INFO

    def __init__(self, args):
        if args:
            raise TargetError(f"{self.name} takes no selector arguments, got {len(args)}")

    def add_path(self, path, args):
        """Check a path's arguments and keep what the selector needs of them on `path.ps`."""
        path.ps = {"repeat_count": _repeat_count(self.name, args)}

    def fail_path(self, path):
        pass

    def reinstate_path(self, path):
        pass

    def select(self, paths, nbytes):
        """One of `paths` (the group's usable paths, never empty) for a request of nbytes."""
        raise NotImplementedError

    def start_io(self, path, nbytes):
        pass

    def end_io(self, path, nbytes, started):
        pass

    def status(self, path=None, table=False):
        if path is None:
            return ["0"]
        return [str(path.ps["repeat_count"])] if table else []


def _repeat_count(name, args, most=1):
    if len(args) > most:
        raise TargetError(f"{name}: a path takes at most {most} argument(s), got {len(args)}")
    return parse_int(args[0], f"{name} repeat_count", 0) if args else 1


def selector_class(name):
    """The selector for a table's keyword; an unknown one is named with those that exist."""
    module = name.replace("-", "_")
    if module not in KNOWN:
        raise TargetError(f"unknown path selector {name!r}; selectors: {', '.join(sorted(KNOWN_NAMES))}")
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, "".join(w.capitalize() for w in module.split("_")))


KNOWN = ("round_robin", "queue_length", "service_time", "historical_service_time")
KNOWN_NAMES = [m.replace("_", "-") for m in KNOWN]
