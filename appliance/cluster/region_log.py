"""A clustered log's regions in etcd, as one node sees them (the log service's side of
dm-dirty-log's operations).

Keys under /appliance/logs/<uuid>/:
    mark/<region>/<node>     the node may have writes in flight there (not clean)
    recover/<region>         a survivor resyncs the region for a lost node ("<survivor> <lost>")
    init                     the node that claimed the log's initial sync

Marks are not under the node's lease: when the lease expires its marks stay, and a survivor
moves them to itself in one transaction (compare-and-swap on each mark's revision, so only one
survivor wins) and resyncs those regions. MARK and CLEAR wait for FLUSH, and a flush is one
transaction fenced by the node's lease; a region this node already marked costs nothing.
"""

from __future__ import annotations

import errno
import logging
import time

from . import etcd as e
from .protocol import U64
from .node import PREFIX

log = logging.getLogger("appliance.cluster")


def parse_ctr(args):
    """CTR's words: `<region_size> <uuid> [sync|nosync] <device length>` (bytes), as dm's
    cluster log builds its constructor string (the table's words, then the target's length)."""
    if len(args) not in (3, 4):
        raise ValueError(f"clustered log CTR wants 3 or 4 words, got {args!r}")
    region_size, length = int(args[0]), int(args[-1])
    sync = args[2] if len(args) == 4 else None
    if sync not in (None, "sync", "nosync") or region_size <= 0:
        raise ValueError(f"bad clustered log arguments {args!r}")
    return region_size, -(-length // region_size), sync


class EtcdLog:
    LINGER = 64  # regions a node keeps marked after their writes completed
    def __init__(self, node, uuid, args):
        self.node, self.uuid = node, uuid
        self.region_size, self.region_count, self.sync_arg = parse_ctr(args)
        self.base = f"{PREFIX}logs/{uuid}/"
        self.marked = set()  # marked in etcd by this node
        self.to_mark = set()  # waiting for FLUSH
        self.idle = {}  # marked, no write in flight: cleared by a later flush (oldest first)
        self.out_of_sync = set()
        self.recovering = set()  # regions this node resyncs for a lost node
        self.search = 0
        self._claim_initial_sync()
        self.take_over(self.node.alive_nodes())  # nodes lost before this node opened the log

    def _key(self, kind, region, node=None):
        return f"{self.base}{kind}/{region:012d}" + (f"/{node}" if node else "")

    def _claim_initial_sync(self):
        """The first node to create the log does its initial sync; only one wins the claim."""
        if self.sync_arg == "nosync":
            self.node.etcd.txn([e.absent(self.base + "init")], [e.put(self.base + "init", "nosync")])
            return
        if self.node.etcd.txn([e.absent(self.base + "init"), self.node.fence()],
                              [e.put(self.base + "init", self.node.name)]):
            self.out_of_sync = set(range(self.region_count))
            log.info("cluster: %s claimed the initial sync of log %s", self.node.name, self.uuid)

    def dtr(self):
        self.flush(everything=True)

    def presuspend(self):
        pass

    def postsuspend(self):
        self.flush(everything=True)

    def resume(self):
        self.search = 0
        if self.node.lost:
            self.recheck()

    def recheck(self):
        """Our lease expired while we were cut off, so our marks may have been taken over:
        drop what etcd no longer holds for us, so those regions are marked again (a fenced
        transaction) before any write to them."""
        held = self.node.etcd.get_prefix(self.base + "mark/")
        self.marked = {int(k.split("/")[-2]) for k in held if k.endswith("/" + self.node.name)}
        for r in [r for r in self.idle if r not in self.marked]:
            del self.idle[r]

    def get_region_size(self):
        return self.region_size

    def is_clean(self, region):
        if region in self.marked or region in self.to_mark:
            return False
        return self.node.etcd.count_prefix(self._key("mark", region) + "/") == 0

    def in_sync(self, region):
        return region not in self.out_of_sync

    def mark_region(self, region):
        self.idle.pop(region, None)  # a newer write: the lazy clear must not remove its mark
        if region not in self.marked:
            self.to_mark.add(region)

    def clear_region(self, region):
        if region in self.to_mark:
            self.to_mark.discard(region)
        elif region in self.marked:
            self.idle[region] = None

    def flush(self, everything=False):
        """The batch of MARKs and CLEARs as one transaction, fenced by this node's lease.
        Cleared regions linger marked (md's bitmap keeps bits set a while for the same reason)
        until more than `LINGER` are marked: a region written again soon costs nothing, and a
        flush with nothing new to mark sends nothing. But once this node's lease may have run out
        (etcd unreachable since its last renewal) a survivor may be resyncing the regions it
        holds marked, so no write may go on as if nothing happened: the flush waits for a
        renewal, up to etcd_timeout, and is refused after that."""
        if not everything and not self.node.wait_alive(self.node.etcd.timeout):
            raise OSError(errno.ESTALE, f"node {self.node.name}'s lease could not be renewed: "
                                        f"its writes are fenced until etcd answers again")
        excess = len(self.marked) + len(self.to_mark) - self.LINGER
        to_clear = list(self.idle)[:max(0, excess) if not everything else None]
        if self.to_mark or to_clear:
            self._commit(to_clear)
        # how long the lease surely lives: until then the mirror may write to the regions it
        # has marked without asking again
        return U64.pack(int(max(0.0, self.node.deadline - time.monotonic()) * 1000))

    def _commit(self, to_clear):
        name = self.node.name
        ops = [e.put(self._key("mark", r, name)) for r in sorted(self.to_mark)]
        ops += [e.delete(self._key("mark", r, name)) for r in to_clear]
        if not self.node.etcd.txn([self.node.fence()], ops):
            raise OSError(errno.ESTALE, f"node {name}'s lease is gone: its writes are fenced")
        self.marked = (self.marked | self.to_mark) - set(to_clear)
        self.to_mark = set()
        for r in to_clear:
            del self.idle[r]

    def get_resync_work(self):
        while self.search < self.region_count:
            r = self.search
            self.search += 1
            if r in self.out_of_sync:
                return r
        return None

    def set_region_sync(self, region, in_sync):
        if not in_sync:
            self.out_of_sync.add(region)
            self.search = min(self.search, region)
            return
        self.out_of_sync.discard(region)
        if region in self.recovering:
            self.recovering.discard(region)
            self.marked.discard(region)
            self.idle.pop(region, None)
            self.node.etcd.txn([self.node.fence()], [e.delete(self._key("recover", region)),
                                                     e.delete(self._key("mark", region, self.node.name))])

    def get_sync_count(self):
        return self.region_count - len(self.out_of_sync)

    def is_remote_recovering(self, region):
        """(another node resyncs the region for a lost node, the next region after it that
        another node resyncs, or region_count): the hint lets a mirror list them all in as many
        requests as there are such regions."""
        others = sorted(int(k.rsplit("/", 1)[1]) for k, (v, _, _) in
                        self.node.etcd.get_prefix(self.base + "recover/").items()
                        if v.split()[0] != self.node.name)
        return region in others, next((r for r in others if r > region), self.region_count)

    def take_over(self, alive):
        """Move the marks of nodes not in `alive` to this node in one transaction and queue
        their regions for resync; the regions taken over (empty if another survivor won)."""
        marks = self.node.etcd.get_prefix(self.base + "mark/")
        lost = {k: (int(k.split("/")[-2]), rev) for k, (_, rev, _) in marks.items()
                if k.rsplit("/", 1)[1] not in alive}
        if not lost:
            return set()
        regions = {r for r, _ in lost.values()}
        compare = [self.node.fence()] + [{"key": e.b64(k), "target": "MOD", "result": "EQUAL",
                                          "mod_revision": str(rev)} for k, (_, rev) in lost.items()]
        ops = [e.delete(k) for k in lost]
        whose = {r: k.rsplit("/", 1)[1] for k, (r, _) in lost.items()}
        for r in sorted(regions):  # recover/<r> says who resyncs it, for whom
            ops += [e.put(self._key("mark", r, self.node.name)),
                    e.put(self._key("recover", r), f"{self.node.name} {whose[r]}")]
        if not self.node.etcd.txn(compare, ops):
            return set()
        log.warning("cluster: %s took over %d regions of lost node(s) %s in log %s", self.node.name,
                    len(regions), sorted({k.rsplit("/", 1)[1] for k in lost}), self.uuid)
        self.marked |= regions
        self.recovering |= regions
        for r in regions:
            self.set_region_sync(r, False)
        return regions

    def status(self):
        return ["5", "clustered", self.node.name, str(len(self.marked)), str(len(self.recovering)),
                f"txns={self.node.etcd.txns}"]

    def status_table(self):
        words = [str(self.region_size // 512), self.uuid] + ([self.sync_arg] if self.sync_arg else [])
        return ["clustered", str(len(words)), *words]
