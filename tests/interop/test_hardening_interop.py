"""Strictness and hardening with real clients and raw sockets over loopback
(issue 7 faults 4, 5, 8; issue 8 items 2, 3)."""
from __future__ import annotations

import queue
import socket
import subprocess
import time

import pytest
from paho.mqtt.client import MQTTv5, MQTTv31, MQTTv311
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect, Disconnect, Properties as P, Suback
from test_paho import WAIT, Paho, unique

pytestmark = pytest.mark.interop


def _raw(broker, timeout=WAIT):
    s = socket.create_connection((broker.host, broker.port), timeout=timeout)
    return s


def _read_all(sock, deadline=WAIT) -> bytes:
    """Everything until the broker closes (bounded by ``deadline`` seconds)."""
    sock.settimeout(deadline)
    data = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"broker did not close within {deadline}s (got {data!r})")


def test_mqtt31_paho_client_subscribes_publishes_and_unsubscribes(mqttd_broker):
    """A real MQTT 3.1 (MQIsdp) client works end to end."""
    c = Paho(mqttd_broker, MQTTv31, client_id=unique("v31"))
    c.connect()
    topic = unique("t31")
    c.subscribe(topic, qos=2)
    c.publish(topic, b"hello", qos=2)
    assert c.expect().payload == b"hello"
    c.client.unsubscribe(topic)
    c.disconnect()


def test_mqtt31_dup_retransmissions_over_loopback(mqttd_broker):
    """0x8A SUBSCRIBE and 0x6A PUBREL from a 3.1 client are answered, not closed."""
    s = _raw(mqttd_broker)
    s.sendall(encode(Connect(3, unique("raw31"), True, 30), 3))
    reader = PacketReader(level=3)
    s.settimeout(WAIT)
    assert reader.feed(s.recv(100)) == [Connack(False, 0)]
    s.sendall(bytes.fromhex("8a 06 00 07 00 01 61 01".replace(" ", "")))
    assert reader.feed(s.recv(100)) == [Suback(7, (1,))]
    s.sendall(bytes.fromhex("34 06 00 01 62 00 09 78".replace(" ", "")))   # QoS 2 to "b"
    assert type(reader.feed(s.recv(100))[0]).__name__ == "Pubrec"
    s.sendall(bytes.fromhex("6a 02 00 09".replace(" ", "")))                # PUBREL, DUP
    assert type(reader.feed(s.recv(100))[0]).__name__ == "Pubcomp"
    s.close()


def test_v5_client_maximum_packet_size_binds_the_disconnect(mqttd_broker):
    """v5 CONNECT with Maximum Packet Size 20, then a malformed PUBLISH: the DISCONNECT
    that comes back fits in 20 bytes [MQTT-3.1.2-24]."""
    s = _raw(mqttd_broker)
    s.sendall(encode(Connect(5, unique("mps"), True, 30,
                             properties=P(maximum_packet_size=20)), 5))
    s.settimeout(WAIT)
    reader = PacketReader(level=5)
    packets = []
    end = time.monotonic() + WAIT
    while not packets and time.monotonic() < end:
        packets += reader.feed(s.recv(1000))
    assert packets[0].reason_code == 0
    s.sendall(bytes.fromhex("3605000174" + "0001"))          # PUBLISH QoS 3
    data = _read_all(s)
    assert 0 < len(data) <= 20
    [disconnect] = PacketReader(level=5).feed(data)
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x81


def test_paho_v5_maximum_packet_size_drops_only_what_does_not_fit(mqttd_broker):
    """paho v5 announcing Maximum Packet Size 100 gets small messages, not large ones,
    and stays connected [MQTT-3.1.2-25]."""
    c = Paho(mqttd_broker, MQTTv5, client_id=unique("mps5"))
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = 100
    c.client.connect(mqttd_broker.host, mqttd_broker.port, keepalive=30, properties=props)
    c.client.loop_start()
    c.connacks.get(timeout=WAIT)
    topic = unique("big")
    c.subscribe(topic)
    sender = Paho(mqttd_broker, MQTTv311, client_id=unique("snd"))
    sender.connect()
    sender.publish(topic, b"x" * 500, qos=1)
    sender.publish(topic, b"small", qos=1)
    assert c.expect().payload == b"small"
    assert c.disconnects.empty()
    c.disconnect()
    sender.disconnect()


def test_311_invalid_filter_closes_the_connection(mqttd_broker):
    """3.1.1: an invalid filter in SUBSCRIBE is a protocol violation: closed, no SUBACK
    [MQTT-4.8.0-1] (paho refuses to send one, so a raw socket does)."""
    s = _raw(mqttd_broker)
    s.sendall(encode(Connect(4, unique("badf"), True, 30), 4))
    s.settimeout(WAIT)
    assert s.recv(4) == b"\x20\x02\x00\x00"
    s.sendall(bytes.fromhex("82 0a 00 01 00 05 61 2f 23 2f 62 00".replace(" ", "")))
    assert _read_all(s) == b""


