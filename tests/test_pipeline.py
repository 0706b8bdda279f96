"""Pipelined connections and the I/O engine, through a real daemon.

A connection keeps reading requests while earlier ones are in flight (up to 128) and
answers each as it completes; reads and writes of files go through the I/O engine
(io_uring, or the worker pool with APPLIANCE_ENGINE=threads). A client that stops
reading is dropped without hurting anyone else, and closed connections give their
memory back.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from appliance._fast import uring
from appliance.nbd import constants as C
from conftest import cpu_seconds, device, need, nbd_python, run, wait_for
from test_hostile import handshake, log_has, recv_exact, request, still_serves

MiB = 1 << 20
SIZE = 8 * MiB
HALF = SIZE // 2

ENGINES = ["threads"] + (["io_uring"] if uring.kind() == "io_uring" else [])


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Each test runs on both engines: the daemon inherits APPLIANCE_ENGINE."""
    if request.param == "threads":
        monkeypatch.setenv("APPLIANCE_ENGINE", "threads")
    else:
        monkeypatch.delenv("APPLIANCE_ENGINE", raising=False)
    return request.param


@pytest.fixture
def root_disk():
    """root_disk(size, fill=None) -> a file on the root disk (not tmpfs: O_DIRECT reaches a real
    disk there), sparse or filled with the byte `fill`; removed at the end."""
    made = []

    def make(size, fill=None):
        fd, name = tempfile.mkstemp(dir="/var/tmp", prefix="appliance-test-", suffix=".img")
        path = Path(name)
        made.append(path)
        with os.fdopen(fd, "wb") as f:
            if fill is None:
                f.truncate(size)
            else:
                f.write(bytes([fill]) * size)
        return path

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def reply_cookie(s, payload):
    """A simple reply's cookie, its payload read and dropped."""
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == C.NBD_SIMPLE_REPLY_MAGIC and error == 0, (magic, error)
    recv_exact(s, payload)
    return cookie


def test_status_says_which_io_engine_runs(make_daemon, image, engine):
    d = make_daemon(device("data0", f"0 {SIZE // 512} linear {image('disk.img', SIZE)} 0"))
    assert d.status()["daemon"]["io_engine"] == engine


def test_the_engine_reads_writes_and_syncs_files_for_python_callers(engine, tmp_path):
    # appliance/engine.py's API, in a process of its own (the engine is chosen once per process)
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1000)
    script = textwrap.dedent(
        f"""
        import os, queue
        from appliance import engine
        e = engine.get()
        assert e.kind == {engine!r}, e.kind
        fd = os.open({str(path)!r}, os.O_RDWR)
        q = queue.SimpleQueue()
        buf = bytearray(5000)
        e.read(fd, buf, 0, q.put)
        assert q.get(timeout=10) == 3000  # short only at the end of the file
        assert bytes(buf[:6]) == b"abcabc"
        e.write(fd, b"xyz" * 10000, 2997, q.put)
        assert q.get(timeout=10) == 30000
        e.fsync(fd, q.put)
        assert q.get(timeout=10) == 0
        e.read(9999, bytearray(10), 0, q.put)
        assert q.get(timeout=10) == -9  # EBADF, as a negative errno
        assert os.pread(fd, 9, 2994) == b"abcxyzxyz"
        print(e.status())
        """
    )
    import sys
    from conftest import REPO

    out = run(sys.executable, "-c", script, cwd=REPO).stdout
    assert engine in out


def test_a_fast_read_sent_after_100_slow_ones_is_answered_first(make_daemon, image, engine):
    # first half delay 50 ms (the slow path), second half linear (the fast path); 100 slow
    # reads are more than one request at a time, and than the old bound of 64 in flight
    disk = image("disk.img", SIZE)
    d = make_daemon(device("data0", f"0 {HALF // 512} delay {disk} 0 50", f"{HALF // 512} {HALF // 512} linear {disk} {HALF // 512}"))
    s, _ = handshake(d)
    s.sendall(b"".join(request(C.NBD_CMD_READ, i * 4096, 4096, cookie=i) for i in range(100)))
    s.sendall(request(C.NBD_CMD_READ, HALF, 4096, cookie=1000))
    order = [reply_cookie(s, 4096) for _ in range(101)]
    assert order[0] == 1000, order[:5]
    assert sorted(order[1:]) == list(range(100))
    s.close()


