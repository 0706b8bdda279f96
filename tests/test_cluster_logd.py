"""`appliance logd` with a real etcd: two log services as two nodes of one cluster, each with its
own socket, sharing one clustered log. What a mirror on each node would see: one log across
nodes, a survivor resyncing exactly the regions a SIGKILLed node had marked, CTR + RESUME after
the service restarts, and how few etcd transactions a stream of writes costs."""

import errno
import os
import random
import signal
import subprocess
import sys

import pytest

from appliance.cluster import etcd as e
from appliance.cluster.client import LogClient
from appliance.cluster.protocol import I64, PAIR_IQ, PAIR_QI, U64, RequestType as T, pack_regions
from conftest import REPO, wait_for

UUID = "shared-mirror"
REGION = 65536
CTR = f"{REGION} {UUID} nosync {256 * REGION}"
TTL = 2


@pytest.fixture
def logd(tmp_path, etcd):
    procs = {}

    def start(node, ttl=TTL):
        sock = str(tmp_path / f"logd-{node}.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        p = subprocess.Popen([sys.executable, "-m", "appliance", "logd", "--endpoints", etcd.url,
                              "--node", node, "--socket", sock, "--lease-ttl", str(ttl),
                              "--etcd-timeout", "3"], cwd=REPO,
                             stderr=open(tmp_path / f"logd-{node}.log", "ab"))
        procs[node] = p
        wait_for(lambda: os.path.exists(sock) or p.poll() is not None, 15, f"logd {node} to listen")
        assert p.poll() is None, (tmp_path / f"logd-{node}.log").read_text()
        p.sock = sock
        return p

    yield start
    for p in procs.values():
        if p.poll() is None:
            p.kill()
        p.wait()


def client(proc):
    return LogClient(proc.sock, UUID, CTR, timeout=3, pause=0.2, bound=15)


def mark(c, *regions):
    c.call(T.MARK_REGION, pack_regions(regions))
    c.call(T.FLUSH)


def clean(c, region):
    return I64.unpack(c.call(T.IS_CLEAN, U64.pack(region)))[0] == 1


def resync_work(c):
    out = []
    while True:
        found, region = PAIR_IQ.unpack(c.call(T.GET_RESYNC_WORK))
        if not found:
            return out
        out.append(region)


def txns(c):
    return int(c.call(T.STATUS_INFO).decode().split("txns=")[1])


def test_nodes_see_one_log(logd):
    a, b = client(logd("a")), client(logd("b"))
    mark(a, 3, 7)
    mark(b, 10)
    assert not clean(b, 3) and not clean(b, 7) and not clean(a, 10)
    assert clean(a, 4) and clean(b, 4)
    a.call(T.CLEAR_REGION, pack_regions([3]))
    a.call(T.FLUSH)
    assert not clean(b, 3)  # a cleared region lingers marked: written again, it costs nothing
    a.call(T.POSTSUSPEND)  # suspend flushes every clear
    assert clean(b, 3) and not clean(b, 7)


def test_survivor_resyncs_exactly_the_regions_the_killed_node_had_marked(logd, etcd):
    pa, pb = logd("a"), logd("b", ttl=60)  # b renews every 20 s: it learns of a's loss by a watch
    a, b = client(pa), client(pb)
    mark(a, 5, 9, 200)
    mark(b, 1)
    assert resync_work(b) == []
    pa.send_signal(signal.SIGKILL)
    pa.wait()
    took = wait_for(lambda: (b.call(T.RESUME), resync_work(b))[1], TTL + 3, "b to take over a's regions")
    c = client(logd("c"))  # a third node watches the takeover from outside
    assert sorted(took) == [5, 9, 200]
    assert PAIR_IQ.unpack(c.call(T.IS_REMOTE_RECOVERING, U64.pack(9)))[0] == 1
    assert PAIR_IQ.unpack(c.call(T.IS_REMOTE_RECOVERING, U64.pack(1))) == (0, 5)  # the hint: the next one
    assert PAIR_IQ.unpack(c.call(T.IS_REMOTE_RECOVERING, U64.pack(200))) == (1, 256)
    assert not clean(c, 9)
    for r in took:
        b.call(T.SET_REGION_SYNC, PAIR_QI.pack(r, 1))
    assert PAIR_IQ.unpack(c.call(T.IS_REMOTE_RECOVERING, U64.pack(9)))[0] == 0
    assert clean(c, 9) and not clean(c, 1)
    keys = e.Etcd([etcd.url]).get_prefix(f"/appliance/logs/{UUID}/")
    assert sorted(k.split("/", 5)[5] for k in keys if "/mark/" in k or "/recover/" in k) == \
        ["000000000001/b"]


