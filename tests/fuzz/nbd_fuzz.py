"""Fuzzing the NBD server: the handshake in process, the transmission phase against a daemon.

- `HandshakeFuzzer`: coverage-guided. Inputs are byte streams fed (in pieces) to the sans-IO
  ServerHandshake, in clear or after NBD_OPT_STARTTLS and a real TLS handshake (Python's
  client encrypts the input, so the options inside TLS are fuzzed, not just the records).
  Coverage is the set of line-to-line arcs taken in appliance/nbd/protocol.py (sys.settrace);
  an input that reaches a new arc joins the corpus and is mutated further. A crash is any
  exception but RemoteProtocolError, or a reply stream that is not well framed.
- `TransmissionFuzzer`: generated request streams (valid, odd and broken headers, payloads
  cut short, garbage, DISC or a hang-up in the middle) sent to a running daemon after a real
  handshake, over its unix socket or TLS; the replies must be well framed and answer
  requests that were sent. Meanwhile a `Canary` client writes and verifies data on another
  export: the daemon must live and the canary must never see an error or a wrong byte.

A short run is tests/test_fuzz.py; a long one is `python3 tests/fuzz/nbd_fuzz.py --minutes 10`
(it starts its own daemon; crashing inputs are written to tests/fuzz/crashes/).
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script: the checkout's appliance package
    sys.path.insert(0, str(HERE.parent.parent))

from appliance.nbd import constants as C  # noqa: E402
from appliance.nbd import protocol  # noqa: E402
from appliance.nbd.protocol import (NEED_DATA, ClientHandshake, ExportInfo, Negotiated,  # noqa: E402
                                    RemoteProtocolError, ServerHandshake)

PROTOCOL_FILE = protocol.__file__
INTERESTING_U32 = (0, 1, 7, 8, 512, 4095, 4096, 65536, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def opt(o, data=b""):
    return struct.pack(">QII", C.IHAVEOPT, o, len(data)) + data


def go_data(name, infos=()):
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name, queries):
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


FLAGS = struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES)
OPTIONS = [
    opt(C.NBD_OPT_LIST), opt(C.NBD_OPT_STRUCTURED_REPLY),
    opt(C.NBD_OPT_INFO, go_data("disk0", (C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION, C.NBD_INFO_BLOCK_SIZE))),
    opt(C.NBD_OPT_GO, go_data("disk0")), opt(C.NBD_OPT_GO, go_data("")), opt(C.NBD_OPT_GO, go_data("secret")),
    opt(C.NBD_OPT_GO, go_data("nosuch")), opt(C.NBD_OPT_EXPORT_NAME, b"disk0"), opt(C.NBD_OPT_ABORT),
    opt(C.NBD_OPT_SET_META_CONTEXT, meta_data("disk0", ["base:allocation", "qemu:allocation-depth"])),
    opt(C.NBD_OPT_LIST_META_CONTEXT, meta_data("disk0", ["base:"])), opt(C.NBD_OPT_STARTTLS), opt(99, b"x"),
]


class _Catalog:
    def __init__(self):
        self._exports = {e.name: e for e in (ExportInfo("disk0", 1 << 30, description="fuzz", min_block=512),
                                             ExportInfo("secret", 4096, read_only=True))}

    def lookup(self, name):
        return self._exports.get(name or "disk0")

    def names(self):
        return list(self._exports)


def _authorize(name, cn):
    return "not for fuzzers" if name == "secret" else None


class Crash(Exception):
    def __init__(self, case, error):
        super().__init__(f"{type(error).__name__}: {error}")
        self.case, self.error = case, error


# ------------------------------------------------------------------ the handshake, in process


class _Arcs:
    """Line-to-line arcs taken in one file while a function runs."""

    def __init__(self, filename):
        self.filename = filename

    def run(self, fn, *args):
        arcs = set()
        last = {}

        def local(frame, event, arg):
            if event == "line":
                key = id(frame)
                arcs.add((last.get(key, -frame.f_code.co_firstlineno), frame.f_lineno))
                last[key] = frame.f_lineno
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code.co_filename == self.filename else None

        old = sys.gettrace()
        sys.settrace(tracer)
        try:
            fn(*args)
        finally:
            sys.settrace(old)
        return arcs


def check_framing(out, exported_by_name):
    """The server's clear-text replies after the greeting: option replies, or the
    EXPORT_NAME answer (size, flags, no zeroes as negotiated) as the very last thing."""
    pos = 0
    while pos < len(out):
        if len(out) - pos in (10, 10 + C.NBD_HANDSHAKE_ZEROES) and exported_by_name:
            return
        if len(out) - pos < 20:
            raise AssertionError(f"a reply cut short: {out[pos:]!r}")
        magic, _o, _t, length = struct.unpack_from(">QIII", out, pos)
        if magic != C.NBD_REP_MAGIC:
            raise AssertionError(f"reply magic 0x{magic:x} at {pos}")
        pos += 20 + length
        if pos > len(out):
            raise AssertionError("reply payload cut short")


class HandshakeCase:
    """A fuzz input: `clear` bytes after the client flags; if `inner` is not None, then
    STARTTLS, a TLS handshake by a real client, and `inner` encrypted by it."""

    def __init__(self, clear, inner=None, pieces=1, required=False):
        self.clear, self.inner, self.pieces, self.required = clear, inner, pieces, required

    def __repr__(self):
        return f"HandshakeCase({self.clear!r}, {self.inner!r}, pieces={self.pieces}, required={self.required})"


class HandshakeFuzzer:
    def __init__(self, tls_context=None, client_context=None, seed=0):
        self.tls_context, self.client_context = tls_context, client_context
        self.rng = random.Random(seed)
        self.arcs = _Arcs(PROTOCOL_FILE)
        self.seen = set()
        self.corpus = []
        self.execs = 0
        for o in OPTIONS:
            self.corpus.append(HandshakeCase(FLAGS + o))
            self.corpus.append(HandshakeCase(FLAGS + opt(C.NBD_OPT_STRUCTURED_REPLY) + o, pieces=3))
        self.corpus.append(HandshakeCase(FLAGS + b"".join(OPTIONS[:4]), required=True))
        if tls_context is not None:
            for o in OPTIONS:
                self.corpus.append(HandshakeCase(FLAGS, opt(C.NBD_OPT_STRUCTURED_REPLY) + o, required=True))

    # one execution

    def execute(self, case):
        self.execs += 1
        srv = ServerHandshake(_Catalog(), tls=self.tls_context if case.inner is not None or case.required else None,
                              tls_required=case.required, authorize=_authorize)
        clear_out = bytearray(srv.data_to_send())
        assert len(clear_out) == 18, clear_out
        data = case.clear
        cuts = sorted(self.rng.randrange(len(data) + 1) for _ in range(case.pieces - 1))
        done = self._feed(srv, [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])], clear_out)
        if srv.tls is None:
            check_framing(bytes(clear_out[18:]), done == "export_name")
        if done or case.inner is None or srv.tls is not None:
            return
        # STARTTLS, then the real client's handshake, then the fuzzed options inside TLS
        srv.receive_data(opt(C.NBD_OPT_STARTTLS))
        if self._step(srv):
            return
        out = srv.data_to_send()
        if len(out) < 20 or struct.unpack_from(">QIII", out)[2] != C.NBD_REP_ACK:
            return  # refused (e.g. STARTTLS twice): fine
        cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        cin.write(out[20:])
        cli = self.client_context.wrap_bio(cin, cout, server_hostname="127.0.0.1")
        for _ in range(10):
            try:
                cli.do_handshake()
                break
            except ssl.SSLWantReadError:
                srv.receive_data(cout.read())
                if self._step(srv):
                    return
                cin.write(srv.data_to_send())
        else:
            raise AssertionError("the TLS handshake did not finish")
        cli.write(case.inner)
        srv.receive_data(cout.read())
        self._step(srv)
        cin.write(srv.data_to_send())
        plain = bytearray()
        while True:
            try:
                chunk = cli.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            plain += chunk
        # replies in TLS, up to a GO's or EXPORT_NAME's end
        check_framing(bytes(plain), True)

    def _feed(self, srv, pieces, out):
        """-> a terminal event's kind, or None when the server waits for more."""
        for piece in pieces:
            if not piece:
                continue
            srv.receive_data(piece)
            kind = self._step(srv)
            out += srv.data_to_send()
            if kind:
                return kind
        return None

    @staticmethod
    def _step(srv):
        """Run the server until it needs data: None, or why it ended."""
        try:
            for _ in range(10000):
                event = srv.next_event()
                if event is NEED_DATA:
                    return None
                if event is not None:
                    if isinstance(event, protocol.ExportSelected):
                        return "export_name" if not event.export.name == "" else "go"
                    return type(event).__name__
            raise AssertionError("the server loops without needing data")
        except RemoteProtocolError:
            return "refused"

    # mutation

    def mutate(self, case):
        r = self.rng
        clear, inner = bytearray(case.clear), bytearray(case.inner) if case.inner is not None else None
        target = inner if inner is not None and r.random() < 0.7 else clear
        for _ in range(r.randint(1, 4)):
            m = r.randrange(8)
            if m == 0 and target:  # flip bits
                i = r.randrange(len(target))
                target[i] ^= 1 << r.randrange(8)
            elif m == 1 and target:  # an interesting u32 somewhere
                i = r.randrange(len(target))
                target[i:i + 4] = struct.pack(">I", r.choice(INTERESTING_U32))
            elif m == 2:  # a whole option in
                i = r.randrange(len(target) + 1)
                target[i:i] = r.choice(OPTIONS)
            elif m == 3 and target:  # cut
                i = r.randrange(len(target))
                del target[i:i + r.randint(1, 24)]
            elif m == 4:  # splice from another input
                other = r.choice(self.corpus).clear
                i = r.randrange(len(other) + 1)
                target += other[i:i + r.randint(1, 64)]
            elif m == 5 and target:  # random bytes
                i = r.randrange(len(target))
                target[i:i] = os.urandom(r.randint(1, 16))
            elif m == 6 and len(target) > 8:  # duplicate a stretch
                i = r.randrange(len(target) - 4)
                target[i:i] = target[i:i + r.randint(4, 40)]
            else:  # a length field of a known option made wrong
                i = bytes(target).find(struct.pack(">Q", C.IHAVEOPT))
                if i >= 0 and len(target) >= i + 16:
                    target[i + 12:i + 16] = struct.pack(">I", r.choice(INTERESTING_U32))
        return HandshakeCase(bytes(clear), bytes(inner) if inner is not None else None,
                             pieces=r.choice((1, 1, 2, 5, 40)), required=case.required if r.random() < 0.9 else not case.required)

    def run(self, execs=None, seconds=None):
        """Fuzz until `execs` inputs or `seconds` pass. Raises Crash with the input."""
        end = time.monotonic() + seconds if seconds else None
        queue = list(self.corpus)
        n = 0
        while (execs is None or n < execs) and (end is None or time.monotonic() < end):
            case = queue.pop() if queue else self.mutate(self.rng.choice(self.corpus))
            n += 1
            try:
                arcs = self.arcs.run(self.execute, case)
            except Exception as e:  # noqa: BLE001 (anything else is the crash we look for)
                raise Crash(case, e) from e
            new = arcs - self.seen
            if new:
                self.seen |= new
                self.corpus.append(case)
        return n


