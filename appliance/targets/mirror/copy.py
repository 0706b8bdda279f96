"""The resync's copy: regions streamed from a good leg to the stale ones, CHUNK at a time, with
DEPTH chunks in flight, through the I/O engine (files and disks) or the NBD client (remote
legs). A chunk's writes start from its read's completion (or at once, mapped: below), and a
finished chunk's buffer takes the next one at once: the legs stay busy with large I/Os, and
Python runs per chunk, never per block.

A stale file or disk leg is written around the page cache, on an fd of the copy's own opened
O_DIRECT (Direct): it goes at the disk's sequential speed instead of dirtying the whole leg in
the cache for a long writeback after. The kernel keeps it coherent with the leg's own buffered
fd (a direct write writes back, then drops, the cached pages of its range), and no client write
comes between: the region is held while it is copied. The source is read through its page
cache: often there already (a direct read would go to the disk, where reads can be the slower
half: 1 GiB/s here against 2.5 for writes), else read ahead. Where every leg a chunk goes to is
written O_DIRECT and the source is a buffered file or disk, the chunk is not read at all: the
source's range is mapped and the direct writes take their data from its cached pages (no copy
through a buffer: half the copy's CPU, what it lacks on a loaded machine). Pages that cannot be
had make such a write fail with EFAULT, which says nothing about the leg written: the chunk is
then read into a buffer and written again, and the read's error is the source's. The leg's own
device where a direct write cannot be: a remote or mapped leg, a file system that refuses
O_DIRECT, a chunk not 4 KiB aligned.

A region is finished only once its copy is durable: its last chunk done, every leg that took it
is flushed (fdatasync of the fd the chunks went through: with O_DIRECT, little more than the
disk's cache), so the log never says in sync over data still in a cache. The regions whose
copies end while a flush is in flight share the next one (Stream._copied).

CHUNK is 4 MiB and DEPTH 8: 32 MiB in flight keeps a fast disk's queue full across the pauses of
a loaded machine's scheduler, and a 4 MiB chunk costs the Python of a 1 MiB one.

The resync thread starts the chunks (and so decides the pace: resync_rate, client priority)
and finishes the regions; the completions only count and hand back buffers.
"""

from __future__ import annotations

import errno
import mmap
import threading

from ... import blockdev, directfd
from ... import io as bio

CHUNK = 4 << 20
DEPTH = 8


class Direct:
    """The copy's O_DIRECT twins (directfd) of the file and disk legs it writes, opened when
    first wanted, for one pass of the resync."""

    def __init__(self):
        self._fds = {}  # leg -> the device its chunks go through

    def writer(self, leg, offset, length):
        """The device a chunk written to `leg` at `offset` (the leg's) goes through."""
        if (offset | length) % directfd.ALIGN or getattr(leg.dev, "failed", None):
            return leg.dev
        if leg not in self._fds:
            self._fds[leg] = directfd.reopen(leg.dev, "mirror resync")
        return self._fds[leg]

    def close(self):
        for leg, dev in self._fds.items():
            directfd.close(dev, leg.dev)
        self._fds = {}


class _Chunk:
    """One chunk in flight: where in its region, and what it is read into."""

    __slots__ = ("c", "off", "n", "buf", "mapped", "left", "refault")

    def __init__(self, c, off, n):
        self.c, self.off, self.n = c, off, n
        self.buf = None  # the buffer it was read into; None while mapped (Stream._map)
        self.mapped = True
        self.left = 0  # writes in flight
        self.refault = False


class RegionCopy:
    """One region's copy: [start, start+length) of the mirror, read from `src` and written to
    every leg of `dsts`."""

    def __init__(self, region, start, length, src, dsts, direct):
        self.region, self.start, self.length, self.src, self.dsts = region, start, length, src, dsts
        self.direct = direct
        self.written = {}  # leg -> the devices its chunks went through (flushed at the end)
        self.next = 0  # where the next chunk starts, in the region
        self.left = (length + CHUNK - 1) // CHUNK  # chunks not finished
        self.read_error = 0
        self.write_errors = {}  # leg -> its first error
        self.aborted = False  # stopped before every chunk was started (a pause)

    @property
    def started_all(self):
        return self.next >= self.length

    @property
    def done(self):
        """The legs that now hold the region."""
        if self.read_error or self.aborted:
            return []
        return [d for d in self.dsts if d not in self.write_errors]


