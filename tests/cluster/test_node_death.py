"""kill -9 of a cluster node during a QoS 1 stream: no acknowledged message is lost.

Real processes: redis-server (AOF on) and two mqttd nodes; paho clients.  The
persistent subscriber and the publisher both sit on node 1; node 1 is killed
with SIGKILL in the middle of a 10,000-message QoS 1 stream.  Node 2 reaps it
(adopts the subscriber's session from Redis); the subscriber resumes on
node 2, the publisher resends what was not acknowledged there.  Every message
the publisher got PUBACK for must reach the subscriber; duplicates (QoS 1 is
at least once) are counted and reported.
"""
from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from .conftest import wait_joined
from .polling import wait_for as _wait

pytestmark = [pytest.mark.slow, pytest.mark.interop]

TOTAL = 10_000
KILL_AFTER = 3_000


def _client(client_id, clean):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=clean, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    return client


class Subscriber:
    def __init__(self):
        self.lock = threading.Lock()
        self.received = {}          # id -> times received
        self.connected = threading.Event()
        self.session_present = None

    def run(self, node):
        self.connected.clear()
        client = _client("durable-sub", clean=False)

        def on_connect(c, userdata, flags, reason_code, properties):
            self.session_present = flags.session_present
            c.subscribe("load/#", qos=1)
            self.connected.set()

        def on_message(c, userdata, message):
            n = int(message.payload)
            with self.lock:
                self.received[n] = self.received.get(n, 0) + 1
        client.on_connect = on_connect
        client.on_message = on_message
        client.connect(node.host, node.port, keepalive=30)
        client.loop_start()
        _wait(self.connected.is_set, 15, "the subscriber's CONNACK")
        return client


class Acks:
    """Which of a QoS 1 stream's message numbers were acknowledged (paho's
    on_publish may fire before publish() returned the mid: ``early``)."""

    def __init__(self):
        self.acked = set()
        self.sent = {}
        self.early = set()
        self.lock = threading.Lock()

    def on_publish(self, c, userdata, mid, reason_code, properties):
        with self.lock:
            n = self.sent.pop(mid, None)
            if n is None:
                self.early.add(mid)
            else:
                self.acked.add(n)

    def publisher(self, node, client_id):
        """A clean paho publisher on ``node`` reporting its PUBACKs here, started."""
        client = _client(client_id, clean=True)
        client.on_publish = self.on_publish
        client.connect(node.host, node.port, keepalive=30)
        client.loop_start()
        return client

    def send(self, client, n):
        """Publish message number ``n`` at QoS 1 on ``load/<n % 10>``."""
        # never hold the lock inside paho (its callback thread takes it)
        info = client.publish("load/%d" % (n % 10), str(n).encode(), qos=1)
        with self.lock:
            if info.mid in self.early:
                self.early.discard(info.mid)
                self.acked.add(n)
            else:
                self.sent[info.mid] = n

    def outcome(self, sub):
        """``(missing, duplicates)``: acknowledged numbers ``sub`` never got, and
        how many it got more than once."""
        missing = sorted(set(self.acked) - set(sub.received))
        duplicates = sum(count - 1 for count in sub.received.values())
        return missing, duplicates


