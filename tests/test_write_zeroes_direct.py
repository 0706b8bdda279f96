"""WRITE_ZEROES on an O_DIRECT block device (direct = true over a loop device)."""

from __future__ import annotations

import os

import pytest

from conftest import need, run, device

MiB = 1 << 20


@pytest.fixture
def loop_device(tmp_path):
    need("losetup")
    if os.geteuid() != 0:
        pytest.skip("losetup needs root")
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xff" * (4 * MiB))
    r = run("losetup", "-f", "--show", str(backing), check=False)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    yield dev, backing
    run("losetup", "-d", dev, check=False)


def test_write_zeroes_on_a_direct_block_device_zeroes_the_range(make_daemon, loop_device):
    need("qemu-io")
    dev, backing = loop_device
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
