"""`merge FROM TO`, `cancel` (placeholder until the merge lands)."""

from .. import TargetError


def start(target, first, last):
    raise TargetError("merge: not implemented yet")


def cancel(target):
    raise TargetError("cancel: no merge is running")
