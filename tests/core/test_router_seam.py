"""The core's seams for a cluster: the remote router (forward, dispatch, shared
groups served elsewhere, acknowledgements waiting for the hand-off), the route
observer, and Broker.unavailable.  A fake router, no Redis."""
from __future__ import annotations

from twisted.internet import defer

from mqttd.broker import ONLY_SHARES, SKIP_SHARES
from mqttd.codec.packets import Connack, Puback, Publish, Suback
from mqttd.messages import Message

from .harness import FakeClient, make_broker


class FakeRouter:
    def __init__(self, nodes=1, skip=None):
        self.forwarded = []
        self.nodes = nodes
        self.skip = skip
        self.pending = None

    def forward(self, message, cache):
        self.forwarded.append(message)
        if self.skip:
            cache[SKIP_SHARES] = self.skip
        return self.nodes

    def sync(self):
        return self.pending


def connected(broker, clock, client_id, level=4):
    client = FakeClient(broker, clock, level)
    client.connect(client_id)
    return client


def test_every_published_message_is_offered_to_the_router_and_counts_its_nodes():
    """The router forwards after the local checks; its nodes count as receivers (no 0x10)."""
    broker, clock = make_broker()
    router = FakeRouter(nodes=2)
    broker.add_remote_router(router)
    assert broker.publish_message("a/b", b"x", qos=1) == 2
    assert [m.topic for m in router.forwarded] == ["a/b"]


def test_a_message_from_another_node_is_delivered_but_not_forwarded_or_retained_again():
    """dispatch: local matching only, so a message never loops between nodes."""
    broker, clock = make_broker()
    router = FakeRouter()
    broker.add_remote_router(router)
    sub = connected(broker, clock, "s")
    sub.subscribe("t/#", qos=1)
    assert broker.dispatch(Message("t/1", b"m", 1, True, origin="elsewhere")) == 1
    (packet,) = sub.received()
    assert isinstance(packet, Publish) and packet.payload == b"m" and packet.qos == 1
    assert router.forwarded == [] and "t/1" not in broker.retained
    assert broker.stats.messages_in == [0, 0, 0]


def test_no_local_applies_to_messages_from_other_nodes_by_origin():
    """The publisher's client id travels in the envelope [MQTT-3.8.3-3]."""
    broker, clock = make_broker()
    sub = connected(broker, clock, "me", level=5)
    sub.subscribe("t", qos=0, no_local=True)
    assert broker.dispatch(Message("t", b"m", 0, origin="me")) == 0
    assert broker.dispatch(Message("t", b"m", 0, origin="other")) == 1


def test_shared_groups_served_by_another_node_are_skipped_here_and_only_named_ones_served():
    """One delivery per group cluster-wide: the publisher's node decides who serves it."""
    broker, clock = make_broker()
    router = FakeRouter(skip={"$share/g/t"})
    broker.add_remote_router(router)
    member = connected(broker, clock, "m")
    member.subscribe("$share/g/t", "$share/h/t")
    broker.publish_message("t", b"1")
    assert [p.payload for p in member.received()] == [b"1"]           # via h only
    broker.router = None
    broker.dispatch(Message("t", b"2"), only_shares=frozenset({"$share/g/t"}))
    assert [p.payload for p in member.received()] == [b"2"]           # via g only
    broker.dispatch(Message("t", b"3"), only_shares=frozenset())
    assert member.received() == []
    assert ONLY_SHARES != SKIP_SHARES


def test_puback_waits_until_the_router_says_the_hand_off_is_durable():
    """No false acknowledgement: PUBACK only after sync() fired; a failure closes instead."""
    broker, clock = make_broker()
    router = FakeRouter()
    broker.add_remote_router(router)

    def forward(message, cache):
        broker.write_count += 1          # a hand-off to wait for
        return 1
    router.forward = forward
    pub = connected(broker, clock, "p")
    router.pending = defer.Deferred()
    pub.publish("t", qos=1, packet_id=7)
    clock.advance(0)
    assert pub.received() == []
    router.pending.callback(None)
    assert [type(p) for p in pub.received()] == [Puback]
    router.pending = defer.Deferred()
    pub.publish("t", qos=1, packet_id=8)
    clock.advance(0)
    router.pending.errback(RuntimeError("redis down"))
    assert pub.received() == [] and pub.disconnecting


def test_the_route_observer_sees_subscriptions_groups_and_local_subscribers():
    """The cluster's route table is fed from the index: every add and remove, once each."""
    broker, clock = make_broker()
    seen = []
    broker.route_observer = lambda f, key, added: seen.append((f, added))
    client = connected(broker, clock, "c")
    assert isinstance(client.subscribe("a/+", "$share/g/b")[0], Suback)
    stop = broker.subscribe_local("x/#", lambda m: None)
    stop()
    stop()
    client.drop()
    assert seen == [("a/+", True), ("$share/g/b", True), ("x/#", True), ("x/#", False),
                    ("a/+", False), ("$share/g/b", False)]


def test_an_unavailable_broker_refuses_connect_with_server_unavailable():
    """A fenced cluster node: v5 CONNACK 0x88, v3 return code 3, nothing else changes."""
    broker, clock = make_broker()
    broker.unavailable = "fenced: no Redis"
    v5 = FakeClient(broker, clock, level=5)
    (ack,) = v5.connect("x", expect_ok=False)
    assert isinstance(ack, Connack) and ack.reason_code == 0x88
    v3 = FakeClient(broker, clock, level=4)
    (ack,) = v3.connect("y", expect_ok=False)
    assert ack.reason_code == 3
    broker.unavailable = None
    FakeClient(broker, clock).connect("z")
