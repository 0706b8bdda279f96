"""check-config's look at the machine: what `serve` would refuse, found without opening anything.

`config.load` checks the file's own rules. This checks that the TLS certificates load, and each
table as the daemon would build it: every target parses its arguments with the parser its
constructor uses (Target.validate); every file or disk it names exists, is a regular file or
block device the daemon may open for reading and writing, and holds the table; an `@NAME` device is big enough. A disk (`/dev/...`, `wwn:`,
`serial:`) that is not attached is no error: serve waits `daemon.disk_timeout` for it, then
serves the other devices while this one, and any stacked on it, waits for the disk. Left to
serve: what only an exclusive open finds (a disk or file in use by another process) and whether
an existing ramback store belongs to its table.
"""

from __future__ import annotations

import errno
import os
import ssl

from . import udev
from .blockdev import DeviceError, examine
from .config import ConfigError
from .nbd import client as nbd_client
from .nbd import tls as nbd_tls
from .table import parse_table, table_size
from .targets import TargetError, check_size, target_class


def check(config) -> list[str]:
    """Raise ConfigError (FILE: device[i].table[k]: ...) for the first thing serve would refuse,
    in the order serve builds the devices; return a line for each device that would wait."""
    ex = config.export
    if ex.tls != "off":  # serve reads them the same way: a key that does not match its certificate...
        try:
            nbd_tls.context(ex.tls_certificates, ex.tls_verify_peer)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(config.source, "export.tls_certificates", f"cannot use {ex.tls_certificates}: {e}") from None
    index = {d.name: i for i, d in enumerate(config.devices)}
    sizes = {}  # device name -> bytes
    waiting = set()
    opened = {}  # realpath -> direct: a daemon opens a path once, with one O_DIRECT setting
    made = dict([config.needs_default_image]) if config.needs_default_image else {}  # serve creates it
    notes = []
    for dc in config.device_order():
        segments = parse_table(list(dc.table))  # config.load checked the syntax
        sizes[dc.name] = table_size(segments)
        absent = []  # what this device would wait for
        first = None  # the table line that names the first of them

        def need(word, needed, dc=dc, absent=absent):
            if word.startswith("@"):
                if word[1:] in waiting:
                    absent.append(word)
                check_size(word, sizes[word[1:]], needed)
                return
            if nbd_client.is_uri(word):  # a remote export is checked when serve connects
                nbd_client.parse_uri(word)
                return
            path = word
            if udev.is_disk_word(word):
                path = udev.find(word)
                if path is None:
                    absent.append(word)
                    return
            size = made[path] if path in made else _size(path, writable=not dc.read_only)
            real = os.path.realpath(path)
            if opened.setdefault(real, dc.direct) != dc.direct:
                raise DeviceError(errno.EBUSY, f"{path}: already open with direct={opened[real]}")
            if size is not None:
                check_size(word, size, needed)

        for seg in segments:
            key = f"device[{index[dc.name]}].table[{seg.line - 1}]"
            try:
                target_class(seg.target).validate(seg, need)
            except DeviceError as e:  # one sentence naming the path, as serve says it
                raise ConfigError(config.source, key, f"device {dc.name}: {seg.target}: {e.strerror}") from None
            except (TargetError, OSError) as e:
                raise ConfigError(config.source, key, f"device {dc.name}: {seg.target}: {e}") from None
            if absent and first is None:
                first = key
        if absent:
            waiting.add(dc.name)
            what = [f"{w} (which waits)" if w.startswith("@") else f"disk {w} (not attached now)"
                    for w in dict.fromkeys(absent)]
            notes.append(f"{config.source}: {first}: device {dc.name} waits for {', '.join(what)}")
    return notes


def _size(path, writable):
    """Bytes in the file or block device at `path` (None if sysfs does not say), or the
    DeviceError serve's open would raise."""
    st, is_block = examine(path)
    if not os.access(path, os.R_OK | (os.W_OK if writable else 0)):
        raise DeviceError(errno.EACCES, f"{path}: cannot open: {os.strerror(errno.EACCES)}")
    return udev.SYSFS.capacity(st.st_rdev) if is_block else st.st_size
