"""multipath over local paths: two `@NAME` linear devices over one file are two paths to the
same storage. dm's table and status formats, messages, groups, and merging before map."""

from __future__ import annotations

import re

from conftest import device, nbd_python, need, qemu_io, run

MiB = 1 << 20
S = 512
SIZE = 16 * MiB


def _paths(disk, mp_table, extra=""):
    """Two paths (@pa, @pb) over one file, a third (@pc) for a second group, and the map."""
    lines = "".join(device(n, f"0 {SIZE // S} linear {disk} 0", export=False) for n in ("pa", "pb", "pc"))
    return lines + device("mp", f"0 {SIZE // S} multipath {mp_table}")


def _mp(d):
    return d.status("mp")["devices"][0]["segments"][0]["status"]


def _path(st, word):
    return next(p for g in st["path_groups"] for p in g["paths"] if p["dev"] == word)


def test_table_round_trips_and_status_is_dms(make_daemon, image):
    table = "1 queue_if_no_path 0 2 1 round-robin 0 2 1 @pa 1 @pb 1 service-time 0 1 2 @pc 1 4"
    d = make_daemon(_paths(image(size=SIZE), table))
    assert d.cli("table", "mp").stdout.split("\n")[0] == f"0 {SIZE // S} multipath {table}"
    qemu_io(d.uri("mp"), "write -P 0x11 0 64k")
    line = d.cli("status", "mp").stdout.strip()
    # 2 <queue_io> <pg_init_count> <#hw_handler_args> <#groups> <current>, then each group
    assert re.fullmatch(rf"0 {SIZE // S} multipath 2 0 0 0 2 1 A 0 2 0 @pa A 0 @pb A 0 E 0 1 2 @pc A 0 0 4", line), line
    st = _mp(d)
    assert st["queueing"] == "on" and st["polling_interval"] == 5
    assert [g["dm_st"] for g in st["path_groups"]] == ["active", "enabled"]
    assert {p["dev"]: (p["dm_st"], p["chk_st"]) for g in st["path_groups"] for p in g["paths"]} == {
        "@pa": ("active", "ready"), "@pb": ("active", "ready"), "@pc": ("active", "ready")}


def test_sequential_writes_reach_the_paths_merged_with_round_robin_repeat_1(make_daemon, image, tmp_path):
    need("fio")
    d = make_daemon(_paths(image(size=SIZE), "0 0 1 1 round-robin 0 2 1 @pa 1 @pb 1"))
    r = run("fio", "--name=seq", "--ioengine=nbd", f"--uri={d.uri('mp')}", "--rw=write", "--bs=4k",
            "--iodepth=32", "--size=8M", "--verify=crc32c", "--verify_fatal=1", timeout=120, cwd=tmp_path)
    assert "err= 0" in r.stdout, r.stdout
    st = _mp(d)
    pa, pb = _path(st, "@pa"), _path(st, "@pb")
    assert pa["requests"] and pb["requests"]  # both paths took turns
    assert st["merged"] > 0
    # what reached the paths was merged: bigger than fio's 4 KiB on average (how much bigger
    # depends on how often the paths are busy: the queue merges what waits for them)
    assert pa["avg_request_bytes"] > 4096 and pb["avg_request_bytes"] > 4096, st


PACED_WRITES = """
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = nbd.Buffer.from_bytearray(bytearray(b"\\x5c" * 4096))
for i in range(64):  # one 4 KiB write every 10 ms, each after the one before it
    h.aio_pwrite(buf, i * 4096)
    due = time.monotonic() + 0.01
    while (left := due - time.monotonic()) > 0:
        h.poll(max(1, int(left * 1000)))
while h.aio_in_flight() > 0:
    h.poll(-1)
h.shutdown()
"""


def test_a_trickling_sequential_stream_reaches_a_slow_path_merged(make_daemon, image):
    # a client that sends its writes one at a time had each dispatched alone while the path
    # had room: a path 50 ms away saw 4 KiB requests. Now what continues a run still in flight
    # waits behind it and merges: about 5 writes a run
    disk = image(size=SIZE)
    slow = device("slow", f"0 {SIZE // S} delay {disk} 0 50", export=False)
    d = make_daemon(slow + device("mp", f"0 {SIZE // S} multipath 0 0 1 1 round-robin 0 1 1 @slow 1"))
    run(nbd_python(), "-c", PACED_WRITES, d.uri("mp"), timeout=60)
    p = _path(_mp(d), "@slow")
    assert p["avg_request_bytes"] >= 12 * 1024, p
    with open(disk, "rb") as f:
        assert f.read(256 * 1024) == b"\x5c" * (256 * 1024)


def test_a_failed_path_takes_no_io_until_reinstated(make_daemon, image):
    disk = image(size=SIZE)
    d = make_daemon(_paths(disk, "0 0 1 1 round-robin 0 2 1 @pa 1 @pb 1"))
    d.cli("message", "mp", "0", "fail_path", "@pa")
    st = _mp(d)
    assert _path(st, "@pa")["dm_st"] == "failed" and _path(st, "@pa")["reason"] == "failed by message"
    before = _path(st, "@pa")["requests"]
    out = qemu_io(d.uri("mp"), *[f"write -P 0x22 {i * 64}k 64k" for i in range(8)]).stdout
    assert out.count("wrote 65536/65536") == 8
    st = _mp(d)
    assert _path(st, "@pa")["requests"] == before and _path(st, "@pa")["failures"] == 1
    assert " @pa F 1 @pb A 0" in d.cli("status", "mp").stdout
    with open(disk, "rb") as f:
        assert f.read(512 * 1024) == b"\x22" * 512 * 1024
    d.cli("message", "mp", "0", "reinstate_path", "@pa")
    qemu_io(d.uri("mp"), *[f"read -P 0x22 {i * 64}k 64k" for i in range(8)])
    assert _path(_mp(d), "@pa")["requests"] > before


