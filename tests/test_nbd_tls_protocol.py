"""NBD_OPT_STARTTLS in the sans-IO server handshake, with Python's TLS client over memory BIOs
(the real-client tests are in test_export_tls.py)."""

from __future__ import annotations

import ssl

import pytest

import certs
from appliance.nbd import constants as C
from appliance.nbd import tls as nbd_tls
from appliance.nbd.protocol import ExportSelected, RemoteProtocolError
from conftest import need
from test_nbd_protocol import FLAGS, feed, go_data, make_server, opt, replies, step, types


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    need("openssl")
    base = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(base / "ca")
    return {"server": certs.server_dir(ca, base / "server"), "ca": ca}


def server(pki, required):
    return make_server(tls=nbd_tls.context(str(pki["server"]), False), tls_required=required)


def starttls(srv, pki, before=b""):
    """Client flags, `before` (options in clear), STARTTLS and the TLS handshake. -> (client
    SSLObject, its BIOs, the server's replies in clear)."""
    _, clear = feed(srv, FLAGS + before + opt(C.NBD_OPT_STARTTLS))
    ctx = ssl.create_default_context(cafile=str(pki["ca"] / "ca-cert.pem"))
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = ctx.wrap_bio(cin, cout, server_hostname="127.0.0.1")
    for _ in range(20):
        try:
            cli.do_handshake()
            break
        except ssl.SSLWantReadError:
            srv.receive_data(cout.read())
            assert step(srv) is None
            cin.write(srv.data_to_send())
    else:
        raise AssertionError("TLS handshake did not finish")
    srv.receive_data(cout.read())
    return cli, cin, cout, clear


def over_tls(srv, cli, cin, cout, data):
    """Send `data` through TLS; -> (server event or None, the plaintext it answered)."""
    cli.write(data)
    srv.receive_data(cout.read())
    event = step(srv)
    cin.write(srv.data_to_send())
    out = b""
    while True:
        try:
            out += cli.read(65536)
        except ssl.SSLWantReadError:
            return event, out


def test_require_answers_options_before_tls_with_tls_reqd(pki):
    _, out = feed(server(pki, True), FLAGS + opt(C.NBD_OPT_LIST) + opt(C.NBD_OPT_GO, go_data("disk0")))
    assert types(out) == [(C.NBD_OPT_LIST, C.NBD_REP_ERR_TLS_REQD), (C.NBD_OPT_GO, C.NBD_REP_ERR_TLS_REQD)]


def test_require_hangs_up_on_export_name_without_tls(pki):
    with pytest.raises(RemoteProtocolError, match="EXPORT_NAME without TLS"):
        feed(server(pki, True), FLAGS + opt(C.NBD_OPT_EXPORT_NAME, b"disk0"))


def test_after_starttls_haggling_starts_over_and_go_is_served_over_tls(pki):
    srv = server(pki, False)
    cli, cin, cout, clear = starttls(srv, pki, before=opt(C.NBD_OPT_STRUCTURED_REPLY))
    assert types(clear) == [(C.NBD_OPT_STRUCTURED_REPLY, C.NBD_REP_ACK), (C.NBD_OPT_STARTTLS, C.NBD_REP_ACK)]
    assert cli.version() in ("TLSv1.2", "TLSv1.3")
    event, out = over_tls(srv, cli, cin, cout, opt(C.NBD_OPT_STARTTLS))
    assert event is None and types(out, 0) == [(C.NBD_OPT_STARTTLS, C.NBD_REP_ERR_INVALID)]
    event, out = over_tls(srv, cli, cin, cout, opt(C.NBD_OPT_GO, go_data("disk0")))
    assert isinstance(event, ExportSelected) and event.export.name == "disk0"
    assert not event.structured_replies  # negotiated in clear: forgotten
    assert [t for _, t, _ in replies(out, 0)][-1] == C.NBD_REP_ACK


def test_a_client_speaking_plaintext_after_starttls_fails_the_tls_handshake(pki):
    srv = server(pki, True)
    feed(srv, FLAGS + opt(C.NBD_OPT_STARTTLS))
    srv.receive_data(opt(C.NBD_OPT_GO, go_data("disk0")))
    with pytest.raises(RemoteProtocolError, match="TLS handshake failed"):
        step(srv)

