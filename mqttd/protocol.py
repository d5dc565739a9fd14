"""The Twisted glue: a thin Protocol/Factory pair (layer L4).

All protocol rules live in :class:`mqttd.connection.ClientConnection`; the
``MQTTProtocol`` only moves bytes and registers itself as a push producer of
its transport, so a subscriber that reads slowly pauses the broker's writes to
it (QoS 0 is then dropped and counted, QoS 1/2 waits in the bounded session
queue) instead of growing the transport buffer without bound.
"""
from __future__ import annotations

import collections
from typing import Dict, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from zope.interface import implementer

from mqttd.broker import Broker
from mqttd.connection import ClientConnection
from mqttd.ratelimit import address_key
from mqttd.turnwrites import coalesce_writes

#: a half-open socket at least this old (seconds) may be closed to make room
#: for a new one when the broker is at max_connections
EVICTABLE_AGE = 1.0


def _describe(address) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    name = getattr(address, "name", None)
    return str(name) if name is not None else str(address)


def is_tls_error(error) -> bool:
    """True for pyOpenSSL's errors (a failed handshake, a broken TLS stream)."""
    return error is not None and type(error).__module__.startswith("OpenSSL")


def tls_error_text(error) -> str:
    """OpenSSL's ``[(lib, func, reason), ...]`` as ``reason; reason``."""
    try:
        reasons = [str(item[-1]) for item in error.args[0] if item and item[-1]]
    except (IndexError, TypeError):
        reasons = []
    return "; ".join(reasons) or str(error) or type(error).__name__


def _behind_proxy_header(transport) -> bool:
    """True while ``transport`` (or one it wraps) still waits for a PROXY header:
    its peer is then the balancer, not the client."""
    seen = 0
    while transport is not None and seen < 8:
        if isinstance(transport, HAProxyProtocolWrapper):
            return transport._proxyInfo is None
        transport = getattr(transport, "transport", None)
        seen += 1
    return False


