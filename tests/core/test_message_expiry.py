"""Issue 7 fault 3: Message Expiry Interval on every path a message takes
[MQTT-3.3.2-5], [MQTT-3.3.2-6]: queued, in flight (resend), retained, across a restart."""
from __future__ import annotations

from twisted.internet.task import Clock

from mqttd.broker import Broker, BrokerConfig
from mqttd.codec.packets import Connect, Properties, Publish, Puback

from tests.core.harness import FakeClient, make_broker
from tests.core.test_will_delay import RecordingStore


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def expiring(seconds):
    return Properties(message_expiry_interval=seconds)


def reconnect(broker, clock, client_id, **props):
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, client_id, False, 0, properties=Properties(
        session_expiry_interval=300, **props)))
    clock.advance(0)
    return c


def test_s1_gets_only_the_unexpired_messages_with_reduced_intervals():
    """The issue's s1 example: two 1 s and two 60 s messages, 3 s offline -> the two 60 s ones, <= 57."""
    broker, clock = make_broker()
    s1 = FakeClient(broker, clock, level=5)
    s1.connect("s1", clean=False, properties=Properties(session_expiry_interval=300))
    s1.subscribe("e/#", qos=1)
    s1.drop()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    for n, interval in enumerate((1, 1, 60, 60)):
        pub.publish("e/%d" % n, b"m%d" % n, qos=1, packet_id=n + 1,
                    properties=expiring(interval))
    clock.advance(3)
    back = reconnect(broker, clock, "s1")
    got = publishes(back.received())
    assert [p.payload for p in got] == [b"m2", b"m3"]
    assert all(p.properties.message_expiry_interval <= 57 for p in got)
    assert broker.sessions["s1"].dropped.get("expired") == 2


def test_message_delivered_at_once_keeps_its_interval():
    """No waiting, no change: the forwarded interval is the received one."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub")
    sub.subscribe("e/#", qos=1)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("e/x", b"m", qos=1, properties=expiring(60))
    (p,) = publishes(sub.received())
    assert p.properties.message_expiry_interval == 60


def test_queued_behind_a_paused_transport_expires_and_is_reduced():
    """Online but not writable: the queue path applies the same rule."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub")
    sub.subscribe("e/#", qos=0)
    sub.conn.pause_writing()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("e/a", b"short", properties=expiring(2))
    pub.publish("e/b", b"long", properties=expiring(30))
    clock.advance(10)
    sub.conn.resume_writing()
    (p,) = publishes(sub.received())
    assert p.payload == b"long" and p.properties.message_expiry_interval == 20


def test_in_flight_resend_carries_the_reduced_interval_and_expired_is_not_resent():
    """Stored -> resent: an unacknowledged PUBLISH is resent with the time left, or dropped."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub", clean=False, properties=Properties(session_expiry_interval=300))
    sub.subscribe("e/#", qos=1)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("e/a", b"short", qos=1, properties=expiring(5))
    pub.publish("e/b", b"long", qos=1, properties=expiring(50), packet_id=2)
    assert len(publishes(sub.received())) == 2   # in flight, never acknowledged
    sub.drop()
    clock.advance(10)
    back = reconnect(broker, clock, "sub")
    (p,) = publishes(back.received())
    assert p.payload == b"long" and p.dup and p.properties.message_expiry_interval == 40
    assert len(broker.sessions["sub"].inflight) == 1


def test_retained_message_expires_and_is_replayed_with_the_time_left():
    """Retained: replayed with a lowered interval, then removed when it expires."""
    broker, clock = make_broker()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("r/a", b"keep", retain=True, properties=expiring(30))
    clock.advance(12)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("sub")
    (p,) = publishes(sub.subscribe("r/#"))
    assert p.retain and p.properties.message_expiry_interval == 18
    clock.advance(18)
    assert "r/a" not in broker.retained   # the expiry timer removed it
    later = FakeClient(broker, clock, level=5)
    later.connect("later")
    assert publishes(later.subscribe("r/#")) == []


def test_expired_retained_message_is_deleted_from_the_store():
    """The retained expiry timer writes DeleteRetained so a restart does not bring it back."""
    store = RecordingStore()
    broker, clock = make_broker(store)
    broker.publish_message("r/x", b"v", retain=True, properties=expiring(5))
    assert "r/x" in store.state.retained
    clock.advance(5)
    assert "r/x" not in store.state.retained


def test_messages_that_expired_during_a_restart_are_not_delivered():
    """Across a restart: queued and retained messages past their expiry are dropped on restore."""
    store = RecordingStore()
    broker, clock = make_broker(store)
    sub = FakeClient(broker, clock, level=5)
    sub.send(Connect(5, "sub", False, 0, properties=Properties(session_expiry_interval=3000)))
    clock.advance(0)
    sub.subscribe("e/#", qos=1)
    clock.advance(0)
    sub.drop()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("e/a", b"short", qos=1, properties=expiring(5))
    pub.publish("e/b", b"long", qos=1, properties=expiring(100), packet_id=2)
    pub.publish("e/r", b"ret", retain=True, properties=expiring(5))
    clock.advance(0)
    broker.shutdown()
    clock2 = Clock()
    clock2.advance(clock.seconds() + 20)
    broker2 = Broker(clock2, store, BrokerConfig())
    broker2.restore(store.open())
    assert "e/r" not in broker2.retained and "e/r" not in store.state.retained
    back = reconnect(broker2, clock2, "sub")
    (p,) = publishes(back.received())
    assert p.payload == b"long" and p.properties.message_expiry_interval == 80


def test_expiry_applies_to_v3_subscribers_too_without_the_property():
    """A v3.1.1 subscriber never sees the property but does not get expired messages."""
    broker, clock = make_broker()
    s = FakeClient(broker, clock, level=4)
    s.connect("v3", clean=False)
    s.subscribe("e/#", qos=1)
    s.drop()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("e/a", b"gone", qos=1, properties=expiring(1))
    clock.advance(2)
    back = FakeClient(broker, clock, level=4)
    back.connect("v3", clean=False)
    assert publishes(back.received()) == []
    back.send(Puback(1))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.tuples(st.sampled_from([0, 1, 2, 5]),          # wait before
                                   st.one_of(st.none(), st.integers(1, 12)),  # interval
                                   st.sampled_from([0, 1, 2])),               # QoS
                         min_size=1, max_size=8),
       offline_for=st.sampled_from([0, 1, 3, 7, 20]))
def test_any_schedule_delivers_exactly_the_unexpired_messages_with_the_time_left(
        messages, offline_for):
    """Whatever was published when, with which interval and QoS: the returning subscriber
    gets exactly the messages not yet expired, in order, each with the interval left."""
    broker, clock = make_broker(queue_qos0=True)
    s = FakeClient(broker, clock, level=5)
    s.connect("s", clean=False, properties=Properties(session_expiry_interval=3000))
    s.subscribe("e/#", qos=2)
    s.drop()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    published = []
    for n, (wait, interval, qos) in enumerate(messages):
        clock.advance(wait)
        props = Properties() if interval is None else expiring(interval)
        pub.publish("e/%d" % n, b"%d" % n, qos=qos, packet_id=(n + 1) if qos else None,
                    properties=props)
        published.append((clock.seconds(), interval, b"%d" % n))
    clock.advance(offline_for)
    now = clock.seconds()
    back = reconnect(broker, clock, "s", receive_maximum=65535)
    got = [(p.payload, p.properties.message_expiry_interval) for p in publishes(back.received())]
    expected = [(payload, None if interval is None else int(at + interval - now))
                for at, interval, payload in published
                if interval is None or at + interval > now]
    assert got == expected
