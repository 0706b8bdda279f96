"""WRITE_ZEROES on an O_DIRECT block device (direct = true over a loop device)."""

from __future__ import annotations

import os

from conftest import device, need, run

MiB = 1 << 20


def test_write_zeroes_on_a_direct_block_device_zeroes_the_range(make_daemon, loop, tmp_path):
    need("qemu-io")
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xff" * (4 * MiB))
    loop.add(backing)
    dev = loop.path
    d = make_daemon(device("z", f"0 {4 * MiB // 512} linear {dev} 0", direct=True))
    out = run("qemu-io", "-f", "raw", "-c", f"write -z {MiB} 65536", d.uri("z")).stdout
    assert "wrote 65536" in out, out
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)  # what reached the device, not a cache
    try:
        import mmap

        buf = mmap.mmap(-1, 3 * 65536)
        os.preadv(fd, [buf], MiB - 65536)
    finally:
        os.close(fd)
    assert buf[:65536] == b"\xff" * 65536
    assert buf[65536 : 2 * 65536] == bytes(65536)
    assert buf[2 * 65536 :] == b"\xff" * 65536
