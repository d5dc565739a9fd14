"""mosquitto ACL files: parsing, decisions, caching, reload with live re-check."""
from __future__ import annotations

import pytest

from mqttd.auth.acl import ACLAuthorizer, ACLFileError, covers, overlaps, parse_acl
from mqttd.broker import ClientInfo
from mqttd.codec.packets import Publish, Suback, Will
from mqttd.messages import Message
from tests.core.harness import FakeClient, make_broker

ACL_TEXT = """
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic write shared/in
topic shared/both

user bob
topic read $SYS/#

pattern write devices/%c/status
pattern read users/%u/#
"""


def client(client_id, username=None):
    return ClientInfo(client_id, 4, username)


def msg(topic):
    return Message(topic, b"")


@pytest.fixture
def acl():
    return ACLAuthorizer(parse_acl(ACL_TEXT))


def test_parse_puts_rules_before_the_first_user_to_anonymous():
    """mosquitto's layout: anonymous block, user blocks, patterns for everyone."""
    parsed = parse_acl(ACL_TEXT)
    assert [r.topic_filter for r in parsed.anonymous] == ["public/#"]
    assert [r.topic_filter for r in parsed.users["alice"]] == [
        "alice/#", "alice/secret/#", "shared/in", "shared/both"]
    assert parsed.users["alice"][3].access == 3  # "topic FILTER" alone is readwrite
    assert len(parsed.patterns) == 2 and parsed.rule_count == 8


@pytest.mark.parametrize("text", ["topic", "user", "topic read", "frobnicate x",
                                  "topic read a/#/b"])
def test_bad_lines_are_refused_with_the_location(text):
    """A typo is a clear error, never a silently wider (or narrower) permission."""
    with pytest.raises(ACLFileError, match="<acl>:2"):
        parse_acl("# x\n" + text)


def test_publish_needs_write_and_deny_wins(acl):
    """write/readwrite grants publishing; a matching deny refuses even then."""
    alice = client("a1", "alice")
    assert acl.authorize_publish(alice, msg("alice/x"))
    assert not acl.authorize_publish(alice, msg("alice/secret/x"))
    assert acl.authorize_publish(alice, msg("shared/in"))
    assert not acl.authorize_publish(alice, msg("bob/x"))
    assert not acl.authorize_publish(client("anon"), msg("public/x"))  # read only


def test_delivery_needs_read(acl):
    """authorize_forward is the read check at delivery time."""
    alice = client("a1", "alice")
    assert acl.authorize_forward(alice, msg("shared/both"))
    assert not acl.authorize_forward(alice, msg("shared/in"))        # write only
    assert acl.authorize_forward(client("anon"), msg("public/news"))
    assert not acl.authorize_forward(client("anon"), msg("alice/x"))


def test_patterns_substitute_client_id_and_username(acl):
    """%c and %u; anonymous has no %u; a value with + # / never matches."""
    assert acl.authorize_publish(client("dev7", "bob"), msg("devices/dev7/status"))
    assert not acl.authorize_publish(client("dev7", "bob"), msg("devices/dev8/status"))
    assert acl.authorize_forward(client("x", "bob"), msg("users/bob/inbox"))
    assert not acl.authorize_forward(client("x"), msg("users/None/inbox"))
    assert not acl.authorize_publish(client("+"), msg("devices/+/status"))
    assert not acl.authorize_publish(client("a/b"), msg("devices/a/b/status"))


def test_subscribe_refused_when_denied_or_nothing_readable(acl):
    """'#' is allowed (delivery filters it); a filter nothing may read is refused."""
    alice = client("a1", "alice")
    assert acl.authorize_subscribe(alice, "#", 0)
    assert acl.authorize_subscribe(alice, "alice/+", 0)
    assert not acl.authorize_subscribe(alice, "alice/secret/#", 0)   # covered by deny
    assert not acl.authorize_subscribe(alice, "bob/#", 0)            # nothing readable
    assert not acl.authorize_subscribe(client("anon"), "alice/#", 0)
    assert acl.authorize_subscribe(alice, "$share/g/alice/+", 0)      # judged as alice/+
    assert not acl.authorize_subscribe(alice, "$share/g/bob/#", 0)


def test_dollar_topics_match_only_dollar_rules(acl):
    """'#' rules never grant $SYS [MQTT-4.7.2-1]; an explicit $SYS rule does."""
    everything = ACLAuthorizer(parse_acl("topic readwrite #"))
    assert not everything.authorize_forward(client("a"), msg("$SYS/broker/uptime"))
    assert acl.authorize_forward(client("b", "bob"), msg("$SYS/broker/uptime"))
    assert not acl.authorize_subscribe(client("anon"), "$SYS/#", 0)


@pytest.mark.parametrize("a,b,expected", [
    ("#", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True), ("+/b", "a/+", True),
    ("a/b", "a/c", False), ("#", "$SYS/x", False), ("$SYS/#", "$SYS/+", True),
])
def test_overlaps(a, b, expected):
    """Some topic matches both filters."""
    assert overlaps(a, b) is expected and overlaps(b, a) is expected


