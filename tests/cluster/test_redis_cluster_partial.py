"""Redis Cluster with one master down: only what lives there is unavailable.

A 3-master Redis Cluster (``cluster-require-full-coverage no``, as
docs/cluster.rst requires) and mqttd nodes whose own keys (heartbeat, inbox,
routes) live on the healthy masters.  One master is stopped for longer than
the nodes' TTL (REVIEW-CLUSTER F17: a node whose keys were all on healthy
masters fenced itself, and another node reaped it): those nodes must keep
serving -- a client whose session lives on a healthy master connects, one
whose session lives on the stopped master is refused 0x88 -- and no node
reaps a live one.
"""
from __future__ import annotations

import time

import pytest

from .conftest import wait_joined
from .mqttc import Client, wait_routed
from .redisproc import RedisCluster
from .test_redis_trouble import connack_code, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.interop]

FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "2.5"]


def _pick(cluster, pattern, key_of, want, avoid=(), count=1):
    """``count`` names ``pattern % i`` whose key (``key_of(name)``) is served by a
    master of ``want`` (a set of servers), none in ``avoid``."""
    found = []
    for i in range(2000):
        name = pattern % i
        if name in avoid:
            continue
        if cluster.server_of(key_of(name)) in want:
            found.append(name)
            if len(found) == count:
                return found
    raise AssertionError(f"no name like {pattern!r} on the wanted masters")


@pytest.fixture
def partial_cluster(tmp_path):
    """A 3-master Redis Cluster that serves the slots of its healthy masters while one
    master is down (``cluster-require-full-coverage no``), of this test only."""
    cluster = RedisCluster(tmp_path / "rc", extra_args=[
        "--cluster-require-full-coverage", "no"]).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_one_master_down_fences_only_the_nodes_whose_keys_live_there(
        partial_cluster, cluster_node_factory):
    """Nodes whose heartbeat, inbox and routes are on healthy masters keep serving while
    another master is down for 3 TTLs (sessions on the down master are refused 0x88,
    the others accepted); no live node is reaped, and every node is a member after."""
    cluster = partial_cluster
    shared = {cluster.server_of("mqttd:nodes"), cluster.server_of("mqttd:routefeed")}
    victim = next(s for s in cluster.servers if s not in shared)
    healthy = [s for s in cluster.servers if s is not victim]
    ids = _pick(cluster, "pc-%d", lambda n: "mqttd:{n:%s}:alive" % n, healthy, count=2)
    a = cluster_node_factory(cluster.url, node_id=ids[0], extra_args=FAST)
    b = cluster_node_factory(cluster.url, node_id=ids[1], extra_args=FAST)
    ok_ids = _pick(cluster, "pc-ok-%d", lambda c: "mqttd:{c:%s}:s" % c, healthy, count=4)
    down_ids = _pick(cluster, "pc-down-%d", lambda c: "mqttd:{c:%s}:s" % c, [victim],
                     count=2)
    sub = Client(b.port, ok_ids[0])
    sub.subscribe("pc/#", 1)
    sub.subscribe("probe/route")
    pub = Client(a.port, ok_ids[1])
    wait_routed(pub, sub)

    victim.stop()
    try:
        stopped = time.monotonic()
        # 3 TTLs: a node that wrongly fenced (after 2 s) would be reaped meanwhile
        probes = 0
        while time.monotonic() - stopped < 7.5:
            for node, cid in ((a, ok_ids[2]), (b, ok_ids[3])):
                assert connack_code(node.port, 5, cid) == 0, node.log_tail(60)
            for node, cid in ((a, down_ids[0]), (b, down_ids[1])):
                assert connack_code(node.port, 5, cid) == 0x88, node.log_tail(60)
            # cross-node traffic between sessions on healthy masters goes on
            probes += 1
            payload = b"during-%d" % probes
            assert pub.publish("pc/x", payload, qos=1).reason_code == 0
            assert [m.payload for m in sub.collect(1, timeout=10)] == [payload]
            time.sleep(0.3)
    finally:
        victim.start(keep_port=True)
    cluster.wait_ok()
    time.sleep(2.0)
    for node in (a, b):
        log = node.log_tail(400)
        assert "fences itself" not in log, log
        assert "Reaped node" not in log and "is dead; reaping" not in log, log
    members = sorted(cluster.servers[0].cli("-c", "SMEMBERS", "mqttd:nodes").split())
    assert members == sorted(ids)
    wait_joined(a)


def test_redis_cluster_requiring_full_coverage_is_warned_about(redis_cluster, aio):
    """REVIEW-CLUSTER F17: with Redis's default cluster-require-full-coverage yes, one
    master down stops every master and fences every node; a node says so at join (one
    WARN per master) and not once the setting is no."""
    from mqttd.cluster.backend import Backend
    from mqttd.cluster.service import check_redis_settings

    from .conftest import wait

    async def run():
        backend = Backend(redis_cluster.url)
        try:
            found = await wait(check_redis_settings(backend))
            assert [kind for kind, _server in found] == [
                "cluster-require-full-coverage"] * 3
            for server in redis_cluster.servers:
                server.cli("CONFIG", "SET", "cluster-require-full-coverage", "no")
            assert await wait(check_redis_settings(backend)) == []
        finally:
            for server in redis_cluster.servers:
                server.cli("CONFIG", "SET", "cluster-require-full-coverage", "yes")
            await wait(backend.close())
    aio(run)
