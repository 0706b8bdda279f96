"""`appliance cluster status`: the cluster's nodes as etcd holds them, a line each: name, alive
or lost, seconds left on its lease, regions it holds marked, regions a survivor resyncs on its
behalf. Read straight from etcd, so it works from any host and with the daemon down."""

from __future__ import annotations

import sys

from .etcd import Etcd, EtcdError
from .node import PREFIX


def nodes(settings):
    """[{name, state, lease_left, marked, resyncing}] over every clustered log."""
    client = Etcd.for_settings(settings, min(settings.etcd_timeout, 3.0))
    alive = client.get_prefix(f"{PREFIX}nodes/")
    out = {}
    for key, (_, _, lease) in alive.items():
        name = key.rsplit("/", 1)[1]
        out[name] = {"name": name, "state": "alive", "lease_left": max(client.ttl(lease), 0),
                     "marked": 0, "resyncing": 0}

    def entry(name):
        return out.setdefault(name, {"name": name, "state": "lost", "lease_left": 0,
                                     "marked": 0, "resyncing": 0})
    for key, (value, _, _) in client.get_prefix(f"{PREFIX}logs/").items():
        parts = key[len(PREFIX) + 5:].split("/")  # <uuid>/mark/<region>/<node>, <uuid>/recover/<region>
        if parts[1] == "mark" and len(parts) == 4:
            entry(parts[3])["marked"] += 1
        elif parts[1] == "recover" and len(value.split()) == 2:
            entry(value.split()[1])["resyncing"] += 1
    return sorted(out.values(), key=lambda n: n["name"])


def line(n):
    return (f"{n['name']}\t{n['state']}\tlease {n['lease_left']}s\t{n['marked']} regions marked\t"
            f"{n['resyncing']} being resynced on its behalf")


def cmd_status(args, settings):
    if settings is None:
        print("appliance: no [cluster] section in the config: this host is in no cluster", file=sys.stderr)
        return 1
    try:
        for n in nodes(settings):
            print(line(n))
    except EtcdError as e:
        print(f"appliance: cluster status: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
