"""The resync's copy: regions streamed from a good leg to the stale ones, CHUNK at a time, with
DEPTH chunks in flight, through the I/O engine (files and disks) or the NBD client (remote
legs). A chunk's writes start from its read's completion, and a finished chunk's buffer takes
the next one at once: the legs stay busy with large I/Os, and Python runs per chunk, never per
block.

A stale file or disk leg is written around the page cache, on an fd of the copy's own opened
O_DIRECT (Direct): it goes at the disk's sequential speed instead of dirtying the whole leg in
the cache for a long writeback after. The kernel keeps it coherent with the leg's own buffered
fd (a direct write writes back, then drops, the cached pages of its range), and no client write
comes between: the region is held while it is copied. The source is read through its device:
often in the page cache (a direct read would go to the disk, where reads can be the slower
half: 1 GiB/s here against 2.5 for writes), else read ahead. The leg's own device where a
direct write cannot be: a remote or mapped leg, a file system that refuses O_DIRECT, a chunk
not 4 KiB aligned.

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

import mmap
import threading

from ... import directfd
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
            buf = self.free.pop() if self.free else mmap.mmap(-1, CHUNK)
            off = c.next
            n = min(CHUNK, c.length - off)
            c.next += n
            self.inflight += 1
        view = memoryview(buf)[:n]
        c.src.dev.submit(bio.IO(bio.READ, c.src.offset + c.start + off, n, view, 0,
                                lambda io: self._read(c, off, n, buf, view, io)))
        return n

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

    def _read(self, c, off, n, buf, view, io):
        if io.error:
            with self.cond:
                c.read_error = c.read_error or io.error
            self._chunk_done(c, buf)
            return
        dsts = [d for d in c.dsts if d not in c.write_errors]
        if not dsts:
            self._chunk_done(c, buf)
            return
        left = [len(dsts)]
        for dst in dsts:
            at = dst.offset + c.start + off
            dev = c.direct.writer(dst, at, n)
            with self.cond:
                c.written.setdefault(dst, set()).add(dev)
            dev.submit(bio.IO(bio.WRITE, at, n, view, 0, lambda w, dst=dst: self._wrote(c, dst, buf, left, w)))

    def _wrote(self, c, dst, buf, left, io):
        with self.cond:
            if io.error:
                c.write_errors.setdefault(dst, io.error)
            left[0] -= 1
            last = left[0] == 0
        if last:
            self._chunk_done(c, buf)

    def _chunk_done(self, c, buf):
        with self.cond:
            self.free.append(buf)
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
