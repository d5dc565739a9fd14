"""The broker's authentication/authorization hooks, driven through a ClientConnection."""
from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import capturedLogs

from mqttd.codec.packets import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, Puback, Publish, Pubrec,
    Suback, Subscribe, Subscription, Will)
from mqttd.persistence.memory import MemoryStore
from tests.core.harness import FakeClient, make_broker


class Hooks:
    """An embedder's authorizer: answers from a table, optionally later (a Deferred)."""

    def __init__(self):
        self.publish = {}      # topic -> True/False/Deferred/Exception
        self.subscribe = {}
        self.forward = {}
        self.calls = []

    def _answer(self, table, key):
        answer = table.get(key, True)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def authorize_publish(self, client, message):
        self.calls.append(("publish", client.client_id, message.topic))
        return self._answer(self.publish, message.topic)

    def authorize_subscribe(self, client, topic_filter, qos):
        self.calls.append(("subscribe", client.client_id, topic_filter))
        return self._answer(self.subscribe, topic_filter)

    def authorize_forward(self, client, message):
        self.calls.append(("forward", client.client_id, message.topic))
        return self._answer(self.forward, (client.client_id, message.topic))


def _broker(**config):
    broker, clock = make_broker(**config)
    hooks = Hooks()
    broker.authorizer = hooks
    return broker, clock, hooks


def test_slow_deferred_publish_authorizer_keeps_acknowledgement_order():
    """A pending hook makes later packets wait, so PUBACKs leave in PUBLISH order."""
    broker, clock, hooks = _broker()
    slow = defer.Deferred()
    hooks.publish["slow"] = slow
    client = FakeClient(broker, clock, level=5)
    client.connect()
    client.publish("slow", qos=1, packet_id=1)
    client.publish("fast", qos=1, packet_id=2)
    client.send(Publish("fast", b"x", 1, False, packet_id=3))
    assert client.received() == []                      # pid 2 and 3 wait behind pid 1
    assert client.conn.input_blocked                    # and nothing more is handled
    slow.callback(True)
    acks = client.received()
    assert [a.packet_id for a in acks] == [1, 2, 3]
    assert all(isinstance(a, Puback) and a.reason_code == 0x10 for a in acks)
    assert client.transport.producerState == "producing"


def test_refused_publish_is_0x87_for_v5_and_acknowledged_and_dropped_for_v3():
    """v5 learns of the refusal in PUBACK/PUBREC; v3 cannot, so it is acked and dropped."""
    broker, clock, hooks = _broker()
    hooks.publish["secret"] = False
    sub = FakeClient(broker, clock)
    sub.connect("sub")
    sub.subscribe("#")
    v5 = FakeClient(broker, clock, level=5)
    v5.connect("v5")
    v5.publish("secret", qos=1, packet_id=7)
    v5.publish("secret", qos=2, packet_id=8)
    assert v5.received() == [Puback(7, 0x87), Pubrec(8, 0x87)]
    v3 = FakeClient(broker, clock)
    v3.connect("v3")
    v3.publish("secret", qos=1, packet_id=9)
    v3.publish("secret", qos=2, packet_id=10)
    assert [(type(p), p.packet_id) for p in v3.received()] == [(Puback, 9), (Pubrec, 10)]
    assert sub.received() == []
    assert broker.stats.refused["publish"] == 4


def test_hook_that_raises_refuses_and_logs():
    """An exception in a hook is a refusal, never a crash of the connection."""
    broker, clock, hooks = _broker()
    hooks.publish["boom"] = RuntimeError("db down")
    client = FakeClient(broker, clock, level=5)
    client.connect()
    with capturedLogs() as events:
        client.publish("boom", qos=1, packet_id=1)
    assert client.received() == [Puback(1, 0x87)]
    assert not client.disconnecting
    failed = [e for e in events if e.get("hook") == "authorize_publish"]
    assert len(failed) == 1 and failed[0]["why"] == "db down" and failed[0]["client_id"] == "c1"


