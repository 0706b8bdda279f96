"""TLS on a TCP export (NBD_OPT_STARTTLS) with clients nobody here wrote: nbdinfo, qemu-io and
qemu-img over nbds://, refusals of plaintext under tls = "require", of clients without a
certificate or with one from another CA under tls_verify_peer. Traffic to 127.0.0.1 only."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess

import pytest

import certs
from appliance.nbd import constants as C
from conftest import device, need, nbdsh_env, run, wait_for
from nut import free_port
from test_hostile import greeting, option, recv_exact

SIZE = 8 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    need("openssl")
    base = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(base / "ca")
    other = certs.make_ca(base / "other-ca", cn="someone else's CA")
    return {
        "server": certs.server_dir(ca, base / "server"),
        "client": certs.client_dir(ca, base / "client"),
        "anonymous": _trust_only(ca, base / "anonymous"),
        "stranger": certs.client_dir(other, base / "stranger", cn="stranger", trust=ca),
        "expired": certs.client_dir(ca, base / "expired", cn="expired", days=-1),
    }


def _trust_only(ca, d):
    d.mkdir()
    (d / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    return d


def tls_daemon(make_daemon, image, pki, mode="require", verify=False):
    port = free_port()
    extra = f'tls = "{mode}"\ntls_certificates = "{pki["server"]}"\ntls_verify_peer = {str(verify).lower()}\n'
    d = make_daemon(device("data0", f"0 {SIZE // 512} linear {image()} 0"), extra=extra, tcp=port)
    return d, port


def nbds(port, certdir):
    return f"nbds://127.0.0.1:{port}/data0?tls-certificates={certdir}"


def test_nbdinfo_and_qemu_over_tls(make_daemon, image, pki, tmp_path):
    need("nbdinfo", "qemu-io", "qemu-img")
    disk = image("tls.img", SIZE)
    port = free_port()
    extra = f'tls = "require"\ntls_certificates = "{pki["server"]}"\n'
    make_daemon(device("data0", f"0 {SIZE // 512} linear {disk} 0"), extra=extra, tcp=port)
    assert run("nbdinfo", "--size", nbds(port, pki["client"])).stdout.strip() == str(SIZE)
    creds = f"tls-creds-x509,id=tls0,dir={pki['client']},endpoint=client"
    opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=data0,tls-creds=tls0"
    out = run("qemu-io", "--object", creds, "--image-opts", opts,
              "-c", "write -P 0x5a 1M 2M", "-c", "read -P 0x5a 1M 2M").stdout
    assert "Pattern verification failed" not in out and "read 2097152/2097152" in out
    with open(disk, "rb") as f:
        f.seek(1 << 20)
        assert f.read(2 << 20) == b"\x5a" * (2 << 20)
    info = run("qemu-img", "info", "--object", creds, "--image-opts", opts).stdout
    assert f"virtual size: 8 MiB ({SIZE} bytes)" in info


def test_require_refuses_plaintext_options_with_tls_reqd(make_daemon, image, pki):
    need("nbdinfo")
    d, port = tls_daemon(make_daemon, image, pki)
    r = run("nbdinfo", f"nbd://127.0.0.1:{port}/data0", check=False)
    assert r.returncode != 0
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    greeting(s)
    s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE) + option(C.NBD_OPT_LIST))
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert (magic, opt, rtype) == (C.NBD_REP_MAGIC, C.NBD_OPT_LIST, C.NBD_REP_ERR_TLS_REQD)
    recv_exact(s, length)
    # the unix socket is not a TCP listener: plaintext as before
    assert run("nbdinfo", "--size", d.uri("data0")).stdout.strip() == str(SIZE)


def test_on_serves_plaintext_and_tls(make_daemon, image, pki):
    need("nbdinfo")
    d, port = tls_daemon(make_daemon, image, pki, mode="on")
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/data0").stdout.strip() == str(SIZE)
    assert run("nbdinfo", "--size", nbds(port, pki["client"])).stdout.strip() == str(SIZE)


@pytest.mark.parametrize("who", ["anonymous", "stranger", "expired"])
def test_verify_peer_refuses_clients_without_a_certificate_from_the_ca(make_daemon, image, pki, who):
    need("nbdinfo")
    d, port = tls_daemon(make_daemon, image, pki, verify=True)
    r = run("nbdinfo", "--size", nbds(port, pki[who]), check=False)
    assert r.returncode != 0, r.stdout
    assert "TLS handshake failed" in d.log.read_text()
    assert run("nbdinfo", "--size", nbds(port, pki["client"])).stdout.strip() == str(SIZE)


def test_nbdcopy_over_tls(make_daemon, image, pki, tmp_path):
    need("nbdcopy")
    d, port = tls_daemon(make_daemon, image, pki)
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * (SIZE // 256))
    run("nbdcopy", str(src), nbds(port, pki["client"]))
    run("nbdcopy", nbds(port, pki["client"]), str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


CLIENT = """
import os, sys
h.set_uri_allow_local_file(True)  # tls-certificates=DIR
h.connect_uri(os.environ["URI"])
assert h.pread(512, 0) == bytes(512)
print("connected", flush=True)
sys.stdin.readline()
h.pwrite(b"r" * 512, 0)
assert h.pread(512, 0) == b"r" * 512
print("still served", flush=True)
"""


def test_reload_swaps_the_certificate_while_a_client_stays_connected(make_daemon, image, pki, tmp_path):
    need("nbdsh", "nbdinfo")
    served = tmp_path / "served"
    shutil.copytree(pki["server"], served)
    port = free_port()
    extra = f'tls = "require"\ntls_certificates = "{served}"\n'
    d = make_daemon(device("data0", f"0 {SIZE // 512} linear {image()} 0"), extra=extra, tcp=port)
    stay = subprocess.Popen(["nbdsh", "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(nbdsh_env(), URI=nbds(port, pki["client"])))
    try:
        assert stay.stdout.readline().strip() == "connected"
        renewed = certs.server_dir(certs.make_ca(tmp_path / "new-ca", cn="renewed CA"), tmp_path / "renewed")
        for name in ("server-cert.pem", "server-key.pem", "ca-cert.pem"):
            shutil.copy(renewed / name, served / name)
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.log.read_text(), what="the reload")
        trusts_new = certs.client_dir(tmp_path / "new-ca", tmp_path / "new-client")
        assert run("nbdinfo", "--size", nbds(port, trusts_new)).stdout.strip() == str(SIZE)
        assert run("nbdinfo", "--size", nbds(port, pki["client"]), check=False).returncode != 0  # the old CA's
        stay.stdin.write("go\n")
        stay.stdin.flush()
        assert stay.stdout.readline().strip() == "still served"
        assert stay.wait(30) == 0
    finally:
        stay.kill()
