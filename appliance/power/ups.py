"""Talking to upsd: one poll of ups.status, battery.runtime and battery.charge
with nut2 (PyNUTClient). Every failure becomes an `Unreachable` whose text
says what went wrong, in upsd's words where it has some (ERR DATA-STALE,
ERR DRIVER-NOT-CONNECTED, ERR UNKNOWN-UPS, ACCESS-DENIED)."""

from __future__ import annotations

import re
import socket

import nut2

DEFAULT_PORT = 3493  # NUT's


class Unreachable(Exception):
    """upsd cannot be asked, or cannot answer for this UPS; str() says why."""


def parse_ident(ident: str) -> tuple[str, str, int]:
    """NUT's UPSNAME[@HOST[:PORT]] -> (name, host, port). schema.ups_name has checked it."""
    m = re.fullmatch(r"([^@]+)(?:@(\[[^\]]+\]|[^:]+)(?::(\d+))?)?", ident)
    name, host, port = m.group(1), m.group(2) or "localhost", m.group(3)
    return name, host.strip("[]"), int(port) if port else DEFAULT_PORT


def _number(client, name, var):
    try:
        return float(client.get_var(name, var))
    except nut2.PyNUTError as e:
        if "VAR-NOT-SUPPORTED" in str(e):
            return None  # not every UPS reports runtime or charge
        raise
    except ValueError:
        return None


class Ups:
    """One UPS on one upsd. The connection is kept between polls and made again
    after any failure; credentials are checked on every new connection."""

    def __init__(self, ident: str, user: str | None, password: str | None, timeout: float):
        self.ident = ident
        self.name, self.host, self.port = parse_ident(ident)
        self.user = user
        self.password = password
        self.timeout = timeout
        self.client = None

    def poll(self) -> tuple[str, float | None, float | None]:
        """-> (ups.status, battery.runtime, battery.charge); raises Unreachable."""
        try:
            if self.client is None:
                self._check_login()
                self.client = nut2.PyNUTClient(self.host, self.port, timeout=self.timeout)
            c = self.client
            status = c.get_var(self.name, "ups.status")
            return status, _number(c, self.name, "battery.runtime"), _number(c, self.name, "battery.charge")
        except (nut2.PyNUTError, OSError, EOFError) as e:
            self.close()
            raise Unreachable(self._why(e)) from None

    def _why(self, e):
        text = str(e).strip() or type(e).__name__
        where = f"upsd at {self.host}:{self.port}"
        if "DATA-STALE" in text:
            return f"{where}: the driver's data for {self.name} is stale ({text})"
        if "DRIVER-NOT-CONNECTED" in text:
            return f"{where}: no driver is connected for {self.name} ({text})"
        if "UNKNOWN-UPS" in text:
            return f"{where} knows no UPS named {self.name!r} ({text})"
        if text == "Socket error." or isinstance(e, OSError):
            return f"{where} does not answer ({text})"
        return f"{where}: {text}"

    def _check_login(self):
        """upsd accepts any USERNAME and PASSWORD and judges them only at LOGIN, so a
        wrong password would go unnoticed; LOGIN and LOGOUT at once on a connection of
        its own (staying logged in would make a primary upsmon wait for us at shutdown)."""
        if self.user is None:
            return
        lines = [f"USERNAME {self.user}", f"PASSWORD {self.password or ''}", f"LOGIN {self.name}", "LOGOUT"]
        with socket.create_connection((self.host, self.port), timeout=self.timeout) as s:
            s.sendall(("\n".join(lines) + "\n").encode())
            f = s.makefile("rb")
            answers = [f.readline().decode(errors="replace").strip() for _ in lines[:3]]
        for what, answer in zip(("USERNAME", "PASSWORD", "LOGIN"), answers):
            if not answer.startswith("OK"):
                if "ACCESS-DENIED" in answer:
                    raise nut2.PyNUTError(
                        f"{answer} at {what} as user {self.user!r}: wrong password, "
                        "or the user lacks 'upsmon secondary' in upsd.users"
                    )
                raise nut2.PyNUTError(f"{answer or 'no answer'} at {what} as user {self.user!r}")

    def close(self):
        self.client = None  # nut2 says LOGOUT and closes in __del__, ignoring a dead socket
