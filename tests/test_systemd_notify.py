"""The daemon speaks sd_notify to a datagram socket the test binds, as systemd would:
READY only once the exports answer, STATUS, WATCHDOG fed by the data path, RELOADING, STOPPING."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, need, run
from nut import free_port

from appliance.control import call

DEV = '[[device]]\nname = "{name}"\ntable = ["0 {sectors} linear {path} 0"]\n'


class Notify:
    """The service manager's end of $NOTIFY_SOCKET: every datagram, with its arrival time."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def all(self, key=None):
        with self._lock:
            return [(t, m) for t, m in self.messages if key is None or key in m]

    def wait(self, key, value=None, timeout=20, after=0.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in self.all(key):
                if t >= after and (value is None or m[key] == value):
                    return t, m
            time.sleep(0.02)
        raise AssertionError(f"no {key}{'=' + value if value else ''} in {timeout}s; got {self.all()}")

    def close(self):
        self._stop = True
        self.sock.close()


def start(d, **env):
    """Start the conftest Daemon `d` under a pretend service manager (extra environment)."""
    full = dict(os.environ, PYTHONUNBUFFERED="1")
    full.update(env)
    d._logf = open(d.log, "ab")
    d.proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--config", str(d.config), "serve"],
        cwd=REPO,
        stdout=d._logf,
        stderr=subprocess.STDOUT,
        env=full,
    )
    return d


@pytest.fixture
def notify(tmp_path):
    n = Notify(tmp_path / "notify.sock")
    yield n
    n.close()


def test_ready_is_sent_only_once_every_export_answers(make_daemon, image, notify):
    need("nbdinfo")
    port = free_port()
    devices = DEV.format(name="a", sectors=8192, path=image("a.img", 4 << 20)) + DEV.format(
        name="b", sectors=8192, path=image("b.img", 4 << 20)
    )
    d = start(make_daemon(devices, tcp=port, start=False), NOTIFY_SOCKET=notify.path)
    notify.wait("READY", "1")
    # the moment READY arrives, both listeners and both exports answer
    run("nbdinfo", "--size", d.uri("a"), timeout=10)
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/b", timeout=10).stdout.strip() == str(4 << 20)
    assert len(notify.all("READY")) == 1


def test_status_line_names_devices_exports_and_clients(make_daemon, image, notify):
    port = free_port()
    devices = DEV.format(name="a", sectors=8192, path=image("a.img", 4 << 20)) + DEV.format(
        name="b", sectors=8192, path=image("b.img", 4 << 20)
    )
    d = start(make_daemon(devices, tcp=port, start=False), NOTIFY_SOCKET=notify.path)
    _, m = notify.wait("READY", "1")
    status = m["STATUS"]
    assert status.startswith("2 devices;"), status
    assert f"unix:{d.socket}" in status and f"tcp:127.0.0.1:{port}" in status, status
    assert "0 clients" in status
    assert "\n" not in status
    # the same line is in `appliance status --json`
    assert d.status()["daemon"]["summary"].startswith("2 devices;")


def test_watchdog_is_fed_while_the_data_path_answers(make_daemon, image, notify):
    devices = DEV.format(name="a", sectors=8192, path=image("a.img", 4 << 20))
    d = start(make_daemon(devices, start=False), NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="400000")
    t0, _ = notify.wait("READY", "1")
    time.sleep(1.5)
    pings = [t for t, _ in notify.all("WATCHDOG") if t >= t0]
    assert len(pings) >= 5, f"only {len(pings)} WATCHDOG=1 in 1.5s with WatchdogSec=0.4s"
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 0.4, f"a gap of {max(gaps):.2f}s between pings exceeds WatchdogSec"
    assert d.status()["daemon"]["watchdog_pings"] >= 5


def test_a_long_suspend_does_not_stop_the_watchdog_pings(make_daemon, image, notify):
    """`appliance suspend` of a device whose I/O in flight takes 3 s (a write through a `delay`
    target below it): the suspend is an administrator's, not a wedge, so the pings go on
    while it waits for that write, well past WatchdogSec."""
    need("qemu-io")
    slow = image("slow.img", 4 << 20)
    devices = (f'[[device]]\nname = "slow"\nexport = false\n'
               f'table = ["0 8192 delay {slow} 0 0 {slow} 0 3000 {slow} 0 0"]\n'
               + DEV.format(name="top", sectors=8192, path="@slow"))
    d = start(make_daemon(devices, start=False), NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="800000")
    notify.wait("READY", "1")
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 7 0 4096", d.uri("top")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while call(d.control, "status", name="slow")["devices"][0]["segments"][0]["status"]["queued"] < 1:
            assert time.monotonic() < deadline, "the write never reached the delay queue"
            time.sleep(0.05)
        t0 = time.monotonic()
        call(d.control, "suspend", name="top", timeout=30)  # returns once the write has finished
        t1 = time.monotonic()
        assert t1 - t0 > 1.5, f"the suspend held the device only {t1 - t0:.2f}s: nothing to show"
        pings = [t for t, _ in notify.all("WATCHDOG") if t0 <= t <= t1]
        gaps = [b - a for a, b in zip([t0] + pings, pings + [t1])]
        assert max(gaps) < 0.8, f"a {max(gaps):.2f}s gap between pings while `top` was being suspended"
        assert "data path not answering" not in d.log.read_text()
        call(d.control, "resume", name="top", timeout=30)
        assert writer.wait(10) == 0, writer.communicate()
    finally:
        writer.kill()
        writer.wait()


