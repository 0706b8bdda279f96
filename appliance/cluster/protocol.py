"""The cluster log protocol (dm-log-userspace's, once dm-log-cluster): the 17 requests a mirror's
log makes of the log service, their wire format, and both ends as sans-IO state machines (h11's
way: bytes in, events and bytes out, the caller owns the socket and the clock).

Every message is a header, `struct dm_clog_request`, then `data_size` bytes:
    uuid[129] padding[7] int32 error uint32 seq uint32 request_type uint32 data_size
little-endian. A reply repeats the request's uuid, seq and type, with the error (0 or -errno)
and its own data.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum


class RequestType(IntEnum):
    CTR = 1
    DTR = 2
    PRESUSPEND = 3
    POSTSUSPEND = 4
    RESUME = 5
    GET_REGION_SIZE = 6
    IS_CLEAN = 7
    IN_SYNC = 8
    FLUSH = 9
    MARK_REGION = 10
    CLEAR_REGION = 11
    GET_RESYNC_WORK = 12
    SET_REGION_SYNC = 13
    GET_SYNC_COUNT = 14
    STATUS_INFO = 15
    STATUS_TABLE = 16
    IS_REMOTE_RECOVERING = 17


UUID_LEN = 129  # DM_UUID_LEN, with its 7 bytes of padding after it
REQUEST_MASK = 0xFF  # the type's bits of request_type; the rest are reserved
HEADER = struct.Struct("<129s7xiIII")
MAX_DATA = 1 << 20  # the longest MARK/CLEAR batch the service takes: 128 Ki regions
SEQ_MOD = 1 << 32


class ProtocolError(Exception):
    """Bytes that are not a cluster log message: the connection must be dropped."""


@dataclass(frozen=True)
class Message:
    uuid: str
    seq: int
    type: RequestType
    error: int = 0
    data: bytes = b""


def encode(msg: Message) -> bytes:
    uuid = msg.uuid.encode()
    if not uuid or len(uuid) >= UUID_LEN:
        raise ProtocolError(f"log uuid {msg.uuid!r} must be 1 to {UUID_LEN - 1} bytes")
    if len(msg.data) > MAX_DATA:
        raise ProtocolError(f"{len(msg.data)} bytes of data; at most {MAX_DATA}")
    return HEADER.pack(uuid, msg.error, msg.seq % SEQ_MOD, int(msg.type), len(msg.data)) + msg.data


class Decoder:
    """Frames messages out of a byte stream, however it is split."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def next(self):
        """The next whole message, or None until more bytes come."""
        if len(self.buf) < HEADER.size:
            return None
        uuid, error, seq, rtype, size = HEADER.unpack_from(self.buf)
        if size > MAX_DATA:
            raise ProtocolError(f"data_size {size} is over {MAX_DATA}")
        try:
            kind = RequestType(rtype & REQUEST_MASK)
        except ValueError:
            raise ProtocolError(f"unknown request type {rtype & REQUEST_MASK}") from None
        if len(self.buf) < HEADER.size + size:
            return None
        data = bytes(self.buf[HEADER.size:HEADER.size + size])
        del self.buf[:HEADER.size + size]
        return Message(uuid.rstrip(b"\0").decode(errors="replace"), seq, kind, error, data)


# payloads, as the seed lays them out
U64, I64, PAIR_QI, PAIR_IQ = struct.Struct("<Q"), struct.Struct("<q"), struct.Struct("<Qq"), struct.Struct("<qQ")


def pack_regions(regions):
    return struct.pack(f"<{len(regions)}Q", *regions)


def unpack_regions(data):
    if len(data) % 8:
        raise ValueError(f"{len(data)} bytes is not a list of regions")
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


# ---- the client: one request on the wire at a time, as dm's cluster_do_request ----

@dataclass(frozen=True)
class Reply:
    """The answer to the caller's request."""
    type: RequestType
    error: int
    data: bytes


@dataclass(frozen=True)
class Gone:
    """The service refused CTR or RESUME while coming back: drop the connection and reconnect
    after a pause (the seed's 2 s), then call connection_made again."""
    error: int


NEED_DATA = "NEED_DATA"


