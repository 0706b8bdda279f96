"""The flakey target (dm-flakey) through a real daemon and real NBD clients."""

from __future__ import annotations

import json


from conftest import need, run, nbdsh_env, device

MiB = 1 << 20
SIZE = 4 * MiB
SECTORS = SIZE // 512


def nbdsh(uri, script, timeout=60):
    need("nbdsh")
    return run("nbdsh", "-u", uri, "-c", script, timeout=timeout, env=nbdsh_env()).stdout


def nbdsh_json(uri, script, timeout=60):
    """Run a script that prints one JSON document as its last line."""
    return json.loads(nbdsh(uri, script, timeout).strip().splitlines()[-1])


def qemu_io(uri, *commands, check=True):
    need("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return run(*args, uri, check=check, timeout=60)


def read_file(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_file(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flakey(make_daemon, image, args, fill=None):
    """A daemon with one device `fl`: `flakey <disk> 0 <args>` over a 4 MiB image."""
    disk = image("flakey.img", SIZE)
    if fill is not None:
        write_file(disk, 0, fill * 65536)
    d = make_daemon(device("fl", f"0 {SECTORS} flakey {disk} 0 {args}"))
    return d, disk


def segment_status(d, name="fl"):
    return d.status(name)["devices"][0]["segments"][0]["status"]


def test_reads_and_writes_pass_through_while_up(make_daemon, image):
    d, disk = flakey(make_daemon, image, "60 1")
    out = qemu_io(d.uri("fl"), "write -P 0x5a 8192 65536", "read -P 0x5a 8192 65536").stdout
    assert "Pattern verification failed" not in out
    assert read_file(disk, 8192, 65536) == b"\x5a" * 65536
    st = segment_status(d)
    assert st["up"] is True and st["failed"] == 0 and st["dropped"] == 0
    assert 0 < st["seconds_to_switch"] <= 60


def test_io_fails_with_eio_while_down_and_recovers_when_up(make_daemon, image):
    # up 1 s, down 1 s: sample reads and writes for a bit over one cycle
    d, disk = flakey(make_daemon, image, "1 1", fill=b"\x11")
    res = nbdsh_json(
        d.uri("fl"),
        """
import errno, json, time
out = []
t0 = time.monotonic()
for _ in range(400):                       # bounded in count and in time
    t = time.monotonic() - t0
    if t > 2.6:
        break
    for name, fn in (("read", lambda: h.pread(4096, 0)), ("write", lambda: h.pwrite(b"\\x11" * 4096, 4096))):
        try:
            fn()
            out.append([name, t, "ok"])
        except nbd.Error as e:
            out.append([name, t, errno.errorcode.get(e.errnum, str(e.errnum))])
    time.sleep(0.02)
print(json.dumps(out))
""",
    )
    for op in ("read", "write"):
        outcomes = {r for name, _, r in res if name == op}
        assert "ok" in outcomes, (op, res)
        assert "EIO" in outcomes, (op, res)
        assert outcomes <= {"ok", "EIO"}, (op, res)
    # failures come in windows, not scattered: count the switches between ok and EIO
    reads = [r for name, _, r in res if name == "read"]
    switches = sum(1 for a, b in zip(reads, reads[1:]) if a != b)
    assert 1 <= switches <= 4, reads
    assert segment_status(d)["failed"] > 0
    assert read_file(disk, 0, 8192) == b"\x11" * 8192  # nothing failed halfway


def test_drop_writes_acknowledges_writes_that_never_reach_the_disk(make_daemon, image):
    # up 0: always down
    d, disk = flakey(make_daemon, image, "0 5 1 drop_writes", fill=b"\xaa")
    out = qemu_io(d.uri("fl"), "write -P 0x55 0 4096", "read -P 0xaa 0 65536").stdout
    assert "wrote 4096/4096" in out
    assert "Pattern verification failed" not in out  # reads pass, and see the old data
    assert read_file(disk, 0, 65536) == b"\xaa" * 65536
    st = segment_status(d)
    assert st["up"] is False and st["dropped"] >= 1 and st["failed"] == 0


def test_error_writes_fails_writes_and_still_serves_reads(make_daemon, image):
    d, disk = flakey(make_daemon, image, "0 5 1 error_writes", fill=b"\xaa")
    res = nbdsh_json(
        d.uri("fl"),
        """
import errno, json
try:
    h.pwrite(b"\\x55" * 4096, 0)
    w = "ok"
except nbd.Error as e:
    w = errno.errorcode.get(e.errnum, str(e.errnum))
print(json.dumps({"write": w, "read": h.pread(4096, 0).hex()}))
""",
    )
    assert res["write"] == "EIO"
    assert bytes.fromhex(res["read"]) == b"\xaa" * 4096
    assert read_file(disk, 0, 4096) == b"\xaa" * 4096
    assert segment_status(d)["failed"] >= 1


def test_corrupt_bio_byte_changes_the_nth_byte_of_each_read(make_daemon, image):
    d, disk = flakey(make_daemon, image, "0 5 5 corrupt_bio_byte 32 r 1 0", fill=b"\xaa")
    res = nbdsh_json(
        d.uri("fl"),
        """
import json
print(json.dumps([h.pread(4096, 0).hex(), h.pread(512, 8192).hex(), h.pread(16, 0).hex()]))
""",
    )
    first, second, short = (bytes.fromhex(x) for x in res)
    expected = bytearray(b"\xaa" * 4096)
    expected[31] = 1
    assert first == bytes(expected)
    assert second == bytes(expected[:512])  # every read, at any offset
    assert short == b"\xaa" * 16  # a read shorter than N bytes is left alone
    assert read_file(disk, 0, 65536) == b"\xaa" * 65536  # the disk is not touched
    assert segment_status(d)["corrupted"] == 2


def test_corrupt_bio_byte_on_writes_corrupts_what_is_stored(make_daemon, image):
    d, disk = flakey(make_daemon, image, "0 5 5 corrupt_bio_byte 1 w 7 0")
    nbdsh(d.uri("fl"), 'h.pwrite(b"\\x55" * 4096, 4096)')
    assert read_file(disk, 4096, 4096) == b"\x07" + b"\x55" * 4095


def test_bad_arguments_are_refused_with_a_message_naming_them(make_daemon, image):
    d, disk = flakey(make_daemon, image, "60 1")
    cases = [
        ("1 1", "takes"),  # too few
        ("x 1 1", "offset"),
        ("0 -1 1", "up_interval"),
        ("0 1 soon", "down_interval"),
        ("0 0 0", "both zero"),
        ("0 1 1 2 drop_writes", "#features"),
        ("0 1 1 12 " + " ".join(["error_reads"] * 12), "#features"),
        ("0 1 1 1 sometimes", "unknown feature 'sometimes'"),
        ("0 1 1 2 drop_writes drop_writes", "duplicated"),
        ("0 1 1 2 drop_writes error_writes", "conflicts"),
        ("0 1 1 3 corrupt_bio_byte 1 r", "corrupt_bio_byte needs 4 arguments"),
        ("0 1 1 5 corrupt_bio_byte 0 r 1 0", "Nth_byte"),
        ("0 1 1 5 corrupt_bio_byte 1 x 1 0", "direction"),
        ("0 1 1 5 corrupt_bio_byte 1 r 256 0", "value"),
        ("0 1 1 5 corrupt_bio_byte 1 r 1 f", "flags"),
        ("0 1 1 6 drop_writes corrupt_bio_byte 1 w 1 0", "drop_writes is incompatible"),
        ("0 1 1 6 error_reads corrupt_bio_byte 1 r 1 0", "error_reads is incompatible"),
    ]
    for args, word in cases:
        line = f"0 {SECTORS} flakey {disk} {args}"
        r = d.cli("load", "fl", line, check=False)
        assert r.returncode != 0, line
        assert "flakey" in r.stderr and word in r.stderr, (line, r.stderr)
    assert d.status("fl")["devices"][0]["inactive_table"] is False
    # and a bad table keeps the daemon from starting at all
    bad = make_daemon(device("fl", f"0 {SECTORS} flakey {disk} 0 1 1 1 sometimes"), name="bad", start=False)
    bad.start(expect_ready=False)
    assert bad.proc.wait(30) != 0
    assert "unknown feature 'sometimes'" in bad.log.read_text()


def test_table_round_trips_through_appliance_table(make_daemon, image):
    disk = image("flakey.img", SIZE)
    tables = {
        f"fl{i}": f"0 {SECTORS - 8} flakey {disk} 8 {args}"
        for i, args in enumerate(
            (
                "3 4",
                "3 4 0",
                "0 7 1 drop_writes",
                "1 2 1 error_writes",
                "1 2 2 error_reads drop_writes",
                "5 5 6 error_writes corrupt_bio_byte 32 r 1 0",
                "5 5 5 corrupt_bio_byte 224 w 0 1",
                "2 3 4 random_read_corrupt 1000 random_write_corrupt 20",
            )
        )
    }
    d = make_daemon("".join(device(name, line) for name, line in tables.items()))
    for name, line in tables.items():
        assert d.cli("table", name).stdout.strip() == line
    # what `table` prints loads back as the same table
    d.cli("load", "fl5", d.cli("table", "fl5").stdout.strip())
    d.cli("resume", "fl5")
    assert d.cli("table", "fl5").stdout.strip() == tables["fl5"]
    st = segment_status(d, "fl0")
    assert set(st) >= {"up", "seconds_to_switch", "failed", "dropped"}
    # up 0: always down, and it never switches
    assert "up=no seconds_to_switch=never" in d.cli("status", "fl2").stdout
