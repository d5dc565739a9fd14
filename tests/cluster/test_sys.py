"""$SYS per node and cluster-wide counts, and the cluster's metrics."""
from __future__ import annotations

import time
import urllib.request

import pytest

from .mqttc import Client

pytestmark = pytest.mark.slow


def latest(client: Client, topic: str, predicate, timeout: float = 20.0) -> str:
    """The payload of the latest message on ``topic`` satisfying ``predicate`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for packet in client.quiet(0.3):
            value = packet.payload.decode()
            if packet.topic == topic and predicate(value):
                return value
    raise AssertionError(f"no {topic} satisfying the check within {timeout} s")


def test_each_node_publishes_its_own_and_the_cluster_wide_counts(
        redis_server, cluster_node_factory):
    """$SYS/broker/cluster/clients/connected sums every live node; node/id says which node."""
    a = cluster_node_factory(redis_server.url, node_id="sys-a",
                             extra_args=["--sys-interval", "0.5", "--metrics-listen",
                                         "tcp:0:interface=127.0.0.1"])
    b = cluster_node_factory(redis_server.url, node_id="sys-b",
                             extra_args=["--sys-interval", "0.5"])
    watcher = Client(a.port, "sys-watch")
    others = [Client(b.port, f"sys-b-{i}") for i in range(3)]
    watcher.subscribe("$SYS/broker/cluster/#")
    assert latest(watcher, "$SYS/broker/cluster/node/id", lambda v: True) == "sys-a"
    latest(watcher, "$SYS/broker/cluster/nodes", lambda v: v == "2")
    latest(watcher, "$SYS/broker/cluster/clients/connected", lambda v: v == "4")
    http = a.ready["http"]["metrics"][0]["port"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10).read()
    text = body.decode()
    assert "mqttd_cluster_nodes 2.0" in text and "mqttd_cluster_fenced 0.0" in text
    for client in others:
        client.close()


def test_retained_views_and_member_figures_are_cluster_wide(redis_server, cluster_node_factory):
    """Retained messages taken by node b are counted, listed and explained on node a
    ($SYS/broker/retained messages/count, $SYS/broker/cluster/retained/count, the admin
    API's info, /api/retained, why, the metrics), and node a's $SYS shows node b's own
    figures under $SYS/broker/cluster/members/sys-rb/."""
    import json
    a = cluster_node_factory(redis_server.url, node_id="sys-ra",
                             extra_args=["--sys-interval", "0.5", "--admin-listen",
                                         "tcp:0:interface=127.0.0.1", "--metrics-listen",
                                         "tcp:0:interface=127.0.0.1"])
    b = cluster_node_factory(redis_server.url, node_id="sys-rb",
                             extra_args=["--sys-interval", "0.5"])
    publisher = Client(b.port, "sys-rb-pub")
    for i in range(3):
        publisher.publish(f"kept/{i}", b"v%d" % i, qos=1, retain=True)
    watcher = Client(a.port, "sys-ra-watch")
    watcher.subscribe("$SYS/broker/#")
    latest(watcher, "$SYS/broker/cluster/retained/count", lambda v: v == "3")
    latest(watcher, "$SYS/broker/retained messages/count", lambda v: v == "3")
    latest(watcher, "$SYS/broker/cluster/members/sys-rb/clients/connected", lambda v: v == "1")
    latest(watcher, "$SYS/broker/cluster/members/sys-ra/clients/connected", lambda v: v == "1")
    api = a.ready["http"]["admin"][0]["port"]

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{api}{path}", timeout=10) as answer:
            return json.loads(answer.read())
    assert get("/api/info")["retained"] == 3
    listed = get("/api/retained?prefix=kept/")
    assert [item["topic"] for item in listed["topics"]] == ["kept/0", "kept/1", "kept/2"]
    why = get("/api/why?client=sys-ra-watch&topic=kept/1")
    # what the message holds: topic "kept/1" (6) + payload "v1" (2), as every byte figure
    assert why["retained"]["bytes"] == 8
    metrics = a.ready["http"]["metrics"][0]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics",
                                  timeout=10).read().decode()
    assert "mqttd_retained_messages 3.0" in text
    publisher.close()
    watcher.close()