def test_wrong_protocol_name_311_closed_without_connack(mqttd_broker):
    """3.1.1 CONNECT named 'MQTX': the socket is closed with nothing sent [MQTT-3.1.4-1]."""
    s = _raw(mqttd_broker)
    s.sendall(bytes.fromhex("100e00044d5154580402003c00026331"))
    assert _read_all(s) == b""


def test_huge_connect_is_refused_from_its_fixed_header(mqttd_broker):
    """A CONNECT declaring 16 MiB is refused at once: closed after 5 bytes, no body read."""
    s = _raw(mqttd_broker)
    s.sendall(b"\x10\xf0\xff\xff\x07")
    assert _read_all(s) == b""


@pytest.mark.slow
def test_trickled_packet_is_closed_after_the_keepalive_grace(mqttd_broker):
    """keepalive 2: a client trickling one byte of an endless PUBLISH every 0.5 s is closed
    within 1.5 x 2 s (+ slack): only complete packets count [MQTT-3.1.2-22]."""
    s = _raw(mqttd_broker)
    s.sendall(encode(Connect(4, unique("trk"), True, 2), 4))
    s.settimeout(WAIT)
    assert s.recv(4) == b"\x20\x02\x00\x00"
    s.sendall(b"\x30\xff\xff\x3f")
    start = time.monotonic()
    closed = False
    while time.monotonic() - start < 8:
        try:
            s.sendall(b"x")
            s.settimeout(0.5)
            if s.recv(10) == b"":
                closed = True
                break
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
    assert closed
    assert time.monotonic() - start < 5


def test_max_keepalive_refuses_mosquitto_sub_v311_keepalive_above(mqttd_broker_factory,
                                                               mosquitto_clients):
    """--max-keepalive 30: mosquitto_sub (3.1.1) with -k 60 is refused (0x02); -V 5 -k 60 is
    accepted with a Server Keep Alive."""
    broker = mqttd_broker_factory(extra_args=["--max-keepalive", "30"])
    base = [mosquitto_clients.sub, "-h", broker.host, "-p", str(broker.port), "-t", "x",
            "-C", "1", "-W", "2", "-k", "60"]
    refused = subprocess.run(base + ["-V", "mqttv311"], capture_output=True, text=True,
                             timeout=20)
    assert refused.returncode != 0
    assert "identifier rejected" in (refused.stderr + refused.stdout).lower()
    ok = subprocess.run(base + ["-V", "mqttv5"], capture_output=True, text=True, timeout=20)
    # accepted: it waits for a message and times out (-W 2), rather than being refused
    assert "refused" not in (ok.stderr + ok.stdout).lower()


def test_max_inflight_bytes_holds_a_non_acknowledging_subscriber_to_its_byte_window(
        mqttd_broker_factory):
    """--max-inflight-bytes 5000: a subscriber that does not acknowledge gets 4 of 10
    1,003-byte QoS 1 messages, the rest after its PUBACKs, in order."""
    from mqttd.blockingclient import BlockingClient
    from mqttd.codec.packets import Pingreq, Pingresp, Puback, Publish as Pub, Subscribe, \
        Subscription
    broker = mqttd_broker_factory(extra_args=["--max-inflight-bytes", "5000"])
    topic = unique("ib")
    sub = BlockingClient(broker.port, unique("ibsub"), timeout=WAIT)
    sub.send(Subscribe(1, (Subscription(topic, 1),)))
    assert isinstance(sub.next_packet(WAIT), Suback)
    pub = BlockingClient(broker.port, unique("ibpub"), timeout=WAIT)
    pub.send(*[Pub(topic, b"%03d" % i + b"p" * (1000 - len(topic)), 1, packet_id=i + 1)
               for i in range(10)])
    for _ in range(10):                  # every PUBLISH routed once all are PUBACKed
        assert pub.next_packet(WAIT).__class__.__name__ == "Puback"

    def until_pingresp():
        sub.send(Pingreq())
        got = []
        for _ in range(20):
            packet = sub.next_packet(WAIT)
            if isinstance(packet, Pingresp):
                return got
            got.append(packet)
        raise AssertionError("no PINGRESP")
    first = until_pingresp()
    assert [p.payload[:3] for p in first] == [b"000", b"001", b"002", b"003"]
    received = list(first)
    for _ in range(10):
        if len(received) == 10:
            break
        sub.send(*[Puback(p.packet_id) for p in received[-4:] if p.packet_id])
        received.extend(until_pingresp())
    assert [p.payload[:3] for p in received] == [b"%03d" % i for i in range(10)]
    sub.close()
    pub.close()
