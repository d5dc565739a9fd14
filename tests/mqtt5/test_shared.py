"""Shared subscriptions ($share/{ShareName}/{filter}): groups, member selection,
redelivery, persistence, driven through StringTransport and task.Clock."""
from __future__ import annotations

import random

import pytest

from mqttd.codec.packets import (
    Connect, Disconnect, Properties, Puback, Publish, Pubrec, Suback, Subscribe, Subscription)
from mqttd.persistence import records as R
from mqttd.shared import (
    OFFLINE, ONLINE, UNAVAILABLE, SharedSubscriptions, STRATEGIES)
from mqttd.topics import SubscriptionTrie

from core.harness import FakeClient, make_broker
from mqtt5.storeutil import RecordingStore


def publishes(packets):
    return [p for p in packets if isinstance(p, Publish)]


def members(broker, clock, n, level=5, share="$share/g/jobs/#", qos=1, prefix="m", **connect):
    clients = []
    for i in range(n):
        c = FakeClient(broker, clock, level=level)
        c.connect(f"{prefix}{i}", **connect)
        assert c.subscribe(share, qos=qos)[0] == Suback(1, (qos,))
        clients.append(c)
    return clients


def test_connack_announces_shared_subscriptions_available():
    """CONNACK says Shared Subscription Available = 1 now that they exist [MQTT 5.0 §3.2.2.3.15]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    connack = c.connect("a")[0]
    assert connack.properties.shared_subscription_available == 1


def test_each_message_goes_to_exactly_one_member_round_robin():
    """One member per message, in turn (the default strategy), for v5 and v3.1.1 members alike."""
    broker, clock = make_broker()
    group = members(broker, clock, 2, level=5) + members(broker, clock, 1, level=4, prefix="v3-")
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    for i in range(6):
        pub.publish("jobs/a", str(i).encode(), qos=1, packet_id=i + 1)
    got = [[p.payload for p in publishes(c.received())] for c in group]
    assert sorted(sum(got, [])) == [str(i).encode() for i in range(6)]
    assert [len(g) for g in got] == [2, 2, 2]


def test_shared_and_plain_subscriptions_of_one_client_both_deliver():
    """A shared subscription is not merged with the client's own: each gets its copy."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    c.subscribe("$share/g/t", qos=1)
    c.subscribe("t", qos=0, packet_id=2)
    c.publish("t", b"x", qos=1)
    assert len(publishes(c.received())) == 2


def test_v311_member_joins_a_group():
    """MQTT 3.1.1 clients may use $share/ filters (as with mosquitto and EMQX)."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=4)
    c.connect("old")
    assert c.subscribe("$share/g/t", qos=1)[0] == Suback(1, (1,))
    c.publish("t", b"x", qos=1)
    assert [p.payload for p in publishes(c.received())] == [b"x"]


def test_no_local_on_a_shared_subscription_is_a_protocol_error():
    """No Local = 1 on a shared subscription is a Protocol Error: DISCONNECT 0x82 [MQTT-3.8.3-4]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    c.send(Subscribe(1, (Subscription("t", 1), Subscription("$share/g/t", 1, no_local=True))))
    packets = c.received()
    assert isinstance(packets[-1], Disconnect) and packets[-1].reason_code == 0x82
    assert c.disconnecting
    assert broker.sessions["a"].subscriptions == {}  # checked before anything was subscribed


def test_shared_subscribe_gets_no_retained_messages():
    """Retained messages are not sent when a shared subscription is made [MQTT 5.0 §4.8.2]."""
    broker, clock = make_broker()
    broker.publish_message("t/1", b"kept", qos=1, retain=True)
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    packets = c.subscribe("$share/g/t/#", qos=1)
    assert packets == [Suback(1, (1,))]
    assert [p.payload for p in publishes(c.subscribe("t/#", qos=1, packet_id=2))] == [b"kept"]


def test_online_members_are_preferred_then_offline_persistent_queues():
    """Online members first; with none online the message waits in an offline persistent member's queue."""
    broker, clock = make_broker()
    online, persistent = members(broker, clock, 1)[0], FakeClient(broker, clock, level=5)
    persistent.connect("p", clean=False, properties=Properties(session_expiry_interval=300))
    persistent.subscribe("$share/g/jobs/#", qos=1)
    persistent.drop()
    for i in range(3):
        broker.publish_message("jobs/x", b"%d" % i, qos=1)
    got = publishes(online.received())
    assert len(got) == 3
    assert not broker.sessions["p"].queue
    online.send(*[Puback(m.packet_id) for m in got])
    online.drop()  # a clean session: it leaves the group
    broker.publish_message("jobs/x", b"later", qos=1)
    assert [r.message.payload for r in broker.sessions["p"].queue] == [b"later"]
    back = FakeClient(broker, clock, level=5)
    back.connect("p", clean=False, properties=Properties(session_expiry_interval=300))
    assert [p.payload for p in publishes(back.received())] == [b"later"]


