"""An O_DIRECT twin of an open file or disk, for a long background copy (cow's merge, mirror's
resync): it goes at the disk's sequential speed, where buffered I/O of GiBs crawls through
readahead and writeback, and it does not push the clients' data out of the page cache.

The twin is opened through /proc/self/fd: the very file or disk the device has open, even if
its path now names another. The kernel keeps it coherent with the device's own buffered fd (a
direct read writes back dirty cached pages first, a direct write drops the cached ones). Not
exclusive: the device pool already holds the file's lock or the disk's O_EXCL.
"""

from __future__ import annotations

import logging
import os

from . import blockdev

log = logging.getLogger(__name__)

ALIGN = 4096  # what O_DIRECT takes on any disk (512 may not do on a 4K-sector one)


def reopen(dev, who):
    """An O_DIRECT FileDevice on what `dev` has open, or `dev` itself where there can be none:
    not a file or disk (a remote or mapped device), already O_DIRECT, or a file system that
    refuses O_DIRECT (tmpfs); `who` names the copy in the log line that says so."""
    if not isinstance(dev, blockdev.FileDevice) or dev.direct:
        return dev
    try:
        twin = blockdev._open(f"/proc/self/fd/{dev.fd}", True, True, False)
    except (OSError, blockdev.DeviceError) as e:
        log.info("%s: %s goes through the page cache (no O_DIRECT: %s)", who, dev.path, e)
        return dev
    twin.path = dev.path
    return twin


def close(twin, dev):
    """Close what reopen(dev) opened (nothing if it gave dev itself)."""
    if twin is not dev:
        os.close(twin.fd)
