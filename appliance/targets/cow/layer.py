"""A cow layer on disk: its header, its bitmap and where its data is.

Two forms, one class (`Layer`):
- one file or block device (made by `appliance layer create`) that starts with the header,
  then the bitmap, then the data;
- the seed's three words `<bitmap_dev> <data_dev> <offset>`: the header and bitmap on
  bitmap_dev (which may start all zeros: it gets its header on first use as the writable
  layer), the data on data_dev from <offset>.

Layout, little-endian, byte offsets (the header fits in one 512-byte sector, so writing it
is atomic):

      0   8  magic b"ACOWLAYR"
      8   4  version (1)
     12   4  flags: 1 sealed (a layer was pushed on it; never the writable one again),
                     2 split (the data is on another device: the three-word form)
     16  16  uuid: this layer's
     32  16  parent: the uuid of the layer or base under it (zeros until first attached)
     48  16  child: the uuid of the layer pushed on it, set when it is sealed (zeros before)
     64   4  grain (bytes; a power of two, 512 B .. 1 MiB)
     68   4  reserved (0)
     72   8  size (bytes; the device's size, a multiple of 512)
     80   8  bitmap offset (4096)
     88   8  bitmap length (bytes, a multiple of 4096)
     96   8  data offset (grain g is at data offset + g * grain; split: on the data device)
    104   4  crc32 of bytes 0..104

Bitmap: two bytes for every 8 grains; byte 2k has the "allocated" bits of grains 8k..8k+7
(bit j is grain 8k+j), byte 2k+1 their "zero" bits. A grain is
  allocated 0, zero 0: not in this layer (look below)
  allocated 1, zero 0: its data is here
  allocated 1, zero 1: it reads as zeros (WRITE_ZEROES or TRIM; no data, nothing copied up)
  allocated 0, zero 1: never written; `check` calls it damage.
Both bits of a grain are in one byte pair, so in one sector: a torn bitmap write leaves every
grain in its old or its new state. Bits past the last grain are zero.

Data is mapped directly, grain g at data offset + g * grain, with no allocation table: a
lookup is one bit, nothing but the bitmap has to be kept consistent, and the grains never
written cost nothing on a sparse file or a thin LUN. A block device must hold the full size.
When the size is not a multiple of the grain, the last grain holds only size - g * grain bytes.

Crash consistency (the seed's "write ordered for the bitmap (a la journal)"): the bitmap on
disk is written only by `sync_bitmap`, which fdatasyncs the data first and then writes the
dirty bitmap pages and fdatasyncs them. The target calls `mark_allocated` once a grain's data
write has completed, and `sync_bitmap` before a FLUSH (or a FUA write that allocated grains)
completes. So a set bit on disk always has its data on disk, and every bit a completed FLUSH
covers is on disk; between FLUSHes the bits collect in memory (one bitmap write per page per
FLUSH, not two synchronous writes per request).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import uuid as uuidlib
import zlib
from dataclasses import dataclass, replace

from .bits import popcount, runs, set_bits

MAGIC = b"ACOWLAYR"
VERSION = 1
SEALED = 1
SPLIT = 2
_KNOWN_FLAGS = SEALED | SPLIT
_HEADER = struct.Struct("<8sII16s16s16sIIQQQQ")
_CRC = struct.Struct("<I")
HEADER_AREA = 4096  # the bitmap starts here
PAGE = 4096  # the bitmap is written in pages of this many bytes
GRAINS_PER_PAGE = PAGE // 2 * 8
MIN_GRAIN, MAX_GRAIN, DEFAULT_GRAIN = 512, 1 << 20, 4096
_NIL = uuidlib.UUID(int=0)


class LayerError(ValueError):
    """What is wrong with a layer, in one sentence that names it."""


@dataclass(frozen=True)
class Header:
    uuid: uuidlib.UUID
    grain: int
    size: int
    bitmap_offset: int
    bitmap_length: int
    data_offset: int
    flags: int = 0
    parent: uuidlib.UUID | None = None
    child: uuidlib.UUID | None = None
    version: int = VERSION

    @property
    def sealed(self):
        return bool(self.flags & SEALED)

    @property
    def split(self):
        return bool(self.flags & SPLIT)

    @property
    def grains(self):
        return _ceil(self.size, self.grain)

    def pack(self) -> bytes:
        body = _HEADER.pack(MAGIC, self.version, self.flags, self.uuid.bytes, (self.parent or _NIL).bytes,
                            (self.child or _NIL).bytes, self.grain, 0, self.size, self.bitmap_offset,
                            self.bitmap_length, self.data_offset)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, buf, name) -> Header:
        """The header at the start of `buf`, or a LayerError naming the first thing wrong."""
        if len(buf) < _HEADER.size + _CRC.size:
            raise LayerError(f"{name}: too short to hold a layer header")
        magic, version, flags, u, parent, child, grain, _, size, boff, blen, doff = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise LayerError(f"{name}: bad magic {magic!r} (not a cow layer, or its header is damaged)")
        if version != VERSION:  # before the checksum: another version may checksum other bytes
            raise LayerError(f"{name}: layer format version {version}, this appliance reads version {VERSION}")
        (stored,) = _CRC.unpack_from(buf, _HEADER.size)
        computed = zlib.crc32(bytes(buf[:_HEADER.size]))
        if stored != computed:
            raise LayerError(f"{name}: header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
        if flags & ~_KNOWN_FLAGS:
            raise LayerError(f"{name}: unknown header flags {flags & ~_KNOWN_FLAGS:#x}")
        h = cls(uuidlib.UUID(bytes=u), grain, size, boff, blen, doff, flags,
                _or_none(uuidlib.UUID(bytes=parent)), _or_none(uuidlib.UUID(bytes=child)), version)
        h.check_geometry(name)
        return h

    def check_geometry(self, name):
        check_grain(self.grain, name)
        if self.size <= 0 or self.size % 512:
            raise LayerError(f"{name}: size {self.size} is not a positive multiple of 512 bytes")
        if self.bitmap_offset != HEADER_AREA:
            raise LayerError(f"{name}: bitmap offset {self.bitmap_offset}, expected {HEADER_AREA}")
        if self.bitmap_length != bitmap_length(self.size, self.grain):
            raise LayerError(f"{name}: bitmap length {self.bitmap_length}, {bitmap_length(self.size, self.grain)} "
                             f"expected for {self.size} bytes in {self.grain}-byte grains")
        if not self.split and self.data_offset < self.bitmap_offset + self.bitmap_length:
            raise LayerError(f"{name}: data offset {self.data_offset} overlaps the bitmap "
                             f"(which ends at {self.bitmap_offset + self.bitmap_length})")
        if self.data_offset % 512:
            raise LayerError(f"{name}: data offset {self.data_offset} is not a multiple of 512")

    @property
    def needs(self):
        """Bytes the file (one-file form) or the data device past data_offset (split) must hold."""
        return self.size if self.split else self.data_offset + self.size


def _or_none(u):
    return None if u == _NIL else u


def check_grain(grain, name):
    if not MIN_GRAIN <= grain <= MAX_GRAIN or grain & (grain - 1):
        raise LayerError(f"{name}: grain {grain} is not a power of two from {MIN_GRAIN} to {MAX_GRAIN} bytes")


def bitmap_length(size, grain):
    pairs = _ceil(_ceil(size, grain), 8)  # a byte pair per 8 grains
    return _ceil(2 * pairs, PAGE) * PAGE


def _ceil(a, b):
    return -(-a // b)


def new_header(size, grain=DEFAULT_GRAIN, *, name, split_offset=None) -> Header:
    """The header of a new, empty layer of `size` bytes; split_offset: the three-word form's data offset."""
    check_grain(grain, name)
    if size <= 0 or size % 512:
        raise LayerError(f"{name}: size {size} is not a positive multiple of 512 bytes")
    blen = bitmap_length(size, grain)
    if split_offset is not None:
        return Header(uuidlib.uuid4(), grain, size, HEADER_AREA, blen, split_offset, SPLIT)
    align = max(grain, PAGE)  # grains aligned on the file, so O_DIRECT and a thin LUN's blocks line up
    return Header(uuidlib.uuid4(), grain, size, HEADER_AREA, blen, _ceil(HEADER_AREA + blen, align) * align)


