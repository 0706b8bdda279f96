"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET. A no-op outside systemd."""

import os
import socket


def notify(*lines):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError:
        return False
