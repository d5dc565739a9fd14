"""A dead node's inbox, replayed by the reaper, is routed by the broker core's
own judgement -- not by a second best-subscription loop of the reaper's: the
adopted sessions and the shared groups the envelope names get it as live
traffic would (and no one else on the reaping node); a session another node
owns now gets the copy its subscriptions merge to (highest QoS, every
Subscription Identifier, Retain As Published, No Local).  No Redis: the
reaper's store writes are recorded."""
from __future__ import annotations

from types import SimpleNamespace

from mqttd.cluster.reaper import Reaper
from mqttd.codec.packets import Publish
from mqttd.messages import Message
from mqttd.persistence.records import SubscriptionRecord

from tests.core.harness import FakeClient, make_broker


class Writes:
    def __init__(self):
        self.ops = []

    def write(self, op):
        self.ops.append(op)

    def sync(self):
        return None


def reaper_on(broker, clock):
    store = Writes()
    backend = SimpleNamespace(register=lambda name, source: None)
    sessions = SimpleNamespace(broker=broker, backend=backend, store=store, node_id="R",
                               prefix="mqttd:", clock=clock, is_fenced=lambda: False)
    return Reaper(sessions), store


def client(broker, clock, client_id, *filters, qos=1):
    c = FakeClient(broker, clock, level=5)
    c.connect(client_id)
    c.subscribe(*filters, qos=qos)
    c.received()
    return c


def payloads(c):
    return [p.payload for p in c.received() if isinstance(p, Publish)]


def test_an_entry_for_plain_subscribers_reaches_the_adopted_session_and_no_one_else():
    """An entry whose node served no shared group (``s`` empty: the group went
    to another node) still reaches the adopted session's plain subscription
    -- the reaper's own loop skipped it -- and never the reaping node's own
    subscribers, who had their copy."""
    broker, clock = make_broker()
    reaper, _store = reaper_on(broker, clock)
    adopted = client(broker, clock, "adopted", "r/#")
    bystander = client(broker, clock, "bystander", "r/#")
    member = client(broker, clock, "member", "$share/g/r/#")
    deliver = reaper.deliver_to({"adopted"})
    assert deliver(Message("r/1", b"plain-only", 1), frozenset()) == 1
    assert payloads(adopted) == [b"plain-only"]
    assert payloads(bystander) == [] and payloads(member) == []
    # an entry that names the group: one member of it here gets it too
    assert deliver(Message("r/2", b"with-group", 1), frozenset({"$share/g/r/#"})) == 2
    assert payloads(adopted) == [b"with-group"] and payloads(member) == [b"with-group"]
    assert payloads(bystander) == []


def test_a_moved_session_gets_the_merged_copy_live_routing_would_give_it():
    """Overlapping subscriptions of a session owned elsewhere merge as in the
    core: highest QoS, both identifiers, retain flag as its subscriptions say;
    a No Local subscription of the publisher itself takes no part."""
    broker, clock = make_broker()
    reaper, store = reaper_on(broker, clock)
    subscriptions = {
        "m/#": SubscriptionRecord("m/#", 1, subscription_identifier=7),
        "m/+": SubscriptionRecord("m/+", 2, subscription_identifier=9),
        "m/own": SubscriptionRecord("m/own", 2, no_local=True),
        "$share/g/m/#": SubscriptionRecord("$share/g/m/#", 2),
    }
    deliver = reaper.deliver_to(set(), {"moved": subscriptions})
    assert deliver(Message("m/x", b"v", 2, retain=True), frozenset()) == 1
    (forward,) = store.ops
    assert forward.client_id == "moved" and forward.record.qos == 2
    message = forward.record.message
    assert message.retain is False
    assert message.properties.subscription_identifiers == (7, 9)
    # its own message on a No Local filter: only the other filter delivers
    store.ops.clear()
    mine = Message("m/own", b"mine", 2, origin="moved")
    subscriptions_own = {"m/own": SubscriptionRecord("m/own", 2, no_local=True),
                         "m/#": SubscriptionRecord("m/#", 1)}
    deliver = reaper.deliver_to(set(), {"moved": subscriptions_own})
    assert deliver(mine, None) == 1
    assert store.ops[0].record.qos == 1
    store.ops.clear()
    assert reaper.deliver_to(set(), {"moved": {"m/own": subscriptions_own["m/own"]}})(
        mine, None) == 0
    assert store.ops == []


