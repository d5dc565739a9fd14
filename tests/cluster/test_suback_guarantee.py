"""What a SUBACK and an UNSUBACK guarantee across real nodes (REVIEW-CLUSTER F1).

Once a client has its SUBACK on node B, a message published afterwards on
node A reaches it -- also to a wildcard filter, a shared group whose only
member it is, and for a retained message published on A before the SUBSCRIBE
was acknowledged; once it has its UNSUBACK, nothing published afterwards
does.  No probe, no wait: the publish follows the acknowledgement at once, as
an application that learned of the subscription would.
"""
from __future__ import annotations

import signal
import time

import pytest

from mqttd.codec.packets import Puback

from .mqttc import Client, wait_routed

pytestmark = pytest.mark.slow

TRIALS = 15


def test_a_message_published_on_another_node_right_after_the_suback_arrives(module_nodes):
    """The F1 example (12 of 30 lost before): subscribe on B, publish QoS 1 on A
    the moment the SUBACK is there, for fresh exact and wildcard filters."""
    a, b, _c = module_nodes
    pub = Client(a.port, "f1-pub")
    lost = []
    for i in range(TRIALS):
        sub = Client(b.port, f"f1-sub-{i}")
        topic_filter = f"f1/exact/{i}" if i % 2 else f"f1/wild/{i}/+"
        topic = f"f1/exact/{i}" if i % 2 else f"f1/wild/{i}/x"
        assert sub.subscribe(topic_filter, 1).reason_codes == (1,)
        assert pub.publish(topic, b"after-suback", qos=1).reason_code == 0
        try:
            (message,) = sub.collect(1, timeout=5.0)
            assert message.payload == b"after-suback"
        except TimeoutError:
            lost.append(topic_filter)
        sub.close()
    assert lost == []


def test_the_only_member_of_a_shared_group_gets_a_message_published_right_after_its_suback(
        module_nodes):
    """A group whose only member just subscribed on B is served from A at once."""
    a, b, _c = module_nodes
    pub = Client(a.port, "f1s-pub")
    for i in range(5):
        member = Client(b.port, f"f1s-member-{i}")
        assert member.subscribe(f"$share/g{i}/f1s/{i}", 1).reason_codes == (1,)
        assert pub.publish(f"f1s/{i}", b"to-group", qos=1).reason_code == 0
        (message,) = member.collect(1, timeout=5.0)
        assert message.payload == b"to-group"
        member.close()


def test_nothing_published_after_the_unsuback_is_delivered(module_nodes):
    """The mirror [MQTT-3.10.4-2]: the receiving node matches against its own
    subscriptions, so a node whose cache still routes there delivers nothing."""
    a, b, _c = module_nodes
    pub = Client(a.port, "f1u-pub")
    sub = Client(b.port, "f1u-sub")
    sub.subscribe("f1u/keep", 1)
    for i in range(TRIALS):
        topic = f"f1u/{i}"
        sub.subscribe(topic, 1)
        pub.publish(topic, b"while-subscribed", qos=1)
        assert [m.payload for m in sub.collect(1, timeout=5.0)] == [b"while-subscribed"]
        sub.unsubscribe(topic)
        pub.publish(topic, b"after-unsuback", qos=1)
    pub.publish("f1u/keep", b"marker", qos=1)     # same publisher and node: arrives after
    assert [m.payload for m in sub.collect(1, timeout=5.0)] == [b"marker"]
    assert sub.quiet(0.3) == []


def test_a_retained_message_acknowledged_on_one_node_is_replayed_to_a_subscribe_on_another(
        module_nodes):
    """The retained side: PUBACK of a retained PUBLISH on A, then SUBSCRIBE on B
    at once: B's lookup finds it."""
    a, b, _c = module_nodes
    pub = Client(a.port, "f1r-pub")
    for i in range(5):
        topic = f"f1r/{i}/state"
        assert pub.publish(topic, b"retained-%d" % i, qos=1, retain=True).reason_code < 0x80
        sub = Client(b.port, f"f1r-sub-{i}")
        sub.subscribe(f"f1r/{i}/+", 1)
        (message,) = sub.collect(1, timeout=5.0)
        assert (message.payload, message.retain) == (b"retained-%d" % i, True)
        sub.close()
        pub.publish(topic, b"", qos=1, retain=True)


def test_a_node_stalled_through_a_suback_elsewhere_routes_its_next_message_by_the_new_route(
        redis_server, cluster_node_factory):
    """A's event loop stops (SIGSTOP) while a client subscribes on B: B's SUBACK
    goes out after the acknowledgement bound (3 s) without A's.  A resumes
    with the PUBLISH sent after that SUBACK already waiting in its socket,
    next to its feed read: its cache is stale, so it holds the message and
    routes it by the caught-up cache -- delivered, not lost."""
    # a TTL far above the stall: A must not fence itself (it would refuse the PUBLISH)
    slow_fence = ("--cluster-node-ttl", "12")
    a = cluster_node_factory(redis_server.url, node_id="stall-a", extra_args=slow_fence)
    b = cluster_node_factory(redis_server.url, node_id="stall-b", extra_args=slow_fence)
    pub = Client(a.port, "stall-pub")
    watcher = Client(b.port, "stall-watch")
    watcher.subscribe("probe/stall")
    wait_routed(pub, watcher, "probe/stall")
    sub = Client(b.port, "stall-sub")
    a.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert sub.subscribe("stall/t", 1).reason_codes == (1,)
        waited = time.monotonic() - started
        pid = pub.publish("stall/t", b"after-suback", qos=1, wait=False)
    finally:
        a.signal(signal.SIGCONT)
    assert waited >= 2.5          # B waited for A's acknowledgement, then gave up
    (message,) = sub.collect(1, timeout=10.0)
    assert message.payload == b"after-suback"
    assert pub._wait_for(Puback, pid).reason_code == 0
    assert "did not apply new routes" in b.log_tail()
