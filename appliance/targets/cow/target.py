"""cow <base> <base_offset> [<layer>...]: a stack of copy-on-write layers over a base device.

Every grain is read from the topmost layer that holds it, or from the base; writes go to the
last layer (the writable one). Which layer holds a grain is one lookup in the owner index
(appliance/_fast/cowindex.pyx), built from the layers' bitmaps when the table is loaded, so a
read costs the same whatever the depth. The words and the chain: stack.py; the request path:
requests.py; the messages: push.py, merge.py.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from types import SimpleNamespace

from ... import SECTOR_SIZE
from ... import io as bio
from ..._fast.cowindex import MAX_LAYERS, OwnerIndex, read_descriptor
from .. import DeviceArg, Target, TargetError, _word, parse_int
from . import merge, push
from .layer import DEFAULT_GRAIN, LayerError, attach
from .requests import Requests
from .stack import base_uuid, check_chain, check_offline, layer_devices, parse_layers

log = logging.getLogger(__name__)

BASE_ALLOCATION_HOLE = 1  # NBD base:allocation flags
ALLOCATION_DEPTH = "qemu:allocation-depth"


class Slot:
    """One attached layer: the Layer (header, bitmap), the device its data is read and written
    on, the table words that name it, and what to give back when it goes."""

    def __init__(self, layer, data, words, devices, fds):
        self.layer = layer
        self.data = data
        self.words = words
        self.devices = devices
        self.fds = fds


class Cow(Requests, Target):
    name = "cow"

    @classmethod
    def parse(cls, args):
        if len(args) < 2:
            raise TargetError("cow takes <base> <base_offset> [<layer>...]; a layer is a path made by "
                              "`appliance layer create` or <bitmap_dev> <data_dev> <offset>")
        start = parse_int(args[1], "base offset") * SECTOR_SIZE
        layers = parse_layers(list(args[2:]))
        if len(layers) > MAX_LAYERS:
            raise TargetError(f"{len(layers)} layers; at most {MAX_LAYERS}")
        return SimpleNamespace(devices=[DeviceArg(args[0], start)] + layer_devices(layers), start=start, layers=layers)

    @classmethod
    def validate(cls, segment, check):
        p = cls.parse(list(segment.args))
        check(p.devices[0].word, p.start + segment.size)
        for dev in p.devices[1:]:
            check(dev.word, dev.offset + (segment.size if dev.offset else 0))
        if not any(d.word.startswith("@") for d in p.devices[1:]) and all(
                os.path.exists(d.word) for d in p.devices):
            check_offline(p.layers, segment.size, p.devices[0].word)
        return p

    def ctr(self, args):
        p = self.parse(args)
        self.base_start = p.start
        self.base = self.get_device(args[0])
        self.check_fits(self.base, self.base_start, args[0])
        self.base_id = base_uuid(self.length, getattr(self.base, "path", None))
        self.layers = []
        self._lock = threading.Lock()  # the index and the per-grain locks
        self._busy = {}  # grain -> retries waiting for it (the per-grain lock)
        self.copy_ups = 0
        self.ios = 0  # requests mapped: a merge backs off while this moves
        self.merge = None
        self._started = False
        grain = None
        try:
            for i, lw in enumerate(p.layers):
                writable = i == len(p.layers) - 1 and self.ctx.writable
                slot = self.open_layer(lw.words, writable, grain or DEFAULT_GRAIN)
                self.layers.append(slot)
                grain = grain or slot.layer.grain
            check_chain([s.layer for s in self.layers], self.length, self.base_id, args[0])
            # the whole chain checked: only now is anything written (a new layer takes its parent)
            if self.layers and self.layers[-1].layer.writable:
                under = self.layers[-2].layer.uuid if len(self.layers) > 1 else self.base_id
                self.layers[-1].layer.set_parent(under)
        except (LayerError, OSError) as e:
            raise TargetError(str(e)) from None
        self.grain = grain or DEFAULT_GRAIN
        self.shift = self.grain.bit_length() - 1
        self.build_index()

    def open_layer(self, words, writable, grain):
        """Attach a layer named by its table words; its devices come from the daemon's pool."""
        devices, fds = [], []
        try:
            devs = []
            for w in words[:2]:
                if w.startswith("@"):
                    raise TargetError(f"layer {w}: a layer must be a file or a disk, not a mapped device")
                dev = self.ctx.get_device(w)
                devices.append(dev)
                devs.append(dev)
            # the header and bitmap go through a buffered fd: the pool's may be O_DIRECT
            meta = devs[0].fd
            if devs[0].direct:
                meta = os.open(devs[0].path, (os.O_RDWR if self.ctx.writable else os.O_RDONLY) | os.O_CLOEXEC)
                fds.append(meta)
            if len(words) == 3:
                offset = int(words[2], 0) * SECTOR_SIZE
                layer = attach(meta, devs[1].fd, offset, name=words[0], writable=writable,
                               size=self.length, grain=grain)
                data = devs[1]
            else:
                layer = attach(meta, name=words[0], writable=writable)
                data = devs[0]
            return Slot(layer, data, tuple(words), devices, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            for dev in devices:
                self.ctx.put_device(dev)
            raise

    def close_slot(self, slot):
        slot.layer.close()
        for fd in slot.fds:
            os.close(fd)
        for dev in slot.devices:
            self.ctx.put_device(dev)

    def build_index(self):
        """The owner map from the bitmaps: bottom layer first, so the topmost holder wins. Rebuilt
        in place (suspended: after a merge), so the array a fast path holds stays where it is."""
        grains = -(-self.length // self.grain)
        index = getattr(self, "index", None)
        if index is None:
            index = self.index = OwnerIndex(grains)
        index.set(0, grains, 0)
        for n, slot in enumerate(self.layers, 1):
            index.set_runs(n, slot.layer.allocated_runs())

    def dtr(self):
        if getattr(self, "merge", None) is not None:
            self.merge.stop()
        for slot in getattr(self, "layers", ()):
            if slot.layer.writable:
                self.sync(slot)
            self.close_slot(slot)
        self.layers = []
        super().dtr()

    def iterate_devices(self):
        out = list(self.devices)
        for slot in getattr(self, "layers", ()):
            out += slot.devices
        return out

    # the request path

    def map(self, clone):
        op = clone.op
        self.ios += 1
        if clone.length == 0 and op != bio.FLUSH:
            clone.complete(0)  # no grain to look up
        elif op == bio.READ:
            self.read(clone.offset, clone.length, clone.buf, clone.complete)
        elif not self.layers:  # the base alone, read-only: nothing to write, nothing to flush
            if op in bio.WRITE_OPS:
                clone.error = bio.error(errno.EROFS)
                return bio.KILL
            clone.complete(0)
        elif op == bio.WRITE:
            self.write(clone.offset, clone.buf, clone.flags, clone.complete)
        elif op in (bio.WRITE_ZEROES, bio.TRIM):
            self.zero(clone.offset, clone.length, clone.flags, clone.complete)
        elif op == bio.FLUSH:
            self.flush(clone.complete)
        else:
            clone.complete(0)  # CACHE: advisory
        return bio.SUBMITTED

    def fast_map(self):
        """Reads without the GIL: the owner index and each layer's data fd and zero bitmap
        (appliance/_fast/cowindex.pyx). Writes and FLUSH stay here (copy-up, the bitmap)."""
        devs = [s.data for s in self.layers]
        if any(getattr(d, "fd", None) is None for d in devs):
            return None
        base_fd = getattr(self.base, "fd", None)
        base = (base_fd, self.base_start, not self.base.direct) if base_fd is not None else (-1, 0, 0)
        layers = [(s.data.fd, s.layer.data_offset, s.layer.zero_bits, not s.data.direct) for s in self.layers]
        align = max([getattr(d, "align", 1) for d in devs + [self.base]])
        return read_descriptor(self.index, self.shift, layers, base, align)

    def refresh_fast_map(self):
        """The layers changed (push, merge) with the device suspended: a new descriptor now."""
        self.ctx.device.refresh_fastmap()

    # suspend and resume

    def postsuspend(self):
        if self.layers and self.layers[-1].layer.writable:
            self.sync(self.layers[-1])  # a suspended device's bitmap is on disk

    def resume(self):
        if not self._started:
            # a reload: the table this one replaced synced its bits when it was destroyed,
            # after this one read the bitmaps; read them again before any I/O
            self._started = True
            for slot in self.layers:
                slot.layer.reload_bitmap()
            self.build_index()
            self._seal_lower()
            merge.resume_recorded(self)  # a merge this stack's layers say was running (killed, stopped)

    def _seal_lower(self):
        """A layer the table put another one on (a config edited by hand, not a push) is sealed
        now, as a push would have: a table that later made it the writable layer again would
        change what the layers above it read. Done once the table is live, not at load: until
        the swap the old table may still write to it."""
        if not self.ctx.writable:
            return
        for below, above in zip(self.layers, self.layers[1:]):
            if not below.layer.header.sealed:
                below.layer.writable = True  # for the header write; seal() makes it read-only again
                try:
                    below.layer.seal(child=above.layer.uuid)
                except (LayerError, OSError) as e:
                    below.layer.writable = False
                    log.error("cow: cannot seal %s under %s: %s", below.layer.name, above.layer.name, e)

    # block status

    def block_status(self, offset, length):
        """base:allocation: what a layer holds is data (or zeros, if it holds them so); where no
        layer holds a grain, what the base says."""
        out = []
        for owner, lo, hi, zero in self._extents(offset, length):
            if owner == 0:
                for n, flags in self.base.block_status(self.base_start + lo, hi - lo):
                    out.append((n, flags))
            else:
                out.append((hi - lo, 2 if zero else 0))
        return out

    def context_status(self, context, offset, length):
        if context != ALLOCATION_DEPTH:
            return super().context_status(context, offset, length)
        depth_of_base = len(self.layers) + 1
        out = []
        for owner, lo, hi, _ in self._extents(offset, length):
            if owner:
                out.append((hi - lo, len(self.layers) - owner + 1))
                continue
            for n, flags in self.base.block_status(self.base_start + lo, hi - lo):
                out.append((n, 0 if flags & BASE_ALLOCATION_HOLE else depth_of_base))
        return out

    def _extents(self, offset, length):
        """(owner, lo, hi, zero) byte runs of [offset, offset+length)."""
        end, s = offset + length, self.shift
        for owner, a, b in self.index.owner_runs(offset >> s, ((end - 1) >> s) + 1):
            lo, hi = max(a << s, offset), min(b << s, end)
            if owner == 0:
                yield 0, lo, hi, False
                continue
            pos = lo
            for za, zb in self.layers[owner - 1].layer.zero_runs(a, b):
                zlo, zhi = max(za << s, lo), min(zb << s, hi)
                if zlo > pos:
                    yield owner, pos, zlo, False
                yield owner, zlo, zhi, True
                pos = zhi
            if pos < hi:
                yield owner, pos, hi, False

    # reporting and control

    def status_table(self):
        words = [self.segment.args[0], self.segment.args[1]]
        for slot in self.layers:
            words += list(slot.words)
        return words

    def status_info(self):
        info = {
            "layers": len(self.layers),
            "writable": self.layers[-1].layer.name if self.layers and self.layers[-1].layer.writable else "none",
            "grain": self.grain,
            "allocated": ",".join(str(s.layer.allocated_grains() * self.grain) for s in self.layers) or "0",
            "copy_ups": self.copy_ups,
        }
        if self.merge is not None:
            info.update(self.merge.status())
        return info

    def status_line(self):
        return " ".join(f"{k}={_word(v)}" for k, v in self.status_info().items())

    def message(self, argv):
        if argv[:1] == ["push"] and len(argv) == 2:
            return push.push(self, argv[1])
        if argv[:1] == ["merge"] and 3 <= len(argv) <= 5:
            return merge.start(self, argv[1:])
        if argv == ["cancel"]:
            return merge.cancel(self)
        raise TargetError("cow messages: push <path>, merge <from> <to> [base] [rate=<size>], cancel")
