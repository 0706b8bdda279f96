"""etcd through its v3 JSON gateway (grpc-gateway: POST /v3/kv/range, /v3/kv/txn,
/v3/lease/grant, /v3/lease/keepalive, and /v3/watch, whose answer is a stream of JSON objects,
one per line), with the standard library only, over https when given a CA (and a client
certificate if etcd asks for one).

Not aetcd (1.0.0): it has no TLS (its channel is always grpc's insecure_channel), talks to one
host:port only, and its transactions cannot compare a key's lease, the fence every write here
goes through; it also needs grpcio > 1.66 and protobuf > 4, newer than Debian 12 ships. The
gateway is part of every etcd since 3.3, Debian's 3.4 included. Keys and values travel
base64-encoded, numbers (revisions, lease ids) as strings.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import ssl
import time
import urllib.error
import urllib.request

log = logging.getLogger("appliance.cluster")


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

    def __init__(self, endpoints, timeout=10.0, request_timeout=2.0, ca=None, cert=None, key=None):
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.txns = 0
        self.tls = tls_context(ca, cert, key)
        if self.tls is None and any(u.startswith("https:") for u in self.endpoints):
            self.tls = ssl.create_default_context()  # the system's CAs

    @classmethod
    def for_settings(cls, settings, timeout=None):
        """A client as appliance.toml's [cluster] describes it."""
        return cls(list(settings.endpoints), settings.etcd_timeout if timeout is None else timeout,
                   ca=settings.ca, cert=settings.cert, key=settings.key)

    def _open(self, url, path, body, timeout):
        req = urllib.request.Request(url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=timeout,
                                      context=self.tls if url.startswith("https:") else None)

    def call(self, path, body):
        deadline = time.monotonic() + self.timeout
        last = None
        while True:
            for url in self.endpoints:
                try:
                    with self._open(url, path, body, self.request_timeout) as r:
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

    def watch(self, prefix, on_events, stop, on_connect=None):
        """Call `on_events(events)` with each batch of changes under `prefix` until `stop` is
        set (a thread's body). Each event is (type, key, value): type "PUT" or "DELETE" (a
        lease that expired deletes its keys). A broken stream is opened again on the next
        endpoint from the revision after the last one seen, so no change is missed in between;
        `on_connect()` runs once the stream is open, for what changed before the first one."""
        rev = None
        i = 0
        while not stop.is_set():
            url = self.endpoints[i % len(self.endpoints)]
            req = {"key": b64(prefix), "range_end": prefix_end(prefix)}
            if rev is not None:
                req["start_revision"] = str(rev + 1)
            try:
                # the read timeout is how long a member cut off without a word holds the
                # stream; an idle stream is opened again after it, missing nothing
                with self._open(url, "/v3/watch", {"create_request": req}, 60) as stream:
                    for line in stream:
                        if stop.is_set():
                            return
                        result = json.loads(line).get("result", {})
                        if result.get("created"):
                            if rev is None:
                                rev = int(result.get("header", {}).get("revision", 0))
                            if on_connect:
                                on_connect()
                            continue
                        events = result.get("events", [])
                        if events:
                            rev = max(int(ev["kv"].get("mod_revision", 0)) for ev in events)
                            on_events([(ev.get("type", "PUT"), unb64(ev["kv"]["key"]),
                                        unb64(ev["kv"].get("value"))) for ev in events])
            except (OSError, ValueError) as err:
                log.debug("etcd watch on %s: %s", url, err)
                i += 1  # the next member
            stop.wait(0.2)

    def ttl(self, lease):
        r = self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(r.get("TTL", -1))


def tls_context(ca, cert, key):
    """The context to reach etcd over https with: `ca` checks etcd's certificate, `cert` and
    `key` are this node's client certificate (etcd's --client-cert-auth). None without a CA."""
    if not ca:
        if cert or key:
            raise ValueError("an etcd client certificate needs the CA (ca) that signed etcd's")
        return None
    if bool(cert) != bool(key):
        raise ValueError("an etcd client certificate needs both cert and key")
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


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
