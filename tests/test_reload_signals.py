"""SIGHUP re-reads the config and applies only what changed, under connected clients; a bad config is
refused whole; SIGTERM closes the exports, drains and flushes, and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import need, replay_log, run

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
