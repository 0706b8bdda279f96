"""Underlying devices: regular files and block devices the targets sit on.

One open file per device, shared by every table in the daemon (dm's
dm_get_device does the same with its claim pointer), reference counted.
Block devices are opened O_EXCL by default so nothing outside the daemon
(mkfs, a mount, a second daemon) can write them under us; regular files get
an exclusive flock for the same reason, as qemu locks its images.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading

from . import engine
from . import io as bio

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKFLSBUF = 0x1261
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

import ctypes

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
except (OSError, AttributeError):  # pragma: no cover - glibc always has it
    _fallocate = None


class DeviceError(OSError):
    pass


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def _address(buf):
    """Where a buffer's bytes are in memory: O_DIRECT needs no bounce when it is aligned."""
    view = _PyBuffer()
    _get_buffer(buf, ctypes.byref(view), 0)  # PyBUF_SIMPLE; raises if buf has no buffer
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


def fallocate(fd, mode, offset, length):
    if _fallocate is None or _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno() if _fallocate else errno.EOPNOTSUPP
        raise OSError(e, os.strerror(e))


class FileDevice:
    """A regular file or block device, addressed in bytes."""

    kind = "file"

    def __init__(self, path, fd, size, is_block, direct, logical_block):
        self.path = path
        self.fd = fd
        self.size = size
        self.is_block = is_block
        self.direct = direct
        self.logical_block = logical_block
        self.refs = 0
        self.failed = None  # set when the disk went away (udev)
        self._can_punch = not is_block

    @property
    def name(self):
        return self.path

    @property
    def align(self):
        """Alignment every request must have on the fast path."""
        return self.logical_block if self.direct else 1

    def submit(self, io):
        """Start the I/O on the engine (no thread held while the disk works); it completes
        through io.endio on an engine thread, with a classed error."""
        if self.failed:
            io.complete(bio.path_error())  # the disk is gone: another path or leg may serve it
            return
        op = io.op
        if op == bio.READ or op == bio.WRITE:
            if self.direct and ((io.offset | io.length) % self.logical_block):
                io.complete(errno.EINVAL)
                return
            buf = io.buf
            bounce = None
            if self.direct and _address(buf) % self.logical_block:
                # O_DIRECT wants aligned memory too: bounce through an anonymous mapping
                bounce = mmap.mmap(-1, io.length)
                if op == bio.WRITE:
                    bounce[:] = buf
                buf = bounce
            if op == bio.READ:
                engine.get().read(self.fd, buf, io.offset, lambda r: self._read_done(io, r, bounce))
            else:
                engine.get().write(self.fd, buf, io.offset, lambda r: self._write_done(io, r, bounce))
        elif op == bio.FLUSH:
            engine.get().fsync(self.fd, lambda r: self._done(io, r))
        else:  # trim, write_zeroes, cache: one fallocate or fadvise, short in the caller's thread
            io.complete(self.execute(io))

    def _read_done(self, io, result, bounce):
        if result == io.length and bounce is not None:
            memoryview(io.buf)[:] = bounce
        if bounce is not None:
            bounce.close()
        if 0 <= result < io.length:
            log.error("%s: short read at %d: %d of %d bytes", self.path, io.offset, result, io.length)
            result = -errno.EIO
        self._done(io, result)

    def _write_done(self, io, result, bounce):
        if bounce is not None:
            bounce.close()
        if result >= 0 and io.flags & bio.FUA:
            engine.get().fsync(self.fd, lambda r: self._done(io, r))
            return
        self._done(io, result)

    def _done(self, io, result):
        if result < 0:
            log.error("%s: %s at %d+%d: %s", self.path, bio.OP_NAMES.get(io.op), io.offset, io.length,
                      os.strerror(-result))
            io.complete(self._error(-result))
        else:
            io.complete(0)

    def _error(self, code):
        """An errno from the system call, classed; ENODEV/ENXIO from a disk mean it is gone."""
        if self.failed or code in (errno.ENODEV, errno.ENXIO):
            return bio.path_error(code if code != errno.ENODEV else errno.ENXIO)
        return bio.error(code)

    def execute(self, io):
        """Do the I/O synchronously in the calling thread; return 0 or a classed error."""
        if self.failed:
            return bio.path_error()
        try:
            op = io.op
            if self.direct and op in (bio.READ, bio.WRITE):
                return self._direct(io)
            if op == bio.READ:
                n = os.preadv(self.fd, [io.buf], io.offset)
                if n != io.length:
                    log.error("%s: short read at %d: %d of %d bytes", self.path, io.offset, n, io.length)
                    return bio.error(errno.EIO)
            elif op == bio.WRITE:
                view = memoryview(io.buf)
                done = 0
                while done < io.length:
                    done += os.pwritev(self.fd, [view[done:]], io.offset + done)
                if io.flags & bio.FUA:
                    os.fdatasync(self.fd)
            elif op == bio.FLUSH:
                os.fdatasync(self.fd)
            elif op == bio.WRITE_ZEROES:
                return self._write_zeroes(io)
            elif op == bio.TRIM:
                if self._can_punch:
                    try:
                        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, io.offset, io.length)
                    except OSError:
                        self._can_punch = False  # trim is advisory: not supported is fine
            elif op == bio.CACHE:
                os.posix_fadvise(self.fd, io.offset, io.length, os.POSIX_FADV_WILLNEED)
            return 0
        except OSError as e:
            log.error("%s: %s at %d+%d: %s", self.path, bio.OP_NAMES.get(io.op), io.offset, io.length, e)
            return self._error(e.errno or errno.EIO)

    def _direct(self, io):
        """O_DIRECT wants aligned memory as well as aligned offsets: bounce through
        an anonymous mapping, which is page aligned."""
        if (io.offset | io.length) % self.logical_block:
            return bio.error(errno.EINVAL)
        with mmap.mmap(-1, io.length) as bounce:
            if io.op == bio.READ:
                if os.preadv(self.fd, [bounce], io.offset) != io.length:
                    return bio.error(errno.EIO)
                memoryview(io.buf)[:] = bounce
            else:
                bounce[:] = io.buf
                done = 0
                view = memoryview(bounce)
                while done < io.length:
                    done += os.pwritev(self.fd, [view[done:]], io.offset + done)
                view.release()
                if io.flags & bio.FUA:
                    os.fdatasync(self.fd)
        return 0

    def _write_zeroes(self, io):
        """fallocate on files, BLKZEROOUT on block devices (the kernel offloads or writes
        zeroes itself), else zeros written from a page-aligned buffer, which O_DIRECT takes."""
        try:
            if self.is_block:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", io.offset, io.length))
            else:
                mode = FALLOC_FL_ZERO_RANGE if io.flags & bio.NO_HOLE else FALLOC_FL_PUNCH_HOLE
                fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, io.offset, io.length)
            if io.flags & bio.FUA:
                os.fdatasync(self.fd)
            return 0
        except OSError:
            pass
        if io.flags & bio.FAST_ZERO:
            return bio.error(errno.ENOTSUP)
        if self.direct and (io.offset | io.length) % self.logical_block:
            return bio.error(errno.EINVAL)
        with mmap.mmap(-1, min(io.length, 1 << 20)) as zeros:  # anonymous: zero-filled, aligned
            view = memoryview(zeros)
            done = 0
            while done < io.length:
                n = min(len(zeros), io.length - done)
                done += os.pwritev(self.fd, [view[:n]], io.offset + done)
            view.release()
        if io.flags & bio.FUA:
            os.fdatasync(self.fd)
        return 0

    def block_status(self, offset, length):
        """Extents [(length, flags)] using SEEK_DATA/SEEK_HOLE; flags 3 = hole reading as zero."""
        if self.is_block:
            return [(length, 0)]
        end = offset + length
        out = []
        pos = offset
        try:
            while pos < end:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
                if data > pos:
                    n = min(data, end) - pos
                    out.append((n, 3))
                    pos += n
                    continue
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                n = min(hole, end) - pos
                out.append((n, 0))
                pos += n
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                out.append((end - pos, 3))
            else:
                return [(length, 0)]
        return out


