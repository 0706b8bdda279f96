"""The device request queue: adjacent requests merge before the target, and each client
request still gets its own reply."""

from __future__ import annotations

import json

from conftest import need, run, device

MiB = 1 << 20


def queue_status(d, name):
    return d.status(name)["devices"][0]["queue"]


def test_sequential_writes_at_qd32_reach_a_busy_target_as_a_few_merged_requests(make_daemon, image):
    need("fio")
    disk = image("disk.img", 4 * MiB)
    # serialized delay: a single spindle, busy 20 ms per request, so what comes meanwhile waits
    d = make_daemon(device("q", f"0 8192 delay {disk} 0 20 serialize"))
    before = queue_status(d, "q")
    r = run("fio", "--name=seq", "--ioengine=nbd", f"--uri={d.uri('q')}", "--rw=write", "--bs=4k",
            "--size=256k", "--iodepth=32", "--buffer_pattern=0x5a", "--output-format=json", timeout=120)
    after = queue_status(d, "q")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    # fio matches each reply to its request by cookie: 64 writes, each acknowledged on its own
    assert job["error"] == 0 and job["write"]["total_ios"] == 64, job["write"]
    came = after["in"] - before["in"]
    went = after["dispatched"] - before["dispatched"]
    assert came == 64, after
    assert went <= 8, after
    assert after["merged"] - before["merged"] == came - went
    with open(disk, "rb") as f:
        assert f.read(256 * 1024) == b"\x5a" * (256 * 1024)
