"""cow's merge: folding layers into the base, and a merge interrupted by kill -9, `appliance
stop` or `cancel` that resumes where it stopped. The merge is made slow with `rate=` so the
daemon dies mid-copy; the data is checked through NBD against a flat copy taken (through NBD)
before the merge, and every layer file with `appliance layer check`."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO, device, need, run, wait_for
from test_cow import layer_create, layer_info, merged, message, qemu_io

MiB = 1 << 20
SIZE = 16 * MiB


def stack(make_daemon, tmp_path, name="build"):
    """A base and four layers, l4 writable; l1..l3 hold 0x11 (all 16 MiB), 0x22 (0..12m with
    zeros at 4m..5m) and 0x33 (2m..10m). Returns the daemon, its table and the layer paths."""
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.write(b"\x42" * SIZE)
    layers = [str(tmp_path / f"l{i}.layer") for i in range(1, 5)]
    layer_create(layers[0], size=SIZE)
    table = device("d", f"0 {SIZE // 512} cow {base} 0 {' '.join(layers)}")
    d = make_daemon(device("d", f"0 {SIZE // 512} cow {base} 0 {layers[0]}"), name=name)
    for layer, cmds in zip(layers[1:], (["write -P 0x11 0 16m"],
                                        ["write -P 0x22 0 12m", "write -z 4m 1m"],
                                        ["write -P 0x33 2m 8m"])):
        qemu_io(d.uri("d"), *cmds)
        message(d, "push", layer)
    qemu_io(d.uri("d"), "write -P 0x44 9m 4k", "flush")
    d.stop()
    d.config.write_text(d.config.read_text().split("[[device]]")[0] + table)
    return d, str(base), layers


def flat_copy(d, path):
    """The device as a client reads it now, in a raw file."""
    need("qemu-img")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", d.uri("d"), str(path))
    return str(path)


def same(d, flat):
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", flat, d.uri("d"), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def cow_status(d):
    """Over the control socket itself: the CLI's start-up on a loaded machine is longer than
    a slow merge's steps."""
    from appliance.control import call

    return call(d.control, "status", name="d")["devices"][0]["segments"][0]["status"]


def progress(d):
    st = cow_status(d)
    return float(st["merge_progress"].rstrip("%")) if st.get("merge") == "running" else None


def layer_check(*paths):
    for p in paths:
        r = run(sys.executable, "-m", "appliance", "layer", "check", p, cwd=REPO, check=False)
        assert r.returncode == 0, (p, r.stderr)


def test_merge_into_the_base_by_name_and_the_stack_chains_onto_it(make_daemon, tmp_path):
    d, base, layers = stack(make_daemon, tmp_path)
    d.restart()
    flat = flat_copy(d, tmp_path / "flat.raw")
    for words, why in ((["merge", layers[1], layers[2], "base"], "not the bottom layer"),
                       (["merge", layers[0], layers[1], "/nowhere"], "is not the base"),
                       (["merge", layers[0], layers[1]], "folds it into the base")):
        r = d.cli("message", "d", "0", *words, check=False)
        assert r.returncode != 0 and why in r.stderr, (words, r.stderr)
    assert "into the base" in message(d, "merge", layers[0], layers[1], base)  # the base named by its path
    st = merged(d)
    assert st["merge"] == "done" and st["layers"] == 2, st
    assert d.cli("table", "d").stdout.split()[5:] == layers[2:]
    same(d, flat)
    d.stop()
    with open(base, "rb") as f:  # the base holds what l1 and l2 held; l2 won where both did
        data = f.read()
    assert data[:4 * MiB] == b"\x22" * 4 * MiB and data[4 * MiB:5 * MiB] == bytes(MiB)
    assert data[12 * MiB:] == b"\x11" * 4 * MiB
    layer_check(*layers)
    assert layer_info(layers[2])["parent"] != layer_info(layers[1])["uuid"]
    r = d.cli("check-config", check=False)  # the old table: l1 and l2 are in the base now
    assert r.returncode != 0 and f"layer {layers[2]}: its parent is" in r.stderr, r.stderr
    live = device("d", f"0 {SIZE // 512} cow {base} 0 {' '.join(layers[2:])}")
    d.config.write_text(d.config.read_text().split("[[device]]")[0] + live)
    d.restart()  # l3 chains onto the base now: the live table starts
    same(d, flat)
    qemu_io(d.uri("d"), "write -P 0x55 0 4k")  # and takes writes again in l4
    qemu_io(d.uri("d"), "read -P 0x55 0 4k", "read -P 0x22 4k 2044k")