class Client:
    """The mirror's end. `request` puts a request on the wire; `receive_data` takes bytes;
    `next_event` gives a Reply (or Gone, or NEED_DATA); `data_to_send` the bytes to write.
    A reply whose seq is not the one on the wire is dropped (a late answer to a request that
    was resent); `check_timeout` resends under a new seq; when the service went away
    (`connection_lost`, or it answers -ESRCH: it does not know this log any more) the next
    connection starts with CTR and RESUME, then the caller's request goes again."""

    def __init__(self, uuid, ctr_args, timeout=15.0, seq=0):
        self.uuid = uuid
        self.ctr_args = ctr_args.encode()
        self.timeout = timeout
        self.seq = seq
        self.state = "disconnected"  # until connection_made: idle | waiting | recovering
        self.pending = None  # the caller's (type, data), until its reply
        self.wire = None  # the Message on the wire now
        self.deadline = None
        self.recovery = []  # CTR and RESUME still to send before the caller's request
        self.dropped = 0  # replies dropped for a wrong seq
        self.resent = 0  # requests resent after a timeout
        self.reconnects = 0
        self.decoder = Decoder()
        self.outbox = bytearray()
        self.events = []

    def request(self, rtype, data=b"", now=0.0):
        if self.pending is not None:
            raise ProtocolError(f"{self.pending[0].name} is still waiting for its reply")
        self.pending = (RequestType(rtype), bytes(data))
        if self.state == "idle":
            self._send(*self.pending, now)

    def _send(self, rtype, data, now):
        self.seq = (self.seq + 1) % SEQ_MOD
        self.wire = Message(self.uuid, self.seq, rtype, 0, data)
        self.outbox += encode(self.wire)
        self.deadline = now + self.timeout
        if self.state != "recovering":
            self.state = "waiting"

    def data_to_send(self):
        out, self.outbox = bytes(self.outbox), bytearray()
        return out

    def check_timeout(self, now):
        """Resend what is on the wire if its reply is overdue; True if it did."""
        if self.wire is None or now < self.deadline:
            return False
        self.resent += 1
        self._send(self.wire.type, self.wire.data, now)
        return True

    def connection_lost(self):
        self.state = "disconnected"
        self.wire = None
        self.decoder = Decoder()
        self.outbox = bytearray()

    def connection_made(self, now=0.0):
        """A new connection to the service: register the log again (CTR, RESUME) first."""
        self.reconnects += 1
        self._recover(now)

    def _recover(self, now):
        self.state = "recovering"
        self.recovery = [(RequestType.RESUME, b"")]
        self._send(RequestType.CTR, self.ctr_args, now)

    def receive_data(self, data, now=0.0):
        self.decoder.feed(data)
        while (msg := self.decoder.next()) is not None:
            self._receive(msg, now)

    def _receive(self, msg, now):
        if self.wire is None or msg.seq != self.wire.seq or msg.type != self.wire.type:
            self.dropped += 1
            return
        self.wire = None
        if self.state == "recovering":
            if msg.error:
                self.state = "disconnected"
                self.events.append(Gone(msg.error))
            elif self.recovery:
                self._send(*self.recovery.pop(0), now)
            elif self.pending is not None:
                self.state = "idle"
                self._send(*self.pending, now)
            else:
                self.state = "idle"
            return
        if msg.error == -errno.ESRCH and msg.type != RequestType.CTR:
            self._recover(now)  # the service restarted and forgot this log
            return
        self.state = "idle"
        self.pending = None
        self.events.append(Reply(msg.type, msg.error, msg.data))

    def next_event(self):
        return self.events.pop(0) if self.events else NEED_DATA


# ---- the service's end ----

def _region(data):
    (region,) = U64.unpack(data)
    return region


def _flag(value):
    return I64.pack(1 if value else 0)


def _words(words):
    return " ".join(words).encode()


def _mark(log, data):
    for r in unpack_regions(data):
        log.mark_region(r)


def _clear(log, data):
    for r in unpack_regions(data):
        log.clear_region(r)


def _resync_work(log, data):
    region = log.get_resync_work()
    return PAIR_IQ.pack(0, 0) if region is None else PAIR_IQ.pack(1, region)


def _set_sync(log, data):
    region, in_sync = PAIR_QI.unpack(data)
    log.set_region_sync(region, bool(in_sync))


def _remote_recovering(log, data):
    recovering, hint = log.is_remote_recovering(_region(data))
    return PAIR_IQ.pack(1 if recovering else 0, hint)


# request type -> what it does to a log with dm-dirty-log's operations; returns reply data
HANDLERS = {
    RequestType.PRESUSPEND: lambda log, d: log.presuspend(),
    RequestType.POSTSUSPEND: lambda log, d: log.postsuspend(),
    RequestType.RESUME: lambda log, d: log.resume(),
    RequestType.GET_REGION_SIZE: lambda log, d: U64.pack(log.get_region_size()),
    RequestType.IS_CLEAN: lambda log, d: _flag(log.is_clean(_region(d))),
    RequestType.IN_SYNC: lambda log, d: _flag(log.in_sync(_region(d))),
    RequestType.FLUSH: lambda log, d: log.flush(),
    RequestType.MARK_REGION: _mark,
    RequestType.CLEAR_REGION: _clear,
    RequestType.GET_RESYNC_WORK: _resync_work,
    RequestType.SET_REGION_SYNC: _set_sync,
    RequestType.GET_SYNC_COUNT: lambda log, d: U64.pack(log.get_sync_count()),
    RequestType.STATUS_INFO: lambda log, d: _words(log.status()),
    RequestType.STATUS_TABLE: lambda log, d: _words(log.status_table()),
    RequestType.IS_REMOTE_RECOVERING: _remote_recovering,
}


class Service:
    """The logs the service holds, by uuid. `open_log(uuid, args)` makes one on CTR (args: the
    constructor words); a request for a uuid it does not hold gets -ESRCH, so a client whose
    service restarted registers again."""

    def __init__(self, open_log):
        self.open_log = open_log
        self.logs = {}

    def handle(self, msg):
        data = b""
        try:
            if msg.type == RequestType.CTR:
                self.logs[msg.uuid] = self.open_log(msg.uuid, msg.data.decode().split())
            elif msg.uuid not in self.logs:
                raise OSError(errno.ESRCH, f"no log {msg.uuid!r}")
            elif msg.type == RequestType.DTR:
                self.logs.pop(msg.uuid).dtr()
            else:
                data = HANDLERS[msg.type](self.logs[msg.uuid], msg.data) or b""
            error = 0
        except OSError as e:
            error = -(e.errno or errno.EIO)
        except (ValueError, struct.error, UnicodeDecodeError):
            error = -errno.EINVAL
        return Message(msg.uuid, msg.seq, msg.type, error, data)


class ServerConnection:
    """One client's connection to a Service: bytes in, replies out."""

    def __init__(self, service):
        self.service = service
        self.decoder = Decoder()
        self.outbox = bytearray()

    def receive_data(self, data):
        self.decoder.feed(data)
        while (msg := self.decoder.next()) is not None:
            self.outbox += encode(self.service.handle(msg))

    def data_to_send(self):
        out, self.outbox = bytes(self.outbox), bytearray()
        return out
