"""mqttd/retained.py (index, wildcard lookup, expiry) and the lazy retained replay
on SUBSCRIBE (issue 8 item 4)."""
from __future__ import annotations

try:
    import tracemalloc
except ImportError:  # PyPy has no tracemalloc: the queue sizes still tell
    tracemalloc = None

from hypothesis import given, settings
from hypothesis import strategies as st

from mqttd import topics
from mqttd.codec.packets import Publish, Puback, Suback
from mqttd.messages import Message
from mqttd.retained import RetainedIndex

from tests.core.harness import FakeClient, make_broker


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def index_of(*names, **kw):
    index = RetainedIndex()
    for name in names:
        index.set(Message(name, b"v", retain=True, **kw))
    return index


# --- the index ------------------------------------------------------------------------

def test_retained_index_provides_the_retained_store_seam():
    """The broker talks to retained messages only through IRetainedStore."""
    from zope.interface.verify import verifyObject

    import mqttd.broker  # noqa: F401 (declares the implementation)
    from mqttd.interfaces import IRetainedStore
    assert verifyObject(IRetainedStore, RetainedIndex())


def test_filter_match_follows_the_topic_rules():
    """+, #, parent match of #, and no wildcard match of $ topics [MQTT-4.7.1-2, 4.7.2-1]."""
    index = index_of("a", "a/b", "a/b/c", "a/x", "$SYS/up", "b", "/lead", "a//c")
    found = lambda f: sorted(m.topic for m in index.cursor(f))  # noqa: E731
    assert found("#") == ["/lead", "a", "a//c", "a/b", "a/b/c", "a/x", "b"]
    assert found("a/#") == ["a", "a//c", "a/b", "a/b/c", "a/x"]
    assert found("a/+") == ["a/b", "a/x"]
    assert found("+/+/c") == ["a//c", "a/b/c"]
    assert found("+") == ["a", "b"]
    assert found("$SYS/#") == ["$SYS/up"]
    assert found("+/up") == []
    assert found("a/b") == ["a/b"]


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.lists(st.sampled_from(["a", "b", "", "$x"]), min_size=1, max_size=4)
                      .map("/".join), max_size=12),
       flt=st.lists(st.sampled_from(["a", "b", "", "+", "$x"]), min_size=1, max_size=4)
       .map("/".join), hash_tail=st.booleans())
def test_cursor_agrees_with_the_reference_matcher(names, flt, hash_tail):
    """Whatever the topics and filter, the trie walk finds what topics.matches finds."""
    if hash_tail:
        flt = flt + "/#"
    index = index_of(*names)
    expected = sorted(n for n in set(names) if topics.matches(flt, n))
    assert sorted(m.topic for m in index.cursor(flt)) == expected


_topic = st.lists(st.sampled_from(["a", "b", "", "$x"]), min_size=1, max_size=4).map("/".join)


def _levels(node):
    for child in node.children.values():
        yield child
        yield from _levels(child)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), _topic), max_size=30),
       flt=st.lists(st.sampled_from(["a", "b", "", "+", "$x"]), min_size=1, max_size=4)
       .map("/".join), hash_tail=st.booleans())
def test_index_after_any_puts_and_removes_matches_a_plain_dict(ops, flt, hash_tail):
    """Sets and removes in any order: lookups agree with a dict, and no empty level is left."""
    if hash_tail:
        flt = flt + "/#"
    index, reference = RetainedIndex(), {}
    for put, name in ops:
        if put:
            index.set(Message(name, b"v", retain=True))
            reference[name] = True
        else:
            assert (index.remove(name) is not None) == (reference.pop(name, None) is not None)
    assert sorted(index) == sorted(reference)
    expected = sorted(n for n in reference if topics.matches(flt, n))
    assert sorted(m.topic for m in index.cursor(flt)) == expected
    assert all(level.message is not None or level.children for level in _levels(index._root))


def test_remove_prunes_and_replacing_keeps_one_message_per_topic():
    """One retained message per topic [MQTT-3.3.1-5]; removed topics leave no levels behind."""
    index = index_of("a/b/c")
    index.set(Message("a/b/c", b"new", retain=True))
    assert [m.payload for m in index.cursor("#")] == [b"new"] and len(index) == 1
    assert index.remove("a/b/c").payload == b"new"
    assert index.remove("a/b/c") is None
    assert index._root.children == {}


def test_expire_removes_only_what_is_due_and_skips_replaced_entries():
    """The expiry heap is lazy: a replaced message's old deadline is ignored."""
    index = RetainedIndex()
    index.set(Message("t/1", b"1", retain=True, expires_at=10.0))
    index.set(Message("t/2", b"2", retain=True, expires_at=20.0))
    index.set(Message("t/1", b"1b", retain=True, expires_at=30.0))   # replaced
    assert index.next_expiry() == 20.0
    assert index.expire(25.0) == ["t/2"]
    assert index.next_expiry() == 30.0 and [m.payload for m in index.cursor("#")] == [b"1b"]
    assert index.match("#", now=31.0) == []


def test_cursor_tolerates_changes_while_walking():
    """A message removed during a replay is not yielded; a replaced one is yielded new."""
    index = index_of("a/1", "a/2", "a/3")
    cursor = index.cursor("a/+")
    first = next(cursor)
    others = [t for t in ("a/1", "a/2", "a/3") if t != first.topic]
    index.remove(others[0])
    index.set(Message(others[1], b"newer", retain=True))
    rest = list(cursor)
    assert [(m.topic, m.payload) for m in rest] == [(others[1], b"newer")]


