"""mqttd/cluster/retained.py without Redis: the per-level index, the walk, the
expiry rules and the store the broker sees (issue 10, retained cluster-wide).
The same behaviour against a real redis-server: test_retained_redis.py."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mqttd import topics
from mqttd.codec.packets import Properties
from mqttd.cluster.retained import (
    ClusterRetainedStore, RedisRetained, node_local, pack_message, unpack_message)
from mqttd.messages import Message
from mqttd.retained import RetainedIndex

from tests.cluster.fakebackend import FakeBackend
from tests.core.harness import FakeClient, make_broker


def fired(d):
    """The result of an already fired Deferred (the fake backend answers at once)."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def store(*topics_):
    backend = FakeBackend()
    redis = RedisRetained(backend, prefix="t:")
    for topic in topics_:
        fired(redis.put(Message(topic, b"v:" + topic.encode(), retain=True)))
    return backend, redis


def found(redis, topic_filter, now=None):
    return sorted(m.topic for m in fired(redis.match(topic_filter, now)))


def test_pack_and_unpack_keep_everything_a_subscriber_gets():
    """QoS, payload, forwarded properties and the absolute expiry survive storage."""
    props = Properties(content_type="text/plain", user_properties=(("k", "v"),),
                       message_expiry_interval=30, correlation_data=b"\x00\x01")
    message = Message("a/b", b"\x00payload", 2, True, props, expires_at=1234.5)
    back = unpack_message(pack_message(message))
    assert (back.topic, back.payload, back.qos, back.retain, back.properties,
            back.expires_at) == ("a/b", b"\x00payload", 2, True, props, 1234.5)
    assert unpack_message(pack_message(Message("x", b"1", retain=True))).expires_at is None


def test_unpack_refuses_what_is_not_a_stored_message():
    """A foreign or damaged value is a ValueError (skipped with a log line), not a crash."""
    import pytest
    for junk in (b"", b"R1", b"XX" + b"\x00" * 8, b"R1" + b"\x00" * 8 + b"\x30\x05ab"):
        with pytest.raises(ValueError):
            unpack_message(junk)


def test_index_counts_retained_topics_per_level_and_prunes_on_delete():
    """2 per topic below a level, +1 if the level is a topic itself; deleting subtracts; empty hashes disappear."""
    backend, redis = store("a/b/c", "a/b", "a/x")
    assert backend.hashes["t:ret:c:0:"] == {"a": 6}
    assert backend.hashes["t:ret:c:1:a"] == {"b": 5, "x": 3}
    assert backend.hashes["t:ret:c:2:a/b"] == {"c": 3}
    fired(redis.delete("a/b/c"))
    assert "t:ret:c:2:a/b" not in backend.hashes
    assert backend.hashes["t:ret:c:1:a"] == {"b": 3, "x": 3}
    fired(redis.delete("a/b"))
    fired(redis.delete("a/x"))
    assert backend.hashes == {} and backend.strings == {}


def test_replacing_a_retained_message_costs_one_command():
    """The common case (a device updates its state) does not touch the index."""
    backend, redis = store("dev/1/state")
    before = backend.round_trips
    assert fired(redis.put(Message("dev/1/state", b"new", retain=True))) is False
    assert backend.round_trips - before == 1
    assert fired(redis.get("dev/1/state")).payload == b"new"


def test_empty_payload_clears_and_a_second_clear_changes_nothing():
    """[MQTT-3.3.1-10]: an empty retained payload deletes; deleting nothing leaves the index alone."""
    backend, redis = store("a/b")
    assert fired(redis.put(Message("a/b", b"", retain=True))) is True
    assert fired(redis.put(Message("a/b", b"", retain=True))) is False
    assert backend.hashes == {} and found(redis, "#") == []


def test_filter_match_follows_the_topic_rules():
    """+, #, parent match of #, empty levels, and no wildcard match of $ topics [MQTT-4.7.1-2, 4.7.2-1]."""
    _, redis = store("a", "a/b", "a/b/c", "a/x", "$SYS/up", "b", "/lead", "a//c", "$x/+y")
    assert found(redis, "#") == ["/lead", "a", "a//c", "a/b", "a/b/c", "a/x", "b"]
    assert found(redis, "a/#") == ["a", "a//c", "a/b", "a/b/c", "a/x"]
    assert found(redis, "a/+") == ["a/b", "a/x"]
    assert found(redis, "+/+/c") == ["a//c", "a/b/c"]
    assert found(redis, "+") == ["a", "b"]
    assert found(redis, "$SYS/#") == ["$SYS/up"]
    assert found(redis, "+/up") == []
    assert found(redis, "+/#") == ["/lead", "a", "a//c", "a/b", "a/b/c", "a/x", "b"]
    assert found(redis, "/+") == ["/lead"]
    assert found(redis, "a/b") == ["a/b"]
    assert found(redis, "nothing/here/#") == []


