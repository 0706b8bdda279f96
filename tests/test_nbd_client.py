"""Remote devices: the appliance as an NBD client of nbdkit and qemu-nbd (`nbd+unix://` words in
tables), and the sans-IO reply parser underneath it."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from appliance import io as bio
from appliance.blockdev import DeviceError
from appliance.nbd import client as nbd_client
from appliance.nbd import constants as C
from appliance.nbd.protocol import NEED_DATA, RemoteProtocolError
from appliance.nbd.transmission import BlockStatus, ClientTransmission, ReadData, ReadHole, ReplyDone
from appliance.nbd.uri import parse_uri
from conftest import device, need, qemu_io, remote, run, wait_for

MiB = 1 << 20
S = 512


# ------------------------------------------------------------- sans-IO replies

def simple(cookie, error=0, data=b""):
    return struct.pack(">IIQ", C.NBD_SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie, rtype, payload=b"", done=False):
    return struct.pack(">IHHQI", C.NBD_STRUCTURED_REPLY_MAGIC, C.NBD_REPLY_FLAG_DONE if done else 0,
                       rtype, cookie, len(payload)) + payload


def events(tx, data, step=None):
    """Feed `data` (in pieces of `step` bytes) and collect every event."""
    out = []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        tx.receive_data(piece)
        while (ev := tx.next_event()) is not NEED_DATA:
            out.append(ev)
    return out


def test_simple_replies_are_matched_to_requests_out_of_order():
    tx = ClientTransmission(structured_replies=False)
    read, header = tx.request(C.NBD_CMD_READ, 0, 4096, 4)
    assert struct.unpack(">IHHQQI", header) == (C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_READ, read, 4096, 4)
    write, _ = tx.request(C.NBD_CMD_WRITE, C.NBD_CMD_FLAG_FUA, 0, 512)
    flush, _ = tx.request(C.NBD_CMD_FLUSH, 0, 0, 0)
    got = events(tx, simple(flush, C.NBD_EIO) + simple(read, 0, b"abcd") + simple(write))
    assert got == [ReplyDone(flush, C.NBD_EIO), ReadData(read, 4096, b"abcd"), ReplyDone(read, 0),
                   ReplyDone(write, 0)]
    assert tx.in_flight == 0


def test_structured_read_of_data_and_hole_chunks_in_any_order():
    tx = ClientTransmission(structured_replies=True)
    cookie, _ = tx.request(C.NBD_CMD_READ, 0, 1000, 300)
    wire = (chunk(cookie, C.NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 1100, 200))
            + chunk(cookie, C.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 1000) + b"x" * 100, done=True))
    assert events(tx, wire) == [ReadHole(cookie, 1100, 200), ReadData(cookie, 1000, b"x" * 100),
                                ReplyDone(cookie, 0)]


def test_error_chunk_ends_the_request_with_its_error_and_message():
    tx = ClientTransmission(structured_replies=True)
    cookie, _ = tx.request(C.NBD_CMD_READ, 0, 0, 4096)
    msg = b"medium error"
    wire = (chunk(cookie, C.NBD_REPLY_TYPE_ERROR_OFFSET, struct.pack(">IH", C.NBD_ENOSPC, len(msg)) + msg
                  + struct.pack(">Q", 512))
            + chunk(cookie, C.NBD_REPLY_TYPE_NONE, done=True))
    assert events(tx, wire) == [ReplyDone(cookie, C.NBD_ENOSPC, "medium error")]


def test_block_status_chunk_carries_its_extents():
    tx = ClientTransmission(structured_replies=True)
    cookie, _ = tx.request(C.NBD_CMD_BLOCK_STATUS, 0, 0, 3 * MiB)
    wire = chunk(cookie, C.NBD_REPLY_TYPE_BLOCK_STATUS, struct.pack(">IIIII", 1, MiB, 0, 2 * MiB, 3), done=True)
    assert events(tx, wire) == [BlockStatus(cookie, 1, ((MiB, 0), (2 * MiB, 3))), ReplyDone(cookie, 0)]


def test_replies_fed_a_byte_at_a_time_give_the_same_events():
    def wire_and_tx():
        tx = ClientTransmission(structured_replies=True)
        a, _ = tx.request(C.NBD_CMD_READ, 0, 0, 8)
        b, _ = tx.request(C.NBD_CMD_WRITE, 0, 0, 8)
        return tx, (chunk(a, C.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"12345678", done=True)
                    + simple(b, C.NBD_EPERM))

    tx, wire = wire_and_tx()
    whole = events(tx, wire)
    tx, wire = wire_and_tx()
    assert events(tx, wire, step=1) == whole and len(whole) == 3


@pytest.mark.parametrize("reply, why", [
    (lambda c: simple(c + 99), "unknown cookie"),
    (lambda c: chunk(c, C.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 0) + b"x" * 8, done=True),
     "covers 8 of 16 bytes"),
    (lambda c: chunk(c, C.NBD_REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", 12) + b"x" * 8, done=True),
     "outside the request"),
    (lambda c: chunk(c, C.NBD_REPLY_TYPE_OFFSET_DATA, b"\0" * 4000), "chunk of 4000 bytes"),
    (lambda c: b"\x12\x34\x56\x78" + b"\0" * 12, "bad reply magic"),
], ids=["unknown-cookie", "short-read", "outside", "oversized", "magic"])
def test_a_broken_reply_is_a_protocol_error(reply, why):
    tx = ClientTransmission(structured_replies=True)
    cookie, _ = tx.request(C.NBD_CMD_READ, 0, 0, 16)
    with pytest.raises(RemoteProtocolError, match=why):
        events(tx, reply(cookie))


def test_server_closing_mid_reply_is_a_protocol_error():
    tx = ClientTransmission(structured_replies=False)
    cookie, _ = tx.request(C.NBD_CMD_READ, 0, 0, 16)
    tx.receive_data(simple(cookie, 0, b"half"))
    assert tx.next_event() is NEED_DATA
    tx.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-reply"):
        tx.next_event()


# ------------------------------------------------------------------------ URIs

@pytest.mark.parametrize("uri, want", [
    ("nbd+unix:///disk?socket=/run/x.sock", dict(export="disk", socket="/run/x.sock", host=None)),
    ("nbd+unix:///?socket=/s&connections=2&timeout=1.5", dict(export="", connections=2, timeout=1.5)),
    ("nbd://10.0.0.5/disk%20a", dict(export="disk a", host="10.0.0.5", port=10809)),
    ("nbd://[::1]:10900", dict(export="", host="::1", port=10900)),
])
def test_uri_forms(uri, want):
    a = parse_uri(uri)
    assert {k: getattr(a, k) for k in want} == want


@pytest.mark.parametrize("uri, message", [
    ("nbd+unix:///disk", "needs ?socket=PATH"),
    ("nbd+unix://host/disk?socket=/s", "takes no host"),
    ("nbd:///disk", "needs a host"),
    ("nbd://host:http/disk", "is not a number"),
    ("nbds://host/disk", "TLS (nbds://) is not supported"),
    ("nbd+vsock:///disk", "unknown scheme 'nbd+vsock'"),
    ("nbd://host/disk?tls=on", "unknown parameter 'tls'"),
    ("nbd://host/disk?connections=0", "connections='0': want a number from 1 to 16"),
    ("nbd://host/disk?timeout=-1", "timeout='-1'"),
    ("nbd://host/disk?socket=/s", "socket= is for nbd+unix://"),
])
def test_bad_uris_say_what_is_wrong(uri, message):
    with pytest.raises(DeviceError) as e:
        parse_uri(uri)
    assert e.value.strerror.startswith(uri + ": ") and message in e.value.strerror


# -------------------------------------------------------------- real servers

def file_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_writes_through_a_linear_device_land_in_nbdkits_file(make_daemon, image, nbdkit):
    disk = image("disk.img", 16 * MiB)
    with open(disk, "r+b") as f:
        f.seek(9 * MiB)
        f.write(b"\x77" * 4096)
    kit = nbdkit("file", disk)
    # 1 MiB into the export, as linear's offset says
    d = make_daemon(device("r", f"0 {10 * MiB // S} linear {remote(kit.sock)} {MiB // S}"))
    out = qemu_io(d.uri("r"), "write -P 0x5a 0 64k", "write -P 0x3c -f 7M 4k", "flush",
                  "read -P 0x77 8M 4k").stdout
    assert "Pattern verification failed" not in out and out.count("wrote ") == 2
    assert file_bytes(disk, MiB, 64 * 1024) == b"\x5a" * 65536
    assert file_bytes(disk, 8 * MiB, 4096) == b"\x3c" * 4096
    assert file_bytes(disk, 0, MiB) == bytes(MiB)  # nothing before the segment's offset


def test_a_tcp_export_and_its_connections_close_with_the_last_table(make_daemon, nbdkit, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "kit.log"
    kit = nbdkit("--filter=log", "memory", "16M", f"logfile={log}", port=port)
    uri = f"nbd://127.0.0.1:{port}/?connections=2"
    d = make_daemon(device("t", f"0 {4 * MiB // S} linear {uri} {4 * MiB // S}"))
    qemu_io(d.uri("t"), "write -P 0x2f 64k 64k")
    # what the appliance wrote is in nbdkit's memory, 4 MiB in
    assert "Pattern verification failed" not in qemu_io(f"nbd://127.0.0.1:{port}/", "read -P 0x2f 4160k 64k").stdout
    assert log.read_text().count("Connect export=") == 3  # two for the table, one for the check
    d.cli("load", "t", "0 8192 zero")
    d.cli("resume", "t")
    wait_for(lambda: log.read_text().count("Disconnect") == 3, 10, "the table's connections to close")
    assert kit.poll() is None


def test_fio_verifies_at_qd32_with_requests_spread_over_multi_conn(make_daemon, image, nbdkit, tmp_path):
    need("fio")
    disk = image("disk.img", 32 * MiB)
    log = tmp_path / "kit.log"
    kit = nbdkit("--filter=log", "file", disk, f"logfile={log}")
    uri = remote(kit.sock)
    # two devices over one URI share its connections (nbdkit's file plugin allows multi-conn)
    d = make_daemon(device("a", f"0 {16 * MiB // S} linear {uri} 0")
                    + device("b", f"0 {16 * MiB // S} linear {uri} {16 * MiB // S}"))
    r = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={d.uri('a')}", "--rw=randwrite", "--bs=4k",
            "--iodepth=32", "--size=8M", "--verify=crc32c", "--verify_fatal=1", timeout=120,
            cwd=tmp_path)  # fio leaves its verify state file in the working directory
    assert "err= 0" in r.stdout, r.stdout
    out = qemu_io(d.uri("b"), "write -P 0x21 0 4k").stdout
    assert "wrote 4096/4096" in out and file_bytes(disk, 16 * MiB, 4096) == b"\x21" * 4096
    text = log.read_text()
    connections = {line.split("connection=")[1].split()[0] for line in text.splitlines() if " Read " in line}
    assert len(connections) == 4, connections  # the reads went over all four connections
    assert text.count("Connect export=") == 4  # and the second device opened none of its own


def test_killed_server_fails_in_flight_io_with_eio_and_io_resumes_when_it_returns(make_daemon, image, nbdkit):
    disk = image("disk.img", 8 * MiB)
    kit = nbdkit("--filter=delay", "file", disk, "rdelay=3")
    sock = kit.sock
    d = make_daemon(device("r", f"0 {8 * MiB // S} linear {remote(sock)} 0"))
    reads = [f"aio_read {i * 64}k 64k" for i in range(32)]
    client = subprocess.Popen(["qemu-io", "-f", "raw", *sum((["-c", c] for c in reads + ["aio_flush"]), []),
                               d.uri("r")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # the 32 reads are in flight at nbdkit, each delayed 3 s
    kit.send_signal(signal.SIGKILL)
    kit.wait()
    out, _ = client.communicate(timeout=30)
    assert out.count("Input/output error") == 32, out
    # while the server is down, new I/O fails at once; the daemon stays up
    t = time.monotonic()
    assert "Input/output error" in qemu_io(d.uri("r"), "read 0 4k", check=False).stdout
    assert time.monotonic() - t < 5
    assert d.proc.poll() is None
    nbdkit("file", disk, sock=sock)  # back on the same socket: no command needed
    with open(disk, "r+b") as f:
        f.write(b"\x42" * 4096)
    wait_for(lambda: "read 4096/4096" in qemu_io(d.uri("r"), "read -P 0x42 0 4k", check=False).stdout,
          15, "I/O through the restarted nbdkit")
    assert "lost: server closed the connection" in d.log.read_text()
    assert "reconnected" in d.log.read_text()


def test_a_hung_server_times_out_and_the_connection_comes_back(make_daemon, image, nbdkit):
    disk = image("disk.img", 8 * MiB)
    kit = nbdkit("--filter=delay", "file", disk, "rdelay=60")  # reads hang, writes do not
    d = make_daemon(device("r", f"0 {8 * MiB // S} linear {remote(kit.sock, timeout=1, connections=1)} 0"))
    t = time.monotonic()
    out = qemu_io(d.uri("r"), "read 0 4k", check=False).stdout
    assert "Input/output error" in out and time.monotonic() - t < 10
    assert "no reply in 1 s" in d.log.read_text()
    wait_for(lambda: "wrote 4096/4096" in qemu_io(d.uri("r"), "write -P 0x11 0 4k", check=False).stdout,
          15, "a write after the reconnect")
    assert file_bytes(disk, 0, 4096) == b"\x11" * 4096


def test_read_errors_of_the_server_reach_the_client(make_daemon, image, nbdkit, tmp_path):
    disk = image("disk.img", 8 * MiB)
    trigger = tmp_path / "trigger"
    kit = nbdkit("--filter=error", "file", disk, "error=ENOSPC", "error-pread-rate=100%",
                 f"error-pread-file={trigger}")
    d = make_daemon(device("r", f"0 {8 * MiB // S} linear {remote(kit.sock)} 0"))
    assert "read 4096/4096" in qemu_io(d.uri("r"), "read 0 4k").stdout
    trigger.touch()
    out = qemu_io(d.uri("r"), "read 0 4k", check=False).stdout
    assert "No space left on device" in out, out  # a storage error passes through as itself
    trigger.unlink()
    assert "read 4096/4096" in qemu_io(d.uri("r"), "read 0 4k").stdout  # the connection stayed


def test_bad_and_unreachable_uris_are_refused_at_table_load(make_daemon, image, tmp_path):
    d = make_daemon(device("z", "0 8 zero"))
    r = d.cli("load", "z", "0 8 linear nbd+unix:///disk 0", check=False)
    assert r.returncode != 0 and "nbd+unix:///disk: nbd+unix:// needs ?socket=PATH" in r.stderr, r.stderr
    missing = tmp_path / "nobody.sock"
    r = d.cli("load", "z", f"0 8 linear nbd+unix:///disk?socket={missing} 0", check=False)
    assert r.returncode != 0 and f"cannot connect to {missing}: No such file or directory" in r.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text(device("r", "0 8 linear nbd://host:http/disk 0"))
    r = d.cli("check-config", str(cfg), check=False)
    assert r.returncode == 1 and "nbd://host:http/disk: port in 'host:http' is not a number" in r.stderr
    cfg.write_text(device("r", f"0 8 linear nbd+unix:///disk?socket={missing} 0"))
    assert d.cli("check-config", str(cfg)).returncode == 0  # the form only: the server may start later


def test_qemu_nbd_export_with_its_holes_in_block_status(make_daemon, image, tmp_path):
    need("qemu-nbd", "nbdinfo")
    disk = image("disk.img", 8 * MiB)
    with open(disk, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\x99" * MiB)
    sock = str(tmp_path / "qemu.sock")
    qemu = subprocess.Popen(["qemu-nbd", "-k", sock, "-f", "raw", "--shared=4", "--persistent", "--cache=none", disk],
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(sock), 10, "qemu-nbd to listen")
        d = make_daemon(device("q", f"0 {8 * MiB // S} linear {remote(sock)} 0"))
        extents = json.loads(run("nbdinfo", "--map", "--json", d.uri("q")).stdout)
        data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
        assert data == [(2 * MiB, MiB)], extents
        out = qemu_io(d.uri("q"), "write -P 0x17 5M 8k", "read -P 0x99 2M 1M", "flush").stdout
        assert "Pattern verification failed" not in out
        assert file_bytes(disk, 5 * MiB, 8192) == b"\x17" * 8192
    finally:
        qemu.kill()
        qemu.wait()


def test_requests_over_the_servers_maximum_are_split_and_its_minimum_is_advertised(make_daemon, image, nbdkit):
    need("nbdinfo")
    disk = image("disk.img", 8 * MiB)
    kit = nbdkit("--filter=blocksize-policy", "file", disk, "blocksize-minimum=4096",
                 "blocksize-maximum=65536", "blocksize-error-policy=error")
    d = make_daemon(device("r", f"0 {8 * MiB // S} linear {remote(kit.sock)} 0"))
    out = qemu_io(d.uri("r"), "write -P 0x6e 1M 1M", "read -P 0x6e 1M 1M").stdout
    assert "Pattern verification failed" not in out and "read 1048576/1048576" in out
    assert file_bytes(disk, MiB, MiB) == b"\x6e" * MiB
    info = json.loads(run("nbdinfo", "--json", d.uri("r")).stdout)["exports"][0]
    assert info["block_size_minimum"] == 4096


def test_the_device_tells_callers_path_errors_by_errno(image, nbdkit):
    """What multipath and mirror see below them: ECONNRESET for requests in flight on a
    dropped connection, ENOTCONN at once while down, ETIMEDOUT for a server that stopped
    answering; `failed` says why while no connection is up."""
    disk = image("disk.img", 4 * MiB)

    def read(dev, n=1, meanwhile=None):
        """The errnos of n 4 KiB reads, in completion order."""
        done, finished = [], threading.Event()

        def end(io):
            done.append(io.error)
            if len(done) == n:
                finished.set()

        for i in range(n):
            dev.submit(bio.IO(bio.READ, i * 4096, 4096, bytearray(4096), 0, end))
        if meanwhile:
            meanwhile()
        assert finished.wait(20), done
        return done

    # nbdkit (1.32) can die of an assertion (raw_send_socket: sock >= 0) when a connection
    # closes while its delayed reply is being sent, as the timed-out ones here do: the
    # timeouts get a server of their own
    slow = nbdkit("--filter=delay", "file", disk, "rdelay=2")
    dev = nbd_client.pool.get(remote(slow.sock, timeout=0.5))
    try:
        assert dev.failed is None and dev.connections == 4
        assert read(dev, 8) == [errno.ETIMEDOUT] * 8  # rdelay 2 s > timeout 0.5 s
    finally:
        nbd_client.pool.put(dev)
    kit = nbdkit("--filter=delay", "file", disk, "rdelay=2")
    dev = nbd_client.pool.get(remote(kit.sock))
    try:
        assert read(dev, 8, meanwhile=lambda: (time.sleep(0.5), kit.kill())) == [errno.ECONNRESET] * 8
        wait_for(lambda: dev.failed, 5, "the device to notice")
        t = time.monotonic()
        assert read(dev) == [errno.ENOTCONN] and time.monotonic() - t < 0.5
        nbdkit("file", disk, sock=kit.sock)
        wait_for(lambda: dev.failed is None, 10, "the reconnect")
        assert read(dev) == [0]
    finally:
        nbd_client.pool.put(dev)


def test_zeroes_and_discards_reach_the_servers_file(make_daemon, image, nbdkit):
    disk = image("disk.img", 8 * MiB)
    with open(disk, "r+b") as f:
        f.write(b"\xee" * (2 * MiB))
    kit = nbdkit("file", disk)
    d = make_daemon(device("r", f"0 {8 * MiB // S} linear {remote(kit.sock)} 0"))
    qemu_io(d.uri("r"), "write -z 0 64k", "write -z -u 1M 64k", "discard 512k 64k", "flush")
    assert file_bytes(disk, 0, 65536) == bytes(65536)
    assert file_bytes(disk, MiB, 65536) == bytes(65536)
    assert file_bytes(disk, 512 * 1024, 65536) == bytes(65536)  # nbdkit's file plugin punches it
    assert file_bytes(disk, 64 * 1024, 4096) == b"\xee" * 4096


def test_a_server_without_structured_replies(make_daemon, image, nbdkit):
    need("nbdinfo")
    disk = image("disk.img", 8 * MiB)
    with open(disk, "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"\x31" * MiB)
    kit = nbdkit("--no-sr", "file", disk)  # simple replies only, so no base:allocation either
    d = make_daemon(device("r", f"0 {8 * MiB // S} linear {remote(kit.sock)} 0"))
    out = qemu_io(d.uri("r"), "aio_read -P 0x31 3M 512k", "aio_read -P 0x31 3584k 512k", "aio_read -P 0 0 1M",
                  "aio_flush").stdout
    assert "Pattern verification failed" not in out and out.count("read ") == 3, out
    extents = json.loads(run("nbdinfo", "--map", "--json", d.uri("r")).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [(0, 8 * MiB, 0)]  # all data


def test_fua_on_a_server_without_fua_is_a_write_then_a_flush(make_daemon, image, nbdkit, tmp_path):
    disk = image("disk.img", 8 * MiB)
    log = tmp_path / "kit.log"
    kit = nbdkit("--filter=log", "--filter=fua", "file", disk, f"logfile={log}")  # fua: none advertised
    d = make_daemon(device("r", f"0 {8 * MiB // S} linear {remote(kit.sock, connections=1)} 0"))
    assert "wrote 4096/4096" in qemu_io(d.uri("r"), "write -f -P 0x19 0 4k").stdout
    calls = [line.split(" ", 3)[3] for line in log.read_text().splitlines() if " connection=" in line and line.endswith(" ...")]
    # the write, our flush, then qemu-io's own flush as it exits
    assert [c.split()[0] for c in calls] == ["Write", "Flush", "Flush"] and "fua=0" in calls[0], calls
    assert file_bytes(disk, 0, 4096) == b"\x19" * 4096
