"""One node's membership of the cluster: an etcd lease (its liveness) and the node key under it,
`/appliance/nodes/<name>`. Every write a node makes to a log's keys is fenced on that key still
being under its lease, so a node whose lease expired while it kept running is refused."""

from __future__ import annotations

import errno
import logging
import threading
import time

from . import etcd as e

log = logging.getLogger("appliance.cluster")
PREFIX = "/appliance/"


def node_key(name):
    return f"{PREFIX}nodes/{name}"


class Node:
    def __init__(self, client, name, lease_ttl=5):
        self.etcd = client
        self.name = name
        self.lease_ttl = lease_ttl
        self.lease = 0
        self.lost = False  # the lease expired under us: our regions may have been taken over
        self.deadline = 0.0  # (monotonic) the lease surely lives until then: renewed before
        self.renewed = threading.Condition()  # notified when the deadline moves on
        self.stop = threading.Event()

    @property
    def key(self):
        return node_key(self.name)

    def register(self):
        """A new lease and the node key under it. A node restarted after a crash finds its old
        key alive: it waits out that lease (survivors then take its regions over, which is what
        a crash means); a name still alive after two TTLs belongs to another running node."""
        deadline = time.monotonic() + 2 * self.lease_ttl + 1
        while True:
            if self.key not in self.etcd.get_prefix(self.key):
                asked = time.monotonic()
                lease = self.etcd.grant(self.lease_ttl)  # fresh: no waiting eats into its TTL
                if self.etcd.txn([e.absent(self.key)], [e.put(self.key, self.name, lease)]):
                    break
            if time.monotonic() > deadline:
                raise OSError(errno.EEXIST, f"node {self.name!r} is already alive in the cluster "
                                            f"(`node` in [cluster] must be unique)")
            time.sleep(0.25)
        self.lease = lease
        self._renewed(asked + self.lease_ttl)
        log.info("cluster: node %s joined with lease %x", self.name, lease)

    def fence(self):
        return e.held_by(self.key, self.lease)

    def _renewed(self, deadline):
        with self.renewed:
            self.deadline = deadline
            self.renewed.notify_all()

    def alive(self):
        """Whether this node's lease surely still lives, as far as its last renewal tells
        (counted from when that was asked): past it, another node may have taken its regions."""
        return not self.lost and time.monotonic() < self.deadline

    def wait_alive(self, timeout):
        """alive(), waiting up to `timeout` seconds for a renewal (etcd away for a while)."""
        end = time.monotonic() + timeout
        with self.renewed:
            while not self.alive():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.renewed.wait(min(left, 0.5))  # `lost` is cleared without a notify
        return True

    def keepalive(self):
        """Refresh the lease; on finding it gone, say so loudly and register again (`lost`
        stays set until the caller has re-checked the regions)."""
        asked = time.monotonic()
        if (ttl := self.etcd.keepalive(self.lease)) > 0:
            self._renewed(asked + ttl)
            return True
        log.error("cluster: node %s lost its lease: its regions may have been taken over; "
                  "writes are refused until they are checked again", self.name)
        self.lost = True
        self.register()
        return False

    def run_keepalive(self, on_lost=None):
        """Refresh every third of the TTL until stopped (a thread's body); `on_lost()` runs
        after the node registered again under a new lease."""
        while not self.stop.wait(self.lease_ttl / 3):
            try:
                self.keepalive()
                if self.lost:  # until the re-check went through, on a later tick if need be
                    if on_lost:
                        on_lost()
                    self.lost = False
            except OSError as err:
                log.error("cluster: node %s cannot reach etcd: %s", self.name, err)

    def alive_nodes(self):
        return {k.rsplit("/", 1)[1]: lease for k, (_, _, lease) in
                self.etcd.get_prefix(f"{PREFIX}nodes/").items()}