# ------------------------------------------------------------------ the transmission phase, on a daemon


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def connect(where, export, structured=False, tls=None):
    """A socket past the handshake: `where` a unix path or (host, port); `tls` an
    ssl.SSLContext for STARTTLS. -> (socket, Negotiated)."""
    if isinstance(where, tuple):
        s = socket.create_connection(where, timeout=10)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(where)
    if tls is not None:  # STARTTLS by hand, then the library's handshake inside TLS
        recv_exact(s, 18)
        s.sendall(FLAGS + opt(C.NBD_OPT_STARTTLS))
        assert struct.unpack(">QIII", recv_exact(s, 20))[2] == C.NBD_REP_ACK
        s = tls.wrap_socket(s, server_hostname="127.0.0.1")
        if structured:
            s.sendall(opt(C.NBD_OPT_STRUCTURED_REPLY))
            assert struct.unpack(">QIII", recv_exact(s, 20))[2] == C.NBD_REP_ACK
        s.sendall(opt(C.NBD_OPT_GO, go_data(export)))
        size = None
        while True:
            _m, _o, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
            payload = recv_exact(s, length)
            if rtype == C.NBD_REP_INFO and struct.unpack_from(">H", payload)[0] == C.NBD_INFO_EXPORT:
                size = struct.unpack_from(">Q", payload, 2)[0]
            elif rtype == C.NBD_REP_ACK:
                return s, (size, structured)
            elif rtype != C.NBD_REP_INFO:
                raise AssertionError(f"GO refused: 0x{rtype:x} {payload!r}")
    hs = ClientHandshake(export, structured_replies=structured, meta_contexts=())
    while True:
        event = hs.next_event()
        out = hs.data_to_send()
        if out:
            s.sendall(out)
        if event is NEED_DATA:
            hs.receive_data(s.recv(65536))
            continue
        assert isinstance(event, Negotiated), event
        return s, (event.size, event.structured_replies)


