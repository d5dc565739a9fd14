"""``--trace-client ID``: log every packet of chosen clients at info level.

The broker core calls :func:`install` once, when a client whose id is in
``BrokerConfig.trace_clients`` connects; it wraps that one connection's
packet reader and transport, so untraced connections pay nothing.  Lines look
like ``trace c1 <- Publish(topic='a/b', qos=1, ...)`` (``<-`` from the client,
``->`` to it).  Payloads are shown by their length only, never their bytes;
the password and the Authentication Data of CONNECT and AUTH (a SCRAM
exchange's nonces, salt and proofs: enough to test password guesses offline)
likewise (:data:`SECRET_FIELDS`).  A traced connection writes at most
:data:`TRACE_LINES_PER_SECOND` lines a second; the rest are counted and one
line says how many were left out (REVIEW-S10 S15: the traced client wrote
55 bytes of log per byte it sent, 33,906 lines for one 40 KB write).
"""
from __future__ import annotations

import attrs
from twisted.logger import Logger

from mqttd.codec.errors import MQTTError
from mqttd.codec.packets import Properties
from mqttd.codec.reader import PacketReader

log = Logger(namespace="mqttd.trace")

#: fields shown as ``<hidden>`` / ``<N bytes>``, never by value: passwords and
#: enhanced-authentication data (REVIEW-SEC2 N17)
SECRET_FIELDS = frozenset({"password", "authentication_data"})

#: trace lines one traced connection may write per second (both directions)
TRACE_LINES_PER_SECOND = 1000


class _LineBudget:
    """At most :data:`TRACE_LINES_PER_SECOND` lines per one-second window for
    one traced connection; suppressed lines are reported by one line when the
    next window opens."""

    __slots__ = ("clock", "client_id", "window", "used", "suppressed")

    def __init__(self, clock, client_id: str):
        self.clock = clock
        self.client_id = client_id
        self.window = clock.seconds()
        self.used = 0
        self.suppressed = 0

    def take(self) -> bool:
        now = self.clock.seconds()
        if now - self.window >= 1.0:
            if self.suppressed:
                log.info("trace {client_id}: {count} lines left out (at most {limit} a second)",
                         client_id=self.client_id, count=self.suppressed,
                         limit=TRACE_LINES_PER_SECOND)
            self.window, self.used, self.suppressed = now, 0, 0
        if self.used >= TRACE_LINES_PER_SECOND:
            self.suppressed += 1
            return False
        self.used += 1
        return True


def describe(packet) -> str:
    """``Publish(topic='a', qos=1, packet_id=3, payload=<5 bytes>)``: no payload bytes,
    no password, no authentication data (:data:`SECRET_FIELDS`, nested
    properties and wills included); empty properties left out."""
    if not attrs.has(packet.__class__):
        return repr(packet)
    parts = []
    for field in attrs.fields(packet.__class__):
        if field.name == "raw" or field.repr is False:
            continue  # the received bytes, kept by the codec for forwarding
        value = getattr(packet, field.name)
        if field.name in SECRET_FIELDS:
            if value is None:
                text = "None"
            elif field.name != "password" and isinstance(value, (bytes, bytearray)):
                text = f"<hidden, {len(value)} bytes>"  # a password's length is hidden too
            else:
                text = "<hidden>"
        elif field.name == "payload" and isinstance(value, (bytes, bytearray)):
            text = f"<{len(value)} bytes>"
        elif field.name == "properties" and value == Properties():
            continue
        elif attrs.has(value.__class__):
            text = describe(value)
        else:
            text = repr(value)
        parts.append(f"{field.name}={text}")
    return f"{packet.__class__.__name__}({', '.join(parts)})"


class _TracingReader:
    """Wraps the connection's PacketReader: logs each packet it returns."""

    def __init__(self, reader, client_id: str, budget: _LineBudget):
        self._reader = reader
        self._client_id = client_id
        self._budget = budget

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._reader, name, value)

    def feed(self, data: bytes):
        packets = self._reader.feed(data)
        take = self._budget.take
        for packet in packets:
            if take():
                log.info("trace {client_id} <- {packet}", client_id=self._client_id,
                         packet=describe(packet))
        return packets


class _TracingTransport:
    """Wraps the transport: decodes what is written to log it, writes it unchanged."""

    def __init__(self, transport, client_id: str, level: int, budget: _LineBudget):
        self._transport = transport
        self._client_id = client_id
        self._reader = PacketReader(level=level)
        self._budget = budget

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        try:
            packets = self._reader.feed(bytes(data))
        except MQTTError as error:  # never let tracing break the connection
            log.info("trace {client_id} -> undecodable bytes: {error}",
                     client_id=self._client_id, error=error)
            self._reader = PacketReader(level=self._reader.level)
            packets = []
        take = self._budget.take
        for packet in packets:
            if take():
                log.info("trace {client_id} -> {packet}", client_id=self._client_id,
                         packet=describe(packet))
        self._transport.write(data)

    def writeSequence(self, data) -> None:
        for chunk in data:
            self.write(chunk)


def install(connection, connect_packet) -> None:
    """Trace ``connection`` from now on; logs its CONNECT first."""
    client_id = connection.client_id
    log.info("trace {client_id} <- {packet}", client_id=client_id,
             packet=describe(connect_packet))
    budget = _LineBudget(connection.clock, client_id)
    connection.reader = _TracingReader(connection.reader, client_id, budget)
    connection.transport = _TracingTransport(connection.transport, client_id,
                                             connection.protocol_level, budget)
