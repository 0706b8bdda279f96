"""A clustered mirror against etcd as it runs in production: two nodes writing under
`fio --verify` at once, etcd over TLS with client certificates, and a three-member etcd that
loses one member (nothing changes) and then its quorum (writes to unmarked regions fail within
etcd_timeout, and resume when the quorum is back)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import certs
from appliance.cluster import etcd as e
from conftest import REPO, EtcdCluster, need, qemu_io, wait_for
from test_cluster_mirror import UUID, marks, node
from test_mirror import MiB, fio, in_sync, read_file


def test_two_nodes_under_fio_verify_keep_one_log(make_daemon, image, etcd, tmp_path):
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    a, b = node(make_daemon, etcd, tmp_path, "a", legs), node(make_daemon, etcd, tmp_path, "b", legs)
    (tmp_path / "fa").mkdir()
    (tmp_path / "fb").mkdir()
    jobs = [fio(a.uri("m"), tmp_path / "fa", "--rw=randwrite", background=True, offset=0, size=8 * MiB),
            fio(b.uri("m"), tmp_path / "fb", "--rw=randwrite", background=True, offset=8 * MiB,
                size=8 * MiB)]
    for job in jobs:
        out = job.communicate(timeout=120)[0]
        assert job.returncode == 0, out
        assert "verify" in out and "err= 0" in out, out
    # one log: every region a wrote is marked by a (so not clean for b), and b's by b
    assert marks(etcd) == [(r, "a") for r in range(8)] + [(r, "b") for r in range(8, 16)]
    assert read_file(legs[0]) == read_file(legs[1])
    assert in_sync(a) and in_sync(b)


@pytest.fixture
def etcd_tls(tmp_path):
    need("openssl")
    ca = certs.make_ca(tmp_path / "ca")
    # etcd's JSON gateway dials etcd's own gRPC port with the server certificate: client use too
    d = certs.server_dir(ca, tmp_path / "etcd-tls", usage="serverAuth,clientAuth")
    certs.client_dir(ca, d)
    cluster = EtcdCluster(tmp_path, tls=d)
    cluster.start_all()
    yield cluster
    cluster.stop()


def test_etcd_over_tls_with_a_client_certificate(make_daemon, image, etcd_tls, tmp_path):
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    a = node(make_daemon, etcd_tls, tmp_path, "a", legs)
    qemu_io(a.uri("m"), f"write -P 0x21 {3 * MiB} 4k")
    assert marks(etcd_tls) == [(3, "a")]
    assert a.cli("cluster", "status").stdout.startswith("a\talive\t")
    # the same etcd without a client certificate: refused, and said so
    tls = etcd_tls.client_tls()
    r = subprocess.run([sys.executable, "-m", "appliance", "logd", "--endpoints", etcd_tls.url,
                        "--node", "x", "--socket", str(tmp_path / "x.sock"), "--etcd-timeout", "1",
                        "--ca", tls["ca"]], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot join etcd at https://127.0.0.1:" in r.stderr, r.stderr
    # nor over plain http
    with pytest.raises(e.EtcdError):
        e.Etcd([etcd_tls.url.replace("https:", "http:")], timeout=1).get_prefix("/")


def test_cluster_config_names_what_tls_lacks(tmp_path):
    from appliance import config as cfg

    (tmp_path / "c.pem").write_text("x")
    base = f'[cluster]\nendpoints = ["https://127.0.0.1:2379"]\nnode = "a"\n'
    with pytest.raises(cfg.ConfigError, match="needs both cert and key"):
        cfg.loads(base + f'ca = "{tmp_path}/c.pem"\ncert = "{tmp_path}/c.pem"\n')
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.loads(base + f'ca = "{tmp_path}/nope.pem"\n')
    with pytest.raises(cfg.ConfigError, match="no endpoint is https"):
        cfg.loads(base.replace("https", "http") + f'ca = "{tmp_path}/c.pem"\n')


def test_three_member_etcd_one_member_lost_then_the_quorum(make_daemon, image, etcd3, tmp_path):
    legs = [image("a.img", 16 * MiB), image("b.img", 16 * MiB)]
    a = node(make_daemon, etcd3, tmp_path, "a", legs)
    qemu_io(a.uri("m"), f"write -P 0x31 {1 * MiB} 4k")
    etcd3.stop(0)  # the first endpoint: the node goes on with the others, nothing noticed
    t0 = time.monotonic()
    assert "wrote 4096/4096" in qemu_io(a.uri("m"), f"write -P 0x32 {2 * MiB} 4k").stdout
    assert time.monotonic() - t0 < 3
    assert (2, "a") in marks(etcd3)
    etcd3.stop(1)  # the quorum is gone: etcd takes no transaction
    t0 = time.monotonic()
    r = qemu_io(a.uri("m"), f"write -P 0x33 {6 * MiB} 4k", check=False)
    waited = time.monotonic() - t0
    assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
    assert 3 <= waited < 20, waited  # etcd_timeout = 3 bounds the wait
    assert read_file(legs[0], 6 * MiB, 4096) == bytes(4096) == read_file(legs[1], 6 * MiB, 4096)
    # reads go on; writes to a region this node has marked stop too (its lease is unrenewed)
    assert "read 4096/4096" in qemu_io(a.uri("m"), f"read -P 0x32 {2 * MiB} 4k").stdout
    r = qemu_io(a.uri("m"), f"write -P 0x34 {2 * MiB} 4k", check=False)
    assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
    assert read_file(legs[1], 2 * MiB, 4096) == b"\x32" * 4096
    etcd3.start(0, wait=False)
    etcd3.start(1, wait=False)
    wait_for(lambda: "wrote 4096/4096" in qemu_io(a.uri("m"), f"write -P 0x33 {6 * MiB} 4k",
                                                   check=False).stdout, 40, "writes to resume")
    assert read_file(legs[0], 6 * MiB, 4096) == b"\x33" * 4096 == read_file(legs[1], 6 * MiB, 4096)
    assert (6, "a") in marks(etcd3)
    assert read_file(legs[0]) == read_file(legs[1])
