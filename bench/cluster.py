#!/usr/bin/env python3
"""The clustered dirty log against the disk log: what keeping the log in etcd costs a write,
and how fast a survivor takes over and resyncs a killed node's regions.

    python bench/cluster.py [--runtime S] [--size MiB]

A real single-member etcd (Debian's `etcd`, on 127.0.0.1, its data dir in the temp dir) and one
daemon serving two mirrors of the same size and region size, measured one at a time with fio's
nbd engine:
  md   `mirror disk` over two files, its log on a third, `nosync`;
  mc   `mirror clustered` over two other files, its log in etcd (the daemon's own log service).
Figures: 4 KiB random writes at QD16, clustered as a ratio of disk (bar, issue 13: >= 0.7x), and
etcd transactions per 1000 client writes (etcd's own count of Txn calls, from its /metrics).

Then node loss: two daemons (nodes a and b, lease_ttl 2 s) export one clustered mirror of the
same two legs; a runs 4 KiB random writes, is killed with SIGKILL, and the figures are the time
from the kill to b's takeover (its recover/ keys appear in etcd: the start of the resync) and
the resync's duration for the regions a held (until the last recover/ key is gone).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO,
    MiB,
    Appliance,
    BenchError,
    Server,
    Workload,
    environment,
    fmt_num,
    fmt_ratio,
    make_data_file,
    measure,
    need_tools,
    print_table,
    ratio,
    terminate_on_signals,
    workdir,
    write_results,
)

sys.path.insert(0, str(REPO))
from appliance.cluster.etcd import Etcd as EtcdClient  # noqa: E402

REGION_SECTORS = 8192  # 4 MiB regions, as bench/mirror.py
UUID = "bench-shared"
BAR = 0.7


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd(Server):
    label = "etcd"

    def __init__(self, workdir):
        super().__init__(workdir, "etcd")
        self.port, self.peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self):
        peer = f"http://127.0.0.1:{self.peer}"
        return ["etcd", "--name", "bench", "--data-dir", str(self.dir / "etcd-data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"bench={peer}"]

    def _ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"etcd exited with {self.proc.returncode}:\n{self.log_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if b"true" in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError(f"etcd not healthy within {timeout}s")

    def txns(self):
        """etcd's count of Txn calls handled (the JSON gateway's go through gRPC too)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(m) for m in re.findall(
            r'^grpc_server_handled_total\{[^}]*grpc_method="Txn"[^}]*\} (\S+)$', text, re.M))


def cluster_config(etcd, wd, node, ttl=5):
    return (f'[cluster]\nendpoints = ["{etcd.url}"]\nnode = "{node}"\nlease_ttl = {ttl}\n'
            f'etcd_timeout = 10\nsocket = "{wd}/{node}-clog.sock"\n')


def mirror(log, sectors, legs):
    words = " ".join(f"{leg} 0" for leg in legs)
    return f"0 {sectors} mirror {log} {len(legs)} {words} 1 handle_errors"


