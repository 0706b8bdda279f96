"""ramback across daemon deaths: kill -9 under load, a store lost to a reboot, a clean stop."""

from __future__ import annotations

import json
import os
import random
import time

from test_ramback import (
    device,
    device_bytes,
    message,
    nbd_script,
    random_file,
    rb_status,
    store_data,
    wait_for,
    write_at,
)

WRITER = """
h = nbd.NBD(); h.connect_uri(sys.argv[1])
wid, lo, hi = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = open(sys.argv[5], "w", buffering=1)
rnd = random.Random(wid)
deadline = time.monotonic() + 20
seq = 0
while seq < 50000 and time.monotonic() < deadline:
    n = rnd.choice([512, 3584, 4096, 8192, 65536])
    off = rnd.randrange(lo, hi - n) // 512 * 512
    seed = rnd.getrandbits(32)
    log.write(f"start {seq} {off} {n} {seed}\\n")
    try:
        h.pwrite(random.Random(seed).randbytes(n), off)
    except nbd.Error:
        break
    log.write(f"ack {seq}\\n")
    seq += 1
    if seq % 16 == 0:
        try:
            h.flush()
        except nbd.Error:
            break
        log.write(f"flushed {seq}\\n")
"""


def restart(d):
    """Start the daemon again; the log of the run before goes to .log.1 (start() waits for a
    line the old log already has)."""
    os.replace(d.log, str(d.log) + ".1")
    d.start()


def replay(log_path, model):
    """Apply every acknowledged write of one writer (QD1: acks are in order) to `model`.
    Returns (the write in flight when the daemon died, (offset, length, seed), or None;
    writes acked; writes acked before the last completed FLUSH)."""
    pending = None
    acked = flushed = 0
    for line in open(log_path):
        word, *rest = line.split()
        if word == "start":
            pending = tuple(map(int, rest[1:]))
        elif word == "ack":
            off, n, seed = pending
            model[off : off + n] = random.Random(seed).randbytes(n)
            pending = None
            acked += 1
        elif word == "flushed":
            flushed = acked
    return pending, acked, flushed


def check_after_crash(got, model, in_flight):
    """Every byte an acknowledged write (and not the write in flight) covers holds what the model
    says; the bytes of a write in flight at the kill hold, each, its old or its new value (a
    write that was never acknowledged may be torn), never anything else: not zeros."""
    pos = 0
    for off, n, seed in sorted(in_flight):
        assert got[pos:off] == model[pos:off], f"an acknowledged write in {pos}..{off} is not what the device holds"
        new = random.Random(seed).randbytes(n)
        bad = [i for i in range(n) if got[off + i] not in (model[off + i], new[i])]
        assert not bad, f"the write in flight at {off}+{n} left bytes that are neither old nor new at {off + bad[0]}"
        pos = max(pos, off + n)
    assert got[pos:] == model[pos:], f"an acknowledged write after {pos} is not what the device holds"


def test_kill_9_under_write_load_loses_no_acknowledged_write(make_daemon, tmp_path):
    size = 32 << 20
    img = random_file(tmp_path / "back.img", size, seed=11)
    model = bytearray(open(img, "rb").read())
    d = make_daemon(device("rb", f"0 {size // 512} ramback - {img}"))
    message(d, "writeback")
    writers = [
        nbd_script(WRITER, d.uri("rb"), w, w * size // 2, (w + 1) * size // 2, tmp_path / f"writer{w}.log", background=True)
        for w in range(2)
    ]
    time.sleep(2.0)
    before = rb_status(d)
    d.kill()
    for p in writers:
        p.communicate(timeout=30)
    assert before["dirty"] > 0, "the kill should find dirty data in RAM"

    restart(d)
    s = rb_status(d)
    assert s["store_attach"] == "attached unclean"
    assert s["populated"]
    in_flight = []
    for w in range(2):
        pending, acked, flushed = replay(tmp_path / f"writer{w}.log", model)
        assert flushed > 0 and acked >= flushed
        if pending:
            in_flight.append(pending)
    check_after_crash(device_bytes(d, "rb", tmp_path), model, in_flight)
    assert message(d, "flush") == "clean"
    assert rb_status(d)["dirty"] == 0
    device_now = device_bytes(d, "rb", tmp_path)
    assert open(img, "rb").read() == device_now
    assert store_data(s["store"]) == device_now


def test_a_store_lost_after_an_unclean_stop_is_reported_loudly(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", 4 << 20)
    d = make_daemon(device("rb", f"0 8192 ramback - {img}"))
    message(d, "writeback")
    write_at(d, "rb", tmp_path, [(8192, os.urandom(100000))])
    store = rb_status(d)["store"]
    d.kill()
    os.unlink(store)  # what a reboot does to /dev/shm
    marker = tmp_path / "state" / "ramback" / "rb-0.json"
    assert json.loads(marker.read_text())["mode"] == "writeback"
    restart(d)
    s = rb_status(d)
    assert s["warning"] and "DIRTY DATA LOST" in s["warning"] and store in s["warning"]
    assert "warning=DIRTY-DATA-LOST" in d.cli("status").stdout
    assert "ERROR" in d.log.read_text() and "DIRTY DATA LOST" in d.log.read_text()
    wait_for(d, lambda s: s["populated"])
    assert device_bytes(d, "rb", tmp_path) == open(img, "rb").read()  # it never pretends


def test_a_clean_stop_drains_to_a_slow_disk_and_a_restart_needs_no_load(make_daemon, tmp_path):
    size = 16 << 20
    img = random_file(tmp_path / "back.img", size, seed=5)
    model = bytearray(open(img, "rb").read())
    sectors = size // 512
    d = make_daemon(
        device("slow", f"0 {sectors} delay {img} 0 0 {img} 0 3 serialize", export=False)
        + device("rb", f"0 {sectors} ramback - @slow")
    )
    message(d, "writeback")
    rnd = random.Random(2)
    writes = []
    for _ in range(60):  # scattered: each one its own flush request at the slow disk
        off = rnd.randrange(0, size - 20000) // 512 * 512
        writes.append((off, rnd.randbytes(rnd.choice([512, 4096, 16384]))))
    write_at(d, "rb", tmp_path, writes)
    for off, data in writes:
        model[off : off + len(data)] = data
    assert rb_status(d)["dirty"] > 0
    store = rb_status(d)["store"]
    assert d.stop() == 0
    assert "draining" in d.log.read_text()
    assert open(img, "rb").read() == model
    assert not (tmp_path / "state" / "ramback" / "rb-0.json").exists()
    assert store_data(store) == model

    restart(d)
    s = rb_status(d)
    assert s["store_attach"] == "attached clean" and s["populated"] and s["dirty"] == 0
    assert device_bytes(d, "rb", tmp_path) == model
