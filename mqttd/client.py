"""An MQTT 3.1.1 / 5.0 client on mqttd's own codec, for Twisted (layer L4).

Two levels:

- :class:`MQTTClientProtocol` is one network connection: it sends CONNECT,
  waits for CONNACK (bounded by ``connect_timeout``), keeps the link alive
  with PINGREQ, frames and encodes packets and hands every other packet to a
  *handler* (``mqtt_connected``, ``mqtt_packet``, ``mqtt_disconnected``,
  ``mqtt_writable``).  It implements no QoS flow itself, so a handler can
  keep its in-flight state wherever it must (the bridge keeps it in the
  broker's persistent session, see :mod:`mqttd.bridge`).
- :class:`MQTTClient` is the client for applications: a Twisted service that
  connects through :class:`twisted.application.internet.ClientService` (so it
  reconnects with jittered backoff), keeps its session in memory across
  reconnects (unacknowledged QoS 1/2 PUBLISH and PUBREL are re-sent with DUP
  and the same packet ids [MQTT-4.4.0-1], subscriptions are renewed when the
  server lost the session) and answers every call with a Deferred::

      client = MQTTClient(reactor, clientFromString(reactor, "tcp:127.0.0.1:1883"),
                          client_id="sensor-1", clean_start=False,
                          on_message=lambda message: print(message.topic))
      client.startService()
      yield client.subscribe("cmd/#", qos=1)       # fires with the SUBACK codes
      yield client.publish("temp", b"21.5", qos=1)  # fires once PUBACK arrived

Retry policies: :class:`DecorrelatedJitter` is mosquitto's bridge
``restart_timeout BASE CAP`` ("decorrelated jitter": each delay is uniform in
``[base, 3 x previous]``, at most ``cap``, back to ``base`` after a
successful CONNACK); :class:`ConstantDelay` is ``restart_timeout N``.
"""
from __future__ import annotations

import collections
import random
from typing import Callable, Dict, Optional

import attrs
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mqttd.codec import PacketReader, encode
from mqttd.codec.errors import MQTTError, ProtocolError
from mqttd.codec.packets import (
    MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES, Auth, Connack, Connect, Disconnect,
    Pingreq, Pingresp, Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback,
    Subscribe, Subscription, Unsuback, Unsubscribe, Will)
from mqttd.messages import Message

log = Logger(namespace="mqttd.client")

__all__ = [
    "ClientOptions", "ConnectionRefused", "ConstantDelay", "DecorrelatedJitter",
    "MQTTClient", "MQTTClientFactory", "MQTTClientProtocol", "NotConnected",
]


class ConnectionRefused(Exception):
    """The server answered CONNACK with a non-zero return/reason code."""

    def __init__(self, reason_code: int, level: int):
        super().__init__(f"CONNECT refused with code 0x{reason_code:02X} (level {level})")
        self.reason_code = reason_code
        self.level = level


class NotConnected(Exception):
    """The operation needs a connection and there is none (QoS 0 while offline)."""


def reason_text(reason, default: str) -> str:
    """A short text for a connectionLost ``Failure``: ``default: ErrorClass``,
    with OpenSSL's reasons when TLS failed (``Error (certificate verify
    failed)``) so a refused certificate says so."""
    value = getattr(reason, "value", None)
    if value is None:
        return default
    text = f"{default}: {value.__class__.__name__}"
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list):   # OpenSSL.SSL.Error: [(lib, func, reason)]
        reasons = [str(item[-1]) for item in args[0] if isinstance(item, tuple) and item]
        if reasons:
            text += f" ({'; '.join(reasons)})"
    return text


# --- retry policies (ClientService retryPolicy callables) -------------------------


