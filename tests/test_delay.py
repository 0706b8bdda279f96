"""The delay target (dm-delay) through a real daemon and real NBD clients.

Timings are measured inside nbdsh, around the requests only, and asserted
with wide margins so a loaded 2-core machine does not flake.
"""

from __future__ import annotations

import json
import subprocess
import time


from conftest import need, run, nbdsh_env, device

MiB = 1 << 20
SIZE = 4 * MiB
SECTORS = SIZE // 512


def nbdsh_json(uri, script, timeout=60):
    """Run an nbdsh script that prints one JSON document as its last line."""
    need("nbdsh")
    out = run("nbdsh", "-u", uri, "-c", script, timeout=timeout, env=nbdsh_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def read_file(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def segment_status(d, name):
    return d.status(name)["devices"][0]["segments"][0]["status"]


# n concurrent 4 KiB preads with the aio API, `stride` bytes apart; prints the elapsed seconds
AIO_READS = """
import json, time
n = {n}
bufs = [nbd.Buffer(4096) for _ in range(n)]
t0 = time.monotonic()
pending = {{h.aio_pread(bufs[i], i * {stride}) for i in range(n)}}
deadline = t0 + 60
while pending:
    if time.monotonic() > deadline:
        raise SystemExit("reads did not complete in 60 s")
    h.poll(1000)
    # aio_command_completed retires a finished command (and raises if it failed)
    pending = {{c for c in pending if not h.aio_command_completed(c)}}
print(json.dumps({{"elapsed": time.monotonic() - t0}}))
"""


def test_each_read_takes_at_least_the_delay(make_daemon, image):
    disk = image("delay.img", SIZE)
    d = make_daemon(device("dl", f"0 {SECTORS} delay {disk} 0 150"))
    res = nbdsh_json(
        d.uri("dl"),
        """
import json, time
t = []
for i in range(3):
    t0 = time.monotonic()
    h.pread(4096, i * 4096)
    t.append(time.monotonic() - t0)
print(json.dumps(t))
""",
    )
    assert all(x >= 0.150 for x in res), res
    assert sum(res) < 3.0, res
    st = segment_status(d, "dl")
    assert st["reads_delayed"] == 3 and st["queued"] == 0 and st["read_delay_ms"] == 150


def test_writes_and_flushes_go_to_the_write_device_with_their_own_delay(make_daemon, image):
    disk = image("read.img", SIZE)
    wdisk = image("write.img", SIZE)
    d = make_daemon(device("dl", f"0 {SECTORS - 16} delay {disk} 0 0 {wdisk} 16 400"))
    res = nbdsh_json(
        d.uri("dl"),
        """
import json, time
out = {}
t0 = time.monotonic(); h.pread(4096, 0); out["read"] = time.monotonic() - t0
t0 = time.monotonic(); h.pwrite(b"\\x42" * 4096, 8192); out["write"] = time.monotonic() - t0
t0 = time.monotonic(); h.flush(); out["flush"] = time.monotonic() - t0
print(json.dumps(out))
""",
    )
    assert res["read"] < 0.3, res  # no read delay
    assert res["write"] >= 0.4, res
    assert res["flush"] >= 0.4, res
    assert res["write"] + res["flush"] < 4.0, res
    # the write landed on the write device, at write_offset (16 sectors) + 8192
    assert read_file(wdisk, 8192 + 16 * 512, 4096) == b"\x42" * 4096
    assert read_file(disk, 0, 65536) == bytes(65536)
    st = segment_status(d, "dl")
    assert st["writes_delayed"] == 1 and st["flushes_delayed"] >= 1 and st["reads_delayed"] == 0


def test_concurrent_requests_are_delayed_together(make_daemon, image):
    disk = image("delay.img", SIZE)
    d = make_daemon(device("dl", f"0 {SECTORS} delay {disk} 0 200"))
    res = nbdsh_json(d.uri("dl"), AIO_READS.format(n=8, stride=4096))
    # one after another would be 8 x 200 ms = 1.6 s
    assert 0.2 <= res["elapsed"] < 1.0, res


def test_serialize_serves_one_request_at_a_time(make_daemon, image):
    disk = image("delay.img", SIZE)
    d = make_daemon(device("dl", f"0 {SECTORS} delay {disk} 0 100 serialize"))
    res = nbdsh_json(d.uri("dl"), AIO_READS.format(n=8, stride=8192))
    # 8 requests (apart: the device queue would merge adjacent ones), each waiting for the one before it, delay included
    assert 0.8 <= res["elapsed"] < 8.0, res
    st = segment_status(d, "dl")
    assert st["serialize"] is True and st["reads_delayed"] == 8


def test_suspend_lets_the_queue_through_instead_of_waiting_out_the_delay(make_daemon, image):
    need("nbdsh")
    disk = image("delay.img", SIZE)
    d = make_daemon(device("dl", f"0 {SECTORS} delay {disk} 0 20000"))
    client = subprocess.Popen(
        ["nbdsh", "-u", d.uri("dl"), "-c", AIO_READS.format(n=4, stride=8192)],  # apart: not merged
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=nbdsh_env(),
    )
    try:
        deadline = time.monotonic() + 15
        while segment_status(d, "dl")["queued"] < 4:
            assert time.monotonic() < deadline, "the reads never reached the delay queue"
            assert client.poll() is None, client.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        d.cli("suspend", "dl")
        suspend_took = time.monotonic() - t0
        out, err = client.communicate(timeout=15)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err
    assert suspend_took < 10, suspend_took  # far less than the 20 s delay
    assert json.loads(out.strip().splitlines()[-1])["elapsed"] < 15
    st = segment_status(d, "dl")
    assert st["queued"] == 0 and st["delaying"] is False
    assert d.status("dl")["devices"][0]["suspended"] is True
    d.cli("resume", "dl")
    assert segment_status(d, "dl")["delaying"] is True
    # the daemon flushes every device when it stops, and this one delays flushes by 20 s
    d.cli("load", "dl", f"0 {SECTORS} delay {disk} 0 0")
    d.cli("resume", "dl")


def test_table_round_trips_through_appliance_table(make_daemon, image):
    disk = image("a.img", SIZE)
    other = image("b.img", SIZE)
    tables = {
        "d0": f"0 {SECTORS - 8} delay {disk} 8 50",
        "d1": f"0 {SECTORS - 16} delay {disk} 0 50 {other} 16 100",
        "d2": f"0 {SECTORS - 16} delay {disk} 0 50 {other} 16 100 {disk} 8 333",
        "d3": f"0 {SECTORS} delay {disk} 0 5 serialize",
        "d4": f"0 {SECTORS - 16} delay {disk} 0 0 {other} 16 100 serialize",
    }
    d = make_daemon("".join(device(name, line) for name, line in tables.items()))
    for name, line in tables.items():
        assert d.cli("table", name).stdout.strip() == line
    # what `table` prints loads back as the same table (and the old target's worker stops)
    d.cli("load", "d4", d.cli("table", "d4").stdout.strip())
    d.cli("resume", "d4")
    assert d.cli("table", "d4").stdout.strip() == tables["d4"]


def test_bad_arguments_are_refused_with_a_message_naming_them(make_daemon, image):
    disk = image("delay.img", SIZE)
    d = make_daemon(device("dl", f"0 {SECTORS} delay {disk} 0 10"))
    for args, word in (
        (f"{disk} 0", "3, 6 or 9 arguments"),
        (f"{disk} 0 10 {disk} 0", "3, 6 or 9 arguments"),
        (f"{disk} x 10", "offset"),
        (f"{disk} 0 -5", "delay_ms"),
        (f"{disk} 0 10 {disk} 0 soon", "write_delay_ms"),
        (f"{disk} 0 10 {disk} 0 1 {disk} z 1", "flush_offset"),
        (f"{disk} 0 10 serialize serialize", "3, 6 or 9 arguments"),
    ):
        line = f"0 {SECTORS} delay {args}"
        r = d.cli("load", "dl", line, check=False)
        assert r.returncode != 0, line
        assert "delay" in r.stderr and word in r.stderr, (line, r.stderr)
