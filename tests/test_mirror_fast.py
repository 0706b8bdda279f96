"""mirror's compiled paths: writes to regions whose marks are durable are fanned out to every
leg by the NBD loop, and reads of regions in sync are served by it from one leg. Real legs (files, a full tmpfs), real clients (fio, nbdsh), the
daemon's own system calls (strace)."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from conftest import device, nbdsh_env, need, qemu_io, run, wait_for
from test_mirror import MiB, fio, in_sync, mirror_line, mstatus, read_file


def nbdsh(uri, code):
    need("nbdsh")
    return run("nbdsh", "-u", uri, "-c", code, env=nbdsh_env())


def test_random_writes_go_the_fast_path_and_land_on_both_legs(make_daemon, image, tmp_path):
    a, b = image("a.img", 16 * MiB), image("b.img", 16 * MiB)
    logdev = image("log.img", MiB)
    d = make_daemon(device("m", mirror_line(16 * MiB, [a, b], log=f"disk 3 {logdev} 2048 nosync")))
    r = fio(d.uri("m"), tmp_path, "--rw=randwrite")
    assert "err= 0" in r.stdout, r.stdout
    st = mstatus(d)
    # 2048 writes over 8 regions: all but the first few of each region skip Python
    assert st["fast_writes"] > 1500 and st["fast_writes_failed"] == 0, st
    assert read_file(a) == read_file(b)
    # the idle regions come back from the fast path and their marks are cleared
    wait_for(lambda: read_file(logdev, 4096, 2) == bytes(2), 10, "the lazy clears")


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = run("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt), check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    run("umount", "-l", str(mnt), check=False)  # lazily: the daemon may still hold a leg there


def test_a_leg_that_fails_a_fast_write_is_failed_and_the_write_succeeds(make_daemon, image, small_tmpfs):
    a = image("a.img", 8 * MiB)
    b = small_tmpfs / "b.img"
    with open(b, "wb") as f:
        f.truncate(8 * MiB)  # sparse: a write to a new block needs room the tmpfs will not have
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b])))
    filler = small_tmpfs / "filler"
    # region 0's first write marks it (the slow path), the second is fast; then b's file system
    # is full, and the third, fast too, fails on b
    nbdsh(d.uri("m"), "h.pwrite(b'\\x01' * 4096, 0); h.pwrite(b'\\x01' * 4096, 4096)\n"
          f"try:\n    open('{filler}', 'wb').write(bytes({4 * MiB}))\nexcept OSError:\n    pass\n"
          f"h.pwrite(b'\\x02' * 4096, {512 * 1024})")
    st = mstatus(d)
    assert st["fast_writes"] == 1 and st["fast_writes_failed"] == 1, st
    assert st["legs"][1]["state"] == "dead" and st["legs"][1]["why"] == "write failed: ENOSPC", st["legs"]
    assert read_file(a, 512 * 1024, 4096) == b"\x02" * 4096
    assert st["legs"][0]["state"] == "alive"


def _trace(lines, fds):
    """(events, leg writes) from strace -f output: events [(line, kind, fd, offset)] where kind
    is 'write' at a call's start and 'synced' at an fdatasync's successful end."""
    started = {}
    events = []
    call = re.compile(r"^(\d+)\s+(pwrite64|pwritev2?|fdatasync)\((\d+)(.*)$")
    resumed = re.compile(r"^(\d+)\s+<\.\.\. (fdatasync) resumed>.*= 0")
    for i, line in enumerate(lines):
        m = call.match(line)
        if m:
            pid, name, fd, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if fd not in fds:
                continue
            if name == "fdatasync":
                if "<unfinished" in rest:
                    started[pid] = fd
                elif rest.rstrip().endswith("= 0"):
                    events.append((i, "synced", fd, None))
            else:
                nums = re.findall(r", (\d+)", rest.split(")")[0].split("<unfinished")[0])
                off = nums[-2] if name == "pwritev2" else nums[-1]  # pwritev2 ends with its flags
                events.append((i, "write", fd, int(off)))
            continue
        m = resumed.match(line)
        if m and m.group(1) in started:
            events.append((i, "synced", started.pop(m.group(1)), None))
    return events


def test_a_fast_write_reaches_a_leg_only_after_its_regions_mark_is_durable(make_daemon, image, tmp_path,
                                                                          monkeypatch):
    """Seen in the daemon's system calls (the worker engine, so the log's writes are system
    calls too): before any write to a leg in a region, the log's bitmap was written and
    fdatasync'ed; and later writes there are the NBD loop's own (pwrite64), not the engine's."""
    need("strace")
    monkeypatch.setenv("APPLIANCE_ENGINE", "threads")
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    logdev = image("log.img", MiB)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b], log=f"disk 3 {logdev} 2048 nosync")))
    fds = {}
    for fd in os.listdir(f"/proc/{d.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{d.proc.pid}/fd/{fd}")
        except OSError:
            continue
        if target in (a, b, logdev):
            fds[int(fd)] = target
    assert sorted(fds.values()) == sorted([a, b, logdev]), fds
    trace = tmp_path / "strace.out"
    st = subprocess.Popen(["strace", "-f", "-qq", "-s", "0", "-e", "trace=pwrite64,pwritev,pwritev2,fdatasync",
                           "-o", str(trace), "-p", str(d.proc.pid)])
    try:
        time.sleep(1)  # attached to every thread
        # 8 writes at once into each of two fresh regions (they race the mark's flush), then 2
        # more into each, one at a time (the mark is durable by then: the fast path)
        burst = [r * MiB + k * 65536 for r in (3, 5) for k in range(8)]
        after = [r * MiB + k * 65536 for r in (3, 5) for k in (8, 9)]
        nbdsh(d.uri("m"), f"for off in {burst}: h.aio_pwrite(b'\\x33' * 4096, off)\n"
              "while h.aio_in_flight() > 0: h.poll(-1)\n"
              f"for off in {after}: h.pwrite(b'\\x34' * 4096, off)")
        time.sleep(0.5)
    finally:
        st.terminate()
        st.wait(10)
    log_fd = next(fd for fd, path in fds.items() if path == logdev)
    events = _trace(trace.read_text().splitlines(), set(fds))
    leg_writes = [e for e in events if e[1] == "write" and e[2] != log_fd]
    assert {e[3] // MiB for e in leg_writes} == {3, 5}, leg_writes
    for r in (3, 5):
        first = min(e[0] for e in leg_writes if e[3] // MiB == r)
        log_write = max(e[0] for e in events if e[1] == "write" and e[2] == log_fd and e[0] < first)
        assert any(e[1] == "synced" and e[2] == log_fd and log_write < e[0] < first for e in events), r
    fast = [line for line in trace.read_text().splitlines() if re.search(r"pwrite64\((\d+)", line)
            and int(re.search(r"pwrite64\((\d+)", line).group(1)) in fds
            and int(re.search(r"pwrite64\((\d+)", line).group(1)) != log_fd]
    assert len(fast) >= 2 * len(after), fast  # the later writes, on both legs, by the loop itself
    assert mstatus(d)["fast_writes"] >= len(after)


# ------------------------------------------------------------------------ reads

def drop_cache(*paths):
    """The legs' pages out of the page cache (written back first): reads go to the disk and
    take time, so several are in flight at once and the balance has legs to choose between."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_reads_of_regions_in_sync_go_the_fast_path_to_both_legs(make_daemon, image, tmp_path):
    a, b = image("a.img", 16 * MiB), image("b.img", 16 * MiB)
    d = make_daemon(device("m", mirror_line(16 * MiB, [a, b])))
    r = fio(d.uri("m"), tmp_path, "--rw=randwrite", "--do_verify=0", size=16 * MiB)
    assert "err= 0" in r.stdout, r.stdout
    drop_cache(a, b)
    r = fio(d.uri("m"), tmp_path, "--rw=randwrite", "--verify_only", size=16 * MiB)
    assert "err= 0" in r.stdout and "verify" in r.stdout, r.stdout
    st = mstatus(d)
    assert st["fast_reads"] >= 4096 and st["fast_reads_failed"] == 0, st
    # 16 reads in flight from the disk: the legs take turns (the fewest in flight)
    assert min(st["fast_reads_per_leg"]) > 256, st["fast_reads_per_leg"]


def test_a_fast_read_a_leg_fails_is_read_from_the_other_and_the_leg_repaired(make_daemon, image):
    a, b = image("a.img", 8 * MiB), image("b.img", 8 * MiB)
    d = make_daemon(device("m", mirror_line(8 * MiB, [a, b])))
    qemu_io(d.uri("m"), f"write -P 0x66 {7 * MiB} 64k")
    assert "is the primary" in d.cli("message", "m", "0", "set_primary", "1").stdout  # reads go to b
    os.truncate(b, 7 * MiB)  # b lost its last region: a read there comes back short, an error
    out = qemu_io(d.uri("m"), f"read -P 0x66 {7 * MiB} 64k").stdout
    assert "read 65536/65536" in out and "Pattern verification failed" not in out, out
    st = mstatus(d)
    assert st["fast_reads_failed"] == 1 and st["fast_reads_per_leg"] == [0, 0], st
    wait_for(lambda: mstatus(d)["repairs"] == 1, 10, "the repair")
    assert read_file(b, 7 * MiB, 65536) == b"\x66" * 65536  # rewritten from the good leg
    assert read_file(a) == read_file(b)
    assert [x["state"] for x in mstatus(d)["legs"]] == ["alive", "alive"]
    # in sync again: the fast path reads it, from b (the primary) at one read in flight
    qemu_io(d.uri("m"), f"read -P 0x66 {7 * MiB} 64k")
    assert mstatus(d)["fast_reads_per_leg"] == [0, 1]


def test_reads_during_a_resync_return_the_data_written(make_daemon, image, tmp_path):
    """A leg that comes back holds zeros where it missed fio's writes: until the resync copies
    a region to it, no read may go there, fast or not."""
    a, b = image("a.img", 16 * MiB), image("b.img", 16 * MiB)
    d = make_daemon(device("m", mirror_line(16 * MiB, [a, b])))
    d.cli("message", "m", "0", "fail_leg", b)
    r = fio(d.uri("m"), tmp_path, "--rw=randwrite", "--do_verify=0", size=16 * MiB)
    assert "err= 0" in r.stdout, r.stdout
    d.cli("message", "m", "0", "resync_rate", "1M")  # 16 s for the 16 regions
    assert "16 regions to resync" in d.cli("message", "m", "0", "reinstate_leg", b).stdout
    drop_cache(a, b)
    r = fio(d.uri("m"), tmp_path, "--rw=randwrite", "--verify_only", size=16 * MiB)
    assert "err= 0" in r.stdout, r.stdout
    st = mstatus(d)
    assert st["resynced_regions"] < 16 and st["fast_reads_failed"] == 0, st  # read mid-resync
    d.cli("message", "m", "0", "resync_rate", "0")
    wait_for(lambda: in_sync(d), 30, "the resync")
    assert read_file(a) == read_file(b)
