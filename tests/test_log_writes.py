"""log-writes (dm-log-writes): every write, flush and FUA that completes below is logged in order;
`appliance log-writes replay` rebuilds the device as it was at a flush or a mark.

Each test drives a real daemon with nbdsh or qemu-io and reads the log with the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, device, need, nbdsh_env, replay_log

MiB = 1 << 20
SECTORS = 8 * MiB // 512


def nbdsh(uri, body, wait=False):
    """Run an nbdsh script; with wait=True it prints 'ready' and sleeps until killed (a client
    whose unflushed writes must not count)."""
    need("nbdsh")
    code = body + ("\nprint('ready', flush=True)\nimport time\ntime.sleep(60)\n" if wait else "")
    p = subprocess.Popen(["nbdsh", "-u", uri, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=nbdsh_env())
    if wait:
        line = p.stdout.readline().strip()
        assert line == "ready", p.stderr.read() if p.poll() is not None else line
        return p
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return out


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "appliance", "log-writes", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def entries(log):
    return json.loads(cli("list", "--json", log).stdout)


def replayed(log, tmp_path, *flags, name="replayed.img"):
    return replay_log(log, tmp_path / name, *flags, size=8 * MiB)


def logged(make_daemon, image, log_size=32 * MiB):
    disk, log = image("disk.img", 8 * MiB), image("log.img", log_size)
    d = make_daemon(device("data0", f"0 {SECTORS} log-writes {disk} {log}"))
    return d, disk, log


def test_the_log_records_writes_flushes_fua_zeroes_and_discards_in_completion_order(make_daemon, image):
    d, disk, log = logged(make_daemon, image)
    nbdsh(d.uri("data0"), """
h.pwrite(b"\\x11" * 4096, 0)
h.pwrite(b"\\x22" * 1000, 8192 + 3)
h.flush()
h.pwrite(b"\\x33" * 4096, 16384, nbd.CMD_FLAG_FUA)
h.zero(8192, 65536)
h.trim(4096, 131072)
h.flush()
""")
    got = [(e["kind"], e["offset"], e["length"], e["flags"]) for e in entries(log)["entries"]]
    assert got == [
        ("write", 0, 4096, "-"),
        ("write", 8195, 1000, "-"),
        ("flush", 0, 0, "flush"),
        ("write", 16384, 4096, "fua"),  # a FUA write is logged when it completes
        ("zeroes", 65536, 8192, "zeroes"),
        ("discard", 131072, 4096, "discard"),
        ("flush", 0, 0, "flush"),
    ]
    st = d.status("data0")["devices"][0]["segments"][0]["status"]
    assert st["entries"] == 7 and st["log_full"] is False and st["logging"] is True
    text = cli("list", log).stdout
    assert "16384" in text and "fua" in text and "sector" in text.splitlines()[0]


def test_replay_to_the_last_flush_holds_exactly_what_a_flushing_client_had_acknowledged(make_daemon, image, tmp_path):
    """32 writes in flight, a flush, then more writes never flushed; kill -9. The replay to the last
    flush has every write acknowledged before the flush and none after, though the page cache has both."""
    d, disk, log = logged(make_daemon, image)
    client = nbdsh(d.uri("data0"), """
cookies = [h.aio_pwrite(bytes([i + 1]) * 65536, i * 65536) for i in range(32)]
while h.aio_in_flight() > 0:
    h.poll(1000)
