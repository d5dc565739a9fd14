"""A shared group's message is never dropped while the group has members on
some node (REVIEW-CLUSTER F11): a node picked for a group whose last member
there just left hands the message on, once, to another node with members --
whether the envelope arrives after the member left or the member left with
the message in flight.  In-process: one broker and its bus router, the
other nodes' routes put in its cache, Redis replaced by a recorder."""
from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer

from mqttd.cluster.bus import REROUTED, Router, decode_entry, encode_envelope
from mqttd.cluster.routes import RouteTable
from mqttd.codec.packets import Puback, Publish
from mqttd.messages import Message

from tests.core.harness import FakeClient, make_broker
from .fakeredis import FakeBackend

GROUP = "$share/g/jobs/#"


class Recorder:
    """The Router's side of Redis: every pipeline recorded, answered at once."""

    def __init__(self):
        self.pipelines = []

    def pipeline(self, commands, wait_replicas=0, wait_timeout=1000):
        self.pipelines.append(commands)
        return defer.succeed([b"1-0"] * len(commands))

    def execute(self, *args):
        return defer.succeed(None)

    def sent(self):
        """(inbox key, [(message, groups)]) of every XADD so far."""
        out = []
        for commands in self.pipelines:
            for command in commands:
                fields = dict(zip(command[6::2], command[7::2]))
                fields = {k.encode(): (v.encode() if isinstance(v, str) else v)
                          for k, v in fields.items()}
                messages, _errors = decode_entry(fields)
                out.append((command[1], [(m, only) for m, only, _t in messages]))
        return out


def node_b(other_routes=None):
    """Node "B": a broker with the bus router; node "C" has members of GROUP."""
    broker, clock = make_broker()
    routes = RouteTable(FakeBackend(clock), clock, "B")
    routes._cache_replace("C", set(other_routes or {GROUP}), 1)
    redis = Recorder()
    router = Router(broker, redis, routes, SimpleNamespace(node_id="B", peers={"C": b"1"}))
    router._online = True
    broker.add_remote_router(router)
    return broker, clock, router, redis


def entry(message, shares, targets="A\x00B"):
    return {b"e": encode_envelope(message), b"s": shares.encode(), b"n": targets.encode()}


def test_a_group_message_for_a_node_whose_members_left_goes_to_another_node_with_members():
    """The F11 example: the publisher's cache still named B for the group, B's
    only member is gone, C has members: the message goes to C for the group."""
    broker, clock, router, redis = node_b()
    message = Message("jobs/1", b"m", 1)
    router._deliver([(b"5-0", entry(message, GROUP))])
    clock.advance(0)
    ((inbox, items),) = redis.sent()
    assert inbox == "mqttd:{n:C}:inbox"
    assert items == [(message, frozenset({REROUTED + GROUP}))]
    assert router.stats["rerouted"] == 1
    assert broker.stats.dropped.get("shared-no-member", 0) == 0


def test_a_handed_on_message_is_served_by_the_groups_members_only_and_never_bounced_again():
    """On the node it was handed to, only the group gets it (its plain
    subscribers had their own copy); with no member there either it is
    dropped and counted, not sent on in a loop."""
    broker, clock, router, redis = node_b()
    member = FakeClient(broker, clock, level=5)
    member.connect("member")
    member.subscribe(GROUP, qos=1)
    plain = FakeClient(broker, clock, level=5)
    plain.connect("plain")
    plain.subscribe("jobs/#", qos=1)
    member.received(), plain.received()
    message = Message("jobs/2", b"handed-on", 1)
    router._deliver([(b"6-0", entry(message, REROUTED + GROUP, "C"))])
    clock.advance(0)
    (got,) = [p for p in member.received() if isinstance(p, Publish)]
    assert got.payload == b"handed-on"
    assert plain.received() == []
    member.send(Puback(got.packet_id))
    member.drop()
    router._deliver([(b"7-0", entry(message, REROUTED + GROUP, "C"))])
    clock.advance(0)
    assert redis.sent() == []
    assert broker.stats.dropped["shared-no-member"] == 1


def test_a_member_leaving_with_a_group_message_in_flight_hands_it_to_another_node():
    """The member that got the message disconnects before its PUBACK and is the
    last one here: the QoS 1 message goes to the group's members on C."""
    broker, clock, router, redis = node_b()
    member = FakeClient(broker, clock, level=5)
    member.connect("leaver")
    member.subscribe(GROUP, qos=1)
    member.received()
    message = Message("jobs/3", b"in-flight", 1)
    router._deliver([(b"8-0", entry(message, GROUP))])
    clock.advance(0)
    assert [p.payload for p in member.received() if isinstance(p, Publish)] == [b"in-flight"]
    member.drop()
    clock.advance(0)
    ((inbox, items),) = redis.sent()
    assert inbox == "mqttd:{n:C}:inbox"
    assert [(m.payload, only) for m, only in items] == [
        (b"in-flight", frozenset({REROUTED + GROUP}))]
    assert broker.stats.dropped.get("shared-no-member", 0) == 0


