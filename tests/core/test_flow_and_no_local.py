"""Issue 7 faults 6 and 7: Receive Maximum on resume [MQTT-3.3.4-9]; No Local applied
per subscription before overlapping subscriptions are merged [MQTT-3.8.3-3]."""
from __future__ import annotations

from mqttd.codec.packets import (
    Connect, Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel, Subscribe, Subscription)

from tests.core.harness import FakeClient, make_broker


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def persistent_subscriber(broker, clock, qos=1):
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s", clean=False, properties=Properties(session_expiry_interval=300))
    sub.subscribe("t/#", qos=qos)
    return sub


def resume(broker, clock, receive_maximum):
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "s", False, 0, properties=Properties(
        session_expiry_interval=300, receive_maximum=receive_maximum)))
    return c


def test_resumed_session_resends_within_the_new_receive_maximum():
    """10 unacknowledged QoS 1 messages, Receive Maximum 2 on resume: 2 in flight at a time."""
    broker, clock = make_broker()
    sub = persistent_subscriber(broker, clock)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    for n in range(10):
        pub.publish("t/x", b"%d" % n, qos=1, packet_id=n + 1)
    assert len(publishes(sub.received())) == 10   # sent, never acknowledged
    sub.drop()
    back = resume(broker, clock, receive_maximum=2)
    first = publishes(back.received())
    assert [p.payload for p in first] == [b"0", b"1"] and all(p.dup for p in first)
    seen = [p.payload for p in first]
    outstanding = [p.packet_id for p in first]
    for _ in range(20):   # bounded: acknowledge one at a time
        if not outstanding:
            break
        back.send(Puback(outstanding.pop(0)))
        more = publishes(back.received())
        assert len(outstanding) + len(more) <= 2
        outstanding += [p.packet_id for p in more]
        seen += [p.payload for p in more]
    assert seen == [b"%d" % n for n in range(10)]
    assert broker.sessions["s"].inflight == {}


def test_new_messages_wait_behind_resends_for_the_window():
    """Messages published after the resume do not overtake the window either."""
    broker, clock = make_broker()
    sub = persistent_subscriber(broker, clock)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    for n in range(3):
        pub.publish("t/x", b"old%d" % n, qos=1, packet_id=n + 1)
    sub.drop()
    # queued while offline (never sent): no DUP on the way out
    back = resume(broker, clock, receive_maximum=1)
    (p,) = publishes(back.received())
    pub.publish("t/x", b"new", qos=1, packet_id=9)
    assert publishes(back.received()) == []
    payloads = [p.payload]
    for _ in range(10):
        back.send(Puback(p.packet_id))
        got = publishes(back.received())
        if not got:
            break
        assert len(got) == 1
        (p,) = got
        payloads.append(p.payload)
    assert payloads == [b"old0", b"old1", b"old2", b"new"]


def test_qos2_pubrel_resends_count_against_receive_maximum():
    """PUBREL resends are in flight too: Receive Maximum 1 resends one at a time."""
    broker, clock = make_broker()
    sub = persistent_subscriber(broker, clock, qos=2)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t/x", b"a", qos=2, packet_id=1)
    pub.publish("t/x", b"b", qos=2, packet_id=2)
    sent = publishes(sub.received())
    for p in sent:
        sub.send(Pubrec(p.packet_id))
    assert [type(x).__name__ for x in sub.received()] == ["Pubrel", "Pubrel"]
    sub.drop()
    back = resume(broker, clock, receive_maximum=1)
    packets = back.received()
    assert [type(x).__name__ for x in packets] == ["Connack", "Pubrel"]
    back.send(Pubcomp(packets[1].packet_id))
    assert [type(x).__name__ for x in back.received()] == ["Pubrel"]


def test_no_local_subscription_does_not_hide_an_overlapping_one():
    """The n1 example: t/# QoS 0 and t/x QoS 1 No Local -> own message once, through t/#."""
    broker, clock = make_broker()
    n1 = FakeClient(broker, clock, level=5)
    n1.connect("n1")
    n1.send(Subscribe(1, (Subscription("t/#", 0), Subscription("t/x", 1, no_local=True))))
    n1.received()
    n1.publish("t/x", b"mine", qos=1)
    got = publishes(n1.received())
    assert [(p.payload, p.qos) for p in got] == [(b"mine", 0)]


def test_no_local_on_every_matching_subscription_delivers_nothing():
    """All matching subscriptions No Local: nothing comes back [MQTT-3.8.3-3]."""
    broker, clock = make_broker()
    n1 = FakeClient(broker, clock, level=5)
    n1.connect("n1")
    n1.send(Subscribe(1, (Subscription("t/#", 0, no_local=True),
                          Subscription("t/x", 1, no_local=True))))
    n1.received()
    n1.publish("t/x", b"mine", qos=1)
    assert publishes(n1.received()) == []


def test_no_local_still_delivers_to_other_clients_at_their_merged_qos():
    """No Local concerns the publisher only; others get the highest QoS of their matches."""
    broker, clock = make_broker()
    other = FakeClient(broker, clock, level=5)
    other.connect("other")
    other.send(Subscribe(1, (Subscription("t/#", 0), Subscription("t/x", 1, no_local=True))))
    other.received()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t/x", b"m", qos=1)
    assert [(p.payload, p.qos) for p in publishes(other.received())] == [(b"m", 1)]
