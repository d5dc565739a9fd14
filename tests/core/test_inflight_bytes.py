"""--max-inflight-bytes: a byte bound on a client's outbound QoS 1/2 window (mosquitto's max_inflight_bytes).

Without it a client that never acknowledges held up to --max-inflight (1,000) x the largest
packet (16 MiB) in flight: 16 GiB, counted by no queue limit (NOTE-S9, issue 11).
"""
from __future__ import annotations

import pytest

from mqttd.codec.packets import Properties, Puback, Pubcomp, Publish, Pubrec
from mqttd.messages import Message, message_size
from mqttd.persistence import records as R
from mqttd.session import Session

from core.harness import FakeClient, make_broker
from logcapture import logged

PAYLOAD = b"p" * 997          # with the topic "t/x": 1,000 bytes a message


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def subscriber(broker, clock, client_id="sub", level=4, qos=1, **connect):
    c = FakeClient(broker, clock, level=level)
    c.connect(client_id, **connect)
    c.subscribe("t/#", qos=qos)
    return c


def publish_many(broker, clock, count, payload=PAYLOAD, qos=1):
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for i in range(count):
        pub.publish("t/x", payload + b"%03d" % i if payload else b"%03d" % i, qos=qos,
                    packet_id=i + 1)
    return pub


def test_inflight_bytes_stop_at_the_bound_and_the_rest_waits_in_the_queue():
    """A client that never acknowledges holds at most --max-inflight-bytes in flight; the rest queues."""
    broker, clock = make_broker(max_inflight_bytes=10_000)
    sub = subscriber(broker, clock)
    publish_many(broker, clock, 30, payload=b"p" * 997)
    session = broker.sessions["sub"]
    sent = publishes(sub.received())
    assert len(sent) == len(session.inflight) == 9          # 9 x 1,003 <= 10,000 < 10 x 1,003
    assert session.inflight_bytes == sum(message_size(r.message)
                                         for r in session.inflight.values()) <= 10_000
    assert len(session.queue) == 21
    assert session.queued_bytes == 21 * 1003


def test_acknowledgements_free_the_byte_window_in_order():
    """Each PUBACK lets the next queued message go; all 30 arrive in publish order."""
    broker, clock = make_broker(max_inflight_bytes=10_000)
    sub = subscriber(broker, clock)
    publish_many(broker, clock, 30, payload=b"p" * 997)
    session = broker.sessions["sub"]
    got = []
    for _ in range(100):
        batch = publishes(sub.received())
        if not batch:
            break
        got.extend(batch)
        assert session.inflight_bytes <= 10_000
        for p in batch:
            sub.send(Puback(p.packet_id))
    assert [p.payload[-3:] for p in got] == [b"%03d" % i for i in range(30)]
    assert session.inflight_bytes == 0 and not session.inflight and not session.queue


def test_hitting_the_byte_bound_is_counted_once_per_episode_and_logged_with_client_and_peer():
    """The limit hit is counted (max-inflight-bytes) and logged once, naming client and peer."""
    broker, clock = make_broker(max_inflight_bytes=10_000)
    sub = subscriber(broker, clock)
    with logged() as events:
        publish_many(broker, clock, 30, payload=b"p" * 997)
    assert broker.stats.refused["max-inflight-bytes"] == 1
    lines = [e for e in events if e.get("what") == "max-inflight-bytes"]
    assert len(lines) == 1
    assert lines[0]["client_id"] == "sub" and lines[0]["peer"] == "127.0.0.1:1"
    assert "--max-inflight-bytes 10000" in lines[0]["detail"]
    # the queue empties: the episode ends; the next one is counted again
    for _ in range(100):
        batch = publishes(sub.received())
        if not batch:
            break
        for p in batch:
            sub.send(Puback(p.packet_id))
    assert not broker.sessions["sub"].inflight_held
    pub = FakeClient(broker, clock)
    pub.connect("pub2")
    for i in range(12):
        pub.publish("t/x", b"q" * 1000, qos=1, packet_id=i + 1)
    assert broker.stats.refused["max-inflight-bytes"] == 2


