"""multipath's messages, as dm's: fail_path, reinstate_path, switch_group, disable_group,
enable_group, queue_if_no_path, fail_if_no_path. `P` is a path's word from the table."""

from __future__ import annotations

from .. import TargetError, parse_int

_MESSAGES = ("fail_path", "reinstate_path", "switch_group", "disable_group", "enable_group")


def message(mp, argv):
    """dm's multipath messages; `mp` is the target."""
    if not argv:
        raise TargetError("multipath messages: fail_path P, reinstate_path P, switch_group N, "
                          "disable_group N, enable_group N, queue_if_no_path, fail_if_no_path")
    cmd, rest = argv[0], list(argv[1:])
    if cmd in ("queue_if_no_path", "fail_if_no_path"):
        if rest:
            raise TargetError(f"{cmd} takes no arguments")
        with mp._lock:
            mp.queue_if_no_path = cmd == "queue_if_no_path"
            if not mp.queue_if_no_path:
                mp._retry_expired = True
        if cmd == "fail_if_no_path":
            mp._fail_held()
        return ""
    if cmd not in _MESSAGES:
        raise TargetError(f"unknown message {cmd!r}; multipath messages: {', '.join(_MESSAGES)}, "
                          "queue_if_no_path, fail_if_no_path")
    if len(rest) != 1:
        raise TargetError(f"{cmd} takes one argument")
    if cmd in ("fail_path", "reinstate_path"):
        path = next((p for p in mp.all_paths() if p.word == rest[0]), None)
        if path is None:
            raise TargetError(f"no path {rest[0]!r}; paths: {' '.join(p.word for p in mp.all_paths())}")
        if cmd == "fail_path":
            mp.fail_path(path, "failed by message", by_message=True)
            return ""
        if path.dev is None:
            try:
                mp.open_path(path)
            except TargetError as e:
                raise TargetError(f"cannot reinstate {path.word}: {e}") from None
        with mp._lock:
            path.held_until = 0.0
            path.by_message = False
        mp.reinstate(path)
        return ""
    n = parse_int(rest[0], "group number", 1)  # switch_group, disable_group, enable_group
    if n > len(mp.groups):
        raise TargetError(f"group {n} does not exist; there are {len(mp.groups)}")
    g = mp.groups[n - 1]
    with mp._lock:
        if cmd == "switch_group":
            for other in mp.groups:
                other.bypassed = False
            mp.next_group = g
        else:
            g.bypassed = cmd == "disable_group"
    return ""
