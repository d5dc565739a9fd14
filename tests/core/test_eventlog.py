"""The event log: one line per event, per SUBSCRIBE packet, all through the log rate limiter."""
from __future__ import annotations

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from mqttd.codec.packets import Unsubscribe
from mqttd.eventlog import MAX_TOPICS_PER_LINE, EventLog

from core.harness import FakeClient, make_broker


@pytest.fixture
def event_lines():
    events = []

    def observe(event):
        if event.get("log_namespace") == "mqttd.events" and event["log_level"] >= LogLevel.info:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def _logged_broker(**config):
    broker, clock = make_broker(**config)
    eventlog = EventLog(broker)
    eventlog.start()
    return broker, clock, eventlog


def test_one_subscribe_of_many_filters_is_one_line(event_lines):
    """A SUBSCRIBE with 1,000 filters (the most one packet may carry by default) writes one
    line naming the count, not 1,000 lines."""
    broker, clock, _ = _logged_broker()
    client = FakeClient(broker, clock)
    client.connect("many")
    client.subscribe(*["x/%d/+" % i for i in range(1000)])
    clock.advance(0)
    lines = [e for e in event_lines if e["event"] == "subscribed"]
    assert len(lines) == 1
    assert lines[0]["count"] == 1000 and lines[0]["client_id"] == "many"
    assert lines[0]["topics"] == ["x/%d/+" % i for i in range(MAX_TOPICS_PER_LINE)]
    assert lines[0]["topic"] == "x/0/+"


def test_single_filter_line_keeps_its_format(event_lines):
    """One filter: the plain ``subscribed ID to FILTER`` line, and one for the unsubscribe."""
    broker, clock, _ = _logged_broker()
    client = FakeClient(broker, clock)
    client.connect("one")
    client.subscribe("a/b")
    clock.advance(0)
    client.send(Unsubscribe(2, ("a/b",)))
    clock.advance(0)
    lines = [e for e in event_lines if e["event"] in ("subscribed", "unsubscribed")]
    assert [(e["event"], e["log_format"]) for e in lines] == [
        ("subscribed", "subscribed {client_id} to {topic}"),
        ("unsubscribed", "unsubscribed {client_id} from {topic}")]


def test_subscription_lines_of_one_client_are_rate_limited(event_lines):
    """100 SUBSCRIBE packets in a burst: 3 lines, and the next window's line reports the rest."""
    broker, clock, _ = _logged_broker()
    client = FakeClient(broker, clock)
    client.connect("loop")
    for i in range(100):
        client.subscribe("t/%d" % i)
        clock.advance(0)
    lines = [e for e in event_lines if e["event"] == "subscribed"]
    assert len(lines) == 3
    clock.advance(10)
    client.subscribe("t/last")
    clock.advance(0)
    lines = [e for e in event_lines if e["event"] == "subscribed"]
    assert len(lines) == 4 and lines[-1]["suppressed"] == 97
    other = FakeClient(broker, clock)        # another client is not silenced
    other.connect("other")
    other.subscribe("o")
    clock.advance(0)
    assert [e["client_id"] for e in event_lines if e["event"] == "subscribed"][-1] == "other"


def test_reconnect_loop_lines_are_rate_limited(event_lines):
    """A client that reconnects 50 times writes at most 3 connect and 3 disconnect lines per window."""
    broker, clock, _ = _logged_broker()
    for _ in range(50):
        client = FakeClient(broker, clock)
        client.connect("flappy")
        client.drop()
    assert sum(e["event"] == "clientConnected" for e in event_lines) == 3
    assert sum(e["event"] == "clientDisconnected" for e in event_lines) == 3


def test_pending_subscription_line_comes_before_the_disconnect_line(event_lines):
    """Coalescing keeps the order: a client's subscriptions are logged before it leaves."""
    broker, clock, eventlog = _logged_broker()
    client = FakeClient(broker, clock)
    client.connect("order")
    client.subscribe("a", "b")
    client.drop()
    assert [e["event"] for e in event_lines] == [
        "clientConnected", "subscribed", "clientDisconnected"]
    eventlog.stop()
    assert not clock.getDelayedCalls() or all(not c.active() for c in clock.getDelayedCalls())


def test_will_takeover_and_expiry_lines_of_one_client_are_rate_limited(log_events):
    """A client that connects with a will and drops, again and again (or flaps its id, or
    lets sessions expire), writes a few lines per reason and window, not one per time
    (REVIEW-S9 R13: 3,000 'Publishing will' lines in 8.8 s)."""
    from mqttd.codec.packets import Will
    broker, clock = make_broker()
    for _ in range(30):
        client = FakeClient(broker, clock, level=4)
        client.connect("flapper", will=Will("w/dead", b"x", 0, False))
        client.drop()
        holder = FakeClient(broker, clock, level=4)
        holder.connect("flap2")           # a second connection takes the first over
        FakeClient(broker, clock, level=4).connect("flap2")
    texts = [e.get("log_format", "") for e in log_events]
    wills = sum(t.startswith("Publishing will") for t in texts)
    takeovers = sum(t.startswith("Session takeover") for t in texts)
    assert 1 <= wills <= 3 and 1 <= takeovers <= 3, (wills, takeovers)
    clock.advance(11)  # a new window: the next line says how many were suppressed
    client = FakeClient(broker, clock, level=4)
    client.connect("flapper", will=Will("w/dead", b"x", 0, False))
    client.drop()
    last = [e for e in log_events if e.get("log_format", "").startswith("Publishing will")][-1]
    assert last["suppressed"] == 30 - wills