def test_unacknowledged_messages_of_a_member_that_goes_away_go_to_another_member():
    """QoS 1/2 messages sent to a member that leaves without acknowledging are redelivered to another."""
    broker, clock = make_broker()
    a, b = members(broker, clock, 2, qos=2)
    pub = FakeClient(broker, clock, level=5)
    pub.connect("pub")
    pub.publish("jobs/1", b"one", qos=1, packet_id=1)   # round robin: to a
    pub.publish("jobs/2", b"two", qos=2, packet_id=2)   # to b
    pub.publish("jobs/3", b"three", qos=2, packet_id=3)  # to a
    a_got = publishes(a.received())
    b_got = publishes(b.received())
    assert [p.payload for p in a_got] == [b"one", b"three"]
    assert [p.payload for p in b_got] == [b"two"]
    a.send(Pubrec(a_got[1].packet_id))  # a has "three" (QoS 2 received): not redelivered
    a.received()
    a.drop()
    again = publishes(b.received())
    assert [p.payload for p in again] == [b"one"]
    assert again[0].qos == 1


def test_a_failed_redelivery_is_counted_not_lost_silently():
    """With no member left, what the leaving member owed is counted as dropped."""
    broker, clock = make_broker()
    (a,) = members(broker, clock, 1)
    broker.publish_message("jobs/1", b"one", qos=1)
    a.drop()
    assert broker.stats.dropped == {"shared-no-member": 1}


def test_subscription_identifier_of_the_chosen_member_is_sent():
    """The chosen member's Subscription Identifier comes with the message [MQTT-3.3.4-3]."""
    broker, clock = make_broker()
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    c.send(Subscribe(1, (Subscription("$share/g/t", 1),), Properties(subscription_identifiers=(9,))))
    c.received()
    broker.publish_message("t", b"x", qos=1)
    (p,) = publishes(c.received())
    assert p.properties.subscription_identifiers == (9,)


def test_unsubscribe_leaves_the_group():
    """UNSUBSCRIBE of the $share filter stops deliveries; the last member removes the group."""
    broker, clock = make_broker()
    a, b = members(broker, clock, 2)
    from mqttd.codec.packets import Unsubscribe
    a.send(Unsubscribe(5, ("$share/g/jobs/#",)))
    a.received()
    for i in range(3):
        broker.publish_message("jobs/x", b"%d" % i, qos=1)
    assert publishes(a.received()) == []
    assert len(publishes(b.received())) == 3
    b.send(Unsubscribe(5, ("$share/g/jobs/#",)))
    assert len(broker.shared) == 0


def test_groups_with_different_share_names_each_get_a_copy():
    """Two groups on the same filter are two shared subscriptions: one member of each gets it."""
    broker, clock = make_broker()
    g1 = members(broker, clock, 2, share="$share/one/t")
    c = FakeClient(broker, clock, level=5)
    c.connect("other")
    c.subscribe("$share/two/t", qos=1)
    broker.publish_message("t", b"x", qos=1)
    assert sum(len(publishes(m.received())) for m in g1) == 1
    assert len(publishes(c.received())) == 1


def test_shared_subscriptions_and_their_messages_survive_a_restart():
    """Membership is stored with the session; a queued shared message keeps its group after restore."""
    store = RecordingStore()
    broker, clock = make_broker(store=store)
    p = FakeClient(broker, clock, level=5)
    p.send(Connect(5, "p", False, properties=Properties(session_expiry_interval=300)))
    p.send(Subscribe(1, (Subscription("$share/g/t", 1),), Properties(subscription_identifiers=(4,))))
    clock.advance(0)
    assert p.received()[1] == Suback(1, (1,))
    p.drop()
    broker.publish_message("t", b"queued", qos=1)
    stored = store.stored_state()
    broker2, clock2 = make_broker()
    broker2.restore(stored)
    assert broker2.shared.group("$share/g/t").members["p"].subscription_identifier == 4
    (out,) = broker2.sessions["p"].queue
    assert out.share == "$share/g/t"
    back = FakeClient(broker2, clock2, level=5)
    back.connect("p", clean=False, properties=Properties(session_expiry_interval=300))
    (msg,) = publishes(back.received())
    assert msg.payload == b"queued" and msg.properties.subscription_identifiers == (4,)
    broker2.publish_message("t", b"live", qos=1)
    assert [m.payload for m in publishes(back.received())] == [b"live"]


# --- selection strategies (no broker) -------------------------------------------------

