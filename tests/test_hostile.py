"""Hostile and broken clients on raw sockets.

Each test misbehaves on one connection and checks three things: that
connection is closed (or answered with the error the spec names), the daemon
log says why, and the daemon still serves a well-behaved client (qemu-io).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time

import pytest

from appliance.nbd import constants as C
from appliance.nbd.protocol import NEED_DATA, ClientHandshake, Negotiated
from conftest import need, run, wait_for

MiB = 1 << 20
SIZE = 8 * MiB


def device(name, *lines, **opts):
    text = f'[[device]]\nname = "{name}"\ntable = {json.dumps(list(lines))}\n'
    for key, value in opts.items():
        text += f"{key} = {json.dumps(value)}\n"
    return text + "\n"


@pytest.fixture
def daemon(make_daemon, image):
    disk = image("disk.img", SIZE)
    return make_daemon(device("data0", f"0 {SIZE // 512} linear {disk} 0"))


# the raw client


def connect(d, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(d.socket)
    return s


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def greeting(s):
    magic, opt_magic, flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, opt_magic) == (C.NBDMAGIC, C.IHAVEOPT)
    return flags


def closed_by_server(s, timeout=5.0):
    """True when the server closes the connection within `timeout` (any bytes before EOF are read and dropped)."""
    s.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not s.recv(65536):
                return True
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def option(opt, data=b""):
    return struct.pack(">QII", C.IHAVEOPT, opt, len(data)) + data


def handshake(d, export="data0", structured=False, sock=None):
    """A good handshake with the library's client state machine (on `sock`, connected and
    nothing read yet, or a new connection to `d`); returns (sock, Negotiated)."""
    s = sock or connect(d)
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
        assert not event.trailing_data
        return s, event


def request(cmd, offset=0, length=0, flags=0, cookie=1, magic=C.NBD_REQUEST_MAGIC):
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)


def simple_reply(s, payload=0):
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == C.NBD_SIMPLE_REPLY_MAGIC
    data = recv_exact(s, payload) if payload and not error else b""
    return error, cookie, data


def log_has(d, text, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in d.log.read_text():
            return True
        time.sleep(0.05)
    return False


def still_serves(d, pattern=0x6b, offset=3 * MiB):
    """A well-behaved client still gets its data through, and the daemon process is alive."""
    assert d.proc.poll() is None, d.log.read_text()
    need("qemu-io")
    out = run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} 65536", "-c", f"read -P {pattern} {offset} 65536", d.uri("data0"), timeout=30).stdout
    assert "Pattern verification failed" not in out
    assert d.status("data0")["devices"][0]["name"] == "data0"


# handshake phase


def test_unknown_client_flags_close_the_connection_with_a_log_line(daemon):
    s = connect(daemon)
    greeting(s)
    s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE | 0x80))
    assert closed_by_server(s)
    assert log_has(daemon, "unknown client flags 0x80")
    still_serves(daemon)


def test_client_without_fixed_newstyle_is_dropped(daemon):
    s = connect(daemon)
    greeting(s)
    s.sendall(struct.pack(">I", 0))
    assert closed_by_server(s)
    assert log_has(daemon, "does not support fixed newstyle")
    still_serves(daemon)


def test_garbage_option_magic_closes_the_connection(daemon):
    s = connect(daemon)
    greeting(s)
    s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE) + b"GARBAGE!" + struct.pack(">II", C.NBD_OPT_GO, 0))
    assert closed_by_server(s)
    assert log_has(daemon, "bad magic 0x")
    still_serves(daemon)


def test_oversize_option_length_is_refused_without_waiting_for_the_payload(daemon):
    s = connect(daemon)
    greeting(s)
    # a 1 GiB option: the header alone must be enough to hang up
    s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE) + struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_GO, 1 << 30) + b"x" * 100)
    assert closed_by_server(s, timeout=3)
    assert log_has(daemon, "exceeds limit")
    still_serves(daemon)


def test_truncated_option_is_logged_when_the_client_goes_away(daemon):
    s = connect(daemon)
    greeting(s)
    s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE) + struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_GO, 100) + b"\0\0\0\x05data0")
    time.sleep(0.2)
    s.shutdown(socket.SHUT_WR)
    assert closed_by_server(s)
    assert log_has(daemon, "closed the connection mid-message")
    still_serves(daemon)


def test_silent_clients_do_not_hold_up_other_clients(daemon):
    silent = [connect(daemon) for _ in range(8)]
    try:
        for s in silent:
            greeting(s)
        time.sleep(0.5)  # they say nothing at all
        still_serves(daemon)
        for s in silent:  # none of them was dropped yet: the handshake timeout is long
            s.settimeout(0.05)
            with pytest.raises(socket.timeout):
                s.recv(1)
    finally:
        for s in silent:
            s.close()
    assert log_has(daemon, "closed the connection during the handshake")
    still_serves(daemon, pattern=0x6c)


def test_unknown_export_with_export_name_closes_as_the_spec_says(daemon):
    s = connect(daemon)
    greeting(s)
    s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE) + option(C.NBD_OPT_EXPORT_NAME, b"nosuch"))
    assert closed_by_server(s)
    assert log_has(daemon, "unknown export 'nosuch'")
    still_serves(daemon)


def test_unsupported_and_malformed_options_are_refused_and_negotiation_continues(daemon):
    s = connect(daemon)
    assert greeting(s) & C.NBD_FLAG_NO_ZEROES
    s.sendall(struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES))
    for opt, data, want in (
        (99, b"", C.NBD_REP_ERR_UNSUP),
        (C.NBD_OPT_GO, b"\0\0\0\xffab", C.NBD_REP_ERR_INVALID),  # name length overruns the option
        (C.NBD_OPT_LIST, b"junk", C.NBD_REP_ERR_INVALID),
        (C.NBD_OPT_STARTTLS, b"", C.NBD_REP_ERR_POLICY),
    ):
        s.sendall(option(opt, data))
        magic, ropt, rtype, rlen = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, rlen)
        assert (magic, ropt, rtype) == (C.NBD_REP_MAGIC, opt, want)
    # and the same connection can still go
    s.sendall(option(C.NBD_OPT_EXPORT_NAME, b"data0"))
    size, _flags = struct.unpack(">QH", recv_exact(s, 10))
    assert size == SIZE
    s.sendall(request(C.NBD_CMD_READ, 0, 512, cookie=7))
    assert simple_reply(s, 512) == (0, 7, bytes(512))
    s.close()
    still_serves(daemon)


# transmission phase


def test_bad_request_magic_closes_the_connection(daemon):
    s, _ = handshake(daemon)
    s.sendall(request(C.NBD_CMD_READ, 0, 512, cookie=1))
    assert simple_reply(s, 512)[:2] == (0, 1)
    s.sendall(request(C.NBD_CMD_READ, 0, 512, cookie=2, magic=0xDEADBEEF))
    assert closed_by_server(s)
    assert log_has(daemon, "bad request magic 0xdeadbeef")
    still_serves(daemon)


def test_write_whose_payload_never_comes_is_dropped_when_the_socket_closes(daemon):
    s, _ = handshake(daemon)
    s.sendall(request(C.NBD_CMD_WRITE, 4096, 65536, cookie=3) + b"\xee" * 1000)
    time.sleep(0.2)
    s.close()
    assert log_has(daemon, "in the middle of a write payload")
    still_serves(daemon)
    with open(daemon.dir / "disk.img", "rb") as f:
        f.seek(4096)
        assert f.read(65536) == bytes(65536)  # nothing of the partial write landed


def test_write_over_the_hard_limit_closes_without_reading_the_payload(daemon):
    s, _ = handshake(daemon)
    s.sendall(request(C.NBD_CMD_WRITE, 0, 128 * MiB + 1, cookie=4) + b"x" * 4096)
    assert closed_by_server(s, timeout=3)
    assert log_has(daemon, "over the hard limit")
    still_serves(daemon)


def test_nbdinfo_says_the_maximum_block_is_64_mib(daemon):
    need("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", daemon.uri("data0")).stdout)
    assert info["exports"][0]["block_size_maximum"] == 64 * MiB


def test_requests_over_the_max_block_size_get_einval_and_the_stream_stays_in_step(daemon):
    # the spec: EOVERFLOW is for DF reads and payload-less commands; an oversized READ or
    # WRITE gets EINVAL. A write's payload up to the hard limit is read and discarded.
    s, _ = handshake(daemon)
    n = 64 * MiB + 512
    s.sendall(request(C.NBD_CMD_WRITE, 0, n, cookie=5))
    s.sendall(b"\x01" * n)
    assert simple_reply(s) == (errno.EINVAL, 5, b"")
    s.sendall(request(C.NBD_CMD_READ, 0, n, cookie=7))
    assert simple_reply(s) == (errno.EINVAL, 7, b"")
    s.sendall(request(C.NBD_CMD_READ, 0, 4096, cookie=6))
    assert simple_reply(s, 4096) == (0, 6, bytes(4096))
    s.close()
    still_serves(daemon)


def test_unknown_command_gets_einval_and_the_connection_continues(daemon):
    s, _ = handshake(daemon)
    for cmd in (8, 42, 0xFFFF):
        s.sendall(request(cmd, 0, 512, cookie=cmd))
        assert simple_reply(s) == (errno.EINVAL, cmd, b"")
    s.sendall(request(C.NBD_CMD_READ, 0, 512, cookie=9))
    assert simple_reply(s, 512) == (0, 9, bytes(512))
    s.close()
    still_serves(daemon)


def test_cookies_are_echoed_byte_for_byte(daemon):
    s, _ = handshake(daemon)
    cookies = [0, 1, 0xFFFFFFFFFFFFFFFF, 0x0102030405060708]
    for c in cookies:
        s.sendall(request(C.NBD_CMD_FLUSH, cookie=c))
    got = sorted(simple_reply(s)[1] for _ in cookies)
    assert got == sorted(cookies)
    s.sendall(request(C.NBD_CMD_READ, 0, 4096, cookie=0xA1B2C3D4E5F60718, flags=0x40))  # unknown flag
    assert simple_reply(s) == (errno.EINVAL, 0xA1B2C3D4E5F60718, b"")
    s.close()


def test_disconnect_after_pipelined_requests_answers_them_all_first(daemon):
    s, _ = handshake(daemon)
    burst = b"".join(request(C.NBD_CMD_WRITE, i * 4096, 4096, cookie=100 + i) + bytes([i]) * 4096 for i in range(32))
    burst += request(C.NBD_CMD_FLUSH, cookie=200) + request(C.NBD_CMD_DISC, cookie=201)
    s.sendall(burst)
    replies = {simple_reply(s)[1]: None for _ in range(33)}
    assert set(replies) == set(range(100, 132)) | {200}
    assert closed_by_server(s)
    assert log_has(daemon, "client sent NBD_CMD_DISC")
    with open(daemon.dir / "disk.img", "rb") as f:
        for i in range(32):
            assert f.read(4096) == bytes([i]) * 4096
    still_serves(daemon)


def test_client_that_vanishes_with_requests_in_flight_does_not_hurt_the_daemon(daemon):
    for _ in range(5):
        s, _ = handshake(daemon)
        s.sendall(b"".join(request(C.NBD_CMD_READ, i * 65536, 65536, cookie=i) for i in range(64)))
        s.close()
    assert log_has(daemon, "data0: unix:")
    still_serves(daemon)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and daemon.status("data0")["devices"][0]["clients"]:
        time.sleep(0.1)
    assert daemon.status("data0")["devices"][0]["clients"] == 0


def threads_and_fds(d):
    """The daemon's thread and descriptor counts: each connection has a socket, an eventfd, an
    io_uring and two threads (its loop and its sender) until it is over."""
    status = open(f"/proc/{d.proc.pid}/status").read()
    threads = int(status.split("Threads:")[1].split()[0])
    return threads, len(os.listdir(f"/proc/{d.proc.pid}/fd"))


# how the connection ends right after its last slow request: (what is sent after it, and
# whether the client then hangs up without waiting for the replies)
ENDINGS = {
    "disc": (request(C.NBD_CMD_DISC, cookie=9), False),
    "bad magic": (request(C.NBD_CMD_READ, 0, 512, cookie=9, magic=0xDEADBEEF), False),
    "hang-up": (b"", True),
    "cut write payload": (request(C.NBD_CMD_WRITE, 0, 65536, cookie=9) + b"x" * 100, True),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_connection_that_ends_right_after_slow_requests_answers_them_and_goes(daemon, ending):
    # The soak's leak: once a connection had slow requests (TRIM here: not the fast path),
    # the next ones wait in its batch for the device queue until the loop sleeps. A stream
    # that ended in the same read (DISC, garbage, a hang-up) left the batch unsubmitted, and
    # the loop waited forever for their replies: its socket, eventfd, io_uring and two
    # threads stayed, and a client waiting for the reply (or the close) waited forever too.
    s, _ = handshake(daemon)
    s.sendall(request(C.NBD_CMD_TRIM, 0, 4096, cookie=1) + request(C.NBD_CMD_DISC))
    assert simple_reply(s) == (0, 1, b"")
    assert closed_by_server(s)
    s.close()
    wait_for(lambda: daemon.status("data0")["devices"][0]["clients"] == 0, what="the first client gone")
    baseline = threads_and_fds(daemon)

    tail, hang_up = ENDINGS[ending]
    s, _ = handshake(daemon)
    s.sendall(request(C.NBD_CMD_TRIM, 0, 4096, cookie=2))
    assert simple_reply(s) == (0, 2, b"")  # from now on the session batches slow requests
    # two more slow requests and the end of the stream, in one read of the server's
    s.sendall(request(C.NBD_CMD_TRIM, 4096, 4096, cookie=3) + request(C.NBD_CMD_WRITE_ZEROES, 8192, 4096, cookie=4)
              + tail)
    if hang_up:
        s.close()
    else:
        assert sorted(simple_reply(s)[:2] for _ in range(2)) == [(0, 3), (0, 4)]
        assert closed_by_server(s)
        s.close()
    wait_for(lambda: daemon.status("data0")["devices"][0]["clients"] == 0, what="the connection over")
    wait_for(lambda: threads_and_fds(daemon) <= baseline, timeout=5,
             what=f"threads and descriptors back to {baseline} (now {threads_and_fds(daemon)})")
    still_serves(daemon)


def test_garbage_instead_of_a_handshake_from_many_clients_at_once(daemon):
    socks = []
    for i in range(16):
        s = connect(daemon)
        greeting(s)
        s.sendall(bytes(range(i, i + 64)))
        socks.append(s)
    for s in socks:
        assert closed_by_server(s)
        s.close()
    still_serves(daemon)


def test_a_client_that_stops_reading_replies_cannot_hang_resume(daemon):
    s, _ = handshake(daemon)
    try:
        daemon.cli("suspend", "data0")
        # 64 MiB of reads held by the suspend; the client will never read a byte of the replies
        s.sendall(b"".join(request(C.NBD_CMD_READ, (i % 8) * MiB, MiB, cookie=i) for i in range(64)))
        time.sleep(0.3)
        started = time.monotonic()
        try:
            r = daemon.cli("resume", "data0", check=False, timeout=5)
            resumed = r.returncode == 0
        except Exception:  # subprocess.TimeoutExpired
            resumed = False
        assert resumed and time.monotonic() - started < 5
        still_serves(daemon)
    finally:
        s.close()  # unblocks the daemon either way
