"""The connection rules and the broker core, driven through StringTransport and task.Clock."""
from __future__ import annotations

from twisted.internet import defer

from mqttd.codec.packets import (
    Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, Puback, Pubcomp, Publish,
    Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will)
from mqttd.persistence import records as R

from core.harness import FakeClient, Recorder, make_broker


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


# --- CONNECT ------------------------------------------------------------------------

def test_first_packet_must_be_connect():
    """A PINGREQ before CONNECT is a protocol error and closes the socket [MQTT-3.1.0-1]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.send_bytes(b"\xc0\x00")
    assert c.disconnecting
    assert c.raw() == b""


def test_second_connect_closes_connection():
    """A second CONNECT is a protocol error [MQTT-3.1.0-2]; v5 gets DISCONNECT 0x82."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    c.send(Connect(5, "a"))
    packets = c.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x82
    assert c.disconnecting


def test_unknown_protocol_level_gets_v3_connack_0x01():
    """An unsupported level is answered with return code 0x01 and a close [MQTT-3.1.2-2]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    # CONNECT, name "MQTT", level 6, clean, keepalive 60, client id "x"
    c.send_bytes(bytes.fromhex("10 0d 0004 4d515454 06 02 003c 0001 78"))
    assert c.raw() == bytes.fromhex("20 02 00 01")
    assert c.disconnecting


def test_bad_protocol_name_at_level_5_gets_connack_0x84():
    """A v5 CONNECT with a wrong protocol name is refused with 0x84 [MQTT-3.1.2-1]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    # name "MQTX", level 5, clean, keepalive 0, no properties, client id "x"
    c.send_bytes(bytes.fromhex("10 0e 0004 4d515458 05 02 0000 00 0001 78"))
    assert c.raw() == bytes.fromhex("20 03 00 84 00")
    assert c.disconnecting


def test_silent_socket_is_closed_after_connect_timeout():
    """A socket that never sends CONNECT is closed after connect_timeout."""
    broker, clock = make_broker(connect_timeout=5)
    c = FakeClient(broker, clock)
    clock.advance(4.9)
    assert not c.disconnecting
    clock.advance(0.2)
    assert c.disconnecting


def test_keepalive_is_enforced_at_one_and_a_half_periods():
    """No packet for 1.5 x keepalive closes the connection and publishes the will [MQTT-3.1.2-24]."""
    broker, clock = make_broker()
    watcher = FakeClient(broker, clock)
    watcher.connect("w")
    watcher.subscribe("will/#")
    c = FakeClient(broker, clock)
    c.connect("k", keepalive=10, will=Will("will/k", b"gone"))
    clock.advance(9)
    c.send(Pingreq())
    assert isinstance(c.received()[0], Pingresp)
    clock.advance(14.9)
    assert not c.disconnecting
    clock.advance(0.2)
    assert c.disconnecting
    c.conn.connection_lost(None)
    assert [p.payload for p in publishes(watcher.received())] == [b"gone"]


def test_empty_client_id_gets_an_assigned_identifier_in_v5():
    """v5 CONNACK carries the Assigned Client Identifier for an empty id [MQTT-3.2.2-16]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    connack = c.connect("")[0]
    assigned = connack.properties.assigned_client_identifier
    assert assigned and assigned in broker.sessions


def test_empty_client_id_with_clean_session_0_is_rejected_in_311():
    """v3.1.1 refuses an empty id with clean session 0 with return code 0x02 [MQTT-3.1.3-8]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    connack = c.connect("", clean=False, expect_ok=False)[0]
    assert connack.reason_code == 0x02
    assert c.disconnecting


