"""Packet values to bytes (sans-IO, layer L0).

:func:`encode` writes any packet for protocol level 3 (MQTT 3.1), 4 (3.1.1) or
5 (5.0).  For levels 3 and 4, properties and the other MQTT 5 only fields are
not written.  For level 5 the acknowledgements use the short forms the
specification allows (reason code 0 and no properties: both omitted).

:func:`publish_template` is the fan-out hot path: encode one message once and
produce per-subscriber bytes by splicing in the packet identifier and DUP bit.

A packet that cannot be represented (QoS 3, a QoS 1 PUBLISH without a packet
identifier, an AUTH for v3, a property a packet may not carry, ...) raises
:class:`ValueError`: the encoder never writes what our own reader would reject.
"""
from __future__ import annotations

from typing import Optional

from .packets import (
    AUTH, CONNACK, CONNECT, DISCONNECT, MQTT_3_1, MQTT_3_1_1, MQTT_5, NO_PROPERTIES,
    PROTOCOL_NAMES, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE,
    UNSUBACK, UNSUBSCRIBE, Auth, Connack, Connect, Disconnect, Pingreq, Pingresp,
    Properties, Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe,
    Unsuback, Unsubscribe,
)
from .properties import WILL_PROPERTIES, encode_properties
from .wire import encode_binary, encode_utf8, encode_varint

__all__ = ["encode", "publish_template", "PublishTemplate"]


def _frame(first_byte: int, body: bytes) -> bytes:
    n = len(body)
    if n < 128:
        return bytes((first_byte, n)) + body
    return bytes((first_byte,)) + encode_varint(n) + body


def _empty(props: Properties) -> bool:
    return props is NO_PROPERTIES or props == NO_PROPERTIES


def _check_level(level):
    if level not in (3, 4, 5):
        raise ValueError(f"unknown protocol level {level!r}")


def _packet_id(pid, name):
    if pid is None or not 0 < pid < 65536:
        raise ValueError(f"{name} needs a packet identifier in 1..65535, got {pid!r}")
    return pid.to_bytes(2, "big")


def _encode_connect(p: Connect, level: int) -> bytes:
    # The level byte is the packet's; the layout is ``level``'s.  They may only
    # differ with an explicit protocol_name (to write odd CONNECTs in tests).
    if p.protocol_level != level and not p.protocol_name:
        raise ValueError(f"Connect.protocol_level {p.protocol_level} encoded for level {level}")
    name = p.protocol_name or PROTOCOL_NAMES[level]
    flags = 0
    if p.clean_start:
        flags |= 0x02
    will = p.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"will QoS must be 0, 1 or 2, got {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if p.password is not None:
        if p.username is None and level != MQTT_5:
            raise ValueError("a password needs a user name before MQTT 5 [MQTT-3.1.2-22]")
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    level_byte = p.protocol_level
    if p.bridge:
        if p.protocol_level not in (MQTT_3_1, MQTT_3_1_1):
            raise ValueError("the bridge bit exists only for MQTT 3.1 and 3.1.1")
        level_byte |= 0x80
    parts = [encode_utf8(name), bytes((level_byte, flags)),
             p.keepalive.to_bytes(2, "big")]
    if level == MQTT_5:
        parts.append(encode_properties(p.properties, CONNECT))
    parts.append(encode_utf8(p.client_id))
    if will is not None:
        if level == MQTT_5:
            parts.append(encode_properties(will.properties, WILL_PROPERTIES))
        parts.append(encode_utf8(will.topic))
        parts.append(encode_binary(will.payload))
    if p.username is not None:
        parts.append(encode_utf8(p.username))
    if p.password is not None:
        parts.append(encode_binary(p.password))
    return _frame(CONNECT << 4, b"".join(parts))


def _encode_connack(p: Connack, level: int) -> bytes:
    flags = 1 if p.session_present and level != MQTT_3_1 else 0
    body = bytes((flags, p.reason_code))
    if level == MQTT_5:
        body += encode_properties(p.properties, CONNACK)
    return _frame(CONNACK << 4, body)


