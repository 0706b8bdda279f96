"""zero: reads return zeros, writes are discarded (dm-zero)."""

from .. import io as bio
from .._fast.fastops import zeros
from . import Target, TargetError


class Zero(Target):
    name = "zero"

    @classmethod
    def parse(cls, args):
        if args:
            raise TargetError("zero takes no arguments")
        return super().parse(args)

    def ctr(self, args):
        self.parse(args)

    def map(self, clone):
        if clone.op == bio.READ:
            clone.buf[:] = bytes(clone.length)
        clone.complete(0)
        return bio.SUBMITTED

    def fast_map(self):
        return zeros()

    def block_status(self, offset, length):
        return [(length, 3)]
