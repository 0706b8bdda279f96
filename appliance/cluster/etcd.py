"""etcd through its v3 JSON gateway (grpc-gateway: POST /v3/kv/range, /v3/kv/txn,
/v3/lease/grant, /v3/lease/keepalive), with the standard library only.

Not aetcd: it is asyncio-only and pulls grpcio and protobuf, while the log service's callers
are threads that block on one answer; the gateway is part of every etcd since 3.3, Debian's
3.4 included. Keys and values travel base64-encoded, numbers (revisions, lease ids) as strings.
"""

from __future__ import annotations

import base64
import errno
import json
import time
import urllib.error
import urllib.request


class EtcdError(OSError):
    """etcd could not be reached (or answered an error) within the bound."""


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def unb64(s):
    return base64.b64decode(s).decode() if s else ""


def prefix_end(prefix):
    """The range_end that makes `prefix` a prefix query (etcd's clientv3.GetPrefixRangeEnd)."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return b64(bytes(b))


class Etcd:
    """A client over `endpoints` (tried in turn); a call that gets no answer from any of them
    within `timeout` seconds raises EtcdError(ETIMEDOUT). `txns` counts transactions sent."""

    def __init__(self, endpoints, timeout=10.0, request_timeout=2.0):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.txns = 0

    def call(self, path, body):
        deadline = time.monotonic() + self.timeout
        last = None
        while True:
            for url in self.endpoints:
                req = urllib.request.Request(url + path, json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=self.request_timeout) as r:
                        return json.loads(r.read() or b"{}")
                except urllib.error.HTTPError as e:
                    raise EtcdError(errno.EIO, f"etcd {url}{path}: {e.code} {e.read()[:200]!r}") from None
                except (OSError, ValueError) as e:
                    last = f"{url}: {e}"
            if time.monotonic() >= deadline:
                raise EtcdError(errno.ETIMEDOUT, f"etcd unreachable for {self.timeout:g}s ({last})")
            time.sleep(0.2)

    # kv
    def get_prefix(self, prefix):
        """{key: (value, mod_revision, lease)} under prefix."""
        r = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        return {unb64(kv["key"]): (unb64(kv.get("value")), int(kv.get("mod_revision", 0)),
                                   int(kv.get("lease", 0))) for kv in r.get("kvs", [])}

    def count_prefix(self, prefix):
        r = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix),
                                       "count_only": True})
        return int(r.get("count", 0))

    def txn(self, compare=(), success=(), failure=()):
        """One transaction; True if its compares held (success ran)."""
        self.txns += 1
        r = self.call("/v3/kv/txn", {"compare": list(compare), "success": list(success),
                                     "failure": list(failure)})
        return bool(r.get("succeeded"))

    # leases
    def grant(self, ttl):
        return int(self.call("/v3/lease/grant", {"TTL": int(ttl)})["ID"])

    def keepalive(self, lease):
        """The TTL left after the refresh; 0 if the lease is gone."""
        r = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(r.get("result", r).get("TTL", 0))

    def ttl(self, lease):
        r = self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(r.get("TTL", -1))


# txn building blocks
def put(key, value="", lease=0):
    op = {"key": b64(key), "value": b64(value)}
    if lease:
        op["lease"] = str(lease)
    return {"request_put": op}


def delete(key, prefix=False):
    op = {"key": b64(key)}
    if prefix:
        op["range_end"] = prefix_end(key)
    return {"request_delete_range": op}


def absent(key):
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def held_by(key, lease):
    """The key exists and is under `lease`: the fence a node's writes go through."""
    return {"key": b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}