@pytest.mark.parametrize("subscriber", ["parked", "online", "remote"])
def test_kill_9_during_qos1_stream_loses_no_acknowledged_message(
        redis_server, cluster_node_factory, subscriber):
    """Every message acknowledged to the publisher reaches the persistent subscriber
    (parked, or online with messages in flight, on the killed node; or parked there while
    the publisher is on the surviving node and goes on through the kill: its messages
    wait in the dead node's inbox for the reaper) after its node is killed with -9;
    duplicates are counted, not forbidden."""
    fast = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "3"]
    n1 = cluster_node_factory(redis_server.url, node_id="victim", extra_args=fast)
    n2 = cluster_node_factory(redis_server.url, node_id="survivor", extra_args=fast)
    sub = Subscriber()
    sub_client = sub.run(n1)
    if subscriber in ("parked", "remote"):
        sub_client.disconnect()      # parked on node 1: its queue fills in Redis
        sub_client.loop_stop()

    acks = Acks()
    acked = acks.acked
    send = acks.send

    def publisher(node):
        return acks.publisher(node, "pub-%d" % node.port)

    def resume_on_survivor():
        # node 2 adopted the session: the subscriber resumes there, session present
        _wait(lambda: b"durable-sub" in redis_server_sessions(redis_server, "survivor"),
              30, "node 2 to adopt the subscriber's session")
        client = sub.run(n2)
        assert sub.session_present
        return client

    if subscriber == "remote":
        # the publisher on the survivor: every message crosses to node 1's inbox
        # until node 2 adopted the session; it never stops
        pub = publisher(n2)
        for n in range(TOTAL):
            send(pub, n)
            if n == KILL_AFTER:
                _wait(lambda: len(acked) >= KILL_AFTER // 2, 60,
                      "half the acks before the kill")
                n1.kill()
        _wait(lambda: len(acked) == TOTAL, 120, "every PUBACK on node 2")
        sub_client = resume_on_survivor()
        _wait(lambda: len(sub.received) >= TOTAL, 120,
              "the subscriber to receive every acknowledged message")
        pub.disconnect()
        sub_client.disconnect()
        missing, duplicates = acks.outcome(sub)
        print(f"\nkill -9 during {TOTAL} QoS 1 messages published on the surviving node to a "
              f"subscriber parked on the killed node: {len(missing)} missing, "
              f"{duplicates} duplicates")
        assert missing == []
        return
    pub = publisher(n1)
    for n in range(TOTAL):
        send(pub, n)
        if n == KILL_AFTER:
            _wait(lambda: len(acked) >= KILL_AFTER // 2, 60, "half the acks before the kill")
            n1.kill()                 # SIGKILL, by its own handle
            break
    pub.loop_stop()
    if subscriber == "online":
        sub_client.loop_stop()       # no reconnects to the dead node
    with acks.lock:
        acked_before = set(acked)
        acks.sent.clear()
        acks.early.clear()
    assert acked_before, "nothing was acknowledged before the kill"

    # node 2 sees node 1 dead (TTL 2 s) and adopts the session; the
    # subscriber comes back on node 2 with its session present
    sub_client = resume_on_survivor()

    # the publisher goes on (on node 2) with everything not acknowledged
    pub = publisher(n2)
    rest = [n for n in range(TOTAL) if n not in acked_before]
    for n in rest:
        send(pub, n)
    _wait(lambda: len(acked) == TOTAL, 120, "every PUBACK on node 2")
    _wait(lambda: len(sub.received) >= TOTAL, 120,
          "the subscriber to receive every acknowledged message")
    pub.disconnect()
    sub_client.disconnect()
    missing, duplicates = acks.outcome(sub)
    print(f"\nkill -9 during {TOTAL} QoS 1 messages to a {subscriber} subscriber: "
          f"{len(acked_before)} acknowledged by the killed node, {len(missing)} missing, "
          f"{duplicates} duplicates")
    assert missing == []


def redis_server_sessions(redis_server, node):
    """The client ids whose session ``node`` owns (its session set)."""
    out = redis_server.cli("SMEMBERS", "mqttd:{n:%s}:sessions" % node)
    return set(line.strip().encode() for line in out.splitlines() if line.strip())


def test_kill_9_and_restart_with_the_same_node_id_loses_no_acknowledged_message(
        redis_server, cluster_node_factory):
    """A node killed with -9 and restarted at once with the same --node-id (systemd
    Restart=, a crashed --workers worker) takes over what its previous incarnation left:
    the persistent sessions Redis says are its own and their routes, and its inbox -- so
    every message acknowledged meanwhile reaches the subscriber that resumes there
    (REVIEW-CLUSTER F14: the restart wrote its routes as 0 filters and acked its inbox
    into no session)."""
    fast = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "3"]
    n1 = cluster_node_factory(redis_server.url, node_id="phoenix", extra_args=fast)
    n2 = cluster_node_factory(redis_server.url, node_id="survivor", extra_args=fast)
    sub = Subscriber()
    sub_client = sub.run(n1)
    sub_client.disconnect()          # parked on node 1: its messages cross to node 1
    sub_client.loop_stop()

    acks = Acks()
    acked = acks.acked
    pub = acks.publisher(n2, "pub-restart")
    restarted = None
    for n in range(TOTAL):
        acks.send(pub, n)
        if n == KILL_AFTER:
            _wait(lambda: len(acked) >= KILL_AFTER // 2, 60, "half the acks before the kill")
            n1.kill()
            # at once, as a supervisor does; it joins once the old alive key expired
            restarted = cluster_node_factory(redis_server.url, node_id="phoenix",
                                             extra_args=fast, joined=False)
    _wait(lambda: len(acked) == TOTAL, 120, "every PUBACK on node 2")
    wait_joined(restarted)
    sub_client = sub.run(restarted)
    assert sub.session_present
    try:
        _wait(lambda: len(sub.received) >= TOTAL, 60,
              "the subscriber to receive every acknowledged message")
    except AssertionError:
        pass                         # counted below
    pub.disconnect()
    pub.loop_stop()
    sub_client.disconnect()
    sub_client.loop_stop()
    missing, duplicates = acks.outcome(sub)
    print(f"\nkill -9 and restart with the same node id during {TOTAL} QoS 1 messages: "
          f"{len(missing)} missing, {duplicates} duplicates")
    assert missing == []
