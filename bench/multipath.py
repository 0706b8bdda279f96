#!/usr/bin/env python3
"""multipath's figures, as ratios measured in one run (issue: multipath).

    python bench/multipath.py [--runtime S] [--rate 400M] [--parts 1,2,3,4]

  1. Two remote paths, each an `nbdkit --filter=rate file` (rate=RATE bits/s) over one data
     file: sequential 1 MiB reads at QD16 through a multipath map over both, as a ratio of the
     same map over one of them (bar: >= 1.8x).
  2. One fast path and one behind nbdkit's `delay` (rdelay=5ms): 4 KiB random reads at QD16
     as ratios of the fast path alone (a map of two connections to the fast server, so as many
     requests are in flight as in the two-path maps) (bar: >= 0.9x), with the part of the
     requests each map sent to the slow path. `service-time` is run as dm
     defines it twice: with dm's default relative_throughput (1 for both paths: fewest bytes in
     flight wins, so the slow path holds about half the requests; a figure) and with each path's
     relative_throughput from its IOPS measured alone in this run (the bar); then
     `historical-service-time` (measures service time itself: the bar too) and `round-robin`.
  3. Merging: sequential 4 KiB writes at QD32 through a two-path round-robin map over local
     `@NAME` paths, then over two nbdkit paths; the average request size the paths saw
     (bar: >= 64 KiB).
  4. Failover: 4 KiB random reads at QD16 over two nbdkit paths; one nbdkit is killed with
     SIGKILL a second in; the longest completion latency fio saw is the client-visible stall.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MiB,
    Appliance,
    Nbdkit,
    Workload,
    fmt_num,
    fmt_ratio,
    make_data_file,
    measure,
    need_tools,
    print_table,
    ratio,
    terminate_on_signals,
    workdir,
)

SIZE = 256 * MiB


def mp_line(paths, selector="round-robin 0", path_args="1"):
    words = " ".join(f"{p} {path_args}" for p in paths)
    nargs = len(path_args.split())
    return f"0 {SIZE // 512} multipath 0 0 1 1 {selector} {len(paths)} {nargs} {words}"


def remote(kit, export=""):
    return f"nbd+unix:///{export}?socket={kit.socket}"  # nbdkit serves any export name: a second connection


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--rate", default="400M", help="nbdkit rate filter's bits/s per path")
    ap.add_argument("--parts", default="1,2,3,4", help="which figures to measure, e.g. 2,3")
    args = ap.parse_args()
    parts = {int(n) for n in args.parts.split(",")}
    need_tools("fio", "nbdkit")
    terminate_on_signals()
    rows = []
    with workdir() as wd:
        data = make_data_file(Path(wd) / "data.img", SIZE)

        if 1 in parts:
            rate_paths(args, wd, data, rows)
        if 2 in parts:
            fast_and_slow(args, wd, data, rows)
        if 3 in parts:
            merging(args, wd, data, rows)
        if 4 in parts:
            failover(args, wd, data, rows)
    print_table(["workload", "figure", "ratio", "bar", ""], rows)


def rate_paths(args, wd, data, rows):
    # 1. bandwidth-limited paths: two against one
    seq = Workload("read-1m-qd16", "1 MiB sequential read, QD16", "read", "1m", 16, metric="mib_s")
    kits = [Nbdkit(wd, "file", [data, f"rate={args.rate}"], name=f"rate-{n}", filters=["rate"]) for n in "ab"]
    for k in kits:
        k.start()
    try:
        with Appliance(wd, [("two", [mp_line([remote(k) for k in kits])]),
                            ("one", [mp_line([remote(kits[0])])])], name="mp-rate") as app:
            one = measure(app, seq, runtime=args.runtime, export="one")
            two = measure(app, seq, runtime=args.runtime, export="two")
    finally:
        for k in kits:
            k.stop()
    r = ratio(seq.value(two), seq.value(one))
    rows.append([f"two rate-limited paths ({args.rate}bit/s each), {seq.title}",
                 f"{fmt_num(seq.value(two), 'mib_s')} MiB/s", f"{fmt_ratio(r)} one path", ">= 1.8x",
                 "ok" if r and r >= 1.8 else "MISSED"])


def fast_and_slow(args, wd, data, rows):
    # 2. a fast and a slow path
    rnd = Workload("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16)
    fast = Nbdkit(wd, "file", [data], name="fast")
    slow = Nbdkit(wd, "file", [data, "rdelay=5ms"], name="slow", filters=["delay"])
    fast.start()
    slow.start()
    try:
        both = [remote(fast), remote(slow)]
        # "alone": two connections to the fast server, so the map lets as many requests in flight
        # (8 a path) as the two-path maps do; likewise "slow"
        devices = [("alone", [mp_line([remote(fast), remote(fast, "b")])]),
                   ("slow", [mp_line([remote(slow), remote(slow, "b")])]),
                   ("rr", [mp_line(both)]),
                   ("hst", [mp_line(both, "historical-service-time 0")]),
                   ("st", [mp_line(both, "service-time 0", "1 1")])]
        with Appliance(wd, devices[:2], name="mp-alone") as app:
            alone = measure(app, rnd, runtime=args.runtime, export="alone")
            slow_alone = measure(app, rnd, runtime=args.runtime, export="slow")
        # relative_throughput as an administrator sets it: each path's IOPS alone, scaled to 1-100
        rt_fast = 100
        rt_slow = max(1, min(100, round(100 * rnd.value(slow_alone) / max(rnd.value(alone), 1))))
        devices.append(("stm", [f"0 {SIZE // 512} multipath 0 0 1 1 service-time 0 2 2 "
                                f"{both[0]} 1 {rt_fast} {both[1]} 1 {rt_slow}"]))
        with Appliance(wd, devices[:1] + devices[2:], name="mp-asym") as app:
            alone = measure(app, rnd, runtime=args.runtime, export="alone")
            stm, hst, st, rr = (measure(app, rnd, runtime=args.runtime, export=e) for e in ("stm", "hst", "st", "rr"))
            again = measure(app, rnd, runtime=args.runtime, export="alone")  # first and last: load drifts
            share = {e: slow_share(app, e) for e in ("stm", "hst", "st", "rr")}
    finally:
        fast.stop()
        slow.stop()
    base = (rnd.value(alone) + rnd.value(again)) / 2
    rows.append([f"fast path alone (mean of the first and last run), {rnd.title}", f"{fmt_num(base)} IOPS",
                 f"slow path alone {fmt_num(rnd.value(slow_alone))} IOPS", "", ""])
    for label, e, res, bar in ((f"service-time, relative_throughput {rt_fast}:{rt_slow} (measured)", "stm", stm, True),
                               ("historical-service-time", "hst", hst, True),
                               ("service-time, relative_throughput 1:1 (dm default)", "st", st, False),
                               ("round-robin", "rr", rr, False)):
        r = ratio(rnd.value(res), base)
        rows.append([f"fast + 5 ms path, {label}, {rnd.title}", f"{fmt_num(rnd.value(res))} IOPS",
                     f"{fmt_ratio(r)} fast path alone, {share[e]:.0%} of requests to the slow path", ">= 0.9x" if bar else "(figure)",
                     ("ok" if r and r >= 0.9 else "MISSED") if bar else ""])


def slow_share(app, export):
    """The part of a two-path map's requests that went to its second (slow) path."""
    st = app.status(export)["devices"][0]["segments"][0]["status"]
    n = [p["requests"] for g in st["path_groups"] for p in g["paths"]]
    return n[1] / max(1, sum(n))


