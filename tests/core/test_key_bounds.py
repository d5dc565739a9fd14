"""Memories keyed by client-chosen strings are bounded in bytes, not only in entries (REVIEW-S10 S14, S16).

A topic name or client id may be 65,535 bytes.  Before, the trie's match cache kept 10,000
names of any length (+574 MB after one anonymous client published to unique 60 KB topics) and
the inbound bucket memory 10,000 client ids of any length (+287 MB).
"""
from __future__ import annotations

from mqttd import topics
from mqttd.codec.packets import Connect, Publish
from mqttd.ratelimit import KEY_LIMIT, memory_key
from tests.core.harness import FakeClient, make_broker


def test_long_topic_names_are_matched_but_never_cached():
    """Names over CACHED_NAME_LIMIT are matched every time; short ones are cached as before."""
    trie = topics.SubscriptionTrie()
    trie.add("a/#", "c1", 0)
    long_name = "a/" + "x" * 60000
    for _ in range(3):
        assert [key for _f, key, _v in trie.match(long_name)] == ["c1"]
    assert long_name not in trie._cache
    assert trie.match("a/b") is trie.match("a/b")          # cached: the same list


def test_cached_match_results_are_bounded_in_entries():
    """The cache keeps at most cache_matches (filter, key, value) entries over all names."""
    trie = topics.SubscriptionTrie(cache_size=1000, cache_matches=500)
    for n in range(100):
        trie.add("t/#", "c%d" % n, 0)                      # 100 matches per name
    for n in range(50):
        assert len(trie.match("t/%d" % n)) == 100
        assert trie._cached_matches == sum(len(r) for r in trie._cache.values()) <= 500
    assert len(trie._cache) == 5
    trie.add("t/#", "late", 0)                             # a wildcard change clears it all
    assert trie._cached_matches == 0 and not trie._cache


def test_merged_matches_are_not_kept_for_long_names_and_are_bounded(monkeypatch):
    """The merge cache follows the same bounds: no long names, at most MERGED_CACHE_MATCHES matches."""
    import mqttd.routing
    monkeypatch.setattr(mqttd.routing, "MERGED_CACHE_MATCHES", 10)
    broker, clock = make_broker()
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("#", "+/#", "+/+/#", packet_id=1)        # three overlapping filters
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    for n in range(20):
        pub.publish("a/%d/x" % n, b"m")
    pub.publish("a/" + "y" * 30000 + "/x", b"m")
    assert len([p for p in sub.received() if isinstance(p, Publish)]) == 21
    assert broker._merged_matches_held <= 10 and len(broker._merged) == 3
    assert all(len(topic) < 300 for topic in broker._merged)


def test_memory_key_keeps_short_strings_and_digests_long_ones():
    """Up to KEY_LIMIT characters a string is its own key; longer ones get distinct short digests."""
    assert memory_key("dev-1") == "dev-1"
    a, b = "x" * 60000 + "a", "x" * 60000 + "b"
    assert len(memory_key(a)) < 80 and memory_key(a) != memory_key(b)
    assert memory_key(a) == memory_key("x" * 60000 + "a")
    assert memory_key("\udcff" * (KEY_LIMIT + 1)).startswith("sha256:")


def test_bucket_memory_keeps_digests_of_long_client_ids():
    """5,000-ish closed connections with 60,000-character ids keep short keys only (REVIEW-S10 S16)."""
    broker, clock = make_broker(max_inbound_bytes_rate=1000)
    hog = FakeClient(broker, clock)
    hog.connect("hog")
    hog.publish("t", b"x" * 60000)                          # the host's bucket in debt
    for n in range(200):
        c = FakeClient(broker, clock)
        c.connect(str(n) + "i" * 60000)
        c.drop()
    keys = list(broker.inbound_buckets.memory._entries)
    assert len(keys) >= 200
    assert max(len(str(key)) for key in keys) < 100


def test_pause_ledger_and_earlier_owners_keep_digests_of_long_ids():
    """The pause ledger's client identity and the earlier-owner table key long ids by digest."""
    from mqttd.flowcontrol import session_identities
    from mqttd.session import Session
    long_id = "d" * 30000
    keys = session_identities(Session(long_id, owner="u" * 70000))
    assert all(len(str(key)) < 100 for key in keys)
    broker, clock = make_broker()
    dev = FakeClient(broker, clock)
    dev.send(Connect(4, long_id, True, 0, username="v" * 30000, password=b"p"))
    dev.received()
    dev.drop()
    assert all(len(k) < 100 and len(v) < 100 for k, v in broker.earlier_owners.items())
    squatter = FakeClient(broker, clock)
    squatter.send(Connect(4, long_id, True, 0, username="mallory", password=b"p"))
    assert squatter.received()[0].reason_code == 0
    dev = FakeClient(broker, clock)                          # the earlier owner takes it back
    dev.send(Connect(4, long_id, True, 0, username="v" * 30000, password=b"p"))
    assert dev.received()[0].reason_code == 0 and squatter.disconnecting


def test_drop_lines_of_many_clients_are_capped_per_reason(log_events):
    """500 subscribers that each drop every message: at most the limiter's 50 lines per reason per window (REVIEW-S10 S13)."""
    from mqttd.codec.packets import Properties
    broker, clock = make_broker()
    for n in range(500):
        sub = FakeClient(broker, clock, level=5)
        sub.connect("s%03d" % n + "z" * 200, properties=Properties(maximum_packet_size=30))
        sub.subscribe("lg/#")
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.publish("lg/x", b"p" * 100)                     # too large for every subscriber
    clock.advance(11)
    pub.publish("lg/x", b"p" * 100)
    lines = [e for e in log_events if "Dropping messages" in e.get("log_format", "")]
    assert 2 <= len(lines) <= 2 * 50 + 2
    assert broker.stats.dropped["client-maximum-packet-size"] == 1000
    assert all(len(key[0]) < 300 for key in broker._drop_logged)
