#!/usr/bin/env python3
"""cow against linear and qemu-nbd on the same data: 4 KiB random reads QD16 on a stack of 32
layers whose grains are spread over all of them, and 4 KiB random writes QD16 into fresh grains
(the first-write path) on top of it.

    python bench/cow.py [--runtime S] [--size MiB] [--depth 32] [--repeat N]

The data (random, in the page cache) is one flat file for `linear`. The cow stack holds the same
bytes spread over `depth` layer files, grain g in layer g mod depth + 1 (the base is a hole),
written offline with the layer format's own calls and chained (parents, seals) as pushes would
leave them. qemu-nbd serves a qcow2 backing chain as deep, built with qemu-img (4 KiB clusters,
so each layer holds the same grains as the cow layer of its depth) and filled through qemu-nbd
with the same bytes. Reads: `linear`, the cow stack (read-only), qemu-nbd on the chain's top.
Writes: a fresh empty writable layer on the stack, a fresh qcow2 overlay on the chain, each made
again for every round; fio writes every grain once in random order (its random map), so the run
ends after --size MiB or --runtime, whichever comes first (ramp included: its writes are not
counted). Each server runs alone; the table gives
IOPS, server CPU per request and the ratios the issue's bars are about. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    MiB,
    Appliance,
    BenchError,
    QemuNbd,
    Workload,
    environment,
    fmt_num,
    fmt_ratio,
    make_data_file,
    median_result,
    need_tools,
    print_table,
    ratio,
    run_fio,
    settle,
    terminate_on_signals,
    warm_file,
    workdir,
    write_results,
)

from appliance.targets.cow import offline  # noqa: E402
from appliance.targets.cow.layer import open_layer, pwrite_full  # noqa: E402
from appliance.targets.cow.stack import base_uuid  # noqa: E402

DEVICE = "bench"
GRAIN = 4096


def build_stack(wd: Path, flat: str, size: int, depth: int) -> tuple[str, list[str]]:
    """A hole of a base and `depth` layers that together hold the flat file's bytes."""
    base = str(wd / f"base-{depth}.img")
    with open(base, "wb") as f:
        f.truncate(size)
    paths = [str(wd / f"d{depth}-l{i}.layer") for i in range(1, depth + 1)]
    layers = []
    for p in paths:
        offline.create(p, size, GRAIN)
        layers.append(open_layer([p], writable=True))
    grains = size // GRAIN
    chunk = 4 * MiB
    with open(flat, "rb") as f:
        for off in range(0, size, chunk):
            data = f.read(chunk)
            for i in range(0, len(data), GRAIN):
                g = (off + i) // GRAIN
                layer = layers[g % depth]
                pwrite_full(layer.data_fd, data[i:i + GRAIN], layer.data_offset + g * GRAIN)
    for n, layer in enumerate(layers):
        for g in range(n, grains, depth):
            layer.mark_allocated(g, g + 1)
        layer.set_parent(base_uuid(size, base) if n == 0 else layers[n - 1].uuid)
    for n, layer in enumerate(layers):
        if n + 1 < depth:
            layer.seal(layers[n + 1].uuid)
        else:
            layer.sync_bitmap()
        layer.close()
    return base, paths  # their data is in the page cache: just written (reading the holes would fill it with zeros)


FILL = """
import sys, nbd
sock, flat, layer, depth, grain = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
h = nbd.NBD()
h.connect_unix(sock)
with open(flat, "rb") as f:
    data = f.read()
for off in range(layer * grain, len(data), depth * grain):
    h.pwrite(data[off:off + grain], off)
h.flush()
h.shutdown()
"""


def nbd_python() -> str:
    """A python3 with libnbd's bindings (Debian's python3-libnbd is for the system python)."""
    for py in (sys.executable, "/usr/bin/python3"):
        if subprocess.run([py, "-c", "import nbd"], capture_output=True).returncode == 0:
            return py
    raise BenchError("no python3 with libnbd's bindings (apt-get install python3-libnbd)")


def qcow2(path: str, backing: str, backing_fmt: str) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={GRAIN}",
                    "-b", backing, "-F", backing_fmt, path], check=True)
    return path


