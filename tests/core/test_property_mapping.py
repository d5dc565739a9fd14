"""Issue 7 fault 1: packet-form conversions map properties by the target packet,
and one failing delivery or teardown step never leaves half-done state."""
from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher

from mqttd.codec import encode
from mqttd.codec.packets import (
    MQTT_5, NO_PROPERTIES, Properties, Publish, Suback, Will)
from mqttd.messages import (
    Message, forwarded_properties, outbound_message, published_at, will_message)

from tests.core.harness import FakeClient, make_broker

WILL_PROPS = Properties(will_delay_interval=0, user_properties=(("a", "b"),))


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# --- the mapping function -------------------------------------------------------------

def test_forwarded_properties_keeps_only_what_a_publish_forwards():
    """Will Delay, Topic Alias, Subscription Identifiers never travel on (§3.3.2.3, §2.2.2.2)."""
    props = Properties(payload_format_indicator=1, message_expiry_interval=9,
                       content_type="c", response_topic="r", correlation_data=b"d",
                       user_properties=(("a", "b"),), will_delay_interval=5,
                       topic_alias=3, subscription_identifiers=(7,))
    assert forwarded_properties(props) == Properties(
        payload_format_indicator=1, message_expiry_interval=9, content_type="c",
        response_topic="r", correlation_data=b"d", user_properties=(("a", "b"),))


def test_forwarded_properties_returns_the_same_object_when_nothing_is_dropped():
    """The common case allocates nothing and keeps cached PUBLISH bytes valid."""
    props = Properties(user_properties=(("a", "b"),), message_expiry_interval=4)
    assert forwarded_properties(props) is props
    assert forwarded_properties(NO_PROPERTIES) is NO_PROPERTIES
    assert forwarded_properties(Properties(will_delay_interval=0)) is NO_PROPERTIES


def test_every_forwarded_form_encodes_as_a_publish():
    """Whatever a will carried, the PUBLISH it becomes encodes at every level."""
    will = Will("w/t", b"x", 1, True, Properties(
        will_delay_interval=0, message_expiry_interval=10, content_type="t",
        user_properties=(("a", "b"),)))
    message = published_at(will_message(will, "w1"), 100.0)
    assert message.expires_at == 110.0
    assert message.properties.will_delay_interval is None
    later = outbound_message(message, 103.5)
    for level in (3, 4, 5):
        encode(Publish(later.topic, later.payload, 1, True, False, 1, later.properties), level)
    assert later.properties.message_expiry_interval == 7


# --- will -> PUBLISH (the example) -----------------------------------------------

def test_will_with_will_delay_zero_and_user_property_reaches_v5_subscriber():
    """The will w1 {Will Delay 0, User Property a=b} reaches a v5 subscriber of w/#."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s")
    sub.subscribe("w/#", qos=1)
    w1 = FakeClient(broker, clock, level=5)
    w1.connect("w1", will=Will("w/t", b"gone", 0, False, WILL_PROPS))
    w1.drop()
    (p,) = publishes(sub.received())
    assert p.topic == "w/t" and p.payload == b"gone"
    assert p.properties.user_properties == (("a", "b"),)
    assert p.properties.will_delay_interval is None


def test_session_with_expiry_zero_is_discarded_after_will():
    """The teardown finishes: the next clean-start-0 CONNECT gets Session Present 0."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s")
    sub.subscribe("w/#")
    w1 = FakeClient(broker, clock, level=5)
    w1.connect("w1", will=Will("w/t", b"gone", 0, False, WILL_PROPS))
    w1.drop()
    assert "w1" not in broker.sessions
    again = FakeClient(broker, clock, level=5)
    (connack,) = again.connect("w1", clean=False)
    assert connack.session_present is False


def test_retained_will_with_delay_property_does_not_break_later_subscribe():
    """A retained will with Will Delay Interval: later v5 SUBSCRIBEs get SUBACK and the message."""
    broker, clock = make_broker()
    w1 = FakeClient(broker, clock, level=5)
    w1.connect("w1", will=Will("w/t", b"gone", 1, True, WILL_PROPS))
    w1.drop()
    for n in range(2):
        sub = FakeClient(broker, clock, level=5)
        sub.connect(f"late{n}")
        packets = sub.subscribe("w/#", qos=1)
        assert isinstance(packets[0], Suback) and packets[0].reason_codes == (1,)
        (p,) = publishes(packets + sub.received())
        assert p.retain and p.properties.user_properties == (("a", "b"),)
        assert not sub.disconnecting


def test_stored_messages_of_older_versions_are_mapped_on_restore():
    """Stored -> resent: a retained will and a queued message stored with a Will Delay
    Interval (as earlier versions did) are delivered, without it, after a restart."""
    from mqttd.persistence import records as R
    bad = Properties(will_delay_interval=3, user_properties=(("a", "b"),))
    state = R.StoredState()
    state.retained["w/old"] = Message("w/old", b"r", 1, True, bad)
    state.sessions["s"] = R.StoredSession(
        R.SessionRecord("s", 5, (R.SubscriptionRecord("q/#", 1),), 300, 0.0),
        {1: R.OutboundRecord(1, Message("q/x", b"q", 1, False, bad), 1)})
    broker, clock = make_broker()
    broker.restore(state)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s", clean=False, properties=Properties(session_expiry_interval=300))
    packets = publishes(sub.received())
    packets += publishes(sub.subscribe("w/#", qos=1, packet_id=2))
    assert [(p.topic, p.properties) for p in packets] == [
        ("q/x", Properties(user_properties=(("a", "b"),))),
        ("w/old", Properties(user_properties=(("a", "b"),)))]
    assert not sub.disconnecting


