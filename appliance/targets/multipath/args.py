"""The multipath table, as dm-multipath writes it, parsed and printed back.

  <#features> <features>... <#hw_handler_args> <hw_handler>... <#groups> <first_group>
  then per group: <selector> <#selector_args> <selector_args>... <#paths> <#path_args>
  then per path:  <path> <path_args>...

Features: `queue_if_no_path`; `no_path_retry N` (multipathd's setting: queue for N
x polling_interval after the last path is lost, then fail); dm's `retain_attached_hw_handler`,
`pg_init_retries N`, `pg_init_delay_msecs N` and `queue_mode M` are accepted and kept
for the table, with no effect (there is no SCSI hardware handler here). A hardware
handler is kept the same way.
"""

from __future__ import annotations

from types import SimpleNamespace

from .. import DeviceArg, TargetError, parse_int
from .selectors import selector_class

_FEATURES_WITH_ARG = ("no_path_retry", "pg_init_retries", "pg_init_delay_msecs", "queue_mode")
_FEATURES_ALONE = ("queue_if_no_path", "retain_attached_hw_handler")


class _Words:
    def __init__(self, args):
        self.args, self.i = list(args), 0

    def take(self, what):
        if self.i >= len(self.args):
            raise TargetError(f"the table ends where {what} should be")
        self.i += 1
        return self.args[self.i - 1]

    def count(self, what, minimum=0):
        return parse_int(self.take(what), what, minimum)


def parse(args):
    """The table's words -> what ctr needs; every error names the word that is wrong."""
    w = _Words(args)
    p = SimpleNamespace(queue_if_no_path=False, no_path_retry=None, kept_features=[], groups=[])
    nfeat = w.count("#features")
    feats = [w.take(f"feature {k + 1} of {nfeat}") for k in range(nfeat)]
    k = 0
    while k < len(feats):
        name = feats[k]
        if name in _FEATURES_ALONE:
            if name == "queue_if_no_path":
                p.queue_if_no_path = True
            else:
                p.kept_features.append(name)
            k += 1
        elif name in _FEATURES_WITH_ARG:
            if k + 1 >= len(feats):
                raise TargetError(f"feature {name} needs a value (and #features counts it)")
            value = feats[k + 1]
            if name == "no_path_retry":
                p.no_path_retry = _no_path_retry(value, p)
            else:
                p.kept_features += [name, value]
            k += 2
        else:
            raise TargetError(f"unknown feature {name!r}; features: "
                              f"{', '.join(_FEATURES_ALONE + _FEATURES_WITH_ARG)}")
    nhw = w.count("#hw_handler_args")
    p.hw_handler = [w.take("a hardware handler argument") for _ in range(nhw)]
    ngroups = w.count("#groups", 1)
    p.first_group = w.count("first_group", 1)
    if p.first_group > ngroups:
        raise TargetError(f"first_group is {p.first_group} but there are {ngroups} group(s)")
    for g in range(1, ngroups + 1):
        name = w.take(f"group {g}'s path selector")
        cls = selector_class(name)
        nsel = w.count(f"group {g}'s #selector_args")
        sel_args = [w.take(f"group {g}'s selector argument") for _ in range(nsel)]
        selector = cls(sel_args)  # checks its arguments; the target builds its own
        npaths = w.count(f"group {g}'s #paths", 1)
        npath_args = w.count(f"group {g}'s #path_args")
        paths = []
        for _ in range(npaths):
            word = w.take(f"a path of group {g}")
            path_args = [w.take(f"an argument of path {word}") for _ in range(npath_args)]
            selector.add_path(SimpleNamespace(), path_args)
            paths.append((word, path_args))
        p.groups.append(SimpleNamespace(selector=name, selector_args=sel_args, paths=paths))
    if w.i != len(w.args):
        raise TargetError(f"{len(w.args) - w.i} word(s) after the last group: {' '.join(w.args[w.i:])}")
    words = [word for g in p.groups for word, _ in g.paths]
    dup = sorted({x for x in words if words.count(x) > 1})
    if dup:
        raise TargetError(f"path {dup[0]} is named twice")
    p.devices = [DeviceArg(word, 0) for word in words]
    return p


def _no_path_retry(value, p):
    """multipath.conf's forms: a number of polling intervals, `queue` (forever), `fail` (0)."""
    if value == "queue":
        p.queue_if_no_path = True
        return None
    if value == "fail":
        return 0
    return parse_int(value, "no_path_retry")


def features_words(queue_if_no_path, no_path_retry, kept):
    words = (["queue_if_no_path"] if queue_if_no_path else []) + list(kept)
    if no_path_retry is not None:
        words += ["no_path_retry", str(no_path_retry)]
    return [str(len(words))] + words
