"""error: every I/O fails with EIO (dm-error). Flush succeeds: there is nothing to flush."""

import errno

from .. import io as bio
from . import Target, TargetError


class Error(Target):
    name = "error"

    @classmethod
    def parse(cls, args):
        if args:
            raise TargetError("error takes no arguments")
        return super().parse(args)

    def ctr(self, args):
        self.parse(args)

    def map(self, clone):
        if clone.op == bio.FLUSH:
            clone.complete(0)
            return bio.SUBMITTED
        clone.error = errno.EIO  # the storage says no: a target error, not a path to retry
        return bio.KILL
