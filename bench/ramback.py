#!/usr/bin/env python3
"""ramback's figures, each a ratio taken in one run (issue 3).

    python bench/ramback.py [--only randread,untar,drain] [--size MiB] [--runtime S]

randread  4 KiB random reads at QD16 on a populated ramback, against `nbdkit memory`
          holding the same data (bar: at least 0.5x).
untar     the seed's test: untar a Linux source tree onto ext4 and `sync`, the ext4 on
          nbdfuse + losetup over (a) ramback in writeback mode and (b) linear, on the
          same backing file; once with the file as it is, once behind a `delay` target
          with 5 ms per write, serialized (a disk that does one thing at a time). Bar: on
          the delayed backing ramback is at least 10x faster.
drain     N GiB of dirty data written back, against the backing file's own sequential
          write bandwidth measured with fio (buffered, fsync at the end) on the same
          file (bar: at least 80%).
direct    ramback over a file on the root disk with `direct = true`: N GiB populated, and
          N GiB drained, against fio `--direct=1 --ioengine=io_uring --bs=1M --iodepth=8`
          sequential read and write of the same file (bars: at least 0.8x each).

Needs root (losetup, mount), fio with the nbd engine, nbdkit, nbdcopy, nbdfuse, the
Debian package linux-source (its tarball is decompressed once into --cache-dir, so xz is
not timed). RAM stores go to the daemon's default place under /dev/shm and are removed
afterwards.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    GiB,
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
    settle,
    warm_file,
    terminate_on_signals,
    workdir,
    write_results,
)

from appliance.control import call  # noqa: E402
from appliance.targets.ramback.store import default_dir  # noqa: E402

PARTS = ("randread", "untar", "drain", "direct")


# ---- helpers -----------------------------------------------------------------------------


def rb_status(app, name):
    st = call(app.control, "status", name=name, timeout=60)
    return st["devices"][0]["segments"][0]["status"]


def rb_message(app, name, *words, timeout=None):
    return call(app.control, "message", name=name, sector=0, words=list(words), timeout=timeout)["result"]


def wait_populated(app, name, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rb_status(app, name)["populated"]:
            return
        time.sleep(0.1)
    raise BenchError(f"{name} did not populate in {timeout}s")


def drop_store(app):
    shutil.rmtree(default_dir(app.control), ignore_errors=True)


def kill_hard(app):
    """End a daemon at once (its RAM store is thrown away: benchmark data only)."""
    if app.proc and app.proc.poll() is None:
        app.proc.kill()
        app.proc.wait()
    drop_store(app)


def sh(*cmd, timeout=3600, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


# ---- randread ----------------------------------------------------------------------------


def bench_randread(args, wd):
    need_tools("fio", "nbdkit", "nbdcopy")
    size = args.size * MiB
    data = make_data_file(Path(args.data_dir or wd) / "randread.img", size)
    wl = Workload("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16)
    rows, out = [], {}
    app = Appliance(wd, [("rb", [f"0 {size // 512} ramback - {data}"])], name="rb-read")
    try:
        app.start()
        wait_populated(app, "rb")
        out["ramback"] = measure(app, wl, runtime=args.runtime, ramp_time=1).to_dict()
        out["ramback_fast_ios"] = app.fast_ios("rb")
    finally:
        app.stop()
        drop_store(app)
    with Nbdkit(wd, "memory", [f"size={size}"], name="nbdkit-memory") as kit:
        sh("nbdcopy", data, kit.uri())  # the same bytes, so no read is of a hole
        out["nbdkit_memory"] = measure(kit, wl, runtime=args.runtime, ramp_time=1).to_dict()
    r = ratio(out["ramback"]["iops"], out["nbdkit_memory"]["iops"])
    out["ratio"] = r
    rows.append(["ramback (populated)", fmt_num(out["ramback"]["iops"]), fmt_ratio(r)])
    rows.append(["nbdkit memory", fmt_num(out["nbdkit_memory"]["iops"]), "1.00x"])
    print(f"\n4 KiB random read, QD16, {args.size} MiB, {args.runtime:g} s per run")
    print_table(["server", "IOPS", "vs nbdkit memory"], rows)
    print(f"bar: >= 0.5x nbdkit memory: {'PASS' if r and r >= 0.5 else 'FAIL'}")
    return out


# ---- untar ---------------------------------------------------------------------------


def linux_tar(cache_dir):
    """The Linux source tarball, decompressed once (xz stays out of the timing)."""
    tars = sorted(glob.glob("/usr/src/linux-source-*.tar.xz"))
    if not tars:
        raise BenchError("no /usr/src/linux-source-*.tar.xz: apt-get install linux-source")
    os.makedirs(cache_dir, exist_ok=True)
    plain = Path(cache_dir) / (Path(tars[-1]).name[: -len(".xz")])
    if not plain.exists():
        print(f"decompressing {tars[-1]} into {plain} (once)", flush=True)
        tmp = str(plain) + ".tmp"
        with open(tmp, "wb") as f:
            subprocess.run(["xz", "-dc", tars[-1]], stdout=f, check=True)
        os.replace(tmp, plain)
    return str(plain)


def untar_once(wd, label, tar, members, backing, delay_ms, target):
    """One timed `tar -x` + `sync` onto ext4 on nbdfuse + losetup over `target` (ramback|linear)."""
    sectors = os.path.getsize(backing) // 512
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", backing)
    os.sync()
    devices = []
    under = backing
    if delay_ms:
        devices.append(("slow", [f"0 {sectors} delay {backing} 0 0 {backing} 0 {delay_ms} serialize"], {"export": False}))
        under = "@slow"
    if target == "ramback":
        # writeback, and a dirty limit above the tree: the promise measured, not the throttle
        devices.append(("dut", [f"0 {sectors} ramback - {under} max_dirty={sectors * 512}"]))
    else:
        devices.append(("dut", [f"0 {sectors} linear {under} 0"]))
    devices.reverse()  # the exported device first (the default export)
    app = Appliance(wd, devices, name=f"untar-{label}")
    fuse_dir = wd / f"fuse-{label}"
    mnt = wd / f"mnt-{label}"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = loop = None
    mounted = False
    result = {}
    try:
        app.start()
        if target == "ramback":
            wait_populated(app, "dut")
            rb_message(app, "dut", "writeback")
        fuse = subprocess.Popen(["nbdfuse", str(fuse_dir), app.uri("dut")], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not (fuse_dir / "nbd").exists():
            if fuse.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"nbdfuse did not start: {fuse.stderr.read() if fuse.poll() is not None else 'timeout'}")
            time.sleep(0.05)
        loop = sh("losetup", "-f", "--show", str(fuse_dir / "nbd")).strip()
        sh("mount", loop, str(mnt))
        mounted = True
        warm_file(tar)  # every run reads the tarball from the page cache, not the first from disk
        settle(0.5)
        t0 = time.monotonic()
        sh("tar", "-xf", tar, "-C", str(mnt), *members)
        t1 = time.monotonic()
        sh("sync", "-f", str(mnt))
        t2 = time.monotonic()
        result = {"seconds": t2 - t0, "tar_seconds": t1 - t0, "sync_seconds": t2 - t1}
        if target == "ramback":
            s = rb_status(app, "dut")
            result["dirty_bytes_after_sync"] = s["dirty_bytes"]
            result["drain_eta_seconds"] = s["drain_eta_seconds"]
        print(f"  {label:<28} {result['seconds']:8.1f} s (tar {result['tar_seconds']:.1f} s, sync {result['sync_seconds']:.1f} s)",
              flush=True)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        if fuse is not None:
            subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
            try:
                fuse.wait(10)
            except subprocess.TimeoutExpired:
                fuse.kill()
        if target == "ramback":
            kill_hard(app)  # the drain to a slow disk is not what this measures
        else:
            app.stop(timeout=600)
    return result


def bench_untar(args, wd):
    need_tools("nbdfuse", "losetup", "mkfs.ext4", "mount")
    if os.geteuid() != 0:
        raise BenchError("the untar benchmark needs root (losetup, mount)")
    tar = linux_tar(args.cache_dir)
    members = args.subset.split(",") if args.subset else []
    backing = sparse(Path(args.data_dir or wd) / "untar-backing.img", args.untar_gib * GiB)
    out = {"tarball": tar, "members": members or "all", "backing_bytes": args.untar_gib * GiB}
    print(f"\nuntar {Path(tar).name}{' (' + args.subset + ')' if members else ''} + sync onto ext4 "
          f"on nbdfuse + losetup, {args.untar_gib} GiB backing file", flush=True)
    rows = []
    for delay in (0, args.delay_ms):
        what = f"delay {delay} ms/write serialized" if delay else "plain file"
        runs = {}
        for target in ("ramback", "linear"):
            runs[target] = untar_once(wd, f"{target}-{'delay' if delay else 'plain'}", tar, members, backing, delay, target)
        r = ratio(runs["linear"]["seconds"], runs["ramback"]["seconds"])
        out["delay" if delay else "plain"] = {**runs, "speedup": r}
        rows.append([what, f"{runs['ramback']['seconds']:.1f} s", f"{runs['linear']['seconds']:.1f} s", fmt_ratio(r)])
    os.unlink(backing)
    print_table(["backing", "ramback", "linear", "ramback faster by"], rows)
    sp = out["delay"]["speedup"]
    print(f"bar: >= 10x on the delayed backing: {'PASS' if sp and sp >= 10 else 'FAIL'}")
    return out


# ---- drain ---------------------------------------------------------------------------


def make_all_dirty(store_path, block):
    """Turn a cleanly stopped store into one whose every chunk is dirty, as a crash with the whole
    device unflushed would leave it: new data in RAM, every state byte DIRTY, the header unclean."""
    from appliance.targets.ramback import store as st

    with open(store_path, "r+b") as f:
        h = st._decode(f.read(st.HEADER))
        f.seek(h["data_offset"])
        left = h["length"]
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
        f.seek(h["state_offset"])
        f.write(b"\x02" * h["nchunks"])
        h["clean"] = 0
        f.seek(0)
        f.write(st._STRUCT.pack(*[st._encode(h[name]) for name, _ in st._FIELDS]))
    return h


def bench_drain(args, wd):
    """N GiB dirty at once: a clean store is made all-dirty on purpose while the daemon is down (what a
    crash with everything unflushed leaves), then the daemon starts and drains it. The drain is timed
    from the first status answer (the flusher starts with the table, so a little is written before)
    to the moment `message flush` (write back, then fdatasync) returns."""
    need_tools("fio")
    n = args.drain_gib * GiB
    base = Path(args.data_dir or "/var/tmp")
    backing = base / f"appliance-bench-drain-{os.getpid()}.img"
    out = {"bytes": n}
    app = Appliance(wd, [("rb", [f"0 {n // 512} ramback - {backing}"])], name="drain")
    try:
        sparse(backing, n)
        settle()
        def fio_seq():
            settle()
            fio = sh("fio", "--name=seq", f"--filename={backing}", "--rw=write", "--bs=8m", f"--size={n}",
                     "--ioengine=psync", "--end_fsync=1", "--output-format=json")
            return json.loads(fio[fio.index("{"):])["jobs"][0]["write"]["bw_bytes"]

        fio_runs = [fio_seq()]
        app.start()
        wait_populated(app, "rb")
        store = rb_status(app, "rb")["store"]
        app.stop(timeout=600)
        block = os.urandom(8 * MiB)
        make_all_dirty(store, block)
        settle()
        app.start()
        t0 = time.monotonic()
        s0 = rb_status(app, "rb")
        dirty0 = s0["dirty_bytes"]
        assert rb_message(app, "rb", "flush") == "clean"
        t1 = time.monotonic()
        s1 = rb_status(app, "rb")
        drain_bw = dirty0 / (t1 - t0)
        app.stop(timeout=600)
        with open(backing, "rb") as f:  # what was drained is what was in RAM
            for off in (0, n // 2 + 12345, n - 4096):
                f.seek(off)
                got = f.read(4096)
                want = (block * 2)[off % len(block) : off % len(block) + 4096]
                if got != want:
                    raise BenchError(f"the drained backing differs from RAM at byte {off}")
        fio_runs.append(fio_seq())  # before and after: the better one is the bar
        fio_bw = max(fio_runs)
        out["fio_seq_write_bw"] = fio_runs
        out.update(store_attach=s0["store_attach"], dirty_at_start=dirty0, seconds=t1 - t0, drain_bw=drain_bw,
                   flush_bandwidth_measured=s1["flush_bandwidth"], ratio=drain_bw / fio_bw)
    finally:
        app.stop(timeout=600)
        drop_store(app)
        try:
            os.unlink(backing)
        except FileNotFoundError:
            pass
    print(f"\ndrain of {args.drain_gib} GiB of dirty data (every chunk dirty at start; fdatasync included)")
    print_table(["", "MiB/s"], [
        ["fio sequential write, same file (8 MiB, buffered, end_fsync; best of 2)", f"{fio_bw / MiB:.0f}"],
        [f"ramback drain of {dirty0 / MiB:.0f} MiB ({out['store_attach']})", f"{drain_bw / MiB:.0f}"],
    ])
    print(f"ratio {out['ratio']:.2f}; bar: >= 0.80: {'PASS' if out['ratio'] >= 0.8 else 'FAIL'}")
    return out


def fio_direct(path, rw, size):
    """fio's sequential bandwidth on `path`, O_DIRECT through io_uring, 1 MiB at QD8 (bytes/s)."""
    out = sh("fio", "--name=seq", f"--filename={path}", f"--rw={rw}", "--bs=1M", "--iodepth=8", "--direct=1",
             "--ioengine=io_uring", f"--size={size}", "--output-format=json")
    return json.loads(out[out.index("{"):])["jobs"][0][rw]["bw_bytes"]


