"""ramback's crash holes: what a write into an EMPTY chunk shows before it is in RAM, and the
marker that says, after a reboot took the store, that RAM held data backing may lack."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

from conftest import need
from test_ramback import device, message, nbd_script, random_file, rb_status, write_at

REGION = 16 << 20
REGIONS = 8

# One connection writes REGIONS regions of REGION bytes, each filled with its number + 1; the
# other reads the last 4 KiB of every region over and over. Backing is an `error` device, so a
# chunk still EMPTY reads as EIO; once a write's chunks are marked, they read as the write.
# Anything else (zeros) is RAM the write had not filled yet.
RACE = """
import threading
uri = sys.argv[1]
regions, region = int(sys.argv[2]), int(sys.argv[3])
done = threading.Event()
bad = []
seen = {"eio": 0, "data": 0}

def reader():
    h = nbd.NBD(); h.connect_uri(uri)
    while not done.is_set():
        for i in range(regions):
            try:
                got = h.pread(4096, (i + 1) * region - 4096)
            except nbd.Error:
                seen["eio"] += 1
                continue
            seen["data"] += 1
            if got != bytes([i + 1]) * 4096:
                bad.append((i, got[:8].hex()))

t = threading.Thread(target=reader); t.start()
w = nbd.NBD(); w.connect_uri(uri)
time.sleep(0.2)
for i in range(regions):
    w.pwrite(bytes([i + 1]) * region, i * region)
    time.sleep(0.05)
done.set(); t.join()
print(json.dumps({"bad": bad, **seen}))
"""


def test_a_write_into_empty_chunks_is_never_read_before_its_data_is_in_ram(make_daemon, tmp_path):
    size = REGIONS * REGION
    sectors = size // 512
    d = make_daemon(
        device("bad", f"0 {sectors} error", export=False)
        + device("rb", f"0 {sectors} ramback - @bad max_dirty={size}")
    )
    message(d, "writeback")
    out = json.loads(nbd_script(RACE, d.uri("rb"), REGIONS, REGION).strip().splitlines()[-1])
    assert out["eio"] > 0 and out["data"] > 0, out  # the reader ran before and after the writes
    assert not out["bad"], f"read RAM that a write into EMPTY chunks had not filled yet: {out['bad'][:5]}"
    s = rb_status(d)
    assert s["dirty"] == size // 4096  # every chunk written, none loaded: backing only fails


def marker_path(tmp_path):
    return tmp_path / "state" / "ramback" / "rb-0.json"


def test_an_unreadable_marker_is_reported_as_possible_loss(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", 1 << 20)
    marker = marker_path(tmp_path)
    marker.parent.mkdir(parents=True)
    marker.write_text("")  # what a crash in the middle of writing it can leave
    d = make_daemon(device("rb", f"0 2048 ramback - {img}"))
    s = rb_status(d)
    assert s["warning"] and "DIRTY DATA LOST" in s["warning"] and "unreadable" in s["warning"], s
    assert "warning=DIRTY-DATA-LOST" in d.cli("status").stdout
    assert re.search(r"ERROR.*DIRTY DATA LOST", d.log.read_text())


def test_writeback_waits_until_the_marker_is_on_disk(make_daemon, tmp_path):
    """A state_dir where the marker cannot be written: writes go through to backing, though
    writeback was asked for, until it can be; then writeback goes on."""
    img = random_file(tmp_path / "back.img", 1 << 20)
    blocker = tmp_path / "state" / "ramback"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    d = make_daemon(device("rb", f"0 2048 ramback - {img}"), extra='[power]\nups = "none"\n')
    assert rb_status(d)["mode"] == "writeback"
    data = os.urandom(100000)
    write_at(d, "rb", tmp_path, [(8192, data)])
    with open(img, "rb") as f:
        f.seek(8192)
        assert f.read(len(data)) == data, "a writeback write was acknowledged with no marker on disk"
    s = rb_status(d)
    assert s["dirty"] == 0 and s["marker"] is None
    assert "writes go through to backing until the marker" in d.log.read_text()

    blocker.unlink()  # the flusher's next look writes it, and writeback starts
    s = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (s := rb_status(d))["marker"]:
        time.sleep(0.1)
    assert s["marker"] == str(marker_path(tmp_path)) and json.loads(marker_path(tmp_path).read_text())["mode"] == "writeback"
    write_at(d, "rb", tmp_path, [(300000, os.urandom(50000))])
    assert rb_status(d)["dirty"] > 0


def test_every_marker_write_is_fsynced_before_it_is_renamed_into_place(make_daemon, tmp_path):
    """The periodic refresh too: a crash during a refresh must leave the old marker or the new
    one, never an empty file. Seen in the daemon's system calls."""
    need("strace")
    img = random_file(tmp_path / "back.img", 1 << 20)
    d = make_daemon(device("rb", f"0 2048 ramback - {img}"))
    message(d, "writeback")  # the first marker: durable, and the refreshes every 5 s after it
    trace = tmp_path / "strace.out"
    st = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=openat,fsync,rename", "-o", str(trace), "-p", str(d.proc.pid)])
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if trace.exists() and "rb-0.json\"" in trace.read_text().split("rb-0.json.tmp", 1)[-1]:
                break
    finally:
        st.terminate()
        st.wait(10)
    lines = trace.read_text().splitlines()
    opened = [i for i, line in enumerate(lines) if "openat(" in line and "rb-0.json.tmp" in line]
    renamed = [i for i, line in enumerate(lines) if "rename(" in line and "rb-0.json.tmp" in line]
    assert opened and renamed, "no marker refresh within 15 s"
    fd = re.search(r"= (\d+)$", lines[opened[0]]).group(1)
    pid = lines[opened[0]].split()[0]
    between = lines[opened[0] : renamed[0]]
    assert any(line.startswith(pid) and f"fsync({fd})" in line for line in between), "\n".join(between)
