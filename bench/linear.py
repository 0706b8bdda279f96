#!/usr/bin/env python3
"""The foundation's figures: a `linear` device over a file, against nbdkit and qemu-nbd.

    python bench/linear.py [--runtime S] [--size MiB] [--repeat N] [--servers a,b,c]

One data file (random data, in the page cache) is served in turn by
  (a) `appliance serve` with one device `0 <sectors> linear FILE 0`,
  (b) `nbdkit file FILE` (nbdkit's default thread count),
  (c) `qemu-nbd --persistent --shared=16 --cache=writeback -f raw FILE`,
each on its own Unix socket and never two at once, and fio's nbd engine runs
the same workloads against each. The table gives the appliance's figure as a
ratio of each peer's, and checks the bar from the issue. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MiB,
    Appliance,
    BenchError,
    Nbdkit,
    QemuNbd,
    Workload,
    environment,
    fmt_num,
    fmt_ratio,
    make_data_file,
    measure,
    median_result,
    need_tools,
    print_table,
    ratio,
    terminate_on_signals,
    workdir,
    write_results,
)

SERVERS = ("appliance", "nbdkit", "qemu-nbd")
DEVICE = "bench"


def workloads(seq_qd: int) -> list[Workload]:
    return [
        Workload("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16),
        Workload("randwrite-4k-qd16", "4 KiB random write, QD16", "randwrite", "4k", 16),
        Workload(f"read-1m-qd{seq_qd}", f"1 MiB sequential read, QD{seq_qd}", "read", "1m", seq_qd,
                 metric="mib_s"),
        Workload(f"write-1m-qd{seq_qd}", f"1 MiB sequential write, QD{seq_qd}", "write", "1m", seq_qd,
                 metric="mib_s"),
        Workload("randread-4k-qd16-2conn", "4 KiB random read, QD16 x 2 connections", "randread", "4k", 16,
                 numjobs=2),
    ]


# The bar from the issue: (minimum ratio to nbdkit, must be ahead of qemu-nbd).
def bar_for(wl: Workload):
    if wl.bs == "4k" and wl.numjobs == 1:
        return 0.5, True
    if wl.bs == "1m":
        return 0.8, False
    return None


def bar_text(bar) -> str:
    if bar is None:
        return "(none)"
    lo, beat_qemu = bar
    return f">={lo:.1f}x nbdkit" + (", >qemu-nbd" if beat_qemu else "")


def judge(bar, r_nbdkit, r_qemu) -> str:
    if bar is None:
        return ""
    lo, beat_qemu = bar
    if r_nbdkit is None or (beat_qemu and r_qemu is None):
        return "n/a"
    ok = r_nbdkit >= lo and (not beat_qemu or r_qemu > 1.0)
    return "PASS" if ok else "FAIL"


def make_server(kind: str, wd: Path, data: str, size: int):
    if kind == "appliance":
        return Appliance(wd, [(DEVICE, [f"0 {size // 512} linear {data} 0"])])
    if kind == "nbdkit":
        return Nbdkit(wd, "file", [f"file={data}"])
    if kind == "qemu-nbd":
        return QemuNbd(wd, data, fmt="raw", shared=16, cache="writeback")
    raise ValueError(kind)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=float, default=10, help="seconds per fio run, measured (default 10)")
    p.add_argument("--ramp", type=float, default=1, help="seconds of fio ramp before measuring (default 1)")
    p.add_argument("--size", type=int, default=1024, help="data file size in MiB (default 1024)")
    p.add_argument("--seq-qd", type=int, default=4, help="queue depth of the 1 MiB sequential jobs (default 4)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over all servers; the table shows each figure's median (default 1)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"subset/order of {','.join(SERVERS)}")
    p.add_argument("--only", help="comma-separated workload keys to run (default: all)")
    p.add_argument("--data-dir", help="where to create the data file (default: the temp dir, under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, server logs)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/linear-*.json")
    p.add_argument("--check", action="store_true", help="exit 1 if a bar FAILs")
    p.add_argument("--nice", type=int, default=0,
                   help="adjust the niceness of this script, the servers and fio (e.g. -10, needs root): "
                        "less noise from other work on the machine")
    args = p.parse_args(argv)

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in SERVERS]
    if bad or not servers:
        p.error(f"--servers: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(SERVERS)}")
    wls = workloads(args.seq_qd)
    if args.only:
        keys = set(args.only.split(","))
        unknown = keys - {w.key for w in wls}
        if unknown:
            p.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(w.key for w in wls)}")
        wls = [w for w in wls if w.key in keys]
    size = args.size * MiB

    need_tools("fio", *[s for s in servers if s != "appliance"])
    terminate_on_signals()
    if args.nice:
        try:
            os.nice(args.nice)
        except PermissionError:
            raise BenchError(f"--nice {args.nice}: not permitted (negative values need root)") from None
    env = environment()
    env["nice"] = os.nice(0)

    # results[server][workload key] = [FioResult per round]
    results = {s: {w.key: [] for w in wls} for s in servers}
    started = time.time()
    with workdir(keep=args.keep) as wd:
        data_dir = Path(args.data_dir) if args.data_dir else wd
        data = str(data_dir / f"linear-bench-{os.getpid()}.img")
        log(f"writing {args.size} MiB of random data to {data} ...")
        try:
            make_data_file(data, size)
            for rnd in range(args.repeat):
                # rotate the order each round so no server always goes first
                for kind in servers[rnd % len(servers):] + servers[:rnd % len(servers)]:
                    srv = make_server(kind, wd, data, size)
                    log(f"[round {rnd + 1}/{args.repeat}] starting {kind}: {' '.join(srv.command())}")
                    with srv:
                        for wl in wls:
                            fast0 = srv.fast_ios() if kind == "appliance" else None
                            r = measure(srv, wl, runtime=args.runtime, ramp_time=args.ramp)
                            if kind == "appliance":
                                r.extra["fast_ios"] = srv.fast_ios() - fast0
                            results[kind][wl.key].append(r)
                            extra = (f", fast-path IOs {r.extra['fast_ios']} (incl. ramp; fio measured {r.total_ios})"
                                     if "fast_ios" in r.extra else "")
                            log(f"  {wl.title:<42} {fmt_num(wl.value(r), wl.metric):>7} {wl.unit:<5}"
                                f"  p99 {r.lat_p99_us:.0f} us  server CPU {r.server_cpu:.0f}%"
                                f" ({r.server_us_per_io:.1f} us/IO)"
                                f"  fio CPU {r.fio_cpu:.0f}%{extra}")
                    rc = srv.proc.returncode
                    if rc not in (0, None) and kind == "appliance":
                        log(f"  note: {kind} exited {rc} on SIGTERM; log:\n{srv.log_text()}")
        finally:
            if args.data_dir:  # otherwise it goes with the temp dir
                try:
                    os.unlink(data)
                except OSError:
                    pass
    elapsed = time.time() - started

    # ---- the table ---------------------------------------------------------
    med = {s: {w.key: median_result(results[s][w.key], w) if results[s][w.key] else None for w in wls}
           for s in servers}

    def val(s, w):
        r = med.get(s, {}).get(w.key)
        return w.value(r) if r is not None else None

    rows, summary, verdicts = [], [], []
    for w in wls:
        a, n, q = val("appliance", w), val("nbdkit", w), val("qemu-nbd", w)
        rn, rq = ratio(a, n), ratio(a, q)
        bar = bar_for(w)
        verdict = judge(bar, rn, rq)
        if verdict:
            verdicts.append(verdict)
        rows.append([w.title, w.unit, fmt_num(a, w.metric), fmt_num(n, w.metric), fmt_num(q, w.metric),
                     fmt_ratio(rn), fmt_ratio(rq), bar_text(bar), verdict])
        summary.append({
            "workload": w.key, "title": w.title, "metric": w.metric,
            "appliance": a, "nbdkit": n, "qemu-nbd": q,
            "ratio_appliance_nbdkit": rn, "ratio_appliance_qemu_nbd": rq,
            "bar": None if bar is None else {"min_ratio_nbdkit": bar[0], "ahead_of_qemu_nbd": bar[1]},
            "verdict": verdict or None,
        })

    note = f" (median of {args.repeat} rounds)" if args.repeat > 1 else ""
    print(f"\nlinear over a {args.size} MiB file in the page cache; fio nbd engine, {args.runtime:g}s per run"
          f"{note}; {env['cpus']} CPUs shared by fio and the server\n")
    print_table(["workload", "unit", "appliance", "nbdkit", "qemu-nbd", "app/nbdkit", "app/qemu-nbd",
                 "bar", "result"], rows, align="llrrrrrll")

    print("\ndetails (per server; CPU is % of one CPU, averaged over the run incl. ramp)\n")
    drows = []
    for w in wls:
        for s in servers:
            for i, r in enumerate(results[s][w.key]):
                drows.append([w.title if s == servers[0] and i == 0 else "", s + (f" #{i + 1}" if args.repeat > 1 else ""),
                              fmt_num(r.iops), f"{r.mib_s:.0f}", f"{r.lat_p50_us:.0f}", f"{r.lat_p99_us:.0f}",
                              f"{r.server_cpu:.0f}%", f"{r.server_us_per_io:.1f}", f"{r.fio_cpu:.0f}%",
                              str(r.extra.get("fast_ios", ""))])
    print_table(["workload", "server", "IOPS", "MiB/s", "p50 us", "p99 us", "server CPU", "srv us/IO",
                 "fio CPU", "fast-path IOs"], drows, align="llrrrrrrrr")
    load = os.getloadavg()
    print(f"\nload average at start {env['loadavg_at_start'][0]:.2f}, at end {load[0]:.2f}"
          f"{'; nice ' + str(env['nice']) if env['nice'] else ''}; took {elapsed:.0f}s")

    if not args.no_save:
        out = write_results("linear", {
            "benchmark": "linear",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "settings": {"runtime_s": args.runtime, "ramp_s": args.ramp, "size_mib": args.size,
                         "seq_qd": args.seq_qd, "repeat": args.repeat, "servers": servers},
            "environment": env, "loadavg_at_end": load, "elapsed_s": elapsed,
            "summary": summary,
            "runs": {s: {k: [r.to_dict() for r in v] for k, v in results[s].items()} for s in servers},
        })
        print(f"results: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    if args.check and "FAIL" in verdicts:
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
