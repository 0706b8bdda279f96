"""NBD URIs as tables write them: `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST[:PORT]/EXPORT`.

libnbd's forms (nbd_connect_uri), so a word can be pasted from `nbdinfo`. Query parameters of our
own: `connections=N` (connections when the server allows multi-conn) and `timeout=SECONDS` (how
long a request may wait for its reply).
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from ..blockdev import DeviceError

DEFAULT_PORT = 10809
DEFAULT_TIMEOUT = 30.0
_SCHEME = re.compile(r"nbds?(\+[a-z]+)?://")


@dataclass(frozen=True)
class Address:
    uri: str
    export: str
    socket: str | None = None  # a Unix socket, or:
    host: str | None = None
    port: int = DEFAULT_PORT
    connections: int | None = None  # None: the client's default where the server allows multi-conn
    timeout: float = DEFAULT_TIMEOUT

    def __str__(self):
        return self.uri


def is_uri(word: str) -> bool:
    """A table word that names a remote export (or tries to: a bad one gets parse_uri's error)."""
    return bool(_SCHEME.match(word))


def parse_uri(uri: str) -> Address:
    """`nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`, each with optional
    `connections=N` and `timeout=SECONDS`; a DeviceError saying what is wrong otherwise."""

    def bad(why):
        return DeviceError(errno.EINVAL, f"{uri}: {why}")

    try:
        parts = urlsplit(uri)
    except ValueError as e:
        raise bad(f"not an NBD URI ({e})") from None
    try:
        port = parts.port
    except ValueError:
        raise bad(f"port in {parts.netloc!r} is not a number from 0 to 65535") from None
    if parts.scheme in ("nbds", "nbds+unix"):
        raise bad("TLS (nbds://) is not supported; use nbd:// or nbd+unix://")
    if parts.scheme not in ("nbd", "nbd+unix"):
        raise bad(f"unknown scheme {parts.scheme!r}; use nbd:// or nbd+unix://")
    if parts.fragment:
        raise bad("an NBD URI has no #fragment")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    try:
        query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)))
    except ValueError:
        raise bad(f"malformed query {parts.query!r}") from None
    kw = {}
    for key, value in query.items():
        if key == "socket":
            continue
        if key == "connections":
            if not value.isdigit() or not 1 <= int(value) <= 16:
                raise bad(f"connections={value!r}: want a number from 1 to 16")
            kw["connections"] = int(value)
        elif key == "timeout":
            try:
                kw["timeout"] = float(value)
            except ValueError:
                kw["timeout"] = 0.0
            if not 0 < kw["timeout"] <= 3600:
                raise bad(f"timeout={value!r}: want seconds, more than 0 and at most 3600")
        else:
            raise bad(f"unknown parameter {key!r} (known: socket, connections, timeout)")
    if parts.scheme == "nbd+unix":
        if parts.netloc:
            raise bad("nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)")
        if not query.get("socket"):
            raise bad("nbd+unix:// needs ?socket=PATH")
        return Address(uri, export, socket=query["socket"], **kw)
    if "socket" in query:
        raise bad("socket= is for nbd+unix://")
    if not parts.hostname:
        raise bad("nbd:// needs a host (nbd://HOST[:PORT]/EXPORT)")
    return Address(uri, export, host=parts.hostname, port=port or DEFAULT_PORT, **kw)
