"""linear <dev> <offset>: map the segment onto a range of another device."""

from types import SimpleNamespace

from .. import SECTOR_SIZE
from .. import io as bio
from .._fast.fastops import fd_range
from . import DeviceArg, Target, TargetError, parse_int


class Linear(Target):
    name = "linear"

    @classmethod
    def parse(cls, args):
        if len(args) != 2:
            raise TargetError("linear takes <dev> <offset>")
        start = parse_int(args[1], "offset") * SECTOR_SIZE
        return SimpleNamespace(devices=[DeviceArg(args[0], start)], start=start)

    def ctr(self, args):
        p = self.parse(args)
        self.start = p.start
        self.dev = self.get_device(args[0])
        self.check_fits(self.dev, self.start, args[0])

    def map(self, clone):
        clone.offset += self.start  # prep_map's default chose self.dev, the only device
        return bio.REMAPPED

    def fast_map(self):
        fd = getattr(self.dev, "fd", None)
        if fd is None:
            return None
        return fd_range(fd, self.start, self.dev.align)

    def block_status(self, offset, length):
        return self.dev.block_status(self.start + offset, length)
