"""A clustered mirror: two appliance daemons as two nodes of one cluster (a real etcd), each
exporting the same mirror of the same leg files, one dirty-region log between them."""

from __future__ import annotations

import json
import re
import subprocess
import time

from appliance.cluster import etcd as e
from conftest import device, qemu_io, wait_for
from test_mirror import MiB, fio, in_sync, mirror_line, mstatus, poke, read_file

UUID = "shared"
TTL = 2


def cluster(etcd, tmp_path, node, ttl=TTL, etcd_timeout=3):
    tls = "".join(f'{k} = "{v}"\n' for k, v in etcd.client_tls().items())
    return (f'[cluster]\nendpoints = {json.dumps(etcd.urls)}\nnode = "{node}"\nlease_ttl = {ttl}\n'
            f'etcd_timeout = {etcd_timeout}\nsocket = "{tmp_path}/{node}-clog.sock"\n{tls}')


def node(make_daemon, etcd, tmp_path, name, legs, ttl=TTL, start=True, etcd_timeout=3):
    line = mirror_line(16 * MiB, legs, log=f"clustered 3 {UUID} 2048 nosync")
    return make_daemon(device("m", line, exclusive=False), name=name,
                       extra=cluster(etcd, tmp_path, name, ttl, etcd_timeout), start=start)


def marks(etcd):
    keys = e.Etcd(etcd.urls, **etcd.client_tls()).get_prefix(f"/appliance/logs/{UUID}/mark/")
    return sorted((int(k.split("/")[-2]), k.split("/")[-1]) for k in keys)


def test_two_nodes_share_one_log(make_daemon, image, etcd, tmp_path):
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    a, b = node(make_daemon, etcd, tmp_path, "a", legs), node(make_daemon, etcd, tmp_path, "b", legs)
    qemu_io(a.uri("m"), f"write -P 0x11 {2 * MiB} 64k")
    qemu_io(b.uri("m"), f"write -P 0x22 {5 * MiB} 64k")
    assert marks(etcd) == [(2, "a"), (5, "b")]  # marked regions linger: written again, no txn
    assert read_file(legs[0]) == read_file(legs[1])
    assert "read 65536/65536" in qemu_io(b.uri("m"), f"read -P 0x11 {2 * MiB} 64k").stdout
    assert mstatus(a)["log"]["type"] == "clustered" and mstatus(a)["log"]["state"] == "ok"
    assert f"3 clustered a {UUID}" in a.cli("status", "m").stdout
    assert f"clustered 3 {UUID} 2048 nosync 2" in a.cli("table", "m").stdout
    lines = b.cli("cluster", "status").stdout.splitlines()
    assert [ln.split("\t")[:2] + ln.split("\t")[3:4] for ln in lines] == \
        [["a", "alive", "1 regions marked"], ["b", "alive", "1 regions marked"]]
    nodes = json.loads(a.cli("status", "--json").stdout)["cluster"]["nodes"]
    assert [(n["name"], n["state"], n["marked"]) for n in nodes] == [("a", "alive", 1), ("b", "alive", 1)]
    assert all(0 < n["lease_left"] <= TTL for n in nodes)


def test_kill_9_of_a_node_the_survivor_resyncs_exactly_its_regions(make_daemon, image, etcd, tmp_path):
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    a, b = node(make_daemon, etcd, tmp_path, "a", legs), node(make_daemon, etcd, tmp_path, "b", legs)
    qemu_io(a.uri("m"), f"write -P 0x33 {1 * MiB} 4k", f"write -P 0x33 {3 * MiB} 4k")
    qemu_io(b.uri("m"), f"write -P 0x44 {9 * MiB} 4k")
    # a's writes in flight when it died: they reached its first leg only
    poke(legs[1], 1 * MiB + 8192, b"\x99" * 512)
    poke(legs[1], 3 * MiB + 8192, b"\x99" * 512)
    poke(legs[1], 12 * MiB, b"\x77" * 512)  # no node marked region 12: nobody resyncs it
    a.kill()
    t0 = time.monotonic()
    lost = wait_for(lambda: [ln for ln in b.cli("cluster", "status").stdout.splitlines()
                             if ln.startswith("a\t") and "lost" in ln and "2 being resynced" in ln]
                    or marks(etcd) == [(9, "b")], 3 * TTL + 10, "a to be lost and resynced")
    print(lost)
    wait_for(lambda: "regions of a lost node to resync" in b.log.read_text(), 3 * TTL + 10, "b to take over")
    took_over = time.monotonic() - t0
    wait_for(lambda: marks(etcd) == [(9, "b")], 10, "b to resync a's regions and clear them")
    print(f"kill -9 to takeover: {took_over:.1f}s (lease_ttl {TTL}s); "
          f"to resynced: {time.monotonic() - t0:.1f}s")
    assert re.search(r"2 regions of a lost node to resync", b.log.read_text())
    assert read_file(legs[0], 1 * MiB, 4 * MiB) == read_file(legs[1], 1 * MiB, 4 * MiB)
    assert read_file(legs[1], 12 * MiB, 512) == b"\x77" * 512
    assert in_sync(b)


