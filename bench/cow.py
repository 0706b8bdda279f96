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
import json
import mmap
import os
import subprocess
import sys
import tempfile
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
    measure,
    median_result,
    need_tools,
    print_table,
    ratio,
    run_fio,
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
                    r = measure(srv, wl, runtime=args.runtime, ramp_time=args.ramp, extra=extra)
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


# ---- merge and push: `python bench/cow.py merge` ----------------------------------------------

MERGE_DOC = """cow's merge and push: the merge's bandwidth with idle clients against the backing's own
sequential write bandwidth (fio, O_DIRECT, on the same filesystem, in the same run); what a
client keeps of its 4 KiB random-read IOPS while a merge runs; a push at a large device size.

    python bench/cow.py merge [--size MiB] [--runtime S] [--push-size 1T] [--dir DIR]

The merge folds one read-only layer holding --size MiB (every grain) into the base (`merge 1 1
base`), once with the device's default buffered I/O and once with direct = true (O_DIRECT); the
time runs from the message to status saying done, the base's FLUSH included, so what is
measured reached the disk. The merge reads every byte from the same disk it writes, so the
table also gives the disk's copy limit, 1 / (1/read + 1/write) from fio's sequential reads and
writes; and once more with the layers on tmpfs (another device) and the base on the disk, where
only the backing's writes limit the copy: into a base that is a hole, and into one that holds
data (a golden image; its blocks are overwritten, as fio's timed runs overwrite their file).
A write into a hole also allocates: fio's one pass of sequential writes into a new sparse file
is that ceiling, given beside it. The merge's CPU time (the daemon's, per GiB) is what load on
the machine disturbs least. The client's runs are short enough to end before the merge does (the table says how
far the merge was when the client's run ended). The push is timed as the control message's
round trip and as the time the device was suspended (the push's own reply), on a stack of two
layers of --push-size. Bars (issue 10): merge >= 70% of fio's sequential write, client >= 50%
of its IOPS, push < 50 ms."""


