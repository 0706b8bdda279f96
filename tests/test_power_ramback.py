"""UPS events drive a real ramback, end to end: the dummy UPS -> upsd (and
upsmon) -> the daemon's power monitor -> the ramback target -> the backing
file, with real NBD clients (fio, qemu-io, nbdcopy) writing all along.

The ramback sits on a `delay` target over the backing file, so flushing
takes real time and dirty data is there to see.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, need, run
from nut import MON, MON_PW, Nut, need_nut, nut, nut_server  # noqa: F401  (fixtures)

from appliance.control import call

pytestmark = pytest.mark.skipif(
    not list((REPO / "appliance" / "targets").glob("ramback*")),
    reason="the ramback target (appliance/targets/ramback*) has not landed yet; these run once it does",
)

SIZE = 64 << 20
SECTORS = SIZE // 512
CHUNK = 64 << 10


def tables(img, write_ms):
    """`slow`: the backing file behind a write delay; `r0`: the ramback on it."""
    return (
        f'[[device]]\nname = "slow"\nexport = false\n'
        f'table = ["0 {SECTORS} delay {img} 0 0 {img} 0 {write_ms}"]\n\n'
        f'[[device]]\nname = "r0"\ntable = ["0 {SECTORS} ramback - @slow chunk={CHUNK}"]\n'
    )


def power_section(ident, poll=0.3, hold=1.0, **more):
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in more.items())
    return (f'[power]\nups = "{ident}"\nuser = "{MON}"\npassword = "{MON_PW}"\n'
            f"poll_interval = {poll}\nonline_hold = {hold}\n{extra}")


@pytest.fixture
def appliance(make_daemon, image):
    """appliance(power_toml, write_ms=2) -> (daemon, backing image path)."""

    def make(extra, write_ms=2):
        img = image("backing.img", SIZE)
        return make_daemon(tables(img, write_ms), extra=extra), img

    return make


def ask(d, cmd, **kw):
    """The control socket, in-process: no CLI start-up in the timings."""
    return call(d.control, cmd, **kw)


def rb(d):
    """r0's ramback status (mode, dirty_bytes, flush_bandwidth, dirty_limit_bytes, ...)."""
    return ask(d, "status", name="r0")["devices"][0]["segments"][0]["status"]


