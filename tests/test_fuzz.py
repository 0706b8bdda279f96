"""The fuzzer's short run (tests/fuzz/nbd_fuzz.py): the handshake, in clear and inside TLS,
coverage-guided in process; the transmission phase against a real daemon, in clear and over
TLS, while a canary client on another export must see every byte it wrote."""

from __future__ import annotations

import ssl

import pytest

import certs
from conftest import device, need
from fuzz.nbd_fuzz import Canary, Crash, HandshakeFuzzer, TransmissionFuzzer
from nut import free_port

from appliance.nbd.tls import context

SIZE = 16 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    need("openssl")
    base = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(base / "ca")
    client = certs.client_dir(ca, base / "client")
    cctx = ssl.create_default_context(cafile=str(client / "ca-cert.pem"))
    cctx.load_cert_chain(str(client / "client-cert.pem"), str(client / "client-key.pem"))
    return certs.server_dir(ca, base / "server"), cctx


def test_handshake_fuzz_short_run(pki):
    server, cctx = pki
    fuzzer = HandshakeFuzzer(context(str(server), False), cctx, seed=14)
    try:
        n = fuzzer.run(execs=2000, seconds=8)
    except Crash as c:
        raise AssertionError(f"{c}\ninput: {c.case!r}") from c
    assert n >= 200
    assert len(fuzzer.seen) > 300  # it reached well into the state machine, TLS included


def test_transmission_fuzz_short_run_leaves_daemon_and_other_clients_unharmed(make_daemon, image, pki):
    server, cctx = pki
    port = free_port()
    d = make_daemon(device("fuzz", f"0 {SIZE // 512} linear {image('fuzz.img', SIZE)} 0")
                    + device("canary", f"0 {SIZE // 512} linear {image('canary.img', SIZE)} 0"),
                    extra=f'tls = "on"\ntls_certificates = "{server}"\n', tcp=port)
    canary = Canary(d.socket, "canary", SIZE)
    canary.start()
    plain = TransmissionFuzzer(d.socket, "fuzz", SIZE, seed=14)
    tls = TransmissionFuzzer(("127.0.0.1", port), "fuzz", SIZE, tls=cctx, seed=15)
    plain.run(streams=60, seconds=6)
    tls.run(streams=20, seconds=4)
    canary.stop()
    assert plain.streams >= 10 and tls.streams >= 5 and canary.rounds > 0
    assert d.proc.poll() is None
    assert "Traceback" not in d.log.read_text()
