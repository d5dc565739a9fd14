"""``--trace-client ID``: log every packet of chosen clients at info level.

The broker core calls :func:`install` once, when a client whose id is in
``BrokerConfig.trace_clients`` connects; it wraps that one connection's
packet reader and transport, so untraced connections pay nothing.  Lines look
like ``trace c1 <- Publish(topic='a/b', qos=1, ...)`` (``<-`` from the client,
``->`` to it).  Payloads are shown by their length only, never their bytes;
the password and the Authentication Data of CONNECT and AUTH (a SCRAM
exchange's nonces, salt and proofs: enough to test password guesses offline)
likewise (:data:`SECRET_FIELDS`).
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

    def __init__(self, reader, client_id: str):
        self._reader = reader
        self._client_id = client_id

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._reader, name, value)

    def feed(self, data: bytes):
        packets = self._reader.feed(data)
        for packet in packets:
            log.info("trace {client_id} <- {packet}", client_id=self._client_id,
                     packet=describe(packet))
        return packets


class _TracingTransport:
    """Wraps the transport: decodes what is written to log it, writes it unchanged."""

    def __init__(self, transport, client_id: str, level: int):
        self._transport = transport
        self._client_id = client_id
        self._reader = PacketReader(level=level)

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
        for packet in packets:
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
    connection.reader = _TracingReader(connection.reader, client_id)
    connection.transport = _TracingTransport(connection.transport, client_id,
                                             connection.protocol_level)
