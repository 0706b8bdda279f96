"""Sans-IO tests for the NBD handshake state machines (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.nbd import constants as C
from appliance.nbd.protocol import (
    NEED_DATA, Aborted, ClientHandshake, ConnectionClosed, ExportInfo, ExportList,
    ExportSelected, LocalProtocolError, Negotiated, RemoteProtocolError, ServerHandshake,
)


class DictCatalog:
    def __init__(self, *exports: ExportInfo) -> None:
        self._exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportInfo | None:
        return self._exports.get(name)

    def names(self) -> list[str]:
        return list(self._exports)


DISK = ExportInfo("disk0", 1 << 30, description="first disk", min_block=512)
RO = ExportInfo("ro", 4096, read_only=True)


def make_server(**kw) -> ServerHandshake:
    return ServerHandshake(DictCatalog(DISK, RO), default_export="disk0", **kw)


# ------------------------------------------------------------------ helpers

def step(conn):
    event = conn.next_event()
    return None if event is NEED_DATA else event


def run_pair(client, server, rounds=50):
    """Shuttle bytes until both sides produce their terminal event."""
    c_ev = s_ev = None
    sent = bytearray()  # everything the client sent, for replay tests
    for _ in range(rounds):
        if s_ev is None:
            s_ev = step(server)
        out = server.data_to_send()
        if out and c_ev is None:
            client.receive_data(out)
        if c_ev is None:
            c_ev = step(client)
        out = client.data_to_send()
        sent += out
        if out and s_ev is None:
            server.receive_data(out)
        if c_ev is not None and s_ev is not None:
            return c_ev, s_ev, bytes(sent)
    raise AssertionError("handshake did not finish")


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", C.IHAVEOPT, code, len(data)) + data


def name_data(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def go_data(name: str, infos=()) -> bytes:
    return name_data(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries=()) -> bytes:
    return name_data(name) + struct.pack(">I", len(queries)) + b"".join(
        name_data(q) for q in queries)


FLAGS = struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES)
GREETING = struct.pack(">QQH", C.NBDMAGIC, C.IHAVEOPT,
                       C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES)


def feed(server, data: bytes, chunks=None, unfed=None):
    """Feed bytes (optionally split at ``chunks`` sizes); return (events, output).

    Stops feeding after the terminal event, like a real caller would; pieces
    never handed over are appended to ``unfed`` if given.
    """
    events, pieces = [], []
    if chunks is None:
        pieces = [data]
    else:
        pos = 0
        for size in chunks:
            pieces.append(data[pos:pos + size])
            pos += size
        pieces.append(data[pos:])
    for piece in pieces:
        if not piece:
            continue
        if events:  # finished: the rest belongs to the transmission phase
            if unfed is not None:
                unfed += piece
            continue
        server.receive_data(piece)
        while not events:
            ev = step(server)
            if ev is None:
                break
            events.append(ev)
    return events, server.data_to_send()


def replies(buf: bytes, start: int = len(GREETING)):
    """Parse option replies from server output (after the greeting)."""
    out, pos = [], start
    while pos < len(buf):
        magic, option, rtype, length = struct.unpack_from(">QIII", buf, pos)
        assert magic == C.NBD_REP_MAGIC
        out.append((option, rtype, buf[pos + 20:pos + 20 + length]))
        pos += 20 + length
    return out


def types(buf: bytes, start: int = len(GREETING)):
    return [(o, t) for o, t, _ in replies(buf, start)]


# --------------------------------------------------------------- round trips

def test_go_round_trip_reports_size_flags_and_block_sizes():
    client, server = ClientHandshake("disk0"), make_server()
    c_ev, s_ev, _ = run_pair(client, server)
    assert isinstance(s_ev, ExportSelected) and s_ev.export is DISK
    assert isinstance(c_ev, Negotiated)
    assert c_ev.size == DISK.size
    assert c_ev.flags == DISK.transmission_flags(structured_replies=True)
    assert c_ev.block_sizes == (512, 4096, 32 * 1024 * 1024)
    assert c_ev.trailing_data == b"" and server.trailing_data == b""


def test_structured_replies_and_meta_context_ids_agree_on_both_sides():
    c_ev, s_ev, _ = run_pair(ClientHandshake("disk0"), make_server())
    assert s_ev.structured_replies and c_ev.structured_replies
    assert s_ev.meta_contexts == c_ev.meta_contexts == {1: "base:allocation"}


def test_without_structured_replies_no_meta_contexts_and_no_send_df():
    client = ClientHandshake("disk0", structured_replies=False)
    c_ev, s_ev, _ = run_pair(client, make_server())
    assert not s_ev.structured_replies and s_ev.meta_contexts == {}
    assert not c_ev.flags & C.NBD_FLAG_SEND_DF
    assert c_ev.meta_contexts == {}


def test_list_only_returns_export_names_then_aborts():
    c_ev, s_ev, _ = run_pair(ClientHandshake("", list_only=True), make_server())
    assert c_ev == ExportList(("disk0", "ro"))
    assert s_ev == Aborted()


def test_export_name_path_sends_124_zeroes_without_no_zeroes():
    server = make_server()
    client_flags = struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE)
    events, out = feed(server, client_flags + opt(C.NBD_OPT_EXPORT_NAME, b"disk0"))
    assert isinstance(events[0], ExportSelected) and not events[0].no_zeroes
    body = out[len(GREETING):]
    assert len(body) == 8 + 2 + 124 and body[10:] == bytes(124)
    assert struct.unpack(">QH", body[:10]) == (DISK.size, DISK.transmission_flags(False))


def test_export_name_path_omits_zeroes_with_no_zeroes():
    events, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_EXPORT_NAME, b"disk0"))
    assert events[0].no_zeroes
    assert len(out) == len(GREETING) + 10


def test_export_name_round_trip_with_client_keeps_meta_contexts():
    client = ClientHandshake("disk0", use_go=False)
    c_ev, s_ev, _ = run_pair(client, make_server())
    assert isinstance(s_ev, ExportSelected) and isinstance(c_ev, Negotiated)
    assert c_ev.size == DISK.size and c_ev.block_sizes is None
    assert s_ev.meta_contexts == c_ev.meta_contexts == {1: "base:allocation"}


def test_client_falls_back_to_export_name_when_go_unsupported():
    class NoGoServer(ServerHandshake):
        _OPTIONS = {k: v for k, v in ServerHandshake._OPTIONS.items() if k != C.NBD_OPT_GO}

    server = NoGoServer(DictCatalog(DISK))
    c_ev, s_ev, _ = run_pair(ClientHandshake("disk0"), server)
    assert isinstance(c_ev, Negotiated) and c_ev.size == DISK.size
    assert isinstance(s_ev, ExportSelected)


def test_empty_name_selects_default_export():
    c_ev, s_ev, _ = run_pair(ClientHandshake(""), make_server())
    assert s_ev.export is DISK and c_ev.size == DISK.size
    assert s_ev.meta_contexts == {1: "base:allocation"}  # "" and "disk0" are the same export


def test_info_then_go_returns_same_information():
    server = make_server()
    query = go_data("disk0", [C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION, C.NBD_INFO_BLOCK_SIZE])
    events, out = feed(server, FLAGS + opt(C.NBD_OPT_INFO, query))
    assert events == []  # INFO keeps negotiating
    info = replies(out)
    assert info[-1][:2] == (C.NBD_OPT_INFO, C.NBD_REP_ACK)
    infos = {d[:2]: d[2:] for _, t, d in info if t == C.NBD_REP_INFO}
    assert struct.unpack(">QH", infos[b"\0\0"]) == (DISK.size, DISK.transmission_flags(False))
    assert infos[b"\0\1"] == b"disk0" and infos[b"\0\2"] == b"first disk"
    assert struct.unpack(">III", infos[b"\0\3"]) == (512, 4096, 32 * 1024 * 1024)
    events, out = feed(server, opt(C.NBD_OPT_GO, query))
    assert isinstance(events[0], ExportSelected)
    assert [(t, d) for _, t, d in replies(out, 0)] == [(t, d) for _, t, d in info]


def test_go_sends_block_size_even_when_not_requested():
    events, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_GO, go_data("disk0")))
    info_types = [d[:2] for _, t, d in replies(out) if t == C.NBD_REP_INFO]
    assert info_types == [b"\0\0", b"\0\3"]
    assert isinstance(events[0], ExportSelected)


def test_read_only_export_hides_write_features():
    flags = RO.transmission_flags()
    assert flags & C.NBD_FLAG_READ_ONLY and flags & C.NBD_FLAG_HAS_FLAGS
    for bit in (C.NBD_FLAG_SEND_TRIM, C.NBD_FLAG_SEND_WRITE_ZEROES,
                C.NBD_FLAG_SEND_FAST_ZERO, C.NBD_FLAG_SEND_FUA):
        assert not flags & bit


def test_export_info_rejects_invalid_block_sizes():
    with pytest.raises(ValueError):
        ExportInfo("x", 1 << 20, min_block=3)
    with pytest.raises(ValueError):
        ExportInfo("x", 1 << 20, min_block=4096, preferred_block=512)
    with pytest.raises(ValueError):
        ExportInfo("x", 1 << 20, min_block=512, max_block=1000)


def test_trailing_bytes_after_go_become_trailing_data():
    request = struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_READ, 1, 0, 512)
    server = make_server()
    events, _ = feed(server, FLAGS + opt(C.NBD_OPT_GO, go_data("disk0")) + request)
    assert isinstance(events[0], ExportSelected)
    assert server.trailing_data == request
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        server.next_event()


# -------------------------------------------------------- options, one by one

def test_list_with_data_is_invalid_and_negotiation_continues():
    events, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_LIST, b"x") + opt(C.NBD_OPT_LIST))
    assert events == []
    assert types(out) == [(C.NBD_OPT_LIST, C.NBD_REP_ERR_INVALID),
                          (C.NBD_OPT_LIST, C.NBD_REP_SERVER), (C.NBD_OPT_LIST, C.NBD_REP_SERVER),
                          (C.NBD_OPT_LIST, C.NBD_REP_ACK)]
    first = replies(out)[1][2]
    assert first == name_data("disk0") + b"first disk"


def test_abort_is_acknowledged():
    events, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_ABORT))
    assert events == [Aborted()]
    assert types(out) == [(C.NBD_OPT_ABORT, C.NBD_REP_ACK)]


def test_second_structured_reply_is_invalid():
    data = FLAGS + opt(C.NBD_OPT_STRUCTURED_REPLY) + opt(C.NBD_OPT_STRUCTURED_REPLY)
    _, out = feed(make_server(), data)
    assert [t for _, t in types(out)] == [C.NBD_REP_ACK, C.NBD_REP_ERR_INVALID]


def test_structured_reply_with_data_is_invalid():
    _, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_STRUCTURED_REPLY, b"\0"))
    assert [t for _, t in types(out)] == [C.NBD_REP_ERR_INVALID]


def test_set_meta_context_before_structured_reply_is_invalid():
    data = FLAGS + opt(C.NBD_OPT_SET_META_CONTEXT, meta_data("disk0", ["base:allocation"]))
    events, out = feed(make_server(), data)
    assert events == [] and [t for _, t in types(out)] == [C.NBD_REP_ERR_INVALID]


def _contexts(out):
    return [(d[:4], d[4:].decode()) for _, t, d in replies(out) if t == C.NBD_REP_META_CONTEXT]


@pytest.mark.parametrize("queries, expected", [
    ([], ["base:allocation", "qemu:allocation-depth"]),
    (["base:"], ["base:allocation"]),
    (["qemu:"], ["qemu:allocation-depth"]),
    (["qemu:allocation-depth", "base:allocation"], ["qemu:allocation-depth", "base:allocation"]),
    (["base:allocation"], ["base:allocation"]),
    (["qemu:dirty-bitmap:x", "x-foo:bar"], []),
    (["base:nonexistent"], []),
])
def test_list_meta_context_queries(queries, expected):
    _, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_LIST_META_CONTEXT,
                                             meta_data("disk0", queries)))
    assert _contexts(out) == [(b"\0\0\0\0", name) for name in expected]
    assert types(out)[-1] == (C.NBD_OPT_LIST_META_CONTEXT, C.NBD_REP_ACK)


def test_set_meta_context_ignores_base_wildcard_and_unknown_namespaces():
    data = FLAGS + opt(C.NBD_OPT_STRUCTURED_REPLY) + opt(
        C.NBD_OPT_SET_META_CONTEXT, meta_data("disk0", ["base:", "x-foo:bar"]))
    _, out = feed(make_server(), data)
    assert _contexts(out) == []
    assert types(out)[-1] == (C.NBD_OPT_SET_META_CONTEXT, C.NBD_REP_ACK)


def test_meta_context_query_without_namespace_is_invalid():
    data = FLAGS + opt(C.NBD_OPT_LIST_META_CONTEXT, meta_data("disk0", ["allocation"]))
    _, out = feed(make_server(), data)
    assert [t for _, t in types(out)] == [C.NBD_REP_ERR_INVALID]


def test_meta_contexts_dropped_when_go_names_a_different_export():
    data = (FLAGS + opt(C.NBD_OPT_STRUCTURED_REPLY)
            + opt(C.NBD_OPT_SET_META_CONTEXT, meta_data("ro", ["base:allocation"]))
            + opt(C.NBD_OPT_GO, go_data("disk0")))
    events, _ = feed(make_server(), data)
    assert events[0].export is DISK and events[0].meta_contexts == {}


def test_failed_set_meta_context_clears_previous_selection():
    data = (FLAGS + opt(C.NBD_OPT_STRUCTURED_REPLY)
            + opt(C.NBD_OPT_SET_META_CONTEXT, meta_data("disk0", ["base:allocation"]))
            + opt(C.NBD_OPT_SET_META_CONTEXT, meta_data("nope", ["base:allocation"]))
            + opt(C.NBD_OPT_GO, go_data("disk0")))
    events, out = feed(make_server(), data)
    assert (C.NBD_OPT_SET_META_CONTEXT, C.NBD_REP_ERR_UNKNOWN) in types(out)
    assert events[0].meta_contexts == {}


def test_unknown_export_on_go_is_err_unknown_and_negotiation_continues():
    data = FLAGS + opt(C.NBD_OPT_GO, go_data("nope")) + opt(C.NBD_OPT_GO, go_data("ro"))
    events, out = feed(make_server(), data)
    first = replies(out)[0]
    assert first[:2] == (C.NBD_OPT_GO, C.NBD_REP_ERR_UNKNOWN) and b"nope" in first[2]
    assert events[0].export is RO


def test_client_raises_with_server_message_on_unknown_export():
    client, server = ClientHandshake("nope"), make_server()
    with pytest.raises(RemoteProtocolError) as info:
        run_pair(client, server)
    assert info.value.reply_type == C.NBD_REP_ERR_UNKNOWN
    assert "NBD_REP_ERR_UNKNOWN" in info.value.reason and "nope" in info.value.reason
    server.receive_data(client.data_to_send())  # the client's soft disconnect
    assert server.next_event() == Aborted()


def test_unknown_option_is_err_unsup():
    events, out = feed(make_server(), FLAGS + opt(0x1234, b"whatever") + opt(C.NBD_OPT_ABORT))
    assert types(out) == [(0x1234, C.NBD_REP_ERR_UNSUP), (C.NBD_OPT_ABORT, C.NBD_REP_ACK)]
    assert events == [Aborted()]


def test_starttls_is_refused_by_policy():
    _, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_STARTTLS))
    assert types(out) == [(C.NBD_OPT_STARTTLS, C.NBD_REP_ERR_POLICY)]


def test_shutdown_refuses_options_but_still_acks_abort():
    server = make_server()
    feed(server, FLAGS)
    server.begin_shutdown()
    events, out = feed(server, opt(C.NBD_OPT_GO, go_data("disk0")) + opt(C.NBD_OPT_ABORT))
    assert [t for _, t in types(out, 0)] == [C.NBD_REP_ERR_SHUTDOWN, C.NBD_REP_ACK]
    assert events == [Aborted()]


# ------------------------------------------------------ hostile / malformed

def test_bad_option_magic_is_remote_error():
    bad = struct.pack(">QII", 0xDEADBEEF, C.NBD_OPT_GO, 0)
    server = make_server()
    with pytest.raises(RemoteProtocolError, match="magic"):
        feed(server, FLAGS + bad)
    with pytest.raises(RemoteProtocolError):  # errors are sticky
        server.next_event()


def test_unknown_client_flags_are_remote_error():
    with pytest.raises(RemoteProtocolError, match="unknown client flags"):
        feed(make_server(), struct.pack(">I", C.NBD_FLAG_C_FIXED_NEWSTYLE | 0x80))


def test_client_without_fixed_newstyle_is_remote_error():
    with pytest.raises(RemoteProtocolError, match="fixed newstyle"):
        feed(make_server(), struct.pack(">I", 0))


def test_oversize_option_is_refused_before_payload_arrives():
    header = struct.pack(">QII", C.IHAVEOPT, C.NBD_OPT_GO, 0xFFFFFFFF)
    with pytest.raises(RemoteProtocolError, match="exceeds limit"):
        feed(make_server(), FLAGS + header)  # no payload sent: refused on the header


def test_max_option_length_is_configurable():
    with pytest.raises(RemoteProtocolError):
        feed(make_server(max_option_length=8), FLAGS + opt(C.NBD_OPT_GO, go_data("disk0")))


@pytest.mark.parametrize("payload", [
    struct.pack(">I", 100) + b"disk0" + b"\0\0",            # name length overruns data
    name_data("disk0") + struct.pack(">HH", 3, 0),          # info count overruns data
    name_data("disk0") + struct.pack(">H", 0) + b"junk",    # trailing garbage
    b"\0\0",                                                # too short for a name length
    struct.pack(">I", 2) + b"\xff\xfe" + b"\0\0",           # name not UTF-8
])
def test_malformed_go_is_invalid_and_negotiation_continues(payload):
    events, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_GO, payload) + opt(C.NBD_OPT_ABORT))
    assert [t for _, t in types(out)] == [C.NBD_REP_ERR_INVALID, C.NBD_REP_ACK]
    assert events == [Aborted()]


def test_meta_context_query_length_overrunning_data_is_invalid():
    payload = name_data("disk0") + struct.pack(">II", 1, 50) + b"base:"
    _, out = feed(make_server(), FLAGS + opt(C.NBD_OPT_LIST_META_CONTEXT, payload))
    assert [t for _, t in types(out)] == [C.NBD_REP_ERR_INVALID]


def test_unknown_export_with_export_name_is_remote_error_naming_it():
    with pytest.raises(RemoteProtocolError, match="nope"):
        feed(make_server(), FLAGS + opt(C.NBD_OPT_EXPORT_NAME, b"nope"))


def test_close_at_message_boundary_is_connection_closed():
    server = make_server()
    feed(server, FLAGS)
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()


def test_close_mid_option_is_remote_error():
    server = make_server()
    feed(server, FLAGS + opt(C.NBD_OPT_GO, go_data("disk0"))[:10])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-message"):
        server.next_event()


def test_client_rejects_server_without_fixed_newstyle():
    client = ClientHandshake("disk0")
    client.receive_data(struct.pack(">QQH", C.NBDMAGIC, C.IHAVEOPT, 0))
    with pytest.raises(RemoteProtocolError, match="fixed newstyle"):
        client.next_event()


# ------------------------------------------------------- chunking invariance

# Client byte streams exercising most server paths, ending in GO plus the start
# of the transmission phase (which must come out as trailing_data).
REQUEST = struct.pack(">IHHQQI", C.NBD_REQUEST_MAGIC, 0, C.NBD_CMD_FLUSH, 7, 0, 0)
SCRIPTS = [
    run_pair(ClientHandshake("disk0"), make_server())[2] + REQUEST,
    FLAGS + opt(0x99, b"xyz") + opt(C.NBD_OPT_LIST) + opt(C.NBD_OPT_STRUCTURED_REPLY)
    + opt(C.NBD_OPT_LIST_META_CONTEXT, meta_data("", ["base:"]))
    + opt(C.NBD_OPT_SET_META_CONTEXT, meta_data("disk0", ["base:allocation"]))
    + opt(C.NBD_OPT_INFO, go_data("nope")) + opt(C.NBD_OPT_GO, struct.pack(">I", 99))
    + opt(C.NBD_OPT_GO, go_data("disk0", [C.NBD_INFO_NAME])) + REQUEST,
    FLAGS + opt(C.NBD_OPT_EXPORT_NAME, b"ro") + REQUEST,
]


def _outcome(script, chunks):
    server, unfed = make_server(), bytearray()
    events, out = feed(server, script, chunks, unfed)
    return events, out, server.trailing_data + unfed


@pytest.mark.parametrize("script", SCRIPTS, ids=["client-go", "many-options", "export-name"])
def test_byte_at_a_time_matches_all_at_once(script):
    assert _outcome(script, [1] * len(script)) == _outcome(script, None)


@settings(max_examples=200, deadline=None)
@given(script=st.sampled_from(SCRIPTS), chunks=st.lists(st.integers(1, 40), max_size=60))
def test_random_chunking_matches_all_at_once(script, chunks):
    assert _outcome(script, chunks) == _outcome(script, None)


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.integers(1, 30), max_size=60))
def test_client_random_chunking_matches_all_at_once(chunks):
    # Replay the server's whole output into fresh clients, chunked differently.
    server = make_server()
    server.receive_data(SCRIPTS[0])
    while not isinstance(server.next_event(), ExportSelected):
        pass
    stream = server.data_to_send()

    def outcome(sizes):
        client, pos, event = ClientHandshake("disk0"), 0, None
        for size in [*sizes, len(stream)]:
            piece, pos = stream[pos:pos + size], pos + size
            if piece:
                client.receive_data(piece)
            event = step(client)
            if event is not None:
                return event
        return event

    assert outcome(chunks) == outcome([])
