"""Tests for appliance.config and appliance.schema."""

import dataclasses
import sys
import types

import pytest

from appliance import config, schema
from appliance.config import ConfigError, load, loads

LINE = "0 2097152 linear /srv/disk.img 0"
MINIMAL = f'[[device]]\nname = "data0"\ntable = ["{LINE}"]\n'


@pytest.fixture(autouse=True)
def stub_table(request, monkeypatch):
    """Config tests check config rules, not table syntax: stand in for
    appliance.table with a parser that accepts everything, except in tests
    using the real_table fixture (which exercise the real module)."""
    if "real_table" in request.fixturenames:
        return
    mod = types.ModuleType("appliance.table")

    class TableError(ValueError):
        def __init__(self, line, message):
            super().__init__(message)
            self.line, self.message = line, message

    mod.TableError = TableError
    mod.parse_table = lambda lines, *, known_devices=None: []
    monkeypatch.setitem(sys.modules, "appliance.table", mod)
    return mod


@pytest.fixture
def real_table():
    table = pytest.importorskip("appliance.table")
    try:
        table.parse_table([LINE])
    except ImportError as e:    # appliance.table's own dependencies not there yet
        pytest.skip(f"appliance.table not usable yet: {e}")
    return table


def err(text, path="/etc/appliance/appliance.toml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text, path)
    return info.value


def devices(*specs):
    """[[device]] tables from (name, [lines]) pairs."""
    out = []
    for name, lines in specs:
        quoted = ", ".join(f'"{l}"' for l in lines)
        out.append(f'[[device]]\nname = "{name}"\ntable = [{quoted}]\n')
    return "".join(out)


# ---- valid configs and defaults --------------------------------------------

def test_valid_minimal_config():
    cfg = loads(MINIMAL)
    assert [d.name for d in cfg.devices] == ["data0"]
    assert cfg.devices[0].table == (LINE,)
    assert cfg.source == "<string>"


def test_empty_file_is_valid_with_no_devices():
    cfg = loads("")
    assert cfg.devices == ()
    assert cfg.power is None


def test_daemon_defaults():
    d = loads(MINIMAL).daemon
    assert d == config.DaemonConfig("/run/appliance/control.sock", "/var/lib/appliance", "info")


def test_device_defaults():
    d = loads(MINIMAL).devices[0]
    assert (d.read_only, d.description, d.export, d.direct, d.exclusive) == \
        (False, "", True, False, True)


def test_device_all_keys():
    d = loads(MINIMAL + 'read_only = true\ndescription = "x"\nexport = false\n'
              'direct = true\nexclusive = false\n').devices[0]
    assert (d.read_only, d.description, d.export, d.direct, d.exclusive) == \
        (True, "x", False, True, False)


def test_table_single_string_means_one_line():
    cfg = loads(f'[[device]]\nname = "a"\ntable = "{LINE}"\n')
    assert cfg.devices[0].table == (LINE,)


def test_device_config_equality_is_by_value():
    assert loads(MINIMAL).devices[0] == loads(MINIMAL).devices[0]
    assert loads(MINIMAL).devices[0] != loads(MINIMAL + "read_only = true\n").devices[0]


def test_log_level_is_case_insensitive():
    assert loads('[daemon]\nlog_level = "DEBUG"\n').daemon.log_level == "debug"


def test_bad_log_level():
    e = err('[daemon]\nlog_level = "verbose"\n')
    assert e.key == "daemon.log_level" and "verbose" in e.message


def test_relative_state_dir_rejected():
    assert err('[daemon]\nstate_dir = "var/lib"\n').key == "daemon.state_dir"


# ---- [export] --------------------------------------------------------------

def test_no_export_table_uses_default_unix_only():
    assert loads(MINIMAL).export == config.ExportConfig("/run/appliance/nbd.sock", None)


def test_export_names_only_tcp():
    assert loads('[export]\ntcp = "127.0.0.1:10809"\n').export == \
        config.ExportConfig(None, ("127.0.0.1", 10809))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "[::]", "nas.local"])
def test_tcp_other_machines_reach_needs_insecure(host):
    e = err(f'[export]\ntcp = "{host}:10809"\n')
    assert e.key == "export" and "insecure = true" in e.message and "reachable from other machines" in e.message
    assert loads(f'[export]\ntcp = "{host}:10809"\ninsecure = true\n').export.insecure


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "[::1]", "localhost"])
def test_tcp_loopback_needs_nothing(host):
    assert not loads(f'[export]\ntcp = "{host}:10809"\n').export.insecure