def write_cost(wd, etcd, size, args, rows, results):
    wl = Workload("randwrite-4k-qd16", "4 KiB random write, QD16", "randwrite", "4k", 16)
    a, b, c, d = (make_data_file(wd / n, size) for n in ("a.img", "b.img", "c.img", "d.img"))
    logdev = wd / "log.img"
    logdev.write_bytes(bytes(MiB))
    sectors = size // 512
    devices = [
        ("md", [mirror(f"disk 3 {logdev} {REGION_SECTORS} nosync", sectors, (a, b))]),
        ("mc", [mirror(f"clustered 3 {UUID} {REGION_SECTORS} nosync", sectors, (c, d))],
         {"exclusive": False}),
    ]
    with Appliance(wd, devices, name="one", extra_config=cluster_config(etcd, wd, "one")) as app:
        r_disk = measure(app, wl, runtime=args.runtime, ramp_time=0, export="md")
        t0 = etcd.txns()
        r_cl = measure(app, wl, runtime=args.runtime, ramp_time=0, export="mc")
        per_1000 = 1000 * (etcd.txns() - t0) / r_cl.total_ios
    r = ratio(r_cl.iops, r_disk.iops)
    verdict = "-" if r is None else ("PASS" if r >= BAR else "FAIL")
    rows.append([wl.title, fmt_num(r_disk.iops), fmt_num(r_cl.iops), fmt_ratio(r),
                 f">= {BAR}x {verdict}", f"{per_1000:.1f}"])
    results[wl.key] = {"disk": r_disk.to_dict(), "clustered": r_cl.to_dict(), "ratio": r,
                       "etcd_txns_per_1000_writes": per_1000, "regions": size // (REGION_SECTORS * 512)}


def node_loss(wd, etcd, args, results, size=64 * MiB):
    """kill -9 of node a under writes: time to b's takeover, and its resync of a's regions."""
    a_leg, b_leg = (make_data_file(wd / n, size) for n in ("la.img", "lb.img"))
    sectors = size // 512
    line = mirror(f"clustered 3 {UUID}-2 {REGION_SECTORS} nosync", sectors, (a_leg, b_leg))
    client = EtcdClient([etcd.url], timeout=5)
    recover = f"/appliance/logs/{UUID}-2/recover/"
    ttl = 2
    with Appliance(wd, [("m", [line], {"exclusive": False})], name="b",
                   extra_config=cluster_config(etcd, wd, "b", ttl)) as node_b:
        node_a = Appliance(wd, [("m", [line], {"exclusive": False})], name="a",
                           extra_config=cluster_config(etcd, wd, "a", ttl)).start()
        try:
            load = subprocess.Popen(["fio", "--name=load", "--ioengine=nbd", f"--uri={node_a.uri('m')}",
                                     "--rw=randwrite", "--bs=4k", "--iodepth=16", "--time_based",
                                     "--runtime=30", "--norandommap"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(min(3, args.runtime))
            held = sum(1 for k in client.get_prefix(f"/appliance/logs/{UUID}-2/mark/") if k.endswith("/a"))
            node_a.proc.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            node_a.proc.wait()
            load.kill()
            load.wait()
            t_start = t_done = None
            regions = 0
            deadline = t_kill + 10 * ttl + 60
            while time.monotonic() < deadline:
                n = client.count_prefix(recover)
                now = time.monotonic()
                if n and t_start is None:
                    t_start, regions = now, n
                if t_start is not None and n == 0:
                    t_done = now
                    break
                time.sleep(0.02)
            if t_done is None:
                raise BenchError(f"b did not take over and resync a's regions within {deadline - t_kill:.0f}s:\n"
                                 f"{node_b.log_text()[-2000:]}")
        finally:
            node_a.stop()
    results["node_loss"] = {"lease_ttl": ttl, "regions_a_held": held, "regions_taken_over": regions,
                            "kill_to_resync_start_s": t_start - t_kill, "resync_s": t_done - t_start}
    return [f"kill -9 of a node (lease {ttl}s): to takeover", f"{t_start - t_kill:.2f} s",
            f"resync of its {regions} regions ({held} marked before the kill)", f"{t_done - t_start:.2f} s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=float, default=8, help="seconds per fio run (default 8)")
    p.add_argument("--size", type=int, default=512, help="each mirror's size in MiB (default 512)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/cluster-*.json")
    args = p.parse_args(argv)
    need_tools("fio", "etcd")
    terminate_on_signals()
    size = args.size * MiB
    rows, results = [], {"environment": environment(), "size": size}
    with workdir(args.keep) as wd, Etcd(wd) as etcd:
        write_cost(wd, etcd, size, args, rows, results)
        loss = node_loss(wd, etcd, args, results)
    print_table(["workload", "disk log", "clustered log", "clustered/disk", "bar", "etcd txns/1000 writes"], rows)
    print_table(["node loss", "time", "", "time"], [loss])
    if not args.no_save:
        print(f"results: {write_results('cluster', results)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