def test_empty_client_id_in_311_clean_session_is_accepted():
    """v3.1.1 assigns an id to an empty one with clean session 1 [MQTT-3.1.3-6]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.connect("", clean=True)
    assert c.conn.client_id.startswith("mqttd-")


def test_takeover_disconnects_old_connection_with_0x8e_and_publishes_its_will():
    """A second connection with the same id closes the first (v5: DISCONNECT 0x8E) [MQTT-3.1.4-2]."""
    broker, clock = make_broker()
    watcher = FakeClient(broker, clock)
    watcher.connect("w")
    watcher.subscribe("will/#")
    old = FakeClient(broker, clock, level=5)
    old.connect("dup", will=Will("will/dup", b"bye"))
    new = FakeClient(broker, clock, level=5)
    new.connect("dup")
    packets = old.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x8E
    assert old.disconnecting
    old.conn.connection_lost(None)  # the old socket closes later: no effect on the new one
    assert broker.sessions["dup"].connection is new.conn
    assert [p.payload for p in publishes(watcher.received())] == [b"bye"]


# --- sessions -------------------------------------------------------------------------

def test_persistent_session_queues_qos1_while_offline():
    """clean=false keeps subscriptions and queues QoS 1; reconnect has session present."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("sub", clean=False)
    sub.subscribe("t/#", qos=1)
    sub.drop()
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.publish("t/1", b"m1", qos=1, packet_id=7)
    pub.publish("t/2", b"m0", qos=0)
    assert pub.received() == [Puback(7)]
    again = FakeClient(broker, clock)
    connack = again.connect("sub", clean=False)[0]
    assert connack.session_present
    got = publishes(again.received())
    assert [(p.topic, p.payload, p.qos) for p in got] == [("t/1", b"m1", 1)]


def test_qos0_is_queued_offline_only_when_configured():
    """queue_qos0 keeps QoS 0 messages for offline persistent sessions."""
    broker, clock = make_broker(queue_qos0=True)
    sub = FakeClient(broker, clock)
    sub.connect("sub", clean=False)
    sub.subscribe("t", qos=0)
    sub.drop()
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.publish("t", b"zero")
    again = FakeClient(broker, clock)
    again.connect("sub", clean=False)
    assert [p.payload for p in publishes(again.received())] == [b"zero"]


def test_clean_session_discards_previous_state():
    """Reconnecting with clean=true starts without subscriptions, session present 0 [MQTT-3.2.2-1]."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("s", clean=False)
    sub.subscribe("t", qos=1)
    sub.drop()
    again = FakeClient(broker, clock)
    connack = again.connect("s", clean=True)[0]
    assert not connack.session_present
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("t", b"x", qos=1)
    assert publishes(again.received()) == []


def test_unacknowledged_messages_are_resent_with_dup_in_order():
    """On reconnect, in-flight QoS 1/2 PUBLISHes are resent with DUP, in order [MQTT-4.4.0-1]."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("s", clean=False)
    sub.subscribe("t", qos=2)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    for i in range(3):
        pub.publish("t", b"%d" % i, qos=2, packet_id=i + 1)
    first = publishes(sub.received())
    assert [p.payload for p in first] == [b"0", b"1", b"2"]
    sub.send(Pubrec(first[2].packet_id))  # third one moves to PUBREL
    sub.received()
    sub.drop()
    again = FakeClient(broker, clock)
    again.connect("s", clean=False)
    packets = again.received()
    resent = publishes(packets)
    assert [(p.payload, p.dup, p.packet_id) for p in resent] == [
        (b"0", True, first[0].packet_id), (b"1", True, first[1].packet_id)]
    assert Pubrel(first[2].packet_id) in packets


def test_session_expiry_removes_offline_v5_session():
    """A v5 session with expiry 60 s is gone 60 s after disconnect."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("e", clean=False, properties=Properties(session_expiry_interval=60))
    c.drop()
    clock.advance(59)
    assert "e" in broker.sessions
    clock.advance(2)
    assert "e" not in broker.sessions


# --- PUBLISH flows -----------------------------------------------------------------------

def test_client_receives_its_own_message():
    """Tutorial 1: a client subscribed to a topic gets what it publishes there."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.connect("me")
    assert c.subscribe("hello", qos=0)[0] == Suback(1, (0,))
    c.publish("hello", b"world")
    got = publishes(c.received())
    assert [(p.topic, p.payload, p.retain) for p in got] == [("hello", b"world", False)]


