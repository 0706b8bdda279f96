"""ramback's dirty limit and liveness: room reserved when a write is mapped, rewrites that cost
nothing, a limit the chunk size cannot honour, a backing that fails at the limit, and FLUSHes
that share a sweep. Real daemons over `delay` and `error` devices."""

from __future__ import annotations

import threading
import time

import pytest

from test_ramback import ask, device, message, nbd_script, random_file, rb_status, wait_for, write_at

MiB = 1 << 20

QUEUE_WRITES = """
h = nbd.NBD(); h.connect_uri(sys.argv[1])
n, size = int(sys.argv[2]), int(sys.argv[3])
pending = {h.aio_pwrite(bytes([i + 1]) * size, i * size + 512) for i in range(n)}  # unaligned: loads first
while pending:
    pending -= {c for c in pending if h.aio_command_completed(c)}
    if pending:
        h.poll(-1)
"""


def test_writes_queued_behind_loads_stay_under_the_dirty_limit(make_daemon, tmp_path):
    """32 writes in flight at once into chunks still loading: each must have room before it is
    admitted, not only be counted once its worker marks it."""
    size = 16 * MiB
    img = random_file(tmp_path / "back.img", size)
    sectors = size // 512
    d = make_daemon(
        device("slow", f"0 {sectors} delay {img} 0 1500 {img} 0 200", export=False)
        + device("rb", f"0 {sectors} ramback - @slow max_dirty=1M")
    )
    message(d, "writeback")
    writer = nbd_script(QUEUE_WRITES, d.uri("rb"), 32, 256 << 10, background=True)
    peak = 0
    while writer.poll() is None:
        s = rb_status(d)
        peak = max(peak, s["dirty_bytes"])
        time.sleep(0.03)
    out, _ = writer.communicate()
    assert writer.returncode == 0, out
    assert 0 < peak <= (1 * MiB) + (256 << 10) + 8192, f"dirty data reached {peak} bytes, the limit is 1 MiB"


