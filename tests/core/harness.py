"""A test client that speaks to a ClientConnection through a StringTransport."""
from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mqttd.broker import Broker, BrokerConfig
from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect, Properties, Publish, Subscribe, Subscription
from mqttd.connection import ClientConnection


class Recorder:
    """Collects broker events as (name, fields) tuples."""

    def __init__(self, broker):
        self.events = []
        for name in ("clientConnected", "published", "subscribed", "unsubscribed",
                     "clientDisconnecting", "clientDisconnected"):
            broker.on(name, lambda _name=name, **fields: self.events.append((_name, fields)))

    def names(self):
        return [name for name, _ in self.events]


class FakeClient:
    def __init__(self, broker, clock, level=4, peer="127.0.0.1:1"):
        self.broker = broker
        self.clock = clock
        self.level = level
        self.transport = StringTransport()
        self.conn = ClientConnection(broker, self.transport, clock, peer=peer)
        self.reader = PacketReader(level=level)
        self.closed = False
        self._unread = []

    def send(self, *packets):
        for packet in packets:
            self.conn.data_received(encode(packet, self.level))

    def send_bytes(self, data: bytes):
        self.conn.data_received(data)

    def received(self):
        data = self.transport.value()
        self.transport.clear()
        packets, self._unread = self._unread + (self.reader.feed(data) if data else []), []
        return packets

    def raw(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def disconnecting(self) -> bool:
        return self.transport.disconnecting

    def connect(self, client_id="c1", clean=True, keepalive=0, will=None,
                properties=Properties(), expect_ok=True):
        self.send(Connect(self.level, client_id, clean, keepalive, will=will,
                          properties=properties))
        packets = self.received()
        if expect_ok:
            assert packets and isinstance(packets[0], Connack), packets
            assert packets[0].reason_code == 0, packets[0]
        # what followed the CONNACK (resent or queued messages) stays readable
        self._unread = packets[1:]
        return packets[:1]

    def subscribe(self, *filters, qos=0, packet_id=1, **options):
        self.send(Subscribe(packet_id, tuple(Subscription(f, qos, **options) for f in filters)))
        return self.received()

    def publish(self, topic, payload=b"x", qos=0, retain=False, packet_id=None, **kw):
        if qos and packet_id is None:
            packet_id = 1
        self.send(Publish(topic, payload, qos, retain, packet_id=packet_id, **kw))

    def drop(self):
        """The network connection goes away without DISCONNECT."""
        self.transport.loseConnection()
        self.conn.connection_lost(None)


def make_broker(store=None, **config):
    clock = Clock()
    broker = Broker(clock, store, BrokerConfig(**config))
    return broker, clock
