"""Nodes join and leave the cluster in Redis (standalone and Redis Cluster)."""
from __future__ import annotations

import time

import pytest

from .redisproc import cli

pytestmark = pytest.mark.slow


def members(port: int):
    return set(cli(port, "SMEMBERS", "mqttd:nodes").split())


def test_two_nodes_join_and_a_stopped_one_leaves_at_once_on_redis_cluster(
        redis_cluster, cluster_node_factory):
    """Membership keys work across the shards of a Redis Cluster; a clean stop is seen at once."""
    a = cluster_node_factory(redis_cluster.url, node_id="rc-m-a")
    b = cluster_node_factory(redis_cluster.url, node_id="rc-m-b")
    port = redis_cluster.servers[0].port
    assert {"rc-m-a", "rc-m-b"} <= set(cli(port, "-c", "SMEMBERS", "mqttd:nodes").split())
    assert cli(port, "-c", "EXISTS", "mqttd:{n:rc-m-b}:alive").strip() == "1"
    b.stop()
    assert cli(port, "-c", "EXISTS", "mqttd:{n:rc-m-b}:alive").strip() == "0"
    assert "rc-m-b" not in cli(port, "-c", "SMEMBERS", "mqttd:nodes").split()
    assert a.running


def test_a_killed_node_stays_a_member_until_its_heartbeat_expires(
        redis_server, cluster_node_factory):
    """kill -9 cannot leave: the alive key's TTL tells the others it died."""
    node = cluster_node_factory(redis_server.url, node_id="killed",
                                extra_args=["--cluster-heartbeat", "0.2",
                                            "--cluster-node-ttl", "1"])
    node.kill()
    assert "killed" in members(redis_server.port)
    deadline = time.monotonic() + 30   # its TTL is 1 s; the bound is for a loaded machine
    while redis_server.cli("EXISTS", "mqttd:{n:killed}:alive").strip() == "1":
        assert time.monotonic() < deadline, "alive key outlived its TTL"
        time.sleep(0.05)
    assert "killed" in members(redis_server.port)   # the reaper's to remove
