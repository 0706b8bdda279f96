"""NBD transmission phase, client side, as a sans-IO state machine (h11-style, like protocol.py).

Nothing here touches a socket.  The caller sends what `request()` returns (and a WRITE's
payload after it), feeds whatever the server sends to `receive_data()`, and takes events:

    tx = ClientTransmission(negotiated.structured_replies, negotiated.trailing_data)
    cookie, header = tx.request(NBD_CMD_READ, 0, offset, length)
    sock.sendall(header)
    ...
    tx.receive_data(sock.recv(65536))
    while (event := tx.next_event()) is not NEED_DATA:
        ...   # ReadData / ReadHole / BlockStatus chunks of a reply, then its ReplyDone

Replies may come in any order; they are matched to requests by cookie.  Simple and structured
replies are both understood.  `request()` may be called from another thread than the one that
feeds replies: it only adds to a dict the reader looks up.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from .constants import (
    CMD_NAMES, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_READ, NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_FLAG_ERROR, NBD_REPLY_TYPE_NONE, NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC, REPLY_TYPE_NAMES,
)
from .protocol import NEED_DATA, RemoteProtocolError

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
# A non-data chunk is small (an error message is at most 4 KiB); a block status chunk holds
# 8 bytes per extent, and no server we talk to sends more than a few thousand at once.
MAX_CHUNK = 1 << 20


@dataclass(frozen=True)
class ReadData:
    cookie: int
    offset: int  # absolute, inside the request's range
    data: bytes | bytearray | memoryview


@dataclass(frozen=True)
class ReadHole:
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True)
class BlockStatus:
    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]  # (length, flags)


@dataclass(frozen=True)
class ReplyDone:
    """The last reply to a request: `error` is the NBD error value (0: success), the first one
    the server reported for it, with its message."""

    cookie: int
    error: int
    message: str = ""


class _Pending:
    __slots__ = ("cmd", "offset", "length", "received", "error", "message")

    def __init__(self, cmd, offset, length):
        self.cmd, self.offset, self.length = cmd, offset, length
        self.received = 0  # READ: bytes covered by data and hole chunks
        self.error = 0
        self.message = ""


class ClientTransmission:
    def __init__(self, structured_replies: bool, initial: bytes = b"") -> None:
        self.structured_replies = structured_replies
        self._in = bytearray(initial)
        self._eof = False
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._error: RemoteProtocolError | None = None
        self._events: deque = deque()  # a reply's chunk and its end, handed out one per call

    def request(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, bytes]:
        """Register a request; return its cookie and the 28-byte header to send (a WRITE's
        payload follows it on the wire)."""
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < 2**64 - 1 else 1
        if cmd != NBD_CMD_DISC:  # the one request without a reply
            self._pending[cookie] = _Pending(cmd, offset, length)
        return cookie, REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def forget(self, cookie: int) -> None:
        """A request that was never sent (the send failed) expects no reply."""
        self._pending.pop(cookie, None)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def receive_data(self, data) -> None:
        if data:
            self._in += data
        else:
            self._eof = True

    def next_event(self) -> object:
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        try:
            event = None
            while event is None:
                event = self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        if event is NEED_DATA and self._eof:
            self._error = RemoteProtocolError(
                "server closed the connection" + (" mid-reply" if self._in else ""))
            raise self._error
        return event

    # -- parsing

    def _next(self) -> object:
        if len(self._in) < 4:
            return NEED_DATA
        (magic,) = struct.unpack_from(">I", self._in)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            return self._simple()
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            if not self.structured_replies:
                raise RemoteProtocolError("structured reply without NBD_OPT_STRUCTURED_REPLY")
            return self._chunk()
        raise RemoteProtocolError(f"bad reply magic 0x{magic:x}")

    def _request(self, cookie: int) -> _Pending:
        req = self._pending.get(cookie)
        if req is None:
            raise RemoteProtocolError(f"reply to unknown cookie {cookie}")
        return req

    def _simple(self) -> object:
        if len(self._in) < SIMPLE_REPLY.size:
            return NEED_DATA
        _, error, cookie = SIMPLE_REPLY.unpack_from(self._in)
        req = self._request(cookie)
        payload = req.length if req.cmd == NBD_CMD_READ and not error else 0
        if req.cmd == NBD_CMD_BLOCK_STATUS and not error:
            raise RemoteProtocolError("simple reply to NBD_CMD_BLOCK_STATUS")
        if len(self._in) < SIMPLE_REPLY.size + payload:
            return NEED_DATA
        del self._in[:SIMPLE_REPLY.size]
        del self._pending[cookie]
        done = ReplyDone(cookie, error, "")
        if not payload:
            return done
        data = self._in[:payload]  # one copy, then the buffer moves on
        del self._in[:payload]
        self._events.append(done)
        return ReadData(cookie, req.offset, data)

    def _chunk(self) -> object:
        if len(self._in) < CHUNK.size:
            return NEED_DATA
        _, flags, rtype, cookie, length = CHUNK.unpack_from(self._in)
        req = self._request(cookie)
        limit = req.length + 8 if rtype == NBD_REPLY_TYPE_OFFSET_DATA else MAX_CHUNK
        if length > limit:
            raise RemoteProtocolError(f"{REPLY_TYPE_NAMES.get(rtype, rtype)} chunk of {length} "
                                      f"bytes for a {req.length}-byte request")
        if len(self._in) < CHUNK.size + length:
            return NEED_DATA
        payload = self._in[CHUNK.size:CHUNK.size + length]
        del self._in[:CHUNK.size + length]
        event = self._CHUNKS.get(rtype, ClientTransmission._unknown_chunk)(self, req, cookie, rtype, payload)
        if flags & NBD_REPLY_FLAG_DONE:
            del self._pending[cookie]
            if not req.error and req.cmd == NBD_CMD_READ and req.received != req.length:
                raise RemoteProtocolError(f"read reply covers {req.received} of {req.length} bytes")
            done = ReplyDone(cookie, req.error, req.message)
            if event is None:
                return done
            self._events.append(done)
        elif rtype == NBD_REPLY_TYPE_NONE:
            raise RemoteProtocolError("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
        return event  # None: consumed a chunk that makes no event of its own

    def _range(self, req: _Pending, offset: int, length: int, what: str) -> None:
        if req.cmd != NBD_CMD_READ:
            raise RemoteProtocolError(f"{what} chunk in reply to {CMD_NAMES.get(req.cmd, req.cmd)}")
        if offset < req.offset or offset + length > req.offset + req.length:
            raise RemoteProtocolError(f"{what} chunk {offset}+{length} outside the request "
                                      f"{req.offset}+{req.length}")
        req.received += length

    # -- chunk types: each returns the event to hand out, or None

    def _none(self, req, cookie, rtype, payload):
        if payload:
            raise RemoteProtocolError("NBD_REPLY_TYPE_NONE with a payload")
        return None

    def _data(self, req, cookie, rtype, payload):
        if len(payload) < 9:
            raise RemoteProtocolError("NBD_REPLY_TYPE_OFFSET_DATA chunk without data")
        (offset,) = struct.unpack_from(">Q", payload)
        self._range(req, offset, len(payload) - 8, "data")
        return ReadData(cookie, offset, memoryview(payload)[8:])

    def _hole(self, req, cookie, rtype, payload):
        if len(payload) != 12:
            raise RemoteProtocolError("NBD_REPLY_TYPE_OFFSET_HOLE chunk is not 12 bytes")
        offset, length = struct.unpack(">QI", payload)
        if not length:
            raise RemoteProtocolError("empty NBD_REPLY_TYPE_OFFSET_HOLE chunk")
        self._range(req, offset, length, "hole")
        return ReadHole(cookie, offset, length)

    def _block_status(self, req, cookie, rtype, payload):
        if req.cmd != NBD_CMD_BLOCK_STATUS:
            raise RemoteProtocolError("block status chunk in reply to another command")
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise RemoteProtocolError("malformed NBD_REPLY_TYPE_BLOCK_STATUS chunk")
        (context_id,) = struct.unpack_from(">I", payload)
        words = struct.unpack_from(f">{(len(payload) - 4) // 4}I", payload, 4)
        return BlockStatus(cookie, context_id, tuple(zip(words[::2], words[1::2])))

    def _error_chunk(self, req, cookie, rtype, payload):
        if len(payload) < 6:
            raise RemoteProtocolError("error chunk shorter than 6 bytes")
        error, mlen = struct.unpack_from(">IH", payload)
        if 6 + mlen > len(payload) or (rtype == NBD_REPLY_TYPE_ERROR and 6 + mlen != len(payload)):
            raise RemoteProtocolError("error chunk message length overruns the chunk")
        if not error:
            raise RemoteProtocolError("error chunk with error 0")
        if not req.error:
            req.error, req.message = error, payload[6:6 + mlen].decode("utf-8", "replace")
        return None

    def _unknown_chunk(self, req, cookie, rtype, payload):
        if rtype & NBD_REPLY_TYPE_FLAG_ERROR:  # spec: an unknown error type is still an error
            return self._error_chunk(req, cookie, rtype, payload)
        raise RemoteProtocolError(f"unknown structured reply type {rtype}")

    _CHUNKS = {
        NBD_REPLY_TYPE_NONE: _none,
        NBD_REPLY_TYPE_OFFSET_DATA: _data,
        NBD_REPLY_TYPE_OFFSET_HOLE: _hole,
        NBD_REPLY_TYPE_BLOCK_STATUS: _block_status,
        NBD_REPLY_TYPE_ERROR: _error_chunk,
        NBD_REPLY_TYPE_ERROR_OFFSET: _error_chunk,
    }


__all__ = ["ClientTransmission", "ReadData", "ReadHole", "BlockStatus", "ReplyDone", "NEED_DATA"]