@pytest.mark.parametrize("outer,inner,expected", [
    ("#", "a/+/c", True), ("a/#", "a", True), ("a/+", "a/#", False), ("a/+", "a/b", True),
    ("a/b", "a/+", False), ("#", "$SYS/x", False), ("$SYS/#", "$SYS/x", True),
    ("+/x", "a/x", True), ("a/b/c", "a/b", False),
])
def test_covers(outer, inner, expected):
    """Every topic of the inner filter matches the outer one."""
    assert covers(outer, inner) is expected


def test_decisions_are_cached_and_reload_clears_the_cache(tmp_path):
    """Repeated topics are one dict lookup; a reload applies the new rules at once."""
    path = tmp_path / "acl"
    path.write_text("topic readwrite a/#\n")
    acl = ACLAuthorizer.from_file(str(path))
    anon = client("c")
    assert acl.authorize_publish(anon, msg("a/1"))
    assert acl._views["c"].write  # cached
    path.write_text("topic read a/#\n")
    acl.reload()
    assert not acl.authorize_publish(anon, msg("a/1"))
    path.write_text("tpoic read a/#\n")
    with pytest.raises(ACLFileError):
        acl.reload()
    assert acl.authorize_forward(anon, msg("a/1"))  # the old rules stay in force


def test_live_subscriptions_are_rechecked_after_reload(tmp_path):
    """A subscription the new ACL forbids is removed; delivery stops."""
    path = tmp_path / "acl"
    path.write_text("topic readwrite a/#\ntopic readwrite b/#\n")
    broker, clock = make_broker()
    broker.authorizer = ACLAuthorizer.from_file(str(path))
    sub = FakeClient(broker, clock)
    sub.connect("s")
    assert sub.subscribe("a/#", "b/#") == [Suback(1, (0, 0))]
    path.write_text("topic readwrite a/#\n")
    broker.authorizer.reload()
    removed = []
    broker.recheck_subscriptions().addCallback(removed.append)
    assert removed == [1]
    assert set(broker.sessions["s"].subscriptions) == {"a/#"}
    broker.publish_message("b/x", b"1")
    broker.publish_message("a/x", b"2")
    assert [p.payload for p in sub.received()] == [b"2"]


def test_acl_applies_to_publish_subscribe_retained_and_will_end_to_end():
    """One ACL, all four places: PUBLISH, SUBSCRIBE, retained replay, the will."""
    broker, clock = make_broker()
    broker.authorizer = ACLAuthorizer(parse_acl(
        "user alice\ntopic readwrite alice/#\ntopic read public/#\n"
        "pattern readwrite clients/%c/#\n"))
    broker.publish_message("public/r", b"pub", retain=True)
    broker.publish_message("secret/r", b"sec", retain=True)
    from mqttd.codec.packets import Connect
    alice = FakeClient(broker, clock, level=5)
    alice.send(Connect(5, "dev1", True, 0, username="alice", password=b"x",
                       will=Will("clients/dev1/gone", b"bye")))
    assert alice.received()[0].reason_code == 0
    got = alice.subscribe("#", "secret/#", "clients/dev1/#")
    assert got[0] == Suback(1, (0, 0x87, 0))
    assert [p.topic for p in got[1:] if isinstance(p, Publish)] == ["public/r"]
    alice.publish("public/x", qos=1, packet_id=5)
    assert alice.received()[0].reason_code == 0x87
    bad_will = FakeClient(broker, clock, level=5)
    bad_will.send(Connect(5, "dev2", True, 0, username="alice", password=b"x",
                          will=Will("clients/dev1/gone", b"spoof")))
    assert bad_will.received()[0].reason_code == 0x87


def test_pattern_values_are_substituted_once_never_rescanned():
    """A user name holding '%c' stays literal: it never gets the (client-chosen) id spliced in
    (REVIEW-SEC2 N10: user '%c' with client id 'victim' read users/victim/#)."""
    acl = ACLAuthorizer(parse_acl("pattern readwrite users/%u/#\npattern read c/%c/%u\n"))
    attacker = client("victim", "%c")
    assert not acl.authorize_forward(attacker, msg("users/victim/secret"))
    assert acl.authorize_forward(attacker, msg("users/%c/x"))              # its own, literally
    assert not acl.authorize_forward(client("vict", "ab%cd"), msg("users/abvictd/x"))
    assert acl.authorize_forward(client("%u", "bob"), msg("c/%u/bob"))     # id '%u' literal too
    assert not acl.authorize_forward(client("%u", "bob"), msg("c/bob/bob"))


def _reload(broker, path, text):
    path.write_text(text)
    broker.authorizer.reload()
    done = []
    broker.recheck_subscriptions().addCallback(done.append)
    assert done