def test_delivered_qos_is_min_of_published_and_granted():
    """A QoS 2 message to a QoS 1 subscription arrives at QoS 1 [MQTT-3.8.4-8]."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("s")
    sub.subscribe("t", qos=1)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("t", b"x", qos=2, packet_id=5)
    assert pub.received() == [Pubrec(5)]
    assert [p.qos for p in publishes(sub.received())] == [1]


def test_overlapping_subscriptions_deliver_one_copy_at_highest_qos():
    """Overlapping filters give one copy at the highest granted QoS [MQTT-3.3.5-1]."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("s")
    sub.subscribe("a/+", qos=0, packet_id=1)
    sub.subscribe("a/#", qos=2, packet_id=2)
    sub.subscribe("a/b", qos=1, packet_id=3)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("a/b", b"x", qos=2, packet_id=1)
    got = publishes(sub.received())
    assert [p.qos for p in got] == [2]


def test_inbound_qos2_resent_publish_is_not_delivered_twice():
    """A PUBLISH re-sent with the same id before PUBREL is acknowledged, not routed again [MQTT-4.3.3-10]."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("s")
    sub.subscribe("t", qos=0)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("t", b"once", qos=2, packet_id=9)
    pub.send(Publish("t", b"once", 2, dup=True, packet_id=9))
    assert pub.received() == [Pubrec(9), Pubrec(9)]
    pub.send(Pubrel(9))
    assert pub.received() == [Pubcomp(9)]
    assert len(publishes(sub.received())) == 1
    pub.publish("t", b"again", qos=2, packet_id=9)  # id free again: a new message
    assert len(publishes(sub.received())) == 1


def test_outbound_qos2_full_flow():
    """Broker → client QoS 2: PUBLISH, PUBREC → PUBREL, PUBCOMP frees the id."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("s")
    sub.subscribe("t", qos=2)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("t", b"x", qos=2, packet_id=1)
    (p,) = publishes(sub.received())
    sub.send(Pubrec(p.packet_id))
    assert sub.received() == [Pubrel(p.packet_id)]
    sub.send(Pubcomp(p.packet_id))
    assert broker.sessions["s"].inflight == {}


def test_inflight_window_holds_back_extra_messages_until_acked():
    """No more than max_inflight QoS 1 messages are unacknowledged; PUBACK releases the next."""
    broker, clock = make_broker(max_inflight=2)
    sub = FakeClient(broker, clock)
    sub.connect("s")
    sub.subscribe("t", qos=1)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    for i in range(4):
        pub.publish("t", b"%d" % i, qos=1, packet_id=i + 1)
    got = publishes(sub.received())
    assert [p.payload for p in got] == [b"0", b"1"]
    sub.send(Puback(got[0].packet_id))
    assert [p.payload for p in publishes(sub.received())] == [b"2"]


def test_clients_cannot_publish_into_sys():
    """A PUBLISH to $SYS/... is refused (v5 PUBACK 0x87) and not routed."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("s")
    sub.subscribe("$SYS/#")
    pub = FakeClient(broker, clock, level=5)
    pub.connect("p")
    pub.publish("$SYS/fake", b"x", qos=1, packet_id=3)
    assert pub.received() == [Puback(3, 0x87)]
    assert publishes(sub.received()) == []


def test_v5_properties_are_forwarded_unchanged():
    """User properties (in order, repeated names), content type, response topic and correlation data reach v5 subscribers."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s")
    sub.subscribe("t", qos=1)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("p")
    props = Properties(payload_format_indicator=1, content_type="text/plain",
                       response_topic="reply/here", correlation_data=b"\x00\x01",
                       user_properties=(("b", "2"), ("a", "1"), ("b", "3")))
    pub.publish("t", b"x", qos=1, packet_id=1, properties=props)
    (p,) = publishes(sub.received())
    assert p.properties == props


def test_v5_puback_says_no_matching_subscribers():
    """v5 PUBACK carries 0x10 when nobody was subscribed."""
    broker, clock = make_broker()
    pub = FakeClient(broker, clock, level=5)
    pub.connect("p")
    pub.publish("nobody", b"x", qos=1, packet_id=2)
    assert pub.received() == [Puback(2, 0x10)]