def test_no_watchdog_for_another_pid(make_daemon, image, notify):
    devices = DEV.format(name="a", sectors=8192, path=image("a.img", 4 << 20))
    start(make_daemon(devices, start=False), NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    t0, _ = notify.wait("READY", "1")
    time.sleep(0.6)
    assert not notify.all("WATCHDOG")


def test_a_wedged_backing_device_stops_the_watchdog_pings(make_daemon, tmp_path, notify):
    """The backing file is on FUSE (nbdfuse over nbdkit). Stopping nbdfuse wedges every read of it:
    the pings must stop, and start again once it runs."""
    need("nbdfuse", "nbdkit")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(mnt / "disk"), "--command", "nbdkit", "-s", "memory", "64M"])
    try:
        deadline = time.monotonic() + 10
        while not (mnt / "disk").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mnt / "disk").exists(), "nbdfuse did not mount"
        devices = DEV.format(name="a", sectors=131072, path=mnt / "disk")
        d = start(make_daemon(devices, start=False), NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="600000")
        t0, _ = notify.wait("READY", "1")
        time.sleep(0.8)
        assert len(notify.all("WATCHDOG")) >= 3
        fuse.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.5)  # a round already under way may still answer
            wedged = time.monotonic()
            time.sleep(1.5)
            late = [t for t, _ in notify.all("WATCHDOG") if t > wedged]
            assert not late, f"{len(late)} pings while every read of the backing file hangs"
        finally:
            fuse.send_signal(signal.SIGCONT)
        notify.wait("WATCHDOG", after=time.monotonic(), timeout=5)
        assert "data path not answering" in d.log.read_text()
        assert d.stop() == 0
    finally:
        fuse.send_signal(signal.SIGCONT)
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        try:
            fuse.wait(10)
        except subprocess.TimeoutExpired:
            fuse.kill()


def test_hup_sends_reloading_then_ready_and_term_sends_stopping(make_daemon, image, notify):
    devices = DEV.format(name="a", sectors=8192, path=image("a.img", 4 << 20))
    d = start(make_daemon(devices, start=False), NOTIFY_SOCKET=notify.path)
    t0, _ = notify.wait("READY", "1")
    d.config.write_text(d.config.read_text() + DEV.format(name="b", sectors=8192, path=image("b.img", 4 << 20)))
    d.signal(signal.SIGHUP)
    t1, m = notify.wait("RELOADING", "1", after=t0)
    assert int(m["MONOTONIC_USEC"]) > 0  # systemd >= 253 wants it with RELOADING=1
    t2, m = notify.wait("READY", "1", after=t1)
    assert m["STATUS"].startswith("2 devices;")
    d.signal(signal.SIGTERM)
    t3, m = notify.wait("STOPPING", "1", after=t2)
    assert d.proc.wait(20) == 0
    last = notify.all("STATUS")[-1][1]["STATUS"]
    assert last.startswith("stopped"), last


def test_a_refused_reload_shows_in_status(make_daemon, image, notify):
    devices = DEV.format(name="a", sectors=8192, path=image("a.img", 4 << 20))
    d = start(make_daemon(devices, start=False), NOTIFY_SOCKET=notify.path)
    t0, _ = notify.wait("READY", "1")
    d.config.write_text(d.config.read_text() + '[[device]]\nname = "b"\ntable = ["0 8 linear /nonexistent/x.img 0"]\n')
    d.signal(signal.SIGHUP)
    _, m = notify.wait("READY", "1", after=t0 + 1e-6)
    assert "1 device;" in m["STATUS"] and "last reload refused" in m["STATUS"], m["STATUS"]
    assert "/nonexistent/x.img" in m["STATUS"]


def test_logs_under_journald_carry_priorities_and_nothing_is_dropped(make_daemon, image, tmp_path):
    """With $JOURNAL_STREAM naming our stderr (as systemd sets it), lines carry "<N>" priorities when
    systemd-python is absent, and records the journal socket refuses still reach stderr."""
    devices = DEV.format(name="a", sectors=8192, path=image("a.img", 4 << 20))
    d = make_daemon(devices, start=False)
    err = tmp_path / "stderr"
    err.touch()
    st = os.stat(err)
    env = dict(os.environ, PYTHONUNBUFFERED="1", JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    with open(err, "ab") as f:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(d.config), "serve"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=f, env=env,
        )
    deadline = time.monotonic() + 20
    while "serving 1 device" not in err.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.stop() == 0
    text = err.read_text()
    assert "serving 1 device" in text and "stopped" in text, text
    if importlib.util.find_spec("systemd") is None:  # else JournalHandler, falling back to stderr
        assert "<6>appliance: serving 1 device" in text, text


def test_journal_handler_falls_back_to_stderr_when_journald_is_not_there(tmp_path):
    """systemd-python's JournalHandler would drop records without a journal socket; ours writes them
    to stderr. Run with Debian's python3, which has systemd-python (python3-systemd)."""
    system_python = "/usr/bin/python3"
    if subprocess.run([system_python, "-c", "import systemd.journal"], capture_output=True).returncode:
        pytest.skip("no systemd-python for /usr/bin/python3 (Debian package python3-systemd)")
    if os.path.exists("/run/systemd/journal/socket"):
        pytest.skip("journald runs here: records would go to it")
    err = tmp_path / "stderr"
    err.touch()
    st = os.stat(err)
    code = "from appliance.logsetup import setup_logging; import logging, sys\n" \
        "print(setup_logging(), file=sys.__stdout__)\n" \
        "logging.getLogger('appliance').error('disk %s went away', 'wwn:0x1')\n"
    with open(err, "ab") as f:
        r = subprocess.run([system_python, "-c", code], cwd=REPO, stderr=f, stdout=subprocess.PIPE, text=True,
                           env=dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", PYTHONPATH=str(REPO)))
    assert r.stdout.strip() == "journal"
    assert "<3>appliance: disk wwn:0x1 went away" in err.read_text()