def test_a_write_whose_payload_is_slow_to_come_holds_up_neither_replies_nor_suspend(make_daemon, image, engine):
    d = make_daemon(device("data0", f"0 {SIZE // 512} linear {image('disk.img', SIZE)} 0"))
    s, _ = handshake(d)
    s.sendall(request(C.NBD_CMD_READ, 0, 4096, cookie=1) + request(C.NBD_CMD_WRITE, 8192, 4096, cookie=2) + b"w" * 100)
    assert reply_cookie(s, 4096) == 1  # answered while the write's payload is still missing
    started = time.monotonic()
    d.cli("suspend", "data0", timeout=10)
    assert time.monotonic() - started < 5
    s.sendall(b"w" * 3996)
    d.cli("resume", "data0", timeout=10)
    assert reply_cookie(s, 0) == 2
    s.close()
    with open(d.dir / "disk.img", "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"w" * 4096


def test_a_client_that_stops_reading_is_dropped_and_others_carry_on(make_daemon, image, engine):
    d = make_daemon(device("data0", f"0 {SIZE // 512} linear {image('disk.img', SIZE)} 0"))
    s, _ = handshake(d)
    # 320 MiB of replies it never reads: past the 256 MiB queue cap
    s.sendall(b"".join(request(C.NBD_CMD_READ, (i % 8) * MiB, MiB, cookie=i) for i in range(320)))
    assert log_has(d, "stopped reading its replies", timeout=30), d.log.read_text()[-2000:]
    still_serves(d)
    s.settimeout(5)
    with pytest.raises((ConnectionResetError, BrokenPipeError, socket.timeout, OSError)):
        while s.recv(1 << 20):  # what reached the socket before the drop, then the end
            pass
        raise ConnectionResetError("closed")
    s.close()
    assert d.status("data0")["devices"][0]["clients"] == 0


def _rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_closed_connections_give_their_memory_back(make_daemon, image):
    # 300 connections, 6 at a time, each reading 32 MiB once (a backup job's nbdcopy, hourly):
    # before the fix the daemon kept about 1.5 GiB of them
    d = make_daemon(device("data0", f"0 {64 * MiB // 512} linear {image('disk.img', 64 * MiB)} 0"))
    need("nbdsh")
    client = textwrap.dedent(
        f"""
        import nbd, sys, threading
        def one():
            h = nbd.NBD()
            h.connect_uri({d.uri("data0")!r})
            assert len(h.pread({32 * MiB}, 0)) == {32 * MiB}
            h.shutdown()
            h.close()
        for _ in range(int(sys.argv[1])):
            ts = [threading.Thread(target=one) for _ in range(6)]
            [t.start() for t in ts]
            [t.join() for t in ts]
        """
    )
    run(nbd_python(), "-c", client, "1", timeout=120)  # the engine and the threads start
    before = _rss(d.proc.pid)
    run(nbd_python(), "-c", client, "50", timeout=300)
    grown = _rss(d.proc.pid) - before
    assert grown < 128 * MiB, f"the daemon grew by {grown // MiB} MiB"


def test_pipelined_random_io_on_a_direct_device_is_verified(make_daemon, engine, root_disk):
    # a file on the root disk (not tmpfs): O_DIRECT really goes to the disk, at QD32. The
    # sizes make request buffers grow, shrink and be freed and mapped again (the ones kept
    # are registered with the ring: a stale registration would read or write the wrong pages)
    need("fio")
    disk = root_disk(64 * MiB)
    d = make_daemon(device("data0", f"0 {64 * MiB // 512} linear {disk} 0", direct=True))
    out = run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={d.uri('data0')}", "--rw=randwrite", "--bssplit=4k/40:64k/20:512k/25:2m/15", "--iodepth=32", "--size=32M", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=0", "--output-format=terse", timeout=120,
    )
    assert ";" in out.stdout  # fio exits non-zero on any verify failure (run checks)
    assert d.status("data0")["devices"][0]["name"] == "data0"

