"""mirror: two or more legs with a dirty-region log. Real legs (files, nbdkit exports), real
clients (fio, qemu-io), real crashes (SIGKILL of nbdkit and of the daemon)."""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from appliance.targets import TargetError
from appliance.targets.mirror import table
from conftest import REPO, device, nbdsh_env, need, qemu_io, remote, replay_log, run, wait_for

MiB = 1 << 20
S = 512
REGION = MiB  # the tests' region size


def mirror_line(size, legs, log="core 2 2048 nosync", features="2 handle_errors keep_log"):
    words = " ".join(f"{leg} 0" for leg in legs)
    return f"0 {size // S} mirror {log} {len(legs)} {words} {features}".rstrip()


def mstatus(d, name="m"):
    return d.status(name)["devices"][0]["segments"][0]["status"]


def in_sync(d, name="m"):
    st = mstatus(d, name)
    return st["in_sync_regions"] == st["total_regions"] and all(x["state"] == "alive" for x in st["legs"])


def fio(uri, tmp_path, *extra, background=False, offset=0, size=8 * MiB):
    need("fio")
    args = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--iodepth=16",
            f"--offset={offset}", f"--size={size}", "--verify=crc32c", "--verify_fatal=1", *extra]
    if background:  # fio leaves its verify state file in the working directory
        return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return run(*args, cwd=tmp_path, timeout=120)


