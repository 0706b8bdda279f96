"""The configuration schema, as data.

Every table of appliance.toml and every key in it is described here once:
its type, its default, a validator and a one-line doc.  `appliance.config`
walks this description to validate a file, `appliance check-config` uses
the same walk, and `describe()` prints it for humans.  Adding a key means
adding one `Key(...)` line here plus the matching dataclass field in
config.py (a test checks the two agree).

Validators take the (already type-checked) value and return the normalised
value, or raise `Invalid` with a message that says what is wrong.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_CONTROL = "/run/appliance/control.sock"
DEFAULT_STATE_DIR = "/var/lib/appliance"
DEFAULT_UNIX = "/run/appliance/nbd.sock"
DEFAULT_TCP_HOST = "127.0.0.1"   # what ":PORT" binds to: local only unless asked
LOG_LEVELS = ("debug", "info", "warning", "error")
DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


class Invalid(ValueError):
    """A value failed validation.  `index` narrows the key path to one
    element of an array (e.g. device[0].table[2])."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.message = message
        self.index = index


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Key:
    name: str
    type: str                      # a key of TYPES
    default: Any = REQUIRED        # REQUIRED, None (unset) or a raw value
    doc: str = ""
    check: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Section:
    name: str
    keys: tuple[Key, ...]
    doc: str
    array: bool = False            # [[name]]: repeatable; absent means none
    # Raw table used when the section is missing from the file; None means
    # the section itself is None (an optional feature that is off).
    when_absent: dict | None = None
    check: Callable[[dict], None] | None = None   # whole-table rule

    def key(self, name: str) -> Key:
        return next(k for k in self.keys if k.name == name)


# ---- types -----------------------------------------------------------------
# bool is a subclass of int in Python; TOML keeps them apart and so do we,
# otherwise `port = true` would quietly mean 1.

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": _is_int,
    "number": lambda v: _is_int(v) or isinstance(v, float),
    "lines": lambda v: isinstance(v, (str, list)),   # string or array of strings
    "word_or_integer": lambda v: isinstance(v, str) or _is_int(v),
}
TYPE_DOCS = {"lines": "string or array of strings", "number": "integer or float",
             "word_or_integer": "string or integer"}


def toml_type_name(v: Any) -> str:
    """How a TOML user would call the type of a parsed value."""
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "float"),
                     (str, "string"), (list, "array"), (dict, "table")):
        if isinstance(v, py):
            return name
    return type(v).__name__


# ---- validators ------------------------------------------------------------

