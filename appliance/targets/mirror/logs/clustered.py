"""clustered: a mirror's log shared by every host that exports the mirror (dm's clustered log,
dm-log-userspace). The regions' states live in the cluster log service (`appliance logd`, or
one the daemon runs itself), which keeps them in etcd; this is the client side.

Table words: `clustered <#log_args> <uuid> <region_size> [sync|nosync]`; appliance.toml's
[cluster] says where etcd is and which node this is. Marks and clears are sent with the flush
(dm's integrated flush), so a write waits for one round trip per batch; a region this node has
marked costs none. The regions a survivor takes over from a lost node show up as resync work,
and other nodes follow them with IS_REMOTE_RECOVERING: an etcd watch on the log's `recover/`
keys rings a thread, which then asks the service (the protocol has no way for the service to
speak first) and hands new work to the mirror's resync.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from ... import TargetError
from ....cluster.client import LogClient
from ....cluster.etcd import Etcd
from ....cluster.logd import listening
from ....cluster.node import PREFIX
from ....cluster.protocol import PAIR_IQ, PAIR_QI, U64, RequestType as T, pack_regions
from .core import CoreLog

log = logging.getLogger("appliance.mirror")
_services = {}  # socket path -> the log service this process runs
_services_lock = threading.Lock()


def _in_process_service(settings, path):
    """The daemon's own log service on `path`, started by the first clustered log."""
    from ....cluster.logd import LogService

    with _services_lock:
        if path not in _services:
            svc = LogService(Etcd.for_settings(settings), settings.node, settings.lease_ttl)
            try:
                svc.start()
            except OSError as e:
                raise TargetError(f"cluster: cannot join etcd at {', '.join(settings.endpoints)}: "
                                  f"{e.strerror or e}") from None
            ready = threading.Event()
            threading.Thread(target=svc.serve, args=(path, ready), name="cluster-logd", daemon=True).start()
            ready.wait(5)
            _services[path] = svc
        return _services[path]