def test_qos3_publish_from_v5_client_gets_disconnect_0x81():
    """QoS 3 is malformed [MQTT-3.3.1-4]: v5 DISCONNECT 0x81, connection closed, others unaffected."""
    broker, clock = make_broker()
    other = FakeClient(broker, clock)
    other.connect("o")
    other.subscribe("t")
    bad = FakeClient(broker, clock, level=5)
    bad.connect("bad")
    bad.send_bytes(bytes.fromhex("36 04 0001 74 00"))  # qos bits 11
    packets = bad.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x81
    assert bad.disconnecting
    bad.conn.connection_lost(None)
    good = FakeClient(broker, clock)
    good.connect("g")
    good.publish("t", b"still fine")
    assert [p.payload for p in publishes(other.received())] == [b"still fine"]


# --- retained -------------------------------------------------------------------------------

def test_retained_message_is_stored_replaced_and_cleared():
    """Retained: store, replace, clear with an empty payload [MQTT-3.3.1-5, 3.3.1-10]."""
    broker, clock = make_broker()
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("r", b"one", retain=True)
    pub.publish("r", b"two", retain=True)
    s1 = FakeClient(broker, clock)
    s1.connect("s1")
    got = publishes(s1.subscribe("r"))
    assert [(p.payload, p.retain) for p in got] == [(b"two", True)]
    pub.publish("r", b"", retain=True)
    s2 = FakeClient(broker, clock)
    s2.connect("s2")
    assert publishes(s2.subscribe("r")) == []


def test_live_delivery_of_retained_publish_has_retain_0():
    """An existing subscriber gets a retained PUBLISH with retain=0 [MQTT-3.3.1-9]."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("s")
    sub.subscribe("r")
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("r", b"x", retain=True)
    assert [p.retain for p in publishes(sub.received())] == [False]


def test_every_retained_match_is_sent_however_many():
    """5,000 retained matches (> the queue limit) are all delivered with retain=1."""
    broker, clock = make_broker(max_queued_messages=100)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    for i in range(5000):
        pub.publish(f"r/{i}", b"v", retain=True)
    sub = FakeClient(broker, clock)
    sub.connect("s")
    packets = sub.subscribe("r/#")
    assert packets[0] == Suback(1, (0,))
    got = publishes(packets)
    assert len(got) == 5000 and all(p.retain for p in got)


# --- wills ------------------------------------------------------------------------------------

def _will_watch(broker, clock):
    watcher = FakeClient(broker, clock)
    watcher.connect("watch")
    watcher.subscribe("will/#", qos=1)
    return watcher


def test_will_is_published_on_network_loss_with_its_qos_and_retain():
    """Losing the socket publishes the will with its QoS and retain flag [MQTT-3.1.2-8]."""
    broker, clock = make_broker()
    watcher = _will_watch(broker, clock)
    c = FakeClient(broker, clock)
    c.connect("c", will=Will("will/c", b"lost", qos=1, retain=True))
    c.drop()
    (p,) = publishes(watcher.received())
    assert (p.payload, p.qos) == (b"lost", 1)
    assert broker.retained["will/c"].payload == b"lost"


def test_will_is_not_published_after_disconnect():
    """DISCONNECT discards the will [MQTT-3.1.2-10, 3.14.4-3]."""
    broker, clock = make_broker()
    watcher = _will_watch(broker, clock)
    c = FakeClient(broker, clock)
    c.connect("c", will=Will("will/c", b"lost"))
    c.send(Disconnect())
    c.conn.connection_lost(None)
    assert publishes(watcher.received()) == []


def test_will_is_published_after_protocol_error():
    """A protocol error closes the connection and publishes the will."""
    broker, clock = make_broker()
    watcher = _will_watch(broker, clock)
    c = FakeClient(broker, clock)
    c.connect("c", will=Will("will/c", b"err"))
    c.send(Connect(4, "c"))
    assert c.disconnecting
    c.conn.connection_lost(None)
    assert [p.payload for p in publishes(watcher.received())] == [b"err"]


def test_v5_disconnect_with_will_reason_publishes_will():
    """v5 DISCONNECT with reason 0x04 publishes the will."""
    broker, clock = make_broker()
    watcher = _will_watch(broker, clock)
    c = FakeClient(broker, clock, level=5)
    c.connect("c", will=Will("will/c", b"asked"))
    c.send(Disconnect(0x04))
    assert [p.payload for p in publishes(watcher.received())] == [b"asked"]


# --- subscriptions ----------------------------------------------------------------------------

def test_invalid_filters_get_failure_codes_per_item_in_v5():
    """v5: each bad filter gets its own 0x8F; good ones are granted (v3 closes, see
    tests/core/test_strictness.py)."""
    broker, clock = make_broker()
    v5 = FakeClient(broker, clock, level=5)
    v5.connect("b")
    assert v5.subscribe("ok", "a+", qos=2)[0] == Suback(1, (2, 0x8F))


def test_unsubscribe_v5_reports_missing_subscriptions():
    """v5 UNSUBACK says 0x11 for a filter that had no subscription."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("c")
    c.subscribe("t")
    c.send(Unsubscribe(2, ("t", "nope")))
    assert c.received() == [Unsuback(2, (0x00, 0x11))]
    c.publish("t", b"x")
    assert publishes(c.received()) == []


