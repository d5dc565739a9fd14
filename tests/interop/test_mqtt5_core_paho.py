"""paho-mqtt v5 against a broker subprocess: issue 7 faults 1, 2, 3, 6, 7.

Absence is checked with a marker message sent after the thing that must not
arrive.  The few real-time waits (will delay, message expiry) are short and
bounded; everything else waits on queues with a timeout.
"""

from __future__ import annotations

import queue
import time

import pytest
from paho.mqtt.client import MQTTv5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from test_paho import WAIT, Paho, clients, unique  # noqa: F401 (clients is a fixture)

pytestmark = pytest.mark.interop


@pytest.fixture
def v5(clients):
    """``v5(broker, client_id, **kw)``: a paho MQTT 5 client (stopped at teardown)."""
    def make(broker, client_id=None, **kwargs):
        return clients(broker, MQTTv5, client_id=client_id or unique("c"), **kwargs)
    return make


def will_props(delay=None, user=None, expiry=None):
    props = Properties(PacketTypes.WILLMESSAGE)
    if delay is not None:
        props.WillDelayInterval = delay
    if user is not None:
        props.UserProperty = user
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    return props


def connect_props(**values):
    props = Properties(PacketTypes.CONNECT)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def connect_with(client: Paho, clean=True, **props):
    """Connect with CONNECT properties; returns the CONNACK flags."""
    client.client.connect(client.broker.host, client.broker.port, keepalive=30,
                          clean_start=clean, properties=connect_props(**props))
    client.client.loop_start()
    flags, rc, _props = client.connacks.get(timeout=WAIT)
    assert not rc.is_failure, rc
    return flags


def marker(pub: Paho, sub: Paho, topic: str):
    """Messages ``sub`` got before a QoS 0 marker published now on ``topic``."""
    token = unique("marker").encode()
    pub.publish(topic, token)
    return sub.expect_marker(topic, token)


def _wait_stored(data_dir, needle: bytes, timeout: float = 60.0) -> None:
    """Wait (bounded) until a file of the broker's file store holds ``needle``."""
    deadline = time.monotonic() + timeout
    while True:
        for path in data_dir.rglob("*"):
            try:
                if path.is_file() and needle in path.read_bytes():
                    return
            except OSError:
                pass   # replaced meanwhile (atomic writes): read again next round
        assert time.monotonic() < deadline, f"{needle!r} never reached {data_dir}"
        time.sleep(0.05)


def user_properties(msg):
    return list(getattr(msg.properties, "UserProperty", []) or [])


# --- fault 1: will properties mapped, teardown completes -----------------------------

def test_will_with_will_delay_zero_and_user_property_reaches_v5_subscriber(mqttd_broker, v5):
    """The issue's w1 example with paho: the will arrives with its user property."""
    sub = v5(mqttd_broker)
    sub.connect()
    sub.subscribe("w/#", qos=1)
    w1 = v5(mqttd_broker, "w1", will=dict(topic="w/t", payload=b"gone", qos=1,
                                          properties=will_props(0, [("a", "b")])))
    w1.connect()
    w1.drop()
    msg = sub.expect()
    assert (msg.topic, msg.payload) == ("w/t", b"gone")
    assert user_properties(msg) == [("a", "b")]
    assert not hasattr(msg.properties, "WillDelayInterval")
    again = v5(mqttd_broker, "w1")
    flags = connect_with(again, clean=False)
    assert flags.session_present is False   # expiry 0: the session was discarded


def test_retained_will_with_delay_property_keeps_later_subscribes_working(mqttd_broker, v5):
    """A retained will with Will Delay Interval 0: each later v5 SUBSCRIBE gets SUBACK + message."""
    topic = unique("w") + "/t"
    w1 = v5(mqttd_broker, will=dict(topic=topic, payload=b"kept", qos=1, retain=True,
                                    properties=will_props(0, [("a", "b")])))
    w1.connect()
    w1.drop()
    for _ in range(2):
        late = v5(mqttd_broker)
        late.connect()
        late.subscribe(topic.split("/")[0] + "/#", qos=1)
        msg = late.expect()
        assert msg.retain and msg.payload == b"kept" and user_properties(msg) == [("a", "b")]


