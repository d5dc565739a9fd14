"""Topic aliases both ways (mqttd/aliases.py and the connection), with bytes and task.Clock."""
from __future__ import annotations

import pytest

from mqttd.aliases import InboundAliases, OutboundAliases
from mqttd.codec.errors import MQTTError, ProtocolError
from mqttd.codec.packets import Disconnect, Properties, Publish

from core.harness import FakeClient, make_broker


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


# --- the tables ------------------------------------------------------------------------

def test_inbound_alias_binds_then_resolves():
    """A topic with an alias binds it; an empty topic with the alias uses the binding."""
    table = InboundAliases(10)
    assert table.resolve("a/b", 3) == "a/b"
    assert table.resolve("", 3) == "a/b"
    assert table.resolve("c", 3) == "c"  # rebinding is allowed
    assert table.resolve("", 3) == "c"


@pytest.mark.parametrize("alias", [0, 11, 65535])
def test_inbound_alias_outside_the_announced_maximum_is_0x94(alias):
    """0 or above Topic Alias Maximum: Topic Alias invalid 0x94 [MQTT-3.3.2-8, MQTT-3.3.2-9]."""
    with pytest.raises(MQTTError) as info:
        InboundAliases(10).resolve("t", alias)
    assert info.value.reason_code == 0x94


def test_inbound_unknown_alias_with_empty_topic_is_a_protocol_error():
    """An alias never bound on this connection cannot stand for a topic (0x82)."""
    with pytest.raises(ProtocolError):
        InboundAliases(10).resolve("", 2)


def test_outbound_aliases_replace_the_least_recently_used():
    """The most recently used topics keep their alias; a new topic takes the LRU one's."""
    table = OutboundAliases(2)

    def send(topic):
        alias, known = table.alias_for(topic)
        table.sent(topic, alias, known)
        return alias, known

    assert send("a") == (1, False)
    assert send("b") == (2, False)
    assert send("a") == (1, True)
    assert send("c") == (2, False)   # b was least recently used
    assert send("a") == (1, True)
    assert send("b") == (2, False)   # c is now the LRU one
    assert table.lookup("c") is None and len(table) == 2


def test_outbound_alias_is_not_taken_until_sent():
    """alias_for() alone changes nothing: an unsent PUBLISH must not bind an alias."""
    table = OutboundAliases(1)
    assert table.alias_for("a") == (1, False)
    assert table.alias_for("a") == (1, False)
    assert len(table) == 0


# --- inbound through the connection -------------------------------------------------------

def _pair(broker, clock, sub_level=5, **connect):
    sub = FakeClient(broker, clock, level=sub_level)
    sub.connect("sub", **connect)
    sub.subscribe("#", qos=1)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    return sub, pub


def test_connack_announces_the_configured_topic_alias_maximum():
    """CONNACK carries Topic Alias Maximum = --max-topic-alias (default 10); 0 leaves it out."""
    broker, clock = make_broker()
    assert FakeClient(broker, clock, level=5).connect("a")[0].properties.topic_alias_maximum == 10
    broker, clock = make_broker(max_topic_alias=0)
    assert FakeClient(broker, clock, level=5).connect("a")[0].properties.topic_alias_maximum is None


def test_inbound_alias_is_resolved_and_never_forwarded():
    """Subscribers get the full topic name and no Topic Alias of the publisher's connection."""
    broker, clock = make_broker()
    sub, pub = _pair(broker, clock, sub_level=4)
    pub.publish("room/1/temp", b"20", qos=1, properties=Properties(topic_alias=1))
    pub.publish("", b"21", qos=1, packet_id=2, properties=Properties(topic_alias=1))
    got = publishes(sub.received())
    assert [(p.topic, p.payload) for p in got] == [("room/1/temp", b"20"), ("room/1/temp", b"21")]


def test_inbound_alias_bytes_are_not_reused_for_v5_subscribers():
    """A v5 subscriber's PUBLISH is encoded anew: the received bytes carry the alias."""
    broker, clock = make_broker()
    sub, pub = _pair(broker, clock)
    # PUBLISH QoS 0, topic "t", properties: topic alias 1, payload "x"
    pub.send_bytes(bytes.fromhex("30 08 0001 74 03 230001 78".replace(" ", "")))
    pub.send_bytes(bytes.fromhex("30 07 0000 03 230001 79".replace(" ", "")))
    raw = sub.raw()
    # "t" with no properties, payload "x"; then "t" again with payload "y"
    assert raw == bytes.fromhex("30 05 0001 74 00 78 30 05 0001 74 00 79".replace(" ", ""))


@pytest.mark.parametrize("alias", [11, 500])
def test_inbound_alias_above_the_maximum_disconnects_with_0x94(alias):
    """A client exceeding the announced Topic Alias Maximum gets DISCONNECT 0x94 [MQTT-3.3.2-9]."""
    broker, clock = make_broker()
    sub, pub = _pair(broker, clock)
    pub.publish("t", b"x", properties=Properties(topic_alias=alias))
    (packet,) = pub.received()
    assert isinstance(packet, Disconnect) and packet.reason_code == 0x94
    assert pub.disconnecting
    assert publishes(sub.received()) == []


