"""[export] limits on real daemons: connections per listener and per client, the handshake
deadline, running out of descriptors. Each test checks the client over a limit is refused with a
log line and that the others (connected, or new ones within the limits) notice nothing."""

from __future__ import annotations

import os
import resource
import socket
import time

import pytest

from conftest import cpu_seconds, device, need, run, wait_for
from nut import free_port
from test_hostile import connect, handshake, log_has

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def disk(image):
    return image("disk.img", SIZE)


def start(make_daemon, disk, extra, tcp=None):
    return make_daemon(device("data0", f"0 {SIZE // 512} linear {disk} 0"), extra=extra, tcp=tcp)


def connect_tcp(port):
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def greeted(s, timeout=5.0):
    """The server sent its greeting (peeked: a handshake on `s` can still follow)."""
    s.settimeout(timeout)
    try:
        return len(s.recv(18, socket.MSG_PEEK | socket.MSG_WAITALL)) == 18
    except socket.timeout:
        return False


def refused(s):
    """Closed by the server without a greeting."""
    s.settimeout(5)
    try:
        return s.recv(18) == b""
    except ConnectionResetError:
        return True


def nbdinfo(uri, check=True):
    need("nbdinfo")
    return run("nbdinfo", "--size", uri, check=check, timeout=30).stdout.strip() == str(SIZE)


def test_a_listener_refuses_connections_past_max_connections(make_daemon, disk):
    port = free_port()
    d = start(make_daemon, disk, "max_connections = 3\n", tcp=port)
    held = [connect(d) for _ in range(3)]
    assert all(greeted(s) for s in held)
    over = connect(d)
    assert refused(over)
    assert log_has(d, f"refused on unix:{d.socket}: the listener has 3 connections (max_connections = 3)")
    # the other listener counts its own connections; the held ones still negotiate and serve
    assert nbdinfo(f"nbd://127.0.0.1:{port}/data0")
    for s in held:
        s, neg = handshake(d, sock=s)
        assert neg.size == SIZE
    held.pop().close()
    assert wait_for(lambda: nbdinfo(d.uri("data0"), check=False), what="a connection once one of the 3 is gone")


def test_one_client_address_is_limited_without_touching_others(make_daemon, disk):
    port = free_port()
    d = start(make_daemon, disk, "max_connections_per_client = 2\n", tcp=port)
    held = [connect_tcp(port) for _ in range(2)]
    assert all(greeted(s) for s in held)
    assert refused(connect_tcp(port))
    assert log_has(d, f"refused on tcp:127.0.0.1:{port}: 127.0.0.1 has 2 connections (max_connections_per_client = 2)")
    # another client (here: a unix socket peer, counted by its user id) is served
    assert nbdinfo(d.uri("data0"))
    for s in held:
        s, neg = handshake(d, sock=s)
        assert neg.size == SIZE
    held.pop().close()
    assert wait_for(lambda: nbdinfo(f"nbd://127.0.0.1:{port}/data0", check=False), what="the client's third connection once one is gone")


def test_the_handshake_deadline_covers_the_whole_handshake(make_daemon, disk):
    """A client dripping one byte at a time used to get the timeout anew for every receive."""
    d = start(make_daemon, disk, "handshake_timeout = 2\n")
    drip = connect(d)
    assert greeted(drip)
    drip.recv(18)
    t0 = time.monotonic()
    hello = b"\0\0\0\x01" + b"IHAVEOPT" + b"\0\0\0\x07" + b"\0\0\0\x40" + b"x" * 64  # OPT_GO, slowly
    closed = None
    for b in hello:
        try:
            drip.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed = time.monotonic() - t0
            break
        time.sleep(0.25)
        if time.monotonic() - t0 > 1 and closed is None and nbdinfo(d.uri("data0")) is not True:
            pytest.fail("a well-behaved client was not served while another dripped")
    assert closed is not None and closed < 4, closed
    assert log_has(d, "handshake not finished in 2s (handshake_timeout)")
    assert nbdinfo(d.uri("data0"))