def test_sys_topics_not_matched_by_leading_wildcard():
    """'#' does not match $SYS/... [MQTT-4.7.2-1]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock)
    c.connect("c")
    c.subscribe("#")
    broker.publish_message("$SYS/x/y", b"1")
    assert publishes(c.received()) == []


# --- bounded resources ---------------------------------------------------------------------------

def test_slow_subscriber_queue_is_bounded_and_others_are_not_stalled():
    """A paused subscriber's messages queue up to the limit, the overflow is counted; others get all."""
    broker, clock = make_broker(max_queued_messages=5, publisher_backpressure=False)
    slow = FakeClient(broker, clock)
    slow.connect("slow")
    slow.subscribe("t", qos=1)
    fast = FakeClient(broker, clock)
    fast.connect("fast")
    fast.subscribe("t", qos=1)
    slow.conn.pause_writing()
    pub = FakeClient(broker, clock)
    pub.connect("p")
    for i in range(3):
        pub.publish("t", b"q0")
    for i in range(10):
        pub.publish("t", b"q1-%d" % i, qos=1, packet_id=i + 1)
    assert len(publishes(fast.received())) == 13
    assert publishes(slow.received()) == []
    session = broker.sessions["slow"]
    assert session.dropped == {"queue-full": 8}
    assert len(session.queue) == 5
    slow.conn.resume_writing()
    assert [p.payload for p in publishes(slow.received())] == [b"q1-%d" % i for i in range(5, 10)]
    assert broker.stats.dropped == {"queue-full": 8}
    assert pub.transport.producerState == "producing"


def test_congested_subscriber_pauses_its_publishers_until_it_drains():
    """Publishers feeding an online subscriber whose queue is over half full stop being read."""
    broker, clock = make_broker(max_queued_messages=8, max_inflight=2)
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("t", qos=1)
    other = FakeClient(broker, clock)
    other.connect("other")
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for i in range(6):  # 2 in flight, 4 queued: the high-water mark
        pub.publish("t", b"%d" % i, qos=1, packet_id=i + 1)
    assert pub.conn.input_blocked       # its input is held (read ahead up to a bound)
    other.publish("elsewhere", b"x", qos=1)  # publishers to other topics are not held
    assert other.transport.producerState == "producing"
    for _ in range(3):  # the subscriber acknowledges: the queue drains to the low-water mark
        for p in publishes(sub.received()):
            sub.send(Puback(p.packet_id))
    clock.advance(0)    # publishers are released on the next reactor turn
    assert not pub.conn.input_blocked
    assert pub.transport.producerState == "producing"
    assert broker.stats.dropped == {}