def read_file(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def poke(path, offset, data):
    """Change a leg behind the daemon's back."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# ------------------------------------------------------------------ the table

@pytest.mark.parametrize("args, message", [
    ("core 1 2048 1 a 0", "#legs must be at least 2"),
    ("core 1 2048 2 a 0", "#legs says 2"),
    ("core 1 2047 2 a 0 b 0", "multiple of 8 sectors"),
    ("core 2 2048 fast 2 a 0 b 0", "sync or nosync"),
    ("disk 1 2048 2 a 0 b 0", "the disk log takes <log_dev> <region_size>"),
    ("ram 1 2048 2 a 0 b 0", "unknown mirror log type 'ram'"),
    ("core 1 2048 2 a 0 a 0", "leg a is named twice"),
    ("disk 2 a 2048 2 a 0 b 0", "the log device a is also a leg"),
    ("core 1 2048 2 a 0 b 0 1 fast", "unknown mirror feature 'fast'"),
    ("core 1 2048 2 a 0 b 0 1 keep_log", "keep_log needs handle_errors"),
])
def test_bad_tables_say_what_is_wrong(args, message):
    with pytest.raises(TargetError, match=message):
        table.parse(args.split())


def test_parse_names_the_legs_and_the_log_device_as_devices():
    p = table.parse("disk 3 /l 2048 sync 2 /a 8 nbd+unix:///?socket=/s 0 1 handle_errors".split())
    assert [d.word for d in p.devices] == ["/a", "nbd+unix:///?socket=/s", "/l"]
    assert p.legs[0].offset == 8 * S and p.region_size == MiB and p.sync == "sync"


def test_check_config_refuses_a_log_device_too_small(make_daemon, image, tmp_path):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    small = tmp_path / "log.img"
    small.write_bytes(b"")
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b], log=f"disk 2 {small} 2048")), start=False)
    r = d.cli("check-config", check=False)
    assert r.returncode != 0 and f"device {small} is too small" in r.stderr, r.stderr


# ------------------------------------------------------------- writes and reads

def test_fio_verified_writes_land_on_both_legs_byte_for_byte(make_daemon, image, tmp_path):
    a, b = image("a.img", 16 * MiB), image("b.img", 16 * MiB)
    logdev = image("log.img", MiB)
    d = make_daemon(device("m", mirror_line(16 * MiB, [a, b], log=f"disk 3 {logdev} 2048 nosync")))
    r = fio(d.uri("m"), tmp_path, "--rw=randwrite")
    assert "err= 0" in r.stdout, r.stdout
    assert read_file(a) == read_file(b)
    st = mstatus(d)
    assert [x["state"] for x in st["legs"]] == ["alive", "alive"]
    # 2048 client writes, far fewer log writes: marks are batched, clears lazy
    assert 0 < st["log"]["log_writes"] < 500, st["log"]
    assert "2 " + a + " " + b + " 16/16 1 AA 3 disk " + logdev + " A" in d.cli("status", "m").stdout


def test_a_new_mirror_copies_the_first_leg_to_the_others(make_daemon, image):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    poke(a, 3 * MiB + 100, b"\x5a" * 5000)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b], log="core 1 2048")))
    wait_for(lambda: in_sync(d), 20, "the initial sync")
    assert read_file(a) == read_file(b)
    assert mstatus(d)["resynced_regions"] == 8
    assert "read 5000/5000" in qemu_io(d.uri("m"), f"read -P 0x5a {3 * MiB + 100} 5000").stdout


def test_the_resync_copies_in_4_mib_pieces_8_at_once_and_flushes_regions_together(make_daemon, image, nbdkit,
                                                                                  tmp_path):
    """The copy keeps 8 writes of 4 MiB in flight, and the regions whose copies end together
    share one flush of the stale leg: one flush per region would cost a disk's cache flush each."""
    a, b = image("a.img", 64 * MiB), image("b.img", 64 * MiB)
    poke(a, 9 * MiB, b"\x42" * 4096)
    kitlog = tmp_path / "kit.log"
    kit = nbdkit("--filter=log", "--filter=delay", "file", b, f"logfile={kitlog}", "wdelay=200ms")
    d = make_daemon(device("m", mirror_line(64 * MiB, [a, remote(kit.sock)], log="core 1 8192")))
    wait_for(lambda: in_sync(d), 30, "the initial sync")
    assert read_file(a) == read_file(b)
    inflight, most, sizes, flushes, last_flush, last_written = set(), 0, [], 0, -1, -1
    for i, line in enumerate(kitlog.read_text().splitlines()):
        if re.search(r" Flush id=\d+ ", line) and "return" not in line:
            flushes += 1
            last_flush = i
        m = re.search(r"(connection=\d+) (?:\.\.\.)?Write id=(\d+) (offset=\S+ count=(0x[0-9a-f]+))?", line)
        if not m:
            continue
        if "return" in line:
            inflight.discard(m.group(1, 2))
            last_written = i
        else:
            inflight.add(m.group(1, 2))
            sizes.append(int(m.group(4), 16))
            most = max(most, len(inflight))
    assert sizes == [4 * MiB] * 16 and most == 8, (sizes, most)  # 0.2 s each: one at a time would take 3 s
    assert 1 <= flushes < 16 and last_flush > last_written, (flushes, last_flush, last_written)  # 16 regions


def test_the_resync_of_a_file_leg_writes_around_the_page_cache_and_is_on_disk_when_in_sync(make_daemon, image):
    """The copy to a file leg uses O_DIRECT, flushed region by region: once the status says in
    sync, the daemon killed -9 left none of the leg in the page cache (fincore), and what the
    disk holds (read O_DIRECT) is the source's data. A buffered copy would leave the whole leg
    cached, and until its writeback, only there."""
    need("fincore")
    a, b = image("a.img", 16 * MiB), image("b.img", 16 * MiB)
    data = os.urandom(16 * MiB)
    poke(a, 0, data)  # the legs differ everywhere; nosync says they do not, resync fixes it
    d = make_daemon(device("m", mirror_line(16 * MiB, [a, b])))
    assert "resyncing 16 regions" in d.cli("message", "m", "0", "resync").stdout
    wait_for(lambda: in_sync(d), 20, "the resync", step=0.01)
    d.kill()
    cached = run("fincore", "--bytes", "--raw", "--noheadings", "--output", "RES", b).stdout.strip()
    assert cached == "0", f"{cached} bytes of the resynced leg are in the page cache"
    fd = os.open(b, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 16 * MiB)  # page aligned, as O_DIRECT wants
        assert os.preadv(fd, [buf], 0) == 16 * MiB
    finally:
        os.close(fd)
    assert buf[:] == data


def test_a_source_that_cannot_be_read_fails_the_source_and_not_the_leg_being_resynced(make_daemon, image):
    """The copy to a file leg takes the data straight from the source's page cache where it can
    (mapped); where the source cannot be read (here the file was cut short under the mirror) the
    chunk is read, and the read's error fails the source, never the leg being resynced."""
    a, b = image("a.img", 16 * MiB), image("b.img", 16 * MiB)
    poke(a, 0, os.urandom(8 * MiB))
    d = make_daemon(device("m", mirror_line(16 * MiB, [a, b], log="core 1 8192")))
    os.truncate(a, 8 * MiB)  # regions 2 and 3 cannot be read any more
    d.cli("message", "m", "0", "resync")
    wait_for(lambda: mstatus(d)["legs"][0]["state"] == "dead", 20, "the source to fail")
    legs = mstatus(d)["legs"]
    assert "resync read failed" in legs[0]["why"], legs[0]
    assert legs[1]["state"] != "dead", legs[1]
    assert read_file(b, 0, 8 * MiB) == read_file(a, 0, 8 * MiB)  # what could be read was copied


def test_a_region_being_resynced_holds_writes_to_it_only(make_daemon, image, nbdkit):
    a, b = image("a.img", 16 * MiB), image("b.img", 16 * MiB)
    kit = nbdkit("--filter=delay", "file", a, "rdelay=3")  # the source's reads take 3 s
    d = make_daemon(device("m", mirror_line(16 * MiB, [remote(kit.sock), b], log="core 1 2048")))
    # the initial sync is copying regions 0-7 now (8 chunks in flight), for about 3 s
    t = time.monotonic()
    qemu_io(d.uri("m"), f"write -P 0x11 {15 * MiB} 4k")
    other = time.monotonic() - t
    t = time.monotonic()
    qemu_io(d.uri("m"), "write -P 0x22 4096 4k")
    same = time.monotonic() - t
    assert other < 1.5 and same > 1.0, (other, same)
    wait_for(lambda: in_sync(d), 60, "the initial sync")
    assert read_file(b, 4096, 4096) == b"\x22" * 4096 and read_file(a, 4096, 4096) == b"\x22" * 4096
    assert read_file(b, 15 * MiB, 4096) == b"\x11" * 4096


# ------------------------------------------------------------------ lost legs

def test_a_killed_remote_leg_fails_no_client_io_and_is_resynced_only_where_it_missed_writes(
        make_daemon, image, nbdkit, tmp_path):
    a, b = image("a.img", 32 * MiB), image("b.img", 32 * MiB)
    kit = nbdkit("file", b)
    sock = kit.sock
    d = make_daemon(device("m", mirror_line(32 * MiB, [a, remote(sock)])))
    load = fio(d.uri("m"), tmp_path, "--rw=randwrite", "--size=4M", "--time_based", "--runtime=3",
               background=True)
    time.sleep(1)
    kit.send_signal(signal.SIGKILL)
    kit.wait()
    out, _ = load.communicate(timeout=60)
    assert load.returncode == 0 and "err= 0" in out, out
    st = mstatus(d)
    assert st["legs"][1]["state"] == "dead" and st["legs"][0]["state"] == "alive"
    assert "1 AD 1 core" in d.cli("status", "m").stdout
    # written while the leg is down, on a range fio never wrote: the resync must bring it
    r = fio(d.uri("m"), tmp_path, "--rw=write", f"--offset={20 * MiB}", "--size=2M")
    assert "err= 0" in r.stdout
    nbdkit("file", b, sock=sock)  # back: reinstated and resynced without a message
    wait_for(lambda: in_sync(d), 30, "the returned leg's resync")
    st = mstatus(d)
    assert 2 <= st["resynced_regions"] < st["total_regions"], st
    assert read_file(a) == read_file(b)
    assert "is back" in d.log.read_text()


def test_fail_and_reinstate_by_message(make_daemon, image):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b])))
    assert "failed" in d.cli("message", "m", "0", "fail_leg", "1").stdout
    qemu_io(d.uri("m"), f"write -P 0x44 {5 * MiB} 64k")
    assert read_file(b, 5 * MiB, 4096) == bytes(4096)  # the dead leg took nothing
    st = mstatus(d)
    assert st["legs"][1] == {"dev": b, "state": "dead", "stale_regions": 1, "why": "failed by message"}
    r = d.cli("message", "m", "0", "set_primary", b, check=False)
    assert "only a leg in sync can be the primary" in r.stderr
    assert "1 regions to resync" in d.cli("message", "m", "0", "reinstate_leg", b).stdout
    wait_for(lambda: in_sync(d), 20, "the resync")
    assert read_file(a) == read_file(b) and mstatus(d)["resynced_regions"] == 1


