"""SIGHUP re-reads the config and applies only what changed, under connected clients; a bad config is
refused whole; SIGTERM closes the exports, drains and flushes, and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import need, replay_log, run
from nut import free_port

from appliance.control import call

REPO = Path(__file__).resolve().parent.parent
# nbdsh runs `python3 -m nbd`: Debian's python3, which has python3-libnbd (not a pyenv one first in PATH)
NBDSH_ENV = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))

# A client that keeps writing and reading for `seconds`, and reports what it saw.
CLIENT = """
import json, time
t_end = time.monotonic() + {seconds}
ops, errors, gap, last, seen = 0, [], 0.0, time.monotonic(), []
while time.monotonic() < t_end:
    try:
        h.pwrite(b"\\x5a" * 4096, 65536)
        first = h.pread(512, 0)[0]
        if not seen or seen[-1] != first:
            seen.append(first)
        ops += 1
    except Exception as e:
        errors.append(str(e))
        break
    now = time.monotonic()
    gap, last = max(gap, now - last), now
print(json.dumps({{"ops": ops, "errors": errors, "max_gap": gap, "seen": seen}}))
"""


def filled(path: Path, byte: int, size=4 << 20) -> str:
    with open(path, "wb") as f:
        f.write(bytes([byte]) * 4096)
        f.truncate(size)
    return str(path)


def dev(name, path, sectors=8192, extra=""):
    return f'[[device]]\nname = "{name}"\ntable = ["0 {sectors} linear {path} 0"]\n{extra}'


class Clients:
    def __init__(self, d, names, seconds):
        need("nbdsh")
        self.procs = {
            n: subprocess.Popen(["nbdsh", "-u", d.uri(n), "-c", CLIENT.format(seconds=seconds)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=NBDSH_ENV)
            for n in names
        }
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            st = {x["name"]: x["clients"] for x in d.status()["devices"]}
            if all(st.get(n) == 1 for n in names):
                return
            time.sleep(0.05)
        raise AssertionError(f"clients did not connect: {st}")

    def results(self):
        out = {}
        for n, p in self.procs.items():
            stdout, stderr = p.communicate(timeout=60)
            lines = stdout.strip().splitlines()
            out[n] = json.loads(lines[-1]) if lines else {"ops": 0, "errors": [stderr.strip() or "no output"], "seen": []}
        return out


def reload_done(d, after):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        last = d.status()["daemon"]["last_reload"]
        if last and last["time"] > after:
            return last
        time.sleep(0.05)
    raise AssertionError("reload did not happen")


def test_hup_reloads_the_changed_device_and_the_untouched_ones_client_sees_nothing(make_daemon, tmp_path):
    a = filled(tmp_path / "a.img", 0xA1)
    b1, b2 = filled(tmp_path / "b1.img", 0xB1), filled(tmp_path / "b2.img", 0xB2)
    d = make_daemon(dev("a", a) + dev("b", b1))
    clients = Clients(d, ["a", "b"], seconds=4)
    time.sleep(0.7)
    d.config.write_text(d.config.read_text().replace(b1, b2))
    t = time.time()
    d.signal(signal.SIGHUP)
    assert reload_done(d, t)["error"] is None
    r = clients.results()
    assert r["a"]["errors"] == [] and r["b"]["errors"] == [], r
    assert r["a"]["seen"] == [0xA1], r["a"]
    assert r["b"]["seen"] == [0xB1, 0xB2], "the reloaded device's client, still connected, reads the new table"
    assert r["a"]["max_gap"] < 1.0, f"the untouched device stalled {r['a']['max_gap']:.2f}s"
    assert d.cli("table", "b").stdout.split() == ["0", "8192", "linear", b2, "0"]


def test_a_bad_config_on_hup_is_refused_whole_and_everything_keeps_running(make_daemon, tmp_path):
    a, a2 = filled(tmp_path / "a.img", 0xA1), filled(tmp_path / "a2.img", 0xA2)
    b = filled(tmp_path / "b.img", 0xB1)
    d = make_daemon(dev("a", a) + dev("b", b))
    good = d.config.read_text()
    clients = Clients(d, ["a", "b"], seconds=4)
    # not TOML at all
    d.config.write_text(good + "[[device]\n")
    t = time.time()
    d.signal(signal.SIGHUP)
    assert "TOML syntax error" in reload_done(d, t)["error"]
    # valid TOML, but one new device cannot be built: the change to `a` must not happen either
    d.config.write_text(good.replace(a, a2) + dev("c", tmp_path / "missing.img"))
    t = time.time()
    d.signal(signal.SIGHUP)
    err = reload_done(d, t)["error"]
    assert "missing.img" in err, err
    assert d.cli("table", "a").stdout.split()[3] == a
    assert [x["name"] for x in d.status()["devices"]] == ["a", "b"]
    assert "last reload refused" in d.status()["daemon"]["summary"]
    r = clients.results()
    assert r["a"]["errors"] == [] and r["b"]["errors"] == [], r
    assert r["a"]["seen"] == [0xA1] and r["b"]["seen"] == [0xB1]
    # the CLI's reload says why, and exits 1
    out = d.cli("reload", check=False)
    assert out.returncode == 1 and "missing.img" in out.stderr
    assert "reload refused" in d.log.read_text()


def test_hup_removes_a_device_and_disconnects_only_its_client(make_daemon, tmp_path):
    a, b = filled(tmp_path / "a.img", 0xA1), filled(tmp_path / "b.img", 0xB1)
    d = make_daemon(dev("a", a) + dev("b", b))
    clients = Clients(d, ["a", "b"], seconds=3)
    time.sleep(0.5)
    d.config.write_text(d.config.read_text().split("[[device]]")[0] + dev("a", a))
    t = time.time()
    d.signal(signal.SIGHUP)
    assert reload_done(d, t)["error"] is None
    r = clients.results()
    assert r["a"]["errors"] == []
    assert r["b"]["errors"], "the removed device's client must be disconnected"
    assert [x["name"] for x in d.status()["devices"]] == ["a"]
    need("nbdinfo")
    assert run("nbdinfo", "--list", d.uri(), check=False).stdout.count("export=") == 1


def test_hup_drops_a_lower_device_once_the_upper_one_no_longer_stacks_on_it(make_daemon, tmp_path):
    low, direct = filled(tmp_path / "low.img", 0x10), filled(tmp_path / "direct.img", 0x20)
    lower = f'[[device]]\nname = "lower"\nexport = false\ntable = ["0 8192 linear {low} 0"]\n'
    d = make_daemon(lower + dev("upper", "@lower"))
    d.config.write_text(d.config.read_text().split("[[device]]")[0] + dev("upper", direct))
    assert d.cli("reload", check=False).returncode == 0, d.log.read_text()
    assert [x["name"] for x in d.status()["devices"]] == ["upper"]
    assert d.cli("table", "upper").stdout.split()[3] == direct


def test_hup_adds_a_device_and_makes_a_device_read_only(make_daemon, tmp_path):
    need("qemu-io")
    a, b = filled(tmp_path / "a.img", 0xA1), filled(tmp_path / "b.img", 0xB1)
    d = make_daemon(dev("a", a))
    d.config.write_text(d.config.read_text().replace(f'linear {a} 0"]\n', f'linear {a} 0"]\nread_only = true\n') + dev("b", b))
    assert d.cli("reload", check=False).returncode == 0, d.log.read_text()
    out = run("qemu-io", "-f", "raw", "-c", "write 0 512", d.uri("a"), check=False)
    assert out.returncode != 0 or "failed" in (out.stdout + out.stderr).lower()
    assert run("qemu-io", "-f", "raw", "-c", "read -P 0xb1 0 4096", d.uri("b")).returncode == 0


def logged(name, path, log, sectors=8192):
    """`name` stacked on @NAME-log: `log-writes path log`, which records what reached `path` and
    when it was flushed, so a test replays what a power cut would have kept, not the page cache."""
    return (f'[[device]]\nname = "{name}-log"\nexport = false\n'
            f'table = ["0 {sectors} log-writes {path} {log}"]\n\n' + dev(name, f"@{name}-log", sectors))


def test_sigterm_answers_in_flight_flushes_and_exits_zero(make_daemon, tmp_path):
    need("nbdsh")
    a = filled(tmp_path / "a.img", 0)
    log = filled(tmp_path / "a.log", 0, size=16 << 20)
    d = make_daemon(logged("a", a, log))
    # a client that writes and never flushes or disconnects
    code = "h.pwrite(b'\\x77' * 65536, 1048576)\nprint('written', flush=True)\nimport time\ntime.sleep(30)\n"
    client = subprocess.Popen(["nbdsh", "-u", d.uri("a"), "-c", code], stdout=subprocess.PIPE, text=True, env=NBDSH_ENV)
    try:
        assert client.stdout.readline().strip() == "written"
        d.signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
    finally:
        client.kill()
        client.wait()
    assert "stopped" in d.log.read_text()
    durable = replay_log(log, tmp_path / "replayed.img", "--last-flush", size=4 << 20)
    assert durable[1048576 : 1048576 + 65536] == b"\x77" * 65536, "stop did not flush the write to the disk"
    assert not Path(d.socket).exists(), "the NBD socket is removed on stop"


def test_sigterm_drains_ramback_dirty_data_to_backing(make_daemon, tmp_path):
    if not (REPO / "appliance/targets/ramback").exists():
        pytest.skip("no ramback target yet")
    need("nbdsh")
    backing = filled(tmp_path / "backing.img", 0, size=16 << 20)
    log = filled(tmp_path / "backing.log", 0, size=64 << 20)
    table = (f'[[device]]\nname = "backing"\nexport = false\ntable = ["0 32768 log-writes {backing} {log}"]\n\n'
             '[[device]]\nname = "rb"\ntable = ["0 32768 ramback - @backing max_dirty=64M"]\n')
    d = make_daemon(table, extra='[power]\nups = "none"\n')  # no UPS, on purpose: writeback
    code = (
        "import os\nfor i in range(64):\n    h.pwrite(bytes([i + 1]) * 65536, i * 65536)\n"
        "print('written', flush=True)\nimport time\ntime.sleep(30)\n"
    )
    client = subprocess.Popen(["nbdsh", "-u", d.uri("rb"), "-c", code], stdout=subprocess.PIPE, text=True, env=NBDSH_ENV)
    try:
        assert client.stdout.readline().strip() == "written"
        d.signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
    finally:
        client.kill()
        client.wait()
    data = replay_log(log, tmp_path / "replayed.img", "--last-flush", size=16 << 20)  # what reached the disk
    bad = [i for i in range(64) if data[i * 65536 : (i + 1) * 65536] != bytes([i + 1]) * 65536]
    assert not bad, f"chunks {bad[:8]}... not on backing after stop; log:\n{d.log.read_text()[-2000:]}"


def test_a_reload_to_a_tcp_port_in_use_is_refused_and_the_old_listener_still_serves(make_daemon, tmp_path):
    need("nbdinfo")
    a = filled(tmp_path / "a.img", 0xA1)
    port = free_port()
    d = make_daemon(dev("a", a), tcp=port)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken = busy.getsockname()[1]
    try:
        good = d.config.read_text()
        d.config.write_text(good.replace(f"127.0.0.1:{port}", f"127.0.0.1:{taken}") + dev("b", a))
        out = d.cli("reload", check=False)
        assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{taken}" in out.stderr, out.stderr
        st = d.status()
        assert f"tcp:127.0.0.1:{port}" in st["daemon"]["exports"], st["daemon"]
        assert [x["name"] for x in st["devices"]] == ["a"], "the rest of the refused config was applied"
        # both old listeners still serve
        assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/a", timeout=10).stdout.strip() == str(4 << 20)
        assert run("nbdinfo", "--size", d.uri("a"), timeout=10).stdout.strip() == str(4 << 20)
    finally:
        busy.close()
    # a port that is free: the new listener serves, the old one is closed
    other = free_port()
    d.config.write_text(good.replace(f"127.0.0.1:{port}", f"127.0.0.1:{other}"))
    assert d.cli("reload", check=False).returncode == 0, d.log.read_text()
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{other}/a", timeout=10).returncode == 0
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/a", timeout=10, check=False).returncode != 0
    assert run("nbdinfo", "--size", d.uri("a"), timeout=10).returncode == 0


def test_a_reload_that_changes_state_dir_or_shm_dir_is_refused_with_a_message(make_daemon, tmp_path):
    a = filled(tmp_path / "a.img", 0xA1)
    d = make_daemon(dev("a", a))
    good = d.config.read_text()
    d.config.write_text(good.replace(f'state_dir = "{tmp_path}/state"', f'state_dir = "{tmp_path}/elsewhere"'))
    out = d.cli("reload", check=False)
    assert out.returncode == 1, out
    assert "daemon.state_dir cannot change on reload" in out.stderr and "restart" in out.stderr, out.stderr
    assert "daemon.state_dir cannot change" in d.status()["daemon"]["last_reload"]["error"]
    d.config.write_text(good.replace("[daemon]\n", f'[daemon]\nshm_dir = "{tmp_path}/shm"\n'))
    out = d.cli("reload", check=False)
    assert out.returncode == 1 and "daemon.shm_dir cannot change on reload" in out.stderr, out.stderr


def test_a_table_loaded_into_a_rambacks_inactive_slot_leaves_the_live_one_alone(tmp_path):
    """A reload (or `appliance load`) constructs the new table while the old one serves; both share
    one RAM store. The new table's dirty limit must not reach the live one before it is swapped in,
    and destroying it unswapped (a refused reload, dmsetup clear) must leave the live one working.
    In process: the limit the fast path enforces (ChunkState.limit_chunks) is not in status."""
    from types import SimpleNamespace

    from appliance.blockdev import DevicePool
    from appliance.device import MappedDevice, Registry

    backing = filled(tmp_path / "backing.img", 0, size=8 << 20)
    registry = Registry()
    registry.daemon_config = SimpleNamespace(state_dir=str(tmp_path / "state"), shm_dir=str(tmp_path / "shm"),
                                             control=str(tmp_path / "control.sock"))
    dev = MappedDevice("rb", registry, DevicePool())
    registry.add(dev)
    table = f"0 16384 ramback - {backing} max_dirty=4M"
    dev.load([table])
    dev.resume()
    try:
        live = dev.table.targets[0]
        assert live.cs.limit_chunks == (4 << 20) >> 12
        dev.load([table.replace("max_dirty=4M", "max_dirty=1M")])
        assert dev.inactive.targets[0].cs is live.cs, "the loaded table shares the live store"
        assert live.cs.limit_chunks == (4 << 20) >> 12, "the inactive table changed the live limit"
        dev.clear()
        assert live.cs.limit_chunks == (4 << 20) >> 12
        # swapped in, the new table's limit is the one in force
        dev.load([table.replace("max_dirty=4M", "max_dirty=2M")])
        dev.suspend()
        dev.resume()
        assert dev.table.targets[0].cs.limit_chunks == (2 << 20) >> 12
    finally:
        dev.remove()


def test_a_burst_of_hups_during_control_commands_leaves_the_daemon_responsive_and_consistent(make_daemon, tmp_path):
    """Signals land while control commands suspend, resume, load and clear a device and while
    reloads run: the handler only queues, one lock orders the changes, nothing wedges."""
    need("qemu-io")
    a, b1, b2 = filled(tmp_path / "a.img", 0xA1), filled(tmp_path / "b1.img", 0xB1), filled(tmp_path / "b2.img", 0xB2)
    d = make_daemon(dev("a", a) + dev("b", b1))
    configs = [d.config.read_text(), d.config.read_text().replace(b1, b2)]
    stop, errors = threading.Event(), []

    def commands():
        while not stop.is_set():
            try:
                call(d.control, "suspend", name="a", timeout=10)
                call(d.control, "load", name="a", table=[f"0 8192 linear {a} 0"], timeout=10)
                call(d.control, "resume", name="a", timeout=10)
                call(d.control, "load", name="a", table=[f"0 8192 linear {a} 0"], timeout=10)
                call(d.control, "clear", name="a", timeout=10)
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(repr(e))
                return

    worker = threading.Thread(target=commands)
    worker.start()
    try:
        for i in range(120):  # bounded: about 2 s of signals
            if i % 20 == 0:
                d.config.write_text(configs[(i // 20) % 2])
            d.signal(signal.SIGHUP)
            time.sleep(0.015)
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive(), "a control command never answered"
    assert errors == [], errors
    d.config.write_text(configs[1])
    t = time.time()
    d.signal(signal.SIGHUP)
    assert reload_done(d, t)["error"] is None
    st = call(d.control, "status", timeout=5)
    a_st, b_st = st["devices"]
    assert not a_st["suspended"] and not a_st["inactive_table"], a_st
    assert d.cli("table", "b").stdout.split()[3] == b2
    run("qemu-io", "-f", "raw", "-c", "read -P 0xa1 0 4096", d.uri("a"))
    run("qemu-io", "-f", "raw", "-c", "read -P 0xb2 0 4096", d.uri("b"))
    assert d.proc.poll() is None


def test_status_answers_while_a_suspend_waits_for_slow_io(make_daemon, tmp_path):
    """A suspend waits for I/O in flight (here a write that a `delay` target holds 3 s); meanwhile
    `appliance status` answers at once and says the device is not suspended yet."""
    need("qemu-io")
    slow = filled(tmp_path / "slow.img", 0)
    d = make_daemon(f'[[device]]\nname = "slow"\nexport = false\n'
                    f'table = ["0 8192 delay {slow} 0 0 {slow} 0 3000 {slow} 0 0"]\n' + dev("top", "@slow"))
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 7 0 4096", d.uri("top")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while call(d.control, "status", name="slow")["devices"][0]["segments"][0]["status"]["queued"] < 1:
            assert time.monotonic() < deadline, "the write never reached the delay queue"
            time.sleep(0.05)
        suspending = threading.Thread(target=call, args=(d.control, "suspend"), kwargs={"name": "top", "timeout": 30})
        suspending.start()
        time.sleep(0.3)
        t = time.monotonic()
        st = call(d.control, "status", name="top", timeout=10)
        took = time.monotonic() - t
        assert took < 1.0, f"status waited {took:.2f}s for a suspend"
        assert suspending.is_alive(), "the suspend ended before status was asked: nothing shown"
        assert not st["devices"][0]["suspended"]
        suspending.join(30)
        assert call(d.control, "status", name="top")["devices"][0]["suspended"]
        call(d.control, "resume", name="top")
        assert writer.wait(10) == 0, writer.communicate()
    finally:
        writer.kill()
        writer.wait()


def test_a_reload_leaves_a_suspended_device_suspended_and_its_new_table_goes_live_at_resume(make_daemon, tmp_path):
    need("qemu-io")
    a, b = filled(tmp_path / "a.img", 0xA1), filled(tmp_path / "b.img", 0xB1)
    d = make_daemon(dev("x", a))
    d.cli("suspend", "x")
    d.config.write_text(d.config.read_text().replace(a, b))
    assert d.cli("reload", check=False).returncode == 0, d.log.read_text()
    st = d.status("x")["devices"][0]
    assert st["suspended"] is True and st["inactive_table"] is True, st
    assert d.cli("status", "x").stdout.splitlines()[-1] == "(suspended; a loaded table goes live at resume)"
    assert d.cli("table", "x").stdout.split()[3] == a, "the live table changed while suspended"
    d.cli("resume", "x")
    assert d.cli("table", "x").stdout.split()[3] == b
    assert run("qemu-io", "-f", "raw", "-c", "read -P 0xb1 0 4096", d.uri("x")).returncode == 0
    # read_only comes with the table it was loaded with
    d.cli("suspend", "x")
    d.config.write_text(d.config.read_text().replace(f'linear {b} 0"]\n', f'linear {b} 0"]\nread_only = true\n'))
    assert d.cli("reload", check=False).returncode == 0, d.log.read_text()
    assert d.status("x")["devices"][0]["read_only"] is False
    d.cli("resume", "x")
    st = d.status("x")["devices"][0]
    assert st["read_only"] is True and st["suspended"] is False and st["inactive_table"] is False, st