def test_stuck_subscriber_holds_publishers_back_only_for_max_publisher_pause():
    """A subscriber that never reads releases its publishers after max_publisher_pause."""
    broker, clock = make_broker(max_queued_messages=4, max_inflight=1, max_publisher_pause=5)
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("t", qos=1)
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for i in range(4):
        pub.publish("t", b"%d" % i, qos=1, packet_id=i + 1)
    assert pub.conn.input_blocked
    clock.advance(5)
    assert not pub.conn.input_blocked
    assert pub.transport.producerState == "producing"
    clock.advance(1)
    for i in range(10):  # past the pause: overflow by policy, counted, publisher not held
        pub.publish("t", b"more", qos=1, packet_id=10 + i)
    assert pub.transport.producerState == "producing"
    assert broker.stats.dropped["queue-full"] > 0


def test_drop_new_policy_keeps_the_oldest():
    """With drop-new, a full queue refuses the newest message."""
    broker, clock = make_broker(max_queued_messages=2, overflow_policy="drop-new")
    sub = FakeClient(broker, clock)
    sub.connect("s", clean=False)
    sub.subscribe("t", qos=1)
    sub.drop()
    pub = FakeClient(broker, clock)
    pub.connect("p")
    for i in range(4):
        pub.publish("t", b"%d" % i, qos=1, packet_id=i + 1)
    again = FakeClient(broker, clock)
    again.connect("s", clean=False)
    assert [p.payload for p in publishes(again.received())] == [b"0", b"1"]


def test_oversized_packet_is_refused_from_its_header():
    """A packet larger than max_packet_size closes the connection (v5 DISCONNECT 0x95)."""
    broker, clock = make_broker(max_packet_size=1024)
    c = FakeClient(broker, clock, level=5)
    c.connect("c")
    c.send_bytes(bytes.fromhex("30 ff ff 03"))  # PUBLISH announcing ~64 KiB
    packets = c.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x95
    assert c.disconnecting


# --- events ----------------------------------------------------------------------------------------

def test_events_follow_a_client_life_with_mosca_names():
    """clientConnected, subscribed, published, unsubscribed, clientDisconnecting, clientDisconnected."""
    broker, clock = make_broker()
    rec = Recorder(broker)
    c = FakeClient(broker, clock)
    c.connect("ev")
    c.subscribe("t")
    c.publish("t", b"x")
    c.send(Unsubscribe(2, ("t",)))
    c.send(Disconnect())
    assert rec.names() == ["clientConnected", "subscribed", "published", "unsubscribed",
                           "clientDisconnecting", "clientDisconnected"]
    fields = dict(rec.events)
    assert fields["clientConnected"]["client"].client_id == "ev"
    assert fields["subscribed"]["topic"] == "t"
    assert fields["published"]["message"].payload == b"x"


def test_in_process_publish_and_subscribe():
    """Embedders publish and subscribe without a socket; internal publishes have client None."""
    broker, clock = make_broker()
    got = []
    unsubscribe = broker.subscribe_local("app/#", got.append)
    c = FakeClient(broker, clock)
    c.connect("c")
    c.subscribe("app/#")
    c.publish("app/1", b"from client")
    broker.publish_message("app/2", b"from app")
    assert [m.payload for m in got] == [b"from client", b"from app"]
    assert [p.payload for p in publishes(c.received())] == [b"from client", b"from app"]
    unsubscribe()
    broker.publish_message("app/3", b"later")
    assert len(got) == 2


# --- durability of acknowledgements ---------------------------------------------------------------------

class SlowStore:
    """A durable store whose sync waits for the test to fire it."""

    durable = True

    def __init__(self):
        self.ops = []
        self.waiting = []

    def open(self):
        return R.StoredState()

    def write(self, op):
        self.ops.append(op)

    def sync(self):
        d = defer.Deferred()
        self.waiting.append(d)
        return d

    def close(self):
        return defer.succeed(None)

    def fire(self):
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