def test_without_keep_log_a_leg_that_comes_back_is_copied_whole(make_daemon, image):
    """dm's keep_log: only with it does the log keep, for a dead leg, which regions it missed."""
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b], features="1 handle_errors")))
    d.cli("message", "m", "0", "fail_leg", b)
    qemu_io(d.uri("m"), f"write -P 0x45 {5 * MiB} 64k")
    st = mstatus(d)
    assert st["legs"][1]["stale_regions"] == 8 and st["in_sync_regions"] == 0, st
    assert "8 regions to resync" in d.cli("message", "m", "0", "reinstate_leg", b).stdout
    wait_for(lambda: in_sync(d), 20, "the resync")
    assert read_file(a) == read_file(b) and mstatus(d)["resynced_regions"] == 8


def test_daemon_killed_mid_write_resyncs_only_the_dirty_regions(make_daemon, image, tmp_path):
    a, b = image("a.img", 64 * MiB), image("b.img", 64 * MiB)
    logdev = image("log.img", MiB)
    d = make_daemon(device("m", mirror_line(64 * MiB, [a, b], log=f"disk 3 {logdev} 2048 nosync")))
    load = fio(d.uri("m"), tmp_path, "--rw=randwrite", "--size=8M", "--time_based", "--runtime=10",
               background=True)
    time.sleep(2)
    d.kill()
    load.kill()
    load.wait()
    bitmap = read_file(logdev, 4096, 8)
    dirty = sum(bin(x).count("1") for x in bitmap)
    assert 0 < dirty <= 8  # only regions fio was writing; fio writes the first 8 MiB
    d.restart()
    wait_for(lambda: in_sync(d), 30, "the resync after the crash")
    assert mstatus(d)["resynced_regions"] == dirty
    assert read_file(a) == read_file(b)
    wait_for(lambda: read_file(logdev, 4096, 8) == bytes(8), 10, "the log's clears")


