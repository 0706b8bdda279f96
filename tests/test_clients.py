"""Real NBD clients (qemu-io, nbdinfo, nbdcopy, nbdsh) against a running daemon."""

from __future__ import annotations

import json
import os

import pytest

from conftest import need, run, nbdsh_env, device

MiB = 1 << 20


def nbdsh(*args, timeout=60):
    need("nbdsh")
    return run("nbdsh", *args, timeout=timeout, env=nbdsh_env()).stdout


def read_file(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_file(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def qemu_io(uri, *commands, read_only=False, check=True):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in commands:
        args += ["-c", c]
    return run(*args, uri, check=check, timeout=60)


# qemu-io


def test_qemu_io_patterns_land_in_the_backing_file_at_their_offsets(make_daemon, image):
    need("qemu-io")
    disk = image("disk.img", 16 * MiB)
    d = make_daemon(device("data0", f"0 {16 * MiB // 512} linear {disk} 0"))
    writes = [(0x11, 0, 4096), (0x22, 1 * MiB, 65536), (0x33, 5 * MiB + 512, 1536), (0x44, 7 * MiB + 17, 1000), (0x55, 16 * MiB - 4096, 4096)]
    cmds = [f"write -P 0x{p:02x} {o} {n}" for p, o, n in writes]
    cmds += [f"read -P 0x{p:02x} {o} {n}" for p, o, n in writes]
    out = qemu_io(d.uri("data0"), *cmds).stdout
    assert "Pattern verification failed" not in out
    assert out.count("wrote ") == len(writes) and out.count("read ") == len(writes)
    for p, o, n in writes:
        assert read_file(disk, o, n) == bytes([p]) * n, f"pattern 0x{p:02x} at {o}"
    # the bytes around each write are untouched
    assert read_file(disk, 4096, 4096) == bytes(4096)
    assert read_file(disk, 7 * MiB, 17) == bytes(17)


def test_qemu_io_reads_what_is_in_the_backing_file(make_daemon, image):
    need("qemu-io")
    disk = image("disk.img", 8 * MiB)
    write_file(disk, 3 * MiB, b"\xa7" * 8192)
    d = make_daemon(device("data0", f"0 {8 * MiB // 512} linear {disk} 0"))
    out = qemu_io(d.uri("data0"), f"read -P 0xa7 {3 * MiB} 8192", f"read -P 0 {3 * MiB + 8192} 4096").stdout
    assert "Pattern verification failed" not in out


def test_qemu_io_detects_a_wrong_pattern(make_daemon, image):
    """The verification the other tests rely on does fail when the data differs."""
    need("qemu-io")
    disk = image("disk.img", 4 * MiB)
    write_file(disk, 0, b"\x01" * 4096)
    d = make_daemon(device("data0", f"0 {4 * MiB // 512} linear {disk} 0"))
    out = qemu_io(d.uri("data0"), "read -P 0x02 0 4096", check=False)
    assert "Pattern verification failed" in out.stdout + out.stderr


# nbdinfo


def test_nbdinfo_list_shows_every_exported_device_with_its_description(make_daemon, image):
    need("nbdinfo")
    a, b = image("a.img", 4 * MiB), image("b.img", 2 * MiB)
    d = make_daemon(
        device("alpha", f"0 {4 * MiB // 512} linear {a} 0", description="the first one")
        + device("beta", f"0 {2 * MiB // 512} linear {b} 0", read_only=True)
    )
    out = run("nbdinfo", "--list", d.uri()).stdout
    assert "alpha" in out and "beta" in out
    assert "the first one" in out


def test_nbdinfo_json_reports_names_sizes_read_only_description_and_block_sizes(make_daemon, image):
    need("nbdinfo")
    a, b = image("a.img", 4 * MiB), image("b.img", 2 * MiB)
    d = make_daemon(
        device("alpha", f"0 {4 * MiB // 512} linear {a} 0", description="the first one")
        + device("beta", f"0 {1 * MiB // 512} linear {b} 0", read_only=True)
    )
    info = json.loads(run("nbdinfo", "--list", "--json", d.uri()).stdout)
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"alpha", "beta"}
    assert info["structured"] is True
    alpha, beta = exports["alpha"], exports["beta"]
    assert alpha["export-size"] == 4 * MiB
    assert beta["export-size"] == 1 * MiB
    assert alpha["is_read_only"] is False and beta["is_read_only"] is True
    assert alpha["description"] == "the first one"
    assert "description" not in beta or beta["description"] == ""
    for e in (alpha, beta):
        assert e["block_size_minimum"] == 1
        assert e["block_size_preferred"] == 4096
        assert e["block_size_maximum"] == 64 * MiB
        assert "base:allocation" in e["contexts"]
        assert e["can_flush"] is True and e["can_multi_conn"] is True
    # write features are hidden on the read-only export
    assert alpha["can_trim"] and alpha["can_zero"] and alpha["can_fua"]
    assert not beta["can_trim"] and not beta["can_zero"] and not beta["can_fua"]
    # one export, by name
    one = json.loads(run("nbdinfo", "--json", d.uri("beta")).stdout)
    assert one["exports"][0]["export-size"] == 1 * MiB


def test_direct_device_advertises_its_sector_as_minimum_block_size(make_daemon, image):
    need("nbdinfo")
    disk = image("disk.img", 4 * MiB)
    d = make_daemon(device("data0", f"0 {4 * MiB // 512} linear {disk} 0", direct=True))
    info = json.loads(run("nbdinfo", "--json", d.uri("data0")).stdout)["exports"][0]
    if info["block_size_minimum"] == 1:
        pytest.skip("the file system here does not support O_DIRECT")
    assert info["block_size_minimum"] == 512


def test_unknown_export_name_is_refused(make_daemon, image):
    need("nbdinfo")
    disk = image("disk.img", 1 * MiB)
    d = make_daemon(device("data0", f"0 {1 * MiB // 512} linear {disk} 0"))
    r = run("nbdinfo", d.uri("nosuch"), check=False)
    assert r.returncode != 0
    # and the daemon still answers
    run("nbdinfo", d.uri("data0"))


# nbdcopy


def _random_file(path, size, chunks):
    """A file of `size` bytes with random data in a few places (and holes elsewhere)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in chunks:
            f.seek(off)
            f.write(os.urandom(n))
    return path


def test_nbdcopy_round_trip_is_byte_identical(make_daemon, image, tmp_path):
    need("nbdcopy")
    disk = image("disk.img", 16 * MiB)
    d = make_daemon(device("data0", f"0 {16 * MiB // 512} linear {disk} 0"))
    src = _random_file(tmp_path / "src.bin", 16 * MiB, [(0, 3 * MiB), (5 * MiB + 123, 777777), (15 * MiB, 1 * MiB)])
    dst = tmp_path / "dst.bin"
    run("nbdcopy", str(src), d.uri("data0"))
    run("nbdcopy", d.uri("data0"), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert open(disk, "rb").read() == src.read_bytes()


def test_nbdcopy_with_four_connections_round_trip_is_byte_identical(make_daemon, image, tmp_path):
    need("nbdcopy")
    disk = image("disk.img", 32 * MiB)
    d = make_daemon(device("data0", f"0 {32 * MiB // 512} linear {disk} 0"))
    src = _random_file(tmp_path / "src.bin", 32 * MiB, [(i * 2 * MiB, MiB + 4096 * i) for i in range(16)])
    dst = tmp_path / "dst.bin"
    run("nbdcopy", "--connections=4", "--requests=8", str(src), d.uri("data0"))
    run("nbdcopy", "--connections=4", "--requests=8", d.uri("data0"), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert open(disk, "rb").read() == src.read_bytes()


def test_nbdcopy_overwrites_old_data_with_the_source_holes(make_daemon, image, tmp_path):
    """A copy of a sparse file over a full export leaves zeros where the source has holes."""
    need("nbdcopy")
    disk = image("disk.img", 8 * MiB)
    write_file(disk, 0, b"\xff" * (8 * MiB))
    d = make_daemon(device("data0", f"0 {8 * MiB // 512} linear {disk} 0"))
    src = _random_file(tmp_path / "src.bin", 8 * MiB, [(2 * MiB, MiB)])
    run("nbdcopy", str(src), d.uri("data0"))
    assert open(disk, "rb").read() == src.read_bytes()


# read-only devices


def test_read_only_device_refuses_writes_with_eperm_and_serves_reads(make_daemon, image):
    need("qemu-io")
    disk = image("ro.img", 4 * MiB)
    write_file(disk, 0, b"\x3c" * 65536)
    d = make_daemon(device("ro", f"0 {4 * MiB // 512} linear {disk} 0", read_only=True))
    out = qemu_io(d.uri("ro"), "read -P 0x3c 0 65536", read_only=True).stdout
    assert "Pattern verification failed" not in out
    # qemu refuses to open a read-only export for writing at all
    r = qemu_io(d.uri("ro"), "write -P 0x01 0 4096", check=False)
    assert r.returncode != 0
    # a client that sends the writes anyway gets EPERM for each kind of write
    out = nbdsh(
        "-u",
        d.uri("ro"),
        "-c",
        """
import errno
h.set_strict_mode(0)
assert h.is_read_only()
for name, fn in (("write", lambda: h.pwrite(b"x" * 4096, 0)),
                 ("write_fua", lambda: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)),
                 ("trim", lambda: h.trim(4096, 0)),
                 ("zero", lambda: h.zero(4096, 0))):
    try:
        fn()
        print(name, "succeeded")
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errnum))
assert h.pread(4, 0) == b"\\x3c" * 4
h.flush()
print("still connected")
""",
    )
    for name in ("write", "write_fua", "trim", "zero"):
        assert f"{name} EPERM" in out, out
    assert "still connected" in out
    assert read_file(disk, 0, 65536) == b"\x3c" * 65536


# the default export


def test_default_export_name_reaches_the_first_device(make_daemon, image):
    need("qemu-io", "nbdinfo")
    first, second = image("first.img", 4 * MiB), image("second.img", 2 * MiB)
    write_file(first, 0, b"\x0f" * 4096)
    write_file(second, 0, b"\xf0" * 4096)
    d = make_daemon(device("first", f"0 {4 * MiB // 512} linear {first} 0") + device("second", f"0 {2 * MiB // 512} linear {second} 0"))
    out = qemu_io(d.uri(""), "read -P 0x0f 0 4096", "write -P 0x77 8192 4096").stdout
    assert "Pattern verification failed" not in out
    assert read_file(first, 8192, 4096) == b"\x77" * 4096
    assert read_file(second, 8192, 4096) == bytes(4096)
    info = json.loads(run("nbdinfo", "--json", d.uri("")).stdout)["exports"][0]
    assert info["export-size"] == 4 * MiB


# block status


def test_nbdinfo_map_shows_holes_of_a_sparse_image_and_data_where_written(make_daemon, image):
    need("nbdinfo", "qemu-io")
    disk = image("sparse.img", 16 * MiB)
    d = make_daemon(device("data0", f"0 {16 * MiB // 512} linear {disk} 0"))
    before = json.loads(run("nbdinfo", "--map", "--json", d.uri("data0")).stdout)
    assert sum(e["length"] for e in before) == 16 * MiB
    assert all(e["type"] == 3 for e in before), before  # all hole, reads as zero
    qemu_io(d.uri("data0"), f"write -P 0x99 {4 * MiB} {1 * MiB}", f"write -P 0x98 {12 * MiB} {2 * MiB}")
    after = json.loads(run("nbdinfo", "--map", "--json", d.uri("data0")).stdout)
    assert sum(e["length"] for e in after) == 16 * MiB

    def kind_at(offset):
        for e in after:
            if e["offset"] <= offset < e["offset"] + e["length"]:
                return e["type"]
        raise AssertionError(f"no extent covers {offset}")

    for off in (4 * MiB, 5 * MiB - 1, 12 * MiB, 14 * MiB - 1):
        assert kind_at(off) == 0, (off, after)  # data
    for off in (0, 3 * MiB, 8 * MiB, 15 * MiB):
        assert kind_at(off) == 3, (off, after)  # hole
    text = run("nbdinfo", "--map", d.uri("data0")).stdout
    assert "data" in text and "hole" in text


def test_nbdinfo_map_reports_a_zero_segment_as_a_hole(make_daemon, image):
    need("nbdinfo")
    disk = image("disk.img", 4 * MiB)
    write_file(disk, 0, b"\x01" * (4 * MiB))
    d = make_daemon(device("data0", f"0 {4 * MiB // 512} linear {disk} 0", f"{4 * MiB // 512} {4 * MiB // 512} zero"))
    ext = json.loads(run("nbdinfo", "--map", "--json", d.uri("data0")).stdout)
    assert ext == [
        {"offset": 0, "length": 4 * MiB, "type": 0, "description": "data"},
        {"offset": 4 * MiB, "length": 4 * MiB, "type": 3, "description": "hole,zero"},
    ]
