"""BLOCK_STATUS passes the gate like any request: held while the device is suspended."""

from __future__ import annotations

import subprocess
import time

from conftest import need, device

MiB = 1 << 20


def test_block_status_waits_for_resume_while_the_device_is_suspended(make_daemon, image):
    need("nbdinfo")
    disk = image("disk.img", 4 * MiB)
    with open(disk, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x01" * MiB)
    d = make_daemon(device("bs", f"0 {4 * MiB // 512} linear {disk} 0"))
    d.cli("suspend", "bs")
    mapper = subprocess.Popen(["nbdinfo", "--map", d.uri("bs")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        while d.status("bs")["devices"][0]["deferred"] < 1:
            assert mapper.poll() is None, "block status was answered while the device was suspended"
            assert time.monotonic() < deadline, "the block status request never reached the device"
            time.sleep(0.1)
        time.sleep(0.3)
        assert mapper.poll() is None, "block status was answered while the device was suspended"
        d.cli("resume", "bs")
        out, _ = mapper.communicate(timeout=20)
    finally:
        if mapper.poll() is None:
            mapper.kill()
            mapper.wait()
    assert mapper.returncode == 0, out
    assert "data" in out and "hole" in out, out
