"""The mirror's table line, as dm-mirror's:
  <log_type> <#log_args> <log_args...> <#legs> <leg> <offset>... [<#features> <features>...]
log args: `core <region_size> [sync|nosync]`, `disk <log_dev> <region_size> [sync|nosync]`,
`clustered <uuid> <region_size> [sync|nosync]` (the log shared through the cluster's etcd);
region size and offsets in 512-byte sectors; features `handle_errors`, `keep_log`."""

from __future__ import annotations

from types import SimpleNamespace

from ... import SECTOR_SIZE
from .. import DeviceArg, TargetError, parse_int
from .logs import TYPES

FEATURES = ("handle_errors", "keep_log")
MAX_LEGS = 32
USAGE = ("mirror takes <log_type> <#log_args> <log_args...> <#legs> <leg> <offset>... "
         "[<#features> <features>...]")


def parse(args):
    if len(args) < 2:
        raise TargetError(USAGE)
    log_type = args[0]
    if log_type not in TYPES:
        raise TargetError(f"unknown mirror log type {log_type!r}; log types: {', '.join(TYPES)}")
    n = parse_int(args[1], "#log_args", 1)
    log_args, rest = args[2 : 2 + n], args[2 + n :]
    if len(log_args) != n:
        raise TargetError(f"the {log_type} log has {len(log_args)} arguments, #log_args says {n}")
    log_dev = uuid = None
    first = {"disk": "<log_dev> ", "clustered": "<uuid> "}.get(log_type, "")
    if first:
        if not log_args:
            raise TargetError(f"the {log_type} log takes {first}<region_size> [sync|nosync]")
        if log_type == "disk":
            log_dev = log_args[0]
        else:
            uuid = log_args[0]
            if len(uuid.encode()) > 128 or "/" in uuid:
                raise TargetError(f"clustered log uuid {uuid!r}: at most 128 bytes, no '/'")
        log_args = log_args[1:]
    if not 1 <= len(log_args) <= 2:
        raise TargetError(f"the {log_type} log takes {first}<region_size> [sync|nosync]")
    region = parse_int(log_args[0], "region_size", 8)
    if region % 8:
        raise TargetError(f"region_size must be a multiple of 8 sectors (4 KiB), got {region}")
    sync = None
    if len(log_args) == 2:
        sync = log_args[1]
        if sync not in ("sync", "nosync"):
            raise TargetError(f"the log's last argument is sync or nosync, got {sync!r}")
    if not rest:
        raise TargetError(USAGE)
    nlegs = parse_int(rest[0], "#legs", 2)
    if nlegs > MAX_LEGS:
        raise TargetError(f"a mirror has at most {MAX_LEGS} legs, got {nlegs}")
    words = rest[1 : 1 + 2 * nlegs]
    if len(words) != 2 * nlegs:
        raise TargetError(f"#legs says {nlegs}: give a <leg> <offset> pair for each")
    legs = [DeviceArg(words[i], parse_int(words[i + 1], "leg offset") * SECTOR_SIZE) for i in range(0, len(words), 2)]
    seen = set()
    for leg in legs:
        if leg.word in seen:
            raise TargetError(f"leg {leg.word} is named twice")
        seen.add(leg.word)
    if log_dev in seen:
        raise TargetError(f"the log device {log_dev} is also a leg")
    feats = rest[1 + 2 * nlegs :]
    features = []
    if feats:
        nf = parse_int(feats[0], "#features")
        features = feats[1:]
        if len(features) != nf:
            raise TargetError(f"#features says {nf}, {len(features)} given")
        for f in features:
            if f not in FEATURES:
                raise TargetError(f"unknown mirror feature {f!r}; features: {', '.join(FEATURES)}")
        if "keep_log" in features and "handle_errors" not in features:
            raise TargetError("keep_log needs handle_errors")
    devices = list(legs) + ([DeviceArg(log_dev, 0)] if log_dev else [])
    return SimpleNamespace(log_type=log_type, log_dev=log_dev, uuid=uuid, region_size=region * SECTOR_SIZE, sync=sync,
                           legs=legs, features=features, devices=devices)


def region_count(length, region_size):
    return (length + region_size - 1) // region_size
