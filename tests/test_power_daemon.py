"""The daemon's side of power, against a real NUT: status, `appliance power`,
upsmon's NOTIFYCMD, an unreachable upsd. No ramback needed here: these check
what the daemon knows and says (test_power_ramback.py checks what it does)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, need, run
from nut import MON, MON_PW, Nut, need_nut, nut, nut_server  # noqa: F401  (fixtures)

from appliance.power import EVENTS

NOTIFY = REPO / "etc/nut/appliance-notify"
DEVICE = '[[device]]\nname = "d0"\ntable = ["0 2048 linear {img} 0"]\n'


def power_section(ident, poll=0.3, hold=1.0, **more):
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in more.items())
    return (f'[power]\nups = "{ident}"\nuser = "{MON}"\npassword = "{MON_PW}"\n'
            f"poll_interval = {poll}\nonline_hold = {hold}\n{extra}")


def cli_env(d, env, *args):
    """`appliance ARGS` with an environment of our own (upsmon sets NOTIFYTYPE and UPSNAME)."""
    return subprocess.run([sys.executable, "-m", "appliance", "--config", str(d.config), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def power_of(d):
    return d.status()["power"]


def wait_power(d, ok, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = power_of(d)
        if ok(p):
            return p
        time.sleep(0.1)
    raise AssertionError(f"power never got there: {power_of(d)}\n{d.log.read_text()[-3000:]}")


@pytest.fixture
def daemon(make_daemon, image):
    def make(extra, **kw):
        return make_daemon(DEVICE.format(img=image(size=1 << 20)), extra=extra, **kw)

    return make


def test_status_json_has_a_power_object_with_the_ups_readings(nut, daemon):
    d = daemon(power_section(nut.ident))
    p = wait_power(d, lambda p: p["state"] == "online")
    assert p["ups"] == nut.ident
    assert (p["battery.runtime"], p["battery.charge"]) == (600, 100)
    assert p["last_event_source"] == "poll" and p["last_event_time"] > time.time() - 60
    assert p["mode"] == "writeback"


def test_status_text_has_a_power_line(nut, daemon):
    d = daemon(power_section(nut.ident))
    wait_power(d, lambda p: p["state"] == "online")
    nut.status("OB DISCHRG")
    wait_power(d, lambda p: p["state"] == "on_battery")
    first = d.cli("status").stdout.splitlines()[0]
    assert first.startswith("power: on battery (ups ") and "runtime 600 s" in first and "writethrough" in first


def test_appliance_power_event_is_acted_on_at_once(nut, daemon):
    d = daemon(power_section(nut.ident, poll=30))
    wait_power(d, lambda p: p["state"] == "online")
    t = time.monotonic()
    out = d.cli("power", "ONBATT").stdout
    assert time.monotonic() - t < 3  # the CLI's own start-up is most of it
    assert "on_battery" in out and "writethrough" in out
    p = power_of(d)
    assert (p["state"], p["last_event"], p["last_event_source"]) == ("on_battery", "ONBATT", "push")


def test_appliance_power_takes_the_event_from_notifytype_as_upsmon_sets_it(nut, daemon):
    d = daemon(power_section(nut.ident, poll=30))
    wait_power(d, lambda p: p["state"] == "online")
    env = dict(os.environ, NOTIFYTYPE="LOWBATT", UPSNAME=nut.ident)
    r = cli_env(d, env, "power", f"UPS {nut.ident} battery is low")
    assert r.returncode == 0, r.stderr
    assert "low_battery" in r.stdout
    assert power_of(d)["refusing_writes"]
    assert "power: upsmon event LOWBATT" in d.log.read_text()


def test_an_event_for_another_ups_is_ignored(nut, daemon):
    d = daemon(power_section(nut.ident, poll=30))
    wait_power(d, lambda p: p["state"] == "online")
    assert "ignored" in d.cli("power", "--ups", "otherups@localhost", "ONBATT").stdout
    assert power_of(d)["state"] == "online"


def test_appliance_power_without_an_event_says_how_to_use_it(nut, daemon):
    d = daemon(power_section(nut.ident))
    env = {k: v for k, v in os.environ.items() if k != "NOTIFYTYPE"}
    r = cli_env(d, env, "power")
    assert r.returncode == 2 and "ONBATT" in r.stderr


def appliance_cli(d, tmp_path):
    """An `appliance` command for this daemon, for the shipped notify script's $APPLIANCE."""
    cli = tmp_path / "appliance-cli"
    cli.write_text(f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m appliance --config {d.config} \"$@\" "
                   f">> {tmp_path}/notify.log 2>&1\n")
    cli.chmod(0o755)
    return {"APPLIANCE": str(cli)}