# --- fault 2: will delay --------------------------------------------------------------

def test_will_is_published_after_its_delay_not_before(mqttd_broker, v5):
    """Will Delay 1 s: nothing at once, the will about a second later [MQTT-3.1.2-8]."""
    sub = v5(mqttd_broker)
    sub.connect()
    sub.subscribe("wd/#", qos=1)
    w = v5(mqttd_broker, session_expiry=60,
           will=dict(topic="wd/t", payload=b"late", qos=1, properties=will_props(1)))
    w.connect()
    dropped = time.monotonic()
    w.drop()
    assert marker(sub, sub, "wd/marker") == []
    msg = sub.expect(timeout=WAIT)
    waited = time.monotonic() - dropped
    assert msg.payload == b"late" and 0.8 <= waited < WAIT


def test_reconnect_within_the_will_delay_cancels_the_will(mqttd_broker, v5):
    """A new connection to the session before the delay: the will is never sent [MQTT-3.1.3-9]."""
    sub = v5(mqttd_broker)
    sub.connect()
    sub.subscribe("wc/#", qos=1)
    cid = unique("wc")
    w = v5(mqttd_broker, cid, session_expiry=60,
           will=dict(topic="wc/t", payload=b"never", qos=1, properties=will_props(1)))
    w.connect()
    w.drop()
    back = v5(mqttd_broker, cid)
    assert connect_with(back, clean=False, SessionExpiryInterval=60).session_present
    time.sleep(1.5)  # past the delay (bounded)
    assert marker(sub, sub, "wc/marker") == []


def test_pending_will_fires_on_time_after_kill_9(mqttd_broker_factory, v5):
    """A pending delayed will is stored: after SIGKILL and a restart it is published on time."""
    broker = mqttd_broker_factory(persistence="file:data")
    w = v5(broker, unique("wk"), session_expiry=600,
           will=dict(topic="wk/t", payload=b"durable", qos=1, retain=True,
                     properties=will_props(3)))
    w.connect()
    dropped = time.monotonic()
    w.drop()
    # the broker saw the socket close and wrote the pending will (its payload is
    # in the store's files, so it survives SIGKILL): only then kill it
    _wait_stored(broker.workdir / "data", b"durable")
    broker.restart(kill=True)
    sub = v5(broker)
    sub.connect()
    sub.subscribe("wk/#", qos=1)
    msg = sub.expect(timeout=WAIT + 3)
    waited = time.monotonic() - dropped
    assert msg.payload == b"durable"
    # retained, so a subscriber that came too early would see retain=0 live; either
    # way it must not be published before its delay
    assert waited >= 2.8


# --- fault 3: message expiry ------------------------------------------------------------

def test_s1_gets_only_unexpired_queued_messages_with_reduced_interval(mqttd_broker, v5):
    """The issue's s1 example in real time: 1 s messages expire, 60 s ones arrive with <= 57."""
    cid = unique("s1")
    s1 = v5(mqttd_broker, cid, session_expiry=300)
    s1.connect()
    s1.subscribe("e/#", qos=1)
    s1.disconnect()
    pub = v5(mqttd_broker)
    pub.connect()
    for n, interval in enumerate((1, 1, 60, 60)):
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = interval
        pub.publish("e/%d" % n, b"m%d" % n, qos=1, properties=props)
    time.sleep(3)  # bounded: the 3 s
    back = v5(mqttd_broker, cid)
    assert connect_with(back, clean=False, SessionExpiryInterval=300).session_present
    got = marker(pub, back, "e/marker")
    assert [m.payload for m in got] == [b"m2", b"m3"]
    assert all(m.properties.MessageExpiryInterval <= 57 for m in got)


