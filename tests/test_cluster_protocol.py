"""The cluster log protocol with the mirror's end and the service's end paired in memory (h11's
way): every request type answered, a reply with the wrong seq dropped, a timed-out request
resent under a new seq, a restarted service registered again with CTR + RESUME."""

import errno

from hypothesis import given, strategies as st

from appliance.cluster import protocol as p
from appliance.cluster.protocol import RequestType as T
from appliance.targets.mirror.logs.core import CoreLog

UUID = "mirror-0123"


class MemLog(CoreLog):
    """The in-memory log, as the service would hold it for one node."""

    def is_remote_recovering(self, region):
        return region in self.recovering, min(self.out_of_sync, default=self.region_count)


def open_log(uuid, args):
    log = MemLog()
    log.recovering = set()
    region_size, sync, regions = int(args[0]), args[1], int(args[2])
    log.ctr(region_size, regions, sync)
    return log


def pair():
    service = p.Service(open_log)
    client = p.Client(UUID, "65536 nosync 16", timeout=5.0)
    client.connection_made()
    server = p.ServerConnection(service)
    pump(client, server)
    assert client.state == "idle"
    return client, server, service


def pump(client, server, now=0.0):
    while out := client.data_to_send():
        server.receive_data(out)
        client.receive_data(server.data_to_send(), now)


def call(client, server, rtype, data=b""):
    client.request(rtype, data)
    pump(client, server)
    ev = client.next_event()
    assert isinstance(ev, p.Reply) and ev.type == rtype, ev
    return ev


def test_every_request_type_is_answered_by_the_log():
    client, server, service = pair()
    log = service.logs[UUID]
    assert p.U64.unpack(call(client, server, T.GET_REGION_SIZE).data) == (65536,)
    call(client, server, T.MARK_REGION, p.pack_regions([3, 7]))
    call(client, server, T.FLUSH)
    assert log.marked == {3, 7}
    assert p.I64.unpack(call(client, server, T.IS_CLEAN, p.U64.pack(3)).data) == (0,)
    assert p.I64.unpack(call(client, server, T.IS_CLEAN, p.U64.pack(4)).data) == (1,)
    call(client, server, T.CLEAR_REGION, p.pack_regions([3]))
    assert log.marked == {7}
    call(client, server, T.SET_REGION_SYNC, p.PAIR_QI.pack(5, 0))
    assert p.I64.unpack(call(client, server, T.IN_SYNC, p.U64.pack(5)).data) == (0,)
    assert p.U64.unpack(call(client, server, T.GET_SYNC_COUNT).data) == (15,)
    assert p.PAIR_IQ.unpack(call(client, server, T.GET_RESYNC_WORK).data) == (1, 5)
    assert p.PAIR_IQ.unpack(call(client, server, T.GET_RESYNC_WORK).data) == (0, 0)
    log.recovering.add(9)
    assert p.PAIR_IQ.unpack(call(client, server, T.IS_REMOTE_RECOVERING, p.U64.pack(9)).data) == (1, 5)
    assert call(client, server, T.STATUS_INFO).data == b"1 core"
    assert call(client, server, T.STATUS_TABLE).data == b"core 2 128 nosync"
    for rtype in (T.PRESUSPEND, T.POSTSUSPEND, T.RESUME):
        assert call(client, server, rtype).error == 0
    assert call(client, server, T.DTR).error == 0
    assert UUID not in service.logs
    assert call(client, server, T.GET_SYNC_COUNT).error == 0  # DTR'd: CTR + RESUME again
    assert UUID in service.logs


def test_bad_payload_gets_einval_not_a_dead_service():
    client, server, _ = pair()
    assert call(client, server, T.MARK_REGION, b"abc").error == -errno.EINVAL
    assert call(client, server, T.GET_REGION_SIZE).error == 0


def test_reply_with_the_wrong_seq_is_dropped():
    client, server, _ = pair()
    client.request(T.GET_REGION_SIZE)
    sent = client.data_to_send()
    server.receive_data(sent)
    good = server.data_to_send()
    stale = p.encode(p.Message(UUID, client.seq - 1, T.GET_REGION_SIZE, 0, p.U64.pack(1)))
    client.receive_data(stale)
    assert client.next_event() is p.NEED_DATA and client.dropped == 1
    client.receive_data(good)
    assert p.U64.unpack(client.next_event().data) == (65536,)


