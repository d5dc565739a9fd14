"""Subscription Identifiers: stored with the subscription, sent on every matching
delivery, all of them when several subscriptions match, kept across restarts."""
from __future__ import annotations

from mqttd.codec.packets import (
    Connect, Properties, Publish, Suback, Subscribe, Subscription)

from core.harness import FakeClient, make_broker
from mqtt5.storeutil import RecordingStore


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def sub_with_id(client, topic_filter, sid, qos=1, packet_id=1, **options):
    props = Properties(subscription_identifiers=(sid,)) if sid is not None else Properties()
    client.send(Subscribe(packet_id, (Subscription(topic_filter, qos, **options),), props))
    return client.received()


def test_connack_announces_subscription_identifiers_available():
    """CONNACK: Subscription Identifier Available = 1 [MQTT 5.0 §3.2.2.3.12]."""
    broker, clock = make_broker()
    connack = FakeClient(broker, clock, level=5).connect("a")[0]
    assert connack.properties.subscription_identifier_available == 1


def test_identifier_is_sent_with_each_matching_message():
    """The identifier of the matching subscription comes with the PUBLISH [MQTT-3.3.4-3]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    assert sub_with_id(c, "t/#", 268435455) == [Suback(1, (1,))]
    broker.publish_message("t/1", b"x", qos=1)
    broker.publish_message("t/2", b"y", qos=0)
    got = publishes(c.received())
    assert [p.properties.subscription_identifiers for p in got] == [(268435455,)] * 2


def test_identifier_bytes_on_the_wire():
    """PUBLISH bytes: property 0x0B with the identifier as a variable byte integer."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    sub_with_id(c, "t", 200, qos=0)
    broker.publish_message("t", b"x")
    # topic "t", properties length 3: 0B C8 01 (200 as varint), payload "x"
    assert c.raw() == bytes.fromhex("3008 0001 74 03 0bc801 78".replace(" ", ""))


def test_all_identifiers_when_several_subscriptions_match():
    """One copy at the highest QoS, carrying every matching identifier [MQTT-3.3.4-4, MQTT-3.3.4-5]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    sub_with_id(c, "t/#", 1, qos=0)
    sub_with_id(c, "t/+", 2, qos=1, packet_id=2)
    sub_with_id(c, "t/x", None, qos=0, packet_id=3)
    broker.publish_message("t/x", b"x", qos=1)
    (p,) = publishes(c.received())
    assert p.qos == 1
    assert sorted(p.properties.subscription_identifiers) == [1, 2]


def test_subscribers_without_identifiers_get_none_and_share_bytes_with_others():
    """Identifiers make the PUBLISH per subscriber; others still get the plain bytes."""
    broker, clock = make_broker()
    a = FakeClient(broker, clock, level=5)
    a.connect("a")
    sub_with_id(a, "t", 5)
    b = FakeClient(broker, clock, level=5)
    b.connect("b")
    sub_with_id(b, "t", None)
    c = FakeClient(broker, clock, level=5)
    c.connect("c")
    sub_with_id(c, "t", 5)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t", b"m", qos=1)
    ids = [[p.properties.subscription_identifiers for p in publishes(x.received())]
           for x in (a, b, c)]
    assert ids == [[(5,)], [()], [(5,)]]


def test_retained_messages_on_subscribe_carry_the_identifier():
    """Retained messages sent because of a SUBSCRIBE carry its identifier too."""
    broker, clock = make_broker()
    broker.publish_message("r", b"kept", qos=1, retain=True)
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    (p,) = publishes(sub_with_id(c, "r", 77))
    assert p.retain and p.properties.subscription_identifiers == (77,)


def test_resubscribing_without_identifier_removes_it():
    """A SUBSCRIBE replacing a subscription replaces its identifier too [MQTT-3.8.4-3]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    sub_with_id(c, "t", 3)
    sub_with_id(c, "t", None, packet_id=2)
    broker.publish_message("t", b"x", qos=1)
    (p,) = publishes(c.received())
    assert p.properties.subscription_identifiers == ()


def test_v311_subscriber_never_gets_identifiers():
    """A v3.1.1 subscriber on the same topic gets the plain MQTT 3.1.1 PUBLISH."""
    broker, clock = make_broker()
    a = FakeClient(broker, clock, level=5)
    a.connect("a")
    sub_with_id(a, "t", 9, qos=0)
    b = FakeClient(broker, clock, level=4)
    b.connect("b")
    b.subscribe("t")
    broker.publish_message("t", b"x")
    assert b.raw() == bytes.fromhex("3004 0001 74 78".replace(" ", ""))


def test_queued_messages_and_subscriptions_keep_identifiers_across_a_restart():
    """Identifiers are stored with the subscription and with queued messages."""
    store = RecordingStore()
    broker, clock = make_broker(store=store)
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "p", False, properties=Properties(session_expiry_interval=600)))
    c.send(Subscribe(1, (Subscription("s/#", 1),), Properties(subscription_identifiers=(12,))))
    clock.advance(0)
    c.received()
    c.drop()
    broker.publish_message("s/queued", b"q", qos=1)
    broker2, clock2 = make_broker()
    broker2.restore(store.stored_state())
    assert broker2.sessions["p"].subscriptions["s/#"].subscription_identifier == 12
    back = FakeClient(broker2, clock2, level=5)
    back.connect("p", clean=False, properties=Properties(session_expiry_interval=600))
    broker2.publish_message("s/live", b"l", qos=1)
    got = publishes(back.received())
    assert [(p.payload, p.properties.subscription_identifiers) for p in got] == [
        (b"q", (12,)), (b"l", (12,))]


def test_no_local_subscription_does_not_hide_another_matching_subscription():
    """Each subscription's own options apply before merging: No Local on one, another still delivers."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("n1")
    sub_with_id(c, "t/#", 1, qos=0)
    sub_with_id(c, "t/x", 2, qos=1, packet_id=2, no_local=True)
    c.publish("t/x", b"own", qos=0)
    (p,) = publishes(c.received())
    assert p.qos == 0 and p.properties.subscription_identifiers == (1,)
