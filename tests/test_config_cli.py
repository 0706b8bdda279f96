"""The command line and the config file as an operator meets them: messages, exit codes, sockets."""

from __future__ import annotations

import argparse
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

from appliance.cli import parser
from conftest import REPO, Daemon, config_text, device, need, run

MiB = 1 << 20
S = 512


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
    ('[export]\ntcp = "0.0.0.0:10809"\n', "export", "set insecure = true to accept that"),
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


def test_status_piped_into_a_reader_that_stops_early_prints_no_traceback(two):
    # `appliance status --json | head -3`: the reader closes the pipe before the output ends
    p = subprocess.Popen([sys.executable, "-m", "appliance", "--config", str(two.config), "status", "--json"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before the daemon answered: every write to stdout fails with EPIPE
    err = p.stderr.read().decode()
    p.wait(30)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert p.returncode == 1


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


# check-config says what serve will: each target parses its arguments with its constructor's
# parser and the files and disks it names are looked at, without opening them


def refused(tmp_path, image):
    """(devices, key, words): configs that serve refuses, one reason each."""
    disk = image("disk.img", MiB)
    small = image("small.img", 64 * 1024)
    return [
        (device("d", f"0 {MiB // S} linear {tmp_path}/missing.img 0"), "device[0].table[0]", f"linear: {tmp_path}/missing.img: no such file or device"),
        (device("d", "0 8 zero", f"8 8 linear {disk} x"), "device[0].table[1]", "linear: offset 'x' is not a number"),
        (device("d", f"0 8 linear {disk}"), "device[0].table[0]", "linear takes <dev> <offset>"),
        (device("d", "0 8 zero 1"), "device[0].table[0]", "zero takes no arguments"),
        (device("d", f"0 8 flakey {disk} 0 1 1 1 explode"), "device[0].table[0]", "unknown feature 'explode'"),
        (device("d", f"0 8 delay {disk} 0 5 {disk} 0"), "device[0].table[0]", "3, 6 or 9 arguments, got 5"),
        (device("d", f"0 8 delay {disk} 0 5 {tmp_path}/nope.img 0 5"), "device[0].table[0]", f"{tmp_path}/nope.img: no such file or device"),
        (device("d", f"0 {MiB // S} ramback - {disk} chunk=1000"), "device[0].table[0]", "chunk=1000 must be a power of two"),
        (device("d", f"0 {MiB // S} ramback - {disk} max_dirty=0"), "device[0].table[0]", "max_dirty '0' must be more than 0 bytes"),
        (device("d", f"0 {MiB // S} ramback - {disk} sync=never"), "device[0].table[0]", "sync=never must be ram or backing"),
        (device("d", f"0 {MiB // S} ramback {tmp_path}/no/dir/store {disk}"), "device[0].table[0]", f"cannot open RAM store {tmp_path}/no/dir/store"),
        (device("d", f"0 {MiB // S} ramback {tmp_path} {disk}"), "device[0].table[0]", f"cannot open RAM store {tmp_path}: Is a directory"),
        (device("d", f"0 {MiB // S} ramback /dev/null {disk}"), "device[0].table[0]", "RAM store /dev/null is not a regular file or block device"),
        (device("d", f"0 {MiB // S} linear {small} 0"), "device[0].table[0]", f"device {small} is too small: 128 sectors, the table needs 2048"),
        (device("d", f"0 {MiB // S} linear {disk} 8"), "device[0].table[0]", "too small: 2048 sectors, the table needs 2056"),
        (device("d", f"0 8 linear {tmp_path} 0"), "device[0].table[0]", f"{tmp_path}: not a regular file or block device"),
        (device("low", "0 8 zero", export=False) + device("d", "0 16 linear @low 0"), "device[1].table[0]", "device @low is too small: 8 sectors, the table needs 16"),
        (device("a", f"0 8 linear {disk} 0") + device("b", f"0 8 linear {disk} 8", direct=True), "device[1].table[0]", f"{disk}: already open with direct=False"),
        (device("d", f"0 8 log-writes {disk}"), "device[0].table[0]", "log-writes takes <dev> <log_dev>"),
        (device("d", f"0 8 log-writes {tmp_path}/nope.img {small}"), "device[0].table[0]", f"{tmp_path}/nope.img: no such file or device"),
        (device("d", f"0 8 log-writes {disk} {tmp_path}/nope.log"), "device[0].table[0]", f"{tmp_path}/nope.log: no such file or device"),
        (device("d", f"0 {MiB // S} log-writes {small} {disk}"), "device[0].table[0]", f"device {small} is too small: 128 sectors, the table needs 2048"),
        (device("low", "0 8 zero", export=False) + device("d", f"0 8 log-writes {disk} @low"), "device[1].table[0]", "the log device @low must be a file or disk"),
        (device("d", f"0 8 log-writes {disk} {tmp_path}/./disk.img"), "device[0].table[0]", f"the log device {tmp_path}/./disk.img is the device being logged"),
        # relative to where? check-config's directory is not the daemon's (systemd runs it in /)
        (device("d", f"0 8 linear {os.path.relpath(disk, REPO)} 0"), "device[0].table[0]", f"{os.path.relpath(disk, REPO)}: not an absolute path"),
        (device("d", f"0 {MiB // S} ramback {os.path.relpath(tmp_path, REPO)}/fast.store {disk}"), "device[0].table[0]", f"{os.path.relpath(tmp_path, REPO)}/fast.store: not an absolute path"),
    ]


REFUSED = 26


@pytest.mark.parametrize("case", range(REFUSED))
def test_check_config_refuses_what_serve_refuses_and_names_it(tmp_path, image, case):
    cases = refused(tmp_path, image)
    assert len(cases) == REFUSED
    devices, key, words = cases[case]
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(config_text(tmp_path, devices))
    r = appliance("check-config", str(cfg))
    assert r.returncode == 1, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line, no traceback
    assert lines[0].startswith(f"{cfg}: {key}: device "), lines[0]
    assert words in lines[0], lines[0]
    # and serve agrees: it refuses the same config for the same reason, and leaves nothing behind
    r = appliance("serve", "--config", str(cfg), timeout=30)
    assert r.returncode != 0, r.stdout
    assert words in r.stderr, r.stderr
    assert sockets_in(tmp_path) == []
    assert unlocked(tmp_path / "disk.img")


def with_disk_timeout(text, seconds):
    return text.replace("[daemon]\n", f"[daemon]\ndisk_timeout = {seconds}\n", 1)


def test_check_config_passes_a_good_config_and_says_which_devices_would_wait_for_a_disk(tmp_path, image):
    need("qemu-io")
    disk = image("disk.img", 4 * MiB)
    absent = "wwn:0x5000c500deadbeef"  # no disk has it: serve waits for it
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(with_disk_timeout(config_text(tmp_path,
        device("fast", f"0 {MiB // S} ramback {tmp_path}/fast.store {disk} chunk=64K max_dirty=1G")
        + device("odd", f"0 {MiB // S} flakey {disk} {MiB // S} 60 0 1 error_writes", "2048 8 zero")
        + device("slow", f"0 {MiB // S} delay {disk} {2 * MiB // S} 1 serialize")
        + device("late", f"0 {MiB // S} linear {absent} 0")
        + device("upper", "0 8 linear @late 0")), 1))
    r = appliance("check-config", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"{cfg}: OK, 5 device(s); 2 would wait for a disk",
        f"{cfg}: device[3].table[0]: device late waits for disk {absent} (not attached now)",
        f"{cfg}: device[4].table[0]: device upper waits for @late (which waits)",
    ]
    # serve agrees: the others serve, those two wait
    d = Daemon(tmp_path, cfg.read_text())
    try:
        d.start()
        assert d.status()["daemon"]["waiting"] == {"late": [absent], "upper": ["@late"]}
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 4096", "-c", "read -P 0x3c 0 4096", d.uri("fast")).stdout
        assert "Pattern verification failed" not in out
    finally:
        d.stop()


def test_a_log_writes_table_over_a_disk_not_attached_waits_for_it_and_the_others_serve(tmp_path, image):
    # log-writes names two devices; a disk among them is waited for, as linear's is, and
    # check-config says so, instead of refusing the whole start
    disk = image("disk.img", MiB)
    log = image("disk.log", MiB)
    absent = "wwn:0x5000c500deadbeef"
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(with_disk_timeout(config_text(tmp_path,
        device("ok", f"0 {MiB // S} log-writes {disk} {log}")
        + device("late", f"0 {MiB // S} log-writes {absent} {image('late.log', MiB)}")), 1))
    r = appliance("check-config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"device late waits for disk {absent} (not attached now)" in r.stdout, r.stdout
    d = Daemon(tmp_path, cfg.read_text())
    try:
        d.start()
        assert d.status()["daemon"]["waiting"] == {"late": [absent]}
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 4096", "-c", "read -P 0x3c 0 4096", d.uri("ok")).stdout
        assert "Pattern verification failed" not in out
    finally:
        d.stop()


# --config after the subcommand


def sample_args(sub):
    """Words that satisfy a subcommand's positional arguments and required options ("0" is a
    NAME, a SECTOR, a SIZE and a word)."""
    return [
        "0" for a in sub._actions
        if not a.option_strings and a.nargs not in ("?", "*", argparse.SUPPRESS) and not isinstance(a, argparse._SubParsersAction)
    ] + [w for a in sub._actions if a.option_strings and a.required for w in (a.option_strings[0], "0")]


def test_every_subcommand_takes_config_before_or_after_it():
    p = parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"serve", "check-config", "status", "ls", "message", "reload", "power"} <= set(subs)
    commands = []
    for name, sub in subs.items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:  # `log-writes list|replay`, `layer create|info|check`: each nested command is a command too
            commands += [([name, n], s) for n, s in nested[0].choices.items()]
        else:
            commands.append(([name], sub))
    for (name, *more), sub in commands:
        args = more + sample_args(sub)
        assert p.parse_args([name, *args, "--config", "/after.toml"]).config == "/after.toml", name
        assert p.parse_args([name, "--config", "/after.toml", *args]).config == "/after.toml", name
        assert p.parse_args(["--config", "/before.toml", name, *args]).config == "/before.toml", name
        assert p.parse_args([name, *args]).config is None, name


def test_config_after_the_subcommand_serves_and_reaches_the_daemon(tmp_path, image, monkeypatch):
    disk = image("disk.img", MiB)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(config_text(tmp_path, device("d", f"0 {MiB // S} linear {disk} 0")))
    assert appliance("check-config", "--config", str(cfg)).stdout == f"{cfg}: OK, 1 device(s)\n"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(cfg)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "connect with:" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        for args in (["ls"], ["status", "--json"], ["status", "d"], ["table", "d"], ["reload"], ["power", "wait-clean"]):
            r = appliance(*args, "--config", str(cfg))
            assert r.returncode == 0 and "warning" not in r.stderr, (args, r.stderr)
        assert appliance("ls", "--config", str(cfg)).stdout == f"d\t{MiB // S} sectors\n"
        assert json.loads(appliance("status", "--json", "--config", str(cfg)).stdout)["daemon"]["pid"] == proc.pid
        r = appliance("message", "d", "0", "hello", "--config", str(cfg))
        assert r.returncode == 1 and r.stderr.strip() == "appliance: linear: no messages supported"
        # APPLIANCE_CONFIG still works
        r = subprocess.run([sys.executable, "-m", "appliance", "ls"], cwd=REPO, capture_output=True, text=True,
                           env=dict(os.environ, APPLIANCE_CONFIG=str(cfg)), timeout=60)
        assert r.stdout == f"d\t{MiB // S} sectors\n", r.stderr
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


# which words are disks: only the target knows


def test_a_ramback_whose_ram_is_a_file_in_dev_shm_comes_up_at_once_and_serves(make_daemon, tmp_path, image):
    need("qemu-io")
    backing = image("back.img", 256 * MiB)
    ram = f"/dev/shm/appliance-test-{os.getpid()}-{time.monotonic_ns()}"
    d = make_daemon(device("rb", f"0 524288 ramback {ram} {backing}"), start=False)
    try:
        t0 = time.monotonic()
        d.start(timeout=15)  # not daemon.disk_timeout (30 s) waiting for a disk ramback creates
        assert time.monotonic() - t0 < 15
        assert d.status()["daemon"]["waiting"] == {}
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0x6b 1M 64k", "-c", "read -P 0x6b 1M 64k", d.uri("rb")).stdout
        assert "Pattern verification failed" not in out
        assert d.status("rb")["devices"][0]["segments"][0]["status"]["store"] == ram
    finally:
        d.stop()
        if os.path.exists(ram):
            os.unlink(ram)


def test_check_config_refuses_a_ram_store_that_does_not_fit_its_directory(tmp_path, image):
    # serve would fail at posix_fallocate; not run here: on a tmpfs that can eat the machine's RAM first
    shm = os.statvfs("/dev/shm")
    sectors = 2 * shm.f_bavail * shm.f_frsize // S
    backing = image("big.img", sectors * S)  # sparse
    ram = f"/dev/shm/appliance-test-{os.getpid()}-{time.monotonic_ns()}"
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(config_text(tmp_path, device("rb", f"0 {sectors} ramback {ram} {backing}")))
    r = appliance("check-config", str(cfg))
    assert r.returncode == 1
    assert r.stderr.startswith(f"{cfg}: device[0].table[0]: device rb: ramback: not enough room for a "), r.stderr
    assert r.stderr.rstrip().endswith("-byte RAM store in /dev/shm"), r.stderr
    assert not os.path.exists(ram)


def test_status_of_one_suspended_device_says_suspended_as_status_of_all_does(two):
    two.cli("suspend", "data0")
    try:
        assert "data0: (suspended)" in two.cli("status").stdout.splitlines()
        assert two.cli("status", "data0").stdout.splitlines()[-1] == "(suspended)"
    finally:
        two.cli("resume", "data0")
    assert "(suspended)" not in two.cli("status", "data0").stdout
