#!/usr/bin/env python3
"""linear on a real disk: `direct = true` over a file on the root filesystem, against the
disk itself and the peers that also bypass the page cache, in one invocation.

    python bench/direct.py [--runtime S] [--size MiB] [--data-dir DIR] [--only KEYS]

One data file (random data) on a real disk (not tmpfs: --data-dir must be on one) is
  (a) measured with fio itself, `--ioengine=io_uring --direct=1` on the file: the
      physical limit of this disk at each queue depth,
  (b) served by `appliance serve` with one device `0 <sectors> linear FILE 0`,
      `direct = true`,
  (c) served by `qemu-nbd --cache=none --aio=io_uring` (O_DIRECT, asynchronous),
  (d) served by `nbdkit file FILE cache=none` (no O_DIRECT in Debian 12's nbdkit: it
      drops pages after each request; shown, not judged),
and fio's nbd engine runs the same 4 KiB random reads at QD1, QD8 and QD32 on one
connection against each server. Bars (issue 8): at QD32 the appliance reaches at least
0.9x fio's own figure and at least 1.0x qemu-nbd's.

With --qemu-client, qemu's own NBD client (the one a guest's disk uses) reads too:
`qemu-img bench` at QD16 (that client keeps at most 16 requests in flight), on the file
(`-t none -i io_uring`) and through each server, to show how much of the disk another
client can take from any server here.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
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
    need_tools,
    print_table,
    ratio,
    run_fio,
    settle,
    terminate_on_signals,
    workdir,
    write_results,
)

SOURCES = ("fio", "appliance", "qemu-nbd", "nbdkit")
DEVICE = "bench"
WORKLOADS = [
    Workload("randread-4k-qd1", "4 KiB random read, QD1", "randread", "4k", 1),
    Workload("randread-4k-qd8", "4 KiB random read, QD8", "randread", "4k", 8),
    Workload("randread-4k-qd32", "4 KiB random read, QD32", "randread", "4k", 32),
    Workload("randwrite-4k-qd32", "4 KiB random write, QD32", "randwrite", "4k", 32),
]
# (minimum ratio to fio on the file, minimum ratio to qemu-nbd), from the issue
BARS = {"randread-4k-qd32": (0.9, 1.0)}


def make_server(kind: str, wd: Path, data: str, size: int, poll_max_us: int = 0):
    if kind == "appliance":
        return Appliance(wd, [(DEVICE, [f"0 {size // 512} linear {data} 0"], {"direct": True})],
                         extra_config=f"poll_max_us = {poll_max_us}\n")
    if kind == "qemu-nbd":
        return QemuNbd(wd, data, fmt="raw", shared=16, cache="none", aio="io_uring")
    if kind == "nbdkit":
        return Nbdkit(wd, "file", [f"file={data}", "cache=none"])
    raise ValueError(kind)


QEMU_STEP = 1028 * 1024  # shares no factor with a power-of-two file size but 4 KiB


def qemu_bench(target: str, extra: list, depth: int = 16, count: int = 200000) -> float:
    """IOPS of `qemu-img bench` reading 4 KiB `count` times at `depth`. It has no random
    pattern: a step of 1028 KiB, taken modulo the file's size, visits its 4 KiB blocks in a
    scattered order, none twice within a run."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", "4096",
           "-S", str(QEMU_STEP), *extra, target]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    m = re.search(r"Run completed in ([\d.]+) seconds", r.stdout)
    if r.returncode != 0 or not m:
        raise BenchError(f"qemu-img bench failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr.strip()}")
    return count / float(m.group(1))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def on_tmpfs(path: str) -> bool:
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            mnt, kind = line.split()[1], line.split()[2]
            if path.startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
                best, fstype = mnt, kind
    return fstype in ("tmpfs", "ramfs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=float, default=10, help="seconds per fio run, measured (default 10)")
    p.add_argument("--ramp", type=float, default=1, help="seconds of fio ramp before measuring (default 1)")
    p.add_argument("--size", type=int, default=2048, help="data file size in MiB (default 2048)")
    p.add_argument("--data-dir", default="/var/tmp", help="a directory on a real disk (default /var/tmp)")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"subset/order of {','.join(SOURCES)}")
    p.add_argument("--only", help="comma-separated workload keys (default: all)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/direct-*.json")
    p.add_argument("--check", action="store_true", help="exit 1 if a bar FAILs")
    p.add_argument("--poll-max-us", type=int, default=0,
                   help="the appliance's [export] poll_max_us (default 0, its default: no polling)")
    p.add_argument("--qemu-client", action="store_true",
                   help="also read at QD16 with qemu's NBD client (qemu-img bench)")
    args = p.parse_args(argv)

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if any(s not in SOURCES for s in sources) or not sources:
        p.error(f"--sources: choose from {', '.join(SOURCES)}")
    wls = [w for w in WORKLOADS if not args.only or w.key in args.only.split(",")]
    data_dir = os.path.realpath(args.data_dir)
    if on_tmpfs(data_dir + "/"):
        p.error(f"--data-dir {data_dir} is on tmpfs: O_DIRECT needs a real disk")
    need_tools("fio", *[s for s in sources if s not in ("fio", "appliance")],
               *(["qemu-img"] if args.qemu_client else []))
    terminate_on_signals()
    env = environment()
    size = args.size * MiB

    results = {s: {} for s in sources}
    qemu_client = {}  # "file" or a server -> IOPS of qemu-img bench
    started = time.time()
    with workdir() as wd:
        data = os.path.join(data_dir, f"direct-bench-{os.getpid()}.img")
        log(f"writing {args.size} MiB of random data to {data} ...")
        try:
            make_data_file(data, size)
            for kind in sources:
                if kind == "fio":
                    for wl in wls:
                        settle()
                        r = run_fio(None, filename=data, rw=wl.rw, bs=wl.bs, iodepth=wl.iodepth,
                                    runtime=args.runtime, ramp_time=args.ramp, name=wl.key)
                        results[kind][wl.key] = r
                        log(f"  fio on the file   {wl.title:<28} {fmt_num(r.iops):>7} IOPS  p99 {r.lat_p99_us:.0f} us")
                    if args.qemu_client:
                        settle()
                        qemu_client["file"] = qemu_bench(data, ["-t", "none", "-i", "io_uring"])
                        log(f"  qemu-img bench on the file, QD16  {fmt_num(qemu_client['file']):>7} IOPS")
                    continue
                srv = make_server(kind, wd, data, size, args.poll_max_us)
                log(f"starting {kind}: {' '.join(srv.command())}")
                with srv:
                    for wl in wls:
                        r = measure(srv, wl, runtime=args.runtime, ramp_time=args.ramp)
                        results[kind][wl.key] = r
                        log(f"  {kind:<17} {wl.title:<28} {fmt_num(r.iops):>7} IOPS  p99 {r.lat_p99_us:.0f} us"
                            f"  server {r.server_us_per_io or 0:.1f} us/IO")
                    if args.qemu_client:
                        settle()
                        qemu_client[kind] = qemu_bench(srv.uri(), [])
                        log(f"  qemu-img bench through {kind}, QD16  {fmt_num(qemu_client[kind]):>7} IOPS")
        finally:
            try:
                os.unlink(data)
            except OSError:
                pass
    elapsed = time.time() - started

    def val(s, w):
        r = results.get(s, {}).get(w.key)
        return r.iops if r else None

    rows, summary, verdicts = [], [], []
    for w in wls:
        a, f, q, n = (val(s, w) for s in ("appliance", "fio", "qemu-nbd", "nbdkit"))
        rf, rq, rn = ratio(a, f), ratio(a, q), ratio(a, n)
        bar = BARS.get(w.key)
        verdict = ""
        if bar:
            verdict = "n/a" if rf is None or rq is None else ("PASS" if rf >= bar[0] and rq >= bar[1] else "FAIL")
            verdicts.append(verdict)
        rows.append([w.title, fmt_num(a), fmt_num(f), fmt_num(q), fmt_num(n), fmt_ratio(rf), fmt_ratio(rq),
                     fmt_ratio(rn), f">={bar[0]}x fio, >={bar[1]}x qemu-nbd" if bar else "", verdict])
        summary.append({"workload": w.key, "appliance": a, "fio": f, "qemu-nbd": q, "nbdkit": n,
                        "ratio_fio": rf, "ratio_qemu_nbd": rq, "ratio_nbdkit": rn, "verdict": verdict or None})
    print(f"\nlinear, direct = true, over a {args.size} MiB file in {data_dir}; one connection, "
          f"{args.runtime:g}s per run; poll_max_us = {args.poll_max_us}; {env['cpus']} CPUs\n")
    print_table(["workload (IOPS)", "appliance", "fio file", "qemu-nbd", "nbdkit", "app/fio", "app/qemu",
                 "app/nbdkit", "bar", "result"], rows, align="lrrrrrrrll")
    def client_us(s, w):
        # fio's own CPU per request: the NBD client beside each server, the whole job for fio
        # on the file. Client and server share the cores, so their sum is what a request costs
        r = results.get(s, {}).get(w.key)
        return f"{r.fio_cpu * 1e4 / r.iops:.1f}" if r and r.iops else ""

    cpu = [[w.title] + [f"{results[s][w.key].server_us_per_io:.1f}" if s in results and w.key in results[s]
                        and results[s][w.key].server_us_per_io else "" for s in ("appliance", "qemu-nbd", "nbdkit")]
           + [client_us("appliance", w), client_us("fio", w)]
           for w in wls]
    print("\nCPU per request (us): each server's, the NBD client's beside the appliance, fio's on the file\n")
    print_table(["workload", "appliance", "qemu-nbd", "nbdkit", "client (appliance)", "fio on the file"], cpu,
                align="lrrrrr")
    if qemu_client:
        base = qemu_client.get("file")
        print("\nqemu's NBD client (at most 16 requests in flight): qemu-img bench, 4 KiB reads at QD16 "
              "(a scattered stride), against qemu-img bench on the file with O_DIRECT and io_uring\n")
        print_table(["reader", "IOPS", "vs the file"],
                    [["on the file" if s == "file" else f"through {s}", fmt_num(v), fmt_ratio(ratio(v, base))]
                     for s, v in qemu_client.items()], align="lrr")
    print(f"\nload average at start {env['loadavg_at_start'][0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"took {elapsed:.0f}s")
    if not args.no_save:
        out = write_results("direct", {"benchmark": "direct", "environment": env, "summary": summary,
                                       "qemu_client": qemu_client,
                                       "runs": {s: {k: r.to_dict() for k, r in v.items()} for s, v in results.items()}})
        print(f"results: {out}")
    return 1 if args.check and "FAIL" in verdicts else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
