"""The compiled loops against plain-Python models (hypothesis).

- the gate's fast-map admission (`Gate.probe`, i.e. fast_enter + exit) against "the request lies
  in fast segments, and every piece the fast path would pread/pwrite is aligned";
- `nbd_errno`, the host errno -> NBD error mapping, against the spec's list;
- the transmission loop's request checks, driving a real `Connection` over a socketpair with
  random headers, against a model of the spec's rules for each command.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from appliance._fast.fastops import fd_range, zeros
from appliance._fast.gate import Gate
from appliance._fast.transmit import Connection
from appliance._fast.wire import nbd_errno
from appliance.nbd import constants as C

FAST_NONE, FAST_FD, FAST_ZERO = 0, 1, 2
SECTOR = 512


# the gate's fast map


@dataclass(frozen=True)
class Seg:
    start: int
    end: int
    kind: int
    fd_offset: int
    align: int

    def tuple(self):
        ops = {FAST_NONE: None, FAST_FD: lambda: fd_range(0, self.fd_offset, self.align), FAST_ZERO: zeros}[self.kind]
        return (self.start, self.end, ops and ops())


@st.composite
def fast_maps(draw):
    """A table's fast map: sector-sized segments tiling [0, size); linear (on a file, O_DIRECT or not), zero, or slow."""
    segs = []
    pos = 0
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 40)) * SECTOR
        kind = draw(st.sampled_from([FAST_NONE, FAST_FD, FAST_FD, FAST_ZERO]))
        if kind == FAST_FD:
            align = draw(st.sampled_from([1, 512, 4096]))
            fd_offset = draw(st.integers(0, 64)) * SECTOR
        else:
            align, fd_offset = 1, 0
        segs.append(Seg(pos, pos + n, kind, fd_offset, align))
        pos += n
    return segs


def model_fast(segs, suspended, offset, length):
    """The fast path may take a request iff the gate is open, every byte of it lies in
    segments with a fast kind, and each piece it would read or write with O_DIRECT has its
    file offset, its length and its place in the (page-aligned) buffer aligned."""
    if suspended or not segs:
        return False
    end = offset + length
    if end > segs[-1].end:
        return False
    for s in segs:
        lo, hi = max(offset, s.start), min(end, s.end)
        if lo >= hi:
            continue
        if s.kind == FAST_NONE:
            return False
        if s.kind == FAST_FD and ((s.fd_offset + lo - s.start) % s.align or (hi - lo) % s.align or (lo - offset) % s.align):
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(segs=fast_maps(), suspended=st.booleans(), extra=st.lists(st.integers(0, 1 << 18), max_size=4))
def test_fast_map_admits_exactly_the_aligned_requests_inside_fast_segments(segs, suspended, extra):
    size = segs[-1].end
    g = Gate()
    g.close()
    g.set_fastmap([s.tuple() for s in segs])
    if not suspended:
        g.open()
    # every start and end near the interesting places: segment boundaries, alignments, the end
    points = sorted({0, size} | {s.start for s in segs} | set(extra))
    near = sorted({p + d for p in points for d in (-4096, -512, -1, 0, 1, 511, 512, 4096) if p + d >= 0})
    for offset in near:
        for end in near:
            if end > offset:
                assert g.probe(offset, end - offset) == model_fast(segs, suspended, offset, end - offset), (offset, end)
    assert g.in_flight == 0  # probe always leaves


def test_an_empty_fast_map_admits_nothing():
    g = Gate()
    assert not g.probe(0, 512)
    g.close()
    g.set_fastmap([])
    g.open()
    assert not g.probe(0, 512)


def test_the_fast_map_is_only_replaced_while_suspended_and_idle():
    g = Gate()
    with pytest.raises(RuntimeError):
        g.set_fastmap([(0, 4096, zeros())])
    g.close()
    with pytest.raises(ValueError):
        fd_range(0, 0, 3)  # not a power of two
    with pytest.raises(TypeError):
        g.set_fastmap([(0, 4096, (1, 0, 0, 1))])  # the old tuple form: not a descriptor
    g.set_fastmap([(0, 4096, zeros())])
    assert not g.probe(0, 4096)  # closed
    assert g.open() == []
    assert g.probe(0, 4096)