class Admission:
    """Who may hold a socket before its CONNECT (one per broker, all listeners).

    A socket is *half-open* from accept until its CONNECT packet arrives.
    ``max_connections`` and a listener's own limit are enforced at accept: a
    socket over them is closed at once (no slot is held for
    ``--connect-timeout`` seconds), unless room can be made by closing a
    half-open socket -- the oldest of the address holding the most, or any
    older than :data:`EVICTABLE_AGE` -- so idle sockets from one address cannot
    lock everybody else out.  And one address may hold at most
    ``max_pending_connections_per_address`` half-open sockets that have
    waited :data:`EVICTABLE_AGE` or more for their CONNECT; more are closed at
    accept (fresh ones do not count: a burst of real clients connecting at
    once from one address is not refused); an IPv6 address counts under its
    /64 (:func:`~mqttd.ratelimit.address_key`: a client with a /64 has 2^64
    addresses).  Connected clients are never closed to make room.  Each
    refusal is counted (``max-connections``, ``max-pending-connections``) and
    logged through the broker's rate limiter with the peer.

    Behind a ``haproxy:`` listener a socket is counted under the client's
    address once the PROXY header names it (before, the peer is the balancer).
    """

    def __init__(self, broker: Broker, clock):
        self.broker = broker
        self.clock = clock
        #: host -> {protocol: accepted at}, oldest first
        self._pending: Dict[str, "collections.OrderedDict"] = {}
        #: half-open sockets not yet under an address (behind a PROXY header)
        self._unplaced: "collections.OrderedDict" = collections.OrderedDict()
        self.count = 0
        #: sockets closed to make room whose close has not completed yet
        #: (they still count in open_connections: not to be made room for twice)
        self.evicting = 0

    def __len__(self) -> int:
        return self.count

    def pending(self, host: str) -> int:
        table = self._pending.get(host)
        return len(table) if table else 0

    def accept(self, protocol: "MQTTProtocol", over: int) -> bool:
        """A new socket; ``over`` is how many connections exceed the limits
        (broker's or listener's) with it.  False: it was closed."""
        broker = self.broker
        peer = protocol.connection.peer
        over -= self.evicting
        if over > 0 and not self._make_room(protocol, over):
            broker.refused("max-connections", None, peer,
                           "connection limit reached; closed at accept")
            return False
        if _behind_proxy_header(protocol.transport):
            self._unplaced[protocol] = self.clock.seconds()
            self.count += 1
            protocol.admission_host = None
            return True
        return self._place(protocol, address_key(peer), peer)

    def placed(self, protocol: "MQTTProtocol") -> bool:
        """Its PROXY header was read: count it under the client's address."""
        if self._unplaced.pop(protocol, None) is None:
            return True
        self.count -= 1
        peer = protocol.connection.peer
        return self._place(protocol, address_key(peer), peer)

    def _idle(self, table, now: float, enough: int) -> int:
        """How many sockets of ``table`` (oldest first) have waited at least
        :data:`EVICTABLE_AGE` for their CONNECT (counting stops at ``enough``)."""
        idle = 0
        for since in table.values():
            if now - since < EVICTABLE_AGE or idle >= enough:
                break
            idle += 1
        return idle

    def _place(self, protocol, host: str, peer) -> bool:
        limit = self.broker.config.max_pending_connections_per_address
        table = self._pending.get(host)
        now = self.clock.seconds()
        # only sockets idle for a second count: a burst of real clients (a load
        # test, a gateway reconnecting its devices) sends its CONNECTs at once
        if limit and table is not None and self._idle(table, now, limit) >= limit:
            self.broker.refused("max-pending-connections", None, peer,
                                f"{limit} connections from this address have waited "
                                f"{EVICTABLE_AGE:g} s or more without sending CONNECT "
                                f"(max_pending_connections_per_address); closed at accept")
            return False
        if table is None:
            table = self._pending[host] = collections.OrderedDict()
        table[protocol] = now
        protocol.admission_host = host
        self.count += 1
        return True

    def done(self, protocol: "MQTTProtocol") -> None:
        """CONNECT arrived, or the socket closed: no longer half-open."""
        if self._unplaced.pop(protocol, None) is not None:
            self.count -= 1
            return
        host = getattr(protocol, "admission_host", None)
        table = self._pending.get(host) if host is not None else None
        if table is not None and table.pop(protocol, None) is not None:
            self.count -= 1
            if not table:
                del self._pending[host]

    def _make_room(self, newcomer, over: int) -> bool:
        """Close ``over`` half-open sockets (never connected clients) if
        there are evictable ones; False if not."""
        victims = []
        now = self.clock.seconds()
        # the address holding the most first, among equals the one with the
        # oldest socket (one pass per room needed: O(addresses), no sort)
        skip = set()
        while len(victims) < over:
            best = None
            for host, table in self._pending.items():
                if host in skip:
                    continue
                key = (len(table), -next(iter(table.values())))
                if best is None or key > best[0]:
                    best = (key, host)
            if best is None:
                break
            (size, minus_oldest), host = best
            if size < 2 and now + minus_oldest < EVICTABLE_AGE:
                break  # every address holds one fresh socket: none is idle yet
            skip.add(host)
            for protocol, since in self._pending[host].items():
                if len(victims) >= over:
                    break
                if protocol is not newcomer and (size >= 2 or now - since >= EVICTABLE_AGE):
                    victims.append(protocol)
        if len(victims) < over:
            for protocol, since in self._unplaced.items():
                if len(victims) >= over:
                    break
                if now - since >= EVICTABLE_AGE:
                    victims.append(protocol)
        if len(victims) < over:
            return False
        for protocol in victims:
            self.done(protocol)
            self.broker.refused("max-connections", None, protocol.connection.peer,
                                "connection limit reached; closed while it had not sent "
                                "CONNECT, to make room")
            protocol.evicted = True
            self.evicting += 1
            protocol.transport.abortConnection()
        return True