# ------------------------------------------------------------ repair and verify

def test_a_leg_with_read_errors_is_repaired_from_the_other(make_daemon, image, nbdkit, tmp_path):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    trigger = tmp_path / "trigger"
    kit = nbdkit("--filter=error", "file", b, "error=EIO", "error-pread-rate=100%",
                 f"error-pread-file={trigger}")
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, remote(kit.sock)])))
    qemu_io(d.uri("m"), f"write -P 0x66 {2 * MiB} 64k")
    poke(b, 2 * MiB, b"\x00" * 4096)  # the bad leg's copy is bad there
    d.cli("message", "m", "0", "set_primary", "1")  # reads go to the bad leg first
    trigger.touch()
    out = qemu_io(d.uri("m"), f"read -P 0x66 {2 * MiB} 64k").stdout
    assert "read 65536/65536" in out and "Pattern verification failed" not in out, out
    wait_for(lambda: mstatus(d)["repairs"] == 1, 10, "the repair")
    trigger.unlink()
    assert read_file(b, 2 * MiB, 65536) == b"\x66" * 65536  # rewritten from the good leg
    assert read_file(a) == read_file(b)
    assert mstatus(d)["legs"][1]["state"] == "alive"


def test_verify_reports_a_region_changed_behind_the_daemons_back(make_daemon, image):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b])))
    qemu_io(d.uri("m"), "write -P 0x77 0 8M")
    poke(b, 5 * MiB + 512, b"rot")
    assert "verify started: 8 regions" in d.cli("message", "m", "0", "verify").stdout
    wait_for(lambda: not mstatus(d)["verify"]["running"], 20, "the verify")
    v = mstatus(d)["verify"]
    assert v["differing"] == 1 and v["regions"] == [5], v
    wait_for(lambda: in_sync(d), 20, "the resync of the differing region")
    assert read_file(a) == read_file(b) == b"\x77" * (8 * MiB)