@pytest.mark.parametrize("into", ["base", "layer"])
def test_a_merge_killed_with_kill_9_resumes_at_the_next_start(make_daemon, tmp_path, into):
    d, base, layers = stack(make_daemon, tmp_path)
    d.restart()
    flat = flat_copy(d, tmp_path / "flat.raw")
    words = ["1", "3", "base"] if into == "base" else ["2", "3"]  # 16 or 12 MiB at 2 MiB/s: 6-8 s
    message(d, "merge", *words, "rate=2M")
    st = wait_for(lambda: (progress(d) or 0) >= 40 and cow_status(d), 30, "40% of the merge")
    d.kill()
    assert st["merge_eta"].endswith("s"), st
    first = layers[0] if into == "base" else layers[1]
    rec = layer_info(first)["merge"]
    assert rec["running"] and rec["done_below_grain"] > 0, rec
    assert (rec["into"] == "base") == (into == "base")
    layer_check(*layers)
    d.restart()  # the config still names every layer: the merge goes on from its record
    st = cow_status(d)
    assert float(st["merge_resumed_from"].rstrip("%")) >= 20, st
    same(d, flat)  # while it runs, the stack reads the same
    st = merged(d)
    assert st["merge"] == "done" and st["layers"] == (1 if into == "base" else 2), st
    same(d, flat)
    d.stop()
    layer_check(*layers)
    assert layer_info(first)["merge"] is None
    if into == "layer":
        assert layer_info(layers[0])["uuid"] == layer_info(layers[2])["uuid"]  # l1 reads as l3 did now


def test_a_merge_stopped_or_cancelled_resumes_where_it_stopped(make_daemon, tmp_path):
    d, base, layers = stack(make_daemon, tmp_path)
    d.restart()
    flat = flat_copy(d, tmp_path / "flat.raw")
    message(d, "merge", layers[1], layers[2], "rate=1M")  # into l1: 12 MiB at 1 MiB/s
    wait_for(lambda: (progress(d) or 0) >= 20, 30, "a fifth of the merge")
    assert d.stop() == 0  # appliance stop: the copy so far is made durable and recorded
    layer_check(*layers)
    d.restart()
    first = float(cow_status(d)["merge_resumed_from"].rstrip("%"))
    assert first >= 20
    wait_for(lambda: (progress(d) or 0) >= first + 5, 30, "more of the merge")
    from appliance.control import call

    out = call(d.control, "message", name="d", sector=0, words=["cancel"])
    assert "cancelled" in str(out) and cow_status(d)["merge"] == "cancelled"
    assert not layer_info(layers[1])["merge"]["running"]
    same(d, flat)
    out = message(d, "merge", "2", "3")  # the same merge again: it goes on from the record
    resumed = float(out.split("resumed at ")[1].rstrip("%\n"))
    assert resumed >= first + 5, out
    st = merged(d)
    assert st["merge"] == "done" and st["layers"] == 2, st
    same(d, flat)
    d.stop()
    layer_check(*layers)
    assert layer_info(layers[0])["uuid"] == layer_info(layers[2])["uuid"]  # l1 reads as l3 did now


def test_a_merge_stopped_while_it_waits_for_its_rate_records_where_it_stopped(make_daemon, tmp_path):
    """A throttled merge spends most of its time waiting with none of its I/O in flight. A
    `cancel` or `appliance stop` that lands in that wait must record how far the copy got, not
    the end of what is to copy: a record that said "all done" made the next run switch the stack
    at once, and the grains past the stop, never copied, read as the layer under them. Here the
    merged grains read as zeros (pieces that complete as they are taken), so the merge is always
    in that wait when the stop comes."""
    base = tmp_path / "base.img"
    base.write_bytes(b"\x42" * SIZE)
    layers = [str(tmp_path / f"l{i}.layer") for i in range(1, 4)]
    layer_create(layers[0], size=SIZE)
    d = make_daemon(device("d", f"0 {SIZE // 512} cow {base} 0 {layers[0]}"), name="build")
    qemu_io(d.uri("d"), "write -P 0x11 0 16m")
    message(d, "push", layers[1])
    qemu_io(d.uri("d"), "write -z 0 4m")  # l2: 4 MiB of zeros over l1's 0x11
    message(d, "push", layers[2])
    d.stop()
    d.config.write_text(d.config.read_text().split("[[device]]")[0]
                        + device("d", f"0 {SIZE // 512} cow {base} 0 {' '.join(layers)}"))
    d.restart()
    flat = flat_copy(d, tmp_path / "flat.raw")
    grains = 4 * MiB // 4096
    from appliance.control import call

    message(d, "merge", "2", "2", "rate=64K")  # 4 MiB at 64 KiB/s: a minute; 64 KiB, then a second's wait
    wait_for(lambda: (progress(d) or 0) >= 1, 30, "the merge's first pieces")
    out = str(call(d.control, "message", name="d", sector=0, words=["cancel"]))
    rec = layer_info(layers[1])["merge"]
    assert not rec["running"] and 0 < rec["done_below_grain"] < grains, (out, rec)
    out = message(d, "merge", "2", "2", "rate=64K")
    resumed = float(out.split("resumed at ")[1].rstrip("%\n"))
    assert resumed < 50, out
    wait_for(lambda: (progress(d) or 0) >= resumed + 1, 30, "more of the merge")
    assert d.stop() == 0
    rec = layer_info(layers[1])["merge"]
    assert rec["running"] and 0 < rec["done_below_grain"] < grains, rec
    d.restart()
    st = cow_status(d)
    assert st["merge"] == "running" and float(st["merge_resumed_from"].rstrip("%")) < 50, st
    call(d.control, "message", name="d", sector=0, words=["cancel"])
    message(d, "merge", "2", "2")  # the rest at full speed
    st = merged(d)
    assert st["merge"] == "done" and st["layers"] == 2, st
    same(d, flat)
    d.stop()
    layer_check(*layers)
