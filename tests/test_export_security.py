"""Who may reach an export: the unix socket's mode and group, and a TCP listener other machines
can reach (refused unless `insecure = true`, and then reported as insecure). Traffic goes to
127.0.0.1 only, also to a listener bound to 0.0.0.0."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

import certs
from conftest import REPO, device, need, run, wait_for
from nut import free_port

SIZE = 8 << 20


def data0(disk):
    return device("data0", f"0 {SIZE // 512} linear {disk} 0")


def test_the_unix_socket_gets_its_mode_and_group_and_a_reload_changes_them(make_daemon, image):
    if os.geteuid() != 0:
        pytest.skip("giving the socket another group needs root")
    d = make_daemon(data0(image()), extra='unix_mode = "0640"\nunix_group = "disk"\n')
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == 6
    d.config.write_text(d.config.read_text().replace('"0640"', '"0600"').replace('"disk"', "0"))
    d.signal(signal.SIGHUP)
    wait_for(lambda: stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600 and os.stat(d.socket).st_gid == 0,
             what="the reload's mode and group on the socket")
    need("nbdinfo")
    assert run("nbdinfo", "--size", d.uri("data0")).stdout.strip() == str(SIZE)


def test_a_listener_other_machines_reach_is_refused_at_start_without_insecure(make_daemon, image):
    port = free_port()
    d = make_daemon(data0(image()), extra=f'tcp = "0.0.0.0:{port}"\n', start=False)
    r = subprocess.run([sys.executable, "-m", "appliance", "check-config", str(d.config)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "export: tcp = \"0.0.0.0:" in r.stderr and "insecure = true" in r.stderr
    d.start(expect_ready=False)
    assert d.proc.wait(30) != 0
    assert "reachable from other machines" in d.log.read_text()


def test_insecure_true_serves_and_says_so_in_log_and_status(make_daemon, image):
    port = free_port()
    d = make_daemon(data0(image()), extra=f'tcp = "0.0.0.0:{port}"\ninsecure = true\n')
    assert f"export tcp:0.0.0.0:{port} is INSECURE" in d.log.read_text()
    assert d.status()["daemon"]["insecure_exports"] == [f"tcp:0.0.0.0:{port}"]
    assert f"export tcp:0.0.0.0:{port}: INSECURE" in d.cli("status").stdout
    need("nbdinfo")
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/data0").stdout.strip() == str(SIZE)


def test_loopback_tcp_is_not_reported_insecure(make_daemon, image):
    d = make_daemon(data0(image()), tcp=free_port())
    assert d.status()["daemon"]["insecure_exports"] == []
    assert "INSECURE" not in d.cli("status").stdout + d.log.read_text()


def test_check_config_and_serve_refuse_a_key_that_is_not_the_certificates(make_daemon, image, tmp_path):
    need("openssl")
    ca = certs.make_ca(tmp_path / "ca")
    server = certs.server_dir(ca, tmp_path / "server")
    (server / "server-key.pem").write_bytes((ca / "ca-key.pem").read_bytes())  # another key
    d = make_daemon(data0(image()), extra=f'tls = "require"\ntls_certificates = "{server}"\n',
                    tcp=free_port(), start=False)
    r = subprocess.run([sys.executable, "-m", "appliance", "check-config", str(d.config)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"export.tls_certificates: cannot use {server}:" in r.stderr, r.stderr
    d.start(expect_ready=False)
    assert d.proc.wait(30) != 0
    assert f"cannot use {server}" in d.log.read_text()
