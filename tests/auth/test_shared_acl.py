"""Shared subscriptions under read permission: a member that may not read a
message is passed over for it, never chosen and then dropped (REVIEW-SEC2 N13)."""
from __future__ import annotations

from twisted.internet import defer

from mqttd.auth.acl import ACLAuthorizer, parse_acl
from mqttd.codec.packets import Connect, Puback, Publish, Suback
from tests.auth.test_hooks import Hooks
from tests.core.harness import FakeClient, make_broker

ACL = """
user worker
topic readwrite #
user dashboard
topic read sensors/#
pattern readwrite clients/%c/#
"""


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def login(broker, clock, client_id, username, level=5):
    c = FakeClient(broker, clock, level=level)
    c.send(Connect(level, client_id, True, 0, username=username, password=b"x"))
    assert c.received()[0].reason_code == 0
    return c


def _acl_broker(**config):
    broker, clock = make_broker(**config)
    broker.authorizer = ACLAuthorizer(parse_acl(ACL))
    return broker, clock


def _hooked_group():
    """Two v5 members ``a`` and ``b`` of ``$share/g/jobs/#`` (QoS 1) on a broker whose
    authorizer is a :class:`Hooks` (its ``forward`` answers set per test):
    ``(broker, clock, hooks, a, b)``."""
    broker, clock = make_broker()
    hooks = Hooks()
    broker.authorizer = hooks
    a, b = (FakeClient(broker, clock, level=5) for _ in range(2))
    a.connect("a")
    b.connect("b")
    for c in (a, b):
        c.subscribe("$share/g/jobs/#", qos=1)
    return broker, clock, hooks, a, b


def test_low_privilege_member_cannot_make_the_group_lose_messages():
    """A member granted $share/g/# but not allowed to read other/x never takes other/x from the group."""
    broker, clock = _acl_broker()
    worker = login(broker, clock, "w1", "worker")
    dash = login(broker, clock, "d1", "dashboard")
    for c in (worker, dash):
        assert c.subscribe("$share/g1/#", qos=1) == [Suback(1, (1,))]
    pub = login(broker, clock, "p1", "worker")
    for i in range(20):
        pub.publish("other/x", str(i).encode(), qos=1, packet_id=i + 1)
    assert [a.reason_code for a in pub.received()] == [0] * 20
    got = publishes(worker.received())
    assert [p.payload for p in got] == [str(i).encode() for i in range(20)]
    assert all(p.qos == 1 for p in got)
    assert publishes(dash.received()) == []
    assert "shared-not-authorized" not in broker.stats.dropped
    # what both may read is still shared between them
    for i in range(4):
        pub.publish("sensors/t", b"s", qos=0)
    assert len(publishes(worker.received())) == 2
    assert len(publishes(dash.received())) == 2


def test_message_no_member_may_read_is_not_delivered_and_counted():
    """When every member is refused, nobody gets it and the drop is counted as shared-not-authorized."""
    broker, clock = _acl_broker()
    dashes = [login(broker, clock, f"d{i}", "dashboard") for i in range(3)]
    for c in dashes:
        c.subscribe("$share/g/#", qos=1)
    assert broker.publish_message("other/x", b"1", qos=1) == 0
    assert all(publishes(c.received()) == [] for c in dashes)
    assert broker.stats.dropped == {"shared-not-authorized": 1}


def test_deferred_refusal_hands_the_message_to_another_member():
    """An asynchronous authorize_forward that refuses the chosen member redispatches to the next one."""
    broker, clock, hooks, a, b = _hooked_group()
    answer = defer.Deferred()
    hooks.forward[("a", "jobs/1")] = answer     # round robin picks a first
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("jobs/1", b"one", qos=1, packet_id=1)
    assert pub.received() == [Puback(1)]
    assert publishes(a.received()) == publishes(b.received()) == []
    answer.callback(False)
    assert publishes(a.received()) == []
    got = publishes(b.received())
    assert [(p.payload, p.qos) for p in got] == [(b"one", 1)]
    # b acknowledges: the message is b's now (tagged with the group: redelivered if b leaves)
    assert broker.sessions["b"].inflight


def test_deferred_refusal_of_every_member_is_counted():
    """Each member refused in turn (sync or async): the message is dropped once and counted."""
    broker, clock, hooks, a, b = _hooked_group()
    answer = defer.Deferred()
    hooks.forward[("a", "jobs/1")] = answer
    hooks.forward[("b", "jobs/1")] = False
    broker.publish_message("jobs/1", b"one", qos=1)
    answer.callback(False)
    assert publishes(a.received()) == publishes(b.received()) == []
    assert broker.stats.dropped == {"shared-not-authorized": 1}


def test_member_leaving_while_its_answer_is_pending_does_not_lose_the_message():
    """A QoS 1 message whose chosen member went away before the hook answered goes to another member."""
    broker, clock, hooks, a, b = _hooked_group()
    answer = defer.Deferred()
    hooks.forward[("a", "jobs/1")] = answer
    broker.publish_message("jobs/1", b"one", qos=1)
    a.drop()
    answer.callback(True)
    assert [p.payload for p in publishes(b.received())] == [b"one"]


def test_redelivery_of_a_leaving_member_skips_members_that_may_not_read():
    """What a leaving member owed goes to a member that may read it, or is counted as not authorized."""
    broker, clock = _acl_broker()
    w1 = login(broker, clock, "w1", "worker")
    dash = login(broker, clock, "d1", "dashboard")
    w1.subscribe("$share/g/#", qos=1)
    broker.publish_message("other/x", b"1", qos=1)   # to w1 (dash may not read it)
    assert [p.payload for p in publishes(w1.received())] == [b"1"]
    dash.subscribe("$share/g/#", qos=1)
    w1.drop()
    assert publishes(dash.received()) == []
    assert broker.stats.dropped == {"shared-not-authorized": 1}