def test_any_alias_is_refused_when_the_maximum_is_0():
    """--max-topic-alias 0: no alias is acceptable (0x94)."""
    broker, clock = make_broker(max_topic_alias=0)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t", b"x", properties=Properties(topic_alias=1))
    assert [p.reason_code for p in pub.received() if isinstance(p, Disconnect)] == [0x94]


def test_unbound_alias_with_empty_topic_disconnects_with_0x82():
    """An empty topic name with an alias not set on this connection is a Protocol Error."""
    broker, clock = make_broker()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("", b"x", properties=Properties(topic_alias=4))
    assert [p.reason_code for p in pub.received() if isinstance(p, Disconnect)] == [0x82]


def test_inbound_aliases_do_not_survive_a_reconnect():
    """Mappings belong to one network connection [MQTT-3.3.2-7]."""
    broker, clock = make_broker()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t", b"x", properties=Properties(topic_alias=1))
    pub.drop()
    again = FakeClient(broker, clock, level=5)
    again.connect("pub")
    again.publish("", b"x", properties=Properties(topic_alias=1))
    assert [p.reason_code for p in again.received() if isinstance(p, Disconnect)] == [0x82]


# --- outbound ----------------------------------------------------------------------------

def test_outbound_aliases_are_used_when_the_client_allows_them():
    """With Topic Alias Maximum in CONNECT the server sends the topic once, then only the alias."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub", properties=Properties(topic_alias_maximum=2))
    sub.subscribe("#", qos=0)
    for topic in ("a", "a", "b", "c", "a"):
        broker.publish_message(topic, b"p")
    raw = sub.raw()
    # a + alias 1; alias 1 alone; b + alias 2; c takes alias 1 (a was least
    # recently used); a takes alias 2 (b was)
    assert raw == bytes.fromhex(
        "30 08 0001 61 03 230001 70"
        "30 07 0000 03 230001 70"
        "30 08 0001 62 03 230002 70"
        "30 08 0001 63 03 230001 70"
        "30 08 0001 61 03 230002 70".replace(" ", ""))
    got = sub.reader.feed(raw)
    assert [(p.topic, p.properties.topic_alias) for p in got] == [
        ("a", 1), ("", 1), ("b", 2), ("c", 1), ("a", 2)]


def test_no_outbound_aliases_without_the_clients_maximum():
    """A client that sent no Topic Alias Maximum never gets an alias [MQTT-3.3.2-11]."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub")
    sub.subscribe("#", qos=1)
    for _ in range(3):
        broker.publish_message("a", b"p", qos=1)
    assert [p.properties.topic_alias for p in publishes(sub.received())] == [None] * 3


def test_outbound_aliases_start_afresh_on_reconnect():
    """Resent and queued messages after a reconnect carry the full topic again [MQTT-3.3.2-7]."""
    broker, clock = make_broker()
    props = Properties(topic_alias_maximum=5, session_expiry_interval=60)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub", clean=False, properties=props)
    sub.subscribe("#", qos=1)
    broker.publish_message("a", b"1", qos=1)
    broker.publish_message("a", b"2", qos=1)
    first = publishes(sub.received())
    assert [(p.topic, p.properties.topic_alias) for p in first] == [("a", 1), ("", 1)]
    sub.drop()
    again = FakeClient(broker, clock, level=5)
    again.connect("sub", clean=False, properties=props)
    resent = publishes(again.received())
    assert [(p.topic, p.dup, p.properties.topic_alias) for p in resent] == [
        ("a", True, 1), ("", True, 1)]


def test_a_publish_too_large_for_the_client_does_not_bind_an_alias():
    """A PUBLISH dropped for the client's Maximum Packet Size leaves the alias table unchanged."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub", properties=Properties(topic_alias_maximum=1, maximum_packet_size=20))
    sub.subscribe("#", qos=0)
    broker.publish_message("big", b"x" * 50)
    broker.publish_message("big", b"y")
    (p,) = publishes(sub.received())
    assert (p.topic, p.payload, p.properties.topic_alias) == ("big", b"y", 1)


def test_long_topic_names_are_sent_whole_and_never_take_an_alias():
    """A name over CACHED_NAME_LIMIT goes out without an alias; the table keeps short ones only (REVIEW-S10 S14)."""
    from mqttd.topics import CACHED_NAME_LIMIT
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub", properties=Properties(topic_alias_maximum=100))
    sub.subscribe("#", qos=0)
    long_names = ["l%d/" % n + "x" * 30000 for n in range(20)]
    for topic in long_names + ["short"] + long_names[:2] + ["short"]:
        broker.publish_message(topic, b"p")
    got = publishes(sub.received())
    assert [p.topic for p in got] == long_names + ["short"] + long_names[:2] + [""]
    assert [p.properties.topic_alias for p in got] == [None] * 20 + [1, None, None, 1]
    aliases = sub.conn._out_aliases._aliases
    assert list(aliases) == ["short"] and all(len(t) <= CACHED_NAME_LIMIT for t in aliases)