def choice(*allowed: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        if v.lower() not in allowed:
            raise Invalid(f"{v!r} is not one of {', '.join(allowed)}")
        return v.lower()
    return check


def number_range(lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False) -> Callable[[Any], Any]:
    """lo <= v <= hi (or lo < v when lo_open)."""
    def check(v):
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise Invalid(f"{v} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise Invalid(f"{v} must be <= {hi}")
        return v
    return check


def abs_path(v: str) -> str:
    # The daemon's cwd is not something a user reasons about.
    if not v.startswith("/"):
        raise Invalid(f"{v!r} must be an absolute path")
    return v


def unix_socket_path(v: str) -> str:
    abs_path(v)
    if len(v.encode()) > UNIX_PATH_MAX:
        raise Invalid(f"socket path is {len(v.encode())} bytes, "
                      f"the limit is {UNIX_PATH_MAX}")
    return v


def tcp_address(v: str) -> tuple[str, int]:
    """"HOST:PORT", "[v6addr]:PORT" or ":PORT" (= 127.0.0.1) -> (host, port)."""
    host, sep, port = v.rpartition(":")
    if not sep:
        raise Invalid(f"{v!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f"{host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        # "::1:10809" is ambiguous; insist on the bracket form.
        raise Invalid(f"{v!r}: write IPv6 addresses in brackets, e.g. [::1]:10809")
    elif not host:
        host = DEFAULT_TCP_HOST
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise Invalid(f"port {port!r} is not a number in 1-65535")
    return host, int(port)


def device_name(v: str) -> str:
    # Names become NBD export names, @references and file names in the state
    # directory, hence the restricted alphabet and no "." / "..".
    if not DEVICE_NAME_RE.fullmatch(v) or v in (".", ".."):
        raise Invalid(f"invalid device name {v!r} (allowed: letters, digits, '_', '.', '-')")
    return v


def client_list(v: str | list) -> tuple[str, ...]:
    """allowed_clients: certificate names (CN), addresses, networks."""
    entries = [v] if isinstance(v, str) else v
    if not entries:
        raise Invalid("allowed_clients is empty, which would refuse everyone; leave it out to allow every client")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, str):
            raise Invalid(f"expected string, got {toml_type_name(e)}", index=i)
        if not e.strip():
            raise Invalid("empty entry", index=i)
        if "/" in e:  # meant as a network: say what is wrong with it
            try:
                ipaddress.ip_network(e.strip(), strict=False)
            except ValueError as ex:
                raise Invalid(f"{e!r} is not a network: {ex}", index=i) from None
        out.append(e.strip())
    return tuple(out)


def table_lines(v: str | list) -> tuple[str, ...]:
    lines = [v] if isinstance(v, str) else v
    if not lines:
        raise Invalid("table is empty; give at least one line")
    out = []
    for i, line in enumerate(lines):
        if not isinstance(line, str):
            raise Invalid(f"expected string, got {toml_type_name(line)}", index=i)
        if "\n" in line:
            raise Invalid("a table line must not contain a newline; "
                          "use an array with one string per line", index=i)
        if not line.strip():
            raise Invalid("empty table line", index=i)
        out.append(line.strip())
    return tuple(out)


def ups_name(v: str) -> str:
    """NUT identifier UPSNAME[@HOST[:PORT]], or "none" for no UPS."""
    if v == "none":
        return v
    m = re.fullmatch(r"([^@\s:]+)(?:@([^@\s:]+|\[[^\]\s]+\])(?::(\d+))?)?", v)
    if not m:
        raise Invalid(f"{v!r} is not UPSNAME[@HOST[:PORT]] or \"none\"")
    if m.group(3) and not 1 <= int(m.group(3)) <= 65535:
        raise Invalid(f"port {m.group(3)} is not in 1-65535")
    return v


def failback(v: str | int) -> str:
    """multipath.conf's failback: immediate, manual, followover, or seconds to wait."""
    if isinstance(v, int):
        if v < 0:
            raise Invalid(f"{v} must be >= 0")
        return str(v)
    if v.lower() in ("immediate", "manual", "followover") or v.isdigit():
        return v.lower()
    raise Invalid(f"{v!r} is not immediate, manual, followover or a number of seconds")


def file_mode(v: str) -> int:
    """Permission bits in octal, as chmod and systemd's SocketMode= write them: "0660"."""
    if not re.fullmatch(r"[0-7]{3,4}", v) or int(v, 8) > 0o777:
        raise Invalid(f"{v!r} is not a mode in octal, 0000-0777 (e.g. \"0660\")")
    return int(v, 8)


def group_id(v: str | int) -> int:
    """A group name or number -> its gid (the group must exist here)."""
    import grp
    try:
        return grp.getgrgid(v).gr_gid if isinstance(v, int) else grp.getgrnam(v).gr_gid
    except (KeyError, OverflowError):
        raise Invalid(f"no such group {v!r}") from None


def is_loopback(host: str) -> bool:
    """Only traffic from this machine reaches a listener on `host` (a name other than
    localhost counts as reachable from outside: what it resolves to may change)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_export(values: dict) -> None:
    if values.get("unix") is None and values.get("tcp") is None:
        raise Invalid("no listener: set unix and/or tcp")
    tls = values.get("tls", "off")
    if tls != "off":
        where = values.get("tls_certificates")
        if where is None:
            raise Invalid(f'tls = "{tls}" needs tls_certificates = DIR (with server-cert.pem, server-key.pem, ca-cert.pem)')
        needed = ["server-cert.pem", "server-key.pem"] + (["ca-cert.pem"] if values.get("tls_verify_peer") else [])
        missing = [n for n in needed if not os.path.isfile(os.path.join(where, n))]
        if missing:
            raise Invalid(f"tls_certificates: {where} has no {', '.join(missing)}")
    tcp = values.get("tcp")
    if tcp and not is_loopback(tcp[0]) and tls != "require" and not values.get("insecure"):
        # plaintext NBD has no authentication: anyone who reaches the port reads and writes
        raise Invalid(f"tcp = \"{tcp[0]}:{tcp[1]}\" is reachable from other machines without "
                      f'tls = "require": anyone who reaches it can read and write every export; '
                      f'set tls = "require", listen on 127.0.0.1, or set insecure = true to accept that')


# ---- the schema ------------------------------------------------------------

DAEMON = Section("daemon", doc="the daemon process", when_absent={}, keys=(
    Key("control", "string", DEFAULT_CONTROL, "control socket for the CLI",
        unix_socket_path),
    Key("state_dir", "string", DEFAULT_STATE_DIR, "directory for persistent state",
        abs_path),
    Key("log_level", "string", "info", "one of " + "|".join(LOG_LEVELS),
        choice(*LOG_LEVELS)),
    Key("disk_timeout", "number", 30,
        "seconds to wait at start for disks a table names (wwn:, serial:, /dev/...)",
        number_range(0)),
    Key("shm_dir", "string", None,
        "directory for ramback RAM stores (default: /dev/shm/appliance-<hash of control path>)",
        abs_path),
))

EXPORT = Section(
    "export", doc="NBD listeners; a listener not named here is not opened",
    when_absent={"unix": DEFAULT_UNIX}, check=_check_export, keys=(
        Key("unix", "string", None, "unix socket path for NBD clients",
            unix_socket_path),
        Key("tcp", "string", None,
            'TCP listen address: "HOST:PORT", "[::1]:PORT" or ":PORT" (=127.0.0.1)',
            tcp_address),
        Key("unix_mode", "string", "0660", "permissions of the unix socket, in octal", file_mode),
        Key("unix_group", "word_or_integer", None,
            "group (name or gid) owning the unix socket (default: the daemon's)", group_id),
        Key("tls", "string", "off",
            "TLS on TCP listeners (NBD_OPT_STARTTLS): off|on (plaintext still served)|require",
            choice("off", "on", "require")),
        Key("tls_certificates", "string", None,
            "directory with server-cert.pem, server-key.pem, ca-cert.pem, optional ca-crl.pem (nbdkit's)",
            abs_path),
        Key("tls_verify_peer", "boolean", False, "require a client certificate signed by the CA"),
        Key("insecure", "boolean", False,
            'allow a TCP listener other machines can reach without tls = "require"'),
        Key("max_connections", "integer", 512,
            "connections a listener holds at most (handshaking or connected); more are refused",
            number_range(1)),
        Key("max_connections_per_client", "integer", 0,
            "connections one client (TCP: its address; unix: its user id) holds at most; 0 = no limit",
            number_range(0)),
        Key("handshake_timeout", "number", 30,
            "seconds a client has for the whole handshake, from connect to export chosen (> 0)",
            number_range(0, lo_open=True)),
        Key("poll_max_us", "integer", 0,
            "microseconds a connection's loop may poll for its busy disk's completions and its "
            "client's next requests before it sleeps (adaptive, as QEMU's poll-max-ns; io_uring "
            "only); 0 = never poll (the default; 1000 suits a fast disk on a machine with CPU to spare)",
            number_range(0, 1000000)),
        Key("buffer_memory", "integer", 1 << 30,
            "bytes of request buffers (and replies waiting for slow clients) all connections hold at "
            "most; past it, requests wait for room (>= 128 MiB: two of the largest requests)",
            number_range(128 << 20)),
    ))

DEVICE = Section("device", doc="a virtual block device (repeatable)", array=True, keys=(
    Key("name", "string", REQUIRED, "unique name; others reference it as @name",
        device_name),
    Key("table", "lines", REQUIRED, "device-mapper style table, one string per line",
        table_lines),
    Key("read_only", "boolean", False, "refuse writes"),
    Key("description", "string", "", "free text"),
    Key("export", "boolean", True, "export over NBD; false = building block only"),
    Key("direct", "boolean", False, "open underlying files/devices with O_DIRECT"),
    Key("exclusive", "boolean", True, "open underlying block devices with O_EXCL"),
    Key("allowed_clients", "lines", None,
        "TCP clients that may use the export: certificate names (CN) under TLS, "
        "addresses or networks (unset: every client)", client_list),
))

POWER = Section("power", doc="UPS monitoring (optional)", keys=(
    Key("ups", "string", REQUIRED, 'NUT UPS "name@host[:port]", or "none"', ups_name),
    Key("user", "string", None, "NUT user name"),
    Key("password", "string", None, "NUT password"),
    Key("poll_interval", "number", 2, "seconds between UPS polls (> 0)",
        number_range(0, lo_open=True)),
    Key("online_hold", "number", 30, "seconds on line power before trusting it again",
        number_range(0)),
    Key("on_unreachable", "string", "writethrough",
        "cache mode when the UPS cannot be reached: writethrough|writeback",
        choice("writethrough", "writeback")),
    Key("safety_factor", "number", 0.5,
        "fraction of reported runtime to rely on (0 < f <= 1)",
        number_range(0, 1, lo_open=True)),
))

MULTIPATH = Section("multipath", doc="multipath maps (multipath.conf's defaults)", when_absent={}, keys=(
    Key("polling_interval", "number", 5, "seconds between path checker probes (> 0)",
        number_range(0, lo_open=True)),
    Key("queue_max_bytes", "integer", 64 << 20,
        "bytes of I/O a map may hold while it has no path; past it new I/O fails",
        number_range(0)),
    Key("marginal_window", "number", 5,
        "a path failing again this many seconds after its reinstate is marginal (kept out longer)",
        number_range(0)),
    Key("failback", "word_or_integer", "manual",
        "back to a better path group: immediate|manual|followover|seconds", failback),
    Key("fast_io_fail_tmo", "number", 5,
        "seconds a path may hold a request unanswered before it fails and its requests go to "
        "another path (0: never)", number_range(0)),
    Key("checker_timeout", "number", 5,
        "seconds a checker probe waits for its read (> 0)", number_range(0, lo_open=True)),
))

def endpoints(v: str | list) -> tuple[str, ...]:
    urls = (v,) if isinstance(v, str) else tuple(v)
    for u in urls:
        if not isinstance(u, str) or not re.fullmatch(r"https?://[^/\s]+/?", u):
            raise Invalid(f"etcd endpoint {u!r} is not an http(s)://HOST:PORT URL")
    if not urls:
        raise Invalid("no etcd endpoints")
    return urls


def pem_file(v: str) -> str:
    abs_path(v)
    if not os.path.isfile(v):
        raise Invalid(f"{v} does not exist (or is not a file)")
    return v


def _check_cluster(values) -> None:
    if values.get("cert") or values.get("key"):
        if not (values.get("cert") and values.get("key")):
            raise Invalid("an etcd client certificate needs both cert and key")
        if not values.get("ca"):
            raise Invalid("cert and key are for etcd over https: give ca too (the CA that signed etcd's certificate)")
    if values.get("ca") and not any(u.startswith("https:") for u in values["endpoints"]):
        raise Invalid("ca is set but no endpoint is https://")


CLUSTER = Section("cluster", doc="clustered mirror logs: this node in an etcd cluster (optional)",
                  check=_check_cluster, keys=(
    Key("endpoints", "lines", REQUIRED, 'etcd client URLs, ["http://127.0.0.1:2379", ...]', endpoints),
    Key("node", "string", REQUIRED, "this node's name, unique in the cluster", device_name),
    Key("lease_ttl", "integer", 5, "seconds a node that stopped answering stays alive (>= 1)",
        number_range(1)),
    Key("etcd_timeout", "number", 10, "seconds to retry etcd before writes fail", number_range(0)),
    Key("socket", "string", None, "the log service's socket; the daemon runs the service there "
        "unless an `appliance logd` listens (default: state_dir/cluster-log.sock)", unix_socket_path),
    Key("ca", "string", None, "PEM CA that signed etcd's certificate (https endpoints)", pem_file),
    Key("cert", "string", None, "PEM client certificate for etcd's --client-cert-auth", pem_file),
    Key("key", "string", None, "the client certificate's PEM key", pem_file),
))

SECTIONS: tuple[Section, ...] = (DAEMON, EXPORT, DEVICE, POWER, MULTIPATH, CLUSTER)


# ---- printing --------------------------------------------------------------

def _render(value: Any) -> str:
    if value is REQUIRED:
        return "(required)"
    if value is None:
        return "(unset)"
    return json.dumps(value)     # TOML and JSON agree for strings, bools, numbers


def describe() -> str:
    """Human-readable listing of every table and key, with defaults and docs."""
    out: list[str] = []
    for s in SECTIONS:
        header = f"[[{s.name}]]" if s.array else f"[{s.name}]"
        out.append(f"{header}  # {s.doc}")
        width = max(len(k.name) for k in s.keys)
        for k in s.keys:
            t = TYPE_DOCS.get(k.type, k.type)
            out.append(f"  {k.name:<{width}} = {_render(k.default):<30} # {t}: {k.doc}")
        out.append("")
    return "\n".join(out)