# nbd_errno


SPEC_ERRNO = {
    errno.EPERM: 1,
    errno.EROFS: 1,  # a write to something read-only
    errno.EIO: 5,
    errno.ENOMEM: 12,
    errno.EINVAL: 22,
    errno.ENOSPC: 28,
    errno.EDQUOT: 28,  # the spec: SHOULD map EDQUOT and EFBIG to ENOSPC
    errno.EFBIG: 28,
    errno.EOVERFLOW: 75,
    errno.ENOTSUP: 95,
    errno.ESHUTDOWN: 108,
}


def model_nbd_errno(e):
    if e == 0:
        return 0
    return SPEC_ERRNO.get(e, 5)  # anything else is an I/O error


@settings(deadline=None)
@given(st.one_of(st.sampled_from(sorted(errno.errorcode) + [0]), st.integers(-(2**31), 2**31 - 1)))
def test_nbd_errno_maps_host_errors_onto_the_specs_values(e):
    assert nbd_errno(e) == model_nbd_errno(e)
    assert nbd_errno(e) in (0, 1, 5, 12, 22, 28, 75, 95, 108)


# the transmission loop's request checks


READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO_F = 1, 2, 4, 8, 16
HARD_MAX = 128 << 20


def spec_error(cmd, flags, offset, length, *, size, read_only, structured, max_block):
    """The NBD errno the spec asks for (0: the request is valid), rule by rule.

    Where two rules apply the order is the server's documented one: flags, command,
    read-only, size limits, range."""
    # "SHOULD return EINVAL if it receives a request with a flag not explicitly documented
    # as applicable to the given request"; FUA: "valid for all commands, provided
    # NBD_FLAG_SEND_FUA has been negotiated" (advertised on writable exports, and the
    # write commands take it anyway); DF needs structured replies; FAST_ZERO and
    # NO_HOLE are WRITE_ZEROES's; REQ_ONE is BLOCK_STATUS's.
    valid = {
        READ: DF if structured else 0,
        WRITE: FUA,
        FLUSH: 0,
        TRIM: FUA,
        CACHE: 0,
        WRITE_ZEROES: FUA | NO_HOLE | FAST_ZERO_F,
        BLOCK_STATUS: REQ_ONE,
    }.get(cmd, 0)
    if not read_only:
        valid |= FUA
    if flags & ~valid:
        return errno.EINVAL
    if cmd == FLUSH:  # "length and offset are reserved, and MUST be set to all-zero"
        return errno.EINVAL if offset or length else 0
    if cmd not in (READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS):
        return errno.EINVAL  # "SHOULD return EINVAL if it receives an unknown command"
    if cmd == BLOCK_STATUS and not structured:
        return errno.EINVAL  # it needs structured replies (and a context)
    if read_only and cmd in (WRITE, TRIM, WRITE_ZEROES):
        return errno.EPERM  # "SHOULD return EPERM if it receives a write or trim request on a read-only export"
    if cmd in (READ, WRITE) and length > max_block:
        # over the advertised maximum block size: "the server SHOULD NOT use EOVERFLOW" there
        # (it is for DF reads and payload-less commands); EINVAL is what clients expect
        return errno.EINVAL
    if length == 0:
        return errno.EINVAL
    if offset + length > size:
        # "SHOULD return ENOSPC if it receives a write request including one or more sectors
        # beyond the size of the device"; EINVAL for reads, trims, block status (and cache)
        return errno.ENOSPC if cmd in (WRITE, WRITE_ZEROES) else errno.EINVAL
    return 0


@dataclass
class Req:
    cmd: int
    flags: int
    offset: int
    length: int
    cookie: int = 0