# ------------------------------------------------------------------ durability

def test_marks_reach_the_log_before_the_data_and_clears_after_the_data_is_durable(make_daemon, image, tmp_path):
    """The log and leg a share one log-writes device, so one log orders them: each data write to
    leg a comes after a flush that made its region's mark durable, and the clear of a region is
    written only after a flush that made its data durable on the leg."""
    big, b = image("big.img", 9 * MiB), image("b.img", 8 * MiB)
    lwlog = image("lw.log", 64 * MiB)
    d = make_daemon(device("under", f"0 {9 * MiB // S} log-writes {big} {lwlog}")
                    + device("mlog", f"0 {MiB // S} linear @under 0")
                    + device("m", f"0 {8 * MiB // S} mirror disk 3 @mlog 2048 nosync "
                                  f"2 @under {MiB // S} {b} 0 1 handle_errors"))
    need("nbdsh")  # no client FLUSH (qemu-io sends one on exit): the mirror's own flushes only
    run("nbdsh", "-u", d.uri("m"), "-c", f"h.pwrite(b'\\x31' * 65536, {3 * MiB}); "
        f"h.pwrite(b'\\x32' * 8192, {5 * MiB + 8192})", env=nbdsh_env())
    wait_for(lambda: read_file(big, 4096, 1) == b"\0", 10, "the lazy clears")
    d.stop()
    entries = json.loads(run(sys.executable, "-m", "appliance", "log-writes", "list", "--json", lwlog,
                             cwd=REPO).stdout)["entries"]

    def replayed(upto):  # the device as the first `upto` entries left it
        return replay_log(lwlog, tmp_path / "replay.img", "--limit", str(upto), size=9 * MiB)

    def last_flush_before(i):
        return max(e["index"] for e in entries if e["kind"] == "flush" and e["index"] < i)

    def bit(image_, r):
        return image_[4096 + r // 8] >> (r % 8) & 1

    data = [e for e in entries if e["kind"] == "write" and e["offset"] >= MiB]
    assert {(e["offset"] - MiB) // MiB for e in data} == {3, 5}
    for e in data:
        r = (e["offset"] - MiB) // MiB
        assert bit(replayed(last_flush_before(e["index"]) + 1), r) == 1, e
    for r, pattern, offset, length in ((3, 0x31, 3 * MiB, 65536), (5, 0x32, 5 * MiB + 8192, 8192)):
        last_data = max(e["index"] for e in data if (e["offset"] - MiB) // MiB == r)
        clear = next(e["index"] for e in entries if e["index"] > last_data and e["kind"] == "write"
                     and 4096 <= e["offset"] < MiB and bit(replayed(e["index"] + 1), r) == 0)
        before = replayed(last_flush_before(clear) + 1)
        assert before[MiB + offset : MiB + offset + length] == bytes([pattern]) * length


# --------------------------------------------------------------- tables and errors

def test_a_reloaded_table_keeps_the_log_and_its_table_round_trips(make_daemon, image, tmp_path):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    logdev = image("log.img", MiB)
    line = mirror_line(8 * MiB, [a, b], log=f"disk 2 {logdev} 2048")
    d = make_daemon(device("m", line))
    wait_for(lambda: in_sync(d), 20, "the initial sync")
    assert d.cli("table", "m").stdout.split() == line.split()
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P 0x55 {MiB} 6M", d.uri("m")],
                              stdout=subprocess.PIPE, text=True)
    d.cli("load", "m", line)  # the same table again: swapped in under the write
    d.cli("resume", "m")
    out, _ = writer.communicate(timeout=60)
    assert "wrote 6291456/6291456" in out, out
    wait_for(lambda: in_sync(d), 20, "the new table's resync of what the old one left marked")
    assert read_file(a) == read_file(b) and read_file(a, MiB, 6 * MiB) == b"\x55" * (6 * MiB)
    assert mstatus(d)["resynced_regions"] < 8  # the log came along: not a full resync


def test_without_handle_errors_a_leg_write_error_reaches_the_client(make_daemon, image, nbdkit, tmp_path):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    trigger = tmp_path / "trigger"
    kit = nbdkit("--filter=error", "file", b, "error=EIO", "error-pwrite-rate=100%",
                 f"error-pwrite-file={trigger}")
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, remote(kit.sock)], features="")))
    trigger.touch()
    out = qemu_io(d.uri("m"), "write -P 0x12 0 4k", check=False).stdout
    assert "Input/output error" in out, out
    trigger.unlink()
    wait_for(lambda: in_sync(d), 20, "the resync of the region the leg missed")
    assert mstatus(d)["resynced_regions"] == 1  # the leg stayed alive, out of sync where it failed
    assert read_file(a) == read_file(b) and "is dead" not in d.log.read_text()


