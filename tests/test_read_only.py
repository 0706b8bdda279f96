"""read_only = true is enforced in the core, not only on the wire."""

from __future__ import annotations

from conftest import need, run, device

MiB = 1 << 20


def test_a_device_stacked_on_a_read_only_one_cannot_write_through_it(make_daemon, image):
    need("qemu-io")
    disk = image("disk.img", 4 * MiB)
    d = make_daemon(
        device("low", f"0 {4 * MiB // 512} linear {disk} 0", read_only=True, export=False)
        + device("top", f"0 {4 * MiB // 512} linear @low 0")
    )
    for cmd in ("write -P 0x33 0 4096", "write -z 0 4096", "discard 0 4096"):
        r = run("qemu-io", "-f", "raw", "-c", cmd, d.uri("top"), check=False)
        assert "Operation not permitted" in r.stdout + r.stderr, (cmd, r.stdout, r.stderr)
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0 0 4096", d.uri("top")).stdout
    assert "Pattern verification failed" not in out
    with open(disk, "rb") as f:
        assert f.read(4096) == bytes(4096)