def fill_direct(path: str, offset: int, size: int, fill: bytes) -> None:
    """`size` bytes of `fill` at `offset` of `path`, O_DIRECT: written at the disk's speed, not cached."""
    chunk = mmap.mmap(-1, 4 * MiB)  # page aligned, for O_DIRECT
    chunk[:] = bytes(fill) * (4 * MiB // len(fill))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        for off in range(0, size, len(chunk)):
            os.pwritev(fd, [memoryview(chunk)[:min(len(chunk), size - off)]], offset + off)
        os.fsync(fd)
    finally:
        os.close(fd)


def merge_stack(wd: Path, name: str, size: int, fill: bytes, layer_dir: Path | None = None,
                base_fill: bytes | None = None) -> tuple[str, list[str]]:
    """A base (a hole, or holding `base_fill` in every byte), a read-only layer holding `fill`
    in every grain, a writable one on it; the layers in `layer_dir` if given (another device
    than the base's)."""
    from appliance.targets.cow.layer import open_layer as _open

    base = str(wd / f"{name}-base.img")
    with open(base, "wb") as f:
        f.truncate(size)
    if base_fill is not None:
        fill_direct(base, 0, size, base_fill)
    ld = layer_dir or wd
    lower, upper = str(ld / f"{name}-l1.layer"), str(ld / f"{name}-l2.layer")
    offline.create(lower, size, GRAIN)
    offline.create(upper, size, GRAIN)
    low, up = _open([lower], writable=True), _open([upper], writable=True)
    fill_direct(lower, low.data_offset, size, fill)
    low.mark_allocated(0, size // GRAIN)
    low.set_parent(base_uuid(size, base))
    up.set_parent(low.uuid)
    low.seal(up.uuid)
    os.fsync(low.data_fd)
    low.close()
    up.close()
    return base, [lower, upper]


def cow_status(srv) -> dict:
    from appliance.control import call

    st = call(srv.control, "status", name=DEVICE)
    return st["devices"][0]["segments"][0]["status"]


def timed_merge(srv, words, timeout: float = 600) -> tuple[float, float]:
    """Seconds from the merge message to status saying it is done, and the daemon's CPU
    seconds meanwhile."""
    from appliance.control import call

    t0, cpu0 = time.monotonic(), srv.cpu_seconds()
    call(srv.control, "message", name=DEVICE, sector=0, words=words)
    while True:
        st = cow_status(srv)
        if st.get("merge") != "running":
            if st.get("merge") != "done":
                raise BenchError(f"merge ended {st.get('merge')}: {st.get('merge_error')}")
            return time.monotonic() - t0, srv.cpu_seconds() - cpu0
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"merge not done within {timeout}s: {st}")
        time.sleep(0.01)


def bench_merge(wd: Path, size: int, runtime: float, poll_max_us: int = 0) -> dict:
    from appliance.control import call

    out = {}
    target = wd / "fio-seqwrite.img"
    log("fio: sequential 1 MiB writes, QD4, O_DIRECT ...")
    fio = run_fio(None, filename=str(target), rw="write", bs="1M", iodepth=4, runtime=runtime,
                  extra=[f"--size={size}"])
    log("fio: sequential 1 MiB reads, QD4, O_DIRECT, of what it wrote ...")
    rd = run_fio(None, filename=str(target), rw="read", bs="1M", iodepth=4, runtime=runtime,
                 extra=[f"--size={size}"])
    target.unlink()
    with open(target, "wb") as f:
        f.truncate(size)
    log("fio: one pass of sequential 1 MiB writes, QD4, O_DIRECT, into a sparse file ...")
    hole = run_fio(None, filename=str(target), rw="write", bs="1M", iodepth=4, runtime=runtime,
                   extra=[f"--size={size}", "--time_based=0", "--fallocate=none"], timeout=600)
    target.unlink()
    out["backing_holewrite_bps"] = hole.bw_bytes
    out["backing_seqwrite_bps"] = fio.bw_bytes
    out["backing_seqread_bps"] = rd.bw_bytes
    # a copy within one disk reads every byte and writes it: at best 1 / (1/read + 1/write)
    out["backing_copy_bps"] = 1 / (1 / rd.bw_bytes + 1 / fio.bw_bytes)
    for mode, keys in (("buffered", {}), ("direct", {"direct": True})):
        base, layers = merge_stack(wd, f"idle-{mode}", size, b"\x5a")
        table = [f"0 {size // 512} cow {base} 0 {' '.join(layers)}"]
        with Appliance(wd, [(DEVICE, table, keys)], name=f"merge-idle-{mode}") as srv:
            log(f"merge of {size // MiB} MiB into the base, clients idle, {mode} ...")
            took, _ = timed_merge(srv, ["merge", "1", "1", "base"])
        out[f"merge_idle_{mode}_bps"] = size / took
    # the layers on another device (tmpfs), the base on the disk: what the copy makes of the
    # backing's write bandwidth when reading the layers does not share the disk with it
    for key, base_fill, what in (("shm", None, "a hole"), ("shm_data", b"\x0f", "holding data")):
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            base, layers = merge_stack(wd, f"idle-{key}", size, b"\x3c", layer_dir=Path(shm), base_fill=base_fill)
            table = [f"0 {size // 512} cow {base} 0 {' '.join(layers)}"]
            with Appliance(wd, [(DEVICE, table)], name=f"merge-idle-{key}") as srv:
                log(f"merge of {size // MiB} MiB into the base ({what}), clients idle, layers on tmpfs ...")
                took, cpu = timed_merge(srv, ["merge", "1", "1", "base"])
            os.unlink(base)
        out[f"merge_idle_{key}_bps"] = size / took
        out[f"merge_idle_{key}_cpu_s_per_gib"] = cpu * (1 << 30) / size
    # the client's run must end before the merge does: a merge of 4 times the size takes 4 times
    # as long alone, at least twice that with a client (the throttle); the run is half of that
    busy = 4 * size
    busy_runtime = max(0.5, min(runtime, busy / out["merge_idle_buffered_bps"]))
    wl = Workload("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16)
    base, layers = merge_stack(wd, "busy", busy, b"\xa5")
    table = [f"0 {busy // 512} cow {base} 0 {' '.join(layers)}"]
    with Appliance(wd, [(DEVICE, table)], name="merge-busy", extra_config=f"poll_max_us = {poll_max_us}\n") as srv:
        log(f"client alone, {busy_runtime:.1f}s ...")
        alone = measure(srv, wl, runtime=busy_runtime, ramp_time=0)
        call(srv.control, "message", name=DEVICE, sector=0, words=["merge", "1", "1", "base"])
        log("client while the merge runs ...")
        during = measure(srv, wl, runtime=busy_runtime, ramp_time=0, settle_first=False)
        st = cow_status(srv)
    out["client_runtime_s"] = busy_runtime
    out["client_alone_iops"] = alone.iops
    out["client_during_merge_iops"] = during.iops
    out["merge_state_after_client"] = f"{st.get('merge')} {st.get('merge_progress')}"
    return out


def bench_push(wd: Path, size: int, rounds: int = 3) -> dict:
    from appliance.control import call

    base = str(wd / "push-base.img")
    with open(base, "wb") as f:
        f.truncate(size)
    first = str(wd / "push-l1.layer")
    offline.create(first, size, GRAIN)
    table = [f"0 {size // 512} cow {base} 0 {first}"]
    walls, suspended = [], []
    with Appliance(wd, [(DEVICE, table)], name="push") as srv:
        for i in range(2, 2 + rounds):
            path = str(wd / f"push-l{i}.layer")
            t0 = time.monotonic()
            reply = call(srv.control, "message", name=DEVICE, sector=0, words=["push", path])
            walls.append((time.monotonic() - t0) * 1000)
            text = reply if isinstance(reply, str) else json.dumps(reply)
            suspended.append(float(text.split("(")[1].split(" ms")[0]))
            log(f"  push {i - 1}: {walls[-1]:.1f} ms round trip, {suspended[-1]:.1f} ms suspended")
    return {"push_round_trip_ms": sorted(walls)[len(walls) // 2], "push_suspended_ms": sorted(suspended)[len(suspended) // 2]}


def merge_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/cow.py merge", description=MERGE_DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="MiB the merged layer holds (default 1024)")
    p.add_argument("--runtime", type=float, default=8, help="seconds per fio run (default 8)")
    p.add_argument("--push-size", default="1T", help="device size of the push stack (default 1T)")
    p.add_argument("--dir", default=None, help="where the files go (default /tmp); the filesystem measured")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, server logs)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/cow-merge-*.json")
    p.add_argument("--poll-max-us", type=int, default=0,
                   help="[export] poll_max_us of the daemon the client reads from (default 0: no polling)")
    args = p.parse_args(argv)
    from appliance.targets import parse_size

    need_tools("fio")
    terminate_on_signals()
    env = environment()
    started = time.time()
    with workdir(keep=args.keep, base=args.dir) as wd:
        r = bench_merge(wd, args.size * MiB, args.runtime, args.poll_max_us)
        log(f"push at {args.push_size} ...")
        r.update(bench_push(wd, parse_size(args.push_size, "--push-size")))
    elapsed = time.time() - started
    merge_ratio = ratio(r["merge_idle_buffered_bps"], r["backing_seqwrite_bps"])
    direct_ratio = ratio(r["merge_idle_direct_bps"], r["backing_seqwrite_bps"])
    client_ratio = ratio(r["client_during_merge_iops"], r["client_alone_iops"])
    rows = [
        ["merge, clients idle", f"{r['merge_idle_buffered_bps'] / MiB:.0f} MiB/s", fmt_ratio(merge_ratio),
         ">= 0.70x fio seq write"],
        ["  devices O_DIRECT", f"{r['merge_idle_direct_bps'] / MiB:.0f} MiB/s", fmt_ratio(direct_ratio), ""],
        ["  layers on tmpfs, base (a hole) on the disk", f"{r['merge_idle_shm_bps'] / MiB:.0f} MiB/s",
         fmt_ratio(ratio(r["merge_idle_shm_bps"], r["backing_seqwrite_bps"])), ">= 0.70x fio seq write"],
        ["    of fio's one pass into a hole", "",
         fmt_ratio(ratio(r["merge_idle_shm_bps"], r["backing_holewrite_bps"])), "(writes that allocate)"],
        ["    daemon CPU", f"{r['merge_idle_shm_cpu_s_per_gib']:.2f} s/GiB", "", ""],
        ["  layers on tmpfs, base holding data", f"{r['merge_idle_shm_data_bps'] / MiB:.0f} MiB/s",
         fmt_ratio(ratio(r["merge_idle_shm_data_bps"], r["backing_seqwrite_bps"])), ">= 0.70x fio seq write"],
        ["    daemon CPU", f"{r['merge_idle_shm_data_cpu_s_per_gib']:.2f} s/GiB", "", ""],
        ["fio seq write O_DIRECT", f"{r['backing_seqwrite_bps'] / MiB:.0f} MiB/s", "", ""],
        ["  one pass into a sparse file", f"{r['backing_holewrite_bps'] / MiB:.0f} MiB/s", "", ""],
        ["fio seq read O_DIRECT", f"{r['backing_seqread_bps'] / MiB:.0f} MiB/s", "", ""],
        ["  copy limit 1/(1/r+1/w)", f"{r['backing_copy_bps'] / MiB:.0f} MiB/s",
         fmt_ratio(ratio(r["merge_idle_buffered_bps"], r["backing_copy_bps"])), "merge as a share of it"],
        [f"client 4K randread QD16, {r['client_runtime_s']:.1f}s", f"{fmt_num(r['client_alone_iops'])} IOPS", "", ""],
        ["  while merging", f"{fmt_num(r['client_during_merge_iops'])} IOPS", fmt_ratio(client_ratio),
         f">= 0.50x (merge {r['merge_state_after_client']} at the end)"],
        [f"push at {args.push_size}, round trip", f"{r['push_round_trip_ms']:.1f} ms", "", "< 50 ms"],
        ["  of which suspended", f"{r['push_suspended_ms']:.1f} ms", "", ""],
    ]
    print(f"\ncow merge of {args.size} MiB and push; {args.runtime:g}s per fio run; {env['cpus']} CPUs\n")
    print_table(["measure", "value", "ratio", "bar"], rows, align="lrrl")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; took {elapsed:.0f}s")
    if not args.no_save:
        out = write_results("cow-merge", {"benchmark": "cow-merge", "settings": vars(args), "environment": env,
                                          "elapsed_s": elapsed, "summary": r})
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(merge_main(sys.argv[2:]) if sys.argv[1:2] == ["merge"] else main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