def _encode_publish(p: Publish, level: int) -> bytes:
    qos = p.qos
    if qos not in (0, 1, 2):
        raise ValueError(f"PUBLISH QoS must be 0, 1 or 2, got {qos}")
    first = (PUBLISH << 4) | (qos << 1)
    if p.retain:
        first |= 1
    if p.dup:
        if not qos:
            raise ValueError("DUP must be 0 on a QoS 0 PUBLISH [MQTT-3.3.1-2]")
        first |= 8
    parts = [encode_utf8(p.topic)]
    if qos:
        parts.append(_packet_id(p.packet_id, "a QoS > 0 PUBLISH"))
    elif p.packet_id is not None:
        raise ValueError("a QoS 0 PUBLISH has no packet identifier [MQTT-2.2.1-2]")
    if level == MQTT_5:
        parts.append(encode_properties(p.properties, PUBLISH))
    elif not p.topic:
        raise ValueError("an empty topic name needs MQTT 5 and a topic alias")
    parts.append(p.payload)
    return _frame(first, b"".join(parts))


def _make_ack_encoder(ptype, first_byte):
    def encode_ack(p, level):
        pid = _packet_id(p.packet_id, type(p).__name__.upper())
        if level != MQTT_5:
            return bytes((first_byte, 2)) + pid
        if _empty(p.properties):
            if p.reason_code == 0:
                return bytes((first_byte, 2)) + pid          # [MQTT-3.4.2.1] short form
            return bytes((first_byte, 3)) + pid + bytes((p.reason_code,))
        body = pid + bytes((p.reason_code,)) + encode_properties(p.properties, ptype)
        return _frame(first_byte, body)
    return encode_ack


def _encode_subscribe(p: Subscribe, level: int) -> bytes:
    if not p.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one subscription [MQTT-3.8.3-3]")
    parts = [_packet_id(p.packet_id, "SUBSCRIBE")]
    if level == MQTT_5:
        parts.append(encode_properties(p.properties, SUBSCRIBE))
    for s in p.subscriptions:
        if s.qos not in (0, 1, 2):
            raise ValueError(f"subscription QoS must be 0, 1 or 2, got {s.qos}")
        opts = s.qos
        if level == MQTT_5:
            if s.retain_handling not in (0, 1, 2):
                raise ValueError(f"retain handling must be 0, 1 or 2, got {s.retain_handling}")
            opts |= ((4 if s.no_local else 0) | (8 if s.retain_as_published else 0)
                     | (s.retain_handling << 4))
        parts.append(encode_utf8(s.topic_filter))
        parts.append(bytes((opts,)))
    return _frame((SUBSCRIBE << 4) | 2, b"".join(parts))


def _encode_suback(p: Suback, level: int) -> bytes:
    if not p.reason_codes:
        raise ValueError("SUBACK needs at least one reason code")
    parts = [_packet_id(p.packet_id, "SUBACK")]
    if level == MQTT_5:
        parts.append(encode_properties(p.properties, SUBACK))
    parts.append(bytes(p.reason_codes))
    return _frame(SUBACK << 4, b"".join(parts))


def _encode_unsubscribe(p: Unsubscribe, level: int) -> bytes:
    if not p.topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter [MQTT-3.10.3-2]")
    parts = [_packet_id(p.packet_id, "UNSUBSCRIBE")]
    if level == MQTT_5:
        parts.append(encode_properties(p.properties, UNSUBSCRIBE))
    parts.extend(encode_utf8(f) for f in p.topic_filters)
    return _frame((UNSUBSCRIBE << 4) | 2, b"".join(parts))


def _encode_unsuback(p: Unsuback, level: int) -> bytes:
    pid = _packet_id(p.packet_id, "UNSUBACK")
    if level != MQTT_5:
        return bytes((UNSUBACK << 4, 2)) + pid
    body = pid + encode_properties(p.properties, UNSUBACK) + bytes(p.reason_codes)
    return _frame(UNSUBACK << 4, body)


_PINGREQ = bytes((0xC0, 0))
_PINGRESP = bytes((0xD0, 0))
_EMPTY_DISCONNECT = bytes((0xE0, 0))
_EMPTY_AUTH = bytes((0xF0, 0))


def _encode_disconnect(p: Disconnect, level: int) -> bytes:
    if level != MQTT_5:
        return _EMPTY_DISCONNECT
    if _empty(p.properties):
        if p.reason_code == 0:
            return _EMPTY_DISCONNECT                            # MQTT 5.0 §3.14.2.1
        return bytes((0xE0, 1, p.reason_code))
    return _frame(0xE0, bytes((p.reason_code,)) + encode_properties(p.properties, DISCONNECT))


def _encode_auth(p: Auth, level: int) -> bytes:
    if level != MQTT_5:
        raise ValueError("AUTH exists only in MQTT 5")
    if p.reason_code == 0 and _empty(p.properties):
        return _EMPTY_AUTH                                      # MQTT 5.0 §3.15.2.1
    return _frame(0xF0, bytes((p.reason_code,)) + encode_properties(p.properties, AUTH))


