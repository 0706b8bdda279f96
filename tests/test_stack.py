"""Tables with several segments, stacked devices, suspend/resume and live table swaps."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time


from appliance import control
from conftest import REPO, device, need, nbdsh_env, run, wait_for

MiB = 1 << 20
S = 512  # sector


def nbdsh_script(body):
    """argv for nbdsh running `body`, which fills a dict R printed as JSON at the end."""
    need("nbdsh")
    code = "import json, errno, subprocess, time, struct\nR = {}\n" + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(R))\n"
    return ["nbdsh", "-c", code]


def result(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[-1][7:])


def nbdsh(body, timeout=60):
    return result(run(*nbdsh_script(body), timeout=timeout, env=nbdsh_env()).stdout)


def cli_argv(d, *args):
    """The appliance CLI as an argv a script run elsewhere (nbdsh) can call."""
    return [sys.executable, "-m", "appliance", "--config", str(d.config), *args]


def file_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def fill(path, byte, size):
    with open(path, "wb") as f:
        f.write(bytes([byte]) * size)
    return str(path)


# splitting across segments


def split_table(a, b, c):
    """A 4 MiB + 4 KiB device over three files and a zero segment, with odd file offsets."""
    return [
        f"0 {1 * MiB // S} linear {a} {1 * MiB // S}",  # [0, 1M) -> a @ 1M
        f"{1 * MiB // S} {MiB // 2 // S} linear {b} 0",  # [1M, 1.5M) -> b @ 0
        f"{3 * MiB // 2 // S} {MiB // 2 // S} zero",  # [1.5M, 2M) zero
        f"{2 * MiB // S} {2 * MiB // S} linear {c} 100",  # [2M, 4M) -> c @ 100 sectors
        f"{4 * MiB // S} 8 linear {a} 0",  # [4M, 4M+4K) -> a @ 0
    ]


# where each device byte lives: (device start, length, file or None, file offset)
def split_layout(a, b, c):
    return [
        (0, 1 * MiB, a, 1 * MiB),
        (1 * MiB, MiB // 2, b, 0),
        (3 * MiB // 2, MiB // 2, None, 0),
        (2 * MiB, 2 * MiB, c, 100 * S),
        (4 * MiB, 4096, a, 0),
    ]


def check_layout(layout, data, base=0):
    """Every byte of `data` (written at device offset `base`) is in the right file at the right place."""
    end = base + len(data)
    for start, length, path, foff in layout:
        lo, hi = max(base, start), min(end, start + length)
        if lo >= hi:
            continue
        want = data[lo - base : hi - base]
        if path is None:
            continue  # the zero target discards writes
        got = file_bytes(path, foff + lo - start, hi - lo)
        assert got == want, f"device bytes {lo}..{hi} not at {path}+{foff + lo - start}"


def test_a_write_across_segment_boundaries_lands_in_each_file_at_its_offset(make_daemon, image):
    a, b, c = image("a.img", 2 * MiB), image("b.img", 1 * MiB), image("c.img", 3 * MiB)
    d = make_daemon(device("split", *split_table(a, b, c)))
    data = os.urandom(4 * MiB + 4096)
    with open(d.dir / "src.bin", "wb") as f:
        f.write(data)
    # one request over all five segments, another straddling two files unaligned
    r = nbdsh(
        f"""
        h.connect_uri({d.uri("split")!r})
        R["size"] = h.get_size()
        data = open({str(d.dir / "src.bin")!r}, "rb").read()
        h.pwrite(data, 0)
        back = h.pread(len(data), 0)
        expect = data[: {3 * MiB // 2}] + bytes({MiB // 2}) + data[{2 * MiB}:]
        R["read_back"] = back == expect
        h.pwrite(b"\\xab" * 3000, {1 * MiB} - 1000)
        R["straddle"] = h.pread(3000, {1 * MiB} - 1000) == b"\\xab" * 3000
        h.pwrite(b"\\xcd" * 5000, {3 * MiB // 2} - 2500)
        R["into_zero"] = h.pread(5000, {3 * MiB // 2} - 2500) == b"\\xcd" * 2500 + bytes(2500)
        """
    )
    assert r == {"size": 4 * MiB + 4096, "read_back": True, "straddle": True, "into_zero": True}
    final = bytearray(data)
    final[1 * MiB - 1000 : 1 * MiB + 2000] = b"\xab" * 3000
    final[3 * MiB // 2 - 2500 : 3 * MiB // 2 + 2500] = b"\xcd" * 5000
    check_layout(split_layout(a, b, c), bytes(final))
    # nothing outside the mapped ranges was touched
    assert file_bytes(a, 4096, MiB - 4096) == bytes(MiB - 4096)
    assert file_bytes(c, 0, 100 * S) == bytes(100 * S)
    assert file_bytes(c, 100 * S + 2 * MiB, 4096) == bytes(4096)


def test_qemu_io_patterns_across_boundaries_read_back(make_daemon, image):
    need("qemu-io")
    a, b, c = image("a.img", 2 * MiB), image("b.img", 1 * MiB), image("c.img", 3 * MiB)
    d = make_daemon(device("split", *split_table(a, b, c)))
    out = run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        f"write -P 0x31 {MiB - 4096} 8192",
        "-c",
        f"read -P 0x31 {MiB - 4096} 8192",
        "-c",
        f"write -P 0x32 {2 * MiB - 4096} 8192",
        "-c",
        f"read -P 0 {2 * MiB - 4096} 4096",
        "-c",
        f"read -P 0x32 {2 * MiB} 4096",
        "-c",
        f"write -P 0x33 {4 * MiB - 512} 4608",
        "-c",
        f"read -P 0x33 {4 * MiB - 512} 4608",
        d.uri("split"),
    ).stdout
    assert "Pattern verification failed" not in out
    assert file_bytes(a, 2 * MiB - 4096, 4096) == b"\x31" * 4096
    assert file_bytes(b, 0, 4096) == b"\x31" * 4096
    assert file_bytes(c, 100 * S, 4096) == b"\x32" * 4096
    assert file_bytes(c, 100 * S + 2 * MiB - 512, 512) == b"\x33" * 512
    assert file_bytes(a, 0, 4096) == b"\x33" * 4096


# stacked devices


def test_stacked_device_writes_land_in_the_bottom_file(make_daemon, image):
    need("qemu-io", "nbdinfo")
    bottom, other = image("bottom.img", 4 * MiB), image("other.img", 1 * MiB)
    d = make_daemon(
        device("lower", f"0 {2 * MiB // S} linear {bottom} {1 * MiB // S}", f"{2 * MiB // S} {1 * MiB // S} linear {other} 0", export=False)
        + device("upper", f"0 {1 * MiB // S} linear @lower {2 * MiB // S}", f"{1 * MiB // S} {2 * MiB // S} linear @lower 0")
    )
    # upper [0,1M) -> lower [2M,3M) -> other [0,1M); upper [1M,3M) -> lower [0,2M) -> bottom [1M,3M)
    out = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0x51 0 65536",
        "-c", f"write -P 0x52 {MiB - 4096} 8192",
        "-c", f"write -P 0x53 {3 * MiB - 4096} 4096",
        "-c", f"read -P 0x52 {MiB - 4096} 8192",
        d.uri("upper"),
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in out
    assert file_bytes(other, 0, 65536) == b"\x51" * 65536
    assert file_bytes(other, MiB - 4096, 4096) == b"\x52" * 4096
    assert file_bytes(bottom, 1 * MiB, 4096) == b"\x52" * 4096
    assert file_bytes(bottom, 3 * MiB - 4096, 4096) == b"\x53" * 4096
    assert file_bytes(bottom, 0, MiB) == bytes(MiB)

    st = {dev["name"]: dev for dev in d.status()["devices"]}
    assert st["lower"]["holders"] == ["upper"]
    assert st["upper"]["holders"] == []
    assert st["lower"]["exported"] is False and st["upper"]["exported"] is True
    listed = json.loads(run("nbdinfo", "--list", "--json", d.uri()).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["upper"]
    assert run("nbdinfo", d.uri("lower"), check=False).returncode != 0
    assert "linear @lower" in "\n".join(d.cli("table", "upper").stdout.splitlines())


def test_stacked_device_reads_through_every_layer_byte_for_byte(make_daemon, image, tmp_path):
    need("nbdcopy")
    a, b = image("a.img", 2 * MiB), image("b.img", 2 * MiB)
    d = make_daemon(
        device("l1", f"0 {2 * MiB // S} linear {a} 0", f"{2 * MiB // S} {2 * MiB // S} linear {b} 0", export=False)
        + device("l2", f"0 {2 * MiB // S} linear @l1 {2 * MiB // S}", f"{2 * MiB // S} {2 * MiB // S} linear @l1 0", export=False)
        + device("top", f"0 {4 * MiB // S} linear @l2 0")
    )
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4 * MiB))
    run("nbdcopy", str(src), d.uri("top"))
    run("nbdcopy", d.uri("top"), str(tmp_path / "dst.bin"))
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    data = src.read_bytes()
    # top [0,2M) -> l2 [0,2M) -> l1 [2M,4M) -> b; top [2M,4M) -> l1 [0,2M) -> a
    assert open(b, "rb").read() == data[: 2 * MiB]
    assert open(a, "rb").read() == data[2 * MiB :]


def test_reload_refuses_to_drop_a_lower_device_still_referenced_and_keeps_serving(make_daemon, image):
    need("qemu-io")
    bottom = image("bottom.img", 1 * MiB)
    lower = device("lower", f"0 {MiB // S} linear {bottom} 0", export=False)
    d = make_daemon(lower + device("upper", f"0 {MiB // S} linear @lower 0"))
    text = d.config.read_text()
    d.config.write_text(text.replace(lower, ""))
    r = d.cli("reload", check=False)
    assert r.returncode == 1 and "'@lower'" in r.stderr, r.stderr
    d.config.write_text(text)
    assert {dev["name"] for dev in d.status()["devices"]} == {"lower", "upper"}
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x21 0 4096", d.uri("upper")).stdout
    assert file_bytes(bottom, 0, 4096) == b"\x21" * 4096, out


def test_reload_moves_a_device_off_a_lower_one_and_removes_that_in_one_go(make_daemon, image):
    need("qemu-io")
    bottom = image("bottom.img", 1 * MiB)
    lower = device("lower", f"0 {MiB // S} linear {bottom} 0", export=False)
    d = make_daemon(lower + device("upper", f"0 {MiB // S} linear @lower 0"))
    text = d.config.read_text()
    d.config.write_text(text.replace(lower, "").replace("linear @lower 0", f"linear {bottom} 0"))
    r = d.cli("reload", check=False)
    assert r.returncode == 0, r.stderr
    assert {dev["name"] for dev in d.status()["devices"]} == {"upper"}
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x22 4096 4096", d.uri("upper")).stdout
    assert file_bytes(bottom, 4096, 4096) == b"\x22" * 4096, out


# bad tables


BAD_TABLES = [
    (["0 2048 zero", "2048 2048 zero", "5000 100 zero"], 3, "gap"),
    (["0 2048 zero", "2000 2048 zero"], 2, "overlap"),
    (["100 2048 zero"], 1, "gap"),
]


def test_gaps_and_overlaps_are_refused_with_the_line_number(make_daemon, image, tmp_path):
    disk = image("disk.img", 1 * MiB)
    d = make_daemon(device("data0", f"0 {MiB // S} linear {disk} 0"))
    for lines, line_no, words in BAD_TABLES:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(f'[export]\nunix = "{tmp_path}/x.sock"\n' + device("bad", *lines))
        r = subprocess.run([sys.executable, "-m", "appliance", "check-config", str(cfg)], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 1
        assert f"device[0].table[{line_no - 1}]" in r.stderr and words in r.stderr, r.stderr
        # the same table loaded into a running device names the line too, and changes nothing
        r = d.cli("load", "data0", *lines, check=False)
        assert r.returncode == 1
        assert f"line {line_no}" in r.stderr and words in r.stderr, r.stderr
    st = d.status("data0")["devices"][0]
    assert st["inactive_table"] is False and st["size"] == MiB


# suspend and resume


def test_suspend_holds_io_until_resume(make_daemon, image):
    need("qemu-io")
    disk = image("disk.img", 4 * MiB)
    with open(disk, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x77" * 65536)
    d = make_daemon(device("data0", f"0 {4 * MiB // S} linear {disk} 0"))
    d.cli("suspend", "data0")
    assert d.status("data0")["devices"][0]["suspended"] is True
    reader = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", f"read -P 0x77 {MiB} 65536", "-c", f"write -P 0x78 {2 * MiB} 4096", d.uri("data0")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while d.status("data0")["devices"][0]["deferred"] < 1:
            assert reader.poll() is None, "qemu-io finished while the device was suspended"
            assert time.monotonic() < deadline, "the read never reached the device"
            time.sleep(0.1)
        time.sleep(0.5)
        assert reader.poll() is None, "the read completed while the device was suspended"
        assert file_bytes(disk, 2 * MiB, 4096) == bytes(4096)
        d.cli("resume", "data0")
        out, _ = reader.communicate(timeout=20)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, out
    assert "Pattern verification failed" not in out
    assert file_bytes(disk, 2 * MiB, 4096) == b"\x78" * 4096
    st = d.status("data0")["devices"][0]
    assert st["suspended"] is False and st["deferred"] == 0


def test_stopping_the_daemon_while_a_lower_device_is_suspended_finishes_and_keeps_the_held_write(make_daemon, image):
    # teardown goes top-down: the top device's flush reached the suspended one below, which was
    # resumed only after it, and the stop waited for ever (systemd: TimeoutStopSec, then SIGKILL)
    need("qemu-io")
    disk = image("disk.img", 4 * MiB)
    d = make_daemon(device("low", f"0 {4 * MiB // S} linear {disk} 0", export=False)
                    + device("top", f"0 {4 * MiB // S} linear @low 0"))
    d.cli("suspend", "low")
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {MiB} 4096", d.uri("top")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: d.status("low")["devices"][0]["deferred"] >= 1, 15, what="the write to be held")
        d.signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0, d.log.read_text()[-2000:]
        out, _ = writer.communicate(timeout=20)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert file_bytes(disk, MiB, 4096) == b"\x5a" * 4096, out


def test_resuming_a_lower_device_releases_a_suspend_of_the_one_above_it(make_daemon, image):
    # `suspend top` waits for top's write, which is held in the suspended `low`; the resume of
    # `low` must not wait behind that suspend (dm locks each device, not the daemon)
    need("qemu-io")
    disk = image("disk.img", 4 * MiB)
    d = make_daemon(device("low", f"0 {4 * MiB // S} linear {disk} 0", export=False)
                    + device("top", f"0 {4 * MiB // S} linear @low 0"))
    d.cli("suspend", "low")
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P 0x5b {MiB} 4096", d.uri("top")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    suspender = subprocess.Popen(cli_argv(d, "suspend", "top"), cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: d.status("low")["devices"][0]["deferred"] >= 1, 15, what="the write to be held")
        assert d.cli("resume", "low", timeout=15).returncode == 0
        assert suspender.wait(15) == 0, suspender.stdout.read()
        d.cli("resume", "top", timeout=15)
        out, _ = writer.communicate(timeout=20)
        assert "wrote 4096/4096" in out, out
    finally:
        for p in (writer, suspender):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert file_bytes(disk, MiB, 4096) == b"\x5b" * 4096


def test_load_and_resume_swap_the_table_under_a_connected_client(make_daemon, image, tmp_path):
    first = fill(tmp_path / "first.img", 0x11, 2 * MiB)
    second = fill(tmp_path / "second.img", 0x22, 4 * MiB)
    d = make_daemon(device("data0", f"0 {2 * MiB // S} linear {first} 0"))
    load = cli_argv(d, "load", "data0", f"0 {2 * MiB // S} linear {second} {2 * MiB // S}")
    resume = cli_argv(d, "resume", "data0")
    r = nbdsh(
        f"""
        h.connect_uri({d.uri("data0")!r})
        R["before"] = h.pread(4096, 0) == b"\\x11" * 4096
        h.pwrite(b"\\x33" * 4096, 8192)
        subprocess.run({load!r}, cwd={str(REPO)!r}, check=True, timeout=30)
        R["loaded_not_live"] = h.pread(4096, 0) == b"\\x11" * 4096
        subprocess.run({resume!r}, cwd={str(REPO)!r}, check=True, timeout=30)
        R["after"] = h.pread(4096, 0) == b"\\x22" * 4096
        h.pwrite(b"\\x44" * 4096, 8192)
        R["write_after"] = h.pread(4096, 8192) == b"\\x44" * 4096
        R["connected"] = h.aio_is_ready()
        h.shutdown()
        """
    )
    assert r == {"before": True, "loaded_not_live": True, "after": True, "write_after": True, "connected": True}
    assert file_bytes(first, 8192, 4096) == b"\x33" * 4096
    assert file_bytes(second, 2 * MiB + 8192, 4096) == b"\x44" * 4096
    assert d.cli("table", "data0").stdout.split() == ["0", str(2 * MiB // S), "linear", second, str(2 * MiB // S)]
    log = d.log.read_text()
    assert log.count("connected") == 1 and "client sent NBD_CMD_DISC" in log


# reload under load


WRITER = """
import os
import signal
uri, slots, stop, started = {uri!r}, {slots}, {stop!r}, {started!r}
def payload(n):
    return struct.pack(">Q", n) * 512
h.connect_uri(uri)
last = {{}}
errors = []
n = 0
pending = {{}}
first = last_t = None
deadline = time.monotonic() + 40
while time.monotonic() < deadline and (pending or (n < 400000 and not os.path.exists(stop))):
    try:
        while len(pending) < 8 and n < 400000 and not os.path.exists(stop):
            slot = n % slots
            c = h.aio_pwrite(payload(n), slot * 4096)
            pending[c] = (slot, n)
            n += 1
        h.poll(100)
        for c in [c for c in pending if h.aio_command_completed(c)]:
            slot, k = pending.pop(c)
            last[slot] = max(last.get(slot, -1), k)
            t = time.time()
            if first is None:
                first = t
                open(started, "w").close()  # the first write is through
            last_t = t
        time.sleep(0.001)  # a steady stream, not a CPU hog: the reloads need the CPU too
    except nbd.Error as e:
        errors.append(str(e))
        break
h.flush()
bad = [s for s, k in last.items() if h.pread(4096, s * 4096) != payload(k)]
R.update(writes=n, errors=errors, pending=len(pending), first=first, last=last_t, bad_readback=bad[:10], last_by_slot=last)
h.shutdown()
"""


def _run_writer(d, slots):
    stop, started = d.dir / "stop", d.dir / "started"
    argv = nbdsh_script(WRITER.format(uri=d.uri("data0"), slots=slots, stop=str(stop), started=str(started)))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nbdsh_env())
    deadline = time.monotonic() + 20
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.05)
    return proc, stop


def _finish_writer(proc, stop):
    time.sleep(0.5)  # more writes after the last table change
    stop.touch()
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the writer hung:\n{out}\n{err}")
    assert proc.returncode == 0, err
    return result(out)


def _check_writer(r, disk, times):
    assert r["errors"] == [] and r["pending"] == 0
    assert r["bad_readback"] == []
    assert r["writes"] >= 100
    assert r["first"] < times[0] and r["last"] > times[-1], "the writes did not overlap the table changes"
    for slot, k in r["last_by_slot"].items():
        assert file_bytes(disk, int(slot) * 4096, 4096) == struct.pack(">Q", k) * 512, f"write {k} to slot {slot} lost"


def splits(size_sectors, k):
    """Table k of a series: the identity map of one file, cut into k+2 segments at varying places."""
    cuts = sorted({(size_sectors * (i * 37 + k * 11) // (k + 2) // 100 * 8) % size_sectors for i in range(1, k + 2)} - {0})
    bounds = [0] + cuts + [size_sectors]
    return [(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def test_reloading_the_config_ten_times_under_writes_loses_nothing_and_drops_no_client(make_daemon, image):
    need("nbdsh")
    size = 16 * MiB
    disk = image("disk.img", size)
    d = make_daemon(device("data0", f"0 {size // S} linear {disk} 0"))
    proc, stop = _run_writer(d, slots=size // 4096)
    times = []
    try:
        for k in range(10):
            lines = [f"{lo} {n} linear {disk} {lo}" for lo, n in splits(size // S, k)]
            text = d.config.read_text()
            head = text[: text.index("[[device]]")]
            d.config.write_text(head + device("data0", *lines))
            d.cli("reload", timeout=30)
            times.append(time.time())
            time.sleep(0.05)
        assert len(d.cli("table", "data0").stdout.splitlines()) == len(lines)
        assert d.status("data0")["devices"][0]["clients"] == 1
    finally:
        r = _finish_writer(proc, stop)
    _check_writer(r, disk, times)
    log = d.log.read_text()
    assert log.count("reloaded ") == 10
    assert log.count("client sent NBD_CMD_DISC") == 1 and "receive failed" not in log


def test_load_and_resume_ten_times_under_writes_loses_nothing(make_daemon, image):
    need("nbdsh")
    size = 16 * MiB
    disk = image("disk.img", size)
    d = make_daemon(device("data0", f"0 {size // S} linear {disk} 0"))
    proc, stop = _run_writer(d, slots=size // 4096)
    times = []
    try:
        for k in range(10):
            lines = [f"{lo} {n} linear {disk} {lo}" for lo, n in splits(size // S, 9 - k)]
            # the control socket directly, as the CLI does, to keep the loop quick
            control.call(d.control, "load", name="data0", table=lines, timeout=30)
            if k % 2:
                control.call(d.control, "suspend", name="data0", timeout=30)
                time.sleep(0.05)
            control.call(d.control, "resume", name="data0", timeout=30)
            times.append(time.time())
            time.sleep(0.05)
        assert d.status("data0")["devices"][0]["clients"] == 1
    finally:
        r = _finish_writer(proc, stop)
    _check_writer(r, disk, times)
    assert d.status("data0")["devices"][0]["suspended"] is False