def test_hook_that_never_answers_times_out_and_refuses():
    """A Deferred pending past hook_timeout refuses; the connection reads again."""
    broker, clock, hooks = _broker(hook_timeout=2.0)
    hooks.publish["stuck"] = defer.Deferred()
    client = FakeClient(broker, clock, level=5)
    client.connect()
    client.publish("stuck", qos=1, packet_id=1)
    client.publish("ok", qos=1, packet_id=2)
    assert client.received() == []
    with capturedLogs() as events:
        clock.advance(2.0)
    assert [(a.packet_id, a.reason_code) for a in client.received()] == [(1, 0x87), (2, 0x10)]
    assert [e["why"] for e in events if e.get("hook") == "authorize_publish"] == [
        "no answer within the hook timeout"]


def test_subscribe_refusal_is_per_filter_0x87_or_0x80():
    """Each filter gets its own SUBACK code; allowed ones are granted."""
    broker, clock, hooks = _broker()
    hooks.subscribe["private/#"] = False
    v5 = FakeClient(broker, clock, level=5)
    v5.connect("a")
    assert v5.subscribe("public/#", "private/#", qos=1) == [Suback(1, (1, 0x87))]
    v3 = FakeClient(broker, clock)
    v3.connect("b")
    assert v3.subscribe("private/#", "public/#", qos=1) == [Suback(1, (0x80, 1))]
    assert broker.stats.refused["subscribe"] == 2


def test_deferred_subscribe_authorizer_answers_in_order():
    """A pending subscribe hook holds the SUBACK and later packets until it answers."""
    broker, clock, hooks = _broker()
    pending = defer.Deferred()
    hooks.subscribe["slow/#"] = pending
    client = FakeClient(broker, clock, level=5)
    client.connect()
    client.send(Subscribe(1, (Subscription("slow/#", 0), Subscription("x", 0))), Pingreq())
    assert client.received() == []
    pending.callback(False)
    assert client.received() == [Suback(1, (0x87, 0)), Pingresp()]


def test_forward_refusal_skips_that_subscriber_only():
    """Read permission at delivery time: one subscriber is skipped, the other served."""
    broker, clock, hooks = _broker()
    hooks.forward[("nosy", "t")] = False
    nosy = FakeClient(broker, clock)
    nosy.connect("nosy")
    nosy.subscribe("#")
    ok = FakeClient(broker, clock)
    ok.connect("ok")
    ok.subscribe("#")
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    pub.publish("t", b"hello")
    assert nosy.received() == []
    assert [p.payload for p in ok.received()] == [b"hello"]
    assert broker.stats.refused["forward"] == 1


def test_forward_refusal_is_logged_with_the_subscribers_address():
    """The refusal line names the subscriber's peer, not None (REVIEW-SEC minor)."""
    from twisted.logger import capturedLogs as captured
    broker, clock, hooks = _broker()
    hooks.forward[("nosy", "t")] = False
    nosy = FakeClient(broker, clock)
    nosy.conn.peer = "198.51.100.4:5123"
    nosy.connect("nosy")
    nosy.subscribe("#")
    pub = FakeClient(broker, clock)
    pub.connect("pub")
    with captured() as events:
        pub.publish("t", b"hello")
    (line,) = [e for e in events if e.get("what") == "forward"]
    assert line["peer"] == "198.51.100.4:5123" and line["client_id"] == "nosy"


def test_retained_replay_asks_authorize_forward():
    """A retained message is replayed only to subscribers that may read it."""
    broker, clock, hooks = _broker()
    hooks.forward[("nosy", "r/secret")] = False
    broker.publish_message("r/secret", b"s", retain=True)
    broker.publish_message("r/open", b"o", retain=True)
    nosy = FakeClient(broker, clock)
    nosy.connect("nosy")
    got = nosy.subscribe("r/#")
    assert [p.topic for p in got if isinstance(p, Publish)] == ["r/open"]