def _group(strategy, n=3, rng=None):
    trie = SubscriptionTrie()
    shares = SharedSubscriptions(trie, strategy, rng)
    for i in range(n):
        shares.add(f"m{i}", R.SubscriptionRecord("$share/g/t/#", 1))
    return shares, shares.group("$share/g/t/#")


def _always(state):
    return lambda client_id: state


def test_strategy_names_are_checked():
    """An unknown strategy name is refused when the broker is built."""
    with pytest.raises(ValueError, match="unknown shared subscription strategy"):
        SharedSubscriptions(SubscriptionTrie(), "fastest")


def test_round_robin_cycles_through_online_members():
    """round-robin: each member in turn."""
    shares, group = _group("round-robin")
    picks = [shares.choose(group, "t/x", "p", _always(ONLINE)) for _ in range(6)]
    assert picks == ["m0", "m1", "m2", "m0", "m1", "m2"]


def test_random_uses_every_member():
    """random: uniformly random among the candidates (seeded here)."""
    shares, group = _group("random", rng=random.Random(7))
    picks = {shares.choose(group, "t/x", "p", _always(ONLINE)) for _ in range(60)}
    assert picks == {"m0", "m1", "m2"}


def test_sticky_keeps_its_member_until_it_is_gone():
    """sticky: the same member while it is available, then another one."""
    shares, group = _group("sticky")
    first = shares.choose(group, "t/x", "p", _always(ONLINE))
    assert {shares.choose(group, "t/y", "q", _always(ONLINE)) for _ in range(5)} == {first}
    gone = {first}
    other = shares.choose(group, "t/x", "p",
                          lambda cid: UNAVAILABLE if cid in gone else ONLINE)
    assert other != first
    assert shares.choose(group, "t/x", "p", _always(ONLINE)) == other


def test_hash_clientid_sends_one_publisher_to_one_member():
    """hash-clientid: the same publisher always lands on the same member."""
    shares, group = _group("hash-clientid")
    for origin in ("pub-a", "pub-b", "pub-c", "pub-d"):
        picks = {shares.choose(group, f"t/{i}", origin, _always(ONLINE)) for i in range(5)}
        assert len(picks) == 1
    spread = {shares.choose(group, "t", f"pub-{i}", _always(ONLINE)) for i in range(50)}
    assert len(spread) == 3


def test_hash_topic_sends_one_topic_to_one_member():
    """hash-topic: the same topic always lands on the same member."""
    shares, group = _group("hash-topic")
    for topic in ("t/a", "t/b", "t/c"):
        picks = {shares.choose(group, topic, f"p{i}", _always(ONLINE)) for i in range(5)}
        assert len(picks) == 1
    spread = {shares.choose(group, f"t/{i}", "p", _always(ONLINE)) for i in range(50)}
    assert len(spread) == 3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_prefers_online_and_falls_back_to_offline(strategy):
    """Online members first; offline persistent ones only if none is online; none if none can queue."""
    shares, group = _group(strategy, rng=random.Random(1))
    state = {"m0": OFFLINE, "m1": ONLINE, "m2": UNAVAILABLE}
    assert {shares.choose(group, "t/x", "p", state.get) for _ in range(10)} == {"m1"}
    state["m1"] = UNAVAILABLE
    assert shares.choose(group, "t/x", "p", state.get) == "m0"
    state["m0"] = UNAVAILABLE
    assert shares.choose(group, "t/x", "p", state.get) is None


def test_shared_subscription_strategy_from_the_broker_config():
    """--shared-subscription-strategy reaches the broker's groups."""
    broker, clock = make_broker(shared_subscription_strategy="hash-topic")
    assert broker.shared.strategy == "hash-topic"


def test_acl_read_rules_apply_to_the_filter_inside_a_shared_subscription():
    """ACL: $share/g/jobs/# is allowed where jobs/# is readable, refused where it is not."""
    from mqttd.auth.acl import ACLAuthorizer, parse_acl
    from mqttd.broker import ClientInfo
    acl = ACLAuthorizer(parse_acl("topic read jobs/#\ntopic deny jobs/secret/#\n"))
    who = ClientInfo("w1", 5)
    assert acl.authorize_subscribe(who, "$share/g/jobs/#", 1) is True
    assert acl.authorize_subscribe(who, "$share/g/jobs/secret/x", 1) is False
    assert acl.authorize_subscribe(who, "$share/g/other/#", 1) is False


def test_max_topic_levels_counts_the_levels_of_the_shared_filter():
    """--max-topic-levels applies to the filter inside $share/{ShareName}/, not to the prefix."""
    broker, clock = make_broker(max_topic_levels=2)
    c = FakeClient(broker, clock, level=5)
    c.connect("a")
    assert c.subscribe("$share/g/a/b", "$share/g/a/b/c", qos=1) == [Suback(1, (1, 0x8F))]