def merging(args, wd, data, rows):
    # 3. merging before map: over local `@NAME` paths (they answer in microseconds, so what waits
    # behind a run in flight is least) and over two nbdkit paths (the remote paths)
    wr = Workload("write-4k-qd32", "4 KiB sequential write, QD32", "write", "4k", 32)
    local = [(n, [f"0 {SIZE // 512} linear {data} 0"], {"export": False}) for n in ("pa", "pb")]
    kits = [Nbdkit(wd, "file", [data], name=f"merge-{n}") for n in "ab"]
    for k in kits:
        k.start()
    try:
        with Appliance(wd, [("mp", [mp_line(["@pa", "@pb"])]), ("mpr", [mp_line([remote(k) for k in kits])])] + local,
                       name="mp-merge") as app:
            for export, label in (("mp", "local @NAME paths"), ("mpr", "two nbdkit paths")):
                res = measure(app, wr, runtime=args.runtime, export=export)
                st = app.status(export)["devices"][0]["segments"][0]["status"]
                paths = [p for g in st["path_groups"] for p in g["paths"]]
                avg = (sum(p["avg_request_bytes"] * p["requests"] for p in paths)
                       / max(1, sum(p["requests"] for p in paths)))
                rows.append([f"merging, {wr.title}, {label}", f"{fmt_num(wr.value(res))} IOPS",
                             f"{avg / 1024:.1f} KiB a request at the paths", ">= 64 KiB",
                             "ok" if avg >= 64 * 1024 else "MISSED"])
    finally:
        for k in kits:
            k.stop()


def failover(args, wd, data, rows):
    # 4. failover stall
    kits = [Nbdkit(wd, "file", [data], name=f"kill-{n}") for n in "ab"]
    for k in kits:
        k.start()
    try:
        with Appliance(wd, [("mp", [mp_line([remote(k) for k in kits])])], name="mp-kill",
                       extra_config="[multipath]\npolling_interval = 1\n") as app:
            killer = threading.Timer(1.0, lambda: kits[0].proc.send_signal(signal.SIGKILL))
            killer.start()
            r = subprocess.run(["fio", "--name=kill", "--ioengine=nbd", f"--uri={app.uri('mp')}",
                                "--rw=randread", "--bs=4k", "--iodepth=16", "--time_based",
                                f"--runtime={max(3, args.runtime)}", "--output-format=json"],
                               capture_output=True, text=True, timeout=120)
            killer.join()
            job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
            stall_ms = job["read"]["clat_ns"]["max"] / 1e6
            errors = job.get("error", 0)
    finally:
        for k in kits:
            k.stop()
    rows.append(["failover: one of two paths killed under 4 KiB random reads, QD16",
                 f"{stall_ms:.1f} ms", "longest completion", "(figure)", "ok" if not errors else f"fio error {errors}"])


if __name__ == "__main__":
    main()