_ENCODERS = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: _make_ack_encoder(PUBACK, PUBACK << 4),
    Pubrec: _make_ack_encoder(PUBREC, PUBREC << 4),
    Pubrel: _make_ack_encoder(PUBREL, (PUBREL << 4) | 2),
    Pubcomp: _make_ack_encoder(PUBCOMP, PUBCOMP << 4),
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _encode_unsuback,
    Pingreq: lambda p, level: _PINGREQ,
    Pingresp: lambda p, level: _PINGRESP,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet, level: int) -> bytes:
    """The bytes of ``packet`` for protocol ``level`` (3, 4 or 5)."""
    _check_level(level)
    try:
        encoder = _ENCODERS[type(packet)]
    except KeyError:
        raise TypeError(f"not an MQTT packet: {packet!r}") from None
    return encoder(packet, level)


class PublishTemplate:
    """One PUBLISH encoded once, re-stamped per receiver.

    :meth:`encode` splices only the packet identifier and the DUP bit into the
    pre-built bytes; for QoS 0 it returns the very same ``bytes`` object.
    """

    __slots__ = ("qos", "_bytes", "_head", "_head_dup", "_tail")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool,
                 properties: Properties, level: int):
        _check_level(level)
        self.qos = qos
        if qos == 0:
            self._bytes = _encode_publish(
                Publish(topic, payload, 0, retain, False, None, properties), level)
            return
        full = _encode_publish(
            Publish(topic, payload, qos, retain, False, 1, properties), level)
        header = 2
        while full[header - 1] & 0x80:      # skip the Remaining Length bytes
            header += 1
        pid_at = header + 2 + ((full[header] << 8) | full[header + 1])
        self._head = full[:pid_at]
        self._head_dup = bytes((full[0] | 0x08,)) + full[1:pid_at]
        self._tail = full[pid_at + 2:]

    @classmethod
    def from_raw(cls, raw: bytes, qos: int) -> "PublishTemplate":
        """A template from a decoded PUBLISH's own bytes (``Publish.raw``).

        The result sends the same packet with the DUP bit clear and, for QoS >
        0, another packet identifier.  Valid for receivers of the same protocol
        family (3/4, or 5) at the same QoS and retain flag.
        """
        self = cls.__new__(cls)
        self.qos = qos
        if qos == 0:
            self._bytes = raw
            return self
        header = 2
        while raw[header - 1] & 0x80:
            header += 1
        # split lazily in encode(): most raw templates serve one receiver
        self._bytes = raw
        self._tail = header + 2 + ((raw[header] << 8) | raw[header + 1])
        self._head = None
        return self

    def _split_raw(self) -> None:
        raw = self._bytes
        pid_at = self._tail
        first = raw[0] & 0xF7
        self._head = bytes((first,)) + raw[1:pid_at]
        self._head_dup = bytes((first | 0x08,)) + raw[1:pid_at]
        self._tail = raw[pid_at + 2:]

    def encode(self, packet_id: Optional[int] = None, dup: bool = False) -> bytes:
        """The bytes for one receiver (``packet_id`` required for QoS > 0)."""
        if self.qos == 0:
            if dup or packet_id is not None:
                raise ValueError("a QoS 0 PUBLISH has no packet identifier and no DUP")
            return self._bytes
        if packet_id is None or not 0 < packet_id < 65536:
            raise ValueError(f"packet identifier must be in 1..65535, got {packet_id!r}")
        if not self._head:                    # a raw template
            if self._head is None:            # first receiver: one copy
                return self._stamp_raw(packet_id, dup)
            self._split_raw()                 # more receivers: split once
        return b"".join((self._head_dup if dup else self._head,
                         packet_id.to_bytes(2, "big"), self._tail))

    def _stamp_raw(self, packet_id: int, dup: bool) -> bytes:
        self._head = False                    # next time: split
        out = bytearray(self._bytes)
        out[0] = (out[0] | 0x08) if dup else (out[0] & 0xF7)
        pid_at = self._tail
        out[pid_at] = packet_id >> 8
        out[pid_at + 1] = packet_id & 0xFF
        return bytes(out)


def publish_template(topic: str, payload: bytes, qos: int, retain: bool,
                     properties: Properties, level: int) -> PublishTemplate:
    """Encode a PUBLISH once for many receivers; see :class:`PublishTemplate`."""
    return PublishTemplate(topic, payload, qos, retain, properties, level)