def fd_size(fd):
    """Size of a regular file or a block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def pread_full(fd, length, offset):
    buf = os.pread(fd, length, offset)
    if len(buf) < length:  # past the end of a file reads as zeros; check says when it is short
        buf += bytes(length - len(buf))
    return buf


def pwrite_full(fd, buf, offset):
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Layer:
    """One layer, attached: its header and its bitmap in memory (two plain bitmaps, "allocated"
    and "zero", one bit per grain: 32 MiB each for 1 TiB in 4 KiB grains, in anonymous mappings,
    which cost no page until a bit in it is set or read, so a new layer of any size attaches in
    milliseconds).

    The target's calls: `is_allocated(g)`, `is_zero(g)`, `allocated_runs(g0, g1)`,
    `zero_runs(g0, g1)`, `mark_allocated(g0, g1)` after the data of grains [g0, g1) was
    written, `mark_zero(g0, g1)`, `sync_bitmap()` before a FLUSH completes, `seal(child)`,
    `set_parent(uuid)`; `data_fd` and `data_offset` (grain g at data_offset + g * grain) for
    the fast path. Bits may be marked and looked up from any thread; `seal` is for a layer
    whose writes are quiesced (a push suspends the device first).
    """

    def __init__(self, header, bitmap_fd, data_fd, *, name, writable, owns_fds=(), fresh=False):
        self.header = header
        self._fresh = fresh  # the header of an unused bitmap device, not written yet
        self.name = name
        self.writable = writable
        self.bitmap_fd = bitmap_fd
        self.data_fd = data_fd
        self._owned = list(owns_fds)
        n = _ceil(header.grains, 8)
        self._alloc = mmap.mmap(-1, n)
        self._zero = mmap.mmap(-1, n)
        self._dirty = set()  # bitmap pages changed in memory since the last sync_bitmap
        self._lock = threading.Lock()  # the bits and _dirty
        self._sync_lock = threading.Lock()  # one sync_bitmap at a time: an older page image never lands last
        self.failed = None  # the error of a failed sync: the layer takes no more bits
        self.folding = False  # a merge folds the layers above into this read-only layer
        self._load_bitmap()
        if fresh and not (_all_zero(self._alloc) and _all_zero(self._zero)):
            raise LayerError(f"{name}: unused bitmap device (no header) whose bitmap is not all zeros; zero it first")

    # geometry
    @property
    def grain(self):
        return self.header.grain

    @property
    def size(self):
        return self.header.size

    @property
    def grains(self):
        return self.header.grains

    @property
    def data_offset(self):
        return self.header.data_offset

    @property
    def uuid(self):
        return self.header.uuid

    def reload_bitmap(self):
        """Read the bitmap from disk again (a table that replaces another one that synced its bits)."""
        with self._lock:
            for bits in (self._alloc, self._zero):  # in place: the fast path holds the zero bits
                for i in range(0, len(bits), 1 << 22):
                    bits[i:i + (1 << 22)] = bytes(min(1 << 22, len(bits) - i))
            self._load_bitmap()

    def _load_bitmap(self):
        """Into the (zeroed) bit arrays. Holes in a sparse file are skipped, not read: a new
        layer of a TiB attaches in milliseconds (a push)."""
        h, chunk = self.header, 1 << 22
        off = 0
        while off < h.bitmap_length:
            data = _next_data(self.bitmap_fd, h.bitmap_offset + off, h.bitmap_offset + h.bitmap_length)
            off = (data - h.bitmap_offset) & ~(PAGE - 1)  # whole pages: byte pairs stay together
            if off >= h.bitmap_length:
                break
            raw = pread_full(self.bitmap_fd, min(chunk, h.bitmap_length - off), h.bitmap_offset + off)
            a0 = off // 2
            a1 = min(a0 + len(raw) // 2, len(self._alloc))
            if a1 > a0:
                self._alloc[a0:a1] = raw[0:2 * (a1 - a0):2]
                self._zero[a0:a1] = raw[1:2 * (a1 - a0):2]
            off += len(raw)

    # lookups
    def is_allocated(self, grain):
        return bool(self._alloc[grain >> 3] >> (grain & 7) & 1)

    def is_zero(self, grain):
        return bool((self._alloc[grain >> 3] & self._zero[grain >> 3]) >> (grain & 7) & 1)

    def allocated_runs(self, g0=0, g1=None):
        """[(start, end)] of the grains in [g0, g1) this layer holds (data or zero), in order."""
        return runs(self._alloc, g0, self.grains if g1 is None else g1)

    @property
    def zero_bits(self):
        """The "zero" bitmap itself (a mapping that never moves: changes are made in place),
        for the fast path's reads."""
        return self._zero

    def may_have_zero(self, g0, g1):
        """False if no grain in [g0, g1) reads as zeros (a cheap test before zero_runs)."""
        return any(self._zero[g0 >> 3:(g1 + 7) >> 3])

    def zero_runs(self, g0=0, g1=None):
        """[(start, end)] of the grains in [g0, g1) that read as zeros from this layer."""
        return runs(self._zero, g0, self.grains if g1 is None else g1)

    def empty(self):
        """True if this layer holds no grain (cheaper than counting them): a layer whose bits are
        all on disk (none dirty) and whose bitmap there is a hole holds none, unread."""
        h = self.header
        with self._lock:
            if not self._dirty and _next_data(self.bitmap_fd, h.bitmap_offset,
                                              h.bitmap_offset + h.bitmap_length) >= h.bitmap_offset + h.bitmap_length:
                return True
        return _all_zero(self._alloc)

    def allocated_grains(self):
        return popcount(self._alloc)

    def zero_grains(self):
        return popcount(self._zero)

    # changes (in memory; sync_bitmap writes them)
    def mark_allocated(self, g0, g1):
        """Grains [g0, g1) hold data in this layer. Call only once that data write completed."""
        self._mark(g0, g1, zero=False)

    def mark_zero(self, g0, g1):
        """Grains [g0, g1) read as zeros from this layer (no data written or needed)."""
        self._mark(g0, g1, zero=True)

    def _mark(self, g0, g1, zero):
        if not self.folding and (not self.writable or self.header.sealed):
            raise LayerError(f"{self.name}: not the writable layer")
        if self.failed:
            raise LayerError(f"{self.name}: failed earlier ({self.failed}); its bitmap takes no more bits")
        if not 0 <= g0 <= g1 <= self.grains:
            raise LayerError(f"{self.name}: grains [{g0}, {g1}) outside 0..{self.grains}")
        with self._lock:
            set_bits(self._alloc, g0, g1, True)
            set_bits(self._zero, g0, g1, zero)
            self._dirty.update(range(g0 // GRAINS_PER_PAGE, (g1 - 1) // GRAINS_PER_PAGE + 1) if g1 > g0 else ())

    def sync_bitmap(self):
        """Make every bit marked before this call durable, after the data it exposes: fdatasync
        the data, write the dirty bitmap pages, fdatasync them. Returns the pages written.

        A failed sync fails the layer for good: after an fdatasync error Linux may drop the
        dirty pages and report success next time, so a retry could expose grains whose data
        never reached the disk."""
        with self._sync_lock:
            if self.failed:
                raise LayerError(f"{self.name}: failed earlier ({self.failed}); its bitmap takes no more bits")
            with self._lock:
                pages = sorted(self._dirty)
                self._dirty.clear()
                images = [self._page_image(p) for p in pages]
            if not pages:
                return 0
            try:
                if self._fresh:
                    self._write_header(self.header)  # a bitmap never sits under a missing header
                os.fdatasync(self.data_fd)  # the data under every bit in `images` was written before it was marked
                for p, image in zip(pages, images):
                    pwrite_full(self.bitmap_fd, image, self.header.bitmap_offset + p * PAGE)
                os.fdatasync(self.bitmap_fd)
            except OSError as e:
                self.failed = e.strerror or str(e)
                raise
            return len(pages)

    def _page_image(self, page):
        a0 = page * (PAGE // 2)
        image = bytearray(PAGE)
        alloc = self._alloc[a0:a0 + PAGE // 2]
        image[0:2 * len(alloc):2] = alloc
        image[1:2 * len(alloc):2] = self._zero[a0:a0 + PAGE // 2]
        return image

    # identity
    def set_parent(self, parent):
        """Record the layer or base under this one, once; a layer keeps its first parent."""
        if self.header.parent == parent:
            return
        if self.header.parent is not None:
            raise LayerError(f"{self.name}: its parent is {self.header.parent}, not {parent}")
        self._write_header(replace(self.header, parent=parent))

    def seal(self, child=None):
        """Make this layer read-only for good: `child` (the layer pushed on it) is recorded so a
        later attempt to attach it as the writable layer can name that layer."""
        if self.header.sealed:
            return
        self.sync_bitmap()
        self._write_header(replace(self.header, flags=self.header.flags | SEALED, child=child))
        self.writable = False

    def begin_fold(self):
        """A merge copies the grains of the read-only layers above this one into it (sealed or
        not): its bits may change again. What the stack reads does not: the layers above still
        hold the same grains until the merge ends."""
        self.folding = True

    def end_fold(self, uuid, child):
        """The merge copied everything: this layer now reads as the topmost layer it folded in,
        so it takes that layer's UUID (the layer above it names it as parent) and its child."""
        self.sync_bitmap()
        self._write_header(replace(self.header, uuid=uuid, child=child))
        self.folding = False

    def rebase(self, parent):
        """A merge folded the layers under this one into the base: the base is its parent now.
        Written whether or not it is sealed; the merge has the device suspended."""
        self._write_header(replace(self.header, parent=parent), check=False)

    def _write_header(self, header, check=True):
        if check and not (self.writable or self.folding):
            raise LayerError(f"{self.name}: opened read-only")
        pwrite_full(self.bitmap_fd, header.pack(), 0)
        os.fdatasync(self.bitmap_fd)
        self.header = header
        self._fresh = False

    def damage(self) -> list[str]:
        """Bits no layer can have (`layer check`): zero but not allocated, or past the last grain,
        or anything in the bitmap area past the last grain's byte pair."""
        out = []
        for i in range(0, len(self._alloc), 1 << 20):
            a = int.from_bytes(self._alloc[i:i + (1 << 20)], "little")
            stray = int.from_bytes(self._zero[i:i + (1 << 20)], "little") & ~a
            if stray:
                g = i * 8 + (stray & -stray).bit_length() - 1
                out.append(f"{self.name}: bitmap damaged: grain {g} is marked zero but not allocated")
                break
        past = self.grains & 7 and (self._alloc[-1] | self._zero[-1]) >> (self.grains & 7)
        h, used = self.header, 2 * len(self._alloc)
        if past or any(pread_full(self.bitmap_fd, h.bitmap_length - used, h.bitmap_offset + used)):
            out.append(f"{self.name}: bitmap damaged: bits set past the last grain ({self.grains - 1})")
        return out

    def close(self):
        for fd in self._owned:
            os.close(fd)
        self._owned = []


def _all_zero(bits, step=1 << 20):
    zero = bytes(step)
    return all(bits[i:i + step] == zero[:min(step, len(bits) - i)] for i in range(0, len(bits), step))


def _next_data(fd, pos, end):
    """Where data starts at or after pos in a sparse file (end if only a hole is left);
    pos itself where holes are not known (a block device)."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_DATA), end)
    except OSError as e:
        return end if e.errno == errno.ENXIO else pos


# opening


def read_header(fd, name) -> Header | None:
    """The header on fd; None for an unused device (its first 4096 bytes are all zeros)."""
    buf = pread_full(fd, HEADER_AREA, 0)
    if not any(buf):
        return None
    return Header.unpack(buf, name)


def attach(bitmap_fd, data_fd=None, data_offset=None, *, name, writable, size=None, grain=DEFAULT_GRAIN,
           owns_fds=()) -> Layer:
    """A Layer on open fds: one fd (one-file form), or bitmap_fd, data_fd and data_offset (the
    three-word form). An unused bitmap device gets its header here when it is attached
    writable with `size` (and `grain`), as the seed's bitmap gets its magic on first use.
    Refuses a sealed layer as the writable one, naming the layer pushed on it. Writes nothing:
    an unused bitmap device's new header reaches it with the first set_parent or sync_bitmap,
    so the target can check the whole chain first."""
    split = data_fd is not None
    header = read_header(bitmap_fd, name)
    fresh = header is None
    if fresh:
        if not (split and writable and size):
            raise LayerError(f"{name}: not a cow layer (no header: it starts with {HEADER_AREA} zero bytes)"
                             if not split else f"{name}: unused bitmap device (all zeros); it gets its header "
                             "when it is first attached as the writable layer")
        header = new_header(size, grain, name=name, split_offset=data_offset)
    if header.split != split:
        raise LayerError(f"{name}: a {'three-word (bitmap, data, offset)' if header.split else 'one-file'} layer, "
                         f"named as a {'three-word' if split else 'one-file'} one")
    if split and header.data_offset != data_offset:
        raise LayerError(f"{name}: its data is at offset {header.data_offset} of the data device, the table says {data_offset}")
    if writable and header.sealed:
        pushed = f" (layer {header.child} was pushed on it)" if header.child else ""
        raise LayerError(f"{name}: sealed{pushed}; a sealed layer is never attached as the writable one")
    problems = check_sizes(header, fd_size(bitmap_fd), fd_size(data_fd) if split else None, name)
    if problems:
        raise LayerError(problems[0])
    return Layer(header, bitmap_fd, data_fd if split else bitmap_fd, name=name, writable=writable,
                 owns_fds=owns_fds, fresh=fresh)


def check_sizes(header, file_size, data_size=None, name=""):
    """What is wrong with where the header puts things, given the sizes of the devices."""
    out = []
    meta_end = header.bitmap_offset + header.bitmap_length
    if file_size < meta_end:
        out.append(f"{name}: {file_size} bytes, too short for its bitmap (which ends at {meta_end})")
    if not header.split and file_size < header.needs:
        out.append(f"{name}: {file_size} bytes, the header needs {header.needs} "
                   f"(data at {header.data_offset} + size {header.size})")
    if header.split and data_size is not None and data_size < header.data_offset + header.size:
        out.append(f"{name}: the data device holds {data_size} bytes, the layer needs "
                   f"{header.data_offset + header.size} (offset {header.data_offset} + size {header.size})")
    return out


def open_layer(words, *, writable, size=None, grain=DEFAULT_GRAIN) -> Layer:
    """Open a layer as a table names it: [path] or [bitmap_dev, data_dev, offset]. The CLI's and
    the tests' way in; the target opens its devices through the daemon's pool and calls attach."""
    if len(words) not in (1, 3):
        raise LayerError(f"a layer is one path or three words <bitmap_dev> <data_dev> <offset>, not {' '.join(words)!r}")
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    fds = []
    try:
        for path in words[:2]:
            try:
                fds.append(os.open(path, flags))
            except OSError as e:
                raise LayerError(f"{path}: cannot open: {e.strerror}") from None
        offset = None
        if len(words) == 3:
            try:
                offset = int(words[2], 0)
            except ValueError:
                raise LayerError(f"data offset {words[2]!r} is not a number") from None
        return attach(fds[0], fds[1] if len(fds) > 1 else None, offset, name=words[0], writable=writable,
                      size=size, grain=grain, owns_fds=fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
