"""The RAM store: one shared-memory file (or a /dev/ram*, /dev/pmem* device) holding a
header, the chunk states and the data, so a daemon that dies loses nothing.

Layout, little-endian, offsets in bytes:
    0       header (HEADER bytes, see _FIELDS): magic, version, geometry, the
            backing's identity, whether the last stop was clean
    4096    chunk states, one byte per chunk (appliance/_fast/chunkstate.pxd
            spells out the encoding), padded to a page
    data    the segment's bytes, chunk 0 first, `nchunks * chunk_size` long

A store that exists is attached only if its header matches the table; otherwise the
table is refused with what differs, or (option on_mismatch=discard) the store is
emptied and repopulated. Next to the backing (in the daemon's state_dir) a marker
records, while writeback mode is on or dirty data exists, that RAM holds data
backing may not have: after a reboot took the store, that marker is what lets
ramback say so loudly instead of pretending.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time

from ..._fast.chunkstate import ChunkState, Mapping
from .. import TargetError

log = logging.getLogger("appliance.ramback")

MAGIC = b"APPRAMBK"
VERSION = 1
HEADER = 4096
PAGE = 4096

# (name, struct code); the path is last and NUL padded
_FIELDS = (
    ("magic", "8s"),
    ("version", "I"),
    ("header", "I"),
    ("chunk_size", "Q"),
    ("length", "Q"),
    ("nchunks", "Q"),
    ("state_offset", "Q"),
    ("data_offset", "Q"),
    ("total", "Q"),
    ("backing_kind", "I"),  # 1 regular file, 2 block device, 3 mapped device (@NAME)
    ("clean", "I"),  # 1: the last stop drained everything; 0: attached, or died
    ("backing_dev", "Q"),
    ("backing_ino", "Q"),
    ("backing_rdev", "Q"),
    ("backing_size", "Q"),
    ("created", "Q"),
    ("stopped", "Q"),
    ("backing_path", "1024s"),
)
_STRUCT = struct.Struct("<" + "".join(code for _, code in _FIELDS))
KIND_NAMES = {1: "file", 2: "block device", 3: "mapped device"}

_attached = {}  # realpath -> Store, so a reload's new table shares the live store
_attached_lock = threading.Lock()


def default_dir(control_path):
    """A directory under /dev/shm no other daemon on this machine uses: named from the
    control socket path, which is unique per daemon."""
    digest = hashlib.sha256(os.path.realpath(control_path or "/run/appliance/control.sock").encode()).hexdigest()
    return f"/dev/shm/appliance-{digest[:16]}"


def layout(length, chunk_size):
    nchunks = (length + chunk_size - 1) // chunk_size
    state_offset = HEADER
    data_offset = HEADER + (nchunks + PAGE - 1) // PAGE * PAGE
    return nchunks, state_offset, data_offset, data_offset + nchunks * chunk_size


def backing_identity(dev, word):
    """What the store records about the backing: kind, path, dev/ino or rdev, size."""
    if word.startswith("@"):
        return {"backing_kind": 3, "backing_path": word, "backing_dev": 0, "backing_ino": 0, "backing_rdev": 0, "backing_size": dev.size}
    st = os.fstat(dev.fd)
    block = stat.S_ISBLK(st.st_mode)
    return {
        "backing_kind": 2 if block else 1,
        "backing_path": os.path.realpath(dev.path),
        "backing_dev": 0 if block else st.st_dev,
        "backing_ino": 0 if block else st.st_ino,
        "backing_rdev": st.st_rdev if block else 0,
        "backing_size": dev.size,
    }


def _describe_backing(h):
    kind = h["backing_kind"]
    if kind == 2:
        return f"{h['backing_path']} (block device {os.major(h['backing_rdev'])}:{os.minor(h['backing_rdev'])}, {h['backing_size']} bytes)"
    if kind == 1:
        return f"{h['backing_path']} (file dev {h['backing_dev']} inode {h['backing_ino']}, {h['backing_size']} bytes)"
    return f"{h['backing_path']} ({h['backing_size']} bytes)"


def differences(header, want):
    """What differs between a store's header and the table, as phrases; [] if it matches."""
    out = []
    if header["magic"] != MAGIC:
        return ["it is not a ramback store (no ramback header)"]
    if header["version"] != VERSION:
        return [f"its format version is {header['version']}, this daemon writes {VERSION}"]
    for key, what in (("length", "device length"), ("chunk_size", "chunk size")):
        if header[key] != want[key]:
            out.append(f"{what} was {header[key]}, the table says {want[key]}")
    same = header["backing_kind"] == want["backing_kind"]
    if same and want["backing_kind"] == 1:
        same = (header["backing_dev"], header["backing_ino"]) == (want["backing_dev"], want["backing_ino"])
    elif same and want["backing_kind"] == 2:
        same = header["backing_rdev"] == want["backing_rdev"]
    elif same:
        same = header["backing_path"] == want["backing_path"]
    if not same or header["backing_size"] != want["backing_size"]:
        out.append(f"backing was {_describe_backing(header)}, now {_describe_backing(want)}")
    return out


class Store:
    """An attached store: its mapping, chunk states and header, shared by the tables of one
    device across a reload."""

    def __init__(self, path, fd, mapping, cs, header, how, is_block):
        self.path = path
        self.fd = fd
        self.mapping = mapping
        self.cs = cs
        self.header = header
        self.how = how  # "created", "attached clean", "attached unclean", "discarded"
        self.is_block = is_block
        self.refs = 1
        self.view = memoryview(mapping)[header["data_offset"] : header["data_offset"] + cs.length]
        self.shared = {}  # state a reloaded table inherits (the mode)
        self.locks = None  # the RangeLocks, set by the first target

    def write_header(self, **changes):
        self.header.update(changes)
        raw = _STRUCT.pack(*[_encode(self.header[name]) for name, _ in _FIELDS])
        memoryview(self.mapping)[: len(raw)] = raw
        self.mapping.sync(0, PAGE)

    def release(self):
        """Drop one reference; the last one unmaps and closes. Returns True if it was the last."""
        with _attached_lock:
            self.refs -= 1
            if self.refs > 0:
                return False
            _attached.pop(os.path.realpath(self.path), None)
        self.view.release()
        self.view = None
        self.cs = None
        self.mapping = None
        try:
            os.close(self.fd)  # also drops the flock
        except OSError:
            pass
        return True


