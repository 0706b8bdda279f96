"""zero: reads return zeros, writes are discarded (dm-zero)."""

from .. import io as bio
from .._fast.fastops import zeros
from . import Target, TargetError


class Zero(Target):
    name = "zero"

    def ctr(self, args):
        if args:
            raise TargetError("zero takes no arguments")

    def map(self, io):
        if io.op == bio.READ:
            io.buf[:] = bytes(io.length)
        io.complete(0)
        return bio.SUBMITTED

    def fast_map(self):
        return zeros()

    def block_status(self, offset, length):
        return [(length, 3)]
