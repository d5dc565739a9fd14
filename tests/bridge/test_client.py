"""mqttd.client: the connection rules and the in-memory session (StringTransport, Clock)."""
from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mqttd.client import ClientOptions, MQTTClient, MQTTClientFactory
from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import (
    Connack, Connect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback,
    Subscribe)


class Server:
    """The server end of one client connection: reads what the client wrote."""

    def __init__(self, client: MQTTClient, clock, level=4):
        self.level = level
        self.transport = StringTransport()
        factory = MQTTClientFactory(client.options, client, clock)
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.reader = PacketReader(level=None)

    def received(self):
        data = self.transport.value()
        self.transport.clear()
        return self.reader.feed(data) if data else []

    def send(self, *packets):
        for packet in packets:
            self.protocol.dataReceived(encode(packet, self.level))

    def lose(self):
        self.protocol.connectionLost(None)


def make_client(clock, **options):
    messages = []
    options.setdefault("client_id", "c1")
    client = MQTTClient(clock, endpoint=None, on_message=messages.append, **options)
    return client, messages


def test_connect_carries_the_bridge_bit_when_asked():
    """try_private: the CONNECT protocol level is 0x84, decoded back as a bridge CONNECT."""
    data = encode(ClientOptions(client_id="b", bridge=True).connect_packet(), 4)
    assert data[8] == 0x84
    (connect,) = PacketReader(level=None).feed(data)
    assert isinstance(connect, Connect) and connect.bridge and connect.protocol_level == 4


def test_no_connack_in_time_closes_the_connection():
    """A server that accepts TCP but never answers CONNECT is given up after connect_timeout."""
    clock = Clock()
    client, _ = make_client(clock, connect_timeout=5)
    server = Server(client, clock)
    assert isinstance(server.received()[0], Connect)
    clock.advance(5)
    assert server.transport.disconnecting


def test_keepalive_pings_and_gives_up_on_a_silent_server():
    """PINGREQ after keepalive s of silence; no answer within another keepalive: close."""
    clock = Clock()
    client, _ = make_client(clock, keepalive=10)
    server = Server(client, clock)
    server.received()
    server.send(Connack(False, 0))
    clock.advance(10)
    assert isinstance(server.received()[-1], Pingreq)
    server.send(Pingresp())
    clock.advance(10)
    assert isinstance(server.received()[-1], Pingreq)
    clock.advance(10)
    assert server.transport.disconnecting


def test_qos1_publish_fires_on_puback_and_is_resent_with_dup_on_resume():
    """Unacknowledged QoS 1 is re-sent with DUP and its packet id when the session resumes."""
    clock = Clock()
    client, _ = make_client(clock, clean_start=False)
    server = Server(client, clock)
    server.received()
    server.send(Connack(False, 0))
    done = []
    client.publish("t", b"1", qos=1).addCallback(done.append)
    (pub,) = server.received()
    assert pub.qos == 1 and not pub.dup
    server.lose()
    again = Server(client, clock)
    again.received()
    again.send(Connack(True, 0))
    (resent,) = again.received()
    assert resent.dup and resent.packet_id == pub.packet_id and resent.payload == b"1"
    again.send(Puback(pub.packet_id))
    assert len(done) == 1


def test_publishes_made_offline_are_sent_after_connect_and_new_session_resends_fresh():
    """Offline publishes wait; a server without our session gets in-flight ones as new."""
    clock = Clock()
    client, _ = make_client(clock, clean_start=False)
    d = client.publish("t", b"x", qos=2)
    server = Server(client, clock)
    server.received()
    server.send(Connack(False, 0))
    (pub,) = server.received()
    server.lose()
    again = Server(client, clock)
    again.received()
    again.send(Connack(False, 0))       # session lost on the server
    (fresh,) = again.received()
    assert not fresh.dup and fresh.payload == b"x"
    again.send(Pubrec(fresh.packet_id))
    assert again.received() == [Pubrel(fresh.packet_id)]
    again.send(Pubcomp(fresh.packet_id))
    assert d.called


def test_inbound_qos2_is_delivered_once():
    """A QoS 2 PUBLISH re-sent before PUBREL is acknowledged but not delivered again."""
    clock = Clock()
    client, messages = make_client(clock)
    server = Server(client, clock)
    server.received()
    server.send(Connack(False, 0))
    publish = Publish("t", b"once", 2, False, False, 7)
    server.send(publish, Publish("t", b"once", 2, False, True, 7))
    assert [m.payload for m in messages] == [b"once"]
    assert server.received() == [Pubrec(7), Pubrec(7)]
    server.send(Pubrel(7))
    assert server.received() == [Pubcomp(7)]


def test_subscriptions_are_renewed_when_the_server_lost_the_session():
    """After a reconnect without session, the client subscribes again by itself."""
    clock = Clock()
    client, _ = make_client(clock, clean_start=False)
    server = Server(client, clock)
    server.received()
    server.send(Connack(False, 0))
    codes = []
    client.subscribe("a/#", qos=1).addCallback(codes.append)
    (sub,) = server.received()
    server.send(Suback(sub.packet_id, (1,)))
    assert codes == [(1,)]
    server.lose()
    again = Server(client, clock)
    again.received()
    again.send(Connack(False, 0))
    (resub,) = again.received()
    assert isinstance(resub, Subscribe) and resub.subscriptions[0].topic_filter == "a/#"


def test_a_tls_failure_reason_names_openssls_reason():
    """A bridge whose TLS handshake fails says why (certificate verify failed), not just 'Error' (REVIEW-BRIDGE 9a)."""
    from OpenSSL import SSL
    from twisted.python.failure import Failure

    from mqttd.client import reason_text
    error = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert reason_text(Failure(error), "connection lost before CONNACK") == (
        "connection lost before CONNACK: Error (certificate verify failed)")
    assert reason_text(Failure(ValueError("x")), "lost") == "lost: ValueError"
