"""linear <dev> <offset>: map the segment onto a range of another device."""

from .. import SECTOR_SIZE
from .. import io as bio
from .._fast.fastops import fd_range
from . import Target, TargetError, parse_int


class Linear(Target):
    name = "linear"

    def ctr(self, args):
        if len(args) != 2:
            raise TargetError("linear takes <dev> <offset>")
        self.dev = self.get_device(args[0])
        self.start = parse_int(args[1], "offset") * SECTOR_SIZE
        self.check_fits(self.dev, self.start, args[0])

    def map(self, io):
        io.dev = self.dev
        io.offset += self.start
        return bio.REMAPPED

    def fast_map(self):
        fd = getattr(self.dev, "fd", None)
        if fd is None:
            return None
        return fd_range(fd, self.start, self.dev.align)

    def block_status(self, offset, length):
        return self.dev.block_status(self.start + offset, length)
