"""What the `appliance layer` commands do to a layer that is not attached: create it, open it
read-only to show it, check it. The format is layer.py's."""

from __future__ import annotations

import errno
import os

from . import journal
from .layer import (DEFAULT_GRAIN, HEADER_AREA, Header, Layer, LayerError, check_sizes, fd_size, new_header, pread_full,
                    pwrite_full, read_header)


def create(path, size, grain=DEFAULT_GRAIN, *, force=False) -> Header:
    """Make a new, empty one-file layer at `path` (a sparse file, or a block device that holds it)."""
    header = new_header(size, grain, name=path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        existing = fd_size(fd)
        is_block = not os.path.isfile(path)
        if not force:
            _refuse_to_overwrite(fd, path, existing, is_block)
        if is_block:
            if existing < header.needs:
                raise LayerError(f"{path}: {existing} bytes, a layer of {size} bytes needs {header.needs}")
            # a reused disk: its old bitmap must not describe the new layer's grains
            pwrite_full(fd, bytes(header.bitmap_offset + header.bitmap_length), 0)
        else:
            os.ftruncate(fd, 0)  # --force: drop the old data too; the new layer is a hole
            os.ftruncate(fd, header.needs)
        pwrite_full(fd, header.pack(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_dir(path)
    return header


def _refuse_to_overwrite(fd, path, existing, is_block):
    """A file that holds anything, or a disk that holds a layer or data in its first MiB."""
    try:
        old = read_header(fd, path)
    except LayerError:
        old = None
    if old:
        raise LayerError(f"{path}: already holds a cow layer ({old.uuid}); --force overwrites it")
    if existing and (not is_block or any(pread_full(fd, min(existing, 1 << 20), 0))):
        raise LayerError(f"{path}: not empty ({existing} bytes{', not zeros' if is_block else ''}); "
                         "--force overwrites it")


def _sync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def inspect(path) -> Layer:
    """A layer opened read-only from the file or disk that holds its header (for the
    three-word form: its bitmap device), for info and check. Close it when done."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise LayerError(f"{path}: cannot open: {e.strerror}") from None
    try:
        header = read_header(fd, path)
        if header is None:
            raise LayerError(f"{path}: not a cow layer (no header: it starts with {HEADER_AREA} zero bytes)")
        problems = check_sizes(header, fd_size(fd), None, path)
        if problems:
            raise LayerError(problems[0])
        return Layer(header, fd, fd, name=path, writable=False, owns_fds=[fd])
    except BaseException:
        os.close(fd)
        raise


def check(path, data=None) -> list[str]:
    """Everything wrong with a layer, read-only: the header, the bitmap inside the file, the
    sizes (of `data` too, the three-word form's data device, when given), bitmap bits that
    cannot be (zero without allocated, or past the last grain), and a damaged merge record."""
    try:
        layer = inspect(path)
    except LayerError as e:
        return [str(e)]
    try:
        out = []
        if data is not None:
            if not layer.header.split:
                out.append(f"{path}: a one-file layer, its data is not on {data}")
            else:
                try:
                    out += check_sizes(layer.header, fd_size(layer.bitmap_fd), _size_of(data), path)
                except OSError as e:
                    out.append(f"{data}: cannot open: {e.strerror}")
        try:
            journal.read(layer.bitmap_fd, path)
        except journal.RecordError as e:
            out.append(str(e))
        return out + layer.damage()
    finally:
        layer.close()


def _size_of(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_size(fd)
    finally:
        os.close(fd)
