"""Cross-node publish/subscribe with real nodes on a real Redis: every matching
subscriber on any node gets a message once, at its own QoS, No Local and
overlapping subscriptions as on one broker, order per publisher and topic
kept, each node receiving a message at most once, shared groups served once
cluster-wide; the basic case also on a 3-master Redis Cluster."""
from __future__ import annotations

import collections
import time

import pytest

from .mqttc import Client, wait_routed

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes(module_nodes):
    return module_nodes[0], module_nodes[1]


@pytest.fixture
def redis_server(module_redis):
    return module_redis


def ready(publisher, subscriber, probe="probe/route"):
    subscriber.subscribe(probe)
    wait_routed(publisher, subscriber, probe)


def test_a_message_reaches_subscribers_on_another_node_at_their_own_qos(
        two_nodes, redis_server):
    """QoS downgrade per subscriber [MQTT-3.8.4-8] holds across nodes."""
    a, b = two_nodes
    pub = Client(a.port, "pub")
    low = Client(b.port, "low")
    high = Client(b.port, "high", level=4)
    assert low.subscribe("q/t", 0).reason_codes == (0,)
    assert high.subscribe("q/t", 1).reason_codes == (1,)
    ready(pub, low)
    high.subscribe("probe/route")
    wait_routed(pub, high, "probe/route")
    ack = pub.publish("q/t", b"hello", qos=1)
    assert ack.reason_code == 0
    (m_low,) = low.collect(1)
    (m_high,) = high.collect(1)
    assert (m_low.payload, m_low.qos) == (b"hello", 0)
    assert (m_high.payload, m_high.qos) == (b"hello", 1)
    assert low.quiet() == [] and high.quiet() == []


def test_no_local_skips_only_the_publisher_and_overlapping_filters_deliver_once(two_nodes):
    """No Local [MQTT-3.8.3-3] and one copy per client for overlapping filters
    [MQTT-3.3.5-1], whichever node the subscribers are on."""
    a, b = two_nodes
    pub = Client(a.port, "nl-pub")
    pub.subscribe("nl/t", 1, no_local=True)
    local_peer = Client(a.port, "nl-local")
    local_peer.subscribe("nl/+", 1)
    remote = Client(b.port, "nl-remote")
    remote.subscribe("nl/+", 0)
    remote.subscribe("nl/#", 1)
    remote.subscribe("nl/t", 1)
    ready(pub, remote)
    pub.publish("nl/t", b"m", qos=1)
    (got,) = remote.collect(1)
    assert got.qos == 1 and got.payload == b"m"
    assert [m.payload for m in local_peer.collect(1)] == [b"m"]
    assert pub.quiet() == [] and remote.quiet() == []


def inbox_envelopes(redis_server, node_id, after=b"0-0"):
    """``(last entry id, [(entry id, topic), ...])`` of the envelopes in a
    node's inbox after the entry id ``after`` (batched entries unpacked)."""
    import redis

    from mqttd.cluster.bus import decode_entry
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        entries = client.xrange(f"mqttd:{{n:{node_id}}}:inbox",
                                min=b"(" + after if after != b"0-0" else "-")
    finally:
        client.close()
    out = []
    last = after
    for entry_id, fields in entries:
        messages, errors = decode_entry(fields)
        assert errors == []
        out.extend((entry_id, message.topic) for message, _only, _targets in messages)
        last = entry_id
    return last, out


def last_inbox_id(redis_server, node_id):
    return inbox_envelopes(redis_server, node_id)[0]


