"""cow: a stack of copy-on-write layers over a base device (issue 10).

The target is `Cow` (target.py); its parts: layer.py (the on-disk layer), stack.py (the table's
words and the chain), requests.py (reads, writes, copy-up, FLUSH), push.py and merge.py (the
messages), journal.py (a merge's progress on disk), the owner index in
appliance/_fast/cowindex.pyx, and the `appliance layer` commands (command.py, offline.py).
"""

from .target import Cow

__all__ = ["Cow"]