def bench_direct(args, wd):
    """Populate and drain with `direct = true` on the root disk, each against fio on the same
    file in the same run: the backing I/O of both goes through the engine, several in flight."""
    need_tools("fio")
    n = args.direct_gib * GiB
    base = Path(args.data_dir or "/var/tmp")
    fstype = sh("stat", "-f", "-c", "%T", str(base)).strip()
    if fstype in ("tmpfs", "ramfs"):
        raise BenchError(f"{base} is {fstype}: the direct benchmark needs a real disk (--data-dir)")
    backing = base / f"appliance-bench-direct-{os.getpid()}.img"
    app = Appliance(wd, [("rb", [f"0 {n // 512} ramback - {backing}"], {"direct": True})], name="direct")
    out = {"bytes": n, "fstype": fstype}
    try:
        settle()
        fio_write = fio_direct(backing, "write", n)  # lays the file out too
        settle()
        fio_read = fio_direct(backing, "read", n)
        settle()
        app.start()
        wait_populated(app, "rb")
        s = rb_status(app, "rb")
        populate_bw = n / s["populate_seconds"]
        store = s["store"]
        app.stop(timeout=600)
        block = os.urandom(8 * MiB)
        make_all_dirty(store, block)
        settle()
        app.start()
        t0 = time.monotonic()
        dirty0 = rb_status(app, "rb")["dirty_bytes"]
        assert rb_message(app, "rb", "flush") == "clean"
        drain_bw = dirty0 / (time.monotonic() - t0)
        app.stop(timeout=600)
        with open(backing, "rb") as f:  # what was drained is what was in RAM
            for off in (0, n // 2 + 4096 * 3, n - 4096):
                f.seek(off)
                if f.read(4096) != (block * 2)[off % len(block) : off % len(block) + 4096]:
                    raise BenchError(f"the drained backing differs from RAM at byte {off}")
        out.update(fio_read_bw=fio_read, fio_write_bw=fio_write, populate_bw=populate_bw,
                   populate_seconds=s["populate_seconds"], drain_bw=drain_bw, dirty_at_start=dirty0,
                   populate_ratio=populate_bw / fio_read, drain_ratio=drain_bw / fio_write)
    finally:
        app.stop(timeout=600)
        drop_store(app)
        try:
            os.unlink(backing)
        except FileNotFoundError:
            pass
    print(f"\nramback with direct = true on {base} ({fstype}), {args.direct_gib} GiB")
    print_table(["", "ramback MiB/s", "fio MiB/s", "ratio", "bar >= 0.80"], [
        ["populate / sequential read", f"{populate_bw / MiB:.0f}", f"{fio_read / MiB:.0f}",
         f"{out['populate_ratio']:.2f}", "PASS" if out["populate_ratio"] >= 0.8 else "FAIL"],
        ["drain / sequential write", f"{drain_bw / MiB:.0f}", f"{fio_write / MiB:.0f}",
         f"{out['drain_ratio']:.2f}", "PASS" if out["drain_ratio"] >= 0.8 else "FAIL"],
    ])
    print(f"load average: {os.getloadavg()}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--runtime", type=float, default=10, help="seconds per fio run (randread)")
    p.add_argument("--size", type=int, default=1024, help="randread data, MiB (default 1024)")
    p.add_argument("--untar-gib", type=int, default=4, help="untar backing file, GiB (default 4)")
    p.add_argument("--delay-ms", type=int, default=5, help="delay per write of the slow backing (default 5)")
    p.add_argument("--subset", help="tar members to extract (comma-separated), default the whole tree")
    p.add_argument("--drain-gib", type=int, default=2, help="dirty data to drain, GiB (default 2)")
    p.add_argument("--direct-gib", type=int, default=2, help="direct: data populated and drained, GiB (default 2)")
    p.add_argument("--data-dir", help="where data files go (default: the temp dir; drain, direct: /var/tmp)")
    p.add_argument("--cache-dir", default="/var/tmp/appliance-bench", help="the decompressed tarball")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    terminate_on_signals()
    parts = [x for x in args.only.split(",") if x]
    for x in parts:
        if x not in PARTS:
            p.error(f"unknown part {x!r}; parts: {', '.join(PARTS)}")
    results = {"environment": environment(), "args": vars(args)}
    try:
        with workdir(args.keep, base="/tmp") as wd:
            for part in parts:
                results[part] = globals()[f"bench_{part}"](args, wd)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_save:
        print(f"\nresults: {write_results('ramback', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