def test_order_per_publisher_and_topic_is_kept_and_each_node_gets_one_envelope(
        two_nodes, redis_server):
    """Many subscribers on one node cost one envelope per message; order holds."""
    a, b = two_nodes
    pub = Client(a.port, "ord-pub")
    subs = [Client(b.port, f"ord-sub-{i}") for i in range(3)]
    for s in subs:
        s.subscribe("ord/t", 1)
    ready(pub, subs[0])
    for s in subs[1:]:
        s.subscribe("probe/route")
    before = last_inbox_id(redis_server, "mb")
    count = 200
    for i in range(count):
        pub.publish("ord/t", str(i).encode(), qos=1 if i % 2 else 0)
    for s in subs:
        got = [int(m.payload) for m in s.collect(count, timeout=20) if m.topic == "ord/t"]
        assert got == list(range(count))
    _last, envelopes = inbox_envelopes(redis_server, "mb", before)
    # once per node, not once per subscriber
    assert sum(1 for _id, topic in envelopes if topic == "ord/t") == count


def test_a_burst_to_one_node_shares_inbox_entries(two_nodes, redis_server):
    """Group commit: the messages a node forwards in one reactor turn go to
    another node in one inbox entry (one XADD), in order, not one entry each."""
    from mqttd.codec import encode
    from mqttd.codec.packets import Publish
    a, b = two_nodes
    pub = Client(a.port, "burst-pub", level=4)
    sub = Client(b.port, "burst-sub")
    sub.subscribe("burst/t", 0)
    ready(pub, sub)
    before = last_inbox_id(redis_server, "mb")
    count = 100
    # one TCP write: the node reads all of them in one turn
    pub.sock.sendall(b"".join(encode(Publish("burst/t", str(i).encode(), 0), 4)
                              for i in range(count)))
    got = [int(m.payload) for m in sub.collect(count, timeout=20)]
    assert got == list(range(count))
    _last, envelopes = inbox_envelopes(redis_server, "mb", before)
    burst = [entry_id for entry_id, topic in envelopes if topic == "burst/t"]
    assert len(burst) == count
    assert len(set(burst)) <= count // 10     # a few entries, not one per message


def test_a_node_without_matching_subscribers_gets_nothing(redis_server, module_nodes):
    """Routes decide: a node is sent only what its subscribers match."""
    a, b, c = module_nodes
    pub = Client(a.port, "r-pub")
    sub = Client(b.port, "r-sub")
    sub.subscribe("only/b", 1)
    ready(pub, sub)
    before = int(redis_server.cli("XLEN", "mqttd:{n:mc}:inbox") or 0)
    other = Client(c.port, "r-other")
    other.subscribe("else/+", 1)
    for i in range(20):
        pub.publish("only/b", b"x", qos=1)
    assert len(sub.collect(20)) == 20
    assert int(redis_server.cli("XLEN", "mqttd:{n:mc}:inbox")) == before


def test_shared_group_members_on_other_nodes_get_each_message_once_in_total(module_nodes):
    """$share/g/...: one delivery per group cluster-wide, spread over the nodes with members."""
    a, b, c = module_nodes
    pub = Client(a.port, "s-pub")
    members = [Client(b.port, "s-b1"), Client(b.port, "s-b2"), Client(c.port, "s-c1")]
    for m in members:
        m.subscribe("$share/g/jobs/+", 1)
    plain = Client(c.port, "s-plain")
    plain.subscribe("jobs/#", 1)
    ready(pub, plain)
    count = 60
    for i in range(count):
        pub.publish("jobs/x", str(i).encode(), qos=1)
    assert sorted(int(m.payload) for m in plain.collect(count)) == list(range(count))
    got = collections.Counter()
    seen = []
    for m in members:
        for p in m.quiet(1.0):
            got[m.client_id] += 1
            seen.append(int(p.payload))
    assert sorted(seen) == list(range(count))        # each exactly once
    assert got["s-c1"] > 0 and got["s-b1"] + got["s-b2"] > 0   # both nodes served