class DecorrelatedJitter:
    """mosquitto's ``restart_timeout BASE CAP``: the AWS "decorrelated jitter".

    ``policy(attempt) -> seconds``; each delay is ``uniform(base, 3 * prev)``
    capped at ``cap``.  :meth:`reset` (call it on a successful CONNACK) starts
    again from ``base``.  The attempt number from ClientService is ignored: a
    TCP connection that is refused at CONNACK counts as a failure too.
    """

    def __init__(self, base: float, cap: float, rng: Optional[random.Random] = None):
        if base <= 0 or cap < base:
            raise ValueError(f"restart_timeout needs 0 < base <= cap, got {base} {cap}")
        self.base = float(base)
        self.cap = float(cap)
        self._rng = rng or random.Random()
        self._prev = self.base

    def reset(self) -> None:
        self._prev = self.base

    def __call__(self, attempt: int = 0) -> float:
        delay = min(self.cap, self._rng.uniform(self.base, self._prev * 3))
        self._prev = delay
        return delay


class ConstantDelay:
    """``restart_timeout N``: always ``N`` seconds."""

    def __init__(self, delay: float):
        if delay <= 0:
            raise ValueError(f"restart_timeout must be > 0, got {delay}")
        self.delay = float(delay)

    def reset(self) -> None:
        pass

    def __call__(self, attempt: int = 0) -> float:
        return self.delay


# --- one connection ------------------------------------------------------------------


@attrs.frozen
class ClientOptions:
    """What goes into CONNECT, and the connection's timers (seconds)."""

    client_id: str = ""
    protocol_level: int = attrs.field(
        default=MQTT_3_1_1, validator=attrs.validators.in_((MQTT_3_1, MQTT_3_1_1, MQTT_5)))
    clean_start: bool = True
    keepalive: int = 60
    username: Optional[str] = None
    password: Optional[bytes] = None
    will: Optional[Will] = None
    #: v5 CONNECT properties (session expiry interval, receive maximum, ...)
    properties: Properties = NO_PROPERTIES
    #: set the bridge bit (level | 0x80, mosquitto's try_private; v3 only)
    bridge: bool = False
    #: seconds to wait for CONNACK after the TCP connection is up
    connect_timeout: float = 30.0
    max_packet_size: int = 256 * 1024 * 1024

    def connect_packet(self) -> Connect:
        return Connect(self.protocol_level, self.client_id, self.clean_start, self.keepalive,
                       self.username, self.password, self.will,
                       self.properties if self.protocol_level == MQTT_5 else NO_PROPERTIES,
                       bridge=self.bridge and self.protocol_level != MQTT_5)


_CONNECTING, _CONNECTED, _CLOSED = "connecting", "connected", "closed"


