"""The reaper on a Redis Cluster: a dead node's sessions live on every master.

Session keys are spread by ``{c:<client id>}``, a node's own keys by
``{n:<node id>}``: adopting a dead node's sessions touches many slots, one
script per session (no script crosses a slot).  Three persistent subscribers
whose sessions live on the three different masters are parked on node 1 with
messages queued in Redis and more waiting unread in node 1's inbox; node 1 is
killed with -9; node 2 adopts all three and each resumes there with its session
and every message.
"""
from __future__ import annotations

import time

import pytest

from mqttd.codec.packets import Properties

from .mqttc import Client, wait_routed

pytestmark = [pytest.mark.slow, pytest.mark.interop]

FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "2.5"]
PERSISTENT = Properties(session_expiry_interval=300)


def test_a_dead_nodes_sessions_on_every_master_are_adopted_with_their_messages(
        redis_cluster, cluster_node_factory):
    """Adoption and inbox replay across the shards: each session, whatever master holds
    it, is adopted by the survivor with its queued and its unread inbox messages."""
    masters = redis_cluster.servers
    client_ids = []
    for master in masters:
        for i in range(2000):
            cid = f"rcx-{master.port}-{i}"
            if redis_cluster.server_of("mqttd:{c:%s}:s" % cid) is master:
                client_ids.append(cid)
                break
    assert len(client_ids) == 3
    n1 = cluster_node_factory(redis_cluster.url, node_id="rcx-victim", extra_args=FAST)
    n2 = cluster_node_factory(redis_cluster.url, node_id="rcx-survivor", extra_args=FAST)
    for i, cid in enumerate(client_ids):
        sub = Client(n1.port, cid, clean=False, properties=PERSISTENT)
        sub.subscribe("rcx/%d" % i, 1)
        sub.subscribe("probe/rcx")
        if i == 0:
            pub = Client(n2.port, "rcx-pub")
            wait_routed(pub, sub, "probe/rcx")
        sub.close()                              # parked on node 1
    time.sleep(0.3)
    for i in range(3):                           # queued in Redis by node 1
        assert pub.publish("rcx/%d" % i, b"before-%d" % i, qos=1).reason_code == 0
    time.sleep(0.5)
    n1.kill()
    for i in range(3):                           # unread in node 1's inbox
        assert pub.publish("rcx/%d" % i, b"after-%d" % i, qos=1).reason_code == 0

    def adopted():
        out = masters[0].cli("-c", "SMEMBERS", "mqttd:{n:rcx-survivor}:sessions")
        return set(out.split()) >= set(client_ids)
    deadline = time.monotonic() + 30
    while not adopted():
        assert time.monotonic() < deadline, n2.log_tail(80)
        time.sleep(0.2)
    for i, cid in enumerate(client_ids):
        again = Client(n2.port, cid, clean=False, properties=PERSISTENT)
        assert again.connack.session_present, cid
        got = sorted(m.payload for m in again.collect(2, timeout=15))
        assert got == [b"after-%d" % i, b"before-%d" % i], (cid, got)
        assert again.quiet(0.5) == []
        again.close()
    deadline = time.monotonic() + 15
    while "Reaped node rcx-victim: 3 sessions adopted" not in n2.log_tail(400):
        assert time.monotonic() < deadline, n2.log_tail(80)
        time.sleep(0.2)
