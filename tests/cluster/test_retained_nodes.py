"""Retained messages across real cluster nodes with real MQTT clients (issue 10):
a retained PUBLISH on one node is replayed to a SUBSCRIBE on another, cleared
cluster-wide, and survives the node that took it."""
from __future__ import annotations

import queue
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

pytestmark = pytest.mark.interop

TIMEOUT = 10.0


class Client:
    """A paho MQTT 5 client on a background loop; messages arrive in a queue."""

    def __init__(self, node, client_id):
        self.messages: "queue.Queue" = queue.Queue()
        self.acks: "queue.Queue" = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        self.c.on_message = lambda _c, _u, m: self.messages.put(m)
        self.c.on_subscribe = lambda _c, _u, mid, codes, _p: self.acks.put(("sub", mid))
        self.c.on_publish = lambda _c, _u, mid, _rc, _p: self.acks.put(("pub", mid))
        connected: "queue.Queue" = queue.Queue()
        self.c.on_connect = lambda _c, _u, _f, rc, _p: connected.put(rc)
        self.c.connect(node.host, node.port)
        self.c.loop_start()
        assert connected.get(timeout=TIMEOUT) == 0

    def publish(self, topic, payload, qos=1, retain=True, expiry=None):
        props = None
        if expiry is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def subscribe(self, topic_filter, qos=1):
        _rc, mid = self.c.subscribe(topic_filter, qos)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            kind, got = self.acks.get(timeout=TIMEOUT)
            if kind == "sub" and got == mid:
                return
        raise AssertionError("no SUBACK")

    def collect(self, count, timeout=TIMEOUT):
        """``count`` messages (fewer if they do not come within ``timeout``)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            try:
                out.append(self.messages.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
        return out

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients():
    made = []

    def make(node, client_id):
        client = Client(node, client_id)
        made.append(client)
        return client
    yield make
    for client in made:
        client.close()


def test_retained_message_published_on_one_node_is_replayed_on_another(
        redis_server, cluster_node_factory, clients):
    """[MQTT-3.3.1-6] cluster-wide: SUBSCRIBE on B gets what was retained on A, by wildcard."""
    a = cluster_node_factory(redis_server.url, node_id="ret-a")
    b = cluster_node_factory(redis_server.url, node_id="ret-b")
    pub = clients(a, "pub")
    for room in ("kitchen", "hall", "attic"):
        pub.publish(f"home/{room}/temp", room.encode())
    pub.publish("home/hall/humidity", b"40")
    pub.publish("home/hall/temp", b"hall2")          # replaced: one message per topic
    sub = clients(b, "sub")
    sub.subscribe("home/+/temp")
    got = sub.collect(3)
    assert sorted((m.topic, m.payload, m.retain) for m in got) == [
        ("home/attic/temp", b"attic", True), ("home/hall/temp", b"hall2", True),
        ("home/kitchen/temp", b"kitchen", True)]
    assert sub.collect(1, timeout=0.5) == []


def test_empty_retained_payload_clears_the_message_on_every_node(
        redis_server, cluster_node_factory, clients):
    """[MQTT-3.3.1-10] cluster-wide: cleared on B, gone for a subscriber on A."""
    a = cluster_node_factory(redis_server.url, node_id="clr-a")
    b = cluster_node_factory(redis_server.url, node_id="clr-b")
    pub_a = clients(a, "pa")
    pub_a.publish("dev/1/state", b"on")
    pub_a.publish("dev/2/state", b"on")
    clients(b, "pb").publish("dev/1/state", b"")
    sub = clients(a, "sa")
    sub.subscribe("dev/#")
    assert [(m.topic, m.payload) for m in sub.collect(2, timeout=3)] == [("dev/2/state", b"on")]


def test_retained_message_outlives_the_node_that_took_it(
        redis_server, cluster_node_factory, clients):
    """kill -9 of the node after PUBACK: the retained message is still there for others."""
    a = cluster_node_factory(redis_server.url, node_id="die-a")
    b = cluster_node_factory(redis_server.url, node_id="die-b")
    clients(a, "p").publish("keep/this", b"42", qos=1)
    a.kill()
    sub = clients(b, "s")
    sub.subscribe("keep/#")
    assert [(m.topic, m.payload) for m in sub.collect(1)] == [("keep/this", b"42")]


def test_dollar_topics_are_not_matched_by_a_leading_wildcard_across_nodes(
        redis_server, cluster_node_factory, clients):
    """[MQTT-4.7.2-1]: # on B does not replay a bridge state topic retained on A."""
    a = cluster_node_factory(redis_server.url, node_id="dol-a")
    b = cluster_node_factory(redis_server.url, node_id="dol-b")
    clients(a, "p").publish("plain", b"1")
    sub = clients(b, "s")
    sub.subscribe("#")
    got = sub.collect(5, timeout=2)
    assert [m.topic for m in got if not m.topic.startswith("$")] == ["plain"]
    assert all(not m.topic.startswith("$") for m in got)


def test_expired_retained_message_is_not_replayed_on_another_node(
        redis_server, cluster_node_factory, clients):
    """Message Expiry across nodes [MQTT-3.3.2-5]: gone after its interval, others kept."""
    a = cluster_node_factory(redis_server.url, node_id="ex-a")
    b = cluster_node_factory(redis_server.url, node_id="ex-b")
    pub = clients(a, "p")
    pub.publish("x/short", b"s", expiry=1)
    pub.publish("x/long", b"l", expiry=600)
    time.sleep(2.1)   # the expiry interval is whole seconds on the wire
    sub = clients(b, "s")
    sub.subscribe("x/+")
    got = sub.collect(2, timeout=2)
    assert [(m.topic, m.payload) for m in got] == [("x/long", b"l")]
    expiry = got[0].properties.MessageExpiryInterval
    assert 590 <= expiry <= 600   # [MQTT-3.3.2-6] the time it waited is deducted
