"""kill -9 of the node of one shared-group member while a QoS 1 stream runs:
no acknowledged message is lost while the group has a live member elsewhere
(REVIEW-S9-CLUSTER C6: 127 of 600 acknowledged messages were lost -- every
one picked for the dead node between the kill and its reap).

Real processes: redis-server (AOF on) and three mqttd nodes; paho clients.
Member ``a`` of ``$share/g/...`` sits on node "doomed", member ``b`` on node
"keeper", the publisher on node "hub" (no member there, so the hub sends
every other message to the doomed node).  The doomed node is killed with
SIGKILL in the middle of the stream; the publisher goes on, each message
waited for its PUBACK.  Every acknowledged message must reach ``a`` (before
the kill) or ``b``; duplicates (QoS 1 is at least once) are counted.
"""
from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

pytestmark = [pytest.mark.slow, pytest.mark.interop]

TOTAL = 600
KILL_AT = 100
FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "3"]


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Received:
    """Message numbers received by the group's members (all of them together)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}

    def numbers(self):
        with self.lock:
            return set(self.counts)

    def on_message(self, client, userdata, message):
        n = int(message.payload)
        with self.lock:
            self.counts[n] = self.counts.get(n, 0) + 1


def _member(node, client_id, topic_filter, received, expiry):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    client.on_message = received.on_message
    client.on_subscribe = lambda *args: subscribed.set()
    properties = Properties(PacketTypes.CONNECT)
    if expiry:
        properties.SessionExpiryInterval = expiry
    client.connect(node.host, node.port, keepalive=30, clean_start=True,
                   properties=properties)
    client.loop_start()
    client.subscribe(topic_filter, qos=1)
    _wait(subscribed.is_set, 15, f"the SUBACK of {client_id}")
    return client


@pytest.mark.parametrize("expiry", [0, 600], ids=["clean-member", "persistent-member"])
def test_kill_9_of_a_shared_members_node_loses_no_acknowledged_message(
        redis_server, cluster_node_factory, expiry):
    """Every message the publisher got PUBACK for reaches a member of the group --
    those picked for the killed node (in its inbox, or sent there before the
    others saw it dead) are handed to the member on the live node; the killed
    node's member is a clean session or a persistent one (whose reaped session
    then holds no group message the live member could take)."""
    doomed = cluster_node_factory(redis_server.url, node_id="doomed", extra_args=FAST)
    keeper = cluster_node_factory(redis_server.url, node_id="keeper", extra_args=FAST)
    hub = cluster_node_factory(redis_server.url, node_id="hub", extra_args=FAST)
    received = Received()
    group = "$share/g/jobs/#"
    a = _member(doomed, "member-a", group, received, expiry)
    b = _member(keeper, "member-b", group, received, expiry)
    time.sleep(0.5)       # the hub's route cache has both nodes' group routes

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5)
    pub.connect(hub.host, hub.port, keepalive=30)
    pub.loop_start()
    acked = set()
    started = time.monotonic()
    try:
        for n in range(TOTAL):
            if n == KILL_AT:
                # what was acknowledged so far has arrived (a message written
                # to a's socket at the kill would go with that clean-start
                # connection: docs/cluster.rst, not what this test is about)
                _wait(lambda: acked <= received.numbers(), 15, "the messages before the kill")
                a.loop_stop()             # its node is gone: no reconnect there
                doomed.kill()             # SIGKILL, by its own handle
            info = pub.publish("jobs/%d" % (n % 7), str(n).encode(), qos=1)
            try:
                info.wait_for_publish(15)
            except (RuntimeError, ValueError):
                continue
            if info.is_published():
                acked.add(n)
            time.sleep(0.01)
        _wait(lambda: acked <= received.numbers(), 30,
              "every acknowledged message at a member")
    except AssertionError:
        pass                              # counted below
    finally:
        pub.disconnect()
        pub.loop_stop()
        b.disconnect()
        b.loop_stop()
    with received.lock:
        got = dict(received.counts)
    missing = sorted(acked - set(got))
    duplicates = sum(count - 1 for count in got.values())
    print(f"\nkill -9 of a shared member's node ({'persistent' if expiry else 'clean'} "
          f"members) during {TOTAL} QoS 1 messages: {len(acked)} acknowledged, "
          f"{len(missing)} missing, {duplicates} duplicates, "
          f"{time.monotonic() - started:.1f} s")
    assert len(acked) == TOTAL
    assert missing == [], f"{len(missing)} acknowledged messages lost: {missing[:20]}"
