"""Encoder choices that fixtures alone do not pin down."""
import pytest

from mqttd.codec import (
    NO_PROPERTIES, Auth, Connack, Connect, Disconnect, PacketReader, Properties, Puback,
    Publish, Pubrel, Suback, Subscribe, Subscription, Unsuback, encode, publish_template,
)


def test_v3_drops_properties_and_v5_fields():
    """For levels 3/4 properties and v5-only fields are simply not written."""
    props = Properties(reason_string="x")
    assert encode(Puback(1, 0x10, props), 4) == bytes.fromhex("40 02 00 01")
    assert encode(Disconnect(0x8E, props), 4) == bytes.fromhex("e0 00")
    assert encode(Unsuback(1, (0x11,), props), 4) == bytes.fromhex("b0 02 00 01")
    assert encode(Suback(1, (1, 0x80), props), 4) == bytes.fromhex("90 04 00 01 01 80")
    sub = Subscribe(1, (Subscription("a", 1, no_local=True, retain_handling=2),))
    assert encode(sub, 4) == bytes.fromhex("82 06 00 01 00 01 61 01")
    assert encode(Publish("t", b"", properties=Properties(topic_alias=1)), 4) == \
        bytes.fromhex("30 03 00 01 74")


def test_v3_connack_carries_the_return_code():
    """Connack.reason_code is the v3 return code; MQTT 3.1 has no session present bit."""
    assert encode(Connack(True, 0), 4) == bytes.fromhex("20 02 01 00")
    assert encode(Connack(True, 0), 3) == bytes.fromhex("20 02 00 00")


def test_connect_uses_standard_protocol_name_per_level():
    """Level 3 writes "MQIsdp", levels 4 and 5 "MQTT" (Connect.protocol_name "")."""
    assert encode(Connect(3, "c"), 3)[2:10] == b"\x00\x06MQIsdp"
    assert encode(Connect(4, "c"), 4)[2:8] == b"\x00\x04MQTT"
    assert encode(Connect(5, "c"), 5)[2:8] == b"\x00\x04MQTT"


def test_connect_level_mismatch_is_refused_unless_name_given():
    """A v4 Connect written as v5 would be garbage; an explicit name allows odd tests."""
    with pytest.raises(ValueError):
        encode(Connect(4, "c"), 5)
    raw = encode(Connect(6, "c", protocol_name="MQTT"), 4)
    assert raw[8] == 6


def test_v5_ack_short_forms():
    """Reason 0 without properties omits both; a reason alone omits the properties."""
    assert encode(Pubrel(7), 5) == bytes.fromhex("62 02 00 07")
    assert encode(Pubrel(7, 0x92), 5) == bytes.fromhex("62 03 00 07 92")
    assert encode(Disconnect(), 5) == bytes.fromhex("e0 00")
    assert encode(Auth(), 5) == bytes.fromhex("f0 00")
    assert encode(Puback(1, 0, Properties(reason_string="r")), 5) == \
        bytes.fromhex("40 08 00 01 00 04 1f 00 01 72")


@pytest.mark.parametrize("packet,level", [
    (Publish("t", qos=1), 4),                         # QoS 1 without packet id
    (Publish("t", qos=0, packet_id=3), 4),            # QoS 0 with packet id [MQTT-2.2.1-2]
    (Publish("t", qos=0, dup=True), 4),               # DUP on QoS 0 [MQTT-3.3.1-2]
    (Publish("t", qos=3, packet_id=1), 4),            # QoS 3
    (Publish("", b"x"), 4),                           # empty topic before v5
    (Auth(), 4),                                      # AUTH before v5
    (Connect(4, "c", password=b"p"), 4),              # password without user [MQTT-3.1.2-22]
    (Subscribe(1, ()), 4),                            # no subscriptions [MQTT-3.8.3-3]
    (Puback(0), 4),                                   # packet id 0
    (Puback(1), 6),                                   # unknown level
])
def test_encoder_refuses_packets_the_reader_would_reject(packet, level):
    """The encoder never writes what a conforming receiver must refuse."""
    with pytest.raises(ValueError):
        encode(packet, level)


def test_encoder_refuses_non_packets():
    """Passing something else is a TypeError, not a silent empty write."""
    with pytest.raises(TypeError):
        encode(object(), 4)


def test_large_publish_uses_multi_byte_remaining_length():
    """Remaining length 2**21 needs four varint bytes and decodes back."""
    payload = b"\x00" * (2**21)
    raw = encode(Publish("t", payload), 4)
    assert raw[:5] == bytes.fromhex("30 83 80 80 01")
    assert PacketReader(level=4).feed(raw) == [Publish("t", payload)]


@pytest.mark.parametrize("level", [3, 4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_template_equals_encode(level, qos):
    """Template bytes equal encode(Publish) for every packet id, with and without DUP."""
    props = Properties(content_type="c") if level == 5 else NO_PROPERTIES
    t = publish_template("a/b", b"payload" * 30, qos, True, props, level)
    if qos == 0:
        assert t.encode() == encode(Publish("a/b", b"payload" * 30, 0, True,
                                            properties=props), level)
        return
    for pid in (1, 2, 255, 256, 0x1234, 65535):
        for dup in (False, True):
            assert t.encode(pid, dup) == encode(
                Publish("a/b", b"payload" * 30, qos, True, dup, pid, props), level)


def test_publish_template_qos0_returns_the_same_bytes_object():
    """Fan-out of a QoS 0 message shares one bytes object across subscribers."""
    t = publish_template("a", b"x", 0, False, NO_PROPERTIES, 4)
    assert t.encode() is t.encode()


def test_publish_template_refuses_bad_packet_ids():
    """QoS>0 needs a packet id in 1..65535; QoS 0 takes neither id nor DUP."""
    t1 = publish_template("a", b"x", 1, False, NO_PROPERTIES, 4)
    for bad in (None, 0, 65536):
        with pytest.raises(ValueError):
            t1.encode(bad)
    t0 = publish_template("a", b"x", 0, False, NO_PROPERTIES, 4)
    with pytest.raises(ValueError):
        t0.encode(1)
    with pytest.raises(ValueError):
        t0.encode(dup=True)
