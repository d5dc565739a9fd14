"""Protocol strictness per level (issue 7 faults 4, 5, 8), bytes fed to ClientConnection."""
from __future__ import annotations

import pytest

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import (
    Connack, Connect, Disconnect, Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel,
    Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will)

from codec.fixtures import hexb
from core.harness import FakeClient, make_broker


def _closed_silently(client) -> bool:
    return client.disconnecting and client.raw() == b""


def _v5_disconnect(client):
    packets = client.received()
    assert client.disconnecting
    assert packets and isinstance(packets[-1], Disconnect), packets
    return packets[-1]


# --- fault 4: flags per protocol level --------------------------------------------------

def _mqtt31_client(broker, clock):
    c = FakeClient(broker, clock, level=3)
    c.connect("c31")
    return c


def test_mqtt31_subscribe_and_unsubscribe_retransmissions_are_answered():
    """MQTT 3.1 allows DUP on SUBSCRIBE/UNSUBSCRIBE (0x8A, 0xAA): SUBACK/UNSUBACK, no close."""
    broker, clock = make_broker()
    c = _mqtt31_client(broker, clock)
    c.send_bytes(hexb("8a 06 00 07 00 01 61 01"))        # SUBSCRIBE dup, id 7, "a" QoS 1
    assert c.received() == [Suback(7, (1,))]
    c.send_bytes(hexb("aa 05 00 08 00 01 61"))           # UNSUBSCRIBE dup, id 8, "a"
    assert c.received() == [Unsuback(8)]
    assert not c.disconnecting


def test_mqtt31_pubrel_retransmission_is_answered():
    """MQTT 3.1 allows DUP on PUBREL (0x6A): PUBCOMP, no close."""
    broker, clock = make_broker()
    c = _mqtt31_client(broker, clock)
    c.publish("a", b"x", qos=2, packet_id=5)
    assert c.received() == [Pubrec(5)]
    c.send_bytes(hexb("6a 02 00 05"))
    assert c.received() == [Pubcomp(5)]
    assert not c.disconnecting


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("data", ["8a 06 00 07 00 01 61 01", "aa 05 00 08 00 01 61",
                                  "6a 02 00 05"])
def test_dup_on_subscribe_unsubscribe_pubrel_still_closes_in_311_and_5(level, data):
    """3.1.1 and 5.0 keep their flag rules [MQTT-2.2.2-2], [MQTT-2.1.3-1]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=level)
    c.connect("c")
    if level == 5:
        data = {"8a 06 00 07 00 01 61 01": "8a 07 00 07 00 00 01 61 01",
                "aa 05 00 08 00 01 61": "aa 06 00 08 00 00 01 61"}.get(data, data)
    c.send_bytes(hexb(data))
    assert c.disconnecting
    if level == 5:
        assert c.received()[-1].reason_code == 0x81


def test_mqtt31_connect_with_reserved_flag_is_accepted():
    """MQTT 3.1 has no reserved-bit rule in CONNECT flags: CONNACK 0."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=3)
    c.send_bytes(hexb("10 10 00 06 4d 51 49 73 64 70 03 03 00 3c 00 02 63 31"))
    assert c.received() == [Connack(False, 0)]


