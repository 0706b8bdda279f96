"""Who may use an export: a device's `allowed_clients`.

An entry is a certificate subject's common name (CN), matched against a TLS client's
verified certificate, or an address or network ("192.0.2.7", "10.1.0.0/16", "fd00::/8"),
matched against a TCP client's address. Unix socket clients are not checked here: the
socket's owner and mode (unix_mode, unix_group) decide who reaches them.
"""

from __future__ import annotations

import ipaddress


class AllowedClients:
    def __init__(self, entries):
        self.entries = tuple(entries)
        self.names = set(self.entries)
        self.networks = []
        for e in self.entries:
            try:
                self.networks.append(ipaddress.ip_network(e, strict=False))
            except ValueError:
                pass  # a certificate name

    def refusal(self, export, address, cn):
        """None if a client at `address` with certificate name `cn` (None: no certificate)
        may use `export`; else why not, for its error reply and the log."""
        if cn is not None and cn in self.names:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if ip is not None and getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        if ip is not None and any(ip in net for net in self.networks):
            return None
        who = f"{address}, certificate CN {cn!r}" if cn is not None else f"{address}, no client certificate"
        return f"client ({who}) is not in allowed_clients of export {export!r}"