def test_a_message_larger_than_the_bound_goes_alone():
    """A message above --max-inflight-bytes is not stuck: it goes when nothing else is in flight."""
    broker, clock = make_broker(max_inflight_bytes=1_000)
    sub = subscriber(broker, clock)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.publish("t/x", b"s" * 10, qos=1, packet_id=1)
    pub.publish("t/x", b"B" * 5_000, qos=1, packet_id=2)
    pub.publish("t/x", b"s" * 10, qos=1, packet_id=3)
    first = publishes(sub.received())
    assert [len(p.payload) for p in first] == [10]
    sub.send(Puback(first[0].packet_id))
    second = publishes(sub.received())
    assert [len(p.payload) for p in second] == [5_000]      # alone: over the bound
    sub.send(Puback(second[0].packet_id))
    assert [len(p.payload) for p in publishes(sub.received())] == [10]


def test_zero_means_no_byte_bound():
    """--max-inflight-bytes 0: only --max-inflight bounds the window."""
    broker, clock = make_broker(max_inflight_bytes=0, max_inflight=20)
    sub = subscriber(broker, clock)
    publish_many(broker, clock, 30, payload=b"p" * 100_000)
    assert len(publishes(sub.received())) == 20
    assert "max-inflight-bytes" not in broker.stats.refused


def test_the_default_bounds_a_window_of_big_messages():
    """By default 40 x 1 MB messages are not all in flight: 16 MiB at most."""
    broker, clock = make_broker(publisher_backpressure=False)   # all 40 are read at once
    assert broker.config.max_inflight_bytes == 16 * 1024 * 1024
    sub = subscriber(broker, clock)
    publish_many(broker, clock, 40, payload=b"p" * 1_000_000)
    session = broker.sessions["sub"]
    assert len(publishes(sub.received())) == 16
    assert session.inflight_bytes <= 16 * 1024 * 1024
    assert len(session.queue) == 24


@pytest.mark.parametrize("receive_maximum, bound, expected", [
    (3, 100_000, 3),         # Receive Maximum is the smaller window
    (50, 5_000, 4),          # the byte bound is: 4 x 1,003 <= 5,000
])
def test_receive_maximum_and_the_byte_bound_both_hold(receive_maximum, bound, expected):
    """A v5 client's Receive Maximum [MQTT-3.3.4-9] and --max-inflight-bytes both bound the window."""
    broker, clock = make_broker(max_inflight_bytes=bound)
    sub = subscriber(broker, clock, level=5,
                     properties=Properties(receive_maximum=receive_maximum))
    publish_many(broker, clock, 20, payload=b"p" * 997)
    assert len(publishes(sub.received())) == expected


def test_qos2_messages_count_until_pubcomp():
    """A QoS 2 message holds its bytes in flight until PUBCOMP, as its place in the count window."""
    broker, clock = make_broker(max_inflight_bytes=3_000)
    sub = subscriber(broker, clock, qos=2)
    publish_many(broker, clock, 5, payload=b"p" * 997, qos=2)
    session = broker.sessions["sub"]
    first = publishes(sub.received())
    assert len(first) == 2
    sub.send(Pubrec(first[0].packet_id))
    sub.received()                                          # PUBREL
    assert session.inflight_bytes == 2 * 1003
    assert publishes(sub.received()) == []                  # still waiting
    sub.send(Pubcomp(first[0].packet_id))
    assert len(publishes(sub.received())) == 1
    assert session.inflight_bytes == 2 * 1003


def test_a_failed_pubrec_frees_its_bytes():
    """A v5 PUBREC with an error code ends the flow and gives its bytes back."""
    broker, clock = make_broker(max_inflight_bytes=2_500)
    sub = subscriber(broker, clock, level=5, qos=2)
    publish_many(broker, clock, 4, payload=b"p" * 997, qos=2)
    session = broker.sessions["sub"]
    first = publishes(sub.received())
    assert len(first) == 2
    sub.send(Pubrec(first[0].packet_id, reason_code=0x80))
    assert len(publishes(sub.received())) == 1
    assert session.inflight_bytes == 2 * 1003