assert all(h.aio_command_completed(c) for c in cookies)
h.flush()
h.pwrite(b"\\xee" * 65536, 0)           # acknowledged, never flushed
h.pwrite(b"\\xee" * 65536, 4 * 1048576)
""", wait=True)
    try:
        d.kill()
    finally:
        client.kill()
        client.wait()
    image_ = replayed(log, tmp_path, "--last-flush")
    for i in range(32):
        assert image_[i * 65536 : (i + 1) * 65536] == bytes([i + 1]) * 65536, f"write {i} missing"
    assert image_[4 * MiB : 4 * MiB + 65536] == bytes(65536)
    with open(disk, "rb") as f:  # the page cache has the unflushed write: that proves nothing
        assert f.read(65536) == b"\xee" * 65536


def test_qemu_io_writes_and_flushes_replay_in_order(make_daemon, image, tmp_path):
    need("qemu-io")
    d, disk, log = logged(make_daemon, image)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", "-c", "flush",
                    "-c", "write -P 0x62 32k 64k", "-c", "flush", d.uri("data0")], check=True, capture_output=True)
    first = replayed(log, tmp_path, "--to-flush", "1", name="first.img")
    assert first[:65536] == b"\x61" * 65536 and first[65536:98304] == bytes(32768)
    second = replayed(log, tmp_path, "--to-flush", "2", name="second.img")
    assert second[:32768] == b"\x61" * 32768 and second[32768:98304] == b"\x62" * 65536


def test_marks_name_points_a_replay_can_stop_at(make_daemon, image, tmp_path):
    d, disk, log = logged(make_daemon, image)
    uri = d.uri("data0")
    nbdsh(uri, 'h.pwrite(b"\\xa1" * 4096, 0)\nh.flush()')
    assert "entry 2" in d.cli("message", "data0", "0", "mark", "first").stdout
    nbdsh(uri, 'h.pwrite(b"\\xa2" * 4096, 0)\nh.pwrite(b"\\xa2" * 4096, 8192)\nh.flush()')
    d.cli("message", "data0", "0", "mark", "second")
    nbdsh(uri, 'h.pwrite(b"\\xa3" * 4096, 0)\nh.flush()')
    marks = [e["mark"] for e in entries(log)["entries"] if e["kind"] == "mark"]
    assert marks == ["first", "second"]
    at_first = replayed(log, tmp_path, "--end-mark", "first", name="1.img")
    assert at_first[:4096] == b"\xa1" * 4096 and at_first[8192:12288] == bytes(4096)
    at_second = replayed(log, tmp_path, "--to", "second", name="2.img")
    assert at_second[:4096] == b"\xa2" * 4096 and at_second[8192:12288] == b"\xa2" * 4096
    assert replayed(log, tmp_path, name="all.img")[:4096] == b"\xa3" * 4096
    r = cli("replay", log, tmp_path / "x.img", "--end-mark", "third", check=False)
    assert r.returncode == 1 and "no mark named 'third'" in r.stderr
    r = d.cli("message", "data0", "0", "mark", check=False)
    assert r.returncode != 0 and "mark <name>" in r.stderr


def test_a_full_log_says_so_in_status_and_io_goes_on(make_daemon, image, tmp_path):
    d, disk, log = logged(make_daemon, image, log_size=80 * 1024)  # room for one 64 KiB write
    out = nbdsh(d.uri("data0"), """
for i in range(4):
    h.pwrite(bytes([0x40 + i]) * 65536, i * 65536)
    h.flush()
print(all(h.pread(65536, i * 65536) == bytes([0x40 + i]) * 65536 for i in range(4)))
""")
    assert out.strip() == "True"  # no client I/O failed because the log is full
    st = d.status("data0")["devices"][0]["segments"][0]["status"]
    assert st["log_full"] is True and st["logging"] is False and "full" in st["error"]
    assert "log_full=yes" in d.cli("status", "data0").stdout
    listed = entries(log)
    assert listed["full"] is True
    assert [e["kind"] for e in listed["entries"]] == ["write", "flush"]
    r = cli("replay", log, tmp_path / "r.img", "--last-flush")
    assert "filled up" in r.stderr
    assert "log device full" in d.log.read_text()


def test_a_bad_log_is_refused_with_what_is_wrong(make_daemon, image, tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x07" * 4096)
    r = cli("list", junk, check=False)
    assert r.returncode == 1 and "not a log-writes log (bad magic" in r.stderr
    r = cli("list", tmp_path / "missing.img", check=False)
    assert r.returncode == 1 and "cannot open" in r.stderr

    d, disk, log = logged(make_daemon, image)
    nbdsh(d.uri("data0"), 'h.pwrite(b"\\x01" * 65536, 0)\nh.flush()')
    d.stop()  # the stop flushes too: write, flush, flush
    # a mistyped disk is not created as a regular file in /dev
    r = cli("replay", log, "/dev/sdzz-not-a-disk", check=False)
    assert r.returncode == 1 and "no such device" in r.stderr and not os.path.exists("/dev/sdzz-not-a-disk")
    with open(log, "r+b") as f:  # cut the log inside its first entry's data
        f.truncate(4096)
    r = cli("replay", log, tmp_path / "r.img", check=False)
    assert r.returncode == 1 and "entry 0 of 3" in r.stderr and "past the end" in r.stderr
    r = cli("replay", log, tmp_path / "r.img", "--to-flush", "3", check=False)
    assert r.returncode == 1


def test_the_constructor_refuses_a_log_it_cannot_use(make_daemon, image):
    disk, log, tiny = image("disk.img", 8 * MiB), image("log.img", MiB), image("tiny.img", 512)
    d = make_daemon(device("data0", f"0 {SECTORS} linear {disk} 0"))
    for args, why in ((f"{disk} {disk}", "is the device being logged"),
                      (f"{disk} @data0", "must be a file or disk, not a mapped device"),
                      (f"{disk} {tiny}", "is too small"),
                      (f"{disk}", "takes <dev> <log_dev>")):
        r = d.cli("load", "data0", f"0 {SECTORS} log-writes {args}", check=False)
        assert r.returncode != 0 and why in r.stderr, (args, r.stderr)


def test_a_write_that_completes_while_a_flush_is_in_flight_belongs_to_the_next_flush(make_daemon, image, tmp_path):
    """dm's rule: a flush makes durable the writes completed before it was issued. The disk's
    flushes take 300 ms here (delay), so a write issued after the flush completes first."""
    disk, log = image("disk.img", 8 * MiB), image("log.img", 32 * MiB)
    d = make_daemon(
        device("slow", f"0 {SECTORS} delay {disk} 0 0 {disk} 0 0 {disk} 0 300", export=False)
        + device("data0", f"0 {SECTORS} log-writes @slow {log}")
    )
    nbdsh(d.uri("data0"), """
