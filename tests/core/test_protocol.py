"""The Twisted shim: MQTTProtocol over StringTransport, push-producer backpressure."""
from twisted.internet.testing import StringTransport

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import Connack, Connect, Publish, Subscribe, Subscription
from mqttd.protocol import MQTTFactory

from core.harness import make_broker
from tests.logcapture import logged


def _connected(factory, client_id):
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode(Connect(4, client_id), 4))
    reader = PacketReader(level=4)
    assert reader.feed(transport.value()) == [Connack(False, 0)]
    transport.clear()
    return proto, transport, reader


def test_protocol_registers_as_streaming_producer():
    """The protocol registers itself as a push producer of its transport."""
    broker, clock = make_broker()
    proto, transport, _ = _connected(MQTTFactory(broker), "a")
    assert transport.producer is proto and transport.streaming


def _paused_subscriber_and_publisher():
    """A QoS 1 subscriber on "t" whose transport has paused us, and a publisher."""
    broker, clock = make_broker()
    factory = MQTTFactory(broker)
    sub, sub_transport, reader = _connected(factory, "sub")
    sub.dataReceived(encode(Subscribe(1, (Subscription("t", 1),)), 4))
    sub_transport.clear()
    pub, _, _ = _connected(factory, "pub")
    sub.pauseProducing()
    return broker, sub, sub_transport, reader, pub


def test_paused_transport_queues_and_resumes_in_order():
    """pauseProducing stops writes to that client; resumeProducing drains its queue in order."""
    broker, sub, sub_transport, reader, pub = _paused_subscriber_and_publisher()
    pub.dataReceived(encode(Publish("t", b"q0"), 4))
    pub.dataReceived(encode(Publish("t", b"q1", 1, packet_id=1), 4))
    assert sub_transport.value() == b""
    sub.resumeProducing()
    got = reader.feed(sub_transport.value())
    assert [(p.payload, p.qos) for p in got] == [(b"q0", 0), (b"q1", 1)]
    assert broker.stats.dropped == {}


def test_connection_lost_ends_the_session():
    """Losing the transport removes a clean session from the broker."""
    broker, clock = make_broker()
    proto, transport, _ = _connected(MQTTFactory(broker), "gone")
    assert "gone" in broker.sessions
    proto.connectionLost(None)
    assert "gone" not in broker.sessions


def test_bytes_split_anywhere_are_reassembled():
    """A CONNECT and a PUBLISH fed one byte at a time work like one chunk."""
    broker, clock = make_broker()
    got = []
    broker.subscribe_local("t", got.append)
    proto = MQTTFactory(broker).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    data = encode(Connect(4, "x"), 4) + encode(Publish("t", b"payload"), 4)
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    assert [m.payload for m in got] == [b"payload"]


def test_transport_write_buffer_follows_the_factory_setting():
    """Writes to a client pause at the factory's write_buffer (64 KiB unless set)."""
    broker, clock = make_broker()
    for factory, expected in ((MQTTFactory(broker), 64 * 1024),
                              (MQTTFactory(broker, write_buffer=1 << 20), 1 << 20)):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        transport.bufferSize = 1
        proto.makeConnection(transport)
        assert transport.bufferSize == expected


def test_queued_messages_are_sent_with_the_bytes_received():
    """A message queued behind a paused transport goes out as the publisher's own bytes."""
    broker, sub, sub_transport, reader, pub = _paused_subscriber_and_publisher()
    raw = encode(Publish("t", b"q1", 1, packet_id=9), 4)
    pub.dataReceived(raw)
    assert broker.sessions["sub"].wire  # the received form waits with the queued record
    sub.resumeProducing()
    sent = sub_transport.value()
    # same bytes but the packet id (offset 5: header 2, topic length 2, "t")
    assert sent[:5] == raw[:5] and sent[7:] == raw[7:] and len(sent) == len(raw)
    assert not broker.sessions["sub"].wire