def wait_rb(d, ok, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = rb(d)
        if ok(s):
            return s
        time.sleep(step)
    raise AssertionError(f"r0 never got there in {timeout}s: {rb(d)}\npower: {ask(d, 'status')['power']}")


def fio(uri, *extra, background=False):
    need("fio")
    args = ["fio", "--name=power", "--ioengine=nbd", f"--uri={uri}", "--bs=64k", "--iodepth=4",
            "--output-format=terse", *extra]
    if background:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return run(*args, timeout=120)


def qemu_io(uri, *commands):
    need("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)


def device_equals_backing(d, img, tmp_path):
    need("nbdcopy")
    copy = tmp_path / "device.copy"
    run("nbdcopy", d.uri("r0"), str(copy), timeout=120)
    return Path(img).read_bytes() == copy.read_bytes()


def test_on_battery_under_fio_switches_within_a_poll_and_drains_to_zero(nut, appliance):
    d, _ = appliance(power_section(nut.ident, poll=0.5, hold=2))
    wait_rb(d, lambda s: s["mode"] == "writeback")
    load = fio(d.uri("r0"), "--rw=randwrite", "--size=48m", "--time_based", "--runtime=15", background=True)
    try:
        wait_rb(d, lambda s: s["dirty_bytes"] > 0)
        nut.status("OB DISCHRG")  # returns once upsd shows it
        seen = time.monotonic()
        wait_rb(d, lambda s: s["mode"] == "writethrough", timeout=3)
        assert time.monotonic() - seen <= 0.5 + 0.5  # one poll interval, and our own status round trip
        wait_rb(d, lambda s: s["dirty_bytes"] == 0, timeout=30)
        assert load.poll() is None, "the drain finished only after the load: nothing proven"
        p = ask(d, "status")["power"]
        assert p["state"] == "on_battery" and "drain_eta_seconds" in p
    finally:
        out, _ = load.communicate(timeout=60)
    assert load.returncode == 0, out


def test_a_push_switches_to_writethrough_within_a_second(nut, appliance):
    d, _ = appliance(power_section(nut.ident, poll=30))
    wait_rb(d, lambda s: s["mode"] == "writeback")
    fio(d.uri("r0"), "--rw=randwrite", "--size=16m")
    t = time.monotonic()
    ask(d, "power", event="ONBATT")
    assert rb(d)["mode"] == "writethrough"
    assert time.monotonic() - t < 1.0
    wait_rb(d, lambda s: s["dirty_bytes"] == 0, timeout=30)


def test_line_power_returns_writeback_after_the_hold_and_a_flapping_line_stays_writethrough(nut, appliance):
    d, _ = appliance(power_section(nut.ident, poll=0.2, hold=5))
    wait_rb(d, lambda s: s["mode"] == "writeback")
    modes = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            modes.append((time.monotonic(), rb(d)["mode"]))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        nut.status("OB")
        wait_rb(d, lambda s: s["mode"] == "writethrough", timeout=2)
        start = time.monotonic()
        for i in range(1, 6):  # 4 to 8 s of a line that drops every second or two
            nut.status("OB" if i % 2 == 0 else "OL")
            steady = time.monotonic()  # upsd shows it now; the last one is OL
            time.sleep(0.7)  # several polls see each state: a shorter flap only a push can catch
        wait_rb(d, lambda s: s["mode"] == "writeback", timeout=5 + 3)
        back = time.monotonic()
    finally:
        stop.set()
        sampler.join()
    flapping = [m for t, m in modes if start < t < steady + 0.7]
    assert flapping and set(flapping) == {"writethrough"}
    assert back - steady >= 5 - 0.5  # the hold, less the time upsrw took to show OL


def test_low_battery_refuses_writes_and_wait_clean_returns_once_clean(nut, appliance):
    d, img = appliance(power_section(nut.ident, poll=0.3), write_ms=20)
    wait_rb(d, lambda s: s["mode"] == "writeback")
    r = qemu_io(d.uri("r0"), f"write -P 0x5a 0 {16 << 20}")
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr
    assert rb(d)["dirty_bytes"] > 0
    nut.status("OB LB")
    wait_rb(d, lambda s: s["mode"] == "writethrough", timeout=2)
    assert ask(d, "status")["power"]["refusing_writes"]
    refused = qemu_io(d.uri("r0"), "write -P 0xa5 0 65536")
    assert "failed" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    t = time.monotonic()
    wait = d.cli("power", "wait-clean", "--timeout", "60", check=False)
    assert wait.returncode == 0, wait.stderr
    assert time.monotonic() - t < 60
    assert rb(d)["dirty_bytes"] == 0
    p = ask(d, "status")["power"]
    assert p["state"] == "low_battery"
    deadline = time.monotonic() + 5
    while not ask(d, "status")["power"]["safe_to_power_off"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ask(d, "status")["power"]["safe_to_power_off"]
    assert "safe to power off" in d.log.read_text()
    # every acknowledged write is on the backing file; the refused one is nowhere
    with open(img, "rb") as f:
        assert f.read(16 << 20) == b"\x5a" * (16 << 20)
    check = qemu_io(d.uri("r0"), f"read -P 0x5a 0 {16 << 20}")
    assert "Pattern verification failed" not in check.stdout + check.stderr


def test_upsd_killed_applies_the_policy_and_recovers_when_it_returns(tmp_path, appliance):
    need_nut()
    n = Nut(tmp_path).start()
    try:
        d, _ = appliance(power_section(n.ident, poll=0.3, hold=1))
        wait_rb(d, lambda s: s["mode"] == "writeback")
        n.kill_upsd()
        wait_rb(d, lambda s: s["mode"] == "writethrough", timeout=0.3 + 1.5)
        assert ask(d, "status")["power"]["state"] == "unknown"
        assert "UNREACHABLE" in d.log.read_text()
        n.start_upsd()
        wait_rb(d, lambda s: s["mode"] == "writeback", timeout=10)
        assert ask(d, "status")["power"]["state"] == "online"
    finally:
        n.stop()


def test_a_real_upsmon_push_switches_the_ramback(nut, appliance, tmp_path):
    d, _ = appliance(power_section(nut.ident, poll=60, hold=60))  # a poll cannot explain the switch
    wait_rb(d, lambda s: s["mode"] == "writeback")
    cli = tmp_path / "appliance-cli"  # `appliance` for this daemon, for the shipped script's $APPLIANCE
    cli.write_text(f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m appliance --config {d.config} \"$@\" "
                   f">> {tmp_path}/notify.log 2>&1\n")
    cli.chmod(0o755)
    nut.start_upsmon(REPO / "etc/nut/appliance-notify", env={"APPLIANCE": str(cli)})
    time.sleep(2)  # upsmon logs in and sees line power first
    nut.status("OB DISCHRG")
    seen = time.monotonic()
    wait_rb(d, lambda s: s["mode"] == "writethrough", timeout=6)
    assert time.monotonic() - seen < 5  # upsmon's POLLFREQ 1, the notify script, and the switch
    p = ask(d, "status")["power"]
    assert (p["last_event"], p["last_event_source"]) == ("ONBATT", "push")


def test_without_a_power_section_a_ramback_starts_writethrough_and_says_why(appliance):
    d, _ = appliance("")
    s = rb(d)
    assert s["mode"] == "writethrough"
    assert "no [power] section" in str(s.get("mode_reason", s))
    d.cli("message", "r0", "0", "writeback")
    assert rb(d)["mode"] == "writeback"  # the user may; the log says what it costs
    assert "set to writeback by hand" in d.log.read_text()


def test_with_ups_none_a_ramback_starts_writeback_and_says_the_data_is_at_risk(appliance):
    d, _ = appliance('[power]\nups = "none"\n')
    s = rb(d)
    assert s["mode"] == "writeback"
    assert "at risk" in str(s.get("mode_reason", s))


def test_twenty_line_cycles_under_verified_writes_lose_nothing(nut, appliance, tmp_path):
    d, img = appliance(power_section(nut.ident, poll=30, hold=0.2))
    wait_rb(d, lambda s: s["mode"] == "writeback")
    done = threading.Event()
    results = []

    def writer():
        for i in range(200):  # bounded; stops when the cycles are done
            if done.is_set():
                return
            r = subprocess.run(
                ["fio", "--name=verify", "--ioengine=nbd", f"--uri={d.uri('r0')}", "--rw=randwrite",
                 "--bs=64k", "--iodepth=4", "--size=16m", f"--offset={(i % 3) * (16 << 20)}",
                 "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
                 f"--randseed={i}"],
                capture_output=True, text=True, timeout=120,
            )
            results.append(r)

    need("fio")
    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 120
    try:
        for _ in range(20):
            ask(d, "power", event="ONBATT")
            assert rb(d)["mode"] == "writethrough"
            time.sleep(0.3)
            ask(d, "power", event="ONLINE")
            wait_rb(d, lambda s: s["mode"] == "writeback", timeout=3)
            time.sleep(0.3)
            assert time.monotonic() < deadline
    finally:
        done.set()
        t.join(180)
    assert results, "no write load ran"
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert d.cli("power", "wait-clean", "--timeout", "60", check=False).returncode == 0
    assert device_equals_backing(d, img, tmp_path)


def test_the_dirty_limit_follows_battery_runtime(nut, appliance):
    d, _ = appliance(power_section(nut.ident, poll=0.3, safety_factor=0.5), write_ms=5)
    wait_rb(d, lambda s: s["mode"] == "writeback")
    fio(d.uri("r0"), "--rw=write", "--size=8m")
    s = wait_rb(d, lambda s: (s.get("flush_bandwidth") or 0) > 0, timeout=20)
    nut.set("battery.runtime", 1)
    s = wait_rb(d, lambda s: s["dirty_limit_bytes"] is not None
                and s["dirty_limit_bytes"] <= 1 * s["flush_bandwidth"] * 0.5 * 1.1, timeout=3)
    low = s["dirty_limit_bytes"]
    assert any("battery.runtime" in str(v) for v in s.values()), s  # status says why
    # write far more than the limit; dirty data stays capped (writers are throttled, not failed)
    worst = []
    load = fio(d.uri("r0"), "--rw=randwrite", "--size=48m", background=True)
    try:
        deadline = time.monotonic() + 60
        while load.poll() is None and time.monotonic() < deadline:
            s = rb(d)
            worst.append((s["dirty_bytes"], s["dirty_limit_bytes"]))
            time.sleep(0.05)
    finally:
        out, _ = load.communicate(timeout=60)
    assert load.returncode == 0, out
    assert worst and all(dirty <= limit * 1.2 + 4 * CHUNK for dirty, limit in worst), max(worst)
    nut.set("battery.runtime", 600)
    # up again: to the battery's figure, or to the ramback's own max_dirty if that is lower
    wait_rb(d, lambda s: s["dirty_limit_bytes"] is None or s["dirty_limit_bytes"] > 10 * low, timeout=3)
