"""``--cluster-wait-replicas N``: nothing is acknowledged before N replicas
have it -- session writes and the cross-node hand-off of QoS 1/2 messages,
on a standalone primary with replicas and on Redis Cluster (one ``WAIT`` per
primary written to, on the connection that carried the writes)."""
from __future__ import annotations

import subprocess
import time

import pytest

from mqttd.cluster.backend import Backend, RedisUnavailable

from .conftest import wait
from .mqttc import Client, wait_routed
from .redisproc import RedisServer, find

pytestmark = pytest.mark.slow


def wait_online_replica(primary: RedisServer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while "state=online" not in primary.cli("INFO", "replication"):
        if time.monotonic() > deadline:
            raise AssertionError(f"no replica online:\n{primary.cli('INFO', 'replication')}")
        time.sleep(0.05)


def test_a_pipeline_counts_only_when_the_replicas_have_it(tmp_path, aio):
    """WAIT ends the pipeline on its own connection; too few replicas is an outage."""
    primary = RedisServer(tmp_path / "p").start()
    replica = RedisServer(tmp_path / "r", extra_args=[
        "--replicaof", "127.0.0.1", str(primary.port)]).start()
    try:
        wait_online_replica(primary)

        async def run():
            backend = Backend(primary.url)
            try:
                replies = await wait(backend.pipeline(
                    [("SET", "w:a", "1"), ("INCR", "w:n")], wait_replicas=1))
                assert replies == [True, 1]
                with pytest.raises(RedisUnavailable, match="only 1 of 2 replicas"):
                    await wait(backend.pipeline([("INCR", "w:n")], wait_replicas=2,
                                                wait_timeout=100))
            finally:
                await wait(backend.close())
        aio(run)
        assert replica.cli("GET", "w:n").strip() == "2"
    finally:
        replica.stop()
        primary.stop()


def _slot_owner(cluster, key: str) -> RedisServer:
    slot = int(cluster.servers[0].cli("CLUSTER", "KEYSLOT", key))
    for line in cluster.servers[0].cli("CLUSTER", "NODES").splitlines():
        fields = line.split()
        if "master" not in fields[2]:
            continue
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for span in fields[8:]:
            low, _, high = span.partition("-")
            if int(low) <= slot <= int(high or low):
                return next(s for s in cluster.servers if s.port == port)
    raise AssertionError(f"no primary serves slot {slot}")


def test_on_redis_cluster_each_primary_written_waits_for_its_replicas(
        redis_cluster, tmp_path, aio):
    """Redis Cluster: one WAIT per primary, after that primary's writes -- a
    primary without a replica refuses the batch, one with a replica takes it."""
    owner = _slot_owner(redis_cluster, "{wa}:x")
    other_key = next(k for k in ("{wb}:x", "{wc}:x", "{wd}:x", "{we}:x", "{wf}:x")
                     if _slot_owner(redis_cluster, k) is not owner)

    async def no_replica_yet():
        backend = Backend(redis_cluster.url)
        try:
            with pytest.raises(RedisUnavailable, match="only 0 of 1 replicas"):
                await wait(backend.pipeline([("INCR", "{wa}:x")], wait_replicas=1,
                                            wait_timeout=100))
        finally:
            await wait(backend.close())
    aio(no_replica_yet)

    replica = RedisServer(tmp_path / "cluster-replica", cluster=True).start()
    try:
        node_id = owner.cli("CLUSTER", "MYID").strip()
        out = subprocess.run(
            [find("redis-cli"), "--cluster", "add-node", f"127.0.0.1:{replica.port}",
             f"127.0.0.1:{owner.port}", "--cluster-slave", "--cluster-master-id", node_id],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        wait_online_replica(owner)

        async def with_replica():
            backend = Backend(redis_cluster.url)
            try:
                replies = await wait(backend.pipeline(
                    [("INCR", "{wa}:x"), ("XADD", "{wa}:s", "*", "e", b"x")],
                    wait_replicas=1, wait_timeout=2000))
                assert replies[0] == 2
                # a batch also touching a primary without replicas is refused
                with pytest.raises(RedisUnavailable, match="only 0 of 1 replicas"):
                    await wait(backend.pipeline(
                        [("INCR", "{wa}:x"), ("INCR", other_key)], wait_replicas=1,
                        wait_timeout=100))
            finally:
                await wait(backend.close())
        aio(with_replica)
        assert replica.cli("-c", "XLEN", "{wa}:s").strip() == "1"
    finally:
        # leave the module's cluster as it was: forget the replica everywhere
        replica_id = replica.cli("CLUSTER", "MYID").strip()
        replica.stop()
        for server in redis_cluster.servers:
            try:
                server.cli("CLUSTER", "FORGET", replica_id)
            except RuntimeError:
                pass


def test_a_cross_node_qos1_message_is_not_acknowledged_without_the_replicas(
        redis_server, cluster_node_factory):
    """The hand-off to another node's inbox waits for WAIT too: with no replica
    a QoS 1 PUBLISH that must cross nodes gets no PUBACK (the publisher is
    disconnected and re-sends), while one delivered locally only is acknowledged."""
    args = ["--cluster-wait-replicas", "1"]
    a = cluster_node_factory(redis_server.url, node_id="wr-a", extra_args=args)
    b = cluster_node_factory(redis_server.url, node_id="wr-b", extra_args=args)
    local = Client(a.port, "wr-local")
    local.subscribe("wr/local", 1)
    pub = Client(a.port, "wr-pub")
    assert pub.publish("wr/local", b"x", qos=1).reason_code == 0
    (m,) = local.collect(1)
    sub = Client(b.port, "wr-sub")
    sub.subscribe("wr/remote", 1)
    sub.subscribe("probe/route")
    wait_routed(pub, sub)
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        ack = pub.publish("wr/remote", b"y", qos=1, timeout=5)
        # an error reason code is no acknowledgement either
        assert ack.reason_code >= 0x80
        raise ConnectionError(f"negative PUBACK {ack.reason_code:#x}")
