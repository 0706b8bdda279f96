"""Test certificates made with openssl: a CA, a server certificate for 127.0.0.1 and client
certificates, laid out as nbdkit (server) and libnbd/qemu (client) read them."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import run


def _key_and_csr(d: Path, name: str, cn: str):
    run("openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}-key.pem"),
        "-out", str(d / f"{name}.csr"), "-subj", f"/CN={cn}")


def _sign(ca: Path, d: Path, name: str, days: int, ext: str):
    (d / f"{name}.ext").write_text(ext)
    run("openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(ca / "ca-cert.pem"),
        "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-out", str(d / f"{name}-cert.pem"),
        "-days", str(days), "-extfile", str(d / f"{name}.ext"))


def make_ca(d: Path, cn="appliance test CA") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca-key.pem"),
        "-out", str(d / "ca-cert.pem"), "-days", "2", "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return d


def server_dir(ca: Path, d: Path, usage="serverAuth") -> Path:
    """nbdkit's --tls-certificates layout, for 127.0.0.1."""
    d.mkdir(parents=True, exist_ok=True)
    _key_and_csr(d, "server", "127.0.0.1")
    _sign(ca, d, "server", 2, f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
    shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")
    return d


def client_dir(ca: Path, d: Path, cn="client1", days=2, trust: Path | None = None) -> Path:
    """libnbd's tls-certificates layout: ca-cert.pem (whom to trust: `trust`'s CA, default `ca`),
    client-cert.pem, client-key.pem signed by `ca`."""
    d.mkdir(parents=True, exist_ok=True)
    _key_and_csr(d, "client", cn)
    _sign(ca, d, "client", days, "extendedKeyUsage=clientAuth\n")
    shutil.copy((trust or ca) / "ca-cert.pem", d / "ca-cert.pem")
    return d
