"""paho-mqtt 2.x against a broker subprocess, for MQTT 3.1.1 and 5.0.

Absence is checked without sleeping: after the thing that must not arrive,
a marker message is sent through the broker and must arrive alone.
"""

from __future__ import annotations

import json
import queue
import socket
import uuid

import pytest
from paho.mqtt.client import Client, CallbackAPIVersion, MQTTv311, MQTTv5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytestmark = pytest.mark.interop

#: seconds; every wait in this module is bounded by it.  Waits end as soon as
#: what they wait for arrives: the bound only matters on a loaded machine
WAIT = 20.0

VERSIONS = [pytest.param(MQTTv311, id="v311"), pytest.param(MQTTv5, id="v5")]


def unique(prefix: str) -> str:
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


class Paho:
    """A paho client on its own network thread, with queues for everything it sees."""

    def __init__(self, broker, protocol, client_id="", clean=True, session_expiry=None, will=None):
        self.broker = broker
        self.protocol = protocol
        self.clean = clean
        self.session_expiry = session_expiry
        kwargs = {}
        if protocol != MQTTv5:
            kwargs["clean_session"] = clean
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            **kwargs,
        )
        if will is not None:
            self.client.will_set(**will)
        self.messages: queue.Queue = queue.Queue()
        self.connacks: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.pubacks: queue.Queue = queue.Queue()
        self.disconnects: queue.Queue = queue.Queue()
        c = self.client
        c.on_connect = lambda cl, ud, flags, rc, props: self.connacks.put((flags, rc, props))
        c.on_message = lambda cl, ud, msg: self.messages.put(msg)
        c.on_subscribe = lambda cl, ud, mid, rcs, props: self.subacks.put((mid, rcs, props))
        c.on_publish = lambda cl, ud, mid, rc, props: self.pubacks.put(mid)
        c.on_disconnect = lambda cl, ud, flags, rc, props: self.disconnects.put(rc)

    def connect(self, clean=None):
        """Connect and wait for CONNACK; returns ``(flags, reason_code, properties)``."""
        clean = self.clean if clean is None else clean
        kwargs = {}
        if self.protocol == MQTTv5:
            kwargs["clean_start"] = clean
            if self.session_expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry
                kwargs["properties"] = props
        self.client.connect(self.broker.host, self.broker.port, keepalive=30, **kwargs)
        self.client.loop_start()
        try:
            flags, rc, props = self.connacks.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError("no CONNACK within %ss" % WAIT)
        assert not rc.is_failure, "CONNACK refused: %s" % rc
        return flags, rc, props

    def subscribe(self, topic, qos=0):
        result, mid = self.client.subscribe(topic, qos)
        assert result == 0, result
        got_mid, rcs, _ = self.subacks.get(timeout=WAIT)
        assert got_mid == mid
        assert [int(rc.value) for rc in rcs] == [qos], rcs
        return rcs

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        """Publish and, for QoS > 0, wait until the broker acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), "publish to %s (qos %d) not acknowledged in %ss" % (topic, qos, WAIT)
        return info

    def expect(self, timeout=WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("%s: no message within %ss" % (self.client._client_id, timeout))

    def expect_marker(self, marker_topic, marker_payload):
        """Messages received before the marker (the marker itself excluded)."""
        before = []
        while True:
            msg = self.expect()
            if msg.topic == marker_topic and msg.payload == marker_payload:
                return before
            before.append(msg)

    def disconnect(self):
        self.client.disconnect()
        try:
            self.disconnects.get(timeout=WAIT)
        finally:
            self.client.loop_stop()

    def drop(self):
        """Close the socket without DISCONNECT (network loss, as the broker sees it)."""
        self.client.loop_stop()
        sock = self.client.socket()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def close(self):
        try:
            self.client.disconnect()
        except Exception:
            pass
        self.client.loop_stop()


@pytest.fixture
def clients():
    """Make paho clients; each is stopped at teardown."""
    made = []

    def make(broker, protocol, **kwargs):
        c = Paho(broker, protocol, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.mark.parametrize("protocol", VERSIONS)
def test_client_receives_its_own_message(mqttd_broker, clients, protocol):
    """The tutorial's first step: subscribe to a topic, publish to it, get it back."""
    c = clients(mqttd_broker, protocol, client_id=unique("self"))
    c.connect()
    c.subscribe("hello/world", qos=1)
    c.publish("hello/world", b"Hello world!", qos=1)
    msg = c.expect()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("hello/world", b"Hello world!", 1, False)


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("protocol", VERSIONS)
def test_two_clients_talk_through_agreed_topics(mqttd_broker, clients, protocol, qos):
    """Client A and client B exchange messages, each on the topic the other listens to."""
    a = clients(mqttd_broker, protocol, client_id=unique("A"))
    b = clients(mqttd_broker, protocol, client_id=unique("B"))
    a.connect()
    b.connect()
    a.subscribe("chat/to-a", qos=2)
    b.subscribe("chat/to-b", qos=2)

    a.publish("chat/to-b", b"hello B, from A", qos=qos)
    msg = b.expect()
    assert (msg.topic, msg.payload, msg.qos) == ("chat/to-b", b"hello B, from A", qos)

    b.publish("chat/to-a", b"hello A, from B", qos=qos)
    msg = a.expect()
    assert (msg.topic, msg.payload, msg.qos) == ("chat/to-a", b"hello A, from B", qos)

    # Nobody got a copy of their own message or a duplicate.
    a.publish("chat/to-a", b"marker", qos=1)
    assert a.expect_marker("chat/to-a", b"marker") == []
    b.publish("chat/to-b", b"marker", qos=1)
    assert b.expect_marker("chat/to-b", b"marker") == []