def test_a_wildcard_lookup_costs_one_round_trip_per_wildcard_level():
    """site/17/dev/+/state on 100 x 50 devices: literal levels are free, + is one round trip."""
    backend = FakeBackend()
    redis = RedisRetained(backend, prefix="t:")
    for site in range(100):
        for dev in range(50):
            fired(redis.put(Message(f"site/{site}/dev/{dev}/state", b"s", retain=True)))
    before = backend.round_trips
    assert len(found(redis, "site/17/dev/+/state")) == 50
    assert backend.round_trips - before == 2        # HGETALL of one level, then the GETs
    before = backend.round_trips
    assert found(redis, "site/17/dev/42/state") == ["site/17/dev/42/state"]
    assert backend.round_trips - before == 1        # exact: one GET


def test_lookups_skip_expired_messages_and_remove_them_once():
    """Message Expiry on read [MQTT-3.3.2-5]: not returned, deleted, index decremented once."""
    backend, redis = store("keep")
    fired(redis.put(Message("gone", b"g", retain=True,
                            properties=Properties(message_expiry_interval=5),
                            expires_at=105.0)))
    assert found(redis, "#", now=100.0) == ["gone", "keep"]
    assert found(redis, "#", now=106.0) == ["keep"]
    assert "t:ret:m:gone" not in backend.strings
    assert backend.hashes["t:ret:c:0:"] == {"keep": 3}
    assert redis.expired == 1


def test_expired_message_replaced_meanwhile_is_not_deleted():
    """The compare-and-delete only removes the very message found expired."""
    backend, redis = store()
    old = Message("t", b"old", retain=True, expires_at=10.0)
    fired(redis.put(old))
    raw = backend.strings["t:ret:m:t"]
    fired(redis.put(Message("t", b"new", retain=True)))
    assert fired(redis.delete("t", expected=raw)) is False
    assert fired(redis.get("t", now=50.0)).payload == b"new"


def test_sweep_removes_expired_messages_nobody_reads():
    """The periodic sweep deletes what expired, keeps what was replaced by a lasting message."""
    backend, redis = store()
    for i in range(3):
        fired(redis.put(Message(f"e/{i}", b"x", retain=True, expires_at=10.0 + i)))
    fired(redis.put(Message("e/1", b"forever", retain=True)))
    assert fired(redis.sweep(now=20.0)) == 2
    assert found(redis, "#", now=20.0) == ["e/1"]
    assert backend.zsets["t:ret:exp"] == {}
    assert fired(redis.sweep(now=30.0)) == 0


def test_reindex_rebuilds_a_lost_index_from_the_values():
    """After a crash between value and index writes, reindex makes wildcards find everything."""
    backend, redis = store("a/b", "a/c", "d")
    backend.hashes.clear()
    assert found(redis, "#") == []
    redis._scan = lambda pattern, count: fired_scan(backend, pattern)
    assert fired(redis.reindex()) == 3
    assert found(redis, "#") == ["a/b", "a/c", "d"]


def fired_scan(backend, pattern):
    from fnmatch import fnmatchcase
    from twisted.internet import defer
    keys = [k for k in list(backend.strings) + list(backend.hashes) if fnmatchcase(k, pattern)]
    return defer.succeed(keys)


def test_a_lookup_waits_for_this_nodes_earlier_writes():
    """Read your writes: a SUBSCRIBE after a retained PUBLISH on the same node sees it."""
    from twisted.internet import defer

    class Slow(FakeBackend):
        def __init__(self):
            super().__init__()
            self.held = []

        def run(self, name, keys, args):
            d = defer.Deferred()
            self.held.append((super().run(name, keys, args), d))
            return d

        def release(self):
            while self.held:
                inner, outer = self.held.pop(0)
                inner.chainDeferred(outer)

    backend = Slow()
    redis = RedisRetained(backend, prefix="t:")
    redis.put(Message("a/b", b"1", retain=True))
    result = []
    redis.match("a/+").addCallback(result.append)
    assert result == []
    backend.release()
    backend.release()
    assert [m.topic for m in result[0]] == ["a/b"]