def _encode(v):
    return v.encode() if isinstance(v, str) else v


def _decode(raw):
    values = _STRUCT.unpack_from(raw)
    h = {name: v for (name, _), v in zip(_FIELDS, values)}
    h["backing_path"] = h["backing_path"].rstrip(b"\0").decode(errors="replace")
    return h


def open_store(path, want, *, create_dir=False, discard=False):
    """Attach the store at `path` for a table described by `want` (geometry and backing
    identity), creating it if it does not exist. Raises TargetError on any mismatch."""
    key = os.path.realpath(path)
    with _attached_lock:
        live = _attached.get(key)
        if live is not None:
            diff = differences(live.header, want)
            if diff:
                raise TargetError(f"store {path} is in use by this daemon for another table: {'; '.join(diff)}")
            live.refs += 1
            return live
    nchunks, state_offset, data_offset, total = layout(want["length"], want["chunk_size"])
    if create_dir:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise TargetError(f"cannot open RAM store {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TargetError(f"RAM store {path} is in use by another process") from None
        st = os.fstat(fd)
        is_block = stat.S_ISBLK(st.st_mode)
        if is_block:
            import appliance.blockdev as bd

            size = struct.unpack("Q", fcntl.ioctl(fd, bd.BLKGETSIZE64, b"\0" * 8))[0]
            if size < total:
                raise TargetError(f"RAM device {path} holds {size} bytes, the store needs {total}")
        elif not stat.S_ISREG(st.st_mode):
            raise TargetError(f"RAM store {path} is not a regular file or block device")
        else:
            size = st.st_size
        raw = os.pread(fd, HEADER, 0) if size >= HEADER else b""
        fresh = len(raw) < _STRUCT.size or raw[:8] != MAGIC
        how = "created"
        if not fresh:
            header = _decode(raw)
            diff = differences(header, want)
            if not diff and not is_block and size < header["total"]:
                diff = [f"the store file is {size} bytes, its header says {header['total']}"]
            if diff and not discard:
                raise TargetError(
                    f"RAM store {path} does not belong to this table: {'; '.join(diff)}"
                    " (option on_mismatch=discard drops its contents, dirty data included)"
                )
            if diff:
                log.warning("%s: discarding a RAM store that does not match: %s", path, "; ".join(diff))
                fresh, how = True, "discarded"
            else:
                how = "attached clean" if header["clean"] else "attached unclean"
        elif size and not is_block and any(os.pread(fd, 64, 0)):
            if not discard:
                raise TargetError(f"{path} is not empty and is not a ramback store; refusing to overwrite it")
        if not is_block:
            if fresh:
                os.ftruncate(fd, 0)
            os.ftruncate(fd, total)
            try:
                # reserve the RAM now: a tmpfs that fills up later would kill the daemon with SIGBUS
                os.posix_fallocate(fd, 0, total)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise TargetError(f"not enough room for a {total}-byte RAM store in {os.path.dirname(path)}") from None
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        mapping = Mapping(fd, total)
        if fresh:
            header = {name: 0 for name, _ in _FIELDS}
            header.update(want)
            header.update(
                magic=MAGIC, version=VERSION, header=HEADER, nchunks=nchunks, state_offset=state_offset,
                data_offset=data_offset, total=total, created=int(time.time()),
            )
        cs = ChunkState(mapping, state_offset, data_offset, want["length"], want["chunk_size"].bit_length() - 1)
        if fresh:
            cs.reset()
        store = Store(path, fd, mapping, cs, header, how, is_block)
        store.write_header(clean=0, backing_path=want["backing_path"])
    except BaseException:
        os.close(fd)
        raise
    with _attached_lock:
        _attached[key] = store
    return store


class Marker:
    """`<state_dir>/ramback/<device>-<sector>.json`: present while RAM may hold data backing
    lacks (writeback mode on, or dirty chunks). It outlives a reboot; the store does not."""

    def __init__(self, state_dir, name):
        self.path = os.path.join(state_dir, "ramback", f"{name}.json") if state_dir else None
        self.present = None
        self.lock = threading.Lock()  # the flusher's tick and a mode change may both write it

    def read(self):
        if not self.path:
            return None
        try:
            with open(self.path) as f:
                info = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # an empty file included: cut short by a crash
            return {"unreadable": str(e) or type(e).__name__}
        return info if isinstance(info, dict) else {"unreadable": f"not a JSON object: {info!r:.40}"}

    def write(self, **info):
        """Write it durably (temp file, fsync, rename, fsync the directory): it is what says,
        after a power cut, that RAM held data backing may lack. True once it is on disk."""
        if not self.path:
            return True
        info.setdefault("updated", time.time())
        info.setdefault("pid", os.getpid())
        with self.lock:
            return self._write(info)

    def _write(self, info):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename too
            finally:
                os.close(fd)
            self.present = True
            return True
        except OSError as e:
            log.error("cannot write the ramback marker %s: %s", self.path, e)
            return False

    def remove(self):
        if not self.path:
            return
        with self.lock:
            self._remove()

    def _remove(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("cannot remove the ramback marker %s: %s", self.path, e)
        self.present = False
