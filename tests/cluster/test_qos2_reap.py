"""Exactly-once QoS 2 through a reap: a node dies (kill -9) while a QoS 2 stream
flows to a persistent subscriber online on it; a surviving node adopts the
session and replays the dead node's unacknowledged inbox.  What the subscriber
already received (PUBREC sent, maybe PUBCOMP too) must not come again as a new
message -- a re-send of an in-flight one with DUP and the same packet id, or a
PUBREL, is what the spec allows [MQTT-4.3.3-9, MQTT-4.3.3-10, MQTT-4.4.0-1]."""
from __future__ import annotations

import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from mqttd.blockingclient import BlockingClient
from mqttd.codec.packets import (
    Publish, Pubcomp, Pubrec, Pubrel, Suback, Subscribe, Subscription)

from .test_node_death import redis_server_sessions

pytestmark = [pytest.mark.slow, pytest.mark.interop]

FAST = ["--cluster-heartbeat", "0.5", "--cluster-node-ttl", "3"]
TOTAL = 2000
KILL_AT = 400


class Qos2Receiver:
    """A persistent QoS 2 subscriber that keeps its side of the flows across
    connections [MQTT-4.3.3]: a PUBLISH under a packet id it holds (PUBREC sent,
    no PUBREL yet) is a re-send, not a message; every other PUBLISH is a delivery."""

    def __init__(self, client_id, topic):
        self.client_id = client_id
        self.topic = topic
        self.held = set()           # packet ids PUBREC'd, waiting for PUBREL
        self.deliveries = {}        # payload -> times delivered as a new message
        self.client = None
        self.probes = 0             # QoS 0 route probes received

    def connect(self, port, clean):
        self.client = BlockingClient(port, self.client_id, clean=clean, level=4, timeout=10)
        self.client.send(Subscribe(1, (Subscription(self.topic, 2),)))
        return self.client.connack.session_present

    def wait_suback(self):
        while True:
            if isinstance(self._one(10), Suback):
                return

    def _one(self, timeout):
        packet = self.client.next_packet(timeout=timeout)
        if isinstance(packet, Publish) and packet.qos == 2:
            if packet.packet_id not in self.held:
                self.held.add(packet.packet_id)
                self.deliveries[packet.payload] = self.deliveries.get(packet.payload, 0) + 1
            self.client.send(Pubrec(packet.packet_id))
        elif isinstance(packet, Publish):
            self.probes += 1
        elif isinstance(packet, Pubrel):
            self.held.discard(packet.packet_id)
            self.client.send(Pubcomp(packet.packet_id))
        return packet

    def run_until(self, predicate, timeout):
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self._one(min(left, 1.0))
            except socket.timeout:
                continue
        return True


def _ranges(numbers):
    """``[(first, last), ...]`` of the runs in sorted ``numbers`` (for the report)."""
    runs = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return [tuple(run) for run in runs]