def test_deferred_forward_delivers_in_order():
    """Deliveries waiting for a Deferred forward answer keep their order."""
    broker, clock, hooks = _broker()
    first = defer.Deferred()
    hooks.forward[("s", "a")] = first
    sub = FakeClient(broker, clock)
    sub.connect("s")
    sub.subscribe("#")
    broker.publish_message("a", b"1")
    broker.publish_message("b", b"2")
    assert sub.received() == []
    first.callback(True)
    assert [p.payload for p in sub.received()] == [b"1", b"2"]


def test_will_topic_without_write_permission_refuses_connect():
    """The will is authorized at CONNECT: refused with 0x87 (v5) / 0x05 (v3)."""
    broker, clock, hooks = _broker()
    hooks.publish["wills/x"] = False
    v5 = FakeClient(broker, clock, level=5)
    v5.connect("a", will=Will("wills/x", b"bye"), expect_ok=False)
    v3 = FakeClient(broker, clock)
    packets = v3.connect("b", will=Will("wills/x", b"bye"), expect_ok=False)
    assert packets[0].reason_code == 0x05
    assert broker.stats.refused["will"] == 2
    assert "a" not in broker.sessions


class _Auth:
    def __init__(self, answer):
        self.answer = answer
        self.requests = []

    def authenticate(self, request):
        self.requests.append(request)
        return self.answer() if callable(self.answer) else self.answer


def test_deferred_authenticate_holds_packets_sent_after_connect():
    """Packets pipelined after CONNECT wait for the authenticate hook's answer."""
    broker, clock = make_broker()
    pending = defer.Deferred()
    broker.authenticator = _Auth(pending)
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(5, "c", True, 0, username="u", password=b"p"))
    client.publish("t", qos=1, packet_id=1)
    assert client.received() == []
    pending.callback("alice")  # accepted, as user "alice"
    packets = client.received()
    assert isinstance(packets[0], Connack) and packets[0].reason_code == 0
    assert packets[1] == Puback(1, 0x10)
    assert broker.sessions["c"].owner == "alice"
    assert broker.authenticator.requests[0].password == b"p"


def test_authenticate_refusal_codes_for_v3_and_v5():
    """False is 0x86 (v3 0x04); a failing hook is 0x87 (v3 0x05)."""
    for answer, v5_code, v3_code in ((False, 0x86, 0x04),
                                     (lambda: defer.fail(RuntimeError("x")), 0x87, 0x05)):
        broker, clock = make_broker()
        broker.authenticator = _Auth(answer)
        for level, code in ((5, v5_code), (4, v3_code)):
            client = FakeClient(broker, clock, level=level)
            client.send(Connect(level, "c", True, 0, username="u", password=b"p"))
            assert client.received()[0].reason_code == code
            assert client.disconnecting


def test_user_name_without_any_checker_connects_as_anonymous(log_events):
    """No authentication configured and anonymous allowed (the default on loopback): a CONNECT
    with a user name is let in as mosquitto does, as an anonymous client -- the unchecked name
    owns no session and picks no ACL user block -- with one log line (REVIEW-S9 R9)."""
    from mqttd.auth.acl import ACLAuthorizer, parse_acl
    from mqttd.auth.checkers import Authenticator
    broker, clock = make_broker()
    broker.authenticator = Authenticator(None, allow_anonymous=True)
    broker.authorizer = ACLAuthorizer(parse_acl("topic read public/#\nuser admin\ntopic readwrite #\n"))
    for level in (4, 5):
        client = FakeClient(broker, clock, level=level)
        client.send(Connect(level, f"d{level}", False, 0, username="admin", password=b"x",
                            properties=Properties(session_expiry_interval=60)
                            if level == 5 else Properties()))
        assert client.received()[0].reason_code == 0
        assert broker.sessions[f"d{level}"].owner is None
        # the anonymous block applies, not admin's
        assert client.subscribe("public/a", "secret/#") == [
            Suback(1, (0, 0x87 if level == 5 else 0x80))]
    assert sum("not checked" in e.get("log_format", "") for e in log_events) == 2
    refusing = Authenticator(None, allow_anonymous=False)
    broker.authenticator = refusing
    for level, code in ((5, 0x86), (4, 0x04)):
        client = FakeClient(broker, clock, level=level)
        client.send(Connect(level, "x", True, 0, username="admin", password=b"x"))
        assert client.received()[0].reason_code == code


