"""TLS on a TCP export (NBD_OPT_STARTTLS) with clients nobody here wrote: nbdinfo, qemu-io and
qemu-img over nbds://, refusals of plaintext under tls = "require", of clients without a
certificate or with one from another CA under tls_verify_peer. Traffic to 127.0.0.1 only."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time

import pytest

import certs
from appliance.nbd import constants as C
from conftest import device, need, nbdsh_env, run, wait_for
from nut import free_port
from test_hostile import greeting, log_has, option, recv_exact, request

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


# the transmission phase's TLS, byte by byte: a client over ssl.MemoryBIO on a raw socket


class RawTLS:
    """STARTTLS, the TLS handshake and NBD_OPT_GO with Python's TLS client, records under the
    test's control (`records()` what to send, `send()` when)."""

    def __init__(self, port, certdir, export="data0"):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        greeting(self.s)
        self.s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES)
                       + option(C.NBD_OPT_STARTTLS))
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(self.s, 20))
        assert (opt, rtype, length) == (C.NBD_OPT_STARTTLS, C.NBD_REP_ACK, 0)
        ctx = ssl.create_default_context(cafile=str(certdir / "ca-cert.pem"))
        ctx.load_cert_chain(str(certdir / "client-cert.pem"), str(certdir / "client-key.pem"))
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.cin, self.cout, server_hostname="127.0.0.1")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.send(self.records())
                self._fill()
        self.send(self.records())
        self.export = export

    def records(self):
        return self.cout.read()

    def send(self, raw):
        if raw:
            self.s.sendall(raw)

    def _fill(self):
        data = self.s.recv(65536)
        if not data:
            raise EOFError("server closed")
        self.cin.write(data)

    def read(self, n):
        """n bytes of plaintext; fewer at close_notify; EOFError if TCP ends without it."""
        out = b""
        while len(out) < n:
            try:
                chunk = self.tls.read(n - len(out))
            except ssl.SSLWantReadError:
                self._fill()
                continue
            except ssl.SSLZeroReturnError:
                return out
            if not chunk:
                return out
            out += chunk
        return out

    def go_record(self):
        name = self.export.encode()
        self.tls.write(option(C.NBD_OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)))
        return self.records()

    def go_replies(self):
        """The replies to GO up to its ACK: -> the last reply's type and payload."""
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self.read(20))
            payload = self.read(length)
            if rtype != C.NBD_REP_INFO:
                return rtype, payload


def test_requests_in_the_records_after_go_are_served_even_a_record_cut_in_two(make_daemon, image, pki):
    """The GO and the first requests come together, the last record cut where the handshake
    ends: the loop goes on with what the handshake received, then the socket."""
    d, port = tls_daemon(make_daemon, image, pki)
    c = RawTLS(port, pki["client"])
    go = c.go_record()
    c.tls.write(request(C.NBD_CMD_WRITE, 4096, 4096, cookie=7) + b"\x42" * 4096)
    first = c.records()
    c.tls.write(request(C.NBD_CMD_READ, 4096, 4096, cookie=8))
    second = c.records()
    c.send(go + first + second[:11])
    assert c.go_replies() == (C.NBD_REP_ACK, b"")
    time.sleep(0.2)  # the loop has started on the 11 bytes before the rest arrives
    c.send(second[11:])
    assert struct.unpack(">IIQ", c.read(16)) == (C.NBD_SIMPLE_REPLY_MAGIC, 0, 7)
    assert struct.unpack(">IIQ", c.read(16)) == (C.NBD_SIMPLE_REPLY_MAGIC, 0, 8)
    assert c.read(4096) == b"\x42" * 4096


def test_disc_closes_tls_with_close_notify_after_the_replies(make_daemon, image, pki):
    d, port = tls_daemon(make_daemon, image, pki)
    c = RawTLS(port, pki["client"])
    c.send(c.go_record())
    assert c.go_replies() == (C.NBD_REP_ACK, b"")
    # pipelined: 32 reads of 1 MiB (records far beyond what the socket takes at once), then DISC
    for i in range(32):
        c.tls.write(request(C.NBD_CMD_READ, (i % 8) << 20, 1 << 20, cookie=i))
    c.tls.write(request(C.NBD_CMD_DISC))
    c.send(c.records())
    got = set()
    for _ in range(32):
        magic, error, cookie = struct.unpack(">IIQ", c.read(16))
        assert (magic, error) == (C.NBD_SIMPLE_REPLY_MAGIC, 0)
        assert len(c.read(1 << 20)) == 1 << 20
        got.add(cookie)
    assert got == set(range(32))
    # then close_notify: a clean end of the TLS stream (a bare TCP close is an EOFError here)
    assert c.read(1) == b""
    assert log_has(d, "client sent NBD_CMD_DISC")