@implementer(IPushProducer)
class MQTTClientProtocol(Protocol):
    """One client connection (see the module docstring for the handler calls).

    The handler is any object with these methods (all optional but the first):

    - ``mqtt_connected(protocol, connack)``: CONNACK accepted; the link is up;
    - ``mqtt_packet(protocol, packet)``: PUBLISH, PUBACK, PUBREC, PUBREL,
      PUBCOMP, SUBACK, UNSUBACK, or a v5 DISCONNECT from the server;
    - ``mqtt_refused(protocol, connack)``: CONNACK with a non-zero code;
    - ``mqtt_disconnected(protocol, reason)``: the link is gone (``reason`` a
      short string);
    - ``mqtt_writable(protocol)``: the transport's buffer drained again.
    """

    def __init__(self, options: ClientOptions, handler, clock):
        self.options = options
        self.handler = handler
        self.clock = clock
        self.level = options.protocol_level
        self.reader = PacketReader(level=self.level, max_packet_size=options.max_packet_size)
        self.state = _CONNECTING
        self.connack: Optional[Connack] = None
        #: QoS 1/2 messages the server accepts in flight (v5 Receive Maximum)
        self.send_window = 65535
        #: the server's Maximum Packet Size (v5), None = unlimited
        self.server_max_packet: Optional[int] = None
        self.keepalive = options.keepalive
        self.close_reason = "connection lost"
        self._paused = False
        self._last_sent = 0.0
        self._last_received = 0.0
        self._ping_outstanding = False
        self._timer = None
        self._handlers = {Connack: self._on_connack}

    # --- Twisted ---------------------------------------------------------------

    def connectionMade(self):
        now = self.clock.seconds()
        self._last_received = now
        self.transport.registerProducer(self, True)
        self.send(self.options.connect_packet())
        self._timer = self.clock.callLater(self.options.connect_timeout,
                                           self._connack_timeout)

    def dataReceived(self, data: bytes):
        if self.state == _CLOSED:
            return
        self._last_received = self.clock.seconds()
        self._ping_outstanding = False
        try:
            packets = self.reader.feed(data)
        except MQTTError as error:
            self._fail(f"malformed packet from server: {error}")
            return
        for packet in packets:
            if self.state == _CLOSED:
                return
            handler = self._handlers.get(packet.__class__)
            if handler is None:
                self._fail(f"unexpected {type(packet).__name__} from server")
                return
            try:
                handler(packet)
            except MQTTError as error:
                self._fail(str(error))
                return

    def connectionLost(self, reason=None):
        was = self.state
        self.state = _CLOSED
        self._cancel_timer()
        if was == _CONNECTING and self.connack is None:
            self.close_reason = reason_text(reason, "connection lost before CONNACK")
        elif self.close_reason == "connection lost":
            self.close_reason = reason_text(reason, "connection lost")
        self._call("mqtt_disconnected", self.close_reason)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        if self.state == _CONNECTED:
            self._call("mqtt_writable")

    def stopProducing(self):
        pass

    # --- output ---------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self.state == _CONNECTED

    def writable(self) -> bool:
        return self.state == _CONNECTED and not self._paused

    def send(self, packet) -> None:
        self.write(encode(packet, self.level))

    def write(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self._last_sent = self.clock.seconds()
        self.transport.write(data)

    def disconnect(self, reason_code: int = 0) -> None:
        """DISCONNECT (with ``reason_code`` on v5) and close."""
        if self.state == _CLOSED:
            return
        if self.state == _CONNECTED:
            self.send(Disconnect(reason_code) if self.level == MQTT_5 else Disconnect())
        self.close_reason = "disconnected by client"
        self.state = _CLOSED
        self._cancel_timer()
        self.transport.loseConnection()

    def abort(self, reason: str) -> None:
        """Close at once without DISCONNECT (the server publishes our will)."""
        if self.state == _CLOSED:
            return
        self.close_reason = reason
        self.state = _CLOSED
        self._cancel_timer()
        self.transport.abortConnection()

    def _fail(self, reason: str) -> None:
        log.warn("Closing MQTT client connection {client_id}: {reason}",
                 client_id=self.options.client_id, reason=reason)
        if self.state == _CONNECTED and self.level == MQTT_5:
            self.send(Disconnect(0x82))
        self.abort(reason)

    def _call(self, name: str, *args) -> None:
        method = getattr(self.handler, name, None)
        if method is not None:
            method(self, *args)

    # --- CONNACK and keepalive -------------------------------------------------

    def _on_connack(self, packet: Connack) -> None:
        self._cancel_timer()
        self.connack = packet
        if packet.reason_code != 0:
            self.close_reason = f"CONNECT refused (code 0x{packet.reason_code:02X})"
            self.state = _CLOSED
            self._call("mqtt_refused", packet)
            self.transport.loseConnection()
            return
        props = packet.properties
        if self.level == MQTT_5:
            if props.receive_maximum:
                self.send_window = props.receive_maximum
            if props.maximum_packet_size:
                self.server_max_packet = props.maximum_packet_size
            if props.server_keep_alive is not None:
                self.keepalive = props.server_keep_alive
        self.state = _CONNECTED
        handle = self._packet
        self._handlers = {
            Publish: handle, Puback: handle, Pubrec: handle, Pubrel: handle,
            Pubcomp: handle, Suback: handle, Unsuback: handle,
            Pingresp: self._on_pingresp, Disconnect: self._on_disconnect,
            Auth: self._on_auth,
        }
        if self.keepalive:
            self._timer = self.clock.callLater(self.keepalive, self._check_keepalive)
        self._call("mqtt_connected", packet)

    def _packet(self, packet) -> None:
        self._call("mqtt_packet", packet)

    def _on_pingresp(self, packet) -> None:
        self._ping_outstanding = False

    def _on_disconnect(self, packet: Disconnect) -> None:
        self.close_reason = f"DISCONNECT from server (reason 0x{packet.reason_code:02X})"
        self._call("mqtt_packet", packet)
        self.state = _CLOSED
        self._cancel_timer()
        self.transport.loseConnection()

    def _on_auth(self, packet) -> None:
        raise ProtocolError("AUTH without enhanced authentication", spec="MQTT-4.12.0-1")

    def _connack_timeout(self) -> None:
        self._timer = None
        self._fail(f"no CONNACK within {self.options.connect_timeout} s")

    def _check_keepalive(self) -> None:
        """PINGREQ after ``keepalive`` s without sending; give up when the server
        stayed silent for another ``keepalive`` s after it [MQTT-3.1.2-23]."""
        self._timer = None
        if self.state != _CONNECTED:
            return
        now = self.clock.seconds()
        if self._ping_outstanding and now - self._last_received >= self.keepalive:
            self._fail(f"no answer from server within keepalive ({self.keepalive} s)")
            return
        if now - self._last_sent >= self.keepalive or now - self._last_received >= self.keepalive:
            if not self._ping_outstanding:
                self._ping_outstanding = True
                self.send(Pingreq())
            wait = self.keepalive
        else:
            wait = self.keepalive - (now - self._last_sent)
        self._timer = self.clock.callLater(max(0.1, wait), self._check_keepalive)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class MQTTClientFactory(Factory):
    """Builds :class:`MQTTClientProtocol` for one handler and options.

    ``options`` may be a callable returning :class:`ClientOptions` (asked on
    every connection, e.g. to drop the bridge bit after a refusal).
    """

    protocol = MQTTClientProtocol
    #: no "Starting factory"/"Stopping factory" line per connection attempt
    #: (a reconnecting client logs its attempts itself)
    noisy = False

    def __init__(self, options, handler, clock):
        self.options = options
        self.handler = handler
        self.clock = clock

    def buildProtocol(self, addr):
        options = self.options() if callable(self.options) else self.options
        protocol = self.protocol(options, self.handler, self.clock)
        protocol.factory = self
        return protocol


# --- the application client -------------------------------------------------------


@attrs.define
class _Outgoing:
    packet_id: int
    publish: Publish
    deferred: defer.Deferred
    pubrel_sent: bool = False


class MQTTClient(Service):
    """A reconnecting MQTT client service with an in-memory session.

    :param reactor: provides ``IReactorTime`` (and the endpoint's reactor).
    :param endpoint: an ``IStreamClientEndpoint`` (``clientFromString``).
    :param on_message: ``callback(Message)`` for every PUBLISH received; QoS 2
        messages are delivered once (duplicates before PUBREL are dropped).
    :param retry_policy: ClientService ``retryPolicy``; default
        ``DecorrelatedJitter(1, 30)``.
    :param max_pending: publishes kept while offline or beyond the server's
        Receive Maximum; more raise :class:`OverflowError` (a bounded queue).

    Every other keyword is a :class:`ClientOptions` field.  With
    ``clean_start=False`` (v3) or a v5 Session Expiry Interval, unacknowledged
    messages survive reconnects: the same packet ids are re-sent with DUP when
    the server kept the session, and sent afresh when it did not.
    """

    def __init__(self, reactor, endpoint, on_message: Optional[Callable[[Message], None]] = None,
                 retry_policy=None, max_pending: int = 100_000, **options):
        self.reactor = reactor
        self.options = ClientOptions(**options)
        self.on_message = on_message
        self.max_pending = max_pending
        self.retry_policy = retry_policy or DecorrelatedJitter(1.0, 30.0)
        self.protocol: Optional[MQTTClientProtocol] = None
        self._service = ClientService(endpoint, MQTTClientFactory(self.options, self, reactor),
                                      retryPolicy=self.retry_policy, clock=reactor)
        self._next_id = 1
        self._outgoing: Dict[int, _Outgoing] = {}       # packet id -> in flight
        self._waiting = collections.deque()             # publishes not yet sent
        self._requests: Dict[int, defer.Deferred] = {}  # SUBSCRIBE / UNSUBSCRIBE
        self._subscriptions: Dict[str, Subscription] = {}
        self._inbound_qos2: set = set()
        self._connected_waiters = []

    # --- service -------------------------------------------------------------

    def startService(self):
        super().startService()
        self._service.startService()

    def stopService(self):
        super().stopService()
        protocol = self.protocol
        if protocol is not None:
            protocol.disconnect()
        return self._service.stopService()

    def when_connected(self) -> defer.Deferred:
        """A Deferred firing with the protocol once CONNACK accepted the session."""
        if self.protocol is not None:
            return defer.succeed(self.protocol)
        d = defer.Deferred()
        self._connected_waiters.append(d)
        return d

    # --- API -----------------------------------------------------------------

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False,
                properties: Properties = NO_PROPERTIES) -> defer.Deferred:
        """Publish; the Deferred fires once the flow is complete for ``qos``:
        QoS 0 when written (errback :class:`NotConnected` while offline), QoS 1
        on PUBACK, QoS 2 on PUBCOMP (with the acknowledgement packet)."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, got {qos!r}")
        packet = Publish(topic, payload, qos, retain, False, None, properties)
        if qos == 0:
            if self.protocol is None:
                return defer.fail(NotConnected("QoS 0 publish while not connected"))
            self.protocol.send(packet)
            return defer.succeed(None)
        if len(self._waiting) + len(self._outgoing) >= self.max_pending:
            raise OverflowError(f"{self.max_pending} publishes pending")
        d = defer.Deferred()
        self._waiting.append((packet, d))
        self._pump()
        return d

    def subscribe(self, topic_filter: str, qos: int = 0, no_local: bool = False,
                  retain_as_published: bool = False, retain_handling: int = 0,
                  properties: Properties = NO_PROPERTIES) -> defer.Deferred:
        """SUBSCRIBE (renewed after a reconnect that lost the session); fires
        with the SUBACK's reason codes tuple."""
        sub = Subscription(topic_filter, qos, no_local, retain_as_published, retain_handling)
        self._subscriptions[topic_filter] = sub
        return self._request(lambda pid: Subscribe(pid, (sub,), properties))

    def unsubscribe(self, topic_filter: str) -> defer.Deferred:
        self._subscriptions.pop(topic_filter, None)
        return self._request(lambda pid: Unsubscribe(pid, (topic_filter,)))

    def _request(self, make) -> defer.Deferred:
        d = self.when_connected()

        def send(protocol):
            pid = self._allocate()
            result = defer.Deferred()
            self._requests[pid] = result
            protocol.send(make(pid))
            return result
        return d.addCallback(send)

    def _allocate(self) -> int:
        busy = self._outgoing.keys() | self._requests.keys()
        if len(busy) >= 65535:
            raise OverflowError("all packet identifiers in use")
        pid = self._next_id
        while pid in busy:
            pid = pid % 65535 + 1
        self._next_id = pid % 65535 + 1
        return pid

    def _pump(self) -> None:
        protocol = self.protocol
        if protocol is None:
            return
        while self._waiting and len(self._outgoing) < protocol.send_window \
                and protocol.writable():
            packet, d = self._waiting.popleft()
            pid = self._allocate()
            packet = attrs.evolve(packet, packet_id=pid)
            self._outgoing[pid] = _Outgoing(pid, packet, d)
            protocol.send(packet)

    # --- handler calls from the protocol ------------------------------------------

    def mqtt_connected(self, protocol, connack: Connack) -> None:
        self.protocol = protocol
        reset = getattr(self.retry_policy, "reset", None)
        if reset is not None:
            reset()
        if connack.session_present:
            for out in self._outgoing.values():     # [MQTT-4.4.0-1]
                if out.pubrel_sent:
                    protocol.send(Pubrel(out.packet_id))
                else:
                    protocol.send(attrs.evolve(out.publish, dup=True))
        else:
            # the server has no session: in-flight messages start over as new
            # ones, completed QoS 2 handshakes are done, subscriptions renewed
            redo = []
            for out in self._outgoing.values():
                if out.pubrel_sent:
                    out.deferred.callback(None)
                else:
                    redo.append((attrs.evolve(out.publish, dup=False, packet_id=None),
                                 out.deferred))
            self._outgoing.clear()
            self._waiting.extendleft(reversed(redo))
            self._inbound_qos2.clear()
            if self._subscriptions:
                subs = tuple(self._subscriptions.values())
                pid = self._allocate()
                self._requests[pid] = defer.Deferred()
                protocol.send(Subscribe(pid, subs))
        waiters, self._connected_waiters = self._connected_waiters, []
        for d in waiters:
            d.callback(protocol)
        self._pump()

    def mqtt_refused(self, protocol, connack: Connack) -> None:
        log.warn("MQTT server refused CONNECT of {client_id}: code 0x{code:02X}",
                 client_id=self.options.client_id, code=connack.reason_code)

    def mqtt_disconnected(self, protocol, reason: str) -> None:
        if self.protocol is protocol:
            self.protocol = None
        for pid, d in list(self._requests.items()):
            del self._requests[pid]
            d.errback(NotConnected(f"connection lost before the answer: {reason}"))
        if not self.options.clean_start or (
                self.options.protocol_level == MQTT_5
                and self.options.properties.session_expiry_interval):
            return
        # a clean session ends with the connection: re-send on the next one
        redo = [(attrs.evolve(o.publish, dup=False, packet_id=None), o.deferred)
                for o in self._outgoing.values() if not o.pubrel_sent]
        for o in self._outgoing.values():
            if o.pubrel_sent:
                o.deferred.callback(None)
        self._outgoing.clear()
        self._waiting.extendleft(reversed(redo))

    def mqtt_writable(self, protocol) -> None:
        self._pump()

    def mqtt_packet(self, protocol, packet) -> None:
        kind = packet.__class__
        if kind is Publish:
            self._on_publish(protocol, packet)
        elif kind is Puback or kind is Pubcomp:
            out = self._outgoing.get(packet.packet_id)
            if out is not None and (kind is Pubcomp) == (out.publish.qos == 2):
                del self._outgoing[packet.packet_id]
                out.deferred.callback(packet)
                self._pump()
        elif kind is Pubrec:
            out = self._outgoing.get(packet.packet_id)
            if out is None:
                protocol.send(Pubrel(packet.packet_id, 0x92))
            elif self.options.protocol_level == MQTT_5 and packet.reason_code >= 0x80:
                del self._outgoing[packet.packet_id]   # the flow ends [MQTT-4.3.3-4]
                out.deferred.callback(packet)
                self._pump()
            else:
                out.pubrel_sent = True
                protocol.send(Pubrel(packet.packet_id))
        elif kind is Pubrel:
            self._inbound_qos2.discard(packet.packet_id)
            protocol.send(Pubcomp(packet.packet_id))
        elif kind is Suback or kind is Unsuback:
            d = self._requests.pop(packet.packet_id, None)
            if d is not None:
                d.callback(packet.reason_codes)
        elif kind is Disconnect:
            log.info("MQTT server disconnected {client_id}: reason 0x{code:02X}",
                     client_id=self.options.client_id, code=packet.reason_code)

    def _on_publish(self, protocol, packet: Publish) -> None:
        qos = packet.qos
        if qos == 2:
            if packet.packet_id in self._inbound_qos2:
                protocol.send(Pubrec(packet.packet_id))   # [MQTT-4.3.3-10]
                return
            self._inbound_qos2.add(packet.packet_id)
        if self.on_message is not None:
            message = Message(packet.topic, packet.payload, qos, packet.retain,
                              packet.properties)
            try:
                self.on_message(message)
            except Exception:
                log.failure("on_message callback failed for {topic}", topic=packet.topic)
        if qos == 1:
            protocol.send(Puback(packet.packet_id))
        elif qos == 2:
            protocol.send(Pubrec(packet.packet_id))