def _connect_as(broker, clock, level, client_id, username, clean=False):
    client = FakeClient(broker, clock, level=level)
    client.send(Connect(level, client_id, clean, 0, username=username,
                        password=None if username is None else b"pw",
                        properties=Properties(session_expiry_interval=60)
                        if level == 5 else Properties()))
    return client, client.received()[0]


def test_live_session_of_another_user_is_refused_unless_allowed():
    """Same client id, another username, owner online: 0x87 (v5) / 0x05 (v3), the owner is not kicked."""
    broker, clock = make_broker()
    owner, ack = _connect_as(broker, clock, 4, "dev1", "alice")
    assert ack.reason_code == 0
    _thief, ack = _connect_as(broker, clock, 5, "dev1", "mallory")
    assert ack.reason_code == 0x87
    _thief, ack = _connect_as(broker, clock, 4, "dev1", None, clean=True)
    assert ack.reason_code == 0x05
    assert not owner.disconnecting and broker.sessions["dev1"].connection is owner.conn
    assert broker.stats.refused["session-owner"] == 2
    # a session created anonymously has no owner to protect: the first user claims it
    anon, ack = _connect_as(broker, clock, 4, "dev2", None)
    anon.drop()
    _claim, ack = _connect_as(broker, clock, 4, "dev2", "bob")
    assert ack.reason_code == 0 and ack.session_present and broker.sessions["dev2"].owner == "bob"
    broker2, clock2 = make_broker(allow_session_takeover_by_other_user=True)
    _connect_as(broker2, clock2, 4, "dev1", "alice")
    _other, ack = _connect_as(broker2, clock2, 4, "dev1", "bob")
    assert ack.reason_code == 0 and broker2.sessions["dev1"].owner == "bob"


def _squat(broker, clock, client_id="dev1", user="bob"):
    """``user`` stores a persistent session with a subscription under ``client_id``."""
    squatter, ack = _connect_as(broker, clock, 4, client_id, user)
    assert ack.reason_code == 0
    squatter.subscribe("squat/#")
    squatter.drop()
    assert broker.sessions[client_id].owner == user


@pytest.mark.parametrize("level, clean", [(4, True), (5, True), (4, False), (5, False)])
def test_squatted_offline_session_is_replaced_by_the_real_device(level, clean):
    """REVIEW-S9 R17: another user's offline session under a device's id no longer locks it out."""
    broker, clock = make_broker()
    device, ack = _connect_as(broker, clock, 4, "dev1", "alice", clean=True)
    device.drop()                     # a clean-session device leaves nothing behind
    _squat(broker, clock)
    device, ack = _connect_as(broker, clock, level, "dev1", "alice", clean=clean)
    assert ack.reason_code == 0 and not ack.session_present
    session = broker.sessions["dev1"]
    assert session.owner == "alice" and session.connection is device.conn
    assert not session.subscriptions          # bob's data was discarded, not handed over
    publisher = FakeClient(broker, clock, level=4)
    publisher.connect(client_id="pub")
    publisher.publish("squat/x", b"secret", qos=1)
    assert not [p for p in device.received() if isinstance(p, Publish)]
    assert broker.stats.sessions_replaced == 1
    assert "session-owner" not in broker.stats.refused


