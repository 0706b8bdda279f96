"""The daemon starts on a config, and a real client reads back what it wrote."""

from conftest import need, run


def test_qemu_io_writes_and_reads_back_a_pattern(make_daemon, image):
    need("qemu-io")
    disk = image()
    d = make_daemon(f'[[device]]\nname = "data0"\ntable = ["0 131072 linear {disk} 0"]\n')
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 65536", "-c", "read -P 0x5a 4096 65536", d.uri("data0")).stdout
    assert "Pattern verification failed" not in out
    with open(disk, "rb") as f:
        f.seek(4096)
        assert f.read(65536) == b"\x5a" * 65536
