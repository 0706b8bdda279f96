"""The command line and the config file as an operator meets them: messages, exit codes, sockets."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import time

import pytest

from conftest import REPO, Daemon, config_text, need, run

MiB = 1 << 20
S = 512


def device(name, *lines, **opts):
    text = f'[[device]]\nname = "{name}"\ntable = {json.dumps(list(lines))}\n'
    for key, value in opts.items():
        text += f"{key} = {json.dumps(value)}\n"
    return text + "\n"


def appliance(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def sockets_in(path):
    return sorted(p.name for p in path.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode))


def unlocked(path):
    """True if nobody holds the file's lock (the daemon flocks the files it serves)."""
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


# check-config


BAD_CONFIGS = [
    # (config text, key in the message, words of the message)
    ('[daemon]\nlog_levl = "info"\n', "daemon.log_levl", "did you mean 'log_level'"),
    ('[daemon]\nlog_level = "loud"\n', "daemon.log_level", "is not one of"),
    ('[daemon]\nstate_dir = "relative/dir"\n', "daemon.state_dir", "must be an absolute path"),
    ('[export]\ntcp = "localhost"\n', "export.tcp", "is not HOST:PORT"),
    ("[export]\n", "export", "no listener"),
    ('[[device]]\nname = "a b"\ntable = ["0 8 zero"]\n', "device[0].name", "invalid device name"),
    ('[[device]]\nname = "d"\ntable = ["0 8 zero"]\nread_only = "yes"\n', "device[0].read_only", "expected boolean, got string"),
    ('[[device]]\nname = "d"\n', "device[0].table", "required key is missing"),
    ('[[device]]\nname = "d"\ntable = []\n', "device[0].table", "table is empty"),
    ('[[device]]\nname = "d"\ntable = ["0 8 zero"]\n[[device]]\nname = "d"\ntable = ["0 8 zero"]\n', "device[1].name", "duplicate device name 'd'"),
    ('[[device]]\nname = "d"\ntable = ["0 8 linear @nope 0"]\n', "device[0].table[0]", "reference to unknown device '@nope'"),
    (
        '[[device]]\nname = "a"\ntable = ["0 8 linear @b 0"]\n[[device]]\nname = "b"\ntable = ["0 8 linear @a 0"]\n',
        "device[0].table",
        "reference cycle: a -> b -> a",
    ),
    ('[[device]]\nname = "d"\ntable = ["0 8 zero", "8 x zero"]\n', "device[0].table[1]", "is not a whole number of sectors"),
    ('[[device]]\nname = "d"\ntable = ["0 0 zero"]\n', "device[0].table[0]", "length is zero"),
    ('[[device]]\nname = "d"\ntable = ["0 8 zero", "16 8 zero"]\n', "device[0].table[1]", "gap: sectors 8..15"),
    ('[[device]]\nname = "d"\ntable = ["0 8 strpe"]\n', "device[0].table[0]", "unknown target 'strpe'"),
    ('[bogus]\nx = 1\n', "bogus", "unknown key 'bogus'"),
]


@pytest.mark.parametrize("text, key, words", BAD_CONFIGS, ids=[k + ":" + w.split()[0] for _, k, w in BAD_CONFIGS])
def test_check_config_reports_file_key_and_message_and_exits_1(tmp_path, text, key, words):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    r = appliance("check-config", str(cfg))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line, no traceback
    assert lines[0].startswith(f"{cfg}: {key}: "), lines[0]
    assert words in lines[0], lines[0]
    assert r.stdout == ""


def test_check_config_reports_a_toml_syntax_error_with_its_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[daemon]\nlog_level = "info"\nstate_dir = \n')
    r = appliance("check-config", str(cfg))
    assert r.returncode == 1
    assert r.stderr.startswith(f"{cfg}: line 3: TOML syntax error"), r.stderr


def test_check_config_on_a_missing_file_says_so(tmp_path):
    r = appliance("check-config", str(tmp_path / "nope.toml"))
    assert r.returncode == 1 and "config file not found" in r.stderr