def test_offline_session_of_another_user_is_never_resumed():
    """Ownership still keeps queued messages from other users: the session is discarded, not resumed."""
    broker, clock = make_broker()
    owner, _ = _connect_as(broker, clock, 4, "dev1", "alice")
    owner.subscribe("alice/#", qos=1)
    owner.drop()
    publisher = FakeClient(broker, clock, level=4)
    publisher.connect(client_id="pub")
    publisher.publish("alice/mail", b"private", qos=1)
    assert broker.sessions["dev1"].queue
    thief, ack = _connect_as(broker, clock, 4, "dev1", "mallory")
    assert ack.reason_code == 0 and not ack.session_present
    assert not [p for p in thief.received() if isinstance(p, Publish)]
    assert broker.sessions["dev1"].owner == "mallory"
    assert not broker.sessions["dev1"].subscriptions and not broker.sessions["dev1"].queue
    assert broker.stats.sessions_replaced == 1


def test_session_owner_is_stored_and_restored():
    """The owner survives a restart: it is part of the stored session record."""
    store = MemoryStore()
    broker, clock = make_broker(store=store)
    client, _ = _connect_as(broker, clock, 4, "dev1", "alice")
    client.drop()
    record = broker.sessions["dev1"].to_record()
    assert record.owner == "alice"
    from mqttd.broker import Broker
    from mqttd.persistence.records import StoredSession, StoredState
    state = StoredState(sessions={"dev1": StoredSession(record)})
    fresh = Broker(clock)
    fresh.restore(state)
    assert fresh.sessions["dev1"].owner == "alice"
    # restored, it is still alice's: another user gets a fresh session, not hers
    _other, ack = _connect_as(fresh, clock, 4, "dev1", "mallory")
    assert ack.reason_code == 0 and not ack.session_present
    assert fresh.stats.sessions_replaced == 1


def test_max_subscriptions_per_client_refuses_the_extra_filter():
    """Past the limit a new filter gets 0x97 (v3 0x80); replacing one is fine."""
    broker, clock = make_broker(max_subscriptions_per_client=2)
    client = FakeClient(broker, clock, level=5)
    client.connect()
    assert client.subscribe("a", "b", "c") == [Suback(1, (0, 0, 0x97))]
    assert client.subscribe("a", packet_id=2) == [Suback(2, (0,))]
    assert broker.stats.refused["max-subscriptions-per-client"] == 1


def test_max_topic_levels_refuses_deep_filters_and_topics():
    """A filter too deep gets 0x8F; a PUBLISH too deep is a v5 DISCONNECT 0x90."""
    broker, clock = make_broker(max_topic_levels=3)
    client = FakeClient(broker, clock, level=5)
    client.connect()
    assert client.subscribe("a/b/c", "a/b/c/d") == [Suback(1, (0, 0x8F))]
    client.publish("a/b/c/d")
    packets = client.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x90
    assert client.disconnecting
    assert broker.stats.refused["max-topic-levels"] == 2


def test_default_topic_level_limit_is_mosquittos_200():
    """By default a 201-level filter or topic is refused: one deep SUBSCRIBE must not build
    thousands of tree nodes (REVIEW-S9 R4: 32,000 levels per filter cost 700 MB)."""
    broker, clock = make_broker()
    assert broker.config.max_topic_levels == 200
    client = FakeClient(broker, clock, level=5)
    client.connect()
    deep = "/".join(["x"] * 200)
    deeper = deep + "/x"
    huge = "/".join(["x"] * 32000)
    assert client.subscribe(deep, deeper, huge) == [Suback(1, (0, 0x8F, 0x8F))]
    assert broker.stats.refused["max-topic-levels"] == 2
    client.publish(deeper)
    packets = client.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x90


