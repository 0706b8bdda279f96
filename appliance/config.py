"""Loading and validating /etc/appliance/appliance.toml.

The rules for individual keys live in `appliance.schema`; this module walks
that schema, adds the rules that span several devices (unique names,
@references, cycles), hands table lines to `appliance.table` for their own
syntax, and builds frozen dataclasses.  Every problem becomes a ConfigError
whose str() is one line: "FILE: KEY.PATH: what is wrong".
"""

from __future__ import annotations

import difflib
import os
import shlex
from dataclasses import dataclass, field, replace

import toml

from appliance import schema
from appliance.schema import REQUIRED, Invalid, Section

DEFAULT_PATH = "/etc/appliance/appliance.toml"
ENV_VAR = "APPLIANCE_CONFIG"
EMBEDDED_SOURCE = "embedded default"
DEFAULT_IMAGE_SECTORS = 2097152          # 1 GiB in 512-byte sectors


class ConfigError(Exception):
    def __init__(self, path: str, key: str | None, message: str,
                 line: int | None = None):
        super().__init__(path, key, message)
        self.path, self.key, self.message, self.line = path, key, message, line

    def __str__(self) -> str:
        where = self.key if self.key else (f"line {self.line}" if self.line else None)
        return f"{self.path}: {where}: {self.message}" if where else \
            f"{self.path}: {self.message}"


@dataclass(frozen=True)
class DaemonConfig:
    control: str
    state_dir: str
    log_level: str
    disk_timeout: float = 30
    shm_dir: str | None = None  # ramback RAM stores; None: a directory under /dev/shm per daemon


@dataclass(frozen=True)
class ExportConfig:
    unix: str | None
    tcp: tuple[str, int] | None
    unix_mode: int = 0o660
    unix_group: int | None = None
    tls: str = "off"
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    insecure: bool = False
    max_connections: int = 512
    max_connections_per_client: int = 0
    handshake_timeout: float = 30
    poll_max_us: int = 0
    buffer_memory: int = 1 << 30


@dataclass(frozen=True)
class DeviceConfig:
    # A plain value: reload compares old and new DeviceConfig with == to
    # decide whether a device must be rebuilt.
    name: str
    table: tuple[str, ...]
    read_only: bool
    description: str
    export: bool
    direct: bool
    exclusive: bool
    allowed_clients: tuple[str, ...] | None = None

    @property
    def refs(self) -> tuple[str, ...]:
        return table_refs(self.table)


@dataclass(frozen=True)
class PowerConfig:
    ups: str
    user: str | None
    password: str | None = field(repr=False)   # keep it out of logs
    poll_interval: float
    online_hold: float
    on_unreachable: str
    safety_factor: float


@dataclass(frozen=True)
class MultipathConfig:
    polling_interval: float = 5
    queue_max_bytes: int = 64 << 20
    marginal_window: float = 5
    failback: str = "manual"
    fast_io_fail_tmo: float = 5
    checker_timeout: float = 5


@dataclass(frozen=True)
class ClusterConfig:
    endpoints: tuple[str, ...]
    node: str
    lease_ttl: int
    etcd_timeout: float
    socket: str | None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Config:
    source: str                    # the file path, or "embedded default"
    daemon: DaemonConfig
    export: ExportConfig
    devices: tuple[DeviceConfig, ...]
    power: PowerConfig | None
    multipath: MultipathConfig = MultipathConfig()
    cluster: ClusterConfig | None = None
    # (path, size in bytes) of a sparse image the daemon must create before
    # building devices; only set by embedded_default().
    needs_default_image: tuple[str, int] | None = None

    def device(self, name: str) -> DeviceConfig:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def device_order(self) -> list[DeviceConfig]:
        """Devices with every referenced device before its users; otherwise
        in file order (validation guarantees there is no cycle)."""
        by_name = {d.name: d for d in self.devices}
        done: dict[str, DeviceConfig] = {}

        def visit(d: DeviceConfig) -> None:
            if d.name not in done:
                for ref in d.refs:
                    visit(by_name[ref])
                done[d.name] = d
        for d in self.devices:
            visit(d)
        return list(done.values())