# --- isolation of one failing delivery -----------------------------------------------

def test_one_failing_subscriber_does_not_stop_delivery_to_the_others(logged):
    """Each delivery is isolated: the failure is logged once with the client id."""
    broker, clock = make_broker()
    bad = FakeClient(broker, clock, level=5)
    bad.connect("bad")
    bad.subscribe("t/#")
    good = FakeClient(broker, clock, level=5)
    good.connect("good")
    good.subscribe("t/+")

    def explode(*args, **kwargs):
        raise ValueError("boom")
    bad.conn.send_publish = explode
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t/x", b"1")
    pub.publish("t/x", b"2")
    assert [p.payload for p in publishes(good.received())] == [b"1", b"2"]
    failures = [e for e in logged if e.get("log_failure") and e.get("client_id") == "bad"]
    assert len(failures) == 2  # once per failed delivery
    assert broker.stats.dropped.get("delivery-error") == 2
    assert not pub.disconnecting and not good.disconnecting


def test_single_subscriber_failure_is_isolated_and_publisher_still_acknowledged():
    """The one-match fast path is isolated too: the publisher gets its PUBACK."""
    broker, clock = make_broker()
    bad = FakeClient(broker, clock, level=5)
    bad.connect("bad")
    bad.subscribe("t/#")
    bad.conn.send_publish = lambda *a, **k: 1 / 0
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t/x", b"1", qos=1)
    assert [type(p).__name__ for p in pub.received()] == ["Puback"]


def test_teardown_completes_when_a_step_fails(logged):
    """A failing teardown step is logged with the client id; the rest still runs."""
    broker, clock = make_broker()
    seen = []
    broker.on("clientDisconnected", lambda **kw: seen.append(kw["client"].client_id))

    def explode(*args, **kwargs):
        raise RuntimeError("scheduler broken")
    broker.wills.schedule = explode
    c = FakeClient(broker, clock, level=5)
    c.connect("c1", will=Will("w/t", b"x"))
    c.drop()
    assert "c1" not in broker.sessions       # expiry 0: discarded anyway
    assert seen == ["c1"]                    # and the last event still fired
    failures = [e for e in logged if e.get("log_failure") and e.get("client_id") == "c1"]
    assert len(failures) == 1 and failures[0]["step"] == "will"
    other = FakeClient(broker, clock, level=5)
    other.connect("c2")                      # the broker keeps serving


def test_forwarded_publish_drops_per_connection_properties_of_stored_messages():
    """Inbound -> outbound on the queue path: a queued message is sent with PUBLISH properties only."""
    broker, clock = make_broker()
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s", clean=False, properties=Properties(session_expiry_interval=60))
    sub.subscribe("t/#", qos=1)
    sub.drop()
    message = Message("t/x", b"m", 1, False, forwarded_properties(
        Properties(topic_alias=2, user_properties=(("k", "v"),))))
    broker.publish(message)
    back = FakeClient(broker, clock, level=5)
    back.connect("s", clean=False, properties=Properties(session_expiry_interval=60))
    (p,) = publishes(back.received())
    assert p.properties == Properties(user_properties=(("k", "v"),))


def test_restore_keeps_the_subscription_identifiers_of_a_queued_message():
    """The mapping on restore keeps what the broker itself set for that subscriber."""
    from mqttd.persistence import records as R
    props = Properties(will_delay_interval=3, subscription_identifiers=(7,))
    state = R.StoredState()
    state.sessions["s"] = R.StoredSession(
        R.SessionRecord("s", 5, (R.SubscriptionRecord("q/#", 1, subscription_identifier=7),),
                        300, 0.0),
        {1: R.OutboundRecord(1, Message("q/x", b"q", 1, False, props), 1)})
    broker, clock = make_broker()
    broker.restore(state)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s", clean=False, properties=Properties(session_expiry_interval=300))
    (p,) = publishes(sub.received())
    assert p.properties == Properties(subscription_identifiers=(7,))


def test_unexpected_error_in_a_handler_closes_only_that_connection(logged):
    """A bug while handling one packet: DISCONNECT 0x83, one log line with the client id,
    the session torn down, other clients served."""
    from mqttd.codec.packets import Disconnect
    broker, clock = make_broker()
    other = FakeClient(broker, clock, level=5)
    other.connect("other")
    other.subscribe("t/#")
    c = FakeClient(broker, clock, level=5)
    c.connect("c1")
    real = broker.subscribe

    def broken(session, record, *args, **kwargs):
        if session.client_id == "c1":
            raise KeyError("bug")
        return real(session, record, *args, **kwargs)
    broker.subscribe = broken
    packets = c.subscribe("x/#")
    assert [(type(p), p.reason_code) for p in packets] == [(Disconnect, 0x83)]
    assert c.disconnecting
    c.conn.connection_lost(None)
    assert "c1" not in broker.sessions
    failures = [e for e in logged if e.get("log_failure") and e.get("client_id") == "c1"]
    assert len(failures) == 1
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("t/1", b"still")
    assert [p.payload for p in publishes(other.received())] == [b"still"]
