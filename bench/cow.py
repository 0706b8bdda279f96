#!/usr/bin/env python3
"""cow's read cost does not grow with depth: 4 KiB random reads on stacks of 1 and 8 (and
--depths) layers against `linear` over a flat file holding the same bytes.

    python bench/cow.py [--runtime S] [--size MiB] [--depths 1,8] [--repeat N]

The data (random, in the page cache) is one flat file for `linear`; for a stack of depth N the
same bytes are spread over N layer files, grain g in layer g mod N + 1 (every layer holds a
share; the base is a hole), written offline with the layer format's own calls and chained
(parents, seals) as pushes would leave them. Each server runs alone; fio's nbd engine does the
same workload against each. The table gives each stack's IOPS as a ratio of linear's and of
depth 1's. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    MiB,
    Appliance,
    BenchError,
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
    for p in paths:
        warm_file(p)
    return base, paths


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", type=float, default=8, help="seconds per fio run, measured (default 8)")
    p.add_argument("--ramp", type=float, default=1, help="seconds of fio ramp before measuring (default 1)")
    p.add_argument("--size", type=int, default=256, help="device size in MiB (default 256)")
    p.add_argument("--depths", default="1,8", help="stack depths to measure (default 1,8)")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the table shows medians (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, server logs)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/cow-*.json")
    args = p.parse_args(argv)
    depths = [int(x) for x in args.depths.split(",") if x.strip()]
    size = args.size * MiB
    wl = Workload("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16)
    need_tools("fio")
    terminate_on_signals()
    env = environment()
    kinds = ["linear"] + [f"cow-{d}" for d in depths]
    results = {k: [] for k in kinds}
    started = time.time()
    with workdir(keep=args.keep) as wd:
        flat = str(wd / "flat.img")
        log(f"writing {args.size} MiB of random data to {flat} ...")
        make_data_file(flat, size)
        tables = {"linear": f"0 {size // 512} linear {flat} 0"}
        for d in depths:
            log(f"building a stack of {d} layers ...")
            base, layers = build_stack(wd, flat, size, d)
            tables[f"cow-{d}"] = f"0 {size // 512} cow {base} 0 {' '.join(layers)}"
        for rnd in range(args.repeat):
            for kind in kinds:
                srv = Appliance(wd, [(DEVICE, [tables[kind]])], name=f"{kind}-{rnd}")
                log(f"[round {rnd + 1}/{args.repeat}] {kind}: {tables[kind][:100]}")
                with srv:
                    r = measure(srv, wl, runtime=args.runtime, ramp_time=args.ramp)
                results[kind].append(r)
                log(f"  {fmt_num(r.iops):>7} IOPS  p99 {r.lat_p99_us:.0f} us  server CPU {r.server_cpu:.0f}%")
    elapsed = time.time() - started
    med = {k: median_result(v, wl) for k, v in results.items()}
    rows = []
    for kind in kinds:
        rows.append([kind, fmt_num(med[kind].iops), f"{med[kind].lat_p99_us:.0f}",
                     fmt_ratio(ratio(med[kind].iops, med["linear"].iops)),
                     fmt_ratio(ratio(med[kind].iops, med[f"cow-{depths[0]}"].iops)) if kind != "linear" else ""])
    print(f"\n{wl.title} over {args.size} MiB in the page cache; {args.runtime:g}s per run; "
          f"{env['cpus']} CPUs shared by fio and the server\n")
    print_table(["device", "IOPS", "p99 us", "x linear", f"x depth {depths[0]}"], rows, align="lrrrr")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; took {elapsed:.0f}s")
    if not args.no_save:
        out = write_results("cow", {
            "benchmark": "cow", "settings": vars(args), "environment": env, "elapsed_s": elapsed,
            "summary": {k: med[k].iops for k in kinds},
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
