"""What an idle connection holds (issue 13, item 3: <= 4 KB RSS per idle connection).

Not a memory measurement (``bench/run --scenarios connect_storm`` is one): these tests pin
the structure that keeps an idle connection small, so a change that brings back a per-
connection dict, deque or handler table fails here instead of silently adding kilobytes to
each of 100,000 connections.
"""
from __future__ import annotations

import collections

from mqttd.codec.packets import Disconnect, Properties, Publish

from core.harness import FakeClient, make_broker


def _idle(level=4, client_id="idle", clean=True, **props):
    broker, clock = make_broker()
    client = FakeClient(broker, clock, level=level)
    client.connect(client_id, clean=clean, keepalive=60,
                   properties=Properties(**props) if props else Properties())
    return broker, clock, client


def test_idle_connection_has_no_instance_dict_of_its_own():
    """Every attribute of a connected v3 or v5 client is a slot: no per-connection dict (~1.3 KB)."""
    for level in (4, 5):
        _broker, _clock, client = _idle(level)
        assert vars(client.conn) == {}, (level, sorted(vars(client.conn)))


def test_connections_in_the_same_state_share_one_handler_table():
    """The packet -> handler table is one dict per state, not ten bound methods per connection."""
    broker, clock = make_broker()
    a, b = FakeClient(broker, clock), FakeClient(broker, clock)
    assert a.conn._handlers is b.conn._handlers
    a.connect("a")
    b.connect("b")
    assert a.conn._handlers is b.conn._handlers
    assert all(not hasattr(h, "__self__") for h in a.conn._handlers.values())


def test_idle_session_and_connection_allocate_no_containers():
    """An idle session has no queue, resend, forward or replay container, nor a QoS 2 id set,
    and its connection no pending-output deque: each empty deque alone is 760 bytes."""
    broker, _clock, client = _idle()
    session = broker.sessions["idle"]
    for name in ("queue", "resend", "forward_waiting", "replays"):
        assert getattr(session, name) == (), name
    assert session.inbound_qos2 == frozenset()
    assert client.conn._pending == ()


def test_containers_are_made_on_first_use_and_work_as_before():
    """A QoS 2 PUBLISH, an offline queue and a retained replay create their containers on
    demand and behave as before: the messages arrive, in order, once."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("sub", clean=False)
    sub.subscribe("t/#", qos=1)
    sub.send(Disconnect())
    sub.drop()
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.publish("t/r", b"retained", qos=0, retain=True)
    for i in range(3):
        pub.publish(f"t/{i}", str(i).encode(), qos=2, packet_id=i + 1)
    session = broker.sessions["sub"]
    # QoS 0 is not queued for an offline session: the three QoS 2 messages are
    assert isinstance(session.queue, collections.deque) and len(session.queue) == 3
    assert broker.sessions["pub"].inbound_qos2 == {1, 2, 3}
    again = FakeClient(broker, clock)
    again.connect("sub", clean=False)
    got = [p for p in again.received() if isinstance(p, Publish)]
    assert [p.payload for p in got] == [b"0", b"1", b"2"]
    late = FakeClient(broker, clock)
    late.connect("late")
    answer = late.subscribe("t/r") + late.received()
    assert [p.payload for p in answer if isinstance(p, Publish)] == [b"retained"]