def test_resync_rate_throttles_the_copy_and_status_gives_progress_and_eta(make_daemon, image):
    a, b = image("a.img", 16 * MiB), image("b.img", 16 * MiB)
    poke(a, 9 * MiB, b"\x42" * 4096)  # the legs differ; nosync says they do not, resync fixes it
    d = make_daemon(device("m", mirror_line(16 * MiB, [a, b])))
    assert d.cli("message", "m", "0", "resync_rate", "4M").stdout.strip() == "resync rate 4194304 bytes/s"
    t = time.monotonic()
    assert "resyncing 16 regions from leg " + a in d.cli("message", "m", "0", "resync").stdout
    time.sleep(1.5)
    st = mstatus(d)
    assert st["legs"][1]["state"] == "resyncing" and 0 < st["resync"]["progress"] < 1, st
    assert 0 < st["resync"]["eta_seconds"] < 10 and st["resync"]["rate"] == 4 * MiB, st["resync"]
    wait_for(lambda: in_sync(d), 20, "the resync")
    assert time.monotonic() - t > 2.5  # 16 MiB at 4 MiB/s, four regions at a time
    assert read_file(b, 9 * MiB, 4096) == b"\x42" * 4096 and read_file(a) == read_file(b)


def test_a_leg_the_log_does_not_know_is_fully_resynced_and_a_log_of_other_legs_is_refused(
        make_daemon, image, tmp_path):
    a, b, c = image("a.img", 8 * MiB), image("b.img", 8 * MiB), image("c.img", 8 * MiB)
    logdev = image("log.img", MiB)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b], log=f"disk 3 {logdev} 2048 nosync")))
    qemu_io(d.uri("m"), "write -P 0x3a 0 8M")
    d.stop()
    poke(c, 6 * MiB, b"another mirror's data")
    d.config.write_text(d.config.read_text().replace(b, c))  # c takes b's place
    d.restart()
    wait_for(lambda: in_sync(d), 20, "the new leg's full resync")
    st = mstatus(d)
    assert st["legs"][1]["note"] == "not a leg of this mirror's log: fully resynced", st["legs"]
    assert "note" not in st["legs"][0] and st["resynced_regions"] == 8
    assert read_file(c) == read_file(a) == b"\x3a" * (8 * MiB)
    d.stop()
    x, y = image("x.img", 8 * MiB), image("y.img", 8 * MiB)
    d.config.write_text(d.config.read_text().replace(a, x).replace(c, y))
    with pytest.raises(RuntimeError, match=f"the log device {logdev} is the log of a mirror of other legs"):
        d.restart()