def test_listener_accepts_a_bounded_number_of_connections_per_reactor_turn():
    """During an accept storm one reactor turn accepts at most max_accepts_per_turn
    connections (Twisted's own bound grows by 20 per turn without limit); the kernel
    backlog keeps the rest for the next turns (issue 8 item 10)."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactorClock

    from mqttd.service import bound_accepts

    broker, clock = make_broker()
    built = []

    class CountingFactory(MQTTFactory):
        def buildProtocol(self, addr):
            built.append(addr)
            return super().buildProtocol(addr)

    reactor = MemoryReactorClock()
    port = tcp.Port(0, CountingFactory(broker, clock), 500, "127.0.0.1", reactor)
    port.startListening()
    bound_accepts(port, 16)
    clients = []
    try:
        for _ in range(100):
            c = socket.socket()
            c.connect(("127.0.0.1", port.getHost().port))
            clients.append(c)
        port.numberAccepts = 10_000   # what Twisted reaches after a long storm
        turns = []
        for _ in range(20):
            before = len(built)
            port.doRead()
            turns.append(len(built) - before)
            if len(built) == 100:
                break
        assert max(turns) == 16
        assert len(built) == 100
    finally:
        for c in clients:
            c.close()
        port.stopListening()


def _v5_connected(factory, client_id):
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode(Connect(5, client_id), 5))
    transport.clear()
    return proto, transport


def test_stop_waits_for_the_transports_to_close_before_closing_the_store():
    """Broker.stop: the DISCONNECT 0x8B is written and the transports close before the store closes."""
    from mqttd.codec.packets import Disconnect
    from mqttd.persistence.memory import MemoryStore
    closed = []

    class Store(MemoryStore):
        def close(self):
            closed.append(broker.open_connections)
            return super().close()

    broker, clock = make_broker(store=Store())
    factory = MQTTFactory(broker)
    clients = [_v5_connected(factory, "c%d" % i) for i in range(3)]
    done = broker.stop()
    assert not done.called and closed == []          # the transports are still open
    for proto, transport in clients:
        assert PacketReader(level=5).feed(transport.value())[0] == Disconnect(0x8B)
        assert transport.disconnecting
    for proto, transport in clients:
        proto.connectionLost(None)                    # the reactor wrote and closed them
    assert done.called and closed == [0]


def test_transports_closed_gives_up_after_the_timeout():
    """A connection that never closes (a client that does not read) delays the stop by at most the timeout."""
    broker, clock = make_broker()
    factory = MQTTFactory(broker)
    _v5_connected(factory, "stuck")
    waited = broker.transports_closed(timeout=2.0)
    clock.advance(1.9)
    assert not waited.called
    clock.advance(0.1)
    assert waited.called and broker.open_connections == 1
    assert not clock.getDelayedCalls() or all(
        not c.active() for c in clock.getDelayedCalls() if c.func == broker._stop_waiting)


def test_transports_closed_fires_at_once_without_connections():
    """Nothing open: nothing to wait for."""
    broker, clock = make_broker()
    assert broker.transports_closed().called


def test_emfile_recovery_lines_are_counted_refusals_through_the_limiter():
    """Twisted's one line per connection closed out of file descriptors becomes a counted, rate-limited refusal."""
    from twisted.logger import LogLevel

    from mqttd.service import AcceptLog
    broker, clock = make_broker()
    observer = AcceptLog(broker, "tcp:1883")
    with logged(LogLevel.info) as lines:
        observer({"log_format": "EMFILE encountered; releasing reserved file descriptor."})
        for i in range(61):
            observer({"log_format": "EMFILE recovery: Closed socket from {address}",
                      "address": ("127.0.0.1", 40000 + i)})
        observer({"log_format": "Re-reserving EMFILE recovery file descriptor."})
        for _ in range(10):
            observer({"log_format": "Could not accept new connection ({acceptError})",
                      "acceptError": "ENOBUFS"})
    assert broker.stats.refused == {"file-descriptors": 61}
    refusals = [e for e in lines if e.get("what") == "file-descriptors"]
    assert len(refusals) == 3 and "RLIMIT_NOFILE" in refusals[0]["detail"]
    others = [e for e in lines if e.get("what") != "file-descriptors"]
    assert len(others) == 3 and others[0]["acceptError"] == "ENOBUFS"


def test_bound_accepts_routes_the_ports_accept_log_through_the_broker():
    """A listener of the service logs its accept loop through AcceptLog."""
    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactorClock

    from mqttd.service import AcceptLog, bound_accepts
    broker, clock = make_broker()
    port = tcp.Port(0, MQTTFactory(broker, clock), 50, "127.0.0.1", MemoryReactorClock())
    port.startListening()
    try:
        bound_accepts(port, 16, broker, "tcp:0")
        assert isinstance(port._logger.observer, AcceptLog)
    finally:
        port.stopListening()