def _open_acl_and_watcher(tmp_path):
    """A broker whose ACL file (``path``, reloadable with :func:`_reload`) allows
    everything, and a client ``watcher`` subscribed to ``q/#``:
    ``(path, broker, clock, watcher)``."""
    path = tmp_path / "acl"
    path.write_text("topic readwrite #\n")
    broker, clock = make_broker()
    broker.authorizer = ACLAuthorizer.from_file(str(path))
    watcher = FakeClient(broker, clock)
    watcher.connect("watcher")
    watcher.subscribe("q/#")
    return path, broker, clock, watcher


def test_will_whose_topic_was_revoked_by_a_reload_is_not_published(tmp_path):
    """A will accepted at CONNECT is dropped when a reload takes write on its topic away
    (REVIEW-SEC2 N14), counted and logged as a will refusal; other wills stay."""
    from mqttd.codec.packets import Connect
    path, broker, clock, watcher = _open_acl_and_watcher(tmp_path)
    revoked = FakeClient(broker, clock)
    revoked.send(Connect(4, "l2will", True, 0, will=Will("q/will", b"gone")))
    kept = FakeClient(broker, clock)
    kept.send(Connect(4, "other", True, 0, will=Will("q/ok/will", b"bye")))
    assert revoked.received()[0].reason_code == 0 and kept.received()[0].reason_code == 0
    _reload(broker, path, "topic readwrite q/ok/#\ntopic read q/#\n")
    revoked.drop()
    kept.drop()
    assert [p.topic for p in watcher.received() if isinstance(p, Publish)] == ["q/ok/will"]
    assert broker.stats.refused.get("will") == 1


def test_pending_delayed_will_is_cancelled_when_a_reload_revokes_its_topic(tmp_path):
    """A will waiting for its Will Delay Interval is forgotten (and its stored record deleted)
    once the topic is no longer allowed."""
    from mqttd.codec.packets import Connect, Properties
    path, broker, clock, watcher = _open_acl_and_watcher(tmp_path)
    dev = FakeClient(broker, clock, level=5)
    dev.send(Connect(5, "dev", False, 0, will=Will("q/will", b"late", properties=Properties(
        will_delay_interval=30)), properties=Properties(session_expiry_interval=300)))
    assert dev.received()[0].reason_code == 0
    dev.drop()
    assert "dev" in broker.wills
    _reload(broker, path, "topic read q/#\n")
    assert "dev" not in broker.wills
    clock.advance(60)
    assert [p for p in watcher.received() if isinstance(p, Publish)] == []


def test_long_topics_are_decided_but_never_cached(acl):
    """A refused PUBLISH to a 16 KB topic leaves nothing cached (REVIEW-S10 S9: +60 MB per client id)."""
    dave = client("d1", "dave")
    for n in range(200):
        assert not acl.authorize_publish(dave, msg("x" * 16000 + str(n)))
    assert acl.cached_bytes < 1000
    assert not acl._views["d1"].write
    assert acl.authorize_publish(client("a1", "alice"), msg("alice/" + "y" * 300))  # still decided


def test_cached_decisions_are_bounded_in_bytes_over_all_clients():
    """Many client ids with many short topics: the whole cache stays within its byte budget."""
    acl = ACLAuthorizer(parse_acl(ACL_TEXT), cache_bytes=50_000)
    for c in range(40):
        who = client("c%d" % c, "dave")
        for n in range(100):
            acl.authorize_publish(who, msg("t/%d/%s" % (n, "z" * 200)))
            assert acl.cached_bytes <= 50_000
    assert acl.cache_resets >= 1
    assert acl.cached_bytes == sum(v.cached_bytes for v in acl._views.values())


def test_table_rollover_and_forget_keep_the_byte_count_exact(acl):
    """A table that starts over and a forgotten client give back exactly the bytes they were counted for."""
    small = ACLAuthorizer(parse_acl(ACL_TEXT), cache_size=10)
    who = client("c", "alice")
    for n in range(25):
        small.authorize_publish(who, msg("alice/%d" % n))
        small.authorize_forward(who, msg("alice/%d" % n))
    assert small.cached_bytes == small._views["c"].cached_bytes
    assert small.cached_bytes == sum(len(t) + 100 for v in small._views.values()
                                     for table in (v.write, v.read, v.subscribe) for t in table)
    small.forget("c")
    assert small.cached_bytes == 0 and "c" not in small._views


def test_decisions_of_a_client_go_when_it_disconnects(tmp_path):
    """Wired by the auth setup: a client's cached decisions are dropped with its connection."""
    from mqttd.auth.setup import configure
    from twisted.internet.task import Clock
    path = tmp_path / "acl"
    path.write_text(ACL_TEXT)
    security = configure(Clock(), ["tcp:1883:interface=127.0.0.1"], acl_file=str(path))
    broker, clock = make_broker()

    class Service:
        def __init__(self, broker):
            self.broker = broker

        def add_bind_check(self, check):
            pass

        def add_reloader(self, name, reload):
            pass
    security.attach(Service(broker))
    c = FakeClient(broker, clock)
    c.connect("gone")
    c.publish("public/x")
    assert "gone" in security.authorizer._views
    c.drop()
    assert "gone" not in security.authorizer._views
    assert security.authorizer.cached_bytes == 0