_CLASSES: dict[str, type] = {"daemon": DaemonConfig, "export": ExportConfig,
                             "device": DeviceConfig, "power": PowerConfig,
                             "multipath": MultipathConfig, "cluster": ClusterConfig}


def table_refs(lines) -> tuple[str, ...]:
    """Device names referenced as @NAME after the target keyword (the third
    word), in order of appearance, without duplicates.  Words are split the
    way appliance.table splits them (shell quoting, '#' comments), so a
    reference inside a comment does not count."""
    refs: dict[str, None] = {}
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue            # unbalanced quotes: appliance.table reports it
        for word in words[3:]:
            if word.startswith("@"):
                refs[word[1:]] = None
    return tuple(refs)


# ---- where the config comes from --------------------------------------------

def config_path(cli_value: str | None) -> str:
    return cli_value or os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(path, None, "config file not found") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read config file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not valid UTF-8 (byte offset {e.start})") from None
    return loads(text, path)


def loads(text: str, path: str = "<string>") -> Config:
    try:
        raw = toml.loads(text)
    except toml.TomlDecodeError as e:
        # toml appends a dump of the parsed document to some messages
        # ("What? x already exists?{...}"); that may include the UPS
        # password and is noise anyway.
        msg = e.msg.split("?{", 1)[0] + ("?" if "?{" in e.msg else "")
        raise ConfigError(path, None, f"TOML syntax error: {msg}", line=e.lineno) from None
    return from_dict(raw, path)


def load_or_default(cli_value: str | None = None) -> Config:
    """What the daemon runs with: the configured file, or the embedded
    default when nothing was configured and DEFAULT_PATH does not exist.
    A path given explicitly (CLI or environment) must exist."""
    path = config_path(cli_value)
    if path == DEFAULT_PATH and not os.path.exists(path):
        return embedded_default()
    return load(path)


def embedded_default(state_dir: str = schema.DEFAULT_STATE_DIR) -> Config:
    image = os.path.join(state_dir, "disk0.img")
    raw = {
        "daemon": {"state_dir": state_dir},
        "export": {"unix": schema.DEFAULT_UNIX, "tcp": "127.0.0.1:10809"},
        "device": [{
            "name": "disk0",
            "table": [f"0 {DEFAULT_IMAGE_SECTORS} linear {shlex.quote(image)} 0"],
            "description": "embedded default: sparse image in the state directory",
        }],
    }
    # Same validation path as a file, so the default can never drift from
    # what the schema accepts.
    cfg = from_dict(raw, EMBEDDED_SOURCE)
    return replace(cfg, needs_default_image=(image, DEFAULT_IMAGE_SECTORS * 512))


# ---- validation ---------------------------------------------------------------

def _unknown(path: str, where: str, name: str, valid) -> ConfigError:
    valid = sorted(valid)
    hint = difflib.get_close_matches(name, valid, n=1)
    msg = f"unknown key {name!r} (valid keys: {', '.join(valid)})"
    if hint:
        msg += f"; did you mean {hint[0]!r}?"
    return ConfigError(path, f"{where}.{name}" if where else name, msg)


