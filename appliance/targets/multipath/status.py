"""multipath's status: dm's INFO and TABLE words, and multipathd's `show maps json` names."""

from __future__ import annotations

from . import args as table_args


def current_number(mp):
    g = mp.next_group or mp.current
    return g.number if g else 1


def status_line(mp):
    """dm's INFO: 2 <queue_io> <pg_init_count> <#hw_handler_args> <#groups> <current>, per group
    <A|E|D> <selector status> <#paths> <#info_args>, per path <path> <A|F> <fail_count> <info>."""
    with mp._lock:
        words = ["2", "1" if mp._held else "0", "0", "0", str(len(mp.groups)), str(current_number(mp))]
        for g in mp.groups:
            state = "D" if g.bypassed else ("A" if g is mp.current else "E")
            words += [state, *g.selector.status(), str(len(g.paths)), str(g.selector.info_args)]
            for p in g.paths:
                words += [p.word, "A" if p.active else "F", str(p.failures), *g.selector.status(p)]
    return " ".join(words)


def status_table(mp):
    with mp._lock:
        words = table_args.features_words(mp.queue_if_no_path, mp.no_path_retry, mp.kept_features)
        words += [str(len(mp.hw_handler)), *mp.hw_handler, str(len(mp.groups)), str(current_number(mp))]
        for g in mp.groups:
            words += [*g.selector_words, str(len(g.paths)), str(g.selector.table_args)]
            for p in g.paths:
                words += [p.word, *g.selector.status(p, table=True)]
    return words


def status_info(mp):
    """multipathd's `show maps json` names: path_groups, each with its paths."""
    with mp._lock:
        if mp._queueing() and mp.queue_if_no_path:
            queueing = "on"
        elif mp.no_path_retry and not mp.queue_if_no_path and not mp._no_queue:
            queueing = f"{mp.checks_left()} chk"
        else:
            queueing = "off"
        groups = []
        for g in mp.groups:
            state = "disabled" if g.bypassed else ("active" if g is mp.current else "enabled")
            groups.append({"group": g.number, "selector": " ".join(g.selector_words), "pri": len(mp.groups) - g.number + 1,
                           "dm_st": state, "paths": [p.info() for p in g.paths]})
        info = {
            "queueing": queueing,
            "queued": len(mp._held),
            "queued_bytes": mp._held_bytes,
            "queue_max_bytes": mp.queue_max_bytes,
            "queue_full": mp.queue_full,
            "target_errors": mp.target_errors,
            "polling_interval": mp.polling_interval,
            "marginal_window": mp.marginal_window,
            "failback": mp.failback,
            "fast_io_fail_tmo": mp.fast_io_fail_tmo,
            "checker_timeout": mp.checker_timeout,
        }
    queue = getattr(getattr(mp.ctx.device, "table", None), "queue", None)
    info["merged"] = queue.merged if queue is not None else 0
    info["path_groups"] = groups
    return info
