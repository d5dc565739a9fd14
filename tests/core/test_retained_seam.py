"""The asynchronous retained-store seam (issue 10): a retained store kept elsewhere
(a cluster's, in Redis) answers with Deferreds; the broker waits for its lookups
and for its writes before acknowledging."""
from __future__ import annotations

from twisted.internet import defer

from mqttd.codec.packets import Puback, Publish, Suback
from mqttd.durability import PendingWrites
from mqttd.messages import Message
from mqttd.retained import RetainedIndex

from tests.core.harness import FakeClient, make_broker


class AsyncRetained:
    """An IRetainedStore answering every call with a Deferred the test fires."""

    def __init__(self):
        self.index = RetainedIndex()
        self.calls = []          # (kind, arg, deferred)

    def _later(self, kind, arg, result):
        d = defer.Deferred()
        self.calls.append((kind, arg, d, result))
        return d

    def fire(self, kind=None, fail=None):
        """Answer the oldest pending call (of ``kind``)."""
        for i, (k, arg, d, result) in enumerate(self.calls):
            if kind is None or k == kind:
                del self.calls[i]
                if fail is not None:
                    d.errback(fail)
                else:
                    d.callback(result() if callable(result) else result)
                return arg
        raise AssertionError(f"no pending {kind}")

    def get(self, topic):
        return self.index.get(topic)

    def set(self, message):
        self.index.set(message)
        return self._later("set", message.topic, None)

    def remove(self, topic):
        removed = self.index.remove(topic)
        return self._later("remove", topic, removed)

    def cursor(self, topic_filter, now=None):
        return self._later("lookup", topic_filter,
                           lambda: list(self.index.cursor(topic_filter, now)))

    def match(self, topic_filter, now=None):
        return self.cursor(topic_filter, now)

    def next_expiry(self):
        return None

    def expire(self, now):
        return []

    def values(self):
        return self.index.values()

    def __len__(self):
        return len(self.index)

    def __iter__(self):
        return iter(self.index)

    def __contains__(self, topic):
        return topic in self.index


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def _async_store_broker(*retained):
    """A broker whose retained store is an :class:`AsyncRetained` already holding
    ``retained`` (``(topic, payload)`` pairs): ``(broker, clock, store)``."""
    broker, clock = make_broker()
    store = AsyncRetained()
    broker.use_retained_store(store)
    for topic, payload in retained:
        store.index.set(Message(topic, payload, retain=True))
    return broker, clock, store


def _connected(broker, clock, client_id):
    """A v5 client ``client_id`` connected to ``broker``."""
    client = FakeClient(broker, clock, level=5)
    client.connect(client_id)
    return client


def test_replay_waits_for_an_asynchronous_lookup_then_streams_it():
    """SUBACK goes out at once; the retained messages follow when the store answers [MQTT-3.3.1-6]."""
    broker, clock, store = _async_store_broker()
    for i in range(3):
        store.index.set(Message(f"r/{i}", b"v%d" % i, retain=True))
    sub = _connected(broker, clock, "s")
    packets = sub.subscribe("r/+")
    assert isinstance(packets[0], Suback) and publishes(packets) == []
    store.fire("lookup")
    got = publishes(sub.received())
    assert sorted(p.payload for p in got) == [b"v0", b"v1", b"v2"]
    assert all(p.retain for p in got)


def test_later_filters_wait_behind_a_pending_lookup():
    """Replays keep the filter order even when the first lookup answers last."""
    from mqttd.codec.packets import Subscribe, Subscription
    broker, clock, store = _async_store_broker(("a", b"A"), ("b", b"B"))
    sub = _connected(broker, clock, "s")
    sub.send(Subscribe(1, (Subscription("a", 0), Subscription("b", 0))))
    lookups = [c for c in store.calls if c[0] == "lookup"]
    assert [c[1] for c in lookups] == ["a", "b"]
    # answer "b" first: nothing is sent before "a" answered
    lookups[1][2].callback(lookups[1][3]())
    assert publishes(sub.received()) == []
    lookups[0][2].callback(lookups[0][3]())
    assert [p.payload for p in publishes(sub.received())] == [b"A", b"B"]


def test_resubscribing_while_a_lookup_is_pending_replays_once():
    """The older lookup's answer is ignored: one replay per filter, from the newest lookup."""
    broker, clock, store = _async_store_broker(("t", b"1"))
    sub = _connected(broker, clock, "s")
    sub.subscribe("t", packet_id=1)
    sub.subscribe("t", packet_id=2)
    store.fire("lookup")
    store.fire("lookup")
    assert [p.payload for p in publishes(sub.received())] == [b"1"]


def test_failed_lookup_is_logged_and_later_filters_still_replay():
    """A store failure costs that filter's replay only: later filters and the session go on."""
    from twisted.logger import globalLogPublisher
    broker, clock, store = _async_store_broker(("b", b"B"))
    sub = _connected(broker, clock, "s")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        sub.subscribe("a", packet_id=1)
        sub.subscribe("b", packet_id=2)
        store.fire("lookup", fail=ConnectionError("redis down"))
        store.fire("lookup")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [p.payload for p in publishes(sub.received())] == [b"B"]
    assert any(e.get("topic_filter") == "a" and "redis down" in e.get("error", "")
               for e in events)
    assert not broker.sessions["s"].replays