def test_with_no_member_on_any_node_the_message_is_dropped_and_counted():
    """Nothing to hand on to: one counted drop (``shared-no-member``), one WARN."""
    broker, clock, router, redis = node_b(other_routes={"other/#"})
    router._deliver([(b"9-0", entry(Message("jobs/4", b"m", 1), GROUP))])
    clock.advance(0)
    assert redis.sent() == []
    assert broker.stats.dropped["shared-no-member"] == 1


def offline_member(broker, clock, client_id="parked"):
    """A persistent member of GROUP on this node whose client went away (its
    session stays, offline: it would queue what it is given)."""
    from mqttd.codec.packets import Properties
    member = FakeClient(broker, clock, level=5)
    member.connect(client_id, clean=False,
                   properties=Properties(session_expiry_interval=600))
    member.subscribe(GROUP, qos=1)
    member.received()
    member.drop()
    clock.advance(0)
    assert broker.sessions[client_id].connection is None
    return client_id


def queued(broker, client_id):
    return [out.message.payload for out in broker.sessions[client_id].outbound_records()]


def test_a_group_copy_for_a_node_whose_members_are_all_offline_goes_to_a_live_node_with_members():
    """REVIEW-S9-CLUSTER C6 (persistent members): B's only member of the group is
    an offline persistent session (its client gone, or adopted from a dead
    node); C, live, has members: the message goes to C for the group -- online
    members first, as on one broker -- instead of waiting in the offline queue
    while a connected member elsewhere could take it."""
    broker, clock, router, redis = node_b()
    parked = offline_member(broker, clock)
    message = Message("jobs/5", b"m", 1)
    router._deliver([(b"10-0", entry(message, GROUP))])
    clock.advance(0)
    ((inbox, items),) = redis.sent()
    assert inbox == "mqttd:{n:C}:inbox"
    assert items == [(message, frozenset({REROUTED + GROUP}))]
    assert queued(broker, parked) == []


def test_a_group_message_published_where_members_are_offline_goes_to_a_live_node_with_members():
    """The publishing node itself has only an offline member of the group: the
    group's copy goes to the live node with members, not to the offline queue."""
    broker, clock, router, redis = node_b()
    parked = offline_member(broker, clock)
    router.routes._cache_replace("B", {GROUP}, 1)     # B's own route, as the feed has it
    router.routes.fresh_as_of = clock.seconds()
    publisher = FakeClient(broker, clock, level=5)
    publisher.connect("publisher")
    publisher.publish("jobs/6", b"published-here", qos=1)
    clock.advance(0)
    ((inbox, items),) = redis.sent()
    assert inbox == "mqttd:{n:C}:inbox"
    assert [(m.payload, only) for m, only in items] == [
        (b"published-here", frozenset({GROUP}))]
    assert queued(broker, parked) == []


def test_with_no_live_node_with_members_the_offline_member_here_queues_the_group_message():
    """C has members but is not live (dead, not yet reaped): the offline member
    here keeps the message (it waits in its queue) -- nothing is sent to a node
    that cannot serve it."""
    broker, clock, router, redis = node_b()
    router.node.peers = {}
    parked = offline_member(broker, clock)
    router._deliver([(b"11-0", entry(Message("jobs/7", b"kept", 1), GROUP))])
    clock.advance(0)
    assert redis.sent() == []
    assert queued(broker, parked) == [b"kept"]
    assert broker.stats.dropped.get("shared-no-member", 0) == 0


def test_a_group_message_held_for_a_stale_cache_skips_the_offline_members_here_too():
    """While B's route cache is stale its messages for other nodes are held; a
    group whose members here are all offline is not served here meanwhile (it
    would be queued offline *and* routed again on release): on release it goes
    to the live node with members, once."""
    broker, clock, router, redis = node_b()
    parked = offline_member(broker, clock)
    router.routes._cache_replace("B", {GROUP}, 1)
    publisher = FakeClient(broker, clock, level=5)
    publisher.connect("publisher")
    publisher.publish("jobs/8", b"held", qos=1)
    clock.advance(0)
    assert redis.sent() == [] and queued(broker, parked) == []
    router.routes.fresh_as_of = clock.seconds()
    router._release()
    clock.advance(0)
    ((inbox, items),) = redis.sent()
    assert inbox == "mqttd:{n:C}:inbox"
    assert [(m.payload, only) for m, only in items] == [(b"held", frozenset({GROUP}))]
    assert queued(broker, parked) == []