POLL_CLIENT = textwrap.dedent("""
    import random, sys, time
    import nbd
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    blocks = h.get_size() // 4096
    for i in range(int(sys.argv[2])):  # one read at a time
        h.pread(4096, random.randrange(blocks) * 4096)
    print("one at a time: done", flush=True)
    sys.stdin.readline()
    end = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < end:  # then 16 reads at the disk at a time
        while h.aio_in_flight() < 16:
            h.aio_pread(nbd.Buffer(4096), random.randrange(blocks) * 4096, completion=lambda err: 1)
        h.poll(-1)
    while h.aio_in_flight():
        h.poll(-1)
    print("quiet", flush=True)
    sys.stdin.readline()  # connected, sending nothing, until told
    h.shutdown()
""")

def test_a_loop_polls_while_its_disk_is_busy_and_not_for_an_idle_client_or_one_read_at_a_time(
        make_daemon, root_disk):
    # polling for completions (io_uring only) is what keeps a fast disk busy at depth; an
    # idle client must not pay for it (its loop sleeps, with the connection still open), nor
    # a client at queue depth 1, for which polling gains nothing
    if uring.kind() != "io_uring":
        pytest.skip("polling is io_uring's")
    d = make_daemon(device("data0", f"0 {16 * MiB // 512} linear {root_disk(16 * MiB, 0x5A)} 0", direct=True),
                    extra="poll_max_us = 1000\n")
    proc = subprocess.Popen([nbd_python(), "-c", POLL_CLIENT, d.uri("data0"), "300", "1.5"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "one at a time: done"
        polling = d.status()["daemon"]["io_polling"]
        assert polling["max_us"] == 1000 and polling["caught"] == polling["gave_up"] == 0, polling
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "quiet"
        polling = d.status()["daemon"]["io_polling"]
        if len(os.sched_getaffinity(0)) > 1:  # one CPU is always left to others: none to poll on one
            assert polling["caught"] > 0, polling
        cpu = cpu_seconds(d.proc.pid)
        time.sleep(1)
        assert cpu_seconds(d.proc.pid) - cpu < 0.1, "an idle connection costs CPU"
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_loops_leave_a_running_merge_a_cpu_of_its_own(make_daemon, root_disk, tmp_path):
    # the pollers may have all CPUs but one; each background copy running (a merge here) takes
    # one more from them, or its copy loses its CPU to a spin. The daemon runs on two CPUs:
    # one poller at most, none while the merge runs
    from test_cow import SIZE as size, layer_create, make_base, message, qemu_io

    if uring.kind() != "io_uring":
        pytest.skip("polling is io_uring's")
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("no poller on one CPU")
    d = make_daemon(device("data0", f"0 {size // 512} linear {root_disk(size, 0x5A)} 0", direct=True)
                    + device("d", f"0 {size // 512} cow {make_base(tmp_path)} 0 {layer_create(tmp_path / 'l1.layer', size)}"),
                    extra="poll_max_us = 1000\n")
    for tid in os.listdir(f"/proc/{d.proc.pid}/task"):  # new connections' threads inherit it
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
    qemu_io(d.uri("d"), f"write -P 0x11 0 {size}")
    message(d, "push", layer_create(tmp_path / "l2.layer", size))
    message(d, "merge", "1", "1", "base", "rate=512K")  # 16 s: running for all of the client's run

    def client():
        run(nbd_python(), "-c", POLL_CLIENT, d.uri("data0"), "10", "1", input="\n\n", timeout=60)
        return d.status()["daemon"]["io_polling"]

    polling = client()
    assert d.status("d")["devices"][0]["segments"][0]["status"]["merge"] == "running"
    assert polling["background_jobs"] == 1 and polling["caught"] == polling["gave_up"] == 0, polling
    message(d, "cancel")
    wait_for(lambda: d.status()["daemon"]["io_polling"]["background_jobs"] == 0, 30, "the merge's end")
    assert client()["caught"] > 0


def test_no_polling_by_default(make_daemon, root_disk):
    if uring.kind() != "io_uring":
        pytest.skip("polling is io_uring's")
    d = make_daemon(device("data0", f"0 {16 * MiB // 512} linear {root_disk(16 * MiB, 0x5A)} 0", direct=True))
    proc = run(nbd_python(), "-c", POLL_CLIENT, d.uri("data0"), "10", "0.5", input="\n\n", timeout=60)
    assert "quiet" in proc.stdout
    assert d.status()["daemon"]["io_polling"] == {"cpu_seconds": 0, "caught": 0, "gave_up": 0, "background_jobs": 0,
                                                  "max_us": 0}
