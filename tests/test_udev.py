"""Disks: names looked up in sysfs (wwn:, serial:, by-id), waiting for a disk at start, and real kernel
events from loop devices (LOOP_CTL_ADD/REMOVE, losetup) when a disk goes away and comes back."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import run, wait_for

from appliance import udev

def pattern(path: Path, byte: int, size=16 << 20):
    with open(path, "wb") as f:
        f.write(bytes([byte]) * (1 << 20))
        f.truncate(size)


# ---- names --------------------------------------------------------------------


def fake_disk(root: Path, name, major, minor, wwid=None, serial=None, parts=()):
    d = root / "sys/devices/virtual/block" / name
    d.mkdir(parents=True)
    (root / "sys/class/block").mkdir(parents=True, exist_ok=True)
    (root / "sys/class/block" / name).symlink_to(d)
    (d / "uevent").write_text(f"MAJOR={major}\nMINOR={minor}\nDEVNAME={name}\nDEVTYPE=disk\n")
    (d / "size").write_text("2048\n")
    (d / "device").mkdir()
    if wwid:
        (d / "device/wwid").write_text(wwid + "\n")
    if serial:
        (d / "device/vpd_pg80").write_bytes(b"\x00\x80\x00" + bytes([len(serial)]) + serial.encode())
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev" / name).touch()
    for i in parts:
        p = d / f"{name}{i}"
        p.mkdir()
        (p / "partition").write_text(f"{i}\n")
        (p / "uevent").write_text(f"MAJOR={major}\nMINOR={minor + i}\nDEVNAME={name}{i}\nDEVTYPE=partition\n")
        (root / "sys/class/block" / f"{name}{i}").symlink_to(p)
        (root / "dev" / f"{name}{i}").touch()


def test_wwn_and_serial_names_find_the_disk_and_its_partitions_in_sysfs(tmp_path):
    """No disk here has a WWN, so this one is a sysfs tree laid out as the kernel lays out a SAS disk's."""
    fake_disk(tmp_path, "sdb", 8, 16, wwid="naa.5000c500a1b2c3d4", serial="ZFN0ABCD", parts=(1, 2))
    fake_disk(tmp_path, "sdc", 8, 32, wwid="naa.5000c500ffffffff")
    sysfs = udev.Sysfs(sys=str(tmp_path / "sys"), udevdb=str(tmp_path / "udev"), dev=str(tmp_path / "dev"))
    dev = tmp_path / "dev"
    assert sysfs.find("wwn:0x5000c500a1b2c3d4") == str(dev / "sdb")
    assert sysfs.find("wwn:0x5000C500A1B2C3D4-part2") == str(dev / "sdb2")
    assert sysfs.find("serial:ZFN0ABCD-part1") == str(dev / "sdb1")
    assert sysfs.find("serial:ZFN0ABCD") == str(dev / "sdb")
    assert sysfs.find("wwn:0x5000c500ffffffff") == str(dev / "sdc")
    assert sysfs.find("/dev/disk/by-id/wwn-0x5000c500a1b2c3d4-part1") == str(dev / "sdb1")
    assert sysfs.find("serial:NOPE") is None
    assert sysfs.find("wwn:0x5000c500a1b2c3d4-part9") is None
    # udev's database, when udevd runs, names the same disk
    (tmp_path / "udev").mkdir()
    (tmp_path / "udev/b8:32").write_text("E:ID_SERIAL_SHORT=WD-XYZ\nE:ID_WWN=0x5000c500ffffffff\n")
    assert sysfs.find("serial:WD-XYZ") == str(dev / "sdc")


def test_a_real_disks_serial_finds_its_node():
    serials = {n: udev.SYSFS.serials(n) for n in udev.SYSFS.names() if not udev.SYSFS.is_partition(n)}
    named = [(n, s) for n, ss in serials.items() for s in ss if os.path.exists(f"/dev/{n}")]
    if not named:
        pytest.skip("no block device here reports a serial number")
    name, serial = named[0]
    assert udev.find(f"serial:{serial}") == f"/dev/{name}"


def test_disk_words_are_the_table_arguments_that_name_disks():
    table = ["0 8 linear wwn:0x5 0", "8 8 linear /dev/loop3 0", "16 8 linear /var/lib/x.img 0", "24 8 linear @low 0"]
    assert udev.disk_words(table) == ["wwn:0x5", "/dev/loop3"]


# ---- waiting and hot-plug, with real loop devices ----------------------------


