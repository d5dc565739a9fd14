"""paho-mqtt v5 against mqttd: shared subscriptions, subscription identifiers, topic
aliases, flow control and announced capabilities, durable state across a restart.

Absence is checked without sleeping: after the thing that must not arrive, a
marker message is sent through the broker and must arrive alone.
"""

from __future__ import annotations

import pytest
from paho.mqtt.client import MQTTv5, MQTTv311
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from test_paho import WAIT, Paho, unique

pytestmark = [pytest.mark.interop, pytest.mark.mqttd_only]


@pytest.fixture
def clients():
    made = []

    def make(broker, protocol=MQTTv5, **kwargs):
        c = Paho(broker, protocol, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def subscribe(client, topic, qos=1, sid=None, **options):
    """SUBSCRIBE with options and an optional Subscription Identifier; returns the codes."""
    props = None
    if sid is not None:
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = sid
    result, mid = client.client.subscribe(topic, options=SubscribeOptions(qos=qos, **options),
                                          properties=props)
    assert result == 0
    got_mid, rcs, _ = client.subacks.get(timeout=WAIT)
    assert got_mid == mid
    return [int(rc.value) for rc in rcs]


def drain_until_marker(broker, clients_, topic, make):
    """What each client received before a marker published after everything else."""
    marker = unique("marker")
    for c in clients_:
        c.subscribe(marker, qos=1)
    pub = make(broker, client_id=unique("marker-pub"))
    pub.connect()
    pub.publish(marker, b"m", qos=1)
    return [c.expect_marker(marker, b"m") for c in clients_]


def test_paho_connack_announces_what_is_supported(mqttd_broker_factory, clients):
    """Shared subscriptions, identifiers, aliases, limits and Response Information in CONNACK."""
    broker = mqttd_broker_factory(extra_args=[
        "--max-topic-alias", "4", "--max-inflight-incoming", "9", "--max-qos", "1",
        "--retain-available", "false", "--response-information", "reply/"])
    c = clients(broker, client_id="rr-client")
    props = Properties(PacketTypes.CONNECT)
    props.RequestResponseInformation = 1
    c.client.connect(broker.host, broker.port, keepalive=30, properties=props)
    c.client.loop_start()
    _flags, rc, ack = c.connacks.get(timeout=WAIT)
    assert not rc.is_failure
    assert ack.TopicAliasMaximum == 4
    assert ack.ReceiveMaximum == 9
    assert ack.MaximumQoS == 1
    assert ack.RetainAvailable == 0
    assert ack.SharedSubscriptionAvailable == 1
    assert ack.SubscriptionIdentifierAvailable == 1
    assert ack.ResponseInformation == "reply/rr-client"
    # granted at most Maximum QoS; a retained PUBLISH is refused with 0x9A
    assert subscribe(c, "cap/#", qos=2) == [1]
    c.client.publish("cap/x", b"r", qos=0, retain=True)
    assert int(c.disconnects.get(timeout=WAIT).value) == 0x9A


@pytest.mark.parametrize("strategy", ["round-robin", "hash-topic"])
def test_paho_shared_subscription_one_member_per_message(mqttd_broker_factory, clients, strategy):
    """v5 and v3.1.1 members of one group: each message to exactly one of them; round-robin
    spreads evenly, hash-topic sends one topic to one member."""
    broker = mqttd_broker_factory(extra_args=["--shared-subscription-strategy", strategy])
    members = []
    for i, protocol in enumerate((MQTTv5, MQTTv5, MQTTv311)):
        m = clients(broker, protocol, client_id=unique("member%d" % i))
        m.connect()
        m.subscribe("$share/workers/jobs/#", qos=1)
        members.append(m)
    pub = clients(broker, client_id=unique("pub"))
    pub.connect()
    for i in range(6):
        pub.publish("jobs/%d" % (i % 2 if strategy == "hash-topic" else i), b"%d" % i, qos=1)
    got = drain_until_marker(broker, members, "jobs", clients)
    payloads = sorted(m.payload for msgs in got for m in msgs)
    assert payloads == [b"%d" % i for i in range(6)]
    if strategy == "round-robin":
        assert [len(msgs) for msgs in got] == [2, 2, 2]
    else:
        for msgs in got:  # one topic, one member
            assert len({m.topic for m in msgs}) <= 2
            for topic in {m.topic for m in msgs}:
                assert all(m.topic != topic for other in got if other is not msgs for m in other)


def test_paho_shared_subscription_redelivers_when_a_member_goes_away(mqttd_broker, clients):
    """A member that leaves (clean session) without acknowledging what it got: those messages
    go to the remaining member; nothing is lost; no retained message on a shared subscribe."""
    pub = clients(mqttd_broker, client_id=unique("pub"))
    pub.connect()
    pub.publish("work/r", b"retained", qos=1, retain=True)
    stay = clients(mqttd_broker, client_id=unique("stay"))
    stay.connect()
    stay.subscribe("$share/g/work/#", qos=1)
    leave = clients(mqttd_broker, client_id=unique("leave"))
    leave.client._send_puback = lambda mid: 0  # takes messages, never acknowledges them
    leave.connect()
    leave.subscribe("$share/g/work/#", qos=1)
    for i in range(10):
        pub.publish("work/%d" % i, b"%d" % i, qos=1)
    got_leave = [leave.expect().payload for _ in range(5)]  # round-robin: every second one
    leave.drop()
    (got_stay,) = drain_until_marker(mqttd_broker, [stay], "work", clients)
    stay_payloads = [m.payload for m in got_stay]
    assert b"retained" not in stay_payloads and b"retained" not in got_leave
    # the five unacknowledged ones came again, to the member that stayed
    assert sorted(stay_payloads) == sorted(b"%d" % i for i in range(10))


def test_paho_no_local_on_shared_subscription_is_a_protocol_error(mqttd_broker, clients):
    """SUBSCRIBE $share/... with No Local: DISCONNECT 0x82 [MQTT-3.8.3-4]."""
    c = clients(mqttd_broker, client_id=unique("nl"))
    c.connect()
    c.client.subscribe("$share/g/t", options=SubscribeOptions(qos=1, noLocal=True))
    assert int(c.disconnects.get(timeout=WAIT).value) == 0x82


def test_paho_subscription_identifiers(mqttd_broker, clients):
    """Each delivery carries the identifiers of every matching subscription."""
    c = clients(mqttd_broker, client_id=unique("ids"))
    c.connect()
    assert subscribe(c, "sid/#", qos=0, sid=11) == [0]
    assert subscribe(c, "sid/+", qos=1, sid=12) == [1]
    c.publish("sid/a", b"two", qos=1)
    msg = c.expect()
    assert msg.qos == 1 and sorted(msg.properties.SubscriptionIdentifier) == [11, 12]
    c.publish("sid/a/b", b"one", qos=1)
    assert c.expect().properties.SubscriptionIdentifier == [11]


def test_paho_inbound_topic_aliases(mqttd_broker, clients):
    """paho sets an alias then publishes with an empty topic; subscribers see the topic;
    an alias above the maximum gets DISCONNECT 0x94."""
    sub = clients(mqttd_broker, client_id=unique("sub"))
    sub.connect()
    sub.subscribe("al/#", qos=1)
    pub = clients(mqttd_broker, client_id=unique("pub"))
    pub.connect()
    for topic, payload in (("al/long/topic/name", b"1"), ("", b"2")):
        props = Properties(PacketTypes.PUBLISH)
        props.TopicAlias = 3
        pub.publish(topic, payload, qos=1, properties=props)
    got = [sub.expect(), sub.expect()]
    assert [(m.topic, m.payload) for m in got] == [("al/long/topic/name", b"1"),
                                                   ("al/long/topic/name", b"2")]
    assert all(getattr(m.properties, "TopicAlias", None) is None for m in got)
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 11
    pub.client.publish("al/x", b"bad", qos=0, properties=props)
    assert int(pub.disconnects.get(timeout=WAIT).value) == 0x94


def test_paho_receive_maximum_is_enforced(mqttd_broker_factory, clients):
    """A client ignoring the announced Receive Maximum (QoS 2 flows left open) gets 0x93."""
    broker = mqttd_broker_factory(extra_args=["--max-inflight-incoming", "2"])
    c = clients(broker, client_id=unique("greedy"))
    c.connect()
    # paho itself honours Receive Maximum: raise its idea of it to break the rule
    c.client._max_inflight_messages = 10
    c.client._receive_maximum = 10
    c.client._send_pubrel = lambda mid: 0  # never release: QoS 2 flows stay open
    for i in range(3):
        c.client.publish("rm/t", b"%d" % i, qos=2)
    assert int(c.disconnects.get(timeout=WAIT).value) == 0x93


def test_paho_shared_subscription_and_identifiers_survive_a_restart(mqttd_broker_factory, clients):
    """A persistent member's shared subscription and identifier are stored; after a restart
    a message to the group waits in its queue and arrives with its identifier."""
    broker = mqttd_broker_factory(persistence="file:data")
    member_id = unique("durable")
    m = clients(broker, client_id=member_id, session_expiry=600, clean=False)
    m.connect()
    assert subscribe(m, "$share/dur/ds/#", qos=1, sid=77) == [1]
    m.disconnect()
    broker.restart()
    pub = clients(broker, client_id=unique("pub"))
    pub.connect()
    pub.publish("ds/1", b"queued", qos=1)
    m2 = clients(broker, client_id=member_id, session_expiry=600, clean=False)
    flags, _rc, _props = m2.connect()
    assert flags.session_present
    msg = m2.expect()
    assert (msg.payload, msg.properties.SubscriptionIdentifier) == (b"queued", [77])
    pub.publish("ds/2", b"live", qos=1)
    msg = m2.expect()
    assert (msg.payload, msg.properties.SubscriptionIdentifier) == (b"live", [77])
