"""A bridge on a cluster node: its local session is the node's, not the cluster's.

Real processes: redis-server, two mqttd cluster nodes (the bridge on the first,
with a file store), Debian's mosquitto as the remote.  A message published on
the other node crosses to the bridge's node and over the bridge; the bridge's
local session is never in Redis (nobody claims or adopts it); while the remote
is down its queue is in the bridge node's own store and survives a restart of
that node.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.bridge.procs import Client, Mosquitto, wait_for

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def _config(path: Path, port: int) -> str:
    path.write_text(f'''
[[bridge]]
connection = "up"
address = "127.0.0.1:{port}"
remote_clientid = "up"
topic = ['q/# out 1']
keepalive_interval = 5
restart_timeout = "0.5 1"
''')
    return str(path)


def test_a_bridge_on_a_cluster_node_keeps_its_session_local_and_works(
        tmp_path, redis_server, cluster_node_factory):
    """Cross-node messages reach the remote through the bridge; the bridge's local session
    stays out of Redis; queued while the remote is down, kept over a restart of its node
    (its own --persistence store), delivered in order when the remote is back."""
    mosq = Mosquitto(tmp_path / "mosq", persistent=True).start()
    stack = [mosq]
    try:
        bridged = cluster_node_factory(
            redis_server.url, node_id="bridged",
            extra_args=["--config", _config(tmp_path / "bridge.toml", mosq.port)],
            persistence=f"file:{tmp_path / 'bridged-data'}")
        other = cluster_node_factory(redis_server.url, node_id="plain")
        wait_for(lambda: "New bridge connected" in mosq.log(), 15, what="bridge up")
        far = Client(mosq.port, "far-sub", clean=False)
        far.subscribe("q/#", qos=1)
        pub = Client(other.port, "pub-on-plain")
        stack.append(pub)
        # the bridge's route reaches the other node's cache: probe until one crosses
        deadline = time.monotonic() + 15
        while True:
            pub.publish("q/probe", b"probe", 1)
            try:
                far.collect(1, 0.5)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        pub.publish("q/live", b"live", 1)
        got = [m for m in far.collect(1, 10) if m[1] != b"probe"]
        assert [(t, p) for t, p, _q, _r in got] == [("q/live", b"live")]
        far.close()
        assert redis_server.cli("EXISTS", "mqttd:{c:local.up}:s").strip() == "0"
        assert redis_server.cli("GET", "mqttd:{c:local.up}:local").strip() == "bridged"
        sessions = redis_server.cli("SMEMBERS", "mqttd:{n:bridged}:sessions")
        assert "local.up" not in sessions
        # the remote goes down: QoS 1 messages queue in the bridge's local session
        mosq.stop()
        for n in range(20):
            pub.publish("q/n", str(n).encode(), 1)
        # the bridge's node restarts: the queue comes back from its own store
        bridged.stop()
        bridged.start()
        mosq.start()
        far = Client(mosq.port, "far-sub", clean=False)
        stack.append(far)
        got = far.collect(20, 30)
        assert [p for _t, p, _q, _r in got if p != b"probe"] == [
            str(n).encode() for n in range(20)]
        assert redis_server.cli("EXISTS", "mqttd:{c:local.up}:s").strip() == "0"
    finally:
        for thing in reversed(stack):
            try:
                (thing.close if isinstance(thing, Client) else thing.stop)()
            except Exception:
                pass


def test_the_same_bridge_on_two_cluster_nodes_is_reported(
        tmp_path, redis_server, cluster_node_factory):
    """A bridge configured on two nodes would forward every message twice: the second
    node logs one error line naming the first."""
    mosq = Mosquitto(tmp_path / "mosq").start()
    try:
        config = _config(tmp_path / "bridge.toml", mosq.port)
        cluster_node_factory(redis_server.url, node_id="twin-a", extra_args=["--config", config])
        twin = cluster_node_factory(redis_server.url, node_id="twin-b",
                                    extra_args=["--config", config])
        wait_for(lambda: "also runs on node twin-a" in twin.log_tail(), 10,
                 what="the twin bridge reported")
    finally:
        mosq.stop()