def test_export_limits_and_socket():
    import grp
    import os
    group = grp.getgrgid(os.getgid()).gr_name
    ex = loads(f'[export]\nunix = "/a"\nunix_mode = "0600"\nunix_group = "{group}"\nmax_connections = 4\n'
               'max_connections_per_client = 2\nhandshake_timeout = 1.5\n').export
    assert (ex.unix_mode, ex.unix_group, ex.max_connections, ex.max_connections_per_client, ex.handshake_timeout) == \
        (0o600, os.getgid(), 4, 2, 1.5)
    assert loads(MINIMAL).export.unix_mode == 0o660
    assert loads(MINIMAL).export.poll_max_us == 0
    assert loads('[export]\nunix = "/a"\npoll_max_us = 1000\n').export.poll_max_us == 1000


@pytest.mark.parametrize("text, key, words", [
    ('unix_mode = "660x"', "export.unix_mode", "not a mode in octal"),
    ('unix_mode = "1777"', "export.unix_mode", "not a mode in octal"),
    ('unix_group = "no-such-group-here"', "export.unix_group", "no such group"),
    ("max_connections = 0", "export.max_connections", "must be >= 1"),
    ("max_connections_per_client = -1", "export.max_connections_per_client", "must be >= 0"),
    ("handshake_timeout = 0", "export.handshake_timeout", "must be > 0"),
    ("poll_max_us = -1", "export.poll_max_us", "must be >= 0"),
    ("poll_max_us = 2000000", "export.poll_max_us", "must be <= 1000000"),
    ("poll_max_us = 0.5", "export.poll_max_us", "integer"),
    ('tls = "yes"', "export.tls", "is not one of off, on, require"),
    ('tls = "require"', "export", "needs tls_certificates = DIR"),
    ('tls = "on"\ntls_certificates = "/nonexistent"', "export", "/nonexistent has no server-cert.pem, server-key.pem"),
    ('tls = "on"\ntls_certificates = "relative"', "export.tls_certificates", "must be an absolute path"),
])
def test_bad_export_settings(text, key, words):
    e = err(f'[export]\nunix = "/a"\n{text}\n')
    assert e.key == key and words in e.message