def request(cmd, offset=0, length=0, flags=0, cookie=1, magic=C.NBD_REQUEST_MAGIC):
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)


class Canary(threading.Thread):
    """Writes a pattern and reads it back, over and over, on its own export: any error, wrong
    byte or stall (10 s) is a failure. `rounds` counts the verified ones."""

    def __init__(self, where, export, size, tls=None):
        super().__init__(name="canary", daemon=True)
        self.where, self.export, self.size, self.tls = where, export, size, tls
        self.rounds = 0
        self.failure = None
        self._done = threading.Event()

    def run(self):
        try:
            s, _ = connect(self.where, self.export, tls=self.tls)
            rng = random.Random(1)
            while not self._done.is_set():
                off = rng.randrange(self.size // 4096) * 4096
                data = bytes([self.rounds & 0xFF]) * 4096
                s.sendall(request(C.NBD_CMD_WRITE, off, 4096, cookie=2 * self.rounds) + data)
                s.sendall(request(C.NBD_CMD_READ, off, 4096, cookie=2 * self.rounds + 1))
                magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
                assert (magic, err, cookie) == (C.NBD_SIMPLE_REPLY_MAGIC, 0, 2 * self.rounds), (magic, err, cookie)
                magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
                assert (magic, err, cookie) == (C.NBD_SIMPLE_REPLY_MAGIC, 0, 2 * self.rounds + 1), (magic, err, cookie)
                assert recv_exact(s, 4096) == data, "the canary read back other data"
                self.rounds += 1
            s.sendall(request(C.NBD_CMD_DISC))
            s.close()
        except Exception as e:  # noqa: BLE001 (reported by stop())
            self.failure = e

    def stop(self):
        self._done.set()
        self.join(30)
        if self.is_alive():
            raise AssertionError("the canary is stuck")
        if self.failure is not None:
            raise AssertionError(f"the canary failed: {self.failure!r}")


class TransmissionFuzzer:
    """Request streams against a daemon's export `export` (of `size` bytes)."""

    CMDS = (C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_FLUSH, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE,
            C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_BLOCK_STATUS, C.NBD_CMD_DISC, 8, 0xFFFF)

    def __init__(self, where, export, size, tls=None, seed=0):
        self.where, self.export, self.size, self.tls = where, export, size, tls
        self.rng = random.Random(seed)
        self.streams = self.requests = self.replies = 0

    def _one(self, sent):
        """One request (and its payload): -> (bytes, whether the stream ends with it, whether its
        payload is cut short); what a reply to it may carry goes into `sent` (cookie -> READ
        length, or 0)."""
        r = self.rng
        cmd = r.choice(self.CMDS) if r.random() < 0.3 else r.choice((C.NBD_CMD_READ, C.NBD_CMD_WRITE))
        flags = r.choice((0, 0, 0, C.NBD_CMD_FLAG_FUA, C.NBD_CMD_FLAG_DF, C.NBD_CMD_FLAG_REQ_ONE,
                          C.NBD_CMD_FLAG_NO_HOLE, C.NBD_CMD_FLAG_FAST_ZERO, r.randrange(1 << 16)))
        length = r.choice((512, 4096, 65536, 1 << 20, 0, 1, 7, self.size, (64 << 20) + 1, r.randrange(1 << 32)))
        offset = r.choice((0, 4096 * r.randrange(self.size // 4096), self.size - 512, self.size,
                           self.size + 4096, (1 << 63) - 1, r.randrange(1 << 64)))
        cookie = r.randrange(1 << 64)
        magic = C.NBD_REQUEST_MAGIC if r.random() > 0.01 else r.randrange(1 << 32)
        if cmd == C.NBD_CMD_WRITE and length > (1 << 20):
            length = r.choice((1 << 20, 4096))  # big payloads cost time, not coverage
        head = request(cmd, offset, length, flags, cookie, magic)
        payload = b""
        if cmd == C.NBD_CMD_WRITE:
            payload = os.urandom(16) * (length // 16) + os.urandom(length % 16)
            if r.random() < 0.03:
                payload = payload[:r.randrange(len(payload) + 1)]  # cut short: the stream breaks
        cut = len(payload) < (length if cmd == C.NBD_CMD_WRITE else 0)
        ends = magic != C.NBD_REQUEST_MAGIC or cmd == C.NBD_CMD_DISC or cut
        if not ends or cut:  # a cut write is answered if the bytes after it complete its payload
            sent[cookie] = length if cmd == C.NBD_CMD_READ else 0
        return head + payload, ends, cut

    def stream(self):
        """One connection: a burst of requests, maybe garbage or a hang-up, then the replies."""
        r = self.rng
        s, (size, structured) = connect(self.where, self.export, structured=r.random() < 0.5, tls=self.tls)
        self.streams += 1
        sent = {}
        out = bytearray()
        cut = False
        for _ in range(r.randint(1, 24)):
            piece, ends, cut = self._one(sent)
            out += piece
            self.requests += 1
            if ends:
                break
        if r.random() < 0.05:
            out += os.urandom(r.randint(1, 200))  # garbage after the requests
        hang_up = cut or r.random() < 0.15  # a cut payload would keep the server waiting for it
        try:
            s.sendall(bytes(out) if not hang_up else bytes(out[:r.randrange(len(out) + 1)]))
            if hang_up:
                s.close()  # mid-request, with requests in flight
                return
            s.sendall(request(C.NBD_CMD_DISC))
            self._replies(s, sent, structured)
        except (BrokenPipeError, ConnectionResetError, EOFError, ssl.SSLError, socket.timeout):
            pass  # the server hung up on a broken stream, as it may
        finally:
            s.close()

    def _replies(self, s, sent, structured):
        """Read replies until the server closes: each well framed and for a request sent."""
        while True:
            try:
                magic = struct.unpack(">I", recv_exact(s, 4))[0]
            except EOFError:
                return
            if magic == C.NBD_SIMPLE_REPLY_MAGIC:
                err, cookie = struct.unpack(">IQ", recv_exact(s, 12))
                assert cookie in sent, f"a reply to cookie {cookie:x}, which was not sent"
                if err == 0 and sent[cookie]:
                    recv_exact(s, sent[cookie])  # a READ's data
            elif magic == C.NBD_STRUCTURED_REPLY_MAGIC and structured:
                _flags, _type, cookie, length = struct.unpack(">HHQI", recv_exact(s, 16))
                assert cookie in sent, f"a structured reply to cookie {cookie:x}, which was not sent"
                recv_exact(s, length)
            else:
                raise AssertionError(f"reply magic 0x{magic:08x}")
            self.replies += 1

    def run(self, streams=None, seconds=None):
        end = time.monotonic() + seconds if seconds else None
        n = 0
        while (streams is None or n < streams) and (end is None or time.monotonic() < end):
            self.stream()
            n += 1
        return n


# ------------------------------------------------------------------ the long run


def main():
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    import certs
    from conftest import Daemon, config_text, device
    from nut import free_port

    from appliance.nbd.tls import context

    crashes = HERE / "crashes"
    work = Path(tempfile.mkdtemp(prefix="nbd-fuzz-"))
    ca = certs.make_ca(work / "ca")
    server, client = certs.server_dir(ca, work / "server"), certs.client_dir(ca, work / "client")
    cctx = ssl.create_default_context(cafile=str(client / "ca-cert.pem"))
    cctx.load_cert_chain(str(client / "client-cert.pem"), str(client / "client-key.pem"))
    size = 64 << 20
    for name in ("fuzz", "canary"):
        with open(work / f"{name}.img", "wb") as f:
            f.truncate(size)
    port = free_port()
    devices = (device("fuzz", f"0 {size // 512} linear {work}/fuzz.img 0")
               + device("canary", f"0 {size // 512} linear {work}/canary.img 0"))
    d = Daemon(work, config_text(work, devices, extra=f'tls = "on"\ntls_certificates = "{server}"\n', tcp=port))
    d.start()
    canary = Canary(d.socket, "canary", size)
    canary.start()
    hs = HandshakeFuzzer(context(str(server), False), cctx, seed=args.seed)
    plain = TransmissionFuzzer(d.socket, "fuzz", size, seed=args.seed)
    tls = TransmissionFuzzer(("127.0.0.1", port), "fuzz", size, tls=cctx, seed=args.seed + 1)
    end = time.monotonic() + args.minutes * 60
    found = 0
    try:
        while time.monotonic() < end:
            try:
                hs.run(seconds=min(20, end - time.monotonic()))
            except Crash as c:
                found += 1
                crashes.mkdir(exist_ok=True)
                (crashes / f"handshake-{args.seed}-{found}.txt").write_text(f"{c}\n{c.case!r}\n")
                print(f"CRASH: {c}\n  {c.case!r}", flush=True)
            plain.run(seconds=min(20, max(0, end - time.monotonic())))
            tls.run(seconds=min(10, max(0, end - time.monotonic())))
            assert d.proc.poll() is None, "the daemon died"
            print(f"handshake: {hs.execs} inputs, {len(hs.corpus)} in the corpus, {len(hs.seen)} arcs; "
                  f"transmission: {plain.streams + tls.streams} streams, {plain.requests + tls.requests} requests; "
                  f"canary: {canary.rounds} verified rounds", flush=True)
        canary.stop()
        assert "Traceback" not in d.log.read_text(), "the daemon logged a traceback"
    finally:
        d.stop()
    print(f"done: {found} crash(es); log in {d.log}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