def test_a_real_upsmon_notifycmd_reaches_the_daemon(nut, daemon, tmp_path):
    d = daemon(power_section(nut.ident, poll=60, hold=60))  # polls cannot explain a switch
    wait_power(d, lambda p: p["state"] == "online")
    nut.start_upsmon(NOTIFY, env=appliance_cli(d, tmp_path))  # the script etc/nut ships
    time.sleep(2)  # upsmon logs in and polls once on line power
    nut.status("OB DISCHRG")
    p = wait_power(d, lambda p: p["state"] == "on_battery", timeout=6)
    assert (p["last_event"], p["last_event_source"]) == ("ONBATT", "push")
    nut.status("OL")
    p = wait_power(d, lambda p: p["last_event"] == "ONLINE", timeout=6)
    assert p["state"] == "online" and p["mode"] == "writethrough"  # the hold is 60 s


def test_the_shipped_upssched_snippet_hands_events_to_the_daemon(nut, daemon, tmp_path):
    need("upssched")
    d = daemon(power_section(nut.ident, poll=60, hold=60))
    wait_power(d, lambda p: p["state"] == "online")
    conf = (REPO / "etc/nut/upssched.conf.appliance").read_text()
    conf = re.sub(r"(?m)^PIPEFN .*$", f"PIPEFN {nut.state}/upssched.pipe", conf)
    conf = re.sub(r"(?m)^LOCKFN .*$", f"LOCKFN {nut.state}/upssched.lock", conf)
    conf = re.sub(r"(?m)^CMDSCRIPT .*$", f"CMDSCRIPT {NOTIFY}", conf)
    nut.start_upsmon(shutil.which("upssched"), env=appliance_cli(d, tmp_path), upssched=conf)
    time.sleep(2)
    nut.status("OB DISCHRG")
    p = wait_power(d, lambda p: p["state"] == "on_battery", timeout=6)
    assert (p["last_event"], p["last_event_source"]) == ("ONBATT", "push")


def test_the_shipped_upsmon_snippet_covers_every_event():
    text = (REPO / "etc/nut/upsmon.conf.appliance").read_text()
    flags = dict(re.findall(r"(?m)^NOTIFYFLAG (\w+)\s+(\S+)", text))
    for event in EVENTS:
        assert "EXEC" in flags.get(event, ""), event
    assert re.search(r"(?m)^NOTIFYCMD .*appliance-notify$", text)
    assert "wait-clean" in re.search(r"(?m)^SHUTDOWNCMD .*$", text).group(0)
    run("sh", "-n", str(NOTIFY))


def test_upsd_killed_means_unknown_and_the_daemon_recovers_by_itself(tmp_path, daemon):
    need_nut()
    n = Nut(tmp_path).start()
    try:
        d = daemon(power_section(n.ident, poll=0.3, hold=1.0))
        wait_power(d, lambda p: p["mode"] == "writeback")
        n.kill_upsd()
        p = wait_power(d, lambda p: p["state"] == "unknown", timeout=3)
        assert p["mode"] == "writethrough" and f"upsd at 127.0.0.1:{n.port}" in p["error"]
        assert "UNREACHABLE" in d.log.read_text()
        assert d.cli("status").stdout.startswith("power: unknown")
        n.start_upsd()
        p = wait_power(d, lambda p: p["state"] == "online")
        assert p["error"] is None
        wait_power(d, lambda p: p["mode"] == "writeback", timeout=5)
        assert "reachable again" in d.log.read_text()
    finally:
        n.stop()


def test_on_unreachable_writeback_keeps_writeback(tmp_path, daemon):
    need_nut()
    n = Nut(tmp_path).start()
    try:
        d = daemon(power_section(n.ident, on_unreachable="writeback"))
        wait_power(d, lambda p: p["mode"] == "writeback")
        n.kill_upsd()
        p = wait_power(d, lambda p: p["state"] == "unknown", timeout=3)
        assert p["mode"] == "writeback" and "on_unreachable = writeback" in p["reason"]
    finally:
        n.stop()


def test_without_a_power_section_status_says_none_and_why(daemon):
    d = daemon("")
    p = power_of(d)
    assert (p["state"], p["ups"], p["mode"]) == ("none", None, "writethrough")
    assert "no [power] section" in p["reason"]
    assert d.cli("status").stdout.startswith("power: none; writethrough: no [power] section")
    assert "ignored" in d.cli("power", "ONBATT").stdout


def test_ups_none_says_the_data_is_at_risk(daemon):
    d = daemon('[power]\nups = "none"\n')
    p = power_of(d)
    assert (p["state"], p["ups"], p["mode"]) == ("none", "none", "writeback")
    assert "at risk on power loss" in p["reason"]


def test_wait_clean_exits_0_when_nothing_is_dirty(nut, daemon):
    d = daemon(power_section(nut.ident))
    r = d.cli("power", "wait-clean", "--timeout", "5")
    assert r.returncode == 0 and r.stdout.startswith("clean")


def test_a_reload_can_add_the_power_section(nut, daemon):
    d = daemon("")
    assert power_of(d)["state"] == "none"
    d.config.write_text(d.config.read_text().replace("[[device]]", power_section(nut.ident) + "\n[[device]]", 1))
    d.signal(signal.SIGHUP)
    wait_power(d, lambda p: p["state"] == "online" and p["ups"] == nut.ident)
