"""An ACL reload applies to messages already queued (REVIEW-SEC2 N4).

Before, a message queued for an offline session was delivered after a
reload had taken the read permission away (docs/security.rst: "deliveries
are checked against the new rules from then on").  Now the reload's pass asks
``authorize_forward`` about every queued, not yet sent message and drops the
refused ones (counted ``not-authorized``, one ``forward`` refusal line per
session naming the peer -- ``offline`` for an offline session, never None).
"""
from __future__ import annotations

from twisted.internet import defer

from mqttd.auth.acl import ACLAuthorizer
from mqttd.codec.packets import Connect, Properties, Puback, Publish
from tests.core.harness import FakeClient, make_broker


def _reload(broker, path, text):
    path.write_text(text)
    broker.authorizer.reload()
    done = []
    broker.recheck_subscriptions().addCallback(done.append)
    assert done
    return done[0]


def _offline_session(broker, clock, topic_filter="#"):
    """legit2's persistent session 'l2p' subscribed to ``topic_filter``, offline."""
    sub = FakeClient(broker, clock)
    sub.send(Connect(4, "l2p", False, 0, username="legit2"))
    assert sub.received()[0].reason_code == 0
    sub.subscribe(topic_filter, qos=1)
    sub.drop()


def _reconnect(broker, clock):
    sub = FakeClient(broker, clock)
    sub.send(Connect(4, "l2p", False, 0, username="legit2"))
    got = sub.received()
    assert got[0].reason_code == 0 and got[0].session_present
    return [p for p in got if isinstance(p, Publish)]


def test_messages_queued_before_a_reload_that_revoked_read_are_not_delivered(tmp_path,
                                                                           log_events):
    """The reviewer's case: q/1 queued for an offline session, reload revokes q/ -> q/1 never arrives; other/1 still does."""
    path = tmp_path / "acl"
    path.write_text("user legit2\ntopic readwrite #\n")
    broker, clock = make_broker()
    broker.authorizer = ACLAuthorizer.from_file(str(path))
    _offline_session(broker, clock)
    broker.publish_message("q/1", b"queued-before-reload", qos=1)
    broker.publish_message("other/1", b"still-allowed", qos=1)
    assert len(broker.sessions["l2p"].queue) == 2
    _reload(broker, path, "user legit2\ntopic readwrite other/#\n")
    assert [m.message.topic for m in broker.sessions["l2p"].queue] == ["other/1"]
    assert broker.stats.dropped.get("not-authorized") == 1
    assert broker.stats.refused.get("forward") == 1
    (line,) = [e for e in log_events if e.get("what") == "forward"]
    assert line["peer"] == "offline" and "1 queued messages" in line["detail"]
    assert [p.payload for p in _reconnect(broker, clock)] == [b"still-allowed"]


def test_messages_of_a_subscription_removed_by_the_reload_are_not_delivered(tmp_path):
    """The subscription goes (as before) and so do the messages queued for it."""
    path = tmp_path / "acl"
    path.write_text("user legit2\ntopic readwrite #\n")
    broker, clock = make_broker()
    broker.authorizer = ACLAuthorizer.from_file(str(path))
    _offline_session(broker, clock, "q/#")
    broker.publish_message("q/1", b"queued-before-reload", qos=1)
    assert _reload(broker, path, "user legit2\ntopic readwrite other/#\n") == 1
    assert broker.sessions["l2p"].subscriptions == {}
    assert _reconnect(broker, clock) == []
    assert broker.sessions["l2p"].queued_bytes == 0


def test_queued_behind_receive_maximum_are_rechecked_too(tmp_path):
    """An online v5 client with Receive Maximum 1: the in-flight message was sent, the queued ones are checked again."""
    path = tmp_path / "acl"
    path.write_text("user u\ntopic readwrite #\n")
    broker, clock = make_broker()
    broker.authorizer = ACLAuthorizer.from_file(str(path))
    sub = FakeClient(broker, clock, level=5)
    sub.send(Connect(5, "rm1", True, 0, username="u",
                     properties=Properties(receive_maximum=1)))
    sub.received()
    sub.subscribe("#", qos=1)
    for n in range(3):
        broker.publish_message(f"q/{n}", b"%d" % n, qos=1)
    broker.publish_message("ok/3", b"3", qos=1)
    (first,) = [p for p in sub.received() if isinstance(p, Publish)]
    assert first.topic == "q/0" and len(broker.sessions["rm1"].queue) == 3
    _reload(broker, path, "user u\ntopic readwrite ok/#\n")
    sub.send(Puback(first.packet_id))
    assert [p.topic for p in sub.received() if isinstance(p, Publish)] == ["ok/3"]
    assert broker.stats.dropped.get("not-authorized") == 2


def test_a_deferred_authorize_forward_answer_drops_a_message_still_queued(tmp_path):
    """An embedder's hook answering later: applied when it comes, if the message is still queued."""
    broker, clock = make_broker()
    answers = []

    class Authorizer:
        def authorize_forward(self, client, message):
            if not answers:
                return True          # routing: allowed
            d = defer.Deferred()
            answers.append(d)
            return d
    broker.authorizer = Authorizer()
    _offline_session(broker, clock)
    broker.publish_message("q/1", b"x", qos=1)
    answers.append("reload")                      # from now on the hook answers later
    broker.recheck_subscriptions()
    (pending,) = answers[1:]
    assert len(broker.sessions["l2p"].queue) == 1
    pending.callback(False)
    assert len(broker.sessions["l2p"].queue) == 0
    assert broker.stats.dropped.get("not-authorized") == 1


def test_forward_refusals_of_offline_sessions_never_log_a_peer_of_none(log_events):
    """Delivery refusals name the connection's peer, or 'offline' (was: 'Refused forward for X from None')."""
    broker, clock = make_broker()

    class NoReading:
        def authorize_forward(self, client, message):
            return message.topic != "a/x"
    broker.authorizer = NoReading()
    _offline_session(broker, clock, "a/#")           # was connected once: its old peer is gone
    online = FakeClient(broker, clock)
    online.send(Connect(4, "on", True, 0, username="legit2"))
    online.received()
    online.subscribe("a/#", qos=1)
    broker.publish_message("a/x", b"1", qos=1)
    lines = {e["client_id"]: e["peer"] for e in log_events if e.get("what") == "forward"}
    assert lines == {"l2p": "offline", "on": "127.0.0.1:1"}