def test_a_local_group_member_serves_its_node_and_no_copy_goes_elsewhere(module_nodes):
    """With members on the publisher's node the group is served there (prefer local), once."""
    a, b, _c = module_nodes
    pub = Client(a.port, "l-pub")
    local = Client(a.port, "l-local")
    local.subscribe("$share/g/w/#", 1)
    remote = Client(b.port, "l-remote")
    remote.subscribe("$share/g/w/#", 1)
    remote.subscribe("probe/route")
    wait_routed(pub, remote, "probe/route")
    for i in range(30):
        pub.publish("w/1", str(i).encode(), qos=1)
    assert len(local.collect(30)) == 30
    assert remote.quiet(0.5) == []


def test_cross_node_delivery_works_on_a_redis_cluster(redis_cluster, cluster_node_factory):
    """The same basic case with the keys spread over 3 Redis Cluster masters."""
    a = cluster_node_factory(redis_cluster.url, node_id="rcx-a")
    b = cluster_node_factory(redis_cluster.url, node_id="rcx-b")
    pub = Client(a.port, "rcx-pub")
    sub = Client(b.port, "rcx-sub")
    sub.subscribe("rc/+/t", 1)
    ready(pub, sub)
    for i in range(50):
        pub.publish("rc/x/t", str(i).encode(), qos=1)
    assert [int(m.payload) for m in sub.collect(50)] == list(range(50))


@pytest.mark.parametrize("qos, publisher_at", [(2, "new owner"), (1, "third node"),
                                               (2, "old owner")])
def test_a_session_resumed_on_another_node_gets_each_message_once(
        module_nodes, qos, publisher_at):
    """After a resume on another node the old owner still forwards what reaches it on
    the session's filters for a while; a message the publisher's node also sent to the
    new owner's node must not arrive twice (QoS 2 exactly once [MQTT-4.3.3])."""
    from mqttd.codec.packets import Disconnect, Properties
    old, new, third = module_nodes
    tag = f"dup{qos}{publisher_at[0]}"
    props = Properties(session_expiry_interval=600)
    sub = Client(old.port, tag, clean=False, properties=props)
    assert sub.subscribe(f"{tag}/#", qos).reason_codes == (qos,)
    sub.send(Disconnect(0))
    sub.close()
    sub = Client(new.port, tag, clean=False, properties=props)
    assert sub.connack.session_present
    node = {"new owner": new, "third node": third, "old owner": old}[publisher_at]
    pub = Client(node.port, tag + "-pub")
    sub.subscribe(f"probe/{tag}")
    wait_routed(pub, sub, f"probe/{tag}")
    for i in range(20):
        pub.publish(f"{tag}/x", b"%d" % i, qos=qos)
    got = sub.collect(20, timeout=10.0) + sub.quiet(1.0)
    assert sorted(int(p.payload) for p in got) == list(range(20))
    pub.close()
    sub.close()


def test_a_shared_group_loses_nothing_when_one_nodes_only_member_leaves(module_nodes):
    """REVIEW-CLUSTER F11: members on B and C, the one on B leaves mid-stream
    with messages in flight and more on their way to B: every QoS 1 message
    still reaches the group (C's member), none is dropped."""
    a, b, c = module_nodes
    pub = Client(a.port, "f11-pub")
    on_b = Client(b.port, "f11-b")
    on_c = Client(c.port, "f11-c")
    on_b.subscribe("$share/f11/f11/#", 1)
    on_c.subscribe("$share/f11/f11/#", 1)
    on_c.subscribe("probe/f11")
    wait_routed(pub, on_c, "probe/f11")
    on_b.subscribe("probe/f11b")
    wait_routed(pub, on_b, "probe/f11b")
    count = 200
    for i in range(count):
        if i == count // 2:
            on_b.close()     # never acknowledged what it was sent
        pub.publish(f"f11/{i}", str(i).encode(), qos=1)
    got = set()
    deadline = time.monotonic() + 20
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.update(int(p.payload) for p in on_c.collect(1, timeout=2.0))
        except TimeoutError:
            break
    got.update(int(p.payload) for p in on_c.quiet(0.5))
    assert sorted(got) == list(range(count))
