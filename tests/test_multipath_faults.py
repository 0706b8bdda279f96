"""multipath as an administrator breaks it: remote servers that go away politely or hang, and
disks that are absent when the daemon starts. nbdkit servers over one file are the paths."""

from __future__ import annotations

import time

from conftest import device, qemu_io, remote, wait_for

MiB = 1 << 20
S = 512
SIZE = 32 * MiB
FAST = "[multipath]\npolling_interval = 0.3\n"


def _mp(d):
    return d.status("mp")["devices"][0]["segments"][0]["status"]


def _path(st, word):
    return next(p for g in st["path_groups"] for p in g["paths"] if p["dev"] == word)


def _two_groups(ua, ub):
    """A group each: a request that fails on the first path is retried on the second only if
    its error is a path error."""
    return f"0 {SIZE // S} multipath 0 0 2 1 round-robin 0 1 1 {ua} 1 round-robin 0 1 1 {ub} 1"


def test_a_server_shutting_down_is_a_path_error(make_daemon, image, nbdkit, tmp_path):
    # NBD_ESHUTDOWN is a server saying it is going away: another path to the same storage serves
    disk = image(size=SIZE)
    trigger = tmp_path / "shutdown"
    a = nbdkit("--filter=error", "file", disk, "error=ESHUTDOWN", f"error-file={trigger}", "error-rate=100%")
    b = nbdkit("file", disk)
    ua, ub = remote(a.sock), remote(b.sock)
    d = make_daemon(device("mp", _two_groups(ua, ub)), extra=FAST)
    trigger.touch()
    out = qemu_io(d.uri("mp"), "write -P 0x5a 0 64k", "read -P 0x5a 0 64k", check=False).stdout
    assert "wrote 65536/65536" in out and "read 65536/65536" in out, out
    st = _mp(d)
    assert _path(st, ua)["dm_st"] == "failed" and "ESHUTDOWN" in _path(st, ua)["reason"], st
    assert st["target_errors"] == 0 and _path(st, ub)["requests"] >= 2


def test_an_nbd_eio_reply_fails_the_path_at_once_and_the_request_is_served_by_another(
        make_daemon, image, nbdkit, tmp_path):
    # EIO is a path error (Linux's blk_path_error()): the server or its disk failed, not the
    # storage's answer. It used to reach the client as EIO with the path left up
    disk = image(size=SIZE)
    trigger = tmp_path / "eio"
    a = nbdkit("--filter=error", "file", disk, "error=EIO", f"error-pwrite-file={trigger}",
               "error-pwrite-rate=100%")
    b = nbdkit("file", disk)
    ua, ub = remote(a.sock), remote(b.sock)
    d = make_daemon(device("mp", _two_groups(ua, ub)))  # the checker probes every 5 s: not it
    trigger.touch()
    out = qemu_io(d.uri("mp"), "write -P 0x6b 0 64k", "read -P 0x6b 0 64k", check=False).stdout
    assert "wrote 65536/65536" in out and "read 65536/65536" in out, out
    st = _mp(d)
    assert _path(st, ua)["dm_st"] == "failed" and "EIO" in _path(st, ua)["reason"], st
    assert st["target_errors"] == 0 and d.status("mp")["devices"][0]["errors"] == 0
    with open(disk, "rb") as f:
        assert f.read(65536) == b"\x6b" * 65536


ABSENT_DISK = "wwn:0x5000c500d15ab5e0"  # no such disk is attached


def test_a_map_with_one_path_absent_starts_on_the_others(make_daemon, image, tmp_path):
    # as multipathd: a map is made of the paths that are there; an absent disk does not hold the
    # whole map back (serve used to wait for it and then not serve the map at all)
    disk = image(size=SIZE)
    table = f"0 {SIZE // S} multipath 0 0 1 1 round-robin 0 2 1 {disk} 1 {ABSENT_DISK} 1"
    d = make_daemon(device("mp", table), extra=FAST, start=False)
    d.config.write_text(d.config.read_text().replace("[daemon]\n", "[daemon]\ndisk_timeout = 0.5\n"))
    d.start()
    out = qemu_io(d.uri("mp"), "write -P 0x3c 0 64k", "read -P 0x3c 0 64k").stdout
    assert "wrote 65536/65536" in out and "read 65536/65536" in out, out
    st = _mp(d)
    assert _path(st, disk)["dm_st"] == "active" and _path(st, ABSENT_DISK)["dm_st"] == "failed", st
    # check-config says what serve does: no wait, and a missing file path starts failed too
    r = d.cli("check-config", check=False)
    assert r.returncode == 0 and "waits" not in r.stdout + r.stderr, r.stdout + r.stderr
    cfg = tmp_path / "missing.toml"
    cfg.write_text(d.config.read_text().replace(ABSENT_DISK, str(tmp_path / "typo.img")))
    r = d.cli("check-config", str(cfg), check=False)
    assert r.returncode == 0, r.stderr
    # with no path there at all, the map waits for its disks (and check-config says so)
    cfg.write_text(d.config.read_text().replace(disk, "wwn:0x5000c500d15ab5e1"))
    r = d.cli("check-config", str(cfg), check=False)
    assert r.returncode == 0 and "device mp waits for disk" in r.stdout + r.stderr, r.stdout + r.stderr


def test_a_reload_applies_changed_multipath_settings_to_running_maps(make_daemon, image, nbdkit):
    # multipathd's reconfigure: new [multipath] defaults reach the maps it already has, not only
    # those it makes next (reload said "reloaded" and the running map kept its old settings)
    disk = image(size=SIZE)
    a, b = nbdkit("file", disk), nbdkit("file", disk)
    ua = remote(a.sock)
    d = make_daemon(device("mp", _two_groups(ua, remote(b.sock))))  # defaults: a probe every 5 s
    d.config.write_text(d.config.read_text() + "[multipath]\npolling_interval = 0.3\nqueue_max_bytes = 65536\n")
    d.cli("reload")
    st = _mp(d)
    assert st["polling_interval"] == 0.3 and st["queue_max_bytes"] == 65536, st
    a.kill()
    a.wait()
    # found by probes 0.3 s apart, not 5 s: the loss, then the return
    wait_for(lambda: _path(_mp(d), ua)["dm_st"] == "failed", 2, "the checker to fail the lost path")
    nbdkit("file", disk, sock=a.sock)
    wait_for(lambda: _path(_mp(d), ua)["dm_st"] == "active", 2, "the checker to reinstate it")


def test_a_read_only_path_of_a_writable_map_takes_no_writes(make_daemon, image, nbdkit):
    # as dm refuses a read-only disk in a writable table: a path exported read-only (nbdkit -r)
    # starts failed and says why, rather than fail every write that round-robin sends it
    disk = image(size=SIZE)
    ro, rw = nbdkit("-r", "file", disk), nbdkit("file", disk)
    uro, urw = remote(ro.sock), remote(rw.sock)
    d = make_daemon(device("mp", f"0 {SIZE // S} multipath 0 0 1 1 round-robin 0 2 1 {uro} 1 {urw} 1"),
                    extra=FAST)
    out = qemu_io(d.uri("mp"), *[f"write -P 0x7e {i * 64}k 64k" for i in range(4)], check=False).stdout
    assert out.count("wrote 65536/65536") == 4, out
    p = _path(_mp(d), uro)
    assert p["dm_st"] == "failed" and "read-only" in p["reason"], p
    r = d.cli("load", "mp", f"0 {SIZE // S} multipath 0 0 1 1 round-robin 0 1 1 {uro} 1", check=False)
    assert r.returncode != 0 and "read-only" in r.stderr, r.stderr