def test_a_group_copy_no_member_here_can_take_goes_to_the_groups_members_elsewhere():
    """The dead node was picked for a group whose members here are none (its
    own were clean sessions, ended): the replayed message goes to the group's
    members on another node (the bus's hand-on), not dropped."""
    broker, clock = make_broker()
    handed = []

    class Router:
        def forward(self, message, cache):
            return 0

        def sync(self):
            return None

        def reroute_share(self, share, message, tried=(), live_only=False):
            handed.append((share, message.payload))
            return 1
    broker.add_remote_router(Router())
    reaper, _store = reaper_on(broker, clock)
    plain = client(broker, clock, "adopted-plain", "g/#")
    deliver = reaper.deliver_to({"adopted-plain"})
    assert deliver(Message("g/1", b"for-group", 1), frozenset({"$share/grp/g/#"})) == 2
    assert handed == [("$share/grp/g/#", b"for-group")]
    assert payloads(plain) == [b"for-group"]
    assert broker.stats.dropped.get("shared-no-member", 0) == 0


class HandingRouter:
    """The bus's side of a reaper test: records each group copy handed on."""

    def __init__(self, live=True):
        self.handed = []
        self.live = live

    def forward(self, message, cache):
        return 0

    def sync(self):
        return None

    def reroute_share(self, share, message, tried=(), live_only=False):
        if live_only and not self.live:
            return 0
        self.handed.append((share, message.payload, tuple(tried)))
        return 1


def adopted_offline_member(broker, clock, client_id, share):
    """A persistent member of ``share`` installed here with no connection (what
    the reaper's adoption leaves: an offline session)."""
    from mqttd.codec.packets import Properties
    c = FakeClient(broker, clock, level=5)
    c.connect(client_id, clean=False, properties=Properties(session_expiry_interval=600))
    c.subscribe(share, qos=1)
    c.received()
    c.drop()
    clock.advance(0)
    return client_id


def test_a_group_copy_goes_to_a_live_node_not_into_the_offline_member_adopted_here():
    """REVIEW-S9-CLUSTER C6 with persistent members: the reaper adopted the dead
    node's member (offline here); the group has members on a live node: the
    dead node's group copies go there (one may be connected), not into the
    adopted offline queue; the dead node is never picked again."""
    broker, clock = make_broker()
    router = HandingRouter()
    broker.add_remote_router(router)
    reaper, _store = reaper_on(broker, clock)
    member = adopted_offline_member(broker, clock, "adopted-member", "$share/grp/g/#")
    deliver = reaper.deliver_to({member}, node="dead")
    assert deliver(Message("g/1", b"for-group", 1), frozenset({"$share/grp/g/#"})) == 1
    assert router.handed == [("$share/grp/g/#", b"for-group", ("dead",))]
    assert list(broker.sessions[member].outbound_records()) == []
    # no live node with members: the adopted member queues it (nothing dropped)
    router.live = False
    router.handed.clear()
    assert deliver(Message("g/2", b"kept", 1), frozenset({"$share/grp/g/#"})) == 1
    assert router.handed == []
    assert [out.message.payload for out in broker.sessions[member].outbound_records()] == [
        b"kept"]
    assert broker.stats.dropped.get("shared-no-member", 0) == 0


def test_a_group_copy_handed_on_to_the_dead_node_is_still_owed_to_the_group():
    """An envelope another node handed on to the dead node for a group (marked
    ``~``) never reached a member there: replayed, it goes to the group like
    any other copy -- it was dropped as a group nobody has."""
    broker, clock = make_broker()
    router = HandingRouter()
    broker.add_remote_router(router)
    reaper, _store = reaper_on(broker, clock)
    member = client(broker, clock, "member-here", "$share/grp/g/#")
    deliver = reaper.deliver_to(set(), node="dead")
    assert deliver(Message("g/3", b"handed-on", 1), frozenset({"~$share/grp/g/#"})) == 1
    assert payloads(member) == [b"handed-on"]
    assert router.handed == []
    assert broker.stats.dropped.get("shared-no-member", 0) == 0
