"""ramback: a RAM disk backed by a real disk, driven through a real daemon with real clients.

Helpers used by the other test_ramback_* files live here too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time

import pytest
from conftest import config_text, device, need, run, nbd_python

from appliance.targets.ramback.store import default_dir

CHUNK = 4096


# ---- helpers ---------------------------------------------------------------------------


def nbd_script(body, *args, timeout=120, background=False, **kw):
    """Run `body` (it gets `nbd`, `sys`, `os`, `struct`, `json`, `time`, `random` and argv)."""
    code = "import nbd, sys, os, struct, json, time, random\n" + textwrap.dedent(body)
    cmd = [nbd_python(), "-c", code, *map(str, args)]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    return run(*cmd, timeout=timeout, **kw).stdout


READ_ALL = """
h = nbd.NBD(); h.connect_uri(sys.argv[1])
size = h.get_size()
with open(sys.argv[2], "wb") as f:
    for off in range(0, size, 1 << 20):
        f.write(h.pread(min(1 << 20, size - off), off))
"""

WRITE = """
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for spec in sys.argv[2:]:
    off, path = spec.split(":")
    h.pwrite(open(path, "rb").read(), int(off))
h.flush()
"""


def device_bytes(d, name, tmp_path):
    out = tmp_path / f"{name}.read"
    nbd_script(READ_ALL, d.uri(name), out)
    return out.read_bytes()


def write_at(d, name, tmp_path, writes):
    """writes: [(offset, bytes)], one connection, in order, then FLUSH."""
    specs = []
    for i, (off, data) in enumerate(writes):
        p = tmp_path / f"w{i}.bin"
        p.write_bytes(data)
        specs.append(f"{off}:{p}")
    nbd_script(WRITE, d.uri(name), *specs)


def ask(d, cmd, **kw):
    """The control socket, in-process (the CLI's start-up costs a second a call)."""
    from appliance.control import call

    return call(d.control, cmd, timeout=120, **kw)


def message(d, *words, name="rb"):
    return ask(d, "message", name=name, sector=0, words=list(words))["result"]


def rb_status(d, name="rb"):
    return ask(d, "status", name=name)["devices"][0]["segments"][0]["status"]


def wait_for(d, ok, name="rb", timeout=20, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = rb_status(d, name)
        if ok(s):
            return s
        time.sleep(step)
    raise AssertionError(f"{name} never got there in {timeout}s: {rb_status(d, name)}")


def random_file(path, size, seed=1):
    import random

    r = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(r.randbytes(n))
            left -= n
    return str(path)


def store_data(path):
    """The data area of a RAM store file, read straight from the file (not through the daemon)."""
    from appliance.targets.ramback.store import _decode

    with open(path, "rb") as f:
        h = _decode(f.read(4096))
        f.seek(h["data_offset"])
        return f.read(h["length"])


# ---- tests -------------------------------------------------------------------------------


def test_a_fresh_ramback_loads_backing_and_reports_the_seed_fields(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", 8 << 20)
    d = make_daemon(device("rb", f"0 16384 ramback - {img}"))
    s = wait_for(d, lambda s: s["populated"])
    for key in ("mode", "mode_reason", "populated", "chunks", "loaded", "stored", "dirty", "inflight", "dirty_bytes",
                "flush_bandwidth", "drain_eta_seconds", "dirty_limit_bytes", "dirty_limit_reason",
                "populate_progress", "populate_eta_seconds"):
        assert key in s, key
    assert s["mode"] == "writethrough" and "no UPS" in s["mode_reason"]
    assert s["chunks"] == s["loaded"] == (8 << 20) // CHUNK
    assert device_bytes(d, "rb", tmp_path) == open(img, "rb").read()
    line = d.cli("status").stdout
    assert "mode=writethrough" in line and "populated=yes" in line


def test_writethrough_writes_are_on_backing_when_acknowledged(make_daemon, tmp_path):
    need("qemu-io")
    img = random_file(tmp_path / "back.img", 4 << 20)
    d = make_daemon(device("rb", f"0 8192 ramback - {img}"))
    wait_for(d, lambda s: s["populated"])
    # unaligned: partial chunks at both ends
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000 20000", d.uri("rb")).stdout
    assert "wrote" in out
    with open(img, "rb") as f:  # no FLUSH, no drain: the write itself went through
        f.seek(1000)
        assert f.read(20000) == b"\x5a" * 20000
    assert rb_status(d)["dirty"] == 0


def test_modes_limits_and_flush_by_message(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", 4 << 20)
    d = make_daemon(device("rb", f"0 8192 ramback - {img} max_dirty=2M"))
    wait_for(d, lambda s: s["populated"])
    assert message(d, "writeback") == "mode writeback"
    assert rb_status(d)["dirty_limit_bytes"] == 2 << 20
    assert "max_dirty=2M" in ask(d, "table", name="rb")["table"][0]  # the table round-trips
    assert "1048576 bytes" in message(d, "max_dirty", "1M")
    s = rb_status(d)
    assert s["dirty_limit_bytes"] == 1 << 20 and s["mode"] == "writeback"
    message(d, "max_dirty", "10s")
    assert "10s" in rb_status(d)["dirty_limit_reason"]
    write_at(d, "rb", tmp_path, [(4096 * 7, os.urandom(300000))])
    assert message(d, "flush") == "clean"
    assert rb_status(d)["dirty"] == 0
    assert open(img, "rb").read() == device_bytes(d, "rb", tmp_path)
    assert message(d, "writethrough") == "mode writethrough"


BAD = [
    ("-", "ramback takes <ram> <backing>"),
    ("- IMG chunk=1000", "power of two"),
    ("- IMG chunk=2048", "from 4096 bytes"),
    ("- IMG max_dirty=lots", "is not a size"),
    ("- IMG max_dirty=0s", "more than 0 seconds"),
    ("- IMG sync=disk", "sync=disk must be ram or backing"),
    ("- IMG colour=blue", "unknown ramback option"),
    ("- IMG chunk=4096 chunk=8192", "given twice"),
    ("- IMG on_mismatch=ignore", "on_mismatch=ignore must be refuse or discard"),
    ("- TMP/none.img", "no such file"),
    ("- SMALL", "too small"),
    ("TMP/notastore IMG", "not a ramback store"),
]


def test_bad_arguments_are_refused_with_a_clear_error(make_daemon, tmp_path):
    from appliance.control import ControlError

    img = random_file(tmp_path / "back.img", 1 << 20)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    (tmp_path / "notastore").write_bytes(b"precious data")
    d = make_daemon(device("base", f"0 2048 linear {img} 0"))
    for args, error in BAD:
        args = args.replace("TMP", str(tmp_path)).replace("SMALL", str(small)).replace("IMG", img)
        with pytest.raises(ControlError) as e:
            ask(d, "load", name="base", table=[f"0 2048 ramback {args}"])
        assert error in str(e.value), (args, str(e.value))
    assert (tmp_path / "notastore").read_bytes() == b"precious data"
    for words, error in ((["fast"], "unknown ramback message"), (["max_dirty", "lots"], "not a size")):
        ask(d, "load", name="base", table=[f"0 2048 ramback - {img}"])
        ask(d, "resume", name="base")
        with pytest.raises(ControlError) as e:
            message(d, *words, name="base")
        assert error in str(e.value)


@pytest.mark.parametrize("chunk", [4096, 65536])
def test_one_chunk_and_one_sector(make_daemon, tmp_path, chunk):
    size = chunk + 512
    img = random_file(tmp_path / "back.img", size, seed=chunk)
    model = bytearray(open(img, "rb").read())
    d = make_daemon(device("rb", f"0 {size // 512} ramback - {img} chunk={chunk}"))
    wait_for(d, lambda s: s["populated"])
    assert rb_status(d)["chunks"] == 2
    writes = [(512, os.urandom(1024)), (chunk - 512, os.urandom(1024)), (chunk, os.urandom(512))]
    write_at(d, "rb", tmp_path, writes[:1])  # writethrough
    message(d, "writeback")
    write_at(d, "rb", tmp_path, writes[1:])
    for off, data in writes:
        model[off : off + len(data)] = data
    assert device_bytes(d, "rb", tmp_path) == model
    assert message(d, "flush") == "clean"
    assert open(img, "rb").read() == model
    assert store_data(rb_status(d)["store"]) == model


def test_populate_serves_reads_and_writes_while_loading(make_daemon, tmp_path):
    """Backing behind 300 ms of read delay: populate takes seconds, and I/O goes on meanwhile."""
    import json

    size = 64 << 20
    img = random_file(tmp_path / "back.img", size, seed=7)
    original = open(img, "rb").read()
    sectors = size // 512
    d = make_daemon(
        device("slow", f"0 {sectors} delay {img} 0 300 {img} 0 0", export=False)
        + device("rb", f"0 {sectors} ramback - @slow")
    )
    message(d, "writeback")
    client = nbd_script(
        """
        h = nbd.NBD(); h.connect_uri(sys.argv[1])
        rnd = random.Random(3)
        size = h.get_size()
        out = []
        for i in range(16):
            off = rnd.randrange(0, size - 70000) // 512 * 512
            n = rnd.choice([512, 4096, 5000, 65536])
            if i % 2:
                data = rnd.randbytes(n)
                h.pwrite(data, off)
                out.append(("w", off, data.hex()))
            else:
                out.append(("r", off, h.pread(n, off).hex()))
        json.dump(out, open(sys.argv[2], "w"))
        """,
        d.uri("rb"),
        tmp_path / "ops.json",
        background=True,
    )
    samples = []
    while client.poll() is None:
        samples.append(rb_status(d))
        time.sleep(0.05)
    out, _ = client.communicate()
    assert client.returncode == 0, out
    loading = [s for s in samples if not s["populated"] and 0 < s["populate_progress"] < 1]
    assert loading, "populate finished before the client did anything"
    assert all(s["populate_eta_seconds"] is None or s["populate_eta_seconds"] > 0 for s in loading)
    model = bytearray(original)
    for kind, off, hexdata in json.loads((tmp_path / "ops.json").read_text()):
        data = bytes.fromhex(hexdata)
        if kind == "r":
            assert data == bytes(model[off : off + len(data)]), f"read at {off} during populate"
        else:
            model[off : off + len(data)] = data
    wait_for(d, lambda s: s["populated"], timeout=30)
    assert device_bytes(d, "rb", tmp_path) == model
    assert message(d, "flush") == "clean"
    assert open(img, "rb").read() == model


def test_two_daemons_with_the_same_device_name_use_different_stores(make_daemon, tmp_path):
    a_img = random_file(tmp_path / "a.img", 1 << 20)
    b_img = random_file(tmp_path / "b.img", 1 << 20)
    a = make_daemon(device("rb", f"0 2048 ramback - {a_img}"), name="a")
    b = make_daemon(device("rb", f"0 2048 ramback - {b_img}"), name="b")
    pa, pb = rb_status(a)["store"], rb_status(b)["store"]
    assert pa != pb and pa.startswith("/dev/shm/") and pb.startswith("/dev/shm/")
    assert os.path.dirname(pa) == default_dir(a.control)


def test_a_store_that_does_not_match_is_refused_and_discarding_it_is_explicit(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", 2 << 20)
    store = tmp_path / "ram.store"
    d = make_daemon(device("rb", f"0 4096 ramback {store} {img} chunk=4096"))
    wait_for(d, lambda s: s["populated"])
    assert d.stop() == 0

    def restart_with(line):
        d.config.write_text(config_text(tmp_path, device("rb", line)))
        d.log.write_text("")
        d.start(expect_ready=False)
        try:
            d.proc.wait(20)
        except subprocess.TimeoutExpired:
            return None
        return d.log.read_text()

    log = restart_with(f"0 4096 ramback {store} {img} chunk=65536")
    assert log is not None and "does not belong to this table: chunk size was 4096, the table says 65536" in log, log
    log = restart_with(f"0 2048 ramback {store} {img} chunk=4096")
    assert log is not None and "device length was 2097152, the table says 1048576" in log, log
    # the same path, another file: the backing's identity is its inode, not its name
    shutil.copy(img, tmp_path / "copy.img")
    os.replace(tmp_path / "copy.img", img)
    log = restart_with(f"0 4096 ramback {store} {img} chunk=4096")
    assert log is not None and "backing was" in log and "inode" in log, log
    # discarding is explicit, and it loads from backing again
    d.config.write_text(config_text(tmp_path, device("rb", f"0 4096 ramback {store} {img} chunk=4096 on_mismatch=discard")))
    d.start()
    s = wait_for(d, lambda s: s["populated"])
    assert s["store_attach"] == "discarded"
    assert "discarding a RAM store that does not match" in d.log.read_text()


def test_a_block_device_backing_is_identified_by_its_device_number(make_daemon, tmp_path):
    need("losetup")
    img = random_file(tmp_path / "back.img", 4 << 20)
    r = run("losetup", "-f", "--show", img, check=False)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    loop = r.stdout.strip()
    try:
        d = make_daemon(device("rb", f"0 8192 ramback {tmp_path}/ram.store {loop}"))
        wait_for(d, lambda s: s["populated"])
        message(d, "writeback")
        data = os.urandom(70000)
        write_at(d, "rb", tmp_path, [(5000, data)])
        assert message(d, "flush") == "clean"
        with open(loop, "rb") as f:
            f.seek(5000)
            assert f.read(70000) == data
        assert d.stop() == 0
    finally:
        run("losetup", "-d", loop, check=False)
    from appliance.targets.ramback.store import _decode

    header = _decode(open(tmp_path / "ram.store", "rb").read(4096))
    assert header["backing_kind"] == 2 and header["backing_rdev"] == os.stat(loop).st_rdev and header["clean"] == 1


def test_a_reload_that_changes_the_table_keeps_the_store_and_the_mode(make_daemon, tmp_path):
    img = random_file(tmp_path / "back.img", 4 << 20)
    d = make_daemon(device("rb", f"0 8192 ramback - {img} max_dirty=8M"))
    wait_for(d, lambda s: s["populated"])
    message(d, "writeback")
    data = os.urandom(200000)
    write_at(d, "rb", tmp_path, [(3000, data)])
    store = rb_status(d)["store"]
    d.config.write_text(config_text(tmp_path, device("rb", f"0 8192 ramback - {img} max_dirty=4M")))
    ask(d, "reload")
    s = rb_status(d)
    assert s["dirty_limit_bytes"] == 4 << 20, s
    assert s["store"] == store and s["mode"] == "writeback" and s["populated"]
    got = device_bytes(d, "rb", tmp_path)
    assert got[3000:203000] == data
    assert message(d, "flush") == "clean"
    assert open(img, "rb").read() == got


def test_direct_io_backing_loads_and_drains_without_bounce_buffers(make_daemon, tmp_path):
    """direct = true: populate reads and flush writes go between the store's memory and the
    O_DIRECT fd through the I/O engine, so every run must be aligned; client writes that are
    not whole chunks included."""
    size = 24 << 20
    img = random_file(tmp_path / "back.img", size, seed=4)
    model = bytearray(open(img, "rb").read())
    d = make_daemon(device("rb", f"0 {size // 512 - 3} ramback - {img}", direct=True))  # a partial last chunk
    s = wait_for(d, lambda s: s["populated"])
    assert s["load_errors"] == 0 and s["populate_seconds"] is not None
    n = size - 3 * 512
    assert device_bytes(d, "rb", tmp_path) == model[:n]
    message(d, "writeback")
    writes = [(1024, os.urandom(20480)), (n - 5120, os.urandom(5120)), (9 << 20, os.urandom(9 << 20))]
    write_at(d, "rb", tmp_path, writes)
    for off, data in writes:
        model[off : off + len(data)] = data
    assert message(d, "flush") == "clean"
    s = rb_status(d)
    assert s["flush_errors"] == 0 and s["dirty"] == 0
    assert open(img, "rb").read() == model