def admission_of(broker: Broker, clock) -> Admission:
    """The broker's :class:`Admission` (made on first use)."""
    admission = getattr(broker, "_admission", None)
    if admission is None:
        admission = broker._admission = Admission(broker, clock)
    return admission


@implementer(IPushProducer)
class MQTTProtocol(Protocol):
    connection: ClientConnection = None

    #: set by a listener (e.g. ``mqtts:...:identityAsUsername=yes``) to a
    #: callable ``(transport) -> Optional[str]`` giving the identity the
    #: transport authenticated; handed to the connection as
    #: :attr:`ClientConnection.transport_identity`
    transport_identity = None

    #: the address this socket is counted under while half-open (Admission)
    admission_host = None
    #: closed by Admission to make room (not an error of this client)
    evicted = False
    _admitted = False

    def __init__(self, broker: Broker, clock):
        self.broker = broker
        self.clock = clock

    def connectionMade(self):
        factory = self.factory
        broker = self.broker
        broker.open_connections += 1  # BrokerConfig.max_connections
        factory.open_connections += 1      # the listener's own limit
        self.connection = ClientConnection(
            broker, self.transport, self.clock, _describe(self.transport.getPeer()))
        admission = admission_of(broker, self.clock)
        if factory.max_connections and factory.open_connections > factory.max_connections:
            # the listener's own limit: closed at accept (no room is made:
            # the half-open sockets of other listeners would not help)
            broker.refused("max-connections", None, self.connection.peer,
                           f"listener {factory.listener or '-'} has its "
                           f"{factory.max_connections} connections; closed at accept")
            return self._close_at_accept()
        over = 0
        if broker.config.max_connections:
            over = broker.open_connections - broker.config.max_connections
        if not admission.accept(self, over):
            return self._close_at_accept()
        self._admitted = True
        self.connection.connect_received = lambda: admission.done(self)
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
        # a turn's writes leave at its end, not after a poll for writability
        # (two epoll_ctl and a reactor event less per write), and reads use one
        # shared buffer (mqttd.turnwrites)
        coalesce_writes(self.transport)
        self.transport.registerProducer(self, True)
        self.connection.release_transport = self.transport.unregisterProducer

    def _close_at_accept(self) -> None:
        """Refused at accept: nothing of this socket reaches the broker."""
        self.connection.connection_lost(None)  # its timers, its buffers
        self.transport.abortConnection()

    def dataReceived(self, data: bytes):
        # The first bytes: behind a PROXY header (Admission has not placed
        # the socket under an address yet) the wrapping transport only now
        # knows the real peer (Twisted's PROXY protocol wrapper answers
        # getPeer() with the address from the header once it has parsed it),
        # so take it again; any other transport's peer is the one taken at
        # accept.  Later reads go straight to the connection.
        connection = self.connection
        if self.admission_host is None:
            connection.peer = _describe(self.transport.getPeer())
            if self._admitted and not admission_of(self.broker, self.clock).placed(self):
                return self._close_at_accept()
        self.dataReceived = connection.data_received
        connection.data_received(data)

    def connectionLost(self, reason=None):
        self.broker.open_connections -= 1
        self.factory.open_connections -= 1
        if self._admitted:
            admission = admission_of(self.broker, self.clock)
            admission.done(self)
            if self.evicted:
                self.evicted = False
                admission.evicting -= 1
            if self.connection is not None:
                self.connection.connect_received = None  # a cycle through self
        error = getattr(reason, "value", None)
        if is_tls_error(error):
            # a TLS listener: failed handshake (no or untrusted client
            # certificate, protocol version, ...) or a broken TLS stream
            connection = self.connection
            self.broker.refused(
                "tls", connection.client_id if connection is not None else None,
                _describe(self.transport.getPeer()), f"TLS failed: {tls_error_text(error)}")
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