def test_one_nodes_writes_of_a_topic_apply_in_order():
    """Set then clear then set: the last one wins, whatever the backend's timing."""
    from twisted.internet import defer

    class Reversed(FakeBackend):
        """Answers held scripts newest first, when released."""
        def __init__(self):
            super().__init__()
            self.held = []

        def run(self, name, keys, args):
            d = defer.Deferred()
            self.held.append((name, keys, args, d))
            return d

        def release(self):
            while self.held:
                name, keys, args, d = self.held.pop()
                FakeBackend.run(self, name, keys, args).chainDeferred(d)

    backend = Reversed()
    redis = RedisRetained(backend, prefix="t:")
    redis.put(Message("t", b"1", retain=True))
    redis.put(Message("t", b"", retain=True))
    redis.put(Message("t", b"3", retain=True))
    for _ in range(10):
        backend.release()
    assert unpack_message(backend.strings["t:ret:m:t"]).payload == b"3"
    assert backend.hashes["t:ret:c:0:"] == {"t": 3}


_level = st.sampled_from(["a", "b", "", "$x", "$SYS", "c d", "é"])
_topic = st.lists(_level, min_size=1, max_size=4).map("/".join).filter(bool)  # "" is no topic
_filter_level = st.sampled_from(["a", "b", "", "+", "$x", "$SYS"])


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(_topic, st.booleans()), max_size=25),
       flt=st.lists(_filter_level, min_size=1, max_size=4).map("/".join),
       tail=st.sampled_from(["", "/#", "#"]))
def test_walk_agrees_with_the_single_node_matcher(ops, flt, tail):
    """Any puts and clears, any filter: the index walk finds what RetainedIndex finds."""
    if tail == "#":
        flt = "#"
    else:
        flt += tail
    if not flt:
        flt = "+"   # "" is no filter
    _, redis = store()
    reference = RetainedIndex()
    for topic, keep in ops:
        payload = b"v" if keep else b""
        fired(redis.put(Message(topic, payload, retain=True)))
        if keep:
            reference.set(Message(topic, payload, retain=True))
        else:
            reference.remove(topic)
    expected = sorted(m.topic for m in reference.match(flt))
    assert expected == sorted(t for t in reference if topics.matches(flt, t))
    assert found(redis, flt) == expected


# --- the store the broker sees ---------------------------------------------------------

def test_sys_values_stay_on_this_node_and_bridge_state_is_shared():
    """$SYS statistics are per node; $SYS/broker/connection/<id>/state is cluster-wide."""
    assert node_local("$SYS/broker/clients/connected")
    assert not node_local("$SYS/broker/connection/edge/state")
    assert not node_local("a/$SYS")
    backend, redis = store()
    retained = ClusterRetainedStore(redis, clock=None)
    assert retained.set(Message("$SYS/broker/uptime", b"5", retain=True)) is None
    fired(retained.set(Message("$SYS/broker/connection/edge/state", b"1", retain=True)))
    assert sorted(m.topic for m in fired(retained.match("$SYS/#"))) == [
        "$SYS/broker/connection/edge/state", "$SYS/broker/uptime"]
    assert [m.topic for m in retained.match("$SYS/broker/uptime")] == ["$SYS/broker/uptime"]
    assert "t:ret:m:$SYS/broker/uptime" not in backend.strings


def test_broker_with_the_cluster_store_replays_and_acknowledges():
    """End to end in one process: retained PUBLISH, PUBACK after the write, replay on SUBSCRIBE."""
    from mqttd.codec.packets import Puback, Publish
    broker, clock = make_broker()
    backend, redis = store()
    broker.use_retained_store(ClusterRetainedStore(redis, clock))
    pub = FakeClient(broker, clock, level=5)
    pub.connect("p")
    pub.publish("home/kitchen/temp", b"21", qos=1, retain=True, packet_id=1)
    clock.advance(0)
    assert [p.packet_id for p in pub.received() if isinstance(p, Puback)] == [1]
    sub = FakeClient(broker, clock, level=5)
    sub.connect("s")
    got = [p for p in sub.subscribe("home/+/temp") if isinstance(p, Publish)]
    assert [(p.topic, p.payload, p.retain) for p in got] == [("home/kitchen/temp", b"21", True)]


def test_redis_failure_fails_the_acknowledgement_not_the_broker():
    """Redis down: the retained QoS 1 PUBLISH gets no PUBACK; other clients keep working."""
    from mqttd.codec.packets import Puback
    broker, clock = make_broker()
    backend, redis = store()
    broker.use_retained_store(ClusterRetainedStore(redis, clock))
    backend.fail = ConnectionError("redis down")
    pub = FakeClient(broker, clock, level=5)
    pub.connect("p")
    pub.publish("r", b"x", qos=1, retain=True, packet_id=1)
    clock.advance(0)
    assert [p for p in pub.received() if isinstance(p, Puback)] == []
    other = FakeClient(broker, clock, level=5)
    other.connect("o")
    other.publish("plain", b"y", qos=1, packet_id=2)
    clock.advance(0)
    assert [p.packet_id for p in other.received() if isinstance(p, Puback)] == [2]
