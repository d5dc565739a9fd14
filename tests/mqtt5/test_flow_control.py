"""Flow control and server capabilities announced in CONNACK and enforced:
Receive Maximum (--max-inflight-incoming), Maximum QoS (--max-qos), Retain
Available (--retain-available), Response Information (--response-information)."""
from __future__ import annotations

import pytest

from mqttd.codec.packets import (
    Connack, Connect, Disconnect, Properties, Puback, Publish, Pubrec, Pubrel, Suback, Will)

from core.harness import FakeClient, make_broker
from mqtt5.storeutil import RecordingStore


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def disconnect_code(packets):
    codes = [p.reason_code for p in packets if isinstance(p, Disconnect)]
    return codes[-1] if codes else None


def test_connack_announces_exactly_what_is_supported_by_default():
    """Defaults: no Receive Maximum/Maximum QoS/Retain Available (spec defaults 65535/2/1),
    aliases 10, identifiers and shared subscriptions available, no Response Information."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    props = c.connect("a", properties=Properties(request_response_information=1))[0].properties
    assert props.receive_maximum is None
    assert props.maximum_qos is None
    assert props.retain_available is None
    assert props.wildcard_subscription_available is None
    assert props.topic_alias_maximum == 10
    assert props.subscription_identifier_available == 1
    assert props.shared_subscription_available == 1
    assert props.response_information is None


def test_connack_announces_configured_limits():
    """Configured limits appear in CONNACK (bytes checked by the codec fixtures)."""
    broker, clock = make_broker(max_inflight_incoming=5, max_qos=1, retain_available=False)
    props = FakeClient(broker, clock, level=5).connect("a")[0].properties
    assert (props.receive_maximum, props.maximum_qos, props.retain_available) == (5, 1, 0)


# --- Receive Maximum ----------------------------------------------------------------------

def test_receive_maximum_exceeded_by_qos1_disconnects_with_0x93():
    """More unacknowledged QoS 1/2 PUBLISHes than our Receive Maximum: DISCONNECT 0x93 [MQTT-3.3.4-8]."""
    store = RecordingStore()  # durable: PUBACKs wait for the store's turn
    broker, clock = make_broker(store=store, max_inflight_incoming=2)
    sub = FakeClient(broker, clock, level=5)  # a persistent subscriber: each message is stored
    sub.send(Connect(5, "s", False, properties=Properties(session_expiry_interval=60)))
    sub.subscribe("t", qos=1)
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "p", True))
    clock.advance(0)
    c.received()
    c.publish("t", b"1", qos=1, packet_id=1)
    c.publish("t", b"2", qos=1, packet_id=2)
    c.publish("t", b"3", qos=1, packet_id=3)
    assert disconnect_code(c.received()) == 0x93
    assert c.disconnecting


def test_acknowledged_publishes_free_their_place():
    """PUBLISHes acknowledged before the next ones never count against Receive Maximum."""
    broker, clock = make_broker(max_inflight_incoming=2)
    c = FakeClient(broker, clock, level=5)
    c.connect("p")
    for pid in range(1, 20):
        c.publish("t", b"x", qos=1, packet_id=pid)
    packets = c.received()
    assert disconnect_code(packets) is None
    assert len([p for p in packets if isinstance(p, Puback)]) == 19


def test_receive_maximum_counts_qos2_until_pubrel():
    """QoS 2 PUBLISHes count until their PUBREL; then there is room again."""
    broker, clock = make_broker(max_inflight_incoming=2)
    c = FakeClient(broker, clock, level=5)
    c.connect("p")
    c.publish("t", b"1", qos=2, packet_id=1)
    c.publish("t", b"2", qos=2, packet_id=2)
    assert [type(p) for p in c.received()] == [Pubrec, Pubrec]
    c.send(Pubrel(1))
    c.publish("t", b"3", qos=2, packet_id=3)
    assert disconnect_code(c.received()) is None
    c.publish("t", b"4", qos=2, packet_id=4)
    assert disconnect_code(c.received()) == 0x93


def test_a_resent_qos2_publish_does_not_count_twice():
    """A DUP re-send of a QoS 2 PUBLISH already counted is acknowledged, not refused."""
    broker, clock = make_broker(max_inflight_incoming=1)
    c = FakeClient(broker, clock, level=5)
    c.connect("p")
    c.publish("t", b"1", qos=2, packet_id=1)
    c.publish("t", b"1", qos=2, packet_id=1, dup=True)
    assert [type(p) for p in c.received()] == [Pubrec, Pubrec]


def test_v3_clients_are_not_bound_by_the_v5_receive_maximum():
    """Receive Maximum is announced to v5 clients only; v3 publishers are not cut off."""
    store = RecordingStore()
    broker, clock = make_broker(store=store, max_inflight_incoming=1)
    c = FakeClient(broker, clock, level=4)
    c.send(Connect(4, "old", True))
    for pid in (1, 2, 3):
        c.publish("t", b"x", qos=1, packet_id=pid)
    clock.advance(0)
    assert len([p for p in c.received() if isinstance(p, Puback)]) == 3


# --- Maximum QoS ----------------------------------------------------------------------------

@pytest.mark.parametrize("level", [4, 5])
def test_publish_above_maximum_qos_is_refused(level):
    """PUBLISH above --max-qos: v5 DISCONNECT 0x9B [MQTT-3.2.2-11], v3 close; nothing delivered."""
    broker, clock = make_broker(max_qos=1)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub")
    sub.subscribe("t", qos=2)
    c = FakeClient(broker, clock, level=level)
    c.connect("p")
    c.publish("t", b"x", qos=2)
    packets = c.received()
    assert c.disconnecting
    assert disconnect_code(packets) == (0x9B if level == 5 else None)
    assert publishes(sub.received()) == []


def test_subscribe_is_granted_at_most_maximum_qos():
    """SUBACK grants at most --max-qos [MQTT-3.2.2-10]; delivery follows the granted QoS."""
    broker, clock = make_broker(max_qos=1)
    c = FakeClient(broker, clock, level=4)
    c.connect("a")
    assert c.subscribe("t", "u", qos=2) == [Suback(1, (1, 1))]


@pytest.mark.parametrize("level, code", [(5, 0x9B), (4, 0x03)])
def test_will_qos_above_maximum_is_refused_at_connect(level, code):
    """A will with QoS above --max-qos is refused with CONNACK 0x9B (v3: 0x03) [MQTT-3.2.2-12]."""
    broker, clock = make_broker(max_qos=0)
    c = FakeClient(broker, clock, level=level)
    c.send(Connect(level, "w", True, will=Will("w/t", b"bye", qos=1)))
    (connack,) = c.received()
    assert isinstance(connack, Connack) and connack.reason_code == code
    assert c.disconnecting and "w" not in broker.sessions


# --- Retain Available --------------------------------------------------------------------------

@pytest.mark.parametrize("level", [4, 5])
def test_retained_publish_when_retain_is_unavailable_is_refused(level):
    """--retain-available false: a retained PUBLISH is v5 DISCONNECT 0x9A [MQTT-3.2.2-14], v3 close."""
    broker, clock = make_broker(retain_available=False)
    c = FakeClient(broker, clock, level=level)
    c.connect("p")
    c.publish("t", b"x", retain=True)
    assert c.disconnecting
    assert disconnect_code(c.received()) == (0x9A if level == 5 else None)
    assert len(broker.retained) == 0


def test_retained_will_when_retain_is_unavailable_is_refused_at_connect():
    """A will with retain = 1 is refused with CONNACK 0x9A when retain is unavailable [MQTT-3.2.2-13]."""
    broker, clock = make_broker(retain_available=False)
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "w", True, will=Will("w/t", b"bye", retain=True)))
    (connack,) = c.received()
    assert connack.reason_code == 0x9A


# --- Response Information ------------------------------------------------------------------------

def test_response_information_when_requested_and_configured():
    """Request Response Information = 1 gets the configured prefix plus the client id."""
    broker, clock = make_broker(response_information="reply/")
    c = FakeClient(broker, clock, level=5)
    props = c.connect("dev7", properties=Properties(request_response_information=1))[0].properties
    assert props.response_information == "reply/dev7"
    other = FakeClient(broker, clock, level=5)
    assert other.connect("dev8")[0].properties.response_information is None


def test_connack_bytes_announce_the_capabilities():
    """The CONNACK on the wire: exactly the supported features and the configured limits."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "a", True, 0))
    assert c.raw() == bytes.fromhex(
        "20 0f 00 00"          # CONNACK, remaining length 15, no session, success
        " 0c"                  # properties: 12 bytes
        " 22 000a"             # Topic Alias Maximum 10
        " 27 01000000"         # Maximum Packet Size 16 MiB
        " 29 01"               # Subscription Identifier Available 1
        " 2a 01")              # Shared Subscription Available 1
    broker, clock = make_broker(max_inflight_incoming=5, max_qos=1, retain_available=False,
                                max_topic_alias=0, response_information="r/")
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "a", True, 0, properties=Properties(request_response_information=1)))
    assert c.raw() == bytes.fromhex(
        "20 19 00 00 16"
        " 1a 0003 722f61"      # Response Information "r/a"
        " 21 0005"             # Receive Maximum 5
        " 24 01"               # Maximum QoS 1
        " 25 00"               # Retain Available 0 (no Topic Alias Maximum: 0)
        " 27 01000000"
        " 29 01 2a 01")