def test_a_device_waits_for_a_missing_disk_and_is_served_when_it_appears(make_daemon, loop, tmp_path, image):
    backing = tmp_path / "backing.img"
    pattern(backing, 0x42)
    other = image("other.img", 4 << 20)
    devices = (
        f'[[device]]\nname = "late"\ntable = ["0 32768 linear {loop.path} 0"]\n'
        f'[[device]]\nname = "upper"\ntable = ["0 32768 linear @late 0"]\n'
        f'[[device]]\nname = "now"\ntable = ["0 8192 linear {other} 0"]\n'
    )
    t0 = time.monotonic()
    d = make_daemon(devices, extra="", start=False)
    d.config.write_text(d.config.read_text().replace("[daemon]\n", "[daemon]\ndisk_timeout = 1.5\n"))
    d.start()
    assert time.monotonic() - t0 >= 1.4, "started before disk_timeout ran out"
    st = d.status()
    assert [x["name"] for x in st["devices"]] == ["now"]
    assert st["daemon"]["waiting"] == {"late": [loop.path], "upper": ["@late"]}
    assert f"late for {loop.path}" in st["daemon"]["summary"]
    # the text status, which an operator reads first, names what each waits for on a line of its own
    text = d.cli("status").stdout.splitlines()
    assert f"late: waiting for {loop.path}: not served until it is attached" in text, text
    assert "upper: waiting for @late: not served until it is attached" in text, text
    assert d.cli("status", "late").stdout.splitlines() == [f"waiting for {loop.path}: not served until it is attached"]
    run("qemu-io", "-f", "raw", "-c", "read 0 4096", d.uri("now"))

    loop.add(backing)
    wait_for(lambda: not d.status()["daemon"]["waiting"], 15, what="the waiting devices to be assembled")
    run("qemu-io", "-f", "raw", "-c", "read -P 0x42 0 65536", d.uri("upper"))
    assert "disks attached; device assembled" in d.log.read_text()


def test_a_disk_that_goes_away_fails_io_cleanly_and_is_reattached_when_it_returns(make_daemon, loop, tmp_path):
    backing = tmp_path / "backing.img"
    pattern(backing, 0)
    loop.add(backing)
    d = make_daemon(f'[[device]]\nname = "d"\ntable = ["0 32768 linear {loop.path} 0"]\n')
    run("qemu-io", "-f", "raw", "-c", "write -P 0x6b 1048576 65536", "-c", "flush", d.uri("d"))

    # the disk goes away: its capacity drops to nothing (the kernel keeps an open loop device,
    # so this is how a loop device can vanish under an opener), then it is detached and removed
    saved = tmp_path / "saved.img"
    shutil.copyfile(backing, saved)
    os.truncate(backing, 0)
    run("losetup", "-c", loop.path)
    lost = wait_for(lambda: d.status()["daemon"]["lost_disks"], 15, what="the daemon to notice the disk is gone")
    assert lost[0]["disk"] == loop.path and "shrank" in lost[0]["state"]
    assert loop.path in d.status()["daemon"]["summary"]
    assert lost[0]["devices"] == ["d"]
    # the text status says so under the device, not only its table line
    missing = f"disk {loop.path} missing: shrank to 0 bytes"
    text = d.cli("status").stdout.splitlines()
    assert [line for line in text if line.startswith(f"d: {missing}")], text
    text = d.cli("status", "d").stdout.splitlines()
    assert [line for line in text if line.startswith(missing)], text
    t = time.monotonic()
    out = run("qemu-io", "-f", "raw", "-c", "read 1048576 65536", d.uri("d"), check=False)
    assert "Input/output error" in out.stdout + out.stderr, out
    out = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", d.uri("d"), check=False)
    assert "Input/output error" in out.stdout + out.stderr, out
    assert time.monotonic() - t < 10, "failed I/O must fail, not hang"
    assert d.status("d")["devices"][0]["errors"] >= 2

    loop.remove()  # possible only because the daemon let go of it
    wait_for(lambda: not os.path.exists(loop.path), 15, what="the loop device to be removed")
    time.sleep(0.3)
    # already failed: its removal changes nothing and is not reported as a second loss
    assert "was removed" not in d.log.read_text()
    lost = d.status()["daemon"]["lost_disks"]
    assert len(lost) == 1 and "shrank" in lost[0]["state"], lost

    # it comes back, with its data
    loop.add(saved)
    wait_for(lambda: not d.status()["daemon"]["lost_disks"], 15, what="the disk to be re-attached")
    assert "is back" in d.log.read_text()
    before = d.status("d")["devices"][0]["fast_ios"]
    run("qemu-io", "-f", "raw", "-c", "read -P 0x6b 1048576 65536", "-c", "write -P 0x6c 0 4096", d.uri("d"))
    assert d.status("d")["devices"][0]["fast_ios"] > before, "the fast path serves the disk again"
    d.stop()
    with open(saved, "rb") as f:
        assert f.read(4096) == b"\x6c" * 4096