def test_groups_switch_disable_and_enable(make_daemon, image):
    d = make_daemon(_paths(image(size=SIZE), "0 0 2 1 round-robin 0 2 1 @pa 1 @pb 1 round-robin 0 1 1 @pc 1"))

    def served_by(*commands):
        """Which paths took requests while qemu-io ran these commands."""
        before = {p["dev"]: p["requests"] for g in _mp(d)["path_groups"] for p in g["paths"]}
        qemu_io(d.uri("mp"), *commands)
        after = {p["dev"]: p["requests"] for g in _mp(d)["path_groups"] for p in g["paths"]}
        return {w for w in after if after[w] > before[w]}

    assert served_by("read 0 64k", "read 1M 64k") == {"@pa", "@pb"}  # the second group waits
    d.cli("message", "mp", "0", "switch_group", "2")
    assert served_by("read 0 64k") == {"@pc"}
    assert [g["dm_st"] for g in _mp(d)["path_groups"]] == ["enabled", "active"]
    d.cli("message", "mp", "0", "disable_group", "2")  # a disabled group serves only as a last resort
    assert served_by("read 0 64k", "read 1M 64k") == {"@pa", "@pb"}
    assert _mp(d)["path_groups"][1]["dm_st"] == "disabled"
    d.cli("message", "mp", "0", "fail_path", "@pa")
    d.cli("message", "mp", "0", "fail_path", "@pb")
    assert served_by("read 0 64k") == {"@pc"}  # ... which it is now
    d.cli("message", "mp", "0", "enable_group", "2")
    assert _mp(d)["path_groups"][1]["dm_st"] == "active"


def test_bad_tables_and_messages_say_what_is_wrong(make_daemon, image, tmp_path):
    disk = image(size=SIZE)
    d = make_daemon(_paths(disk, "0 0 1 1 round-robin 0 2 1 @pa 1 @pb 1"))
    for table, message in [
        ("0 0 1 1 fastest 0 1 0 @pa", "unknown path selector 'fastest'; selectors: historical-service-time"),
        ("1 queue_if_no_path 0 1 2 round-robin 0 1 0 @pa", "first_group is 2 but there are 1 group(s)"),
        ("0 0 1 1 round-robin 0 2 1 @pa 1", "the table ends where a path of group 1 should be"),
        ("2 no_path_retry x 0 1 1 round-robin 0 1 0 @pa", "no_path_retry 'x' is not a number"),
        ("0 0 1 1 round-robin 0 2 0 @pa @pa", "path @pa is named twice"),
        ("0 0 1 1 service-time 0 1 2 @pa 1 200", "relative_throughput must be at most 100, got 200"),
    ]:
        r = d.cli("load", "mp", f"0 {SIZE // S} multipath {table}", check=False)
        assert r.returncode != 0 and message in r.stderr, (table, r.stderr)
        cfg = tmp_path / "check.toml"
        cfg.write_text(_paths(disk, table))
        r = d.cli("check-config", str(cfg), check=False)
        assert r.returncode == 1 and "device[3].table[0]" in r.stderr and message in r.stderr, r.stderr
    for words, message in [(["fail_path", "@nope"], "no path '@nope'; paths: @pa @pb"),
                           (["switch_group", "3"], "group 3 does not exist; there are 1"),
                           (["frobnicate", "1"], "unknown message 'frobnicate'")]:
        r = d.cli("message", "mp", "0", *words, check=False)
        assert r.returncode != 0 and message in r.stderr, r.stderr


def test_multipath_settings_are_checked(make_daemon, image, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[multipath]\npolling_interval = 0\n' + device("z", "0 8 zero"))
    d = make_daemon(device("z", "0 8 zero"))
    r = d.cli("check-config", str(cfg), check=False)
    assert r.returncode == 1 and "multipath.polling_interval: 0 must be > 0" in r.stderr, r.stderr
    cfg.write_text('[multipath]\nfailback = "sometimes"\n' + device("z", "0 8 zero"))
    r = d.cli("check-config", str(cfg), check=False)
    assert "multipath.failback: 'sometimes' is not immediate, manual, followover" in r.stderr, r.stderr


def test_failback_immediate_returns_to_the_better_group_and_manual_stays(make_daemon, image):
    disk = image(size=SIZE)
    table = "0 0 2 1 round-robin 0 1 1 @pa 1 round-robin 0 1 1 @pb 1"
    for failback, back_to in (("immediate", "@pa"), ("manual", "@pb")):
        d = make_daemon(_paths(disk, table), name=failback, extra=f'[multipath]\nfailback = "{failback}"\n')
        qemu_io(d.uri("mp"), "read 0 64k")
        d.cli("message", "mp", "0", "fail_path", "@pa")
        qemu_io(d.uri("mp"), "read 0 64k")  # group 2 takes over
        d.cli("message", "mp", "0", "reinstate_path", "@pa")
        before = {p["dev"]: p["requests"] for g in _mp(d)["path_groups"] for p in g["paths"]}
        qemu_io(d.uri("mp"), "read 0 64k", "read 1M 64k")
        after = {p["dev"]: p["requests"] for g in _mp(d)["path_groups"] for p in g["paths"]}
        assert {w for w in after if after[w] > before[w]} == {back_to}, (failback, before, after)
        d.stop()