def test_service_restart_is_carried_through_with_ctr_and_resume(logd):
    pa = logd("a")
    a = client(pa)
    mark(a, 4)
    pa.send_signal(signal.SIGKILL)
    pa.wait()
    logd("a")  # waits out its old lease, then serves again on the same socket
    mark(a, 6)  # the same LogClient: reconnected, CTR + RESUME, then the request
    assert a.proto.reconnects == 2
    assert not clean(a, 6)


def test_a_fenced_node_cannot_mark(logd, etcd):
    a = client(logd("a"))
    mark(a, 1)
    ec = e.Etcd([etcd.url])
    _, _, lease = ec.get_prefix("/appliance/nodes/a")["/appliance/nodes/a"]
    ec.call("/v3/lease/revoke", {"ID": str(lease)})
    a.call(T.MARK_REGION, pack_regions([2]))
    with pytest.raises(OSError) as err:
        a.call(T.FLUSH)
    assert err.value.errno == errno.ESTALE


@pytest.mark.parametrize("regions, most", [(32, 32), (256, 1000)])
def test_etcd_transactions_per_1000_writes(logd, regions, most):
    """Random writes over `regions` regions, as the mirror makes them: MARK then FLUSH before
    each write, CLEAR once it completed (16 in flight); only a region not marked yet costs a
    transaction."""
    a = client(logd("a"))
    before = txns(a)
    rng = random.Random(7)
    inflight = []
    for i in range(1000):
        r = rng.randrange(regions)
        a.call(T.MARK_REGION, pack_regions([r]))
        a.call(T.FLUSH)
        inflight.append(r)
        if len(inflight) > 16:
            a.call(T.CLEAR_REGION, pack_regions([inflight.pop(0)]))
    per_1000 = txns(a) - before
    print(f"etcd transactions per 1000 client writes over {regions} regions: {per_1000}")
    assert per_1000 <= most


def test_the_logd_unit_runs_from_the_config_and_the_daemon_uses_it(make_daemon, image, etcd, tmp_path):
    """systemd/appliance-logd.service's ExecStart with the daemon's config: it serves on
    [cluster]'s socket, the daemon's mirror goes through it (no service of its own), and a
    second one refuses to take the socket over."""
    from test_cluster_mirror import UUID as UUID_MIRROR, node as cluster_node
    from test_mirror import MiB

    from conftest import qemu_io

    unit = (REPO / "systemd/appliance-logd.service").read_text()
    keys = dict(ln.split("=", 1) for ln in unit.splitlines() if "=" in ln and not ln.startswith("#"))
    assert keys["ExecStart"] == "/usr/bin/appliance logd" and "appliance.service" in keys["Before"]
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    d = cluster_node(make_daemon, etcd, tmp_path, "a", legs, start=False)
    cmd = [sys.executable, "-m", "appliance", *keys["ExecStart"].split()[1:], "--config", str(d.config)]
    def start_unit():
        p = subprocess.Popen(cmd, cwd=REPO, stderr=open(tmp_path / "unit.log", "ab"))
        wait_for(lambda: sock.exists() or p.poll() is not None, 15, "logd to listen")
        assert p.poll() is None, (tmp_path / "unit.log").read_text()
        return p

    sock = tmp_path / "a-clog.sock"
    unit_proc = start_unit()
    try:
        d.start()
        assert "wrote 4096/4096" in qemu_io(d.uri("m"), f"write -P 0x42 {2 * MiB} 4k").stdout
        keys_now = e.Etcd([etcd.url]).get_prefix(f"/appliance/logs/{UUID_MIRROR}/mark/")
        assert list(keys_now) == [f"/appliance/logs/{UUID_MIRROR}/mark/{2:012d}/a"]
        again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and "already listens on" in again.stderr, again.stderr
        assert unit_proc.poll() is None
        # the daemon's mirror goes through the unit's service, not one of its own: without
        # it a write to an unmarked region fails; with the unit restarted, it goes through
        unit_proc.kill()
        unit_proc.wait()
        sock.unlink()
        r = qemu_io(d.uri("m"), f"write -P 0x43 {5 * MiB} 4k", check=False)
        assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
        unit_proc = start_unit()
        wait_for(lambda: "wrote 4096/4096" in qemu_io(d.uri("m"), f"write -P 0x43 {5 * MiB} 4k",
                                                       check=False).stdout, 20, "writes through the new logd")
    finally:
        unit_proc.kill()
        unit_proc.wait()