@st.composite
def requests(draw, size, max_block):
    cmd = draw(st.sampled_from([READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, 8, 9, 200]))
    flags = draw(st.one_of(st.sampled_from([0, 0, FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO_F, FUA | DF, NO_HOLE | FAST_ZERO_F]), st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.just(0), st.integers(0, size + 4096), st.sampled_from([size - 1, size, size + 1, 2**63, 2**64 - 1])))
    offset = max(0, min(offset, 2**64 - 1))
    if cmd == WRITE:  # the payload is sent: keep it small (the hard limit closes the connection)
        length = draw(st.integers(0, 3 * max_block))
    else:
        length = draw(st.one_of(st.integers(0, 3 * max_block), st.sampled_from([0, 1, size, size + 1, 2**32 - 1])))
    if cmd == FLUSH and draw(st.booleans()):
        offset = length = 0
    return Req(cmd, flags, offset, length)


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_reply(s, req, structured):
    """(error, data) of one reply; checks the framing the spec asks for."""
    magic = struct.unpack(">I", recv_exact(s, 4))[0]
    if magic == C.NBD_SIMPLE_REPLY_MAGIC:
        error, cookie = struct.unpack(">IQ", recv_exact(s, 12))
        assert cookie == req.cookie
        assert not (structured and req.cmd in (READ, BLOCK_STATUS) and error), "a structured error chunk was due"
        data = recv_exact(s, req.length) if req.cmd == READ and not error else b""
        return error, data
    assert magic == C.NBD_STRUCTURED_REPLY_MAGIC and structured
    flags, rtype, cookie, n = struct.unpack(">HHQI", recv_exact(s, 16))
    assert cookie == req.cookie
    payload = recv_exact(s, n)
    assert flags & C.NBD_REPLY_FLAG_DONE
    if rtype == C.NBD_REPLY_TYPE_ERROR:
        error, msg_len = struct.unpack(">IH", payload[:6])
        assert error and msg_len <= n - 6
        return error, b""
    assert rtype == C.NBD_REPLY_TYPE_OFFSET_DATA and req.cmd == READ
    (off,) = struct.unpack(">Q", payload[:8])
    assert off == req.offset and len(payload) - 8 == req.length
    return 0, payload[8:]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    size=st.sampled_from([4096, 65536, 1 << 20, (1 << 20) + 512]),
    max_block=st.sampled_from([4096, 65536]),
    read_only=st.booleans(),
    structured=st.booleans(),
    fastmap=st.sampled_from(["none", "zero", "file"]),
    data=st.data(),
)
def test_transmission_loop_answers_each_request_with_the_specs_error(tmp_path, size, max_block, read_only, structured, fastmap, data):
    backing = tmp_path / f"backing-{os.getpid()}-{threading.get_ident()}.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    fd = os.open(backing, os.O_RDWR)
    mirror = bytearray(size)  # what the export holds
    dispatched = []

    def dispatch(conn, cmd, flags, cookie, offset, length, payload):
        dispatched.append((cmd, flags, offset, length))
        if cmd == READ:
            conn.reply_read(cookie, offset, os.pread(fd, length, offset))
        elif cmd == WRITE:
            os.pwrite(fd, payload, offset)
            conn.reply(cookie, 0)
        else:
            conn.reply(cookie, 0)

    g = Gate()
    g.close()
    if fastmap == "zero":
        g.set_fastmap([(0, size, zeros())])
    elif fastmap == "file":
        g.set_fastmap([(0, size, fd_range(fd, 0, 1))])
    g.open()
    server, client = socket.socketpair()
    client.settimeout(10)
    conn = Connection(server.fileno(), g, dispatch, size, read_only, structured, max_block, 64, b"")
    outcome = {}
    t = threading.Thread(target=lambda: outcome.setdefault("reason", conn.run()), daemon=True)
    t.start()
    try:
        for i in range(data.draw(st.integers(1, 12), label="n")):
            req = data.draw(requests(size, max_block), label=f"req{i}")
            req.cookie = 1000 + i
            want = spec_error(req.cmd, req.flags, req.offset, req.length, size=size, read_only=read_only, structured=structured, max_block=max_block)
            payload = b""
            if req.cmd == WRITE:
                payload = bytes([i + 1]) * req.length
            before = len(dispatched)
            client.sendall(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, req.flags, req.cmd, req.cookie, req.offset, req.length) + payload)
            error, got = read_reply(client, req, structured)
            assert error == nbd_errno(want), (req, error, want)
            if error:
                assert len(dispatched) == before, "a refused request reached the targets"
                continue
            if req.cmd == READ:
                expect = bytes(req.length) if fastmap == "zero" else bytes(mirror[req.offset : req.offset + req.length])
                assert got == expect
            if req.cmd == WRITE and fastmap != "zero":
                mirror[req.offset : req.offset + req.length] = payload
        client.sendall(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, DISC, 1, 0, 0))
        t.join(10)
        assert not t.is_alive()
        assert outcome["reason"] == "client sent NBD_CMD_DISC"
        if fastmap != "zero":
            assert os.pread(fd, size, 0) == bytes(mirror)
    finally:
        client.close()
        t.join(10)
        server.close()
        os.close(fd)
        os.unlink(backing)