def test_puback_waits_until_the_message_is_stored():
    """PUBACK for a message queued for a persistent session is sent only after sync."""
    store = SlowStore()
    broker, clock = make_broker(store=store)
    sub = FakeClient(broker, clock)
    sub.send(Connect(4, "s", False))
    assert sub.received() == []   # CONNACK waits for the stored session too
    clock.advance(0)   # the broker syncs once per reactor turn
    store.fire()
    assert sub.received() == [Connack(False, 0)]
    sub.send(Subscribe(1, (Subscription("t", 1),)))
    clock.advance(0)   # the broker syncs once per reactor turn
    store.fire()
    assert sub.received() == [Suback(1, (1,))]
    sub.drop()
    clock.advance(0)   # the broker syncs once per reactor turn
    store.fire()
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("t", b"stored", qos=1, packet_id=4)
    pub.publish("other", b"not stored", qos=1, packet_id=5)
    assert pub.received() == []   # 5 waits behind 4: acks keep their order [MQTT-4.6.0-2]
    assert any(isinstance(op, R.PutOutbound) for op in store.ops)
    clock.advance(0)
    assert len(store.waiting) == 1  # both PUBLISHes of this turn share one sync
    clock.advance(0)   # the broker syncs once per reactor turn
    store.fire()
    assert pub.received() == [Puback(4), Puback(5)]


def test_acknowledgements_of_one_turn_share_its_sync_and_go_out_in_one_write():
    """PUBACKs of one reactor turn wait for that turn's one sync and leave in one write,
    in order; a PUBLISH of the next turn waits for the next sync, never an earlier one
    (which started before its message was written) [MQTT-4.6.0-2]."""
    store = SlowStore()
    broker, clock = make_broker(store=store)
    sub = FakeClient(broker, clock)
    sub.send(Connect(4, "s", False))
    clock.advance(0)
    store.fire()
    sub.send(Subscribe(1, (Subscription("t", 1),)))
    clock.advance(0)
    store.fire()
    sub.drop()
    clock.advance(0)
    store.fire()
    pub = FakeClient(broker, clock)
    pub.connect("p")
    writes = []
    write = pub.transport.write
    pub.transport.write = lambda data: (writes.append(data), write(data))[1]
    for pid in (1, 2, 3):
        pub.publish("t", b"m%d" % pid, qos=1, packet_id=pid)
    clock.advance(0)                      # the turn ends: its sync starts
    assert len(store.waiting) == 1
    first_sync = store.waiting[0]
    pub.publish("t", b"m4", qos=1, packet_id=4)   # the next turn
    store.waiting.remove(first_sync)
    first_sync.callback(None)             # turn 1 on disk, turn 2 not yet
    assert writes == [b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x02\x00\x03"]
    assert pub.received() == [Puback(1), Puback(2), Puback(3)]
    clock.advance(0)
    store.fire()
    assert pub.received() == [Puback(4)]
    assert len(writes) == 2


def test_clean_sessions_and_qos0_never_touch_the_store():
    """Clean sessions and QoS 0 produce no store operations."""
    store = SlowStore()
    broker, clock = make_broker(store=store)
    sub = FakeClient(broker, clock)
    sub.connect("s", clean=True)
    sub.subscribe("t", qos=1)
    pub = FakeClient(broker, clock)
    pub.connect("p")
    pub.publish("t", b"a", qos=1, packet_id=1)
    pub.publish("t", b"b", qos=0)
    assert store.ops == []
    assert pub.received() == [Puback(1)]


def test_v5_disconnect_with_expiry_0_removes_the_stored_session():
    """Session Expiry 0 on DISCONNECT ends a persistent session, in the store too."""
    store = SlowStore()
    broker, clock = make_broker(store=store)
    c = FakeClient(broker, clock, level=5)
    c.send(Connect(5, "gone", False, properties=Properties(session_expiry_interval=60)))
    clock.advance(0)
    store.fire()
    c.received()
    c.send(Disconnect(0, Properties(session_expiry_interval=0)))
    assert "gone" not in broker.sessions
    assert R.DeleteSession("gone") in store.ops