def _table(path: str, section: Section, where: str, raw) -> object:
    """Validate one table against its section schema; build its dataclass."""
    if not isinstance(raw, dict):
        raise ConfigError(path, where, f"expected a table, got {schema.toml_type_name(raw)}")
    names = {k.name for k in section.keys}
    for name in raw:
        if name not in names:
            raise _unknown(path, where, name, names)
    values = {}
    for key in section.keys:
        kp = f"{where}.{key.name}"
        if key.name not in raw:
            if key.default is REQUIRED:
                raise ConfigError(path, kp, "required key is missing")
            # Defaults go through the validator too (e.g. "127.0.0.1:10809"
            # strings become tuples); None means unset and stays None.
            value = key.default
            if value is None:
                values[key.name] = None
                continue
        else:
            value = raw[key.name]
            if not schema.TYPES[key.type](value):
                expected = schema.TYPE_DOCS.get(key.type, key.type)
                raise ConfigError(path, kp, f"expected {expected}, "
                                  f"got {schema.toml_type_name(value)}")
        try:
            values[key.name] = key.check(value) if key.check else value
        except Invalid as e:
            suffix = f"[{e.index}]" if e.index is not None else ""
            raise ConfigError(path, kp + suffix, e.message) from None
    if section.check:
        try:
            section.check(values)
        except Invalid as e:
            raise ConfigError(path, where, e.message) from None
    return _CLASSES[section.name](**values)


def from_dict(raw: dict, path: str = "<dict>") -> Config:
    """Validate an already-parsed TOML document."""
    sections = {s.name: s for s in schema.SECTIONS}
    for name in raw:
        if name not in sections:
            raise _unknown(path, "", name, sections)
    built: dict[str, object] = {}
    for s in schema.SECTIONS:
        if s.array:
            items = raw.get(s.name, [])
            if not isinstance(items, list):
                raise ConfigError(path, s.name, f"expected an array of tables "
                                  f"([[{s.name}]]), got {schema.toml_type_name(items)}")
            built[s.name] = tuple(_table(path, s, f"{s.name}[{i}]", item)
                                  for i, item in enumerate(items))
        elif s.name in raw:
            built[s.name] = _table(path, s, s.name, raw[s.name])
        else:
            built[s.name] = None if s.when_absent is None else \
                _table(path, s, s.name, dict(s.when_absent))
    devices = built["device"]
    _check_devices(path, devices)
    return Config(source=path, daemon=built["daemon"], export=built["export"],
                  devices=devices, power=built["power"], multipath=built["multipath"],
                  cluster=built["cluster"])


def _check_devices(path: str, devices: tuple[DeviceConfig, ...]) -> None:
    index: dict[str, int] = {}
    for i, d in enumerate(devices):
        if d.name in index:
            raise ConfigError(path, f"device[{i}].name",
                              f"duplicate device name {d.name!r}")
        index[d.name] = i
    # References before table syntax, so these messages do not depend on
    # how appliance.table words its own.
    for i, d in enumerate(devices):
        for k, line in enumerate(d.table):
            for ref in table_refs([line]):
                kp = f"device[{i}].table[{k}]"
                if ref == d.name:
                    raise ConfigError(path, kp, f"device {d.name!r} references itself")
                if ref not in index:
                    raise ConfigError(path, kp, f"reference to unknown device '@{ref}'")
    _check_cycles(path, devices, index)
    _check_tables(path, devices, set(index))


def _check_cycles(path: str, devices, index: dict[str, int]) -> None:
    by_name = {d.name: d for d in devices}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            cycle = stack[stack.index(name):] + [name]
            raise ConfigError(path, f"device[{index[cycle[0]]}].table",
                              "reference cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for ref in by_name[name].refs:
            visit(ref, stack + [name])
        done.add(name)
    for d in devices:
        visit(d.name, [])


def _check_tables(path: str, devices, known: set[str]) -> None:
    try:
        from appliance.table import TableError, parse_table
    except ModuleNotFoundError as e:
        # appliance.table is developed alongside this module; until it
        # exists only the checks above apply.  Errors inside it still raise.
        if e.name in ("appliance.table", "appliance"):
            return
        raise
    for i, d in enumerate(devices):
        try:
            parse_table(list(d.table), known_devices=known)
        except TableError as e:
            line = getattr(e, "line", None)
            ok = isinstance(line, int) and 1 <= line <= len(d.table)
            kp = f"device[{i}].table[{line - 1}]" if ok else f"device[{i}].table"
            raise ConfigError(path, kp, getattr(e, "message", str(e))) from None
