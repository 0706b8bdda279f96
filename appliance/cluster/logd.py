"""The log service (`appliance logd`): the cluster log protocol over a Unix socket, each log's
regions kept in etcd (region_log), this node's liveness an etcd lease (node). It can run in the
daemon or as its own process with its own unit; mirrors reach it by the socket either way."""

from __future__ import annotations

import logging
import os
import socket
import threading

from . import protocol
from .etcd import Etcd
from .node import Node
from .region_log import EtcdLog

log = logging.getLogger("appliance.cluster")


class LogService:
    def __init__(self, endpoints, node, lease_ttl=5, etcd_timeout=10.0):
        self.node = Node(Etcd(endpoints, etcd_timeout), node, lease_ttl)
        self.service = protocol.Service(lambda uuid, args: EtcdLog(self.node, uuid, args))
        self.lock = threading.Lock()  # the logs are one node's state, changed one request at a time

    def start(self):
        self.node.register()
        threading.Thread(target=self.node.run_keepalive, args=(self.check_nodes,),
                         name="cluster-keepalive", daemon=True).start()

    def check_nodes(self):
        """Take over the marked regions of nodes whose lease expired."""
        alive = self.node.alive_nodes()
        with self.lock:
            for region_log in list(self.service.logs.values()):
                region_log.take_over(alive)

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


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    svc = LogService(args.endpoints.split(","), args.node, args.lease_ttl, args.etcd_timeout)
    svc.start()
    svc.serve(args.socket)


def add_parser(sub):
    s = sub.add_parser("logd", help="run the cluster log service for clustered mirrors")
    s.add_argument("--endpoints", required=True, help="etcd client URLs, comma-separated")
    s.add_argument("--node", required=True, help="this node's name, unique in the cluster")
    s.add_argument("--socket", required=True, help="the Unix socket mirrors reach the service by")
    s.add_argument("--lease-ttl", type=int, default=5, help="seconds a lost node keeps its lease")
    s.add_argument("--etcd-timeout", type=float, default=10.0, help="bound on waiting for etcd")
    s.set_defaults(fn=main)
