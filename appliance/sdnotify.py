"""The service manager's side channels, without libsystemd.

- notify(): sd_notify(3), one datagram to $NOTIFY_SOCKET (a no-op outside systemd).
- watchdog_interval(): WatchdogSec= as seconds, from $WATCHDOG_USEC (and $WATCHDOG_PID).
"""

from __future__ import annotations

import os
import socket

def notify(*lines):
    """Send `lines` ("READY=1", "STATUS=...") as one message. True if it was sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    # STATUS= is one line: a newline would start a new assignment
    text = "\n".join(line.replace("\n", " ") for line in lines)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(text.encode())
        return True
    except OSError:
        return False


def _for_us(pid_var):
    pid = os.environ.get(pid_var)
    return pid is None or pid == str(os.getpid())


def watchdog_interval():
    """Seconds within which systemd wants WATCHDOG=1, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not _for_us("WATCHDOG_PID"):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None