def test_export_without_listener_is_error():
    e = err("[export]\n")
    assert e.key == "export" and "no listener" in e.message


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:10809", ("127.0.0.1", 10809)),
    ("nas.local:1", ("nas.local", 1)),
    ("[::1]:10809", ("::1", 10809)),
    (":10809", ("127.0.0.1", 10809)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_tcp_forms(text, expected):
    assert loads(f'[export]\ntcp = "{text}"\ninsecure = true\n').export.tcp == expected


@pytest.mark.parametrize("text", ["10809", "host:0", "host:65536", "host:abc",
                                  "::1:10809", "[nothex]:1", "host:"])
def test_bad_tcp(text):
    e = err(f'[export]\ntcp = "{text}"\n')
    assert e.key == "export.tcp"


def test_unix_path_too_long():
    e = err(f'[export]\nunix = "/{"x" * 200}"\n')
    assert e.key == "export.unix" and "limit" in e.message


# ---- unknown keys and types ------------------------------------------------

def test_unknown_top_level_key():
    e = err("[deamon]\n")
    assert e.key == "deamon"
    assert "daemon, device, export, multipath, power" in e.message
    assert "did you mean 'daemon'" in e.message


def test_unknown_key_in_export():
    e = err('[export]\nunix = "/a"\nudp = ":1"\n')
    assert e.key == "export.udp" and "tcp, tls, tls_certificates, tls_verify_peer, unix" in e.message


def test_unknown_key_in_device():
    e = err(MINIMAL + "readonly = true\n")
    assert e.key == "device[0].readonly" and "read_only" in e.message


def test_unknown_key_in_power():
    assert err('[power]\nups = "none"\npoll = 1\n').key == "power.poll"


@pytest.mark.parametrize("text, key, got", [
    (MINIMAL + 'read_only = "yes"\n', "device[0].read_only", "string"),
    (MINIMAL + "description = 3\n", "device[0].description", "integer"),
    ('[daemon]\ncontrol = true\n', "daemon.control", "boolean"),
    ('[export]\ntcp = 10809\n', "export.tcp", "integer"),
    ('[power]\nups = "none"\npoll_interval = true\n', "power.poll_interval", "boolean"),
    ('[[device]]\nname = 1\ntable = "x"\n', "device[0].name", "integer"),
])
def test_wrong_type(text, key, got):
    e = err(text)
    assert e.key == key and f"got {got}" in e.message


def test_daemon_not_a_table():
    e = err('daemon = "x"\n')
    assert e.key == "daemon" and "expected a table" in e.message


def test_device_as_single_table_is_error():
    e = err(f'[device]\nname = "a"\ntable = "{LINE}"\n')
    assert e.key == "device" and "[[device]]" in e.message


# ---- device names and tables -----------------------------------------------

def test_duplicate_names():
    e = err(MINIMAL + MINIMAL)
    assert str(e) == ("/etc/appliance/appliance.toml: device[1].name: "
                      "duplicate device name 'data0'")


@pytest.mark.parametrize("name", ["", "a b", "a/b", "ä", "..", "@x"])
def test_bad_names(name):
    e = err(f'[[device]]\nname = "{name}"\ntable = "{LINE}"\n')
    assert e.key == "device[0].name"


def test_missing_name():
    assert err(f'[[device]]\ntable = "{LINE}"\n').key == "device[0].name"


def test_missing_table():
    e = err('[[device]]\nname = "a"\n')
    assert e.key == "device[0].table" and "missing" in e.message


def test_empty_table():
    e = err('[[device]]\nname = "a"\ntable = []\n')
    assert e.key == "device[0].table" and "empty" in e.message


def test_blank_table_line_names_index():
    e = err(f'[[device]]\nname = "a"\ntable = ["{LINE}", "  "]\n')
    assert e.key == "device[0].table[1]"


def test_non_string_table_line_names_index():
    e = err('[[device]]\nname = "a"\ntable = [[1], ["x"]]\n')
    assert e.key == "device[0].table[0]" and "got array" in e.message


def test_password_not_in_repr():
    assert "hunter2" not in repr(loads('[power]\nups = "none"\npassword = "hunter2"\n'))


# ---- @references -----------------------------------------------------------

def test_reference_to_unknown_device():
    e = err(devices(("a", ["0 8 linear /x 0", "8 8 linear @nope 0"])))
    assert e.key == "device[0].table[1]" and "@nope" in e.message


def test_self_reference():
    e = err(devices(("a", ["0 8 linear @a 0"])))
    assert e.key == "device[0].table[0]" and "itself" in e.message


def test_cycle_message():
    e = err(devices(("a", ["0 8 linear @b 0"]), ("b", ["0 8 linear @a 0"])))
    assert e.message == "reference cycle: a -> b -> a"
    assert e.key == "device[0].table"


def test_longer_cycle():
    e = err(devices(("x", ["0 8 linear /f 0"]), ("a", ["0 8 linear @b 0"]),
                    ("b", ["0 8 linear @c 0"]), ("c", ["0 8 linear @a 0"])))
    assert e.message == "reference cycle: a -> b -> c -> a"


def test_reference_in_comment_is_ignored():
    cfg = loads(devices(("a", ["0 8 linear /x 0  # was @gone"])))
    assert cfg.devices[0].refs == ()


def test_dependency_order():
    cfg = loads(devices(("top", ["0 8 linear @mid 0", "8 8 linear @base 0"]),
                        ("mid", ["0 8 linear @base 0"]),
                        ("base", ["0 16 linear /f 0"]),
                        ("other", ["0 8 linear /g 0"])))
    assert [d.name for d in cfg.device_order()] == ["base", "mid", "top", "other"]


# ---- table contents via appliance.table -------------------------------------

def test_table_error_maps_to_line_key(stub_table):
    def parse_table(lines, *, known_devices=None):
        assert known_devices == {"a", "b"}
        if len(lines) == 2:
            raise stub_table.TableError(2, "bad line")
        return []
    stub_table.parse_table = parse_table
    e = err(devices(("a", ["0 8 linear /x 0"]), ("b", ["0 8 linear /x 0", "junk"])))
    assert (e.key, e.message) == ("device[1].table[1]", "bad line")


def test_whole_table_error_maps_to_table_key(stub_table):
    def parse_table(lines, *, known_devices=None):
        raise stub_table.TableError(0, "table is empty")
    stub_table.parse_table = parse_table
    assert err(MINIMAL).key == "device[0].table"


def test_real_table_accepts_valid_config(real_table):
    cfg = loads(devices(("base", ["0 16 linear /f 0"]), ("top", ["0 16 linear @base 0"])))
    assert len(cfg.devices) == 2


def test_real_table_rejects_bad_line(real_table):
    e = err(devices(("a", ["0 8 linear /x 0", "8 8 no-such-target x"])))
    assert e.key == "device[0].table[1]"


# ---- [power] ---------------------------------------------------------------

def test_power_absent_is_none():
    assert loads(MINIMAL).power is None


def test_power_defaults():
    p = loads('[power]\nups = "myups@localhost"\n').power
    assert p == config.PowerConfig("myups@localhost", None, None, 2, 30, "writethrough", 0.5)


def test_power_requires_ups():
    assert err("[power]\npoll_interval = 1\n").key == "power.ups"


@pytest.mark.parametrize("line, key", [
    ("poll_interval = 0", "power.poll_interval"),
    ("online_hold = -1", "power.online_hold"),
    ("safety_factor = 0", "power.safety_factor"),
    ("safety_factor = 1.5", "power.safety_factor"),
    ('on_unreachable = "ignore"', "power.on_unreachable"),
    ('ups = "my ups"', "power.ups"),
])
def test_power_ranges(line, key):
    text = '[power]\nups = "none"\n' + line + "\n" if not line.startswith("ups") \
        else "[power]\n" + line + "\n"
    assert err(text).key == key


def test_safety_factor_one_is_allowed():
    assert loads('[power]\nups = "none"\nsafety_factor = 1\n').power.safety_factor == 1


# ---- files, syntax errors, paths --------------------------------------------

def test_load_file(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text(MINIMAL)
    assert load(str(f)).source == str(f)


def test_toml_syntax_error_has_line(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[daemon]\nlog_level = "info"\ncontrol = \n')
    with pytest.raises(ConfigError) as info:
        load(str(f))
    assert info.value.line == 3
    assert str(info.value).startswith(f"{f}: line 3: TOML syntax error")


def test_toml_error_does_not_echo_document():
    e = err('[power]\nups = "none"\npassword = "hunter2"\n[power]\n')
    assert "hunter2" not in str(e)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "nope.toml"))
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: config file not found"


def test_error_str_is_one_line():
    e = err(MINIMAL + MINIMAL)
    assert "\n" not in str(e)
    assert (e.path, e.key) == ("/etc/appliance/appliance.toml", "device[1].name")


def test_config_path_prefers_cli(monkeypatch):
    monkeypatch.setenv("APPLIANCE_CONFIG", "/env.toml")
    assert config.config_path("/cli.toml") == "/cli.toml"


def test_config_path_env_override(monkeypatch):
    monkeypatch.setenv("APPLIANCE_CONFIG", "/env.toml")
    assert config.config_path(None) == "/env.toml"


def test_config_path_default(monkeypatch):
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    assert config.config_path(None) == config.DEFAULT_PATH == "/etc/appliance/appliance.toml"


def test_load_or_default_explicit_missing_file_is_error(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError):
        config.load_or_default(None)


# ---- embedded default ------------------------------------------------------

def test_embedded_default_shape():
    cfg = config.embedded_default("/tmp/state")
    assert cfg.source == "embedded default"
    assert cfg.export == config.ExportConfig("/run/appliance/nbd.sock", ("127.0.0.1", 10809))
    (d,) = cfg.devices
    assert d.name == "disk0"
    assert d.table == ("0 2097152 linear /tmp/state/disk0.img 0",)
    assert d.description == "embedded default: sparse image in the state directory"
    assert cfg.daemon.state_dir == "/tmp/state"
    assert cfg.needs_default_image == ("/tmp/state/disk0.img", 1 << 30)


def test_loaded_config_needs_no_default_image():
    assert loads(MINIMAL).needs_default_image is None


# ---- schema ----------------------------------------------------------------

def test_describe_lists_every_key():
    text = schema.describe()
    for section in schema.SECTIONS:
        assert section.name in text
        for key in section.keys:
            assert f"  {key.name} " in text
            assert key.doc in text
    assert '"/run/appliance/control.sock"' in text


def test_schema_matches_dataclasses():
    classes = {"daemon": config.DaemonConfig, "export": config.ExportConfig,
               "device": config.DeviceConfig, "power": config.PowerConfig,
               "multipath": config.MultipathConfig, "cluster": config.ClusterConfig}
    for section in schema.SECTIONS:
        assert [k.name for k in section.keys] == \
            [f.name for f in dataclasses.fields(classes[section.name])]


def test_configs_are_frozen():
    cfg = loads(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.devices[0].name = "x"


# ---- which table words are underlying devices: each target says -----------


def test_targets_say_which_arguments_are_underlying_devices(real_table):
    from appliance import udev
    from appliance.targets import target_class

    words = lambda target, line: target_class(target).device_words(line.split())
    assert words("linear", "/dev/sdb 0") == ["/dev/sdb"]
    assert words("flakey", "@low 8 1 1 1 drop_writes") == ["@low"]
    assert words("delay", "/dev/a 0 5 /dev/b 0 5 /dev/c 0 5 serialize") == ["/dev/a", "/dev/b", "/dev/c"]
    # ramback creates <ram>: only <backing> is a device
    assert words("ramback", "/dev/shm/fast0 wwn:0x5 chunk=64K") == ["wwn:0x5"]
    assert words("zero", "") == [] and words("error", "") == []
    assert words("linear", "/dev/sdb x") == []  # a bad line: loading it says why, nothing to wait for
    # the daemon waits for the disks among them, and only those
    assert udev.disk_words(["0 8 ramback /dev/shm/fast0 /srv/back.img", "8 8 ramback - /dev/sdb",
                            "16 8 linear /dev/shm/file 0", "# 24 8 linear /dev/sdc 0"]) == ["/dev/sdb", "/dev/shm/file"]