def build_chain(wd: Path, flat: str, base: str, size: int, depth: int) -> str:
    """A qcow2 backing chain `depth` deep over the base holding the flat file's bytes as the cow
    stack does (grain g in image g mod depth + 1); returns the top image."""
    py = nbd_python()
    below, fmt = base, "raw"
    for i in range(depth):
        top = qcow2(str(wd / f"q{i + 1}.qcow2"), below, fmt)
        with QemuNbd(wd, top, name=f"fill-{i + 1}", fmt="qcow2") as srv:
            subprocess.run([py, "-c", FILL, srv.socket, flat, str(i), str(depth), str(GRAIN)], check=True)
        below, fmt = top, "qcow2"
    for i in range(depth):
        warm_file(str(wd / f"q{i + 1}.qcow2"))
    return below


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(server, wl: Workload, runtime: float, ramp: float, extra=()):
    """One fio run; the server's CPU use (% of one CPU) over it."""
    settle()
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    r = run_fio(server.uri(), rw=wl.rw, bs=wl.bs, iodepth=wl.iodepth, runtime=runtime, ramp_time=ramp,
                name=wl.key, extra=extra)
    r.server_cpu = 100 * (server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=float, default=8, help="seconds per fio run, measured (default 8)")
    p.add_argument("--ramp", type=float, default=1, help="seconds of fio ramp before measuring (default 1)")
    p.add_argument("--size", type=int, default=256, help="device size in MiB (default 256)")
    p.add_argument("--depth", type=int, default=32, help="layers in the stack and images in the chain (default 32)")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the table shows medians (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, server logs)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/cow-*.json")
    args = p.parse_args(argv)
    size, depth = args.size * MiB, args.depth
    reads = Workload("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16)
    writes = Workload("randwrite-4k-qd16-fresh", "4 KiB random write into fresh grains, QD16", "randwrite", "4k", 16)
    need_tools("fio", "qemu-nbd", "qemu-img")
    terminate_on_signals()
    env = environment()
    kinds = [("linear", reads), (f"cow-{depth}", reads), (f"qcow2-{depth}", reads),
             (f"cow-{depth}+w", writes), (f"qcow2-{depth}+w", writes)]
    results = {k: [] for k, _ in kinds}
    started = time.time()
    with workdir(keep=args.keep) as wd:
        flat = str(wd / "flat.img")
        log(f"writing {args.size} MiB of random data to {flat} ...")
        make_data_file(flat, size)
        log(f"building a cow stack of {depth} layers ...")
        base, layers = build_stack(wd, flat, size, depth)
        log(f"building a qcow2 chain of {depth} images with qemu-img and qemu-nbd ...")
        chain_top = build_chain(wd, flat, base, size, depth)
        fresh = str(wd / "fresh.layer")  # the writable layer each write round starts from
        offline.create(fresh, size, GRAIN)
        stack = f"0 {size // 512} cow {base} 0 {' '.join(layers)}"
        for rnd in range(args.repeat):
            w = str(wd / f"w{rnd}.layer")
            subprocess.run(["cp", "--sparse=always", fresh, w], check=True)  # one UUID: layer depth's child
            qw = qcow2(str(wd / f"qw{rnd}.qcow2"), chain_top, "qcow2")
            servers = {
                "linear": lambda: Appliance(wd, [(DEVICE, [f"0 {size // 512} linear {flat} 0"])], name=f"linear-{rnd}"),
                f"cow-{depth}": lambda: Appliance(wd, [(DEVICE, [stack], {"read_only": True})], name=f"cow-{rnd}"),
                f"qcow2-{depth}": lambda: QemuNbd(wd, chain_top, name=f"qcow2-{rnd}", fmt="qcow2"),
                f"cow-{depth}+w": lambda: Appliance(wd, [(DEVICE, [f"{stack} {w}"])], name=f"cow-w-{rnd}"),
                f"qcow2-{depth}+w": lambda: QemuNbd(wd, qw, name=f"qcow2-w-{rnd}", fmt="qcow2"),
            }
            for kind, wl in kinds:
                log(f"[round {rnd + 1}/{args.repeat}] {kind}: {wl.title}")
                # writes: fio's random map over the device, once, so every write finds a fresh grain
                extra = ["--norandommap=0", "--time_based=0", f"--io_size={size}"] if wl is writes else []
                with servers[kind]() as srv:
                    r = measure(srv, wl, args.runtime, args.ramp, extra)
                results[kind].append(r)
                log(f"  {fmt_num(r.iops):>7} IOPS  p99 {r.lat_p99_us:.0f} us  server CPU {r.server_cpu:.0f}%  "
                    f"{r.server_us_per_io:.1f} us/IO")
    elapsed = time.time() - started
    med = {k: median_result(results[k], wl) for k, wl in kinds}
    cow, qc = f"cow-{depth}", f"qcow2-{depth}"
    bars = {
        "linear": ("", ""),
        cow: (f"{fmt_ratio(ratio(med[cow].iops, med['linear'].iops))} linear (bar 0.90x), "
              f"{fmt_ratio(ratio(med[cow].iops, med[qc].iops))} qemu-nbd (bar 2.00x)",
              f"{fmt_ratio(ratio(med[qc].server_us_per_io, med[cow].server_us_per_io))} qemu-nbd"),
        qc: ("", ""),
        cow + "+w": (f"{fmt_ratio(ratio(med[cow + '+w'].iops, med[qc + '+w'].iops))} qemu-nbd (bar 1.00x)",
                     f"{fmt_ratio(ratio(med[qc + '+w'].server_us_per_io, med[cow + '+w'].server_us_per_io))} qemu-nbd"),
        qc + "+w": ("", ""),
    }
    rows = [[k, wl.key, fmt_num(med[k].iops), f"{med[k].lat_p99_us:.0f}", f"{med[k].server_us_per_io:.1f}",
             bars[k][0], bars[k][1]] for k, wl in kinds]
    print(f"\n4 KiB, QD16, over {args.size} MiB in the page cache; {depth} layers / images; "
          f"{args.runtime:g}s per run; {env['cpus']} CPUs shared by fio and the server\n")
    print_table(["device", "workload", "IOPS", "p99 us", "srv us/IO", "IOPS ratio", "CPU/IO ratio (higher: cow cheaper)"],
                rows, align="llrrrll")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; took {elapsed:.0f}s")
    if not args.no_save:
        out = write_results("cow", {
            "benchmark": "cow", "settings": vars(args), "environment": env, "elapsed_s": elapsed,
            "summary": {k: med[k].iops for k, _ in kinds},
            "runs": {k: [r.to_dict() for r in v] for k, v in results.items()},
        })
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