def test_retained_message_is_replayed_with_the_interval_left(mqttd_broker, v5):
    """Retained path: the replay carries the interval minus the time it was retained."""
    pub = v5(mqttd_broker)
    pub.connect()
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 30
    topic = unique("er")
    pub.publish(topic, b"r", qos=1, retain=True, properties=props)
    time.sleep(2.1)
    sub = v5(mqttd_broker)
    sub.connect()
    sub.subscribe(topic, qos=1)
    msg = sub.expect()
    assert msg.retain and msg.properties.MessageExpiryInterval <= 28


# --- fault 6: Receive Maximum on resume ---------------------------------------------------

def test_resumed_session_gets_at_most_receive_maximum_resends_at_once(mqttd_broker, v5):
    """10 unacknowledged QoS 1 messages, Receive Maximum 2 on resume: 2 in flight, then one per PUBACK."""
    cid = unique("rm")
    s = v5(mqttd_broker, cid, session_expiry=300)
    s.client.manual_ack_set(True)
    s.connect()
    s.subscribe("rm/#", qos=1)
    pub = v5(mqttd_broker)
    pub.connect()
    for n in range(10):
        pub.publish("rm/x", b"%d" % n, qos=1)
    first = [s.expect() for _ in range(10)]   # received, never acknowledged
    assert len(first) == 10
    s.drop()
    back = v5(mqttd_broker, cid)
    back.client.manual_ack_set(True)
    assert connect_with(back, clean=False, SessionExpiryInterval=300,
                        ReceiveMaximum=2).session_present
    got = marker(pub, back, "rm/marker")      # QoS 0 marker: not bound by the window
    assert len(got) == 2 and all(m.dup for m in got)
    received, pending = list(got), list(got)
    for _ in range(20):   # bounded: acknowledge the oldest, expect exactly one more
        if not pending:
            break
        back.client.ack(pending.pop(0).mid, 1)
        if len(received) < 10:
            more = back.expect()
            received.append(more)
            pending.append(more)
    assert [m.payload for m in received] == [b"%d" % n for n in range(10)]


# --- fault 7: No Local with overlapping subscriptions ---------------------------------------

def test_no_local_subscription_does_not_hide_the_overlapping_one(mqttd_broker, v5):
    """The issue's n1 example: t/# QoS 0 + t/x QoS 1 No Local -> own message once, QoS 0."""
    n1 = v5(mqttd_broker, unique("n1"))
    n1.connect()
    base = unique("t")
    result, mid = n1.client.subscribe([(base + "/#", SubscribeOptions(qos=0)),
                                       (base + "/x", SubscribeOptions(qos=1, noLocal=True))])
    assert result == 0
    n1.subacks.get(timeout=WAIT)
    n1.publish(base + "/x", b"mine", qos=1)
    msg = n1.expect()
    assert (msg.payload, msg.qos) == (b"mine", 0)
    with pytest.raises(queue.Empty):
        n1.messages.get(timeout=0.3)
    assert marker(n1, n1, base + "/marker") == []


def test_message_expiry_holds_across_a_restart(mqttd_broker_factory, v5):
    """Fault 3 across a restart: what expired meanwhile is gone, the rest keeps counting down."""
    broker = mqttd_broker_factory(persistence="file:data")
    cid = unique("sr")
    s = v5(broker, cid, session_expiry=300)
    s.connect()
    s.subscribe("x/#", qos=1)
    s.disconnect()
    pub = v5(broker)
    pub.connect()
    for payload, interval in ((b"short", 1), (b"long", 60)):
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = interval
        pub.publish("x/" + payload.decode(), payload, qos=1, properties=props)
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 1
    pub.publish("x/retained", b"r", qos=1, retain=True, properties=props)
    pub.close()
    broker.restart()
    time.sleep(1.5)   # the 1 s messages expire while nobody asks for them
    back = v5(broker, cid)
    assert connect_with(back, clean=False, SessionExpiryInterval=300).session_present
    helper = v5(broker)
    helper.connect()
    got = marker(helper, back, "x/marker")
    assert [m.payload for m in got] == [b"long"]
    assert got[0].properties.MessageExpiryInterval <= 59
    late = v5(broker)
    late.connect()
    late.subscribe("x/retained", qos=1)
    assert marker(helper, late, "x/retained") == []
