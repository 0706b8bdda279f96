"""A request split across segments completes once, with the first error of any piece."""

from __future__ import annotations

from conftest import need, run, device

SECTORS = 16


def test_a_write_spanning_a_delay_and_an_error_segment_fails_with_eio(make_daemon, image):
    need("qemu-io")
    disk = image("disk.img", 1 << 20)
    d = make_daemon(device("d", f"0 8 delay {disk} 0 50", f"8 8 error"))
    for _ in range(5):  # the lost error was a race: try it a few times
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 8192", d.uri("d"), check=False)
        assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
    # the piece on the delay segment was written even though the request failed
    with open(disk, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