class Stream:
    """DEPTH page-aligned buffers and the chunks in flight in them. The buffers are made as a
    pass of the copy needs them and unmapped after it (release): an idle mirror holds none."""

    def __init__(self):
        self.cond = threading.Condition()
        self.free = []
        self.inflight = 0
        self.finished = []  # RegionCopy whose chunks are all done, and flushed
        self.to_flush = []  # RegionCopy whose chunks are all done, for the next flush round
        self.flushing = False  # a round of flushes is in flight

    @property
    def room(self):
        """A chunk may start: fewer than DEPTH in flight."""
        return self.inflight < DEPTH

    def release(self):
        """Unmap the buffers (the resync thread, once nothing is in flight)."""
        with self.cond:
            free, self.free = self.free, []
        for buf in free:
            try:
                buf.close()
            except BufferError:  # a view of it is still about: it goes with that
                pass

    def start(self, c):
        """Start c's next chunk (resync thread; there is room). Returns its length."""
        with self.cond:
            if c.read_error:  # the source failed: the rest of the region is not read
                self._drop_rest(c)
                return 0
            off = c.next
            n = min(CHUNK, c.length - off)
            c.next += n
            self.inflight += 1
        k = _Chunk(c, off, n)
        mapped = self._map(k)
        if mapped is None:
            self._read_chunk(k)
        else:
            self._write_chunk(k, memoryview(mapped))
        return n

    def _map(self, k):
        """The source's page cache of chunk k, mapped, where every leg it goes to is written
        O_DIRECT: the disk then takes the data straight from the source's cached pages, with no
        copy into a buffer (the copy's CPU halves). None where not: a remote, mapped or O_DIRECT
        source, a leg written through its own device."""
        c = k.c
        src = c.src.dev
        at = c.src.offset + c.start + k.off
        if not isinstance(src, blockdev.FileDevice) or src.direct or src.failed or at % mmap.ALLOCATIONGRANULARITY:
            return None
        for dst in c.dsts:
            if not getattr(c.direct.writer(dst, dst.offset + c.start + k.off, k.n), "direct", False):
                return None
        try:
            return mmap.mmap(src.fd, k.n, mmap.MAP_SHARED, mmap.PROT_READ, offset=at)
        except (OSError, ValueError):
            return None

    def _read_chunk(self, k):
        k.mapped = False
        with self.cond:
            k.buf = self.free.pop() if self.free else mmap.mmap(-1, CHUNK)
        view = memoryview(k.buf)[:k.n]
        c = k.c
        c.src.dev.submit(bio.IO(bio.READ, c.src.offset + c.start + k.off, k.n, view, 0,
                                lambda io: self._read(k, view, io)))

    def abort(self, c):
        """Start no more of c (a pause): it finishes with what is in flight, not in sync."""
        with self.cond:
            c.aborted = True
            self._drop_rest(c)

    def _drop_rest(self, c):
        """(cond held) Count c's chunks not started as finished."""
        unstarted = (c.length - c.next + CHUNK - 1) // CHUNK
        c.next = c.length
        c.left -= unstarted
        if unstarted and c.left == 0:
            self.finished.append(c)  # aborted or failed: nothing to make durable
            self.cond.notify_all()

    def _read(self, k, view, io):
        if io.error:
            with self.cond:
                k.c.read_error = k.c.read_error or io.error
            self._chunk_done(k)
            return
        self._write_chunk(k, view)

    def _write_chunk(self, k, view):
        c = k.c
        dsts = [d for d in c.dsts if d not in c.write_errors]
        if not dsts:
            self._chunk_done(k)
            return
        k.left = len(dsts)
        for dst in dsts:
            at = dst.offset + c.start + k.off
            dev = c.direct.writer(dst, at, k.n)
            with self.cond:
                c.written.setdefault(dst, set()).add(dev)
            dev.submit(bio.IO(bio.WRITE, at, k.n, view, 0, lambda w, dst=dst: self._wrote(k, dst, w)))

    def _wrote(self, k, dst, io):
        with self.cond:
            if io.error == errno.EFAULT and k.mapped:
                k.refault = True  # the source's pages could not be had: its read says why
            elif io.error:
                k.c.write_errors.setdefault(dst, io.error)
            k.left -= 1
            if k.left:
                return
        if k.refault:
            k.refault = False
            self._read_chunk(k)
            return
        self._chunk_done(k)

    def _chunk_done(self, k):
        c = k.c
        with self.cond:
            if k.buf is not None:
                self.free.append(k.buf)
            self.inflight -= 1
            c.left -= 1
            last = c.left == 0
            self.cond.notify_all()
        if last:
            self._copied(c)

    def _copied(self, c):
        """c's last chunk is done. It is finished once the devices the legs that took it were
        written through are flushed (a region is in sync only once its copy is durable). One
        round of flushes at a time, for every region whose copy ended while the round before was
        in flight: one flush for many regions where flushes are slow, one each where they are
        fast (group commit), and the copy goes on meanwhile."""
        with self.cond:
            if not c.done:  # failed or aborted: nothing to make durable
                self.finished.append(c)
                self.cond.notify_all()
                return
            self.to_flush.append(c)
            if self.flushing:
                return
            self.flushing = True
        self._flush_round()

    def _flush_round(self):
        while True:
            with self.cond:
                batch, self.to_flush = self.to_flush, []
                if not batch:
                    self.flushing = False
                    return
                devs = {}  # device -> [(region copy, leg)] its flush makes durable
                for c in batch:
                    for dst in c.done:
                        for dev in c.written.get(dst, ()):
                            devs.setdefault(dev, []).append((c, dst))
                if not devs:  # (no chunk was written)
                    self.finished.extend(batch)
                    self.cond.notify_all()
                    continue
            break
        left = [len(devs)]

        def flushed(dev, io):
            with self.cond:
                if io.error:
                    for c, dst in devs[dev]:
                        c.write_errors.setdefault(dst, io.error)
                left[0] -= 1
                if left[0]:
                    return
                self.finished.extend(batch)
                self.cond.notify_all()
            self._flush_round()

        for dev in devs:
            dev.submit(bio.IO(bio.FLUSH, 0, 0, None, 0, lambda io, dev=dev: flushed(dev, io)))

    def take_finished(self):
        with self.cond:
            out, self.finished = self.finished, []
        return out

    def wait(self, timeout=None):
        """Until a chunk finishes (or timeout)."""
        with self.cond:
            if not self.finished:
                self.cond.wait(timeout)