def _one_connection(header, payload=b"", size=65536):
    """Send one raw request to a fresh loop; return (bytes it answered, its close reason)."""
    g = Gate()
    server, client = socket.socketpair()
    client.settimeout(10)
    conn = Connection(server.fileno(), g, lambda *a: a[0].reply(a[2], 0), size, False, False, 4096, 64, b"")
    outcome = {}
    t = threading.Thread(target=lambda: outcome.setdefault("reason", conn.run()), daemon=True)
    t.start()
    try:
        client.sendall(header + payload)
        client.shutdown(socket.SHUT_WR)
        t.join(10)  # the loop ends by itself; the socket is its owner's (the server's) to close
        assert not t.is_alive()
        server.close()
        got = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                break
            got += chunk
        return got, outcome["reason"]
    finally:
        client.close()
        t.join(10)
        server.close()


def test_a_bad_magic_ends_the_loop_with_a_reason():
    got, reason = _one_connection(struct.pack(">IHHQQI", 0x12345678, 0, READ, 1, 0, 512))
    assert got == b"" and reason == "bad request magic 0x12345678"


def test_a_write_over_the_hard_limit_ends_the_loop_without_reading_its_payload():
    got, reason = _one_connection(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, WRITE, 1, 0, HARD_MAX + 1), b"x" * 100)
    assert got == b"" and "over the hard limit" in reason


def test_a_truncated_write_payload_ends_the_loop():
    got, reason = _one_connection(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, WRITE, 1, 0, 4096), b"x" * 100)
    assert got == b"" and reason == "client closed the connection in the middle of a write payload"


def test_initial_bytes_from_the_handshake_are_served_first():
    """Requests the client pipelined behind the handshake reach the loop as `initial`."""
    g = Gate()
    g.close()
    g.set_fastmap([(0, 65536, zeros())])
    g.open()
    server, client = socket.socketpair()
    client.settimeout(10)
    first = struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, READ, 7, 0, 16)
    conn = Connection(server.fileno(), g, None, 65536, False, False, 4096, 64, first)
    t = threading.Thread(target=conn.run, daemon=True)
    t.start()
    try:
        head = recv_exact(client, 16)
        assert struct.unpack(">II", head[:8]) == (C.NBD_SIMPLE_REPLY_MAGIC, 0)
        assert head[8:] == first[8:16]  # the cookie, echoed as sent
        assert recv_exact(client, 16) == bytes(16)
    finally:
        client.close()
        t.join(10)
        server.close()


def test_slow_requests_held_until_unplug_are_answered_before_the_loop_waits():
    """A device queue may hold what dispatch gave it until unplug(): the loop calls it once it
    has dispatched what the client sent and before it waits for more."""
    held, unplugs = [], []

    def dispatch(conn, cmd, flags, cookie, offset, length, payload):
        held.append(cookie)

    def unplug():
        unplugs.append(len(held))
        while held:
            conn.reply(held.pop(0), 0)

    g = Gate()  # no fast map: every request is slow
    server, client = socket.socketpair()
    client.settimeout(10)
    conn = Connection(server.fileno(), g, dispatch, 65536, False, False, 4096, 64, b"", unplug=unplug)
    sender = threading.Thread(target=conn.sender, daemon=True)
    t = threading.Thread(target=conn.run, daemon=True)
    sender.start()
    t.start()
    try:
        client.sendall(b"".join(struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, FLUSH, i, 0, 0) for i in range(3)))
        got = sorted(struct.unpack(">IIQ", recv_exact(client, 16))[2] for _ in range(3))
        assert got == [0, 1, 2]
        assert unplugs and unplugs[0] >= 1
    finally:
        client.close()
        t.join(10)
        sender.join(10)
        server.close()
