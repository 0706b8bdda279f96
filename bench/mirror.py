#!/usr/bin/env python3
"""mirror against linear: what the second leg and the dirty-region log cost, and how fast a
resync copies.

    python bench/mirror.py [--runtime S] [--size MiB] [--resync-size MiB] [--resync-only]

One daemon serves two devices, measured one at a time with fio's nbd engine:
  lin  `linear` over one file,
  m    `mirror disk` over two other files (legs), with its log on a third, `nosync`.
The table gives mirror's figure as a ratio of linear's, and the server's CPU time per request
of each (a figure that survives other load on the machine); the results file also has how many
of the mirror's writes the NBD loop fanned out itself (`fast_writes`). The 4 KiB random write
runs twice, the second time with the files' page cache dropped first (see workloads()). Then `message m 0 resync` copies every region
again: its rate is the size over the daemon's copying time plus an fdatasync of the written leg
after it (what the page cache still held of the copy; the resync copies with O_DIRECT and
flushes each region before it is in sync, so little), against fio writing each leg's file
sequentially with O_DIRECT (1 MiB, QD4), the slower of the two; and, for what a copy can get
from the disk, fio reading one leg and writing the other at once (the row's label). Then the
resync as the issue's bar means it, legs on two devices (two_devices_row): the in-sync leg on
tmpfs, the stale one a file on the disk, against fio writing that file with O_DIRECT, 1 MiB, as
many bytes in flight as the copy. Also: log writes per 1000 client writes (marks
are batched, clears lazy). Last, read balancing: 4 KiB random reads from a mirror whose two
legs are rate-limited nbdkit servers (`--filter=rate`), against `linear` on one of them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MiB,
    Appliance,
    BenchError,
    Nbdkit,
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
    terminate_on_signals,
    workdir,
    write_results,
)

REGION_SECTORS = 8192  # 4 MiB regions, the default
COPY_DEPTH = 32  # fio's 1 MiB writes in flight: as many bytes as the resync's (mirror/copy.py: 8 of 4 MiB)


def workloads():
    """(workload, drop the files' page cache first). The random write runs twice: on the page
    cache the runs before left (large folios: ext4 walks every buffer head of the folio on each
    4 KiB buffered write, a cost per write that grows with the folio, paid once per leg), and
    on a dropped cache, where 4 KiB writes make 4 KiB folios (what the mirror itself costs)."""
    return [
        (Workload("write-1m-qd4", "1 MiB sequential write, QD4", "write", "1m", 4, metric="mib_s"), False),
        (Workload("randwrite-4k-qd16", "4 KiB random write, QD16", "randwrite", "4k", 16), False),
        (Workload("randwrite-4k-qd16-cold", "4 KiB random write, QD16, cache dropped first", "randwrite", "4k", 16),
         True),
        (Workload("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16), False),
    ]


def drop_cache(*paths):
    """Write back and drop the files' page cache (its large folios go with it)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def us(r):
    v = r.server_us_per_io
    return "-" if v is None else f"{v:.1f}"


def mirror_status(app):
    return app.status("m")["devices"][0]["segments"][0]["status"]


def balanced_reads(wd, a, b, size, args):
    """4 KiB random reads, QD16: mirror over two rate-limited nbdkit servers, and linear over
    the first of them. Reads spread over both legs should go up to twice as fast."""
    need_tools("nbdkit")
    wl = Workload("remote-randread-4k-qd16", "4 KiB random read QD16, legs on 2 nbdkit", "randread", "4k", 16)
    kits = [Nbdkit(wd, "file", [f"file={path}", f"rate={args.remote_rate}"], name=f"kit{i}", filters=["rate"])
            for i, path in enumerate((a, b))]
    for kit in kits:
        kit.start()
    try:
        sectors = size // 512
        uris = [f"nbd+unix:///?socket={kit.socket}" for kit in kits]
        devices = [("lin", [f"0 {sectors} linear {uris[0]} 0"]),
                   ("m", [f"0 {sectors} mirror core 2 {REGION_SECTORS} nosync 2 {uris[0]} 0 {uris[1]} 0 "
                          "1 handle_errors"])]
        with Appliance(wd, devices, name="remote") as app:
            r_lin = measure(app, wl, runtime=args.runtime, export="lin")
            r_m = measure(app, wl, runtime=args.runtime, export="m")
    finally:
        for kit in kits:
            kit.stop()
    return [wl.title, fmt_num(r_lin.iops), fmt_num(r_m.iops), fmt_ratio(ratio(r_m.iops, r_lin.iops)), "-",
            f"{us(r_lin)} / {us(r_m)}"]


def resync(app, stale):
    """`message m 0 resync` copies every region again from the primary, clients idle. Returns
    (copy + flush MiB/s, copying MiB/s, flush s, wall MiB/s): the daemon's own copying rate
    (its time spent copying), with an fdatasync of the stale leg after it (what a cache still
    holds of the copy; the resync flushes each region before it is in sync, so little)."""
    time.sleep(2)  # the lazy clears of the runs before
    os.sync()  # their dirty pages out of the way: the flush below is the resync's
    t0 = time.monotonic()
    app.cli("message", "m", "0", "resync")
    while True:
        st = mirror_status(app)
        if st["in_sync_regions"] == st["total_regions"]:
            break
        if time.monotonic() - t0 > 600:
            raise BenchError("the resync did not finish in 600 s")
        time.sleep(0.5)  # each look is a CLI process: few, so the resync keeps the CPU
    size = st["total_regions"] * REGION_SECTORS * 512
    wall_mib_s = size / MiB / (time.monotonic() - t0)  # coarse: the polls are 0.5 s apart
    copy_mib_s = st["resync"]["bytes_per_second"] / MiB
    t1 = time.monotonic()
    fd = os.open(stale, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    flush_s = time.monotonic() - t1
    return size / MiB / (size / MiB / copy_mib_s + flush_s), copy_mib_s, flush_s, wall_mib_s


def same_disk_row(copy, a, b, args):
    """The resync with both legs on files of one disk, against fio writing each leg's file
    sequentially with O_DIRECT (1 MiB, QD4), the slower of the two; and, for what a copy can get
    from this disk, fio reading one leg while it writes the other (the row's label): a copy
    cannot beat that. The row's last item is its results entry."""
    resync_mib_s, copy_mib_s, flush_s, wall_mib_s = copy
    fio_seq = min((run_fio(None, rw="write", bs="1m", iodepth=4, runtime=args.runtime, filename=str(leg))
                   for leg in (a, b)), key=lambda r: r.mib_s)
    with ThreadPoolExecutor(2) as pool:
        both = [pool.submit(run_fio, None, rw=rw, bs="1m", iodepth=4, runtime=args.runtime, filename=str(leg))
                for rw, leg in (("read", a), ("write", b))]
        fio_read, fio_write = (f.result() for f in both)
    return [f"resync, legs on one disk, copy + flush ({copy_mib_s:.0f} MiB/s copying, {wall_mib_s:.0f} wall; "
            f"fio read + write at once {fio_read.mib_s:.0f} + {fio_write.mib_s:.0f})",
            f"fio {fio_seq.mib_s:.0f} MiB/s", f"{resync_mib_s:.0f} MiB/s",
            fmt_ratio(resync_mib_s / fio_seq.mib_s), "-", "-",
            {"mib_s": resync_mib_s, "copy_mib_s": copy_mib_s, "flush_s": flush_s,
             "wall_mib_s": wall_mib_s, "fio_direct_write_mib_s": fio_seq.mib_s,
             "fio_read_while_writing_mib_s": fio_read.mib_s,
             "fio_write_while_reading_mib_s": fio_write.mib_s}]


def two_devices_row(wd, args):
    """The resync as the issue's bar means it, legs on two devices: the in-sync leg on tmpfs
    (/dev/shm), the stale one a file on the disk (written whole first, so neither the copy nor
    fio allocates), the `disk` log beside it. Against fio writing the stale leg's file with
    O_DIRECT, 1 MiB, at the copy's depth: the slower leg's sequential write bandwidth. The
    row's last item is its results entry."""
    size = args.resync_size * MiB
    if not os.path.isdir("/dev/shm"):
        raise BenchError("no /dev/shm (tmpfs) for the two-device resync's in-sync leg; --no-two-devices skips it")
    shm = Path(tempfile.mkdtemp(prefix="appliance-bench-", dir="/dev/shm"))
    try:
        src = make_data_file(shm / "src.img", size)
        stale = str(wd / "stale.img")
        with open(stale, "wb") as f:
            zeros = bytes(4 * MiB)
            for _ in range(size // len(zeros)):
                f.write(zeros)
            os.fsync(f.fileno())
        drop_cache(stale)
        logdev = wd / "log2.img"
        logdev.write_bytes(bytes(MiB))
        sectors = size // 512
        devices = [("m", [f"0 {sectors} mirror disk 3 {logdev} {REGION_SECTORS} nosync 2 {src} 0 {stale} 0 "
                          "1 handle_errors"])]
        with Appliance(wd, devices, name="resync2") as app:
            resync_mib_s, copy_mib_s, flush_s, wall_mib_s = resync(app, stale)
        fio = run_fio(None, rw="write", bs="1m", iodepth=COPY_DEPTH, runtime=args.runtime, filename=stale)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return [f"resync, legs on tmpfs and disk, copy + flush ({copy_mib_s:.0f} MiB/s copying, {wall_mib_s:.0f} wall)",
            f"fio {fio.mib_s:.0f} MiB/s", f"{resync_mib_s:.0f} MiB/s", fmt_ratio(resync_mib_s / fio.mib_s), "-", "-",
            {"mib_s": resync_mib_s, "copy_mib_s": copy_mib_s, "flush_s": flush_s, "wall_mib_s": wall_mib_s,
             "fio_direct_write_mib_s": fio.mib_s, "fio_iodepth": COPY_DEPTH}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=float, default=8, help="seconds per fio run (default 8)")
    p.add_argument("--size", type=int, default=512, help="device size in MiB (default 512)")
    p.add_argument("--remote-rate", default="40M",
                   help="each remote leg's nbdkit rate= (bits/s) for the read-balancing run (default 40M)")
    p.add_argument("--resync-size", type=int, default=2048,
                   help="size in MiB of the two-device resync's mirror (default 2048; its source is in /dev/shm)")
    p.add_argument("--no-two-devices", action="store_true", help="skip the two-device resync")
    p.add_argument("--resync-only", action="store_true", help="only the resync rows")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/mirror-*.json")
    args = p.parse_args(argv)
    need_tools("fio")
    terminate_on_signals()
    size = args.size * MiB
    rows, results = [], {"environment": environment(), "size": size}
    with workdir(args.keep) as wd:
        lin, a, b = (make_data_file(wd / n, size) for n in ("lin.img", "a.img", "b.img"))
        logdev = wd / "log.img"
        logdev.write_bytes(bytes(MiB))
        sectors = size // 512
        devices = [
            ("lin", [f"0 {sectors} linear {lin} 0"]),
            ("m", [f"0 {sectors} mirror disk 3 {logdev} {REGION_SECTORS} nosync 2 {a} 0 {b} 0 1 handle_errors"]),
        ]
        with Appliance(wd, devices) as app:
            for wl, cold in ([] if args.resync_only else workloads()):
                if cold:
                    drop_cache(lin)
                r_lin = measure(app, wl, runtime=args.runtime, export="lin")
                if cold:
                    drop_cache(a, b)
                st0 = mirror_status(app)
                r_m = measure(app, wl, runtime=args.runtime, export="m")
                st1 = mirror_status(app)
                log_writes = st1["log"]["log_writes"] - st0["log"]["log_writes"]
                fast = (st1["fast_writes"] or 0) - (st0["fast_writes"] or 0)
                row = [wl.title, fmt_num(wl.value(r_lin), wl.metric), fmt_num(wl.value(r_m), wl.metric),
                       fmt_ratio(ratio(wl.value(r_m), wl.value(r_lin)))]
                per_1000 = 1000 * log_writes / r_m.total_ios if wl.rw != "randread" else None
                row.append("-" if per_1000 is None else f"{per_1000:.1f}")
                row.append(f"{us(r_lin)} / {us(r_m)}")
                rows.append(row)
                results[wl.key] = {"linear": r_lin.to_dict(), "mirror": r_m.to_dict(),
                                   "log_writes_per_1000": per_1000, "fast_writes": fast}
            copy = resync(app, b)
        rows.append(same_disk_row(copy, a, b, args))
        results["resync"] = rows[-1].pop()
        if not args.no_two_devices:
            rows.append(two_devices_row(wd, args))
            results["resync_two_devices"] = rows[-1].pop()
        if not args.resync_only:
            rows.append(balanced_reads(wd, a, b, size, args))
            results["remote_randread"] = rows[-1]
    print_table(["workload", "linear", "mirror", "mirror/linear", "log writes/1000", "server us/req lin / m"], rows)
    if not args.no_save:
        print(f"results: {write_results('mirror', results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