def test_a_leg_replaced_under_its_name_is_fully_resynced_and_all_legs_replaced_are_refused(
        make_daemon, image):
    """The log keeps what stood behind each leg's name (a file's inode, a disk's WWN): another
    file under the same name (an old copy, another mirror's leg) is never trusted."""
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    logdev = image("log.img", MiB)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b], log=f"disk 3 {logdev} 2048 nosync")))
    qemu_io(d.uri("m"), "write -P 0x3c 0 8M")
    d.stop()
    with open(b + ".other", "wb") as f:
        f.write(b"\x99" * (8 * MiB))
    os.replace(b + ".other", b)
    d.restart()
    wait_for(lambda: in_sync(d), 20, "the replaced leg's full resync")
    st = mstatus(d)
    assert st["legs"][1]["note"] == "another file or disk than the log recorded under this name: fully resynced"
    assert "note" not in st["legs"][0] and st["resynced_regions"] == 8, st
    assert read_file(b) == read_file(a) == b"\x3c" * (8 * MiB)
    d.stop()
    for leg in (a, b):
        shutil.copyfile(leg, leg + ".copy")
        os.replace(leg + ".copy", leg)
    with pytest.raises(RuntimeError, match="is the log of other files or disks than the legs now at"):
        d.restart()


def test_a_dead_primary_stays_untrusted_across_a_restart(make_daemon, image):
    """The log records that leg a died and b became the primary: after a restart, a's stale
    region is copied from b, never the other way (that would lose the write a missed)."""
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    logdev = image("log.img", MiB)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b], log=f"disk 3 {logdev} 2048 nosync")))
    qemu_io(d.uri("m"), f"write -P 0x5a {MiB} 4k")  # the log's header is written by now
    d.cli("message", "m", "0", "fail_leg", a)
    qemu_io(d.uri("m"), f"write -P 0x5b {5 * MiB} 64k")
    assert mstatus(d)["primary"] == b
    d.kill()
    marked = read_file(logdev, 4096, 1)[0]
    assert marked & 1 << 5 and not marked & ~(1 << 1 | 1 << 5)  # region 5, and 1 if not cleared yet
    d.restart()
    wait_for(lambda: in_sync(d), 20, "the resync of the leg that was dead")
    st = mstatus(d)
    assert st["primary"] == b and st["resynced_regions"] == bin(marked).count("1"), st
    assert st["legs"][0]["note"].startswith("dead when the log was last written")
    assert read_file(a, 5 * MiB, 65536) == b"\x5b" * 65536 and read_file(a) == read_file(b)


def test_a_log_device_that_fails_fails_the_writes_it_cannot_mark(make_daemon, image):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    logimg = image("log.img", MiB)
    # the log device takes writes for 3 s, then fails them for a minute
    d = make_daemon(device("mlog", f"0 {MiB // S} flakey {logimg} 0 3 60 1 error_writes")
                    + device("m", mirror_line(8 * MiB, [a, b], log="disk 3 @mlog 128 nosync")))
    assert "wrote 4096/4096" in qemu_io(d.uri("m"), "write -P 0x21 0 4k").stdout
    fresh = iter(range(1, 100))  # 64 KiB regions never written: each write needs its mark

    def write_fails():
        off = next(fresh) * 65536
        return "Input/output error" in qemu_io(d.uri("m"), f"write -P 0x22 {off} 4k", check=False).stdout

    wait_for(lambda: mstatus(d)["log"]["state"] == "failed" or write_fails(), 20, "the log device to fail")
    out = qemu_io(d.uri("m"), f"write -P 0x23 {7 * MiB} 4k", check=False).stdout
    assert "Input/output error" in out, out  # never written to a leg without its mark on the log
    assert read_file(a, 7 * MiB, 4096) == read_file(b, 7 * MiB, 4096) == bytes(4096)
    st = mstatus(d)
    assert st["log"]["state"] == "failed" and "cannot write the log device" in st["log"]["error"], st["log"]
    assert "3 disk @mlog D" in d.cli("status", "m").stdout