def test_out_of_descriptors_the_listener_backs_off_and_recovers(make_daemon, disk):
    d = start(make_daemon, disk, "")
    pid = d.proc.pid
    fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    limit = next(n for n in range(1 << 16) if n - len([f for f in fds if f < n]) == 3)  # about 3 descriptors free
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, old[1]))
    held, queued = [], []
    while not queued:  # connections until one is not accepted: the kernel queues it, accept() fails with EMFILE
        s = connect(d)
        (held if greeted(s, timeout=1) else queued).append(s)
        assert len(held) < 10, "the descriptor limit did not bite"
    queued.append(connect(d))
    assert log_has(d, "cannot accept: Too many open files")
    cpu = cpu_seconds(pid)
    time.sleep(2)
    assert cpu_seconds(pid) - cpu < 0.5, "the listener spins on EMFILE"
    assert not any(greeted(s, timeout=0.1) for s in queued)
    for s in held:
        s.close()
    assert all(greeted(s) for s in queued), "the queued clients were never accepted"
    assert log_has(d, "accepting connections again")
    for s in queued:
        s.close()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    assert nbdinfo(d.uri("data0"))
    assert d.proc.poll() is None


def test_200_clients_reading_32_mib_at_once_stay_under_buffer_memory_and_all_complete(make_daemon, image):
    """With buffer_memory = 256 MiB, requests wait for room, none fails, and the daemon's
    memory stays within its start plus the cap."""
    import selectors
    import struct

    from appliance.nbd import constants as C
    from test_hostile import request

    big = 32 * MiB
    disk = image("big.img", big)
    with open(disk, "r+b") as f:
        for i in range(0, big, MiB):
            f.seek(i)
            f.write(struct.pack(">Q", i) * 8)  # each MiB says where it is
    d = make_daemon(device("data0", f"0 {big // 512} linear {disk} 0"), extra="buffer_memory = 268435456\n")
    rss = lambda what: int(next(line.split()[1] for line in open(f"/proc/{d.proc.pid}/status")  # noqa: E731
                                if line.startswith(what + ":"))) * 1024
    socks = [handshake(d)[0] for _ in range(200)]
    base = rss("VmRSS")
    for i, s in enumerate(socks):
        s.sendall(request(C.NBD_CMD_READ, 0, big, cookie=i))
    sel = selectors.DefaultSelector()
    want = {s: 16 + big for s in socks}
    head = {s: b"" for s in socks}
    checked = {s: b"" for s in socks}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    scratch = bytearray(4 * MiB)
    deadline = time.monotonic() + 120
    while want and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=5):
            s = key.fileobj
            n = s.recv_into(scratch, min(len(scratch), want[s]))
            assert n, "the daemon closed a connection"
            got = 16 + big - want[s]
            if got < 16 + 64:  # the reply header and the first MiB's marker
                take = min(n, 16 + 64 - got)
                head[s] += bytes(scratch[:take])
            want[s] -= n
            if not want[s]:
                sel.unregister(s)
                del want[s]
                checked[s] = head[s]
    assert not want, f"{len(want)} clients still waiting for their reply"
    for i, s in enumerate(socks):
        magic, error, cookie = struct.unpack(">IIQ", checked[s][:16])
        assert (magic, error, cookie) == (C.NBD_SIMPLE_REPLY_MAGIC, 0, i)
        assert checked[s][16:] == struct.pack(">Q", 0) * 8
        s.close()
    mem = d.status()["daemon"]["buffer_memory"]
    assert mem["limit"] == 256 * MiB and mem["waits"] > 0  # requests did wait for room
    # without the cap: 200 x 32 MiB of buffers, and as much again of replies queued for clients
    assert mem["peak"] <= 256 * MiB, mem
    assert rss("VmHWM") - base < 256 * MiB + 128 * MiB, (rss("VmHWM"), base)  # threads' stacks, Python
    wait_for(lambda: d.status()["daemon"]["buffer_memory"]["used"] == 0, what="the buffers given back")