def test_311_connect_with_reserved_flag_is_closed_without_connack():
    """3.1.1: the reserved flag is malformed; closed without a CONNACK [MQTT-3.1.2-3, 3.1.4-1]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=4)
    c.send_bytes(hexb("10 0e 00 04 4d 51 54 54 04 03 00 3c 00 02 63 31"))
    assert _closed_silently(c)


# --- fault 5: the client's Maximum Packet Size binds every packet --------------------------

def _v5_with_max(broker, clock, size, client_id="m"):
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, client_id, True, 0, properties=Properties(maximum_packet_size=size)))
    return c


def test_disconnect_fits_the_client_maximum_packet_size():
    """Maximum Packet Size 20, then a protocol error: the DISCONNECT fits in 20 bytes, its
    Reason String left out [MQTT-3.1.2-24, 3.1.2-25]."""
    broker, clock = make_broker()
    c = _v5_with_max(broker, clock, 20)
    assert isinstance(c.received()[0], Connack)
    c.send_bytes(hexb("36 05 00 01 74 00 01"))   # PUBLISH QoS 3: malformed
    raw = c.raw()
    assert 0 < len(raw) <= 20
    [packet] = PacketReader(level=5).feed(raw)
    assert packet.reason_code == 0x81 and packet.properties.reason_string is None
    assert c.disconnecting


def test_disconnect_keeps_its_reason_string_when_it_fits():
    """Without a tight limit the Reason String is still sent (nothing dropped needlessly)."""
    broker, clock = make_broker()
    c = _v5_with_max(broker, clock, 10000)
    c.received()
    c.send_bytes(hexb("36 05 00 01 74 00 01"))
    assert _v5_disconnect(c).properties.reason_string


def test_suback_too_large_for_the_client_is_not_sent_and_closes():
    """A SUBACK that cannot fit is not sent [MQTT-3.1.2-24]; the client gets DISCONNECT 0x95."""
    broker, clock = make_broker()
    c = _v5_with_max(broker, clock, 20)
    c.received()
    c.send(Subscribe(1, tuple(Subscription(f"t/{i}") for i in range(30))))
    assert c.raw() == b""
    clock.advance(0)
    raw = c.raw()
    assert len(raw) <= 20
    assert PacketReader(level=5).feed(raw)[0].reason_code == 0x95
    assert c.disconnecting


def test_connack_too_large_for_the_client_is_not_sent():
    """A CONNACK over the client's limit is not sent, and no DISCONNECT precedes a CONNACK
    [MQTT-3.1.2-24, 3.14.0-1]: the connection is closed."""
    broker, clock = make_broker()
    c = _v5_with_max(broker, clock, 8)
    assert c.raw() == b""
    clock.advance(0)
    assert c.raw() == b"" and c.disconnecting


def test_connack_leaves_out_default_valued_properties_to_fit():
    """CONNACK properties equal to the spec default are left out before giving up."""
    broker, clock = make_broker()
    c = _v5_with_max(broker, clock, 100)
    conn = c.conn
    data = conn._fit(Connack(False, 0, Properties(maximum_packet_size=1000, retain_available=1,
                                                  maximum_qos=2, receive_maximum=65535,
                                                  reason_string="x" * 80)), b"", 12)
    [packet] = PacketReader(level=5).feed(data)
    assert packet.properties == Properties(maximum_packet_size=1000)


def test_publish_over_the_client_maximum_is_dropped_and_counted():
    """PUBLISH over the limit is discarded as if sent and counted [MQTT-3.1.2-25]."""
    broker, clock = make_broker()
    c = _v5_with_max(broker, clock, 40)
    c.received()
    c.subscribe("t")
    c.publish("t", b"x" * 100)
    assert [p for p in c.received() if isinstance(p, Publish)] == []
    assert broker.stats.dropped.get("client-maximum-packet-size") == 1
    assert not c.disconnecting


# --- fault 8: a protocol violation closes the connection ----------------------------------

@pytest.mark.parametrize("level", [3, 4])
@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "+a", "a/b+"])
def test_v3_subscribe_with_invalid_filter_closes(level, bad):
    """3.x: an invalid topic filter in SUBSCRIBE closes, no SUBACK [MQTT-4.8.0-1, 4.7.1-2]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=level)
    c.connect("c")
    c.send(Subscribe(1, (Subscription("ok"), Subscription(bad))))
    assert _closed_silently(c)


@pytest.mark.parametrize("level", [3, 4])
def test_v3_unsubscribe_with_invalid_filter_closes(level):
    """3.x: an invalid topic filter in UNSUBSCRIBE closes, no UNSUBACK [MQTT-4.8.0-1]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=level)
    c.connect("c")
    c.send(Unsubscribe(1, ("a/#/b",)))
    assert _closed_silently(c)


def test_v5_unsubscribe_with_invalid_filter_gets_0x8f():
    """v5: an invalid filter in UNSUBSCRIBE gets its own 0x8F; the others are processed."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("c")
    c.subscribe("ok")
    c.send(Unsubscribe(2, ("a/#/b", "ok")))
    assert c.received() == [Unsuback(2, (0x8F, 0x00))]