def test_a_timed_out_request_is_resent_and_its_late_reply_dropped():
    client, server, service = pair()
    client.request(T.MARK_REGION, p.pack_regions([2]), now=100.0)
    first = client.data_to_send()
    assert not client.check_timeout(104.9)
    assert client.check_timeout(105.0) and client.resent == 1
    second = client.data_to_send()
    server.receive_data(first)  # the slow first answer comes in after the resend
    server.receive_data(second)
    client.receive_data(server.data_to_send())
    ev = client.next_event()
    assert isinstance(ev, p.Reply) and ev.error == 0
    assert client.dropped == 1 and client.next_event() is p.NEED_DATA
    assert service.logs[UUID].marked == {2}


def test_service_restart_is_handled_with_ctr_and_resume():
    client, server, _ = pair()
    call(client, server, T.MARK_REGION, p.pack_regions([1]))
    client.request(T.IS_CLEAN, p.U64.pack(1))
    client.data_to_send()  # lost with the old service
    client.connection_lost()
    restarted = p.Service(open_log)
    seen = []
    handle = restarted.handle
    restarted.handle = lambda msg: (seen.append(msg.type), handle(msg))[1]
    server = p.ServerConnection(restarted)
    client.connection_made()
    pump(client, server)
    assert seen == [T.CTR, T.RESUME, T.IS_CLEAN]
    assert p.I64.unpack(client.next_event().data) == (1,)  # the new service's log is fresh


def test_service_that_forgot_the_log_on_the_same_connection_gets_ctr_and_resume():
    client, server, service = pair()
    service.logs.clear()
    assert p.U64.unpack(call(client, server, T.GET_SYNC_COUNT).data) == (16,)
    assert client.reconnects == 1 and UUID in service.logs  # the first connection's only


def test_refused_ctr_while_coming_back_says_gone():
    client, server, service = pair()
    client.connection_lost()
    service.open_log = lambda uuid, args: (_ for _ in ()).throw(OSError(errno.EAGAIN, "busy"))
    client.request(T.FLUSH)
    client.connection_made()
    pump(client, server)
    assert client.next_event() == p.Gone(-errno.EAGAIN)
    assert client.state == "disconnected"


def test_one_request_at_a_time():
    client, _, _ = pair()
    client.request(T.FLUSH)
    try:
        client.request(T.FLUSH)
    except p.ProtocolError as e:
        assert "FLUSH is still waiting" in str(e)
    else:
        raise AssertionError("a second request went on the wire")


def test_bad_bytes_are_a_protocol_error():
    d = p.Decoder()
    d.feed(p.HEADER.pack(b"x", 0, 1, 99, 0))
    try:
        d.next()
    except p.ProtocolError as e:
        assert "unknown request type 99" in str(e)
    else:
        raise AssertionError("type 99 decoded")


messages = st.builds(
    p.Message,
    uuid=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=128),
    seq=st.integers(0, p.SEQ_MOD - 1),
    type=st.sampled_from(list(T)),
    error=st.integers(-(2**31), 2**31 - 1),
    data=st.binary(max_size=300),
)


@given(st.lists(messages, min_size=1, max_size=5), st.integers(1, 400))
def test_messages_round_trip_however_the_stream_is_split(msgs, chunk):
    wire = b"".join(p.encode(m) for m in msgs)
    d, out = p.Decoder(), []
    for i in range(0, len(wire), chunk):
        d.feed(wire[i:i + chunk])
        while (m := d.next()) is not None:
            out.append(m)
    assert out == msgs


def test_cluster_section_and_clustered_table_say_what_is_wrong():
    import pytest

    from appliance import config
    from appliance.targets import TargetError
    from appliance.targets.mirror import table

    base = '[[device]]\nname = "z"\ntable = "0 8 zero"\n'
    c = config.loads(base + '[cluster]\nendpoints = ["http://127.0.0.1:2379"]\nnode = "n1"\n')
    assert (c.cluster.node, c.cluster.lease_ttl, c.cluster.etcd_timeout) == ("n1", 5, 10)
    assert config.loads(base).cluster is None
    with pytest.raises(config.ConfigError, match="etcd endpoint 'etcd:2379' is not an http"):
        config.loads(base + '[cluster]\nendpoints = "etcd:2379"\nnode = "n1"\n')
    p = table.parse("clustered 3 u1 2048 nosync 2 /a 0 /b 0".split())
    assert (p.uuid, p.region_size, p.sync, p.log_dev) == ("u1", 1 << 20, "nosync", None)
    with pytest.raises(TargetError, match=r"the clustered log takes <uuid> <region_size>"):
        table.parse("clustered 1 u1 2 /a 0 /b 0".split())