@pytest.mark.parametrize("protocol", VERSIONS)
def test_retained_message_reaches_later_subscriber_and_is_cleared_by_empty_payload(
        mqttd_broker, clients, protocol):
    """A retained message goes to a later subscriber with retain=1; an empty payload clears it."""
    pub = clients(mqttd_broker, protocol, client_id=unique("pub"))
    pub.connect()
    pub.publish("ret/temp", b"21.5", qos=1, retain=True)

    late = clients(mqttd_broker, protocol, client_id=unique("late"))
    late.connect()
    late.subscribe("ret/#", qos=1)
    msg = late.expect()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("ret/temp", b"21.5", 1, True)

    # Live delivery to an existing subscriber carries retain=0 [MQTT-3.3.1-9].
    pub.publish("ret/temp", b"", qos=1, retain=True)
    msg = late.expect()
    assert (msg.topic, msg.payload, msg.retain) == ("ret/temp", b"", False)
    late.disconnect()

    later = clients(mqttd_broker, protocol, client_id=unique("later"))
    later.connect()
    later.subscribe("ret/#", qos=1)
    pub.publish("ret/marker", b"marker", qos=1)  # not retained
    assert later.expect_marker("ret/marker", b"marker") == []


@pytest.mark.parametrize("protocol", VERSIONS)
def test_persistent_session_receives_message_published_while_offline(mqttd_broker, clients, protocol):
    """clean_session=False (v5: clean_start=False + session expiry): subscriptions and QoS 1 survive."""
    sub_id = unique("durable")
    sub = clients(mqttd_broker, protocol, client_id=sub_id, clean=False, session_expiry=300)
    flags, _, _ = sub.connect(clean=True)  # start from nothing, keep the session afterwards
    assert not flags.session_present
    sub.subscribe("offline/news", qos=1)
    sub.disconnect()

    pub = clients(mqttd_broker, protocol, client_id=unique("pub"))
    pub.connect()
    pub.publish("offline/news", b"while you were away", qos=1)

    back = clients(mqttd_broker, protocol, client_id=sub_id, clean=False, session_expiry=300)
    flags, _, _ = back.connect(clean=False)
    assert flags.session_present
    msg = back.expect()
    assert (msg.topic, msg.payload, msg.qos) == ("offline/news", b"while you were away", 1)


@pytest.mark.parametrize("protocol", VERSIONS)
def test_will_published_when_socket_closes_without_disconnect(mqttd_broker, clients, protocol):
    """Network loss (socket closed, no DISCONNECT) publishes the will with its QoS."""
    watcher = clients(mqttd_broker, protocol, client_id=unique("watch"))
    watcher.connect()
    watcher.subscribe("wills/#", qos=1)

    doomed = clients(mqttd_broker, protocol, client_id=unique("doomed"),
                     will=dict(topic="wills/doomed", payload=b"gone", qos=1, retain=False))
    doomed.connect()
    doomed.drop()

    msg = watcher.expect()
    assert (msg.topic, msg.payload, msg.qos) == ("wills/doomed", b"gone", 1)


@pytest.mark.parametrize("protocol", VERSIONS)
def test_will_not_published_after_clean_disconnect(mqttd_broker, clients, protocol):
    """A client that sends DISCONNECT leaves without its will."""
    watcher = clients(mqttd_broker, protocol, client_id=unique("watch"))
    watcher.connect()
    watcher.subscribe("wills/#", qos=1)

    polite = clients(mqttd_broker, protocol, client_id=unique("polite"),
                     will=dict(topic="wills/polite", payload=b"gone", qos=1, retain=False))
    polite.connect()
    polite.disconnect()

    other = clients(mqttd_broker, protocol, client_id=unique("other"))
    other.connect()
    other.publish("wills/marker", b"marker", qos=1)
    assert watcher.expect_marker("wills/marker", b"marker") == []


