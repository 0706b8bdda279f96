"""The log service (`appliance logd`): the cluster log protocol over a Unix socket, each log's
regions kept in etcd (region_log), this node's liveness an etcd lease (node). It can run in the
daemon or as its own process with its own unit; mirrors reach it by the socket either way.

A watch on the node keys tells it at once when another node's lease expired (etcd deletes the
key with the lease): it then takes that node's marks over (region_log.take_over)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from . import protocol
from .etcd import Etcd
from .node import PREFIX, Node
from .region_log import EtcdLog

log = logging.getLogger("appliance.cluster")


class LogService:
    def __init__(self, client, node, lease_ttl=5):
        self.node = Node(client, node, lease_ttl)
        self.service = protocol.Service(lambda uuid, args: EtcdLog(self.node, uuid, args))
        self.lock = threading.Lock()  # the logs are one node's state, changed one request at a time

    def start(self):
        self.node.register()
        threading.Thread(target=self.node.run_keepalive, args=(self._recheck,),
                         name="cluster-keepalive", daemon=True).start()
        threading.Thread(target=self.node.etcd.watch, name="cluster-nodes-watch", daemon=True,
                         args=(f"{PREFIX}nodes/", self._nodes_changed, self.node.stop,
                               self._check_nodes)).start()

    def _nodes_changed(self, events):
        if any(kind == "DELETE" for kind, _, _ in events):
            self._check_nodes()

    def _check_nodes(self):
        """Take over the marked regions of nodes whose lease expired."""
        try:
            alive = self.node.alive_nodes()
            with self.lock:
                for region_log in list(self.service.logs.values()):
                    region_log.take_over(alive)
        except OSError as e:
            log.error("cluster: node %s cannot take over a lost node's regions: %s",
                      self.node.name, e.strerror or e)

    def _recheck(self):
        with self.lock:
            for region_log in list(self.service.logs.values()):
                region_log.recheck()

    def handle(self, msg):
        with self.lock:
            return self.service.handle(msg)

    def serve_connection(self, sock):
        conn = protocol.ServerConnection(self)
        with sock:
            try:
                while data := sock.recv(65536):
                    conn.receive_data(data)
                    sock.sendall(conn.data_to_send())
            except (OSError, protocol.ProtocolError) as e:
                log.warning("logd: dropping a client: %s", e)

    def serve(self, path, ready=None):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(16)
        if ready is not None:
            ready.set()
        log.info("logd: node %s serving cluster logs on %s", self.node.name, path)
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=self.serve_connection, args=(sock,), daemon=True).start()


def listening(path):
    """Whether a log service already answers on `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def main(args):
    from .. import config as cfg

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.endpoints and args.node and args.socket:
        client = Etcd(args.endpoints.split(","), args.etcd_timeout, ca=args.ca, cert=args.cert,
                      key=args.key)
        node, ttl, path = args.node, args.lease_ttl, args.socket
    else:  # the [cluster] section, as the daemon reads it (the unit's way)
        conf = cfg.load_or_default(getattr(args, "config", None))
        s = conf.cluster
        if s is None:
            print(f"appliance logd: {conf.source} has no [cluster] section "
                  f"(or give --endpoints, --node and --socket)", file=sys.stderr)
            return 1
        client = Etcd.for_settings(s)
        node, ttl = s.node, s.lease_ttl
        path = s.socket or os.path.join(conf.daemon.state_dir, "cluster-log.sock")
    if listening(path):
        print(f"appliance logd: a log service already listens on {path}", file=sys.stderr)
        return 1
    svc = LogService(client, node, ttl)
    try:
        svc.start()
    except OSError as e:
        print(f"appliance logd: cannot join etcd at {', '.join(client.endpoints)}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 1
    svc.serve(path)


def add_parser(sub):
    s = sub.add_parser("logd", help="run the cluster log service for clustered mirrors",
                       description="Without --endpoints/--node/--socket, [cluster] in the config says.")
    s.add_argument("--endpoints", help="etcd client URLs, comma-separated")
    s.add_argument("--node", help="this node's name, unique in the cluster")
    s.add_argument("--socket", help="the Unix socket mirrors reach the service by")
    s.add_argument("--lease-ttl", type=int, default=5, help="seconds a lost node keeps its lease")
    s.add_argument("--etcd-timeout", type=float, default=10.0, help="bound on waiting for etcd")
    s.add_argument("--ca", help="CA that signed etcd's certificate (https endpoints)")
    s.add_argument("--cert", help="this node's client certificate for etcd")
    s.add_argument("--key", help="the client certificate's key")
    s.set_defaults(fn=main)