def test_a_reap_does_not_deliver_a_received_qos2_message_again(
        redis_server, cluster_node_factory):
    """kill -9 of the subscriber's node mid-stream: the adopted session and the replayed
    inbox must not hand a QoS 2 message the subscriber already has to it again."""
    victim = cluster_node_factory(redis_server.url, node_id="q2victim", extra_args=FAST)
    survivor = cluster_node_factory(redis_server.url, node_id="q2survivor", extra_args=FAST)
    sub = Qos2Receiver("q2reap-sub", "q2reap/#")
    sub.connect(victim.port, clean=False)
    sub.wait_suback()

    acked = set()
    lock = threading.Lock()
    sent = {}
    early = set()

    def on_publish(c, userdata, mid, reason_code, properties):
        with lock:
            n = sent.pop(mid, None)
            if n is None:
                early.add(mid)
            else:
                acked.add(n)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="q2reap-pub",
                      clean_session=True, protocol=mqtt.MQTTv311)
    pub.max_inflight_messages_set(50)
    pub.max_queued_messages_set(0)
    pub.on_publish = on_publish
    pub.connect(survivor.host, survivor.port, keepalive=30)
    pub.loop_start()
    # routed: a first message reaches the subscriber across the nodes
    deadline = time.monotonic() + 15
    while not sub.probes:
        assert time.monotonic() < deadline, "no route from the survivor to the victim"
        pub.publish("q2reap/probe", b"probe", qos=0)
        sub.run_until(lambda: bool(sub.probes), 0.2)

    def publish_all():
        for n in range(TOTAL):
            info = pub.publish("q2reap/%d" % (n % 10), str(n).encode(), qos=2)
            with lock:
                if info.mid in early:
                    early.discard(info.mid)
                    acked.add(n)
                else:
                    sent[info.mid] = n
            time.sleep(0.002)
    publisher = threading.Thread(target=publish_all, daemon=True)
    publisher.start()
    assert sub.run_until(lambda: len(sub.deliveries) >= KILL_AT, 60), "stream too slow"
    victim.kill()
    sub.client.sock.close()
    deadline = time.monotonic() + 30
    while b"q2reap-sub" not in redis_server_sessions(redis_server, "q2survivor"):
        assert time.monotonic() < deadline, "the survivor did not adopt the session"
        time.sleep(0.1)
    assert sub.connect(survivor.port, clean=False)
    publisher.join(60)
    deadline = time.monotonic() + 60
    while True:
        with lock:
            done = len(acked) == TOTAL
        if done or time.monotonic() > deadline:
            break
        sub.run_until(lambda: False, 0.5)
    with lock:
        wanted = {str(n).encode() for n in acked}
    sub.run_until(lambda: wanted <= set(sub.deliveries), 60)
    sub.run_until(lambda: False, 2.0)          # stragglers
    pub.loop_stop()
    missing = sorted(int(p) for p in wanted - set(sub.deliveries))
    twice = sorted(int(p) for p, times in sub.deliveries.items()
                   if times > 1 and p != b"probe")
    print(f"\nkill -9 of a QoS 2 subscriber's node during {TOTAL} messages: "
          f"{len(acked)} acknowledged, {len(missing)} missing, {len(twice)} delivered twice"
          f" {_ranges(twice)}")
    assert missing == []
    assert twice == [], twice


def test_replaying_an_entry_the_dead_node_delivered_does_not_deliver_it_again(
        redis_server, aio):
    """In process, deterministic: node A read an inbox entry, queued its QoS 2 message
    into a persistent session (the client PUBREC'd it: PUBREL stage) and died before
    acknowledging the entry.  B's reap claims the entry again: the adopted session keeps
    its one record at PUBREL stage (resent as a PUBREL on resume), no second PUBLISH."""
    from mqttd.cluster.bus import GROUP, decode_entry, encode_envelope, position
    from mqttd.cluster.keys import Keys
    from mqttd.cluster.reaper import InboxReplay, Reaper
    from mqttd.messages import Message
    from mqttd.persistence.records import OutboundStage

    from .conftest import wait
    from .sessionnodes import connect, settle, start_nodes

    async def run():
        alive, a, b = start_nodes(redis_server.url, "A", "B")
        sub = a.client()
        await connect(a, sub, "q2-marked")
        sub.subscribe("mark/#", qos=2)
        await settle(a)
        keys = Keys()
        inbox = keys.inbox("A")
        redis_server.cli("XGROUP", "CREATE", inbox, GROUP, "$", "MKSTREAM")
        for n in range(3):
            await wait(b.backend.execute("XADD", inbox, "*", "e", encode_envelope(
                Message("mark/%d" % n, b"%d" % n, 2))))
        # A reads the first two entries and delivers them, as its bus does, and
        # dies before acknowledging them; the third it never read
        reply = await wait(a.backend.execute("XREADGROUP", "GROUP", GROUP, "A", "COUNT", 2,
                                             "STREAMS", inbox, ">"))
        for entry_id, fields in reply[0][1]:
            (message, only, _targets), = decode_entry(fields)[0]
            a.store.source = ("A", position(entry_id, 0))
            a.broker.dispatch(message, only_shares=only)
            a.store.source = None
        await settle(a)
        got = [p for p in sub.received() if isinstance(p, Publish)]
        assert [p.payload for p in got] == [b"0", b"1"]
        sub.send(Pubrec(got[0].packet_id))          # the first one reached PUBREL stage
        await settle(a)
        sub.conn.connection_lost()
        await settle(a)
        alive["A"] = False
        replay = InboxReplay(b.backend, keys, "B", b.clock, settle=0.0)
        assert await wait(Reaper(b.sessions, replay_inbox=replay.replay).reap("A"))
        await settle(b)
        session = b.broker.sessions["q2-marked"]
        records = sorted(list(session.inflight.values()) + list(session.queue),
                         key=lambda r: r.seq)
        assert [(r.message.payload, r.stage) for r in records] == [
            (b"0", OutboundStage.PUBREL_SENT), (b"1", OutboundStage.PUBLISH_SENT),
            (b"2", OutboundStage.QUEUED)]
    aio(run)