def test_max_connections_refuses_connect_with_quota_exceeded():
    """Over max_connections a CONNECT gets 0x97 (v5) / 0x03 (v3)."""
    broker, clock = make_broker(max_connections=1)
    broker.open_connections = 2  # as the protocol counts them: this one is the second
    v5 = FakeClient(broker, clock, level=5)
    assert v5.connect(expect_ok=False)[0].reason_code == 0x97
    v3 = FakeClient(broker, clock)
    assert v3.connect(expect_ok=False)[0].reason_code == 0x03
    assert broker.stats.refused["max-connections"] == 2


def test_auth_packet_without_enhanced_authentication_is_a_protocol_error():
    """AUTH on a connection that did not use enhanced authentication [MQTT-4.12.0-1]."""
    broker, clock = make_broker()
    client = FakeClient(broker, clock, level=5)
    client.connect()
    client.send(Auth(0x19, Properties(authentication_method="SCRAM-SHA-256")))
    assert client.received()[0].reason_code == 0x82
    assert client.disconnecting


@pytest.mark.parametrize("device_clean", [False, True], ids=["persistent-device", "clean-device"])
def test_squatter_staying_connected_does_not_lock_the_device_out(device_clean):
    """REVIEW-S10 S5: the user who had the client id first takes it back from a connected squatter (0x8E to the squatter)."""
    broker, clock = make_broker()
    device, ack = _connect_as(broker, clock, 4, "gw-device", "sensor-gw", clean=device_clean)
    assert ack.reason_code == 0
    device.drop()                                          # a reconnect gap
    squatter, ack = _connect_as(broker, clock, 5, "gw-device", "dashboard")
    assert ack.reason_code == 0                            # the gap was taken
    for _ in range(3):
        device, ack = _connect_as(broker, clock, 4, "gw-device", "sensor-gw", clean=device_clean)
        assert ack.reason_code == 0
        session = broker.sessions["gw-device"]
        assert session.owner == "sensor-gw" and session.connection is device.conn
        assert squatter.disconnecting
        assert squatter.received()[-1].reason_code == 0x8E   # session taken over
        # the squatter cannot take it back while the device is connected
        squatter, ack = _connect_as(broker, clock, 5, "gw-device", "dashboard")
        assert ack.reason_code == 0x87 and not device.disconnecting
        device.drop()
        squatter, ack = _connect_as(broker, clock, 5, "gw-device", "dashboard")
        assert ack.reason_code == 0
    assert "session-owner" in broker.stats.refused


def test_precedence_survives_a_chain_of_squatters_and_the_squatters_own_reconnects():
    """The first owner keeps the right over a second squatter, and over a squatter that resumed its session."""
    broker, clock = make_broker()
    device, _ = _connect_as(broker, clock, 4, "dev9", "alice")
    device.drop()
    bob, _ = _connect_as(broker, clock, 4, "dev9", "bob")
    bob.drop()
    bob, ack = _connect_as(broker, clock, 4, "dev9", "bob")          # bob resumes his own session
    assert ack.reason_code == 0 and ack.session_present
    bob.drop()
    carol, ack = _connect_as(broker, clock, 4, "dev9", "carol")      # a second squatter
    assert ack.reason_code == 0
    bob2, ack = _connect_as(broker, clock, 4, "dev9", "bob")         # bob was no first owner
    assert ack.reason_code == 0x05
    device, ack = _connect_as(broker, clock, 4, "dev9", "alice")
    assert ack.reason_code == 0 and carol.disconnecting
    assert broker.sessions["dev9"].claimed_from is None


def test_earlier_owners_are_bounded(monkeypatch):
    """The memory of who had a client id keeps at most MAX_EARLIER_OWNERS ids, oldest forgotten first."""
    import mqttd.lifecycle
    monkeypatch.setattr(mqttd.lifecycle, "MAX_EARLIER_OWNERS", 5)
    broker, clock = make_broker()
    for n in range(8):
        client, _ = _connect_as(broker, clock, 4, "id%d" % n, "u%d" % n, clean=True)
        client.drop()
    assert list(broker.earlier_owners) == ["id3", "id4", "id5", "id6", "id7"]