def test_check_config_accepts_a_good_file(tmp_path, image):
    disk = image("disk.img", MiB)
    cfg = tmp_path / "good.toml"
    cfg.write_text(config_text(tmp_path, device("a", f"0 {MiB // S} linear {disk} 0") + device("b", "0 8 zero", "8 8 linear @a 0")))
    r = appliance("check-config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{cfg}: OK, 2 device(s)"
    # --config works the same way as the argument
    r = appliance("--config", str(cfg), "check-config")
    assert r.returncode == 0 and "OK, 2 device(s)" in r.stdout


def test_unknown_target_lists_the_targets(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[device]]\nname = "d"\ntable = ["0 8 linaer /x 0"]\n')
    r = appliance("check-config", str(cfg))
    assert r.returncode == 1
    assert "unknown target 'linaer'; targets: " in r.stderr
    listed = r.stderr.split("targets: ", 1)[1].strip().split(", ")
    assert {"linear", "zero", "error"} <= set(listed)
    assert listed == sorted(listed)


# serve on a bad config


def test_serve_on_a_bad_config_exits_nonzero_and_leaves_no_sockets(tmp_path):
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(config_text(tmp_path, device("d", "0 8 zero", "4 8 zero")))
    r = appliance("--config", str(cfg), "serve", timeout=30)
    assert r.returncode != 0
    assert "device[0].table[1]" in r.stderr and "overlap" in r.stderr
    assert sockets_in(tmp_path) == []


def test_a_table_naming_a_missing_file_fails_start_naming_the_file_and_nothing_half_starts(tmp_path, image):
    good = image("good.img", MiB)
    missing = tmp_path / "missing.img"
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(config_text(tmp_path, device("good", f"0 {MiB // S} linear {good} 0") + device("bad", f"0 {MiB // S} linear {missing} 0")))
    r = appliance("check-config", str(cfg))  # check-config says what serve will
    assert r.returncode == 1 and r.stderr == f"{cfg}: device[1].table[0]: device bad: linear: {missing}: no such file or device\n"
    r = appliance("--config", str(cfg), "serve", timeout=30)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert str(missing) in err and "device bad" in err and "line 1" in err, err
    assert "Errno" not in err and "Traceback" not in r.stderr, r.stderr
    assert sockets_in(tmp_path) == []
    assert unlocked(good)  # the good device was taken down again


def test_a_file_too_small_for_its_table_fails_start_with_the_sizes(tmp_path, image):
    small = image("small.img", 64 * 1024)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(config_text(tmp_path, device("d", f"0 {MiB // S} linear {small} 0")))
    r = appliance("--config", str(cfg), "serve", timeout=30)
    assert r.returncode != 0
    assert "too small: 128 sectors, the table needs 2048" in r.stderr
    assert sockets_in(tmp_path) == []


# a running daemon


@pytest.fixture
def two(make_daemon, image, tmp_path):
    a = image("a b.img", 2 * MiB)  # a space in the path: tables are shell-quoted
    b = image("b.img", 1 * MiB)
    lines = [f"0 {MiB // S} linear {shlex.quote(a)} {MiB // S}", f"{MiB // S} 8 zero", f"{MiB // S + 8} {MiB // S} linear {b} 0"]
    d = make_daemon(device("data0", *lines, description="two files") + device("ro", f"0 {MiB // S} linear {shlex.quote(a)} 0", read_only=True))
    d.lines = lines
    return d


def test_status_json_has_each_devices_segments_with_start_length_type_status(two):
    st = two.status()
    assert st["ok"] is True and st["daemon"]["pid"] == two.proc.pid
    devs = {d["name"]: d for d in st["devices"]}
    assert set(devs) == {"data0", "ro"}
    data0 = devs["data0"]
    assert data0["size"] == (2 * MiB // S + 8) * S
    assert data0["read_only"] is False and devs["ro"]["read_only"] is True
    assert data0["description"] == "two files"
    assert data0["suspended"] is False and data0["exported"] is True
    segs = data0["segments"]
    assert [(s["start"], s["length"], s["type"]) for s in segs] == [(0, MiB // S, "linear"), (MiB // S, 8, "zero"), (MiB // S + 8, MiB // S, "linear")]
    assert all(isinstance(s["status"], dict) for s in segs)
    # one device by name
    one = two.status("ro")["devices"]
    assert [d["name"] for d in one] == ["ro"]
    # the text form has a line per segment
    text = two.cli("status", "data0").stdout.splitlines()
    assert [ln.split()[:3] for ln in text] == [["0", str(MiB // S), "linear"], [str(MiB // S), "8", "zero"], [str(MiB // S + 8), str(MiB // S), "linear"]]


def test_table_round_trips_to_the_configs_lines(two):
    out = two.cli("table", "data0").stdout.splitlines()
    assert out == two.lines
    assert [shlex.split(a) for a in out] == [shlex.split(b) for b in two.lines]
    # and what it prints loads back as the same table
    two.cli("load", "data0", *out)
    two.cli("resume", "data0")
    assert two.cli("table", "data0").stdout.splitlines() == two.lines


def test_ls_lists_devices_with_sizes_in_sectors(two):
    out = two.cli("ls").stdout.splitlines()
    assert out == [f"data0\t{2 * MiB // S + 8} sectors", f"ro\t{MiB // S} sectors"]


def test_message_to_a_target_without_messages_is_a_clear_error(two):
    r = two.cli("message", "data0", "0", "hello", check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == "appliance: linear: no messages supported"
    r = two.cli("message", "data0", str(MiB // S), "hello", check=False)  # the zero segment
    assert r.returncode == 1 and "zero: no messages supported" in r.stderr


def test_commands_on_an_unknown_device_name_the_devices_there_are(two):
    for args in (["status", "nope"], ["table", "nope"], ["suspend", "nope"], ["load", "nope", "0 8 zero"]):
        r = two.cli(*args, check=False)
        assert r.returncode == 1
        assert "no device named 'nope'; devices: data0, ro" in r.stderr, (args, r.stderr)


def test_loading_a_table_with_an_unknown_target_changes_nothing(two):
    r = two.cli("load", "data0", "0 8 bogus", check=False)
    assert r.returncode == 1 and "unknown target 'bogus'" in r.stderr and "line 1" in r.stderr
    assert two.status("data0")["devices"][0]["inactive_table"] is False


def test_control_socket_is_owner_only(two):
    mode = os.stat(two.control).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_a_second_daemon_on_the_same_control_socket_refuses_to_start(two, tmp_path, image):
    other = image("other.img", MiB)
    second = Daemon(tmp_path, config_text(tmp_path, device("x", f"0 {MiB // S} linear {other} 0"), name="second"), name="second")
    # same control socket as the first, its own NBD socket and files
    second.config.write_text(second.config.read_text().replace(str(tmp_path / "second-control.sock"), two.control))
    second.start(expect_ready=False)
    try:
        assert second.proc.wait(30) != 0
    finally:
        second.kill()
    log = second.log.read_text()
    assert "another daemon is listening there" in log, log
    assert not os.path.exists(tmp_path / "second-nbd.sock")
    assert unlocked(other)
    # the first daemon is untouched
    assert stat.S_ISSOCK(os.stat(two.control).st_mode)
    assert two.status()["daemon"]["pid"] == two.proc.pid
    need("qemu-io")
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 4096", "-c", "read -P 0x44 0 4096", two.uri("data0")).stdout
    assert "Pattern verification failed" not in out


def test_cli_without_a_daemon_says_none_is_listening(tmp_path):
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(config_text(tmp_path, device("d", "0 8 zero")))
    r = appliance("--config", str(cfg), "status")
    assert r.returncode == 1
    assert "no daemon is listening on" in r.stderr and "appliance serve" in r.stderr


def test_stopping_the_daemon_removes_its_sockets(make_daemon, tmp_path, image):
    disk = image("disk.img", MiB)
    d = make_daemon(device("d", f"0 {MiB // S} linear {disk} 0"))
    assert set(sockets_in(tmp_path)) == {"appliance-control.sock", "appliance-nbd.sock"}
    assert not unlocked(disk)
    assert d.stop() == 0
    assert sockets_in(tmp_path) == []
    assert unlocked(disk)
