"""Option and command edge cases, driven with nbdsh (libnbd's Python shell).

Each test runs one nbdsh script against a running daemon. The script records
what it saw in a dict `R` (errors by errno name); the test asserts on it.
libnbd checks bounds and flags client-side, so scripts that send what a
careful client would not turn strict mode off first.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import need, run, nbdsh_env, device, replay_log, unwritten_pages

MiB = 1 << 20

PRELUDE = """
import errno, json
R = {}
def err(fn):
    try:
        fn()
        return "ok"
    except nbd.Error as e:
        return errno.errorcode.get(e.errnum, str(e.errnum))
def connect(h, uri, structured=True, meta=True):
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h
"""


def script(body, *, uri=None, timeout=60):
    """Run PRELUDE + body in nbdsh (connected to `uri` first when given); return R."""
    need("nbdsh")
    code = PRELUDE + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(R))\n"
    args = ["nbdsh"] + (["-u", uri] if uri else []) + ["-c", code]
    out = run(*args, timeout=timeout, env=nbdsh_env()).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert line, out
    return json.loads(line[-1][7:])


@pytest.fixture
def disk(image):
    return image("disk.img", 8 * MiB)


@pytest.fixture
def daemon(make_daemon, disk):
    return make_daemon(device("data0", f"0 {8 * MiB // 512} linear {disk} 0", description="eight MiB"))


@pytest.fixture
def logged(make_daemon, disk, image):
    """data0 as `daemon`'s, stacked on @inner: `log-writes disk log`, which records what reached
    the disk and when it was flushed. The durability tests replay that log after a kill -9."""
    log = image("log.img", 64 * MiB)
    d = make_daemon(
        device("inner", f"0 {8 * MiB // 512} log-writes {disk} {log}", export=False)
        + device("data0", f"0 {8 * MiB // 512} linear @inner 0")
    )
    d.log_writes, d.disk = log, disk
    return d


def durable(d, tmp_path, *flags):
    """Kill -9 the daemon and replay its log onto a fresh file: what a power cut would have kept."""
    d.kill()
    return replay_log(d.log_writes, tmp_path / "replayed.img", *flags, size=8 * MiB)


def file_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# simple replies


def test_reads_and_writes_work_with_simple_replies(make_daemon, disk, image):
    err_img = image("e.img", 1 * MiB)
    d = make_daemon(
        device("data0", f"0 {8 * MiB // 512} linear {disk} 0")
        + device("mixed", f"0 {1 * MiB // 512} linear {err_img} 0", f"{1 * MiB // 512} {1 * MiB // 512} error")
    )
    r = script(
        f"""
        connect(h, {d.uri("data0")!r}, structured=False, meta=False)
        R["structured"] = h.get_structured_replies_negotiated()
        h.pwrite(b"\\x5a" * 65536, 4096)
        R["read"] = h.pread(65536, 4096) == b"\\x5a" * 65536
        R["unaligned"] = h.pread(10, 4096 + 65536 - 5) == b"\\x5a" * 5 + bytes(5)
        h.set_strict_mode(0)
        R["past_end"] = err(lambda: h.pread(4096, {8 * MiB}))
        R["df_without_structured"] = err(lambda: h.pread(512, 0, nbd.CMD_FLAG_DF))
        R["block_status"] = err(lambda: h.block_status(4096, 0, lambda *a: 0))
        R["after_errors"] = h.pread(4, 4096) == b"\\x5a" * 4
        h.shutdown()
        g = nbd.NBD()
        connect(g, {d.uri("mixed")!r}, structured=False, meta=False)
        R["io_error"] = err(lambda: g.pread(4096, {1 * MiB}))
        R["across_error"] = err(lambda: g.pread(8192, {1 * MiB - 4096}))
        R["good_side"] = g.pread(4096, 0) == bytes(4096)
        g.shutdown()
        """
    )
    assert r == {
        "structured": False,
        "read": True,
        "unaligned": True,
        "past_end": "EINVAL",
        "df_without_structured": "EINVAL",
        "block_status": "EINVAL",
        "after_errors": True,
        "io_error": "EIO",
        "across_error": "EIO",
        "good_side": True,
    }
    assert file_bytes(disk, 4096, 65536) == b"\x5a" * 65536


def test_structured_read_error_is_reported_and_the_connection_continues(make_daemon, image):
    img = image("e.img", 1 * MiB)
    d = make_daemon(device("mixed", f"0 {1 * MiB // 512} linear {img} 0", f"{1 * MiB // 512} {1 * MiB // 512} error"))
    r = script(
        f"""
        connect(h, {d.uri("mixed")!r})
        R["structured"] = h.get_structured_replies_negotiated()
        R["io_error"] = err(lambda: h.pread(4096, {1 * MiB}))
        R["write_error"] = err(lambda: h.pwrite(b"x" * 4096, {1 * MiB}))
        R["flush"] = err(lambda: h.flush())
        R["good_side"] = h.pread(4096, 0) == bytes(4096)
        """
    )
    assert r == {"structured": True, "io_error": "EIO", "write_error": "EIO", "flush": "ok", "good_side": True}


# option negotiation


def test_opt_mode_lists_exports_and_contexts_then_goes(make_daemon, disk, image):
    other = image("other.img", 2 * MiB)
    d = make_daemon(
        device("data0", f"0 {8 * MiB // 512} linear {disk} 0", description="eight MiB")
        + device("ro", f"0 {2 * MiB // 512} linear {other} 0", read_only=True)
    )
    r = script(
        f"""
        h.set_opt_mode(True)
        h.add_meta_context("base:allocation")
        h.connect_uri({d.uri("")!r})
        R["negotiating"] = h.aio_is_negotiating()
        names = []
        h.opt_list(lambda name, desc: names.append([name, desc]) or 0)
        R["list"] = names
        contexts = []
        h.set_export_name("data0")
        h.opt_list_meta_context(lambda ctx: contexts.append(ctx) or 0)
        R["contexts"] = contexts
        h.set_export_name("ro")
        h.opt_info()
        R["ro_info"] = [h.get_size(), h.is_read_only(), h.can_trim(), h.get_block_size(nbd.SIZE_MAXIMUM)]
        h.set_export_name("nosuch")
        R["unknown_info"] = err(lambda: h.opt_info())
        R["still_negotiating"] = h.aio_is_negotiating()
        h.set_export_name("data0")
        h.opt_go()
        R["ready"] = h.aio_is_ready()
        R["go"] = [h.get_size(), h.is_read_only(), h.can_meta_context("base:allocation"), h.can_multi_conn()]
        R["read"] = h.pread(4, 0) == bytes(4)
        """
    )
    assert r["negotiating"] and r["still_negotiating"] and r["ready"]
    assert r["list"] == [["data0", "eight MiB"], ["ro", ""]]
    assert r["contexts"] == ["base:allocation"]
    assert r["ro_info"] == [2 * MiB, True, False, 64 * MiB]
    assert r["unknown_info"] == "ENOENT"  # libnbd's errno for NBD_REP_ERR_UNKNOWN
    assert r["go"] == [8 * MiB, False, True, True]
    assert r["read"]


def test_opt_go_to_an_unknown_export_fails_and_a_later_go_succeeds(daemon):
    r = script(
        f"""
        h.set_opt_mode(True)
        h.connect_uri({daemon.uri("")!r})
        h.set_export_name("nosuch")
        R["bad_go"] = err(lambda: h.opt_go())
        h.set_export_name("data0")
        h.opt_go()
        R["size"] = h.get_size()
        """
    )
    assert r == {"bad_go": "ENOENT", "size": 8 * MiB}


def test_opt_abort_ends_negotiation_cleanly(daemon):
    r = script(
        f"""
        h.set_opt_mode(True)
        h.connect_uri({daemon.uri("data0")!r})
        h.opt_abort()
        R["closed"] = h.aio_is_closed()
        """
    )
    assert r == {"closed": True}
    # the daemon is unaffected
    assert script(f'R["size"] = h.get_size()', uri=daemon.uri("data0")) == {"size": 8 * MiB}


# block status


def test_block_status_reports_holes_and_data_of_base_allocation(daemon, disk):
    with open(disk, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\x01" * MiB)
    r = script(
        f"""
        connect(h, {daemon.uri("data0")!r})
        R["meta"] = h.can_meta_context("base:allocation")
        ext = []
        h.block_status({8 * MiB}, 0, lambda meta, off, e, err: ext.append([meta, off, list(e)]) or 0)
        R["all"] = ext
        one = []
        h.block_status({8 * MiB}, 0, lambda meta, off, e, err: one.append(list(e)) or 0, nbd.CMD_FLAG_REQ_ONE)
        R["req_one"] = one
        mid = []
        h.block_status({1 * MiB}, {2 * MiB + 4096}, lambda meta, off, e, err: mid.append(list(e)) or 0)
        R["mid"] = mid
        h.set_strict_mode(0)
        R["past_end"] = err(lambda: h.block_status(4096, {8 * MiB}, lambda *a: 0))
        R["bad_flag"] = err(lambda: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_NO_HOLE))
        """
    )
    assert r["meta"] is True
    [(meta, off, e)] = r["all"]
    assert meta == "base:allocation" and off == 0
    pairs = list(zip(e[::2], e[1::2]))
    assert pairs == [(2 * MiB, 3), (1 * MiB, 0), (5 * MiB, 3)]
    assert r["req_one"] == [[2 * MiB, 3]]
    assert r["mid"][0][:2] == [MiB - 4096, 0]
    assert r["past_end"] == "EINVAL" and r["bad_flag"] == "EINVAL"


def test_block_status_without_a_negotiated_context_is_refused(daemon):
    r = script(
        f"""
        connect(h, {daemon.uri("data0")!r}, meta=False)
        R["meta"] = h.can_meta_context("base:allocation")
        h.set_strict_mode(0)
        R["bs"] = err(lambda: h.block_status(4096, 0, lambda *a: 0))
        R["after"] = h.pread(4, 0) == bytes(4)
        """
    )
    assert r == {"meta": False, "bs": "EINVAL", "after": True}


# the other commands


def test_flush_trim_zero_and_cache_do_what_they_say(daemon, disk):
    r = script(
        f"""
        connect(h, {daemon.uri("data0")!r})
        h.pwrite(b"\\xee" * {4 * MiB}, 0)
        h.flush()
        h.trim({1 * MiB}, 0)
        h.zero({1 * MiB}, {1 * MiB}, nbd.CMD_FLAG_NO_HOLE)
        R["fast_zero"] = err(lambda: h.zero({1 * MiB}, {2 * MiB}, nbd.CMD_FLAG_FAST_ZERO))
        h.zero(4096, {3 * MiB} + 100, nbd.CMD_FLAG_FUA)
        h.cache({1 * MiB}, {3 * MiB})
        R["zeroed"] = h.pread({1 * MiB}, {1 * MiB}) == bytes({1 * MiB})
        R["zeroed_fua"] = h.pread(4096, {3 * MiB} + 100) == bytes(4096)
        R["kept"] = h.pread(100, {3 * MiB}) == b"\\xee" * 100
        R["kept_end"] = h.pread(4096, {4 * MiB - 4096}) == b"\\xee" * 4096
        """
    )
    assert r["fast_zero"] in ("ok", "ENOTSUP")  # fast zero may refuse, quickly, but never corrupt
    assert r["zeroed"] and r["zeroed_fua"] and r["kept"] and r["kept_end"]
    assert file_bytes(disk, MiB, MiB) == bytes(MiB)
    assert file_bytes(disk, 3 * MiB + 100, 4096) == bytes(4096)
    assert file_bytes(disk, 3 * MiB + 4196, 4096) == b"\xee" * 4096


def test_fast_zero_that_succeeds_reads_back_as_zeros(daemon, disk):
    r = script(
        f"""
        connect(h, {daemon.uri("data0")!r})
        h.pwrite(b"\\x12" * {1 * MiB}, {5 * MiB})
        try:
            h.zero({1 * MiB}, {5 * MiB}, nbd.CMD_FLAG_FAST_ZERO)
            R["fast"] = "ok"
            R["zero"] = h.pread({1 * MiB}, {5 * MiB}) == bytes({1 * MiB})
        except nbd.Error as e:
            R["fast"] = errno.errorcode.get(e.errnum)
            R["zero"] = h.pread({1 * MiB}, {5 * MiB}) == b"\\x12" * {1 * MiB}  # untouched on refusal
        """
    )
    assert r["fast"] in ("ok", "ENOTSUP") and r["zero"]


def test_fua_write_is_durable_when_it_completes(logged, tmp_path):
    """A FUA write reaches the disk as FUA: it survives a power cut that loses every
    write after the last flush, and the plain write next to it does not."""
    r = script(
        f"""
        connect(h, {logged.uri("data0")!r})
        R["can_fua"] = h.can_fua()
        h.pwrite(b"\\x43" * 8192, 65536)
        h.pwrite(b"\\x42" * 8192, 12288, nbd.CMD_FLAG_FUA)
        """
    )
    assert r == {"can_fua": True}
    assert unwritten_pages(logged.disk, 12288, 8192) in (0, None)  # the disk file below was synced
    disk = durable(logged, tmp_path, "--durable")  # and the FUA reached it as FUA
    assert disk[12288 : 12288 + 8192] == b"\x42" * 8192
    assert disk[65536 : 65536 + 8192] == bytes(8192)  # never flushed: a power cut may lose it


def test_fua_flag_is_accepted_on_commands_that_do_not_write(daemon):
    """The spec: with NBD_FLAG_SEND_FUA negotiated the server MUST accept FUA on every command."""
    r = script(
        f"""
        connect(h, {daemon.uri("data0")!r})
        h.set_strict_mode(0)
        R["read"] = err(lambda: h.pread(4096, 0, nbd.CMD_FLAG_FUA))
        R["flush"] = err(lambda: h.flush(nbd.CMD_FLAG_FUA))
        R["cache"] = err(lambda: h.cache(4096, 0, nbd.CMD_FLAG_FUA))
        R["block_status"] = err(lambda: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_FUA))
        """
    )
    assert r == {"read": "ok", "flush": "ok", "cache": "ok", "block_status": "ok"}


def test_df_read_is_served_in_one_chunk(daemon):
    r = script(
        f"""
        connect(h, {daemon.uri("data0")!r})
        h.pwrite(b"\\x07" * 65536, 0)
        R["can_df"] = h.can_df()
        chunks = []
        buf = h.pread_structured(65536, 0, lambda sub, off, s, e: chunks.append([off, len(sub), s]) or 0, nbd.CMD_FLAG_DF)
        R["chunks"] = chunks
        R["data"] = buf == b"\\x07" * 65536
        """
    )
    assert r == {"can_df": True, "chunks": [[0, 65536, 1]], "data": True}


# errors the spec names


def test_requests_out_of_bounds_or_with_bad_flags_get_the_spec_errors(daemon, disk):
    # requests over the maximum block (64 MiB) are libnbd's own limit too, so it refuses
    # them itself (ERANGE); test_hostile.py sends them on a raw socket
    size = 8 * MiB
    r = script(
        f"""
        connect(h, {daemon.uri("data0")!r})
        h.set_strict_mode(0)
        R["read_past_end"] = err(lambda: h.pread(4096, {size}))
        R["read_straddling_end"] = err(lambda: h.pread(8192, {size - 4096}))
        R["write_past_end"] = err(lambda: h.pwrite(b"w" * 4096, {size - 1024}))
        R["zero_past_end"] = err(lambda: h.zero(8192, {size - 4096}))
        R["trim_past_end"] = err(lambda: h.trim(8192, {size}))
        R["cache_past_end"] = err(lambda: h.cache(8192, {size}))
        R["read_unknown_flag"] = err(lambda: h.pread(512, 0, 0x40))
        R["write_unknown_flag"] = err(lambda: h.pwrite(b"u" * 512, 0, 0x100))
        R["write_no_hole_flag"] = err(lambda: h.pwrite(b"u" * 512, 0, nbd.CMD_FLAG_NO_HOLE))
        R["trim_fast_zero_flag"] = err(lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO))
        R["zero_req_one_flag"] = err(lambda: h.zero(512, 0, nbd.CMD_FLAG_REQ_ONE))
        R["zero_length_read"] = err(lambda: h.pread(0, 0))
        # the connection is still in step after all of that
        h.pwrite(b"\\x61" * 4096, {size - 4096})
        R["after"] = h.pread(4096, {size - 4096}) == b"\\x61" * 4096
        """
    )
    assert r == {
        "read_past_end": "EINVAL",
        "read_straddling_end": "EINVAL",
        "write_past_end": "ENOSPC",
        "zero_past_end": "ENOSPC",
        "trim_past_end": "EINVAL",
        "cache_past_end": "EINVAL",
        "read_unknown_flag": "EINVAL",
        "write_unknown_flag": "EINVAL",
        "write_no_hole_flag": "EINVAL",
        "trim_fast_zero_flag": "EINVAL",
        "zero_req_one_flag": "EINVAL",
        "zero_length_read": "EINVAL",
        "after": True,
    }
    # nothing of the refused writes reached the file
    assert file_bytes(disk, size - 8192, 4096) == bytes(4096)
    assert file_bytes(disk, 0, 512) == bytes(512)


# multi-conn


def test_write_on_one_connection_is_visible_and_flushed_through_another(logged, tmp_path):
    r = script(
        f"""
        a = connect(nbd.NBD(), {logged.uri("data0")!r})
        b = connect(nbd.NBD(), {logged.uri("data0")!r})
        R["multi_conn"] = a.can_multi_conn() and b.can_multi_conn()
        for i in range(16):
            a.pwrite(bytes([i + 1]) * 4096, i * 65536)
        b.flush()
        R["seen_by_b"] = all(b.pread(4096, i * 65536) == bytes([i + 1]) * 4096 for i in range(16))
        b.pwrite(b"\\xbb" * 4096, {7 * MiB})
        a.flush()
        R["seen_by_a"] = a.pread(4096, {7 * MiB}) == b"\\xbb" * 4096
        # many requests in flight on both connections at once
        cookies = [a.aio_pwrite(bytes([0x80 + i]) * 8192, {4 * MiB} + i * 8192) for i in range(32)]
        cookies += [b.aio_pwrite(bytes([0xc0 + i]) * 8192, {5 * MiB} + i * 8192) for i in range(32)]
        import time
        deadline = time.monotonic() + 20
        for hh in (a, b):
            while hh.aio_in_flight() > 0 and time.monotonic() < deadline:
                hh.poll(1000)
        R["aio_done"] = all(hh.aio_command_completed(c) for hh, c in zip([a] * 32 + [b] * 32, cookies))
        a.flush()
        R["aio"] = all(b.pread(8192, {4 * MiB} + i * 8192) == bytes([0x80 + i]) * 8192 for i in range(32)) and all(
            a.pread(8192, {5 * MiB} + i * 8192) == bytes([0xc0 + i]) * 8192 for i in range(32))
        a.shutdown()
        b.shutdown()
        """
    )
    assert r == {"multi_conn": True, "seen_by_b": True, "seen_by_a": True, "aio_done": True, "aio": True}
    assert unwritten_pages(logged.disk) in (0, None)  # the last flush synced the disk file below
    disk = durable(logged, tmp_path, "--last-flush")  # each flush covered the other connection's writes
    for i in range(16):
        assert disk[i * 65536 : i * 65536 + 4096] == bytes([i + 1]) * 4096
    assert disk[7 * MiB : 7 * MiB + 4096] == b"\xbb" * 4096
    for i in range(32):
        assert disk[4 * MiB + i * 8192 : 4 * MiB + (i + 1) * 8192] == bytes([0x80 + i]) * 8192
        assert disk[5 * MiB + i * 8192 : 5 * MiB + (i + 1) * 8192] == bytes([0xc0 + i]) * 8192
