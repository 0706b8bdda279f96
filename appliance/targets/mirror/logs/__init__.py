"""Dirty-region logs: what a mirror knows about its regions, as dm-dirty-log's types.

A region is `clean` while no write to it is in flight on the legs (`mark_region` before the
write, `clear_region` some time after it completed everywhere) and `in sync` when every leg
holds the same data there. A log type is a small class with dm-dirty-log's operations, found
by name as targets are: `core` (in memory), `disk` (a bitmap on a log device) and `clustered`
(a log service that keeps several hosts' logs of one mirror coherent through etcd).
"""

from __future__ import annotations

import importlib

from .. import TargetError

TYPES = ("core", "disk", "clustered")


def log_class(name):
    if name not in TYPES:
        raise TargetError(f"unknown mirror log type {name!r}; log types: {', '.join(TYPES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    return getattr(module, f"{name.capitalize()}Log")