def examine(path):
    """(stat result, is_block) of a path a table names, or a DeviceError that says what is wrong.
    What _open checks before it opens; check-config checks the same without opening."""
    if not os.path.isabs(path):
        # relative to what? check-config runs where the admin is; the daemon, in / under systemd
        raise DeviceError(errno.EINVAL, f"{path}: not an absolute path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeviceError(errno.ENOENT, f"{path}: no such file or device") from None
    is_block = stat.S_ISBLK(st.st_mode)
    if not is_block and not stat.S_ISREG(st.st_mode):
        raise DeviceError(errno.EINVAL, f"{path}: not a regular file or block device")
    return st, is_block


def _open(path, writable, direct, exclusive):
    st, is_block = examine(path)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    if is_block and exclusive:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceError(e.errno, f"{path}: in use (opened exclusively by someone else)") from None
        raise DeviceError(e.errno, f"{path}: cannot open: {e.strerror}") from None
    try:
        if is_block:
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            logical = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
        else:
            size = st.st_size
            logical = 512 if direct else 1
            if exclusive:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise DeviceError(errno.EBUSY, f"{path}: in use (locked by another process)") from None
    except BaseException:
        os.close(fd)
        raise
    return FileDevice(path, fd, size, is_block, direct, logical)


def _reopen_writable(dev):
    """A file opened read-only (for a read_only device) is wanted writable by another table:
    the same fd number becomes a read-write open of the same file, so the fast map stays valid."""
    if dev.is_block and dev.exclusive:
        raise DeviceError(errno.EBUSY, f"{dev.path}: open read-only and exclusively for a read_only device; "
                                       "restart the daemon to make it writable")
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if dev.direct else 0)
    try:
        fd = os.open(dev.path, flags)
    except OSError as e:
        raise DeviceError(e.errno, f"{dev.path}: cannot open for writing: {e.strerror}") from None
    try:
        os.dup2(fd, dev.fd, inheritable=False)  # drops the read-only open and its flock
        if not dev.is_block and dev.exclusive:
            fcntl.flock(dev.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    dev.writable = True


class DevicePool:
    """Open underlying devices, shared and reference counted across tables."""

    def __init__(self, resolve=None):
        self._lock = threading.Lock()
        self._devices = {}  # realpath -> FileDevice
        # word in a table -> path to open (appliance.udev.resolve: wwn:, serial:, by-id)
        self.resolve = resolve

    def get(self, path, *, writable=True, direct=False, exclusive=True):
        word, path = path, self.resolve(path) if self.resolve else path
        key = os.path.realpath(path)
        with self._lock:
            dev = self._devices.get(key)
            if dev is None:
                dev = _open(path, writable, direct, exclusive)
                # what appliance.udev needs to match kernel events and to reopen a returning disk
                dev.word, dev.writable, dev.exclusive = word, writable, exclusive
                dev.rdev = os.fstat(dev.fd).st_rdev if dev.is_block else None
                self._devices[key] = dev
            elif dev.direct != direct:
                raise DeviceError(errno.EBUSY, f"{path}: already open with direct={dev.direct}")
            elif writable and not dev.writable:
                _reopen_writable(dev)
            dev.refs += 1
            return dev

    def put(self, dev):
        with self._lock:
            dev.refs -= 1
            if dev.refs == 0:
                self._devices.pop(os.path.realpath(dev.path), None)
                try:
                    os.fsync(dev.fd)
                except OSError:
                    pass
                os.close(dev.fd)

    def devices(self):
        with self._lock:
            return list(self._devices.values())