# allowed_clients


def test_allowed_clients_by_certificate_name(make_daemon, image, pki, tmp_path):
    need("nbdinfo", "qemu-img")
    port = free_port()
    extra = f'tls = "require"\ntls_certificates = "{pki["server"]}"\ntls_verify_peer = true\n'
    d = make_daemon(device("data0", f"0 {SIZE // 512} linear {image()} 0", allowed_clients=["client1"])
                    + device("data1", f"0 {SIZE // 512} linear {image('b.img')} 0", allowed_clients=["stranger"]),
                    extra=extra, tcp=port)
    assert run("nbdinfo", "--size", nbds(port, pki["client"])).stdout.strip() == str(SIZE)
    # the same client, another export that does not name it: GO gets NBD_REP_ERR_POLICY
    r = run("nbdinfo", "--size", nbds(port, pki["client"]).replace("/data0", "/data1"), check=False)
    assert r.returncode != 0 and "server policy prevents NBD_OPT_GO" in r.stderr
    assert log_has(d, "certificate CN 'client1') is not in allowed_clients of export 'data1'")
    creds = f"tls-creds-x509,id=tls0,dir={pki['client']},endpoint=client"
    opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0,export="
    assert "virtual size: 8 MiB" in run("qemu-img", "info", "--object", creds, "--image-opts", opts + "data0").stdout
    r = run("qemu-img", "info", "--object", creds, "--image-opts", opts + "data1", check=False)
    assert r.returncode != 0 and "is not in allowed_clients of export 'data1'" in r.stderr  # qemu shows why


def test_allowed_clients_by_address_without_tls(make_daemon, image):
    need("nbdinfo", "qemu-img")
    port = free_port()
    d = make_daemon(device("near", "0 64 zero", allowed_clients=["127.0.0.0/8"])
                    + device("far", "0 64 zero", allowed_clients=["192.0.2.0/24", "client1"]),
                    tcp=port)
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/near").stdout.strip() == "32768"
    r = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/far", check=False)
    assert r.returncode != 0 and "server policy prevents NBD_OPT_GO" in r.stderr
    r = run("qemu-img", "info", f"nbd://127.0.0.1:{port}/far", check=False)
    assert r.returncode != 0 and "is not in allowed_clients of export 'far'" in r.stderr
    assert log_has(d, "127.0.0.1, no client certificate) is not in allowed_clients of export 'far'")
    # the unix socket's clients are who its mode lets in
    assert run("nbdinfo", "--size", d.uri("far")).stdout.strip() == "32768"


PLAIN_CLIENT = """
import os, sys
h.connect_uri(os.environ["URI"])
assert h.pread(512, 0) == bytes(512)
print("connected", flush=True)
sys.stdin.readline()
try:
    h.pread(512, 0)
    print("still served", flush=True)
except nbd.Error as e:
    print("cut off", flush=True)
"""


def test_a_reload_that_drops_a_client_from_allowed_clients_disconnects_it(make_daemon, image):
    need("nbdsh")
    port = free_port()
    d = make_daemon(device("near", "0 64 zero", allowed_clients=["127.0.0.1"])
                    + device("other", "0 64 zero", allowed_clients=["127.0.0.1"]), tcp=port)
    stay = {name: subprocess.Popen(["nbdsh", "-c", PLAIN_CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, env=dict(nbdsh_env(), URI=f"nbd://127.0.0.1:{port}/{name}"))
            for name in ("near", "other")}
    try:
        for p in stay.values():
            assert p.stdout.readline().strip() == "connected"
        d.config.write_text(d.config.read_text().replace('allowed_clients = ["127.0.0.1"]',
                                                         'allowed_clients = ["192.0.2.0/24"]', 1))
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.log.read_text(), what="the reload")
        assert log_has(d, "disconnected by reload: client (127.0.0.1, no client certificate) is not in "
                          "allowed_clients of export 'near'")
        for name, want in (("near", "cut off"), ("other", "still served")):
            stay[name].stdin.write("go\n")
            stay[name].stdin.flush()
            assert stay[name].stdout.readline().strip() == want, name
    finally:
        for p in stay.values():
            p.kill()