def test_expired_inflight_messages_dropped_on_resend_free_their_bytes():
    """A resumed session's in-flight message that expired is dropped, and its bytes are freed."""
    broker, clock = make_broker(max_inflight_bytes=10_000)
    sub = subscriber(broker, clock, level=5, clean=False,
                     properties=Properties(session_expiry_interval=600))
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t/x", b"e" * 997, qos=1, packet_id=1,
                properties=Properties(message_expiry_interval=5))
    pub.publish("t/x", b"k" * 997, qos=1, packet_id=2)
    assert len(publishes(sub.received())) == 2
    sub.drop()
    clock.advance(10)
    again = FakeClient(broker, clock, level=5)
    again.connect("sub", clean=False, properties=Properties(session_expiry_interval=600))
    resent = publishes(again.received())
    assert [(p.payload[:1], p.dup) for p in resent] == [(b"k", True)]
    assert broker.sessions["sub"].inflight_bytes == 1000


def _stored_session(client_id, inflight, queued):
    """A persistent session as a store or another cluster node hands it over."""
    stored = R.StoredSession(R.SessionRecord(
        client_id, 4, (R.SubscriptionRecord("t/#", 1),), None, 0.0))
    seq = 0
    for payload in inflight:
        seq += 1
        stored.outbound[seq] = R.OutboundRecord(seq, Message("t/x", payload, 1), 1, seq,
                                                R.OutboundStage.PUBLISH_SENT)
    for payload in queued:
        seq += 1
        stored.outbound[seq] = R.OutboundRecord(seq, Message("t/x", payload, 1), 1)
    return stored


def test_resumed_session_resends_every_inflight_message_even_over_a_lower_bound():
    """All in-flight messages are resent with DUP [MQTT-4.4.0-1], even past a bound lowered
    since; nothing queued goes in flight until the bytes are below the bound again."""
    broker, clock = make_broker(max_inflight_bytes=3_000)
    broker.install_session(_stored_session(
        "sub", [b"i" * 997] * 6, [b"q" * 997] * 4))       # 6,000 bytes in flight, bound 3,000
    session = broker.sessions["sub"]
    assert session.inflight_bytes == 6 * 1000
    sub = FakeClient(broker, clock)
    sub.connect("sub", clean=False)
    resent = publishes(sub.received())
    assert [(p.payload[:1], p.dup) for p in resent] == [(b"i", True)] * 6
    for p in resent[:3]:
        sub.send(Puback(p.packet_id))
    assert publishes(sub.received()) == []               # 3,000 + 1,000 is over 3,000
    sub.send(Puback(resent[3].packet_id))
    fresh = publishes(sub.received())
    assert [(p.payload[:1], p.dup) for p in fresh] == [(b"q", False)]
    assert session.inflight_bytes == 3 * 1000


def test_restored_and_released_sessions_keep_the_byte_count_true():
    """Recovery counts in-flight bytes; a release or takeover resets them."""
    broker, clock = make_broker()
    broker.install_session(_stored_session("sub", [b"a" * 10, b"b" * 20], [b"c"]))
    session = broker.sessions["sub"]
    assert session.inflight_bytes == (3 + 10) + (3 + 20)
    broker.release_session("sub")
    assert session.inflight_bytes == 0 and not session.inflight


def test_session_inflight_bookkeeping():
    """Session.restore_inflight/pop_inflight/clear_inflight keep inflight_bytes equal to the sum."""
    s = Session("c")
    a = R.OutboundRecord(1, Message("t", b"x" * 10, 1), 1, 1, R.OutboundStage.PUBLISH_SENT)
    b = R.OutboundRecord(2, Message("t", b"x" * 20, 1), 1, 2, R.OutboundStage.PUBLISH_SENT)
    s.restore_inflight(a)
    s.restore_inflight(b)
    assert s.inflight_bytes == 32
    assert s.pop_inflight(1) is a and s.inflight_bytes == 21
    with pytest.raises(KeyError):
        s.pop_inflight(1)
    s.inflight_held = True
    s.clear_inflight()
    assert (s.inflight, s.inflight_bytes, s.inflight_held) == ({}, 0, False)


def test_waiting_messages_count_against_the_queue_limits():
    """Messages held back by the byte bound are queued: --max-queued-messages applies to them."""
    broker, clock = make_broker(max_inflight_bytes=2_000, max_queued_messages=5,
                                publisher_backpressure=False)
    sub = subscriber(broker, clock)
    publish_many(broker, clock, 20, payload=b"p" * 997)
    session = broker.sessions["sub"]
    assert len(session.inflight) == 1 and len(session.queue) == 5
    assert session.dropped["queue-full"] == 14
