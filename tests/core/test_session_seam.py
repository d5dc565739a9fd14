"""The session seam: an asynchronous claim before open_session (used by the cluster)."""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from mqttd.broker import Broker
from mqttd.codec.errors import ReasonCode
from mqttd.codec.packets import (
    Connack, Connect, Disconnect, Properties, Publish, Subscribe, Subscription, Will)
from mqttd.messages import Message
from mqttd.persistence import records as R

from tests.core.harness import FakeClient


class Registry:
    """A registry whose claims answer when the test says so."""

    def __init__(self):
        self.claims = []
        self.abandoned_ids = []

    def claim(self, connection, client_id, clean_start, persistent, will, username):
        d = defer.Deferred()
        self.claims.append((client_id, clean_start, persistent, will, username, d))
        return d

    def abandoned(self, client_id, connection):
        self.abandoned_ids.append(client_id)


def make(level=5):
    clock = Clock()
    broker = Broker(clock)
    broker.start()
    return broker, clock


def test_single_node_claims_nothing_and_connects_synchronously():
    """Without a registry the CONNACK is written in the same call: the fast path has no Deferred."""
    broker, clock = make()
    assert broker.claim_session(None, "c1", True, False, None, None) is None
    client = FakeClient(broker, clock, level=5)
    client.connect("c1")
    assert "c1" in broker.sessions


def test_connect_waits_for_the_claim_and_later_packets_keep_their_order():
    """Packets sent while the claim is pending are handled after the CONNACK, in order."""
    broker, clock = make()
    registry = broker.session_registry = Registry()
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(
        5, "c1", True, 0, properties=Properties(session_expiry_interval=60)))
    client.send(Subscribe(1, (Subscription("a/#", 1),)))
    assert client.received() == []
    assert registry.claims[0][:3] == ("c1", True, True)
    registry.claims[0][-1].callback(None)
    packets = client.received()
    assert isinstance(packets[0], Connack) and packets[0].reason_code == 0
    assert type(packets[1]).__name__ == "Suback"
    assert "a/#" in broker.sessions["c1"].subscriptions


def test_claim_refusal_is_a_connack_refusal():
    """A refusal from the registry is the CONNACK's reason code, and the registry hears of it."""
    broker, clock = make()
    registry = broker.session_registry = Registry()
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(5, "c1", True, 0))
    registry.claims[0][-1].callback((ReasonCode.SERVER_UNAVAILABLE, "no Redis", "cluster"))
    packets = client.received()
    assert isinstance(packets[0], Connack) and packets[0].reason_code == 0x88
    assert client.disconnecting
    assert registry.abandoned_ids == ["c1"]
    assert broker.stats.refused.get("cluster") == 1


def test_failed_claim_refuses_with_server_unavailable():
    """A claim that fails (Redis error) refuses with 0x88 / v3 0x03, never a half-open session."""
    broker, clock = make()
    registry = broker.session_registry = Registry()
    client = FakeClient(broker, clock, level=4)
    client.send(Connect(4, "c1", True, 0))
    registry.claims[0][-1].errback(RuntimeError("boom"))
    packets = client.received()
    assert isinstance(packets[0], Connack) and packets[0].reason_code == 0x03
    assert "c1" not in broker.sessions


def test_connection_lost_during_claim_tells_the_registry():
    """A client gone while its claim is pending is reported as abandoned."""
    broker, clock = make()
    registry = broker.session_registry = Registry()
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(5, "c1", True, 0))
    client.conn.connection_lost()
    assert registry.abandoned_ids == ["c1"]
    registry.claims[0][-1].callback(None)   # late answer: nothing opens
    assert "c1" not in broker.sessions


def _stored(client_id="c1"):
    message = Message("a/b", b"m1", 1)
    session = R.StoredSession(R.SessionRecord(
        client_id, 5, (R.SubscriptionRecord("a/#", 1),), expiry_interval=600,
        disconnected_at=0.0))
    session.outbound[1] = R.OutboundRecord(1, message, 1, 7, R.OutboundStage.PUBLISH_SENT)
    session.outbound[2] = R.OutboundRecord(2, Message("a/c", b"m2", 1), 1)
    session.inbound_qos2.add(9)
    return session


def test_installed_session_resumes_with_dup_resend_and_queue():
    """A session installed from another node resends in-flight with DUP and the same id, then the queue."""
    broker, clock = make()
    broker.install_session(_stored())
    assert broker.sessions["c1"].inbound_qos2 == {9}
    client = FakeClient(broker, clock, level=5)
    client.connect("c1", clean=False, properties=Properties(session_expiry_interval=600))
    packets = client.received()
    publishes = [p for p in packets if isinstance(p, Publish)]
    assert [(p.packet_id, p.dup, p.payload) for p in publishes][0] == (7, True, b"m1")
    assert publishes[1].payload == b"m2" and not publishes[1].dup
    broker.publish(Message("a/x", b"live", 1))
    assert [p.payload for p in client.received() if isinstance(p, Publish)] == [b"live"]


def test_released_online_session_is_closed_with_session_taken_over():
    """Another node took the session: the client gets 0x8E, the session leaves memory, nothing is written."""
    broker, clock = make()
    client = FakeClient(broker, clock, level=5)
    client.connect("c1", clean=False, properties=Properties(session_expiry_interval=60))
    client.subscribe("a/#", qos=1)
    writes = broker.write_count
    assert broker.release_session("c1") is not None
    packets = client.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x8E
    assert "c1" not in broker.sessions
    assert broker.publish(Message("a/b", b"x", 1)) == 0
    assert broker.write_count == writes
    assert broker.online == 0


def test_released_session_publishes_an_undelayed_will_but_not_a_delayed_one_on_resume():
    """Will of a taken-over connection: no delay → published; delayed and resumed elsewhere → not [MQTT-3.1.3-9]."""
    for delay, clean, expected in ((0, False, 1), (30, False, 0), (30, True, 1)):
        broker, clock = make()
        got = []
        broker.subscribe_local("will/#", got.append)
        client = FakeClient(broker, clock, level=5)
        will = Will("will/x", b"bye", 0, False, Properties(will_delay_interval=delay))
        client.connect("c1", clean=False, will=will,
                       properties=Properties(session_expiry_interval=60))
        broker.release_session("c1", clean_start=clean)
        clock.advance(60)
        assert len(got) == expected, (delay, clean)


def test_released_parked_session_hands_its_delayed_will_over():
    """A parked session's pending delayed will is dropped on resume elsewhere, published on a clean start."""
    for clean, expected in ((False, 0), (True, 1)):
        broker, clock = make()
        got = []
        broker.subscribe_local("will/#", got.append)
        client = FakeClient(broker, clock, level=5)
        will = Will("will/x", b"bye", 0, False, Properties(will_delay_interval=30))
        client.connect("c1", clean=False, will=will,
                       properties=Properties(session_expiry_interval=60))
        client.conn.connection_lost()
        assert "c1" in broker.wills
        broker.release_session("c1", clean_start=clean)
        assert "c1" not in broker.wills
        clock.advance(60)
        assert len(got) == expected
