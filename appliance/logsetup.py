"""Logging: journald when running under systemd, stderr otherwise.

Under systemd (stderr is the journal stream named by $JOURNAL_STREAM) records
go through systemd.journal.JournalHandler, with their priority and fields. If
systemd-python is not installed they go to stderr with a "<N>" priority prefix,
which journald understands. A record the journal refuses, or that would go to a
journal socket that is not there (libsystemd then drops it without a word), is
written to stderr instead: nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
import sys

IDENTIFIER = "appliance"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# syslog priorities, for the "<N>" prefix journald reads on stderr
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def stderr_is_journal():
    """True when systemd connected our stderr to journald ($JOURNAL_STREAM is its dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _PriorityFormatter(logging.Formatter):
    def format(self, record):
        pri = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{pri}>{line}" for line in super().format(record).splitlines())


def _stderr_handler(journal):
    handler = logging.StreamHandler(sys.stderr)
    if journal:  # journald adds the time and the identifier itself
        handler.setFormatter(_PriorityFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _journal_handler():
    """A JournalHandler that falls back to stderr for a record it cannot send; None without systemd-python."""
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None

    fallback = _stderr_handler(journal=True)

    class Handler(JournalHandler):
        def emit(self, record):
            # libsystemd drops a message silently when the socket is missing (journald gone)
            if os.path.exists(JOURNAL_SOCKET):
                super().emit(record)
            else:
                fallback.handle(record)

        def handleError(self, record):
            fallback.handle(record)

    handler = Handler(SYSLOG_IDENTIFIER=IDENTIFIER)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler


def setup_logging(level="info"):
    """Route the root logger; returns "journal", "stderr-journal" or "stderr" (what was chosen)."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for h in list(root.handlers):
        root.removeHandler(h)
    journal = stderr_is_journal()
    handler = _journal_handler() if journal else None
    if handler is not None:
        kind = "journal"
    else:
        handler = _stderr_handler(journal)
        kind = "stderr-journal" if journal else "stderr"
    root.addHandler(handler)
    return kind