class ClusteredLog(CoreLog):
    name = "clustered"
    durable_marks = True
    marks_lapse = True  # with the node's lease

    def attach(self, mirror, parsed):
        ctx = mirror.ctx
        settings = ctx.settings("cluster") if hasattr(ctx, "settings") else None
        if settings is None:
            raise TargetError("a clustered mirror log needs a [cluster] section in appliance.toml "
                              "(endpoints, node)")
        self.mirror, self.uuid, self.settings = mirror, parsed.uuid, settings
        state_dir = ctx.daemon_config.state_dir if ctx.daemon_config else "/var/lib/appliance"
        self.path = settings.socket or os.path.join(state_dir, "cluster-log.sock")
        if not listening(self.path):  # no `appliance logd` unit there: the daemon runs one
            _in_process_service(settings, self.path)

    def ctr(self, region_size, region_count, sync=None, dev=None, lock=None, word=None):
        super().ctr(region_size, region_count, sync, dev, lock, word)
        self.out_of_sync = set()  # the service says which regions (resync work)
        self.to_mark, self.to_clear = set(), set()
        self.holds_until = self.renew_at = 0.0  # see flush()
        self.remote = set()  # regions another node resyncs now
        words = [str(region_size), self.uuid] + ([sync] if sync else []) + [str(self.mirror.length)]
        s = self.settings
        # the service itself waits up to etcd_timeout for etcd: a resend before that only queues
        self.client = LogClient(self.path, self.uuid, " ".join(words), timeout=s.etcd_timeout + 2,
                                pause=0.5, bound=s.etcd_timeout)
        self.call_lock = threading.Lock()  # one request on the wire at a time
        self.stop = threading.Event()
        self.changed = threading.Event()  # rung by the watch on the log's recover/ keys
        try:
            self._pull()  # the first call registers the log (CTR + RESUME)
        except OSError as e:
            raise TargetError(f"clustered log {self.uuid}: {e.strerror or e}") from None
        recover = f"{PREFIX}logs/{self.uuid}/recover/"
        threading.Thread(target=Etcd.for_settings(s).watch, name=f"cluster-watch-{self.uuid}",
                         args=(recover, lambda events: self.changed.set(), self.stop,
                               self.changed.set), daemon=True).start()
        threading.Thread(target=self._follow, name=f"cluster-log-{self.uuid}", daemon=True).start()

    def _call(self, rtype, data=b""):
        with self.call_lock:
            return self.client.call(rtype, data)

    def _pull(self):
        """The service's resync work (the initial sync, regions taken over from lost nodes),
        moved into this log's regions out of sync; the regions new to it."""
        new = set()
        while True:
            found, region = PAIR_IQ.unpack(self._call(T.GET_RESYNC_WORK))
            if not found:
                return new
            if region not in self.out_of_sync:
                new.add(region)
                CoreLog.set_region_sync(self, region, False)

    def _remote_recovering(self):
        """The regions other nodes resync for a lost node (IS_REMOTE_RECOVERING, walking its hint)."""
        found, r = set(), 0
        while r < self.region_count:
            busy, after = PAIR_IQ.unpack(self._call(T.IS_REMOTE_RECOVERING, U64.pack(r)))
            if busy:
                found.add(r)
            r = max(after, r + 1)
        return found

    def _follow_remote(self):
        """Another node resyncs these regions: reads go to the primary (the resync source) and
        writes wait until it is done."""
        now = self._remote_recovering()
        m = self.mirror
        for r in sorted(now - self.remote):
            m.regions.begin_recovery(r)
            with self.lock:
                for leg in m.legs:
                    if leg.index != m.primary:
                        leg.stale.add(r)
        for r in sorted(self.remote - now):
            with self.lock:
                if r not in self.out_of_sync:
                    for leg in m.legs:
                        leg.stale.discard(r)
            m.regions.end_recovery(r)
        if now != self.remote:
            log.warning("mirror: clustered log %s: %d regions being resynced by another node",
                        self.uuid, len(now))
        self.remote = now

    def _follow(self):
        """Each time the watch rings (and once it is open: what changed before), the regions
        other nodes resync and this node's new resync work; failing (the service or etcd
        away), again a second later."""
        while self.changed.wait() and not self.stop.is_set():
            self.changed.clear()
            try:
                self._follow_remote()
                with self.lock:
                    new = self._pull()
                    if new:
                        log.warning("mirror: clustered log %s: %d regions of a lost node to resync",
                                    self.uuid, len(new))
                        for leg in self.mirror.legs:
                            if leg.index != self.mirror.primary:
                                leg.stale |= new
                if new:
                    self.mirror.resync.kick()
            except OSError as e:
                log.error("mirror: clustered log %s: %s", self.uuid, e.strerror or e)
                self.stop.wait(1)
                self.changed.set()

    def dtr(self):
        self.stop.set()
        self.changed.set()
        try:
            self._call(T.DTR)
        except OSError as e:
            log.warning("mirror: clustered log %s: DTR: %s", self.uuid, e.strerror or e)
        self.client.close()

    def resume(self):
        super().resume()
        self._call(T.RESUME)

    def postsuspend(self):
        self.flush()
        self._call(T.POSTSUSPEND)

    def mark_region(self, region):
        super().mark_region(region)
        self.to_clear.discard(region)
        self.to_mark.add(region)

    def clear_region(self, region):
        super().clear_region(region)
        if region in self.to_mark:
            self.to_mark.discard(region)
        else:
            self.to_clear.add(region)

    def flush(self):
        """The batch to the service: MARK, CLEAR, then FLUSH, which makes it one etcd txn.
        Failing, the batch stays for the next flush and the writes waiting on it fail. FLUSH's
        answer says how long this node's lease surely lives; with nothing to send, a FLUSH
        goes anyway once a third of that has passed (the mirror's log writer calls this every
        second), so the marks keep holding while the lease is renewed."""
        asked = time.monotonic()
        if not self.to_mark and not self.to_clear and asked < self.renew_at:
            return
        marks, clears = sorted(self.to_mark), sorted(self.to_clear)
        try:
            if marks:
                self._call(T.MARK_REGION, pack_regions(marks))
            if clears:
                self._call(T.CLEAR_REGION, pack_regions(clears))
            reply = self._call(T.FLUSH)
        except OSError as e:
            raise OSError(e.errno or errno.EIO, f"clustered log {self.uuid}: {e.strerror or e}") from None
        left = U64.unpack(reply)[0] / 1000 if len(reply) == U64.size else 0.0
        self.holds_until, self.renew_at = asked + left, asked + left / 3
        self.to_mark -= set(marks)
        self.to_clear -= set(clears)

    def marks_hold(self):
        """Past the lease's sure life the regions this node marked may be a survivor's to
        resync: a write there goes through the service again (and fails while it cannot
        renew the lease)."""
        return time.monotonic() < self.holds_until

    def set_region_sync(self, region, in_sync):
        super().set_region_sync(region, in_sync)
        self._call(T.SET_REGION_SYNC, PAIR_QI.pack(region, 1 if in_sync else 0))

    def status(self):
        return ["3", "clustered", self.settings.node, self.uuid]

    def status_table(self):
        words = [self.uuid, str(self.region_size // 512)] + ([self.sync_arg] if self.sync_arg else [])
        return ["clustered", str(len(words)), *words]