# --- lazy replay on SUBSCRIBE -------------------------------------------------------------

def fill(broker, n, qos=0, prefix="r"):
    for i in range(n):
        broker.publish_message(f"{prefix}/{i}", b"x" * 100, qos=qos, retain=True)


def test_replay_to_a_reading_client_delivers_every_retained_message():
    """No retained message is dropped, however many, even past the queue limits."""
    broker, clock = make_broker(max_queued_messages=10)
    fill(broker, 500)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s")
    packets = sub.subscribe("r/#")
    assert isinstance(packets[0], Suback)
    got = publishes(packets)
    assert len(got) == 500 and all(p.retain for p in got)
    assert sum(broker.stats.dropped.values()) == 0


def test_replay_respects_the_window_and_resumes_on_acknowledgements():
    """QoS 1 replay: never more in flight than the Receive Maximum; all arrive as PUBACKs come."""
    from mqttd.codec.packets import Connect, Properties
    broker, clock = make_broker()
    fill(broker, 25, qos=1)
    sub = FakeClient(broker, clock, level=5)
    sub.send(Connect(5, "s", True, 0, properties=Properties(receive_maximum=5)))
    sub.received()
    got = publishes(sub.subscribe("r/#", qos=1))
    total = len(got)
    assert total == 5
    for _ in range(10):
        if not got:
            break
        for p in got:
            sub.send(Puback(p.packet_id))
        got = publishes(sub.received())
        assert len(got) <= 5
        total += len(got)
    assert total == 25


def test_non_reading_client_resubscribing_does_not_grow_its_queue():
    """Issue 8 item 4: SUBSCRIBE # again and again without reading: one cursor, no pile-up."""
    broker, clock = make_broker()
    fill(broker, 2000)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s")
    sub.conn.pause_writing()          # the client stops reading
    session = broker.sessions["s"]
    if tracemalloc is not None:
        tracemalloc.start()
    try:
        sub.subscribe("#", packet_id=1)
        before = tracemalloc.get_traced_memory()[0] if tracemalloc else 0
        for n in range(50):
            sub.subscribe("#", packet_id=n + 2)
        after = tracemalloc.get_traced_memory()[0] if tracemalloc else 0
    finally:
        if tracemalloc is not None:
            tracemalloc.stop()
    assert len(session.queue) <= 1 and len(session.replays) == 1
    assert after - before < 64 * 1024   # was ~200 KB of queued records per SUBSCRIBE
    sub.conn.resume_writing()
    got = publishes(sub.received())
    assert len({p.topic for p in got}) == 2000   # the restarted cursor replays everything


def test_replay_continues_when_the_client_reads_again():
    """Writes resume -> the replay continues where the cursor stands."""
    broker, clock = make_broker()
    fill(broker, 300)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s")
    sub.conn.pause_writing()
    sub.subscribe("r/+")
    assert publishes(sub.received()) == []
    sub.conn.resume_writing()
    assert len(publishes(sub.received())) == 300


def test_replay_expires_messages_while_it_streams():
    """A retained message that expires before the cursor reaches it is not sent."""
    from mqttd.codec.packets import Properties
    broker, clock = make_broker()
    broker.publish_message("r/a", b"1", retain=True, properties=Properties(
        message_expiry_interval=5))
    broker.publish_message("r/b", b"2", retain=True)
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s")
    sub.conn.pause_writing()
    sub.subscribe("r/#")
    clock.advance(6)
    sub.conn.resume_writing()
    assert [p.payload for p in publishes(sub.received())] == [b"2"]


def test_local_subscriber_gets_matching_retained_messages_from_the_index():
    """subscribe_local uses the same index lookup."""
    broker, clock = make_broker()
    fill(broker, 3)
    broker.publish_message("other/1", b"o", retain=True)
    seen = []
    broker.subscribe_local("r/+", seen.append)
    assert sorted(m.topic for m in seen) == ["r/0", "r/1", "r/2"]


def test_replays_queued_while_not_writable_are_all_delivered_in_filter_order():
    """A SUBSCRIBE of many filters while the client cannot take messages: every retained match follows, in order, once it can."""
    from mqttd.codec.packets import Subscribe, Subscription
    broker, clock = make_broker(max_topic_filters_per_packet=3000)
    publisher = FakeClient(broker, clock)
    publisher.connect("p")
    for i in range(0, 3000, 7):
        publisher.publish("x/%d/r" % i, b"%d" % i, retain=True)
    client = FakeClient(broker, clock)
    client.connect("many")
    client.conn.pause_writing()
    client.send(Subscribe(3, tuple(Subscription("x/%d/+" % i, 0) for i in range(3000))))
    clock.advance(0)                               # more than FILTERS_PER_TURN: in slices
    session = broker.sessions["many"]
    assert len(session.replays) == 3000          # waiting for the client, nothing queued at once
    client.conn.resume_writing()
    got = [p.payload for p in client.received() if isinstance(p, Publish)]
    assert got == [b"%d" % i for i in range(0, 3000, 7)]
    assert not session.replays