h.pwrite(b"\\x01" * 4096, 0)
flush = h.aio_flush()
h.pwrite(b"\\x02" * 4096, 4096)   # acknowledged while the flush is still in flight
assert not h.aio_command_completed(flush)
while not h.aio_command_completed(flush):
    h.poll(1000)
h.flush()
""")
    got = [(e["kind"], e["offset"]) for e in entries(log)["entries"]]
    assert got == [("write", 0), ("flush", 0), ("write", 4096), ("flush", 0)]
    first = replayed(log, tmp_path, "--to-flush", "1")
    assert first[:4096] == b"\x01" * 4096 and first[4096:8192] == bytes(4096)


def test_a_restart_after_a_crash_appends_to_the_log_instead_of_wiping_it(make_daemon, image, tmp_path):
    """Restart=on-failure must not erase the record of what was durable before the crash: the new
    run appends after a `session-2` mark, and a replay can stop at either run's end."""
    d, disk, log = logged(make_daemon, image)
    nbdsh(d.uri("data0"), 'h.pwrite(b"\\xc1" * 4096, 0)\nh.flush()')
    d.kill()
    before = [(e["kind"], e["offset"]) for e in entries(log)["entries"]]
    assert before == [("write", 0), ("flush", 0)]
    d.restart()
    nbdsh(d.uri("data0"), 'h.pwrite(b"\\xc2" * 4096, 8192)\nh.flush()')
    d.kill()
    listed = entries(log)["entries"]
    assert [(e["kind"], e["offset"]) for e in listed[:2]] == before, "the first run's entries were lost"
    assert (listed[2]["kind"], listed[2]["mark"]) == ("mark", "session-2")
    assert [(e["kind"], e["offset"]) for e in listed[3:]] == [("write", 8192), ("flush", 0)]
    first_run = replayed(log, tmp_path, "--end-mark", "session-2", name="1.img")
    assert first_run[:4096] == b"\xc1" * 4096 and first_run[8192:12288] == bytes(4096)
    both = replayed(log, tmp_path, "--last-flush", name="2.img")
    assert both[:4096] == b"\xc1" * 4096 and both[8192:12288] == b"\xc2" * 4096
    d.restart()  # a third run counts on
    assert [e["mark"] for e in entries(log)["entries"] if e["kind"] == "mark"] == ["session-2", "session-3"]


def test_a_log_that_cannot_be_continued_refuses_the_table_and_stays_as_it_is(make_daemon, image, tmp_path):
    d, disk, log = logged(make_daemon, image)
    nbdsh(d.uri("data0"), 'h.pwrite(b"\\x01" * 65536, 0)\nh.flush()')
    d.stop()
    other = tmp_path / "other.log"
    with open(log, "rb") as f, open(other, "wb") as g:
        g.write(f.read(4096))  # the superblock and a first entry cut inside its data
    kept = other.read_bytes()
    d.config.write_text(d.config.read_text().replace(log, str(other)))
    with pytest.raises(RuntimeError) as refused:
        d.restart()
    text = str(refused.value)
    assert "holds a log it cannot continue" in text and "entry 0 of" in text and "zero its first sector" in text, text
    assert other.read_bytes() == kept