def test_etcd_gone_past_the_bound_fails_writes_to_unmarked_regions_then_they_resume(
        make_daemon, image, etcd, tmp_path):
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    a = node(make_daemon, etcd, tmp_path, "a", legs)
    qemu_io(a.uri("m"), f"write -P 0x55 {1 * MiB} 4k")
    etcd.stop()
    t0 = time.monotonic()
    r = qemu_io(a.uri("m"), f"write -P 0x66 {6 * MiB} 4k", check=False)
    waited = time.monotonic() - t0
    assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
    assert 3 <= waited < 20, waited  # etcd_timeout = 3: a bounded wait, then the error
    assert read_file(legs[0], 6 * MiB, 4096) == bytes(4096) == read_file(legs[1], 6 * MiB, 4096)
    # nor to a region it had marked: its lease ran out unrenewed, a survivor may resync it now
    r = qemu_io(a.uri("m"), f"write -P 0x57 {1 * MiB} 4k", check=False)
    assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
    assert read_file(legs[1], 1 * MiB, 4096) == b"\x55" * 4096
    assert "read 4096/4096" in qemu_io(a.uri("m"), f"read -P 0x55 {1 * MiB} 4k").stdout  # reads go on
    etcd.start()
    wait_for(lambda: "wrote 4096/4096" in qemu_io(a.uri("m"), f"write -P 0x66 {6 * MiB} 4k",
                                                   check=False).stdout, 30, "writes to resume")
    assert read_file(legs[0], 6 * MiB, 4096) == b"\x66" * 4096 == read_file(legs[1], 6 * MiB, 4096)
    assert (6, "a") in marks(etcd)


def test_etcd_stopped_for_5s_under_load_writes_wait_then_resume_nothing_lost(
        make_daemon, image, etcd, tmp_path):
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    a = node(make_daemon, etcd, tmp_path, "a", legs, etcd_timeout=10)
    # 4096 random 4 KiB writes over every region at 500/s, then fio reads them all back
    load = fio(a.uri("m"), tmp_path, "--rw=randwrite", "--rate_iops=500", background=True,
               size=16 * MiB)
    time.sleep(2)
    etcd.stop()
    time.sleep(5)  # longer than the lease: writes to marked regions wait for its renewal too
    etcd.start()
    out = load.communicate(timeout=120)[0]
    assert load.returncode == 0 and "err= 0" in out, out
    assert read_file(legs[0]) == read_file(legs[1])
    assert "lease could not be renewed" not in a.log.read_text()  # waited, never refused
    assert in_sync(a)


def test_while_a_survivor_resyncs_another_node_reads_the_source_and_its_writes_wait(
        make_daemon, image, etcd, tmp_path):
    """The survivor's state is put in etcd as its takeover leaves it (recover/<region>, a
    survivor "s" resyncing for a lost "a"), and stays as long as the test needs. b's lease is
    long: it learns of the claim through a watch at once, not on a timer."""
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    b = node(make_daemon, etcd, tmp_path, "b", legs, ttl=30)
    poke(legs[0], 1 * MiB, b"\x33" * 4096)  # a's write in flight reached its first leg only
    ec = e.Etcd([etcd.url])
    recover = f"/appliance/logs/{UUID}/recover/{1:012d}"
    ec.txn([], [e.put(recover, "s a")])
    wait_for(lambda: "1 regions being resynced by another node" in b.log.read_text(), 2,
             "b to follow IS_REMOTE_RECOVERING")
    for _ in range(3):  # its reads come from the source leg (the primary)
        assert "read 4096/4096" in qemu_io(b.uri("m"), f"read -P 0x33 {1 * MiB} 4k").stdout
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P 0x44 {1 * MiB + 8192} 4k",
                               b.uri("m")], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert writer.poll() is None  # waits for the region
    assert read_file(legs[0], MiB + 8192, 4096) == bytes(4096)
    poke(legs[1], 1 * MiB, b"\x33" * 4096)  # the survivor's copy
    ec.txn([], [e.delete(recover)])
    t0 = time.monotonic()
    assert "wrote 4096/4096" in writer.communicate(timeout=10)[0]
    assert time.monotonic() - t0 < 2  # the end of the resync is seen at once too
    assert read_file(legs[0], MiB, MiB) == read_file(legs[1], MiB, MiB)
    assert read_file(legs[1], MiB + 8192, 4096) == b"\x44" * 4096
