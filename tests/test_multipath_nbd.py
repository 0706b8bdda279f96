"""multipath over remote paths: nbdkit servers over one file are the paths, killed with SIGKILL
for a path loss and given nbdkit's filters as faults (error, delay)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from conftest import device, need, qemu_io, remote, run, wait_for

MiB = 1 << 20
S = 512
SIZE = 32 * MiB
FAST = "[multipath]\npolling_interval = 0.3\n"  # the checker probes three times a second


def _mp(d, name="mp"):
    return d.status(name)["devices"][0]["segments"][0]["status"]


def _path(st, word):
    return next(p for g in st["path_groups"] for p in g["paths"] if p["dev"] == word)


def _map(uris, features="0", selector="round-robin 0", path_args=("1", "1")):
    nargs = len(path_args[0].split())
    paths = " ".join(f"{u} {a}" for u, a in zip(uris, path_args))
    return f"0 {SIZE // S} multipath {features} 0 1 1 {selector} {len(uris)} {nargs} {paths}"


def _pair(nbdkit, disk, filter_a=None, *params_a):
    """Two nbdkit servers over one file; the first with `filter_a` (and its parameters) in front."""
    a = nbdkit(f"--filter={filter_a}", "file", disk, *params_a) if filter_a else nbdkit("file", disk)
    b = nbdkit("file", disk)
    return a, b


def test_fio_verifies_while_a_path_is_killed_and_restarted_three_times(make_daemon, image, nbdkit, tmp_path):
    need("fio")
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk)
    ua, ub = remote(a.sock), remote(b.sock)
    d = make_daemon(device("mp", _map([ua, ub])), extra=FAST)
    for cycle in range(3):  # each run writes a range never written before, so a lost write shows
        fio = subprocess.Popen(
            ["fio", "--name=kill", "--ioengine=nbd", f"--uri={d.uri('mp')}", "--rw=write", "--bs=4k",
             "--iodepth=16", f"--offset={cycle * 8}M", "--size=8M", "--rate_iops=1500",
             "--verify=crc32c", "--verify_fatal=1"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.6)
        a.send_signal(signal.SIGKILL)
        a.wait()
        wait_for(lambda: _path(_mp(d), ua)["dm_st"] == "failed", 10, "the killed path to fail")
        a = nbdkit("file", disk, sock=a.sock)
        wait_for(lambda: _path(_mp(d), ua)["dm_st"] == "active", 15, "the checker to reinstate the path")
        out, _ = fio.communicate(timeout=120)
        assert fio.returncode == 0 and "err= 0" in out, out
        back = _path(_mp(d), ua)["requests"]
        qemu_io(d.uri("mp"), *[f"read {i * 64}k 64k" for i in range(4)])
        assert _path(_mp(d), ua)["requests"] > back  # traffic returns to the path
    st = _mp(d)
    assert _path(st, ua)["failures"] == 3 and _path(st, ub)["failures"] == 0
    assert d.status("mp")["devices"][0]["errors"] == 0


def test_a_storage_error_reaches_the_client_and_the_path_stays_up(make_daemon, image, nbdkit, tmp_path):
    disk = image(size=SIZE)
    trigger = tmp_path / "enospc"
    a, b = _pair(nbdkit, disk, "error", f"error-pwrite-file={trigger}", "error=ENOSPC",
                 "error-pwrite-rate=100%")
    ua, ub = remote(a.sock), remote(b.sock)
    # a group each: what fails on the first path must not be retried on the second
    table = f"0 {SIZE // S} multipath 0 0 2 1 round-robin 0 1 1 {ua} 1 round-robin 0 1 1 {ub} 1"
    d = make_daemon(device("mp", table), extra=FAST)
    trigger.touch()
    out = qemu_io(d.uri("mp"), "write -P 0x44 0 64k", check=False).stdout
    assert "No space left on device" in out, out
    st = _mp(d)
    assert _path(st, ua)["dm_st"] == "active" and _path(st, ua)["failures"] == 0
    assert _path(st, ub)["requests"] == 0 and st["target_errors"] >= 1
    trigger.unlink()
    assert "wrote 65536/65536" in qemu_io(d.uri("mp"), "write -P 0x44 0 64k").stdout


def _both_down(*kits):
    for k in kits:
        k.send_signal(signal.SIGKILL)
        k.wait()


def _qemu_io_bg(uri, *commands):
    need("qemu-io")
    args = ["qemu-io", "-f", "raw", *sum((["-c", c] for c in commands), []), uri]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_queue_if_no_path_holds_io_until_a_path_returns(make_daemon, image, nbdkit):
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk)
    d = make_daemon(device("mp", _map([remote(a.sock), remote(b.sock)], "1 queue_if_no_path")), extra=FAST)
    _both_down(a, b)
    client = _qemu_io_bg(d.uri("mp"), "write -P 0x55 1M 64k")
    wait_for(lambda: _mp(d)["queued"] >= 1, 10, "the write to be held")
    time.sleep(1.0)
    assert client.poll() is None  # still waiting, not failed
    assert _mp(d)["queueing"] == "on" and "multipath 2 1 " in d.cli("status", "mp").stdout
    nbdkit("file", disk, sock=b.sock)
    out, _ = client.communicate(timeout=30)
    assert "wrote 65536/65536" in out, out
    with open(disk, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x55" * 65536


def test_a_reload_while_io_is_held_maps_it_on_the_new_table(make_daemon, image, nbdkit):
    # multipathd reloads with noflush: adding a path while writes wait for one used to fail
    # them (the reload's suspend flushed the queue with EIO)
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk)
    ua, ub = remote(a.sock), remote(b.sock)
    table = _map([ua, ub], "1 queue_if_no_path")
    d = make_daemon(device("mp", table), extra=FAST)
    _both_down(a, b)
    client = _qemu_io_bg(d.uri("mp"), "aio_write -P 0x4e 0 64k", "aio_write -P 0x4f 4M 64k", "aio_flush")
    wait_for(lambda: _mp(d)["queued"] == 2, 10, "the writes to be held")
    c = nbdkit("file", disk)
    uc = remote(c.sock)
    d.config.write_text(d.config.read_text().replace(
        table, _map([ua, ub, uc], "1 queue_if_no_path", path_args=("1", "1", "1"))))
    d.cli("reload")
    out, _ = client.communicate(timeout=30)
    assert out.count("wrote 65536/65536") == 2 and "error" not in out, out
    st = _mp(d)
    assert _path(st, uc)["requests"] >= 2 and st["queued"] == 0, st  # the new path took them
    assert d.status("mp")["devices"][0]["errors"] == 0
    with open(disk, "rb") as f:
        assert f.read(65536) == b"\x4e" * 65536
        f.seek(4 * MiB)
        assert f.read(65536) == b"\x4f" * 65536


def test_no_path_retry_fails_io_after_its_intervals(make_daemon, image, nbdkit):
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk)
    d = make_daemon(device("mp", _map([remote(a.sock), remote(b.sock)], "2 no_path_retry 3")),
                    extra="[multipath]\npolling_interval = 0.5\n")
    t = time.monotonic()
    _both_down(a, b)  # the count starts when the map has no path left
    out = qemu_io(d.uri("mp"), "read 0 4k", check=False).stdout
    waited = time.monotonic() - t
    assert "Input/output error" in out, out
    assert 0.9 <= waited <= 6, waited  # about 3 intervals of 0.5 s (and not at once)
    assert _mp(d)["queueing"] == "0 chk"


def test_no_path_retry_is_a_timer_from_the_loss_of_the_last_path_however_long_probes_hang(make_daemon, image, nbdkit):
    # servers that hang (SIGSTOP), not die: each probe waits checker_timeout (3 s). Counting
    # checker rounds, 2 "intervals" took two rounds of probes of both paths: 14 s, not 2
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk)
    ua, ub = remote(a.sock), remote(b.sock)
    d = make_daemon(device("mp", _map([ua, ub], "2 no_path_retry 2")),
                    extra="[multipath]\npolling_interval = 1\nchecker_timeout = 3\nfast_io_fail_tmo = 0.5\n")
    for k in (a, b):
        k.send_signal(signal.SIGSTOP)
    try:
        t = time.monotonic()
        client = _qemu_io_bg(d.uri("mp"), "read 0 4k")
        # fast_io_fail_tmo fails the path the read went to, then the other (about 1 s each)
        wait_for(lambda: all(p["dm_st"] == "failed" for g in _mp(d)["path_groups"] for p in g["paths"]),
                 10, "both hung paths to fail")
        wait_for(lambda: _mp(d)["queued"] == 1, 2, "the read to be held")
        out, _ = client.communicate(timeout=30)
        waited = time.monotonic() - t
        assert _mp(d)["queueing"] == "0 chk"  # (a path that answers again starts the count anew)
    finally:
        for k in (a, b):
            k.send_signal(signal.SIGCONT)
    assert "Input/output error" in out, out
    assert 2 <= waited <= 6.5, waited  # the two failovers, then 2 x polling_interval


def test_fail_if_no_path_ends_the_wait_at_once_and_the_queue_is_bounded(make_daemon, image, nbdkit):
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk)
    d = make_daemon(device("mp", _map([remote(a.sock), remote(b.sock)], "1 queue_if_no_path")),
                    extra="[multipath]\npolling_interval = 0.3\nqueue_max_bytes = 131072\n")
    _both_down(a, b)
    held = _qemu_io_bg(d.uri("mp"), "aio_write -P 0x66 0 64k", "aio_write -P 0x66 1M 64k", "aio_flush")
    wait_for(lambda: _mp(d)["queued_bytes"] == 131072, 10, "two writes to be held")
    # the cap holds: a third request fails at once instead of waiting (read-only: no flush at close,
    # which would wait: a flush holds no bytes)
    out = run("qemu-io", "-f", "raw", "-r", "-c", "read 2M 64k", d.uri("mp"), check=False, timeout=10).stdout
    assert "Input/output error" in out, out
    assert _mp(d)["queue_full"] >= 1 and held.poll() is None
    t = time.monotonic()
    d.cli("message", "mp", "0", "fail_if_no_path")
    out, _ = held.communicate(timeout=10)
    assert time.monotonic() - t < 1.5
    assert out.count("Input/output error") >= 2, out
    assert _mp(d)["queued"] == 0 and _mp(d)["queueing"] == "off"


def test_stopping_the_daemon_fails_held_io_at_once(make_daemon, image, nbdkit):
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk)
    d = make_daemon(device("mp", _map([remote(a.sock), remote(b.sock)], "1 queue_if_no_path")), extra=FAST)
    _both_down(a, b)
    held = _qemu_io_bg(d.uri("mp"), "write -P 0x77 0 64k")
    wait_for(lambda: _mp(d)["queued"] >= 1, 10, "the write to be held")
    t = time.monotonic()
    assert d.stop(timeout=20) == 0
    out, _ = held.communicate(timeout=10)
    assert time.monotonic() - t < 5, time.monotonic() - t
    assert "wrote" not in out, out


def test_a_hung_path_fails_after_fast_io_fail_tmo_and_its_requests_go_to_another(make_daemon, image, nbdkit):
    # a server that answers 20 s late: its requests used to wait for it (the client's timeout
    # is 30 s); after fast_io_fail_tmo the path fails and they are served by the other one
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk, "delay", "rdelay=20", "wdelay=20")
    ua, ub = remote(a.sock), remote(b.sock)
    d = make_daemon(device("mp", _map([ua, ub])),
                    extra="[multipath]\nfast_io_fail_tmo = 1\nchecker_timeout = 1\n")
    t = time.monotonic()
    out = qemu_io(d.uri("mp"), *[f"write -P 0x3d {i * 64}k 64k" for i in range(4)]).stdout
    took = time.monotonic() - t
    assert out.count("wrote 65536/65536") == 4, out
    assert took < 6, took  # about 1 s for the one that went to the hung path, the rest at once
    st = _mp(d)
    p = _path(st, ua)
    assert p["dm_st"] == "failed" and p["failures"] == 1 and p["in_flight"] == 0, p
    assert st["fast_io_fail_tmo"] == 1 and d.status("mp")["devices"][0]["errors"] == 0
    assert "fast_io_fail_tmo" in d.log.read_text()
    with open(disk, "rb") as f:
        assert f.read(256 * 1024) == b"\x3d" * (256 * 1024)


def test_a_flapping_path_ends_up_marginal_and_out_of_rotation(make_daemon, image, nbdkit, tmp_path):
    disk = image(size=SIZE)
    trigger = tmp_path / "flap"
    a, b = _pair(nbdkit, disk, "error", f"error-pread-file={trigger}", "error=EIO",
                 "error-pread-rate=100%")
    ua, ub = remote(a.sock), remote(b.sock)
    d = make_daemon(device("mp", _map([ua, ub])),
                    extra="[multipath]\npolling_interval = 0.2\nmarginal_window = 5\n")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and _path(_mp(d), ua)["chk_st"] != "shaky":
        trigger.touch()
        time.sleep(0.5)
        trigger.unlink()
        time.sleep(0.5)
    p = _path(_mp(d), ua)
    assert p["chk_st"] == "shaky" and p["dm_st"] == "failed" and p["marginal"] >= 1, p
    # it answers now, but stays out for a while: traffic does not bounce back to it
    time.sleep(0.6)
    p = _path(_mp(d), ua)
    assert p["dm_st"] == "failed" and p["reason"].startswith("marginal: kept out"), p
    before = p["requests"]
    qemu_io(d.uri("mp"), *[f"read {i * 64}k 64k" for i in range(8)])
    assert _path(_mp(d), ua)["requests"] == before


@pytest.mark.parametrize("selector, path_args, balanced", [
    ("round-robin 0", ("1", "1"), True),
    ("queue-length 0", ("1", "1"), False),
    ("service-time 0", ("1 1", "1 1"), False),
    ("historical-service-time 0", ("1", "1"), False),
])
def test_selectors_on_a_fast_and_a_slow_path(make_daemon, image, nbdkit, tmp_path, selector, path_args, balanced):
    need("fio")
    disk = image(size=SIZE)
    slow, fast = _pair(nbdkit, disk, "delay", "rdelay=5ms")
    us, uf = remote(slow.sock), remote(fast.sock)
    d = make_daemon(device("mp", _map([us, uf], selector=selector, path_args=path_args)))
    r = run("fio", "--name=rand", "--ioengine=nbd", f"--uri={d.uri('mp')}", "--rw=randread", "--bs=4k",
            "--iodepth=8", "--size=16M", "--runtime=1.5", "--time_based", cwd=tmp_path)
    assert "err= 0" in r.stdout, r.stdout
    st = _mp(d)
    n_slow, n_fast = _path(st, us)["requests"], _path(st, uf)["requests"]
    if balanced:
        assert abs(n_slow - n_fast) <= 2, (n_slow, n_fast)  # alternates, whatever the paths do
    else:
        assert n_fast > 3 * n_slow, (n_slow, n_fast)  # the slow path gets a small share


def test_a_reload_that_adds_and_removes_a_path_fails_no_request(make_daemon, image, nbdkit, tmp_path):
    need("fio")
    disk = image(size=SIZE)
    a, b = _pair(nbdkit, disk)
    c = nbdkit("file", disk)
    ua, ub, uc = remote(a.sock), remote(b.sock), remote(c.sock)
    d = make_daemon(device("mp", _map([ua, ub])), extra=FAST)
    fio = subprocess.Popen(
        ["fio", "--name=reload", "--ioengine=nbd", f"--uri={d.uri('mp')}", "--rw=randwrite", "--bs=4k",
         "--iodepth=16", "--size=8M", "--rate_iops=1500", "--verify=crc32c", "--verify_fatal=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    config = d.config.read_text()
    d.config.write_text(config.replace(_map([ua, ub]), _map([ua, ub, uc], path_args=("1", "1", "1"))))
    d.cli("reload")
    time.sleep(0.3)
    d.config.write_text(config.replace(_map([ua, ub]), _map([ub, uc])))
    d.cli("reload")
    out, _ = fio.communicate(timeout=120)
    assert fio.returncode == 0 and "err= 0" in out, out
    table = d.cli("table", "mp").stdout
    assert ua not in table and ub in table and uc in table
    assert d.status("mp")["devices"][0]["errors"] == 0
