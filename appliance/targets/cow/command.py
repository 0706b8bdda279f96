"""`appliance layer create|info|check`: make and examine cow layer files (the format: layer.py)."""

from __future__ import annotations

import json
import sys

from .. import TargetError, parse_size
from . import journal, offline
from .layer import DEFAULT_GRAIN, LayerError


def add_parser(sub):
    p = sub.add_parser("layer", help="create, show or check a cow layer file")
    cmds = p.add_subparsers(dest="layer_command", required=True)
    s = cmds.add_parser("create", help="a new, empty layer: a sparse file (or a disk) with its header and bitmap")
    s.add_argument("path")
    s.add_argument("--size", required=True, help="the device size: bytes, or with K, M, G, T")
    s.add_argument("--grain", default=str(DEFAULT_GRAIN),
                   help="bytes copied up at a time: a power of two from 512 to 1M (default 4K)")
    s.add_argument("--force", action="store_true", help="overwrite a file or disk that is not empty")
    s.set_defaults(fn=cmd_create)
    s = cmds.add_parser("info", help="a layer's geometry, identity, seal and allocated bytes")
    s.add_argument("path", help="the layer file, or the bitmap device of a three-word layer")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_info)
    s = cmds.add_parser("check", help="header and bitmap sanity; exits 1 on damage, naming it")
    s.add_argument("path", help="the layer file, or the bitmap device of a three-word layer")
    s.add_argument("--data", metavar="DEV", help="a three-word layer's data device: check that it holds the layer")
    s.set_defaults(fn=cmd_check)


def _fail(message):
    print(f"appliance: {message}", file=sys.stderr)
    return 1


def cmd_create(args):
    try:
        size = parse_size(args.size, "--size")
        grain = parse_size(args.grain, "--grain")
        header = offline.create(args.path, size, grain, force=args.force)
    except (LayerError, TargetError) as e:
        return _fail(e)
    except OSError as e:
        return _fail(f"{args.path}: {e.strerror}")
    print(f"{args.path}: layer {header.uuid}, {size} bytes in {grain}-byte grains")
    return 0


def describe(layer) -> dict:
    h = layer.header
    allocated, zero = layer.allocated_grains(), layer.zero_grains()
    try:
        rec = journal.read(layer.bitmap_fd, layer.name)
    except journal.RecordError as e:
        rec = str(e)
    if isinstance(rec, journal.Record):  # a merge of this layer and those up to `to` that has not ended
        rec = {"into": "base" if rec.into_base else str(rec.into), "to": str(rec.last),
               "done_below_grain": rec.cursor, "running": rec.running, "rate": rec.rate}
    return {
        "path": layer.name, "version": h.version, "uuid": str(h.uuid),
        "parent": str(h.parent) if h.parent else None, "sealed": h.sealed,
        "pushed_on_it": str(h.child) if h.child else None,
        "size": h.size, "grain": h.grain, "grains": h.grains,
        "allocated_grains": allocated, "zero_grains": zero,
        "allocated_bytes": (allocated - zero) * h.grain,  # data held; zero grains hold none
        "bitmap_offset": h.bitmap_offset, "bitmap_length": h.bitmap_length,
        "data_offset": h.data_offset, "data_on": "data device" if h.split else "this file",
        "merge": rec,
    }


def cmd_info(args):
    try:
        layer = offline.inspect(args.path)
    except LayerError as e:
        return _fail(e)
    try:
        info = describe(layer)
    finally:
        layer.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    sealed = "no"
    if info["sealed"]:
        sealed = f"yes (layer {info['pushed_on_it']} was pushed on it)" if info["pushed_on_it"] else "yes"
    for key, value in (
        ("uuid", info["uuid"]), ("parent", info["parent"] or "none yet (set when first attached)"),
        ("sealed", sealed), ("size", f"{info['size']} bytes"), ("grain", f"{info['grain']} bytes"),
        ("allocated", f"{info['allocated_bytes']} bytes ({info['allocated_grains'] - info['zero_grains']} grains "
                      f"of data, {info['zero_grains']} that read as zeros)"),
        ("bitmap", f"offset {info['bitmap_offset']}, {info['bitmap_length']} bytes"),
        ("data", f"offset {info['data_offset']} on {info['data_on']}"),
    ) + ((("merge", _merge_line(info["merge"])),) if info["merge"] else ()):
        print(f"{key:10} {value}")
    return 0


def _merge_line(rec):
    if isinstance(rec, str):
        return rec
    state = "running (resumes when the stack starts)" if rec["running"] else "cancelled (the same merge resumes)"
    return f"into {rec['into']} up to layer {rec['to']}, done below grain {rec['done_below_grain']}, {state}"


def cmd_check(args):
    problems = offline.check(args.path, args.data)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    print(f"{args.path}: OK")
    return 0