def test_v5_properties_forwarded_unchanged(mqttd_broker, clients):
    """User properties (in order), content type, correlation data, response topic pass through."""
    sub = clients(mqttd_broker, MQTTv5, client_id=unique("sub"))
    sub.connect()
    sub.subscribe("req/+", qos=1)
    pub = clients(mqttd_broker, MQTTv5, client_id=unique("pub"))
    pub.connect()

    user = [("b", "2"), ("a", "1"), ("b", "3"), ("ünï", "cödé")]
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = user
    props.ContentType = "application/json"
    props.CorrelationData = b"\x00\x01corr\xff"
    props.ResponseTopic = "resp/42"
    props.PayloadFormatIndicator = 1
    pub.publish("req/1", b'{"q": 1}', qos=1, properties=props)

    msg = sub.expect()
    got = msg.properties
    assert msg.payload == b'{"q": 1}'
    assert [tuple(p) for p in got.UserProperty] == user
    assert got.ContentType == "application/json"
    assert got.CorrelationData == b"\x00\x01corr\xff"
    assert got.ResponseTopic == "resp/42"
    assert got.PayloadFormatIndicator == 1


def test_v5_empty_client_id_gets_assigned_identifier(mqttd_broker, clients):
    """v5: CONNECT with an empty client id and clean start gets an Assigned Client Identifier."""
    c = clients(mqttd_broker, MQTTv5, client_id="")
    _, rc, props = c.connect(clean=True)
    assigned = getattr(props, "AssignedClientIdentifier", None)
    assert assigned, "no Assigned Client Identifier in CONNACK: %s" % props
    # The assigned id is usable: the client works normally with it.
    c.subscribe("anon/t", qos=1)
    c.publish("anon/t", b"x", qos=1)
    assert c.expect().payload == b"x"


def test_v311_empty_client_id_with_clean_session_accepted(mqttd_broker, clients):
    """v3.1.1: an empty client id with clean session is accepted [MQTT-3.1.3-6]."""
    c = clients(mqttd_broker, MQTTv311, client_id="", clean=True)
    _, rc, _ = c.connect()
    assert rc == 0


# -- mqttd's $SYS announcements (mosca's names and payloads) ----------------

def sys_watcher(broker, clients, protocol, leaf):
    w = clients(broker, protocol, client_id=unique("syswatch"))
    w.connect()
    w.subscribe("$SYS/%s/%s" % (broker.broker_id, leaf), qos=0)
    return w


def expect_payload(watcher, topic, predicate):
    """Skip unrelated announcements (e.g. about the watcher itself) until one matches."""
    while True:
        msg = watcher.expect()
        assert msg.topic == topic
        if predicate(msg.payload):
            return msg


@pytest.mark.mqttd_only
@pytest.mark.parametrize("protocol", VERSIONS)
def test_sys_new_clients_announces_connecting_client(mqttd_broker, clients, protocol):
    """$SYS/<broker-id>/new/clients carries the client id of each new connection."""
    w = sys_watcher(mqttd_broker, clients, protocol, "new/clients")
    cid = unique("newbie")
    clients(mqttd_broker, protocol, client_id=cid).connect()
    topic = "$SYS/%s/new/clients" % mqttd_broker.broker_id
    assert expect_payload(w, topic, lambda p: p == cid.encode()).payload == cid.encode()


@pytest.mark.mqttd_only
@pytest.mark.parametrize("protocol", VERSIONS)
def test_sys_new_subscribes_announces_client_and_topic(mqttd_broker, clients, protocol):
    """$SYS/<broker-id>/new/subscribes carries JSON {"clientId": ..., "topic": ...}."""
    w = sys_watcher(mqttd_broker, clients, protocol, "new/subscribes")
    cid = unique("subber")
    c = clients(mqttd_broker, protocol, client_id=cid)
    c.connect()
    c.subscribe("some/topic/+", qos=1)
    topic = "$SYS/%s/new/subscribes" % mqttd_broker.broker_id
    msg = expect_payload(w, topic, lambda p: json.loads(p).get("clientId") == cid)
    assert json.loads(msg.payload) == {"clientId": cid, "topic": "some/topic/+"}


@pytest.mark.mqttd_only
@pytest.mark.parametrize("protocol", VERSIONS)
def test_sys_disconnect_clients_announces_leaving_client(mqttd_broker, clients, protocol):
    """$SYS/<broker-id>/disconnect/clients carries the client id of a client that left."""
    w = sys_watcher(mqttd_broker, clients, protocol, "disconnect/clients")
    cid = unique("leaver")
    c = clients(mqttd_broker, protocol, client_id=cid)
    c.connect()
    c.disconnect()
    topic = "$SYS/%s/disconnect/clients" % mqttd_broker.broker_id
    assert expect_payload(w, topic, lambda p: p == cid.encode()).payload == cid.encode()


@pytest.mark.mqttd_only
def test_ready_file_reports_broker_id_and_pid(mqttd_broker):
    """The --ready-file contract the whole harness relies on."""
    info = mqttd_broker.ready
    assert info["pid"] == mqttd_broker.pid
    assert info["broker_id"] == mqttd_broker.broker_id
    assert info["listeners"][0]["host"] == "127.0.0.1"
    assert info["listeners"][0]["port"] > 0
