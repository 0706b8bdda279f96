"""cow at scale: a 2 TiB device in 4 KiB grains (512 Mi grains) whose layers hold a few runs.
The layers' bitmaps and the owner index are runs of grains, so the daemon's memory follows
what was written, not the device's size; reads, copy-ups, zeroes, a push and a restart all
work at the far end of the device. Sparse files throughout: the test writes a few MiB."""

from __future__ import annotations

import os

import pytest
from test_cow import layer_create, message, qemu_io

from conftest import device, need, wait_for

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZE = 2 * TiB


def rss(d):
    """The daemon's resident memory, in bytes."""
    with open(f"/proc/{d.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS")


def sparse(path, size, at=None, data=b""):
    with open(path, "wb") as f:
        f.truncate(size)
        if at is not None:
            f.seek(at)
            f.write(data)
    return str(path)


def stack(tmp_path, name, size, base_data_at):
    base = sparse(tmp_path / f"{name}-base.img", size, base_data_at, b"\x42" * MiB)
    return base, layer_create(tmp_path / f"{name}-l1.layer", size)


def test_a_2_tib_stack_costs_memory_per_run_not_per_grain(make_daemon, tmp_path):
    need("qemu-io")
    if os.pathconf(tmp_path, "PC_FILESIZEBITS") < 43:
        pytest.skip("the file system cannot hold 2 TiB sparse files")
    # the same daemon on an 8 MiB stack: the memory a cow device costs whatever its size
    small_base, small_l1 = stack(tmp_path, "small", 8 * MiB, 0)
    small = make_daemon(device("d", f"0 {8 * MiB // 512} cow {small_base} 0 {small_l1}"), name="small")
    qemu_io(small.uri("d"), "write -P 1 0 64k", "read -P 1 0 64k")

    far = SIZE - 3 * GiB // 2  # base data here: a partial write copies it up
    base, l1 = stack(tmp_path, "big", SIZE, far)
    l2 = str(tmp_path / "big-l2.layer")
    d = make_daemon(device("d", f"0 {SIZE // 512} cow {base} 0 {l1}"), name="big")
    uri = d.uri("d")
    qemu_io(uri, "write -P 1 0 64k", f"write -P 2 {TiB} 4k", f"write -P 3 {far + 512} 512",
            f"write -P 4 {SIZE - 4 * KiB} 4k")
    assert "pushed" in message(d, "push", l2)  # a new 2 TiB layer, created by the push
    qemu_io(uri, f"write -P 5 {TiB + 4 * KiB} 4k", f"write -z {TiB + MiB} {GiB}", f"write -P 6 {4 * KiB} 4k")
    scattered = [(i * 61 + 7) * GiB // 4 for i in range(8)]  # first writes: a run each, in the top layer and the index
    qemu_io(uri, *[f"write -P 7 {at} 4k" for at in scattered])
    expect = ["read -P 1 0 4k", "read -P 6 4k 4k", "read -P 1 8k 56k", f"read -P 2 {TiB} 4k",
              f"read -P 5 {TiB + 4 * KiB} 4k", f"read -P 0 {TiB + 8 * KiB} {MiB - 8 * KiB}",
              f"read -P 0 {TiB + MiB} {MiB}", f"read -P 0x42 {far} 512", f"read -P 3 {far + 512} 512",
              f"read -P 0x42 {far + KiB} {MiB - KiB}", f"read -P 0 {far + MiB} 64k",
              f"read -P 4 {SIZE - 4 * KiB} 4k", f"read -P 0 {SIZE - 64 * KiB} {60 * KiB}"]
    expect += [f"read -P 7 {at} 4k" for at in scattered]
    qemu_io(uri, *expect)

    st = d.status("d")["devices"][0]["segments"][0]["status"]
    assert st["layers"] == 2 and st["index_runs"] < 100 and st["index_bytes"] < MiB, st
    grown = rss(d) - rss(small)
    print(f"RSS: 8 MiB stack {rss(small) >> 20} MiB, 2 TiB stack {rss(d) >> 20} MiB; index {st['index_runs']} runs")
    assert grown < 100 * MiB, f"a 2 TiB stack costs {grown >> 20} MiB more than an 8 MiB one"

    d.stop()  # its bits on disk; a new daemon on the pushed table reads the same
    d2 = make_daemon(device("d", f"0 {SIZE // 512} cow {base} 0 {l1} {l2}"), name="again")
    qemu_io(d2.uri("d"), *expect)
    wait_for(lambda: rss(d2) - rss(small) < 100 * MiB, 5, "a small daemon after the restart")