def test_retained_publish_is_acknowledged_only_after_the_store_wrote_it():
    """QoS 1 retained PUBLISH: no PUBACK before the retained store's write is done."""
    broker, clock, store = _async_store_broker()
    pub = _connected(broker, clock, "p")
    pub.publish("r/x", b"v", qos=1, retain=True, packet_id=7)
    clock.advance(0)
    assert [p for p in pub.received() if isinstance(p, Puback)] == []
    assert store.fire("set") == "r/x"
    clock.advance(0)
    assert [p.packet_id for p in pub.received() if isinstance(p, Puback)] == [7]


def test_failed_retained_write_is_never_acknowledged():
    """The store's write failed: the publisher gets no PUBACK (it will resend), nothing false."""
    broker, clock, store = _async_store_broker()
    pub = _connected(broker, clock, "p")
    pub.publish("r/x", b"v", qos=1, retain=True, packet_id=7)
    store.fire("set", fail=ConnectionError("redis down"))
    clock.advance(0)
    assert [p for p in pub.received() if isinstance(p, Puback)] == []


def test_empty_retained_payload_removal_is_waited_for_too():
    """Clearing a retained message [MQTT-3.3.1-10] is a write the PUBACK waits for."""
    broker, clock, store = _async_store_broker(("r/x", b"old"))
    pub = _connected(broker, clock, "p")
    pub.publish("r/x", b"", qos=1, retain=True, packet_id=3)
    clock.advance(0)
    assert [p for p in pub.received() if isinstance(p, Puback)] == []
    store.fire("remove")
    clock.advance(0)
    assert [p.packet_id for p in pub.received() if isinstance(p, Puback)] == [3]
    assert "r/x" not in store


def test_local_subscriber_gets_retained_messages_from_an_asynchronous_store():
    """subscribe_local works with a Deferred match too."""
    broker, clock, store = _async_store_broker(("r/1", b"1"))
    seen = []
    broker.subscribe_local("r/#", seen.append)
    assert seen == []
    store.fire("lookup")
    assert [m.topic for m in seen] == ["r/1"]


def test_use_retained_store_hands_over_only_when_asked():
    """A node's old local copy never overwrites the cluster's messages; an embedder may hand over."""
    broker, clock = make_broker()
    broker.publish_message("keep/me", b"k", retain=True)
    store = AsyncRetained()
    broker.use_retained_store(store)
    assert broker.retained is store and store.get("keep/me") is None
    broker2, _ = make_broker()
    broker2.publish_message("keep/me", b"k", retain=True)
    store2 = AsyncRetained()
    broker2.use_retained_store(store2, hand_over=True)
    assert store2.get("keep/me").payload == b"k"
    store2.fire("set")


def test_pending_writes_report_a_failure_that_happened_before_anyone_asked():
    """A write failing in the same turn still fails the next barrier (no false ack)."""
    writes = PendingWrites()
    assert writes.settled() is None
    d = defer.Deferred()
    writes.add(d)
    d.errback(ConnectionError("gone"))
    results = []
    writes.settled().addErrback(results.append)
    assert len(results) == 1 and results[0].check(ConnectionError)
    assert writes.settled() is None


def test_pending_writes_settle_when_all_writes_added_so_far_are_done():
    """settled() covers the writes added before it, not later ones."""
    writes = PendingWrites()
    a, b = defer.Deferred(), defer.Deferred()
    writes.add(a)
    done = []
    writes.settled().addCallback(done.append)
    writes.add(b)
    a.callback("x")
    assert done == [None] and len(writes) == 1
    b.callback(None)
    assert len(writes) == 0


def test_in_memory_store_stays_synchronous():
    """The single-node path never creates a Deferred for retained messages."""
    index = RetainedIndex()
    assert index.set(Message("a", b"x", retain=True)) is None
    assert isinstance(index.match("#"), list)
    broker, clock = make_broker()
    broker.publish_message("a", b"x", retain=True)
    assert len(broker.pending_writes) == 0


def test_a_failed_lookup_for_an_in_process_subscriber_is_one_rate_limited_warning():
    """REVIEW-S9-CLUSTER C8: a retained store in Redis timing out is an outage, not a bug --
    a rate-limited WARN per window, never a CRITICAL with a traceback per subscription."""
    from twisted.logger import LogLevel, globalLogPublisher
    broker, clock, store = _async_store_broker(("a", b"A"))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for i in range(20):
            broker.subscribe_local("a", lambda message: None)
            store.fire("lookup", fail=RuntimeError("no answer from Redis within 5 s"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if "in-process subscriber" in e.get("log_format", "")]
    assert lines and all(e["log_level"] == LogLevel.warn for e in lines)
    assert len(lines) <= broker.log_limiter.burst
    assert "no answer from Redis" in lines[0]["error"]
    clock.advance(broker.log_limiter.interval)
    globalLogPublisher.addObserver(events.append)
    try:
        broker.subscribe_local("a", lambda message: None)
        store.fire("lookup", fail=RuntimeError("no answer from Redis within 5 s"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    last = [e for e in events if "in-process subscriber" in e.get("log_format", "")][-1]
    assert last["suppressed"] == 20 - len(lines)
