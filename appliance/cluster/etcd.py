"""etcd through its v3 JSON gateway (grpc-gateway), with etcd3gw (OpenStack's client for that
API, Debian's python3-etcd3gw) underneath: one etcd3gw client per endpoint, and on top of them what
etcd3gw leaves to its caller: failover across the endpoints within a time bound, and a watch that
resumes on another member from the last revision seen. Keys and values travel base64-encoded,
numbers (revisions, lease ids) as strings; the compares and operations below are the gateway's own.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import time
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as gw_errors
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

log = logging.getLogger("appliance.cluster")

# what says "this member did not answer": try the next one (etcd3gw turns requests' connection
# errors, timeouts and a 503 into the first two; ValueError is an answer cut short)
UNREACHABLE = (gw_errors.ConnectionFailedError, gw_errors.ConnectionTimeoutError, ValueError, KeyError)


class EtcdError(OSError):
    """etcd could not be reached (or answered an error) within the bound."""


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def unb64(s):
    return base64.b64decode(s).decode() if s else ""


def text(b):
    return b.decode() if isinstance(b, bytes) else (b or "")


def why(e):
    """What an etcd3gw error says: its detail (etcd's answer, or requests' error), else its reason."""
    return (getattr(e, "detail_text", None) or str(e) or type(e).__name__)[:400]


def prefix_end(prefix):
    """The range_end that makes `prefix` a prefix query (etcd's clientv3.GetPrefixRangeEnd)."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return b64(bytes(b))


class _Session(requests.Session):
    """A session whose requests are bounded by default: requests has no session-wide timeout and
    etcd3gw 2.0 (Debian 12's) passes none, so a member cut off without a word would hold a call
    forever. Its CA is passed on each request too: requests lets $REQUESTS_CA_BUNDLE override a
    session's `verify`, and etcd's certificate is signed by the CA the config names."""

    def __init__(self, timeout, ca, cert, key):
        super().__init__()
        self.timeout = timeout
        if ca:
            self.verify = ca
        if cert:
            self.cert = (cert, key)

    def request(self, *args, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        if kwargs.get("verify") is None:
            kwargs["verify"] = self.verify
        return super().request(*args, **kwargs)


def member(url, timeout, ca=None, cert=None, key=None):
    """The etcd3gw client of the member at `url` (http[s]://host:port)."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"etcd endpoint {url!r}: not http://host:port or https://host:port")
    c = Etcd3Client(u.hostname, u.port or 2379, u.scheme, timeout=timeout,
                    api_path="/v3/")  # etcd >= 3.4: no discovery round trip per client
    c.session = _Session(timeout, ca, cert, key)
    return c


class Etcd:
    """A client over `endpoints` (tried in turn); a call that gets no answer from any of them
    within `timeout` seconds raises EtcdError(ETIMEDOUT). `txns` counts transactions sent."""

    def __init__(self, endpoints, timeout=10.0, request_timeout=2.0, ca=None, cert=None, key=None):
        check_tls(ca, cert, key)
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.request_timeout = request_timeout
        self.txns = 0
        self.members = [member(u, request_timeout, ca, cert, key) for u in self.endpoints]

    @classmethod
    def for_settings(cls, settings, timeout=None):
        """A client as appliance.toml's [cluster] describes it."""
        return cls(list(settings.endpoints), settings.etcd_timeout if timeout is None else timeout,
                   ca=settings.ca, cert=settings.cert, key=settings.key)

    def each(self, what, op):
        """op(client) on the first member that answers, within the bound."""
        deadline = time.monotonic() + self.timeout
        last = None
        while True:
            for url, c in zip(self.endpoints, self.members):
                try:
                    return op(c)
                except UNREACHABLE as e:
                    last = f"{url}: {why(e)}"
                except gw_errors.Etcd3Exception as e:
                    raise EtcdError(errno.EIO, f"etcd {url} {what}: {why(e)}") from None
            if time.monotonic() >= deadline:
                raise EtcdError(errno.ETIMEDOUT, f"etcd unreachable for {self.timeout:g}s ({last})")
            time.sleep(0.2)

    def call(self, path, body):
        """A gateway call etcd3gw has no method for (`path` is the gateway's, /v3/...)."""
        return self.each(path, lambda c: c.post(c.get_url(path.removeprefix("/v3")), json=body))

    # kv
    def get_prefix(self, prefix):
        """{key: (value, mod_revision, lease)} under prefix."""
        kvs = self.each("range", lambda c: c.get_prefix(prefix))
        return {text(kv["key"]): (text(value), int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))
                for value, kv in kvs}

    def count_prefix(self, prefix):
        # etcd3gw's get() returns keys, not the count
        r = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix),
                                       "count_only": True})
        return int(r.get("count", 0))

    def txn(self, compare=(), success=(), failure=()):
        """One transaction; True if its compares held (success ran)."""
        self.txns += 1
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        return bool(self.each("txn", lambda c: c.transaction(body)).get("succeeded"))

    # leases
    def grant(self, ttl):
        return self.each("lease grant", lambda c: c.lease(int(ttl)).id)

    def keepalive(self, lease):
        """The TTL left after the refresh; 0 if the lease is gone."""
        return max(0, self.each("lease keepalive", lambda c: Lease(int(lease), c).refresh()))

    def ttl(self, lease):
        # /v3/lease/timetolive: etcd3gw's Lease.ttl() uses the older /v3/kv/lease/timetolive
        r = self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(r.get("TTL", -1))

    def watch(self, prefix, on_events, stop, on_connect=None):
        """Call `on_events(events)` with each batch of changes under `prefix` until `stop` is
        set (a thread's body). Each event is (type, key, value): type "PUT" or "DELETE" (a
        lease that expired deletes its keys). A broken stream is opened again on the next
        endpoint from the revision after the last one seen, so no change is missed in between;
        `on_connect()` runs once the stream is open, for what changed before the first one.
        Not etcd3gw's Watcher: it runs the stream in its own thread pool, without a read
        timeout, and hides the created answer's revision that the resume starts from."""
        rev = None
        i = 0
        while not stop.is_set():
            url, c = self.endpoints[i % len(self.endpoints)], self.members[i % len(self.members)]
            req = {"key": b64(prefix), "range_end": prefix_end(prefix)}
            if rev is not None:
                req["start_revision"] = str(rev + 1)
            try:
                # the read timeout is how long a member cut off without a word holds the
                # stream; an idle stream is opened again after it, missing nothing
                with c.session.post(c.get_url("/watch"), json={"create_request": req}, stream=True,
                                    timeout=(self.request_timeout, 60)) as stream:
                    stream.raise_for_status()
                    for line in stream.iter_lines():
                        if stop.is_set():
                            return
                        if not line.strip():
                            continue
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
            except (OSError, ValueError) as err:  # requests' errors are OSErrors
                log.debug("etcd watch on %s: %s", url, err)
                i += 1  # the next member
            stop.wait(0.2)


def check_tls(ca, cert, key):
    """What reaching etcd over https needs: `ca` checks etcd's certificate, `cert` and `key` are
    this node's client certificate (etcd's --client-cert-auth). Without a CA, https checks etcd
    against the system's CAs."""
    if not ca and (cert or key):
        raise ValueError("an etcd client certificate needs the CA (ca) that signed etcd's")
    if bool(cert) != bool(key):
        raise ValueError("an etcd client certificate needs both cert and key")


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
