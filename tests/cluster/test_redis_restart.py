"""A Redis restart (AOF ``appendfsync always``) longer than the nodes' TTL during a
QoS 1 stream: no acknowledged message is lost, and every node is a member after.

Real processes: redis-server and two mqttd nodes; paho clients that reconnect by
themselves.  Redis goes away for longer than the TTL, so every alive key has expired
when it comes back: the nodes fence, re-join as new incarnations and reap each other's
previous incarnations while the subscriber resumes (REVIEW-CLUSTER F7: 50 acknowledged
messages lost in 1 of 3 runs; a reaper of a node id that had re-joined replayed -- and
acknowledged -- the live node's inbox into the sessions it adopted only).  With
``appendfsync always`` even a crash of Redis (SIGKILL) loses nothing it acknowledged.
"""
from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from .polling import wait_for
from .redisproc import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.interop]

TOTAL = 3_000
STOP_AFTER = 800
FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "2.5"]


def _wait(predicate, timeout, what):
    wait_for(predicate, timeout, what, interval=0.05)


class Publisher:
    """A paho QoS 1 publisher that records which numbers were acknowledged."""

    def __init__(self, node, client_id):
        self.acked = set()
        self._sent = {}
        self._early = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(50)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.on_publish = self._on_publish
        self.client.connect(node.host, node.port, keepalive=30)
        self.client.loop_start()

    def _on_publish(self, c, userdata, mid, reason_code, properties):
        with self._lock:
            n = self._sent.pop(mid, None)
            if n is None:
                self._early.add(mid)
            elif not reason_code.is_failure:
                self.acked.add(n)

    def send(self, n):
        info = self.client.publish("rr/%d" % (n % 10), str(n).encode(), qos=1)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.acked.add(n)
            else:
                self._sent[info.mid] = n

    def inflight(self):
        with self._lock:
            return len(self._sent)

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_redis_restart_longer_than_the_ttl_loses_no_acknowledged_message(
        tmp_path, cluster_node_factory, how):
    """Redis stops (cleanly, or crashes) for longer than the TTL during a 3,000-message
    QoS 1 stream from node 2 to a persistent subscriber on node 1; with AOF
    appendfsync always every message the publisher got PUBACK for arrives, and both
    nodes are members of the cluster afterwards."""
    redis = RedisServer(tmp_path / "redis", extra_args=["--appendfsync", "always"]).start()
    try:
        n1 = cluster_node_factory(redis.url, node_id="rr-1", extra_args=FAST)
        n2 = cluster_node_factory(redis.url, node_id="rr-2", extra_args=FAST)
        received = {}
        lock = threading.Lock()
        subscribed = threading.Event()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rr-sub",
                          clean_session=False, protocol=mqtt.MQTTv311)
        sub.reconnect_delay_set(0.2, 1.0)

        def on_connect(c, userdata, flags, reason_code, properties):
            if not reason_code.is_failure:
                c.subscribe("rr/#", qos=1)

        def on_message(c, userdata, message):
            with lock:
                n = int(message.payload)
                received[n] = received.get(n, 0) + 1
        sub.on_connect = on_connect
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.on_message = on_message
        sub.connect(n1.host, n1.port, keepalive=30)
        sub.loop_start()
        _wait(subscribed.is_set, 15, "the SUBACK")
        pub = Publisher(n2, "rr-pub")
        outage = None
        for n in range(TOTAL):
            pub.send(n)
            _wait(lambda: pub.inflight() < 100, 60, "the publisher's window")
            if n == STOP_AFTER:
                _wait(lambda: len(pub.acked) >= STOP_AFTER // 2, 30, "acks before the stop")
                redis.kill() if how == "SIGKILL" else redis.stop()
                outage = threading.Timer(4.0, redis.start, kwargs={"keep_port": True})
                outage.start()
        outage.join()
        # what was not acknowledged is sent again on a new connection (bounded)
        for _round in range(5):
            try:
                _wait(lambda: pub.inflight() == 0, 20, "the publisher's acknowledgements")
            except AssertionError:
                pass
            if len(pub.acked) == TOTAL:
                break
            acked = set(pub.acked)
            pub.stop()
            pub = Publisher(n2, "rr-pub-%d" % _round)
            pub.acked |= acked
            for n in range(TOTAL):
                if n not in acked:
                    pub.send(n)
                    _wait(lambda: pub.inflight() < 100, 60, "the publisher's window")
        assert len(pub.acked) == TOTAL
        try:
            _wait(lambda: len(received) >= TOTAL, 60, "every acknowledged message")
        except AssertionError:
            pass     # counted below
        pub.stop()
        sub.disconnect()
        sub.loop_stop()
        missing = sorted(pub.acked - set(received))
        duplicates = sum(count - 1 for count in received.values())
        print(f"\nRedis {how} + restart after 4 s during {TOTAL} QoS 1 messages: "
              f"{len(missing)} missing, {duplicates} duplicates")
        assert missing == [], missing[:20]
        # the outage outlasted the TTL: the nodes re-joined as new incarnations
        logs = n1.log_tail(2000) + n2.log_tail(2000)
        assert "lost its membership" in logs and "Reaped node" in logs
        # both nodes are members (a reaper of an old incarnation removed none)
        _wait(lambda: sorted(redis.cli("SMEMBERS", "mqttd:nodes").split()) ==
              ["rr-1", "rr-2"], 15, "both nodes members")
    finally:
        redis.stop()
