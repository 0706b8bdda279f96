"""`appliance`: the command line, dmsetup-like. Everything but `serve` and
`check-config` talks to the running daemon over its control socket, found
through the same config (`--config` or APPLIANCE_CONFIG)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import config as cfg
from . import logwrites
from .cluster import logd
from .targets.cow import command as layer_command
from .control import ControlError, call


def _control_path(args):
    try:
        return cfg.load_or_default(args.config).daemon.control
    except cfg.ConfigError as e:
        # A broken file must not lock the administrator out of the running daemon,
        # whose status says why it refused to reload that file.
        path = _control_in_broken_config(cfg.config_path(args.config))
        print(f"appliance: warning: {e}; trying the control socket {path}", file=sys.stderr)
        return path


def _control_in_broken_config(path):
    import re

    from .schema import DEFAULT_CONTROL

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return DEFAULT_CONTROL
    m = re.search(r"^\[daemon\][^\[]*?^\s*control\s*=\s*[\"']([^\"']+)[\"']", text, re.M | re.S)
    return m.group(1) if m else DEFAULT_CONTROL


def cmd_serve(args):
    from . import heap
    from .assembly import AssemblyError
    from .daemon import Daemon
    from .logsetup import setup_logging

    try:
        config = cfg.load_or_default(args.config)
    except cfg.ConfigError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 1
    setup_logging(args.log_level or config.daemon.log_level)
    heap.tune()
    daemon = Daemon(config, args.config)

    def ready(d):
        print(f"appliance: serving from {config.source}; connect with:", flush=True)
        for line in d.connect_hints():
            print(line, flush=True)

    try:
        return daemon.run(on_ready=ready)
    except (AssemblyError, ControlError, OSError) as e:
        print(f"appliance: cannot start: {e}", file=sys.stderr)
        return 1


def cmd_check_config(args):
    from . import preflight

    path = args.path or cfg.config_path(args.config)
    try:
        config = cfg.load(path) if args.path or os.path.exists(path) or path != cfg.DEFAULT_PATH else cfg.load_or_default(None)
        notes = preflight.check(config)
    except cfg.ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1
    waits = f"; {len(notes)} would wait for a disk" if notes else ""
    print(f"{config.source}: OK, {len(config.devices)} device(s){waits}")
    for line in notes:
        print(line)
    return 0


def _ask(args, cmd, **kw):
    return call(_control_path(args), cmd, **kw)


def cmd_ls(args):
    for d in _ask(args, "ls")["devices"]:
        print(f"{d['name']}\t{d['size'] // 512} sectors{'' if d['exported'] else '  (not exported)'}")
    return 0


def _cluster_settings(args):
    try:
        return cfg.load_or_default(args.config).cluster
    except cfg.ConfigError:
        return None


def cmd_cluster(args):
    from .cluster.status import cmd_status as status

    return status(args, _cluster_settings(args))


def cmd_status(args):
    st = _ask(args, "status", name=args.name)
    if (settings := _cluster_settings(args)) is not None:
        from .cluster.status import nodes
        try:
            st["cluster"] = {"nodes": nodes(settings)}
        except OSError as e:
            st["cluster"] = {"error": str(e)}
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if st.get("power") and not args.name:
        from .power import describe

        print(describe(st["power"]))
    if not args.name:
        for where in st["daemon"].get("insecure_exports") or []:
            print(f"export {where}: INSECURE (insecure = true): plaintext, no authentication, reachable from other machines")
    lost = {}  # device -> what its lost disks say; its table line alone would look healthy
    for disk in st["daemon"].get("lost_disks") or []:
        for name in disk.get("devices", []):
            lost.setdefault(name, []).append(f"disk {disk['disk']} {disk['state']}; its I/O fails until it returns")
    for dev in st["devices"]:
        prefix = "" if args.name else f"{dev['name']}: "
        for line in dev["lines"] + lost.get(dev["name"], []):
            print(prefix + line)
        if dev.get("table_differs_from_config"):
            print(f"{prefix}live table differs from the config: `appliance table {dev['name']}` prints it")
        if dev["suspended"]:
            waits = "; a loaded table goes live at resume" if dev.get("inactive_table") else ""
            print(f"{prefix}(suspended{waits})")
    for name, words in (st["daemon"].get("waiting") or {}).items():
        if args.name in (None, name):
            prefix = "" if args.name else f"{name}: "
            print(f"{prefix}waiting for {' '.join(words)}: not served until it is attached")
    return 0


def cmd_table(args):
    for line in _ask(args, "table", name=args.name)["table"]:
        print(line)
    return 0


def cmd_message(args):
    out = _ask(args, "message", name=args.name, sector=args.sector, words=args.words)["result"]
    if out:
        print(out)
    return 0


def cmd_suspend(args):
    _ask(args, "suspend", name=args.name, noflush=args.noflush)
    return 0


def cmd_resume(args):
    _ask(args, "resume", name=args.name)
    return 0


def cmd_load(args):
    lines = args.table or sys.stdin.read().splitlines()
    _ask(args, "load", name=args.name, table=lines)
    return 0


def cmd_reload(args):
    _ask(args, "reload")
    return 0


def cmd_power(args):
    from .power.command import power_command

    return power_command(args, lambda cmd, **kw: _ask(args, cmd, **kw))


def parser():
    p = argparse.ArgumentParser(prog="appliance", description="Device-mapper-style block devices over NBD.")
    config_help = f"config file (default: $APPLIANCE_CONFIG or {cfg.DEFAULT_PATH})"
    p.add_argument("--config", help=config_help)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("check-config", help="validate a config file and exit")
    s.add_argument("path", nargs="?")
    s.set_defaults(fn=cmd_check_config)

    sub.add_parser("ls", help="list devices").set_defaults(fn=cmd_ls)

    s = sub.add_parser("status", help="live status of devices")
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("table", help="a device's table, as it would be loaded")
    s.add_argument("name")
    s.set_defaults(fn=cmd_table)

    s = sub.add_parser("message", help="send a message to the target at SECTOR")
    s.add_argument("name")
    s.add_argument("sector", type=int)
    s.add_argument("words", nargs="+")
    s.set_defaults(fn=cmd_message)

    s = sub.add_parser("suspend", help="quiesce a device: hold new I/O, wait for I/O in flight")
    s.add_argument("name")
    s.add_argument("--noflush", action="store_true", help="let targets keep queued I/O queued")
    s.set_defaults(fn=cmd_suspend)

    s = sub.add_parser("resume", help="swap in a loaded table, if any, and release held I/O")
    s.add_argument("name")
    s.set_defaults(fn=cmd_resume)

    s = sub.add_parser("load", help="load a table into a device's inactive slot (resume swaps it in)")
    s.add_argument("name")
    s.add_argument("table", nargs="*", help="table lines (default: read from stdin)")
    s.set_defaults(fn=cmd_load)

    sub.add_parser("reload", help="re-read the config and apply it").set_defaults(fn=cmd_reload)

    s = sub.add_parser("power", help="feed a UPS event (upsmon's NOTIFYCMD), or wait-clean")
    s.add_argument("words", nargs="*", metavar="EVENT|wait-clean",
                   help="ONBATT, ONLINE, LOWBATT, FSD, SHUTDOWN, COMMBAD, COMMOK (default: $NOTIFYTYPE, "
                        "and the words are upsmon's message); wait-clean: exit 0 once every ramback is clean")
    s.add_argument("--timeout", type=float, default=60, help="wait-clean: give up after this many seconds")
    s.add_argument("--ups", help="the UPS the event is about (default: $UPSNAME)")
    s.set_defaults(fn=cmd_power)

    logwrites.add_parser(sub)
    layer_command.add_parser(sub)
    logd.add_parser(sub)
    s = sub.add_parser("cluster", help="the cluster of clustered mirrors' logs")
    csub = s.add_subparsers(dest="what", required=True)
    csub.add_parser("status", help="a line per node, as etcd holds it").set_defaults(fn=cmd_cluster)

    # --config after the subcommand too (`appliance serve --config PATH`), as systemctl and
    # dmsetup take options; SUPPRESS keeps one given before the subcommand when none is after
    def config_everywhere(subparsers):
        for s in subparsers.choices.values():
            s.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
            for action in s._actions:
                if isinstance(action, argparse._SubParsersAction):
                    config_everywhere(action)

    config_everywhere(sub)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return code
    except BrokenPipeError:
        # `appliance status --json | head`: the reader has what it wanted; stdout goes nowhere
        # now, or the interpreter's own flush at exit fails the same way
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ControlError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