def test_rewriting_dirty_chunks_is_not_throttled(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", 4 * MiB)
    d = make_daemon(
        device("slow", f"0 8192 delay {img} 0 0 {img} 0 3000 serialize", export=False)
        + device("rb", "0 8192 ramback - @slow max_dirty=1M")
    )
    wait_for(d, lambda s: s["populated"])
    message(d, "writeback")
    write_at(d, "rb", tmp_path, [(0, bytes([1]) * MiB)])  # the limit, all of it
    t0 = time.monotonic()
    write_at(d, "rb", tmp_path, [(0, bytes([i]) * MiB) for i in range(2, 12)])  # the same chunks again
    took = time.monotonic() - t0
    s = rb_status(d)
    assert s["throttled_writes"] == 0 and took < 2.5, (took, s)
    assert s["dirty_bytes"] <= MiB


def test_a_limit_the_chunk_size_cannot_honour_is_refused_or_said(make_daemon, tmp_path):
    from appliance.control import ControlError

    img = random_file(tmp_path / "back.img", 32 * MiB)
    d = make_daemon(device("base", f"0 2048 linear {img} 0"))
    with pytest.raises(ControlError) as e:  # chunk=1M: 16 chunks are 16 MiB
        ask(d, "load", name="base", table=[f"0 65536 ramback - {img} chunk=1M max_dirty=4M"])
    assert "max_dirty=4194304 is below 16777216 bytes" in str(e.value) and "chunk=1048576" in str(e.value)

    img2 = random_file(tmp_path / "back2.img", 32 * MiB)
    d2 = make_daemon(device("rb", f"0 65536 ramback - {img2} chunk=1M max_dirty=0.05s"), name="b")
    s = rb_status(d2)  # 0.05 s of the assumed 64 MiB/s is 3.2 MiB: raised to 16 MiB, and said so
    assert s["dirty_limit_raised_to_floor"] and s["dirty_limit_bytes"] == 16 * MiB
    assert "raised to the floor" in s["dirty_limit_reason"]
    assert "dirty_limit=raised-to-chunk-floor" in d2.cli("status").stdout
    assert "dirty limit max_dirty=0.05s" in d2.log.read_text() and "is raised to 16777216 bytes" in d2.log.read_text()
    with pytest.raises(ControlError) as e:
        message(d2, "max_dirty", "2M")
    assert "below 16777216 bytes" in str(e.value)


WRITE_ONE = """
h = nbd.NBD(); h.connect_uri(sys.argv[1])
t0 = time.monotonic()
try:
    h.pwrite(b"x" * int(sys.argv[3]), int(sys.argv[2]))
    print("ok", time.monotonic() - t0)
except nbd.Error as e:
    print("error", e.errno, time.monotonic() - t0)  # the errno's name, EIO
"""


def test_a_backing_that_fails_at_the_limit_fails_the_writes_and_stop_does_not_hang(make_daemon, tmp_path):
    sectors = 8 * MiB // 512
    d = make_daemon(device("bad", f"0 {sectors} error", export=False) + device("rb", f"0 {sectors} ramback - @bad max_dirty=1M"))
    message(d, "writeback")
    assert nbd_script(WRITE_ONE, d.uri("rb"), 0, MiB).split()[0] == "ok"  # whole chunks: RAM only
    wait_for(d, lambda s: s["flush_errors"] > 0)
    word, err, took = nbd_script(WRITE_ONE, d.uri("rb"), 2 * MiB, MiB, timeout=30).split()
    assert word == "error" and err == "EIO" and float(took) < 5  # at once
    s = rb_status(d)
    assert s["failed_writes"] == 1 and "Input/output error" in s["backing_failing"]
    assert "backing=FAILING" in d.cli("status").stdout
    t0 = time.monotonic()
    d.stop(timeout=30)
    assert d.proc.returncode != -9 and time.monotonic() - t0 < 30, "stop hung"


FLUSHES = """
h = nbd.NBD(); h.connect_uri(sys.argv[1])
t0 = time.monotonic()
pending = {h.aio_flush() for _ in range(int(sys.argv[2]))}
while pending:
    pending -= {c for c in pending if h.aio_command_completed(c)}
    if pending:
        h.poll(-1)
print(time.monotonic() - t0)
"""


def test_concurrent_flushes_share_sweeps(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", 4 * MiB)
    d = make_daemon(
        device("slow", f"0 8192 delay {img} 0 0 {img} 0 0 {img} 0 200 serialize", export=False)
        + device("rb", "0 8192 ramback - @slow")
    )
    wait_for(d, lambda s: s["populated"])  # writethrough: every FLUSH sweeps and flushes backing
    took = float(nbd_script(FLUSHES, d.uri("rb"), 32).split()[-1])
    assert took < 2.0, took  # a sweep each: 32 backing flushes of 200 ms, 6.4 s
    assert rb_status(d)["flush_sweeps"] <= 3


def test_a_flush_waits_for_a_sweep_that_began_after_it(make_daemon, tmp_path):
    """A FLUSH that arrives while a sweep runs must not be answered by that sweep: data written
    before it may lie behind the sweep's position."""
    img = random_file(tmp_path / "back.img", 4 * MiB)
    d = make_daemon(
        device("slow", f"0 8192 delay {img} 0 0 {img} 0 0 {img} 0 1000 serialize", export=False)
        + device("rb", "0 8192 ramback - @slow")
    )
    wait_for(d, lambda s: s["populated"])
    times = {}

    def flush(name, delay):
        time.sleep(delay)
        times[name] = (time.monotonic(), float(nbd_script(FLUSHES, d.uri("rb"), 1).split()[-1]))

    a = threading.Thread(target=flush, args=("first", 0))
    b = threading.Thread(target=flush, args=("second", 0.6))  # while the first sweep flushes backing
    a.start(), b.start(), a.join(), b.join()
    assert times["first"][1] >= 0.9 and times["second"][1] >= 1.2, times  # the second waits for a sweep of its own
    assert rb_status(d)["flush_sweeps"] == 2