@pytest.mark.parametrize("level", [3, 4, 5])
@pytest.mark.parametrize("first", [0x40, 0x50, 0x62, 0x70])
def test_acknowledgement_with_packet_id_0_closes(level, first):
    """An acknowledgement with packet id 0 closes [MQTT-2.3.1-1, 4.8.0-1]; v5 DISCONNECT 0x82."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=level)
    c.connect("c")
    c.send_bytes(bytes((first, 2, 0, 0)))
    assert c.disconnecting
    if level == 5:
        assert _v5_disconnect(c).reason_code == 0x82
    else:
        assert c.raw() == b""


def _subscriber_with_inflight(level, qos):
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=level)
    sub.connect("sub")
    sub.subscribe("t", qos=qos)
    broker.publish_message("t", b"m", qos=qos)
    [publish] = [p for p in sub.received() if isinstance(p, Publish)]
    return broker, clock, sub, publish.packet_id


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("qos,wrong", [(1, Pubrec), (1, Pubcomp), (2, Puback), (2, Pubcomp)])
def test_acknowledgement_of_the_wrong_type_closes(level, qos, wrong):
    """PUBREC/PUBCOMP for QoS 1, PUBACK for QoS 2, PUBCOMP before PUBREC: a protocol
    violation [MQTT-4.8.0-1], [MQTT-4.3.2-1, 4.3.3-1]."""
    broker, clock, sub, pid = _subscriber_with_inflight(level, qos)
    sub.send(wrong(pid))
    assert sub.disconnecting
    if level == 5:
        assert _v5_disconnect(sub).reason_code == 0x82


@pytest.mark.parametrize("qos,ack", [(1, Puback), (2, Pubrec)])
def test_right_acknowledgement_and_unknown_ids_are_fine(qos, ack):
    """The right acknowledgement completes; one for an unknown id is ignored, not a close."""
    broker, clock, sub, pid = _subscriber_with_inflight(4, qos)
    sub.send(ack(pid))
    sub.send(Puback(999), Pubcomp(998))
    assert not sub.disconnecting


@pytest.mark.parametrize("data", [
    # 3.1.1 CONNECT whose protocol name is "MQTX"
    "10 0e 00 04 4d 51 54 58 04 02 00 3c 00 02 63 31",
    # 3.1 CONNECT whose protocol name is "MQIsdX"
    "10 10 00 06 4d 51 49 73 64 58 03 02 00 3c 00 02 63 31",
])
def test_v3_connect_with_wrong_protocol_name_is_closed_without_connack(data):
    """A 3.x CONNECT with a wrong protocol name: closed without a CONNACK [MQTT-3.1.4-1]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.send_bytes(hexb(data))
    assert _closed_silently(c)


@pytest.mark.parametrize("level", [3, 4])
@pytest.mark.parametrize("topic", ["", "a/+", "a/#"])
def test_v3_invalid_will_topic_is_closed_without_connack(level, topic):
    """An empty or wildcard will topic is a close, not CONNACK 0x03 [MQTT-3.1.4-1]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=level)
    c.send(Connect(level, "c", True, 0, will=Will(topic, b"x")))
    assert _closed_silently(c)
    assert "c" not in broker.sessions


def test_v5_invalid_will_topic_gets_connack_0x90():
    """v5 answers an invalid will topic with CONNACK 0x90 before closing."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "c", True, 0, will=Will("", b"x")))
    assert c.received() == [Connack(False, 0x90)] and c.disconnecting


@pytest.mark.parametrize("response_topic", ["a/+", "#", "a/#", ""])
def test_v5_response_topic_must_be_a_topic_name(response_topic):
    """A Response Topic with wildcards (or empty) is a protocol error [MQTT-3.3.2-14]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("c")
    c.publish("t", b"x", properties=Properties(response_topic=response_topic))
    assert _v5_disconnect(c).reason_code == 0x82


def test_v5_will_response_topic_with_wildcard_is_refused():
    """The will's Response Topic follows the same rule: CONNACK 0x82 [MQTT-3.3.2-14]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "c", True, 0, will=Will("w", b"x",
                                              properties=Properties(response_topic="r/#"))))
    assert c.received() == [Connack(False, 0x82)] and c.disconnecting


def test_v5_valid_response_topic_is_delivered():
    """A valid Response Topic passes through to subscribers."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("c")
    c.subscribe("t")
    c.publish("t", b"x", properties=Properties(response_topic="reply/c"))
    [p] = [p for p in c.received() if isinstance(p, Publish)]
    assert p.properties.response_topic == "reply/c"


def test_packets_before_a_malformed_one_in_the_same_chunk_are_handled():
    """PUBLISH then garbage in one TCP chunk: the PUBLISH is delivered, then the close —
    the same as when they arrive in two chunks (found by bench/fuzz.py)."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("t")
    c = FakeClient(broker, clock)
    c.connect("pub")
    c.send_bytes(encode(Publish("t", b"first", 0), 4) + b"\xf0\x00")
    assert c.disconnecting
    assert [p.payload for p in sub.received() if isinstance(p, Publish)] == [b"first"]
