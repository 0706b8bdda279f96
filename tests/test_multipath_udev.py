"""multipath over a disk that disappears: udev fails the path at once (not at the next probe),
and when the disk comes back it is probed and reinstated. A loop device is the disk."""

from __future__ import annotations

import os
import shutil

from conftest import device, qemu_io, run, wait_for
from conftest import need_loop
from test_udev import pattern


def _mp_status(d):
    st = d.status("mp")["devices"][0]["segments"][0]["status"]
    return {p["dev"]: p for g in st["path_groups"] for p in g["paths"]}


def test_a_path_whose_disk_goes_away_fails_at_once_and_returns_with_it(make_daemon, loop, tmp_path):
    need_loop()
    backing, other = tmp_path / "backing.img", tmp_path / "other.img"
    pattern(backing, 0x5d)
    shutil.copyfile(backing, other)  # the same storage, as a file of its own
    loop.add(backing)
    table = f"0 32768 multipath 0 0 1 1 round-robin 0 2 1 {loop.path} 1 {other} 1"
    # a checker that would take a minute: what fails and returns the path here is udev
    d = make_daemon(device("mp", table), extra="[multipath]\npolling_interval = 60\n")
    saved = tmp_path / "saved.img"
    shutil.copyfile(backing, saved)
    os.truncate(backing, 0)
    run("losetup", "-c", loop.path)
    wait_for(lambda: _mp_status(d)[loop.path]["dm_st"] == "failed", 15, "the disk's path to fail")
    assert "shrank" in _mp_status(d)[loop.path]["reason"]
    out = qemu_io(d.uri("mp"), *[f"read -P 0x5d {i * 64}k 64k" for i in range(8)]).stdout
    assert out.count("read 65536/65536") == 8 and "Pattern verification failed" not in out
    shutil.copyfile(saved, backing)
    run("losetup", "-c", loop.path)
    wait_for(lambda: _mp_status(d)[loop.path]["dm_st"] == "active", 15, "the path to be reinstated")
    before = _mp_status(d)[loop.path]["requests"]
    qemu_io(d.uri("mp"), *[f"read -P 0x5d {i * 64}k 64k" for i in range(4)])
    assert _mp_status(d)[loop.path]["requests"] > before
