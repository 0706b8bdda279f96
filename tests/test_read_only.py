"""read_only = true is enforced in the core, not only on the wire."""

from __future__ import annotations

import json
import subprocess

from conftest import device, nbdsh_env, need, run, wait_for

MiB = 1 << 20


def test_a_device_stacked_on_a_read_only_one_cannot_write_through_it(make_daemon, image):
    # half of `top` is a writable file, so the handshake lets writes through: the core refuses
    # those that reach the read_only device
    need("qemu-io")
    disk, other = image("disk.img", 4 * MiB), image("other.img", 4 * MiB)
    half = 2 * MiB // 512
    d = make_daemon(
        device("low", f"0 {4 * MiB // 512} linear {disk} 0", read_only=True, export=False)
        + device("top", f"0 {half} linear @low 0", f"{half} {half} linear {other} 0")
    )
    for cmd in ("write -P 0x33 0 4096", "write -z 0 4096", "discard 0 4096"):
        r = run("qemu-io", "-f", "raw", "-c", cmd, d.uri("top"), check=False)
        assert "Operation not permitted" in r.stdout + r.stderr, (cmd, r.stdout, r.stderr)
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0 0 4096", "-c", f"write -P 0x44 {2 * MiB} 4096", d.uri("top")).stdout
    assert "Pattern verification failed" not in out
    with open(disk, "rb") as f:
        assert f.read(4096) == bytes(4096)
    with open(other, "rb") as f:
        assert f.read(4096) == b"\x44" * 4096

def is_read_only(uri):
    return json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]["is_read_only"]


def test_a_device_stacked_only_on_read_only_ones_says_read_only_at_the_handshake(make_daemon, image):
    need("nbdinfo")
    disk, other = image("disk.img", 4 * MiB), image("other.img", 4 * MiB)
    half = 2 * MiB // 512
    d = make_daemon(
        device("low", f"0 {4 * MiB // 512} linear {disk} 0", read_only=True, export=False)
        + device("top", f"0 {4 * MiB // 512} linear @low 0")
        + device("topmost", f"0 {4 * MiB // 512} linear @top 0")  # read-only two levels down
        + device("mixed", f"0 {half} linear @low 0", f"{half} {half} linear {other} 0")
        + device("zeros", f"0 {4 * MiB // 512} zero")
    )
    assert is_read_only(d.uri("top")) is True
    assert is_read_only(d.uri("topmost")) is True
    assert is_read_only(d.uri("mixed")) is False, "half of it is a writable file"
    assert is_read_only(d.uri("zeros")) is False
    assert {x["name"]: x["read_only"] for x in d.status()["devices"]} == {
        "low": True, "top": True, "topmost": True, "mixed": False, "zeros": False}


def test_a_reload_making_a_lower_device_read_only_disconnects_the_clients_above_it(make_daemon, image):
    need("nbdinfo", "nbdsh")
    disk = image("disk.img", 4 * MiB)
    d = make_daemon(
        device("low", f"0 {4 * MiB // 512} linear {disk} 0", export=False)
        + device("top", f"0 {4 * MiB // 512} linear @low 0")
    )
    assert is_read_only(d.uri("top")) is False
    # a client that negotiated a writable export keeps reading until the server hangs up
    client = subprocess.Popen(
        ["nbdsh", "-u", d.uri("top"), "-c", "import time\nwhile True:\n    h.pread(512, 0)\n    time.sleep(0.02)\n"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=nbdsh_env())
    try:
        wait_for(lambda: d.status("top")["devices"][0]["clients"] == 1, what="the client connected")
        d.config.write_text(d.config.read_text().replace('export = false\n', 'export = false\nread_only = true\n', 1))
        assert d.cli("reload", check=False).returncode == 0, d.log.read_text()
        assert client.wait(15) != 0, "the client of the device made read-only from below was not disconnected"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert is_read_only(d.uri("top")) is True
