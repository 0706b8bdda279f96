"""error: every I/O fails with EIO (dm-error). Flush succeeds: there is nothing to flush."""

import errno

from .. import io as bio
from . import Target, TargetError


class Error(Target):
    name = "error"

    def ctr(self, args):
        if args:
            raise TargetError("error takes no arguments")

    def map(self, clone):
        if clone.op == bio.FLUSH:
            clone.complete(0)
            return bio.SUBMITTED
        clone.error = errno.EIO  # the storage says no: a target error, not a path to retry
        return bio.KILL
