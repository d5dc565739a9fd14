"""The Twisted glue: a thin Protocol/Factory pair (layer L4).

All protocol rules live in :class:`mqttd.connection.ClientConnection`; the
``MQTTProtocol`` only moves bytes and registers itself as a push producer of
its transport, so a subscriber that reads slowly pauses the broker's writes to
it (QoS 0 is then dropped and counted, QoS 1/2 waits in the bounded session
queue) instead of growing the transport buffer without bound.
"""
from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from mqttd.broker import Broker
from mqttd.connection import ClientConnection


def _describe(address) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    name = getattr(address, "name", None)
    return str(name) if name is not None else str(address)


def _tls_error_text(error) -> str:
    """OpenSSL's ``[(lib, func, reason), ...]`` as ``reason; reason``."""
    try:
        reasons = [str(item[-1]) for item in error.args[0] if item and item[-1]]
    except (IndexError, TypeError):
        reasons = []
    return "; ".join(reasons) or str(error) or type(error).__name__


@implementer(IPushProducer)
class MQTTProtocol(Protocol):
    connection: ClientConnection = None

    #: set by a listener (e.g. ``mqtts:...:identityAsUsername=yes``) to a
    #: callable ``(transport) -> Optional[str]`` giving the identity the
    #: transport authenticated; handed to the connection as
    #: :attr:`ClientConnection.transport_identity`
    transport_identity = None

    def __init__(self, broker: Broker, clock):
        self.broker = broker
        self.clock = clock

    def connectionMade(self):
        factory = self.factory
        self.broker.open_connections += 1  # BrokerConfig.max_connections
        factory.open_connections += 1      # the listener's own limit
        self.connection = ClientConnection(
            self.broker, self.transport, self.clock, _describe(self.transport.getPeer()))
        if factory.max_connections and factory.open_connections > factory.max_connections:
            self.connection.over_listener_limit = factory.max_connections
        #: the listener (endpoint description) it came in on, for metrics and admin
        self.connection.listener = self.factory.listener
        if self.transport_identity is not None:
            transport, identity = self.transport, self.transport_identity
            self.connection.transport_identity = lambda: identity(transport)
        if hasattr(self.transport, "bufferSize"):
            # the bound of the outgoing buffer before our writes pause.  Larger
            # is not faster: Twisted copies the unsent rest of its buffer on
            # every write, so a big backlog to a slow reader costs CPU (measured:
            # 512 KiB doubled QoS 0 fan-in but cut QoS 1 fan-in by a quarter)
            self.transport.bufferSize = self.factory.write_buffer
        self.transport.registerProducer(self, True)
        self.connection.release_transport = self.transport.unregisterProducer

    def dataReceived(self, data: bytes):
        # The first bytes: a wrapping transport may only now know the real
        # peer (Twisted's PROXY protocol wrapper answers getPeer() with the
        # address from the PROXY header once it has parsed it), so take it
        # again; later reads go straight to the connection.
        connection = self.connection
        connection.peer = _describe(self.transport.getPeer())
        self.dataReceived = connection.data_received
        connection.data_received(data)

    def connectionLost(self, reason=None):
        self.broker.open_connections -= 1
        self.factory.open_connections -= 1
        error = getattr(reason, "value", None)
        if error is not None and type(error).__module__.startswith("OpenSSL"):
            # a TLS listener: failed handshake (no or untrusted client
            # certificate, protocol version, ...) or a broken TLS stream
            connection = self.connection
            self.broker.refused(
                "tls", connection.client_id if connection is not None else None,
                _describe(self.transport.getPeer()), f"TLS failed: {_tls_error_text(error)}")
        if self.connection is not None:
            self.connection.connection_lost(reason)

    # IPushProducer: the transport tells us when its write buffer is full
    def pauseProducing(self):
        self.connection.pause_writing()

    def resumeProducing(self):
        self.connection.resume_writing()

    def stopProducing(self):
        pass


class MQTTFactory(Factory):
    """Listen with this factory on any Twisted server endpoint.

    :param broker: the :class:`~mqttd.broker.Broker` shared by all listeners.
    :param clock: ``IReactorTime`` for timers; defaults to the broker's clock.
    :param write_buffer: bytes buffered per connection before writes to it
        pause (push-producer backpressure).
    :param max_connections: open connections on the listeners of this
        factory; more are refused at CONNECT (0x97 / v3 0x03); 0 = no limit
        (the broker-wide ``BrokerConfig.max_connections`` applies as well).
    :param listener: the name of the listener in metrics and the admin API
        (``BrokerService`` uses the endpoint description); None: unnamed.
    """

    protocol = MQTTProtocol
    #: open the broker's store when listening starts (BrokerService opens it
    #: itself, after every listener is up, and turns this off)
    start_broker = True

    def __init__(self, broker: Broker, clock=None, write_buffer: int = 64 * 1024,
                 listener: Optional[str] = None, max_connections: int = 0):
        self.broker = broker
        #: a name for the listener (the endpoint description) shown in metrics
        self.listener = listener
        self.clock = clock if clock is not None else broker.clock
        self.max_connections = max_connections
        #: connections open on this factory's listeners
        self.open_connections = 0
        #: bytes a connection's transport buffers before it pauses our writes
        self.write_buffer = write_buffer

    def startFactory(self):
        """Listening starts: the broker opens and restores its store if nobody did
        (``Broker.start`` is idempotent), so ``Broker(reactor, store=...)`` plus
        ``MQTTFactory`` is enough for durable sessions."""
        if self.start_broker:
            self.broker.start()

    def buildProtocol(self, addr):
        protocol = self.protocol(self.broker, self.clock)
        protocol.factory = self
        return protocol
