"""MQTT 5 properties: the table and its codec (sans-IO, layer L0).

OASIS MQTT 5.0 section 2.2.2.2 lists every property with its identifier, data
type and the packets it may appear in; :data:`PROPERTIES` is that table.  The
Will Properties of a CONNECT payload are addressed with the pseudo packet type
:data:`WILL_PROPERTIES` (0, which is not a real control packet type).
"""
from __future__ import annotations

from typing import Dict, Tuple, Union

import attrs

from .errors import MalformedPacket, ProtocolError, ReasonCode, TooManyUserProperties
from .packets import (
    AUTH, CONNACK, CONNECT, DISCONNECT, NO_PROPERTIES, PUBACK, PUBCOMP, PUBLISH,
    PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, Properties,
)
from .wire import (
    decode_binary, decode_string_pair, decode_utf8, decode_varint,
    encode_binary, encode_string_pair, encode_utf8, encode_varint,
)

#: Pseudo packet type for the Will Properties inside a CONNECT payload.
WILL_PROPERTIES = 0

# Wire types (MQTT 5.0 section 1.5).
BYTE = "byte"
U16 = "u16"
U32 = "u32"
VARINT = "varint"
UTF8 = "utf8"
BINARY = "binary"
STRING_PAIR = "string_pair"


@attrs.frozen
class PropertySpec:
    """One row of the property table (MQTT 5.0 Table 2-4)."""

    identifier: int
    name: str                      # the field name on :class:`Properties`
    wire_type: str
    packet_types: frozenset        # packet type numbers; WILL_PROPERTIES for the will
    repeatable: bool = False       # may appear more than once (in some packet)


def _spec(identifier, name, wire_type, packet_types, repeatable=False):
    return PropertySpec(identifier, name, wire_type, frozenset(packet_types), repeatable)


_ACKS = (PUBACK, PUBREC, PUBREL, PUBCOMP)

PROPERTIES: Dict[int, PropertySpec] = {s.identifier: s for s in (
    _spec(0x01, "payload_format_indicator", BYTE, (PUBLISH, WILL_PROPERTIES)),
    _spec(0x02, "message_expiry_interval", U32, (PUBLISH, WILL_PROPERTIES)),
    _spec(0x03, "content_type", UTF8, (PUBLISH, WILL_PROPERTIES)),
    _spec(0x08, "response_topic", UTF8, (PUBLISH, WILL_PROPERTIES)),
    _spec(0x09, "correlation_data", BINARY, (PUBLISH, WILL_PROPERTIES)),
    # repeatable in PUBLISH only; at most once in SUBSCRIBE (MQTT 5.0 3.8.2.1.2)
    _spec(0x0B, "subscription_identifiers", VARINT, (PUBLISH, SUBSCRIBE), True),
    _spec(0x11, "session_expiry_interval", U32, (CONNECT, CONNACK, DISCONNECT)),
    _spec(0x12, "assigned_client_identifier", UTF8, (CONNACK,)),
    _spec(0x13, "server_keep_alive", U16, (CONNACK,)),
    _spec(0x15, "authentication_method", UTF8, (CONNECT, CONNACK, AUTH)),
    _spec(0x16, "authentication_data", BINARY, (CONNECT, CONNACK, AUTH)),
    _spec(0x17, "request_problem_information", BYTE, (CONNECT,)),
    _spec(0x18, "will_delay_interval", U32, (WILL_PROPERTIES,)),
    _spec(0x19, "request_response_information", BYTE, (CONNECT,)),
    _spec(0x1A, "response_information", UTF8, (CONNACK,)),
    _spec(0x1C, "server_reference", UTF8, (CONNACK, DISCONNECT)),
    _spec(0x1F, "reason_string", UTF8,
          (CONNACK, *_ACKS, SUBACK, UNSUBACK, DISCONNECT, AUTH)),
    _spec(0x21, "receive_maximum", U16, (CONNECT, CONNACK)),
    _spec(0x22, "topic_alias_maximum", U16, (CONNECT, CONNACK)),
    _spec(0x23, "topic_alias", U16, (PUBLISH,)),
    _spec(0x24, "maximum_qos", BYTE, (CONNACK,)),
    _spec(0x25, "retain_available", BYTE, (CONNACK,)),
    _spec(0x26, "user_properties", STRING_PAIR,
          (CONNECT, CONNACK, PUBLISH, WILL_PROPERTIES, *_ACKS, SUBSCRIBE, SUBACK,
           UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH), True),
    _spec(0x27, "maximum_packet_size", U32, (CONNECT, CONNACK)),
    _spec(0x28, "wildcard_subscription_available", BYTE, (CONNACK,)),
    _spec(0x29, "subscription_identifier_available", BYTE, (CONNACK,)),
    _spec(0x2A, "shared_subscription_available", BYTE, (CONNACK,)),
)}

#: Property specs by :class:`Properties` field name.
BY_NAME: Dict[str, PropertySpec] = {s.name: s for s in PROPERTIES.values()}

_ENCODE_ORDER = tuple(sorted(PROPERTIES.values(), key=lambda s: s.identifier))

_PACKET_NAMES = {
    WILL_PROPERTIES: "Will Properties", CONNECT: "CONNECT", CONNACK: "CONNACK",
    PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC", PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK", DISCONNECT: "DISCONNECT",
    AUTH: "AUTH",
}

# Value rules: identifier -> (predicate, description, reason code, spec).
# Every one of them is a Protocol Error in MQTT 5.0 section 3.x.
_BOOL = (lambda v: v in (0, 1), "0 or 1")
_VALUE_RULES = {
    0x01: (*_BOOL, ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.3.2.3.2"),
    0x0B: (lambda v: v != 0, "non-zero", ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.3.2.3.8"),
    0x17: (*_BOOL, ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.1.2.11.7"),
    0x19: (*_BOOL, ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.1.2.11.6"),
    0x21: (lambda v: v != 0, "non-zero", ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.1.2.11.3"),
    0x23: (lambda v: v != 0, "non-zero", ReasonCode.TOPIC_ALIAS_INVALID, "MQTT-3.3.2-8"),
    0x24: (*_BOOL, ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.2.2.3.4"),
    0x25: (*_BOOL, ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.2.2.3.5"),
    0x27: (lambda v: v != 0, "non-zero", ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.1.2.11.4"),
    0x28: (*_BOOL, ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.2.2.3.11"),
    0x29: (*_BOOL, ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.2.2.3.12"),
    0x2A: (*_BOOL, ReasonCode.PROTOCOL_ERROR, "MQTT 5.0 §3.2.2.3.13"),
}

_EMPTY_PROPERTIES = b"\x00"


def encode_properties(props: Properties, packet_type: int) -> bytes:
    """Encode ``props`` for ``packet_type``, with the Property Length prefix.

    Properties are written in identifier order, user properties in their
    given order.  A property that ``packet_type`` may not carry raises
    :class:`ValueError` (a caller bug).
    """
    if props is NO_PROPERTIES:
        return _EMPTY_PROPERTIES
    parts = []
    for spec in _ENCODE_ORDER:
        value = getattr(props, spec.name)
        if value is None or value == ():
            continue
        if packet_type not in spec.packet_types:
            raise ValueError(f"property {spec.name} is not allowed in "
                             f"{_PACKET_NAMES.get(packet_type, packet_type)}")
        ident = bytes((spec.identifier,))
        wire_type = spec.wire_type
        if spec.repeatable:
            if spec.identifier == 0x0B and packet_type == SUBSCRIBE and len(value) > 1:
                raise ValueError("SUBSCRIBE carries at most one subscription identifier")
            enc = encode_string_pair if wire_type == STRING_PAIR else encode_varint
            for item in value:
                parts.append(ident)
                parts.append(enc(item))
            continue
        parts.append(ident)
        if wire_type == BYTE:
            parts.append(bytes((value,)))
        elif wire_type == U16:
            parts.append(value.to_bytes(2, "big"))
        elif wire_type == U32:
            parts.append(value.to_bytes(4, "big"))
        elif wire_type == UTF8:
            parts.append(encode_utf8(value))
        elif wire_type == BINARY:
            parts.append(encode_binary(value))
        else:  # pragma: no cover - table has no other non-repeatable types
            raise AssertionError(wire_type)
    body = b"".join(parts)
    return encode_varint(len(body)) + body


def decode_properties(data: Union[bytes, bytearray, memoryview], offset: int,
                      packet_type: int, end: int = None,
                      max_user_properties: int = 0) -> Tuple[Properties, int]:
    """Decode a property block (Property Length + properties) at ``offset``.

    Returns ``(Properties, new_offset)``.  ``end`` bounds the enclosing packet
    (defaults to ``len(data)``).  ``max_user_properties`` (0: no limit) bounds
    the User Properties of the block: decoding stops at the first one over it
    with :class:`~mqttd.codec.errors.TooManyUserProperties` (0x97), so its
    cost is bounded by the limit, not by the packet size.
    """
    if end is None:
        end = len(data)
    length, offset = decode_varint(data, offset, end)
    if length == 0:
        return NO_PROPERTIES, offset
    stop = offset + length
    if stop > end:
        raise MalformedPacket("property length runs past the end of the packet",
                              spec="MQTT 5.0 §2.2.2.1")
    where = _PACKET_NAMES.get(packet_type, str(packet_type))
    fields = {}
    user_properties = []
    subscription_identifiers = []
    while offset < stop:
        ident = data[offset]
        offset += 1
        spec = PROPERTIES.get(ident)
        if spec is None:
            raise MalformedPacket(f"unknown property identifier 0x{ident:02x} in {where}",
                                  spec="MQTT 5.0 §2.2.2.2")
        if packet_type not in spec.packet_types:
            raise MalformedPacket(f"property {spec.name} is not allowed in {where}",
                                  spec="MQTT 5.0 §2.2.2.2")
        wire_type = spec.wire_type
        if wire_type == BYTE:
            if offset >= stop:
                raise MalformedPacket(f"property {spec.name} is truncated",
                                      spec="MQTT 5.0 §2.2.2.2")
            value = data[offset]
            offset += 1
        elif wire_type == U16:
            if offset + 2 > stop:
                raise MalformedPacket(f"property {spec.name} is truncated",
                                      spec="MQTT 5.0 §2.2.2.2")
            value = (data[offset] << 8) | data[offset + 1]
            offset += 2
        elif wire_type == U32:
            if offset + 4 > stop:
                raise MalformedPacket(f"property {spec.name} is truncated",
                                      spec="MQTT 5.0 §2.2.2.2")
            value = int.from_bytes(data[offset:offset + 4], "big")
            offset += 4
        elif wire_type == VARINT:
            value, offset = decode_varint(data, offset, stop)
        elif wire_type == UTF8:
            value, offset = decode_utf8(data, offset, stop)
        elif wire_type == BINARY:
            value, offset = decode_binary(data, offset, stop)
        else:
            value, offset = decode_string_pair(data, offset, stop)

        rule = _VALUE_RULES.get(ident)
        if rule is not None and not rule[0](value):
            raise ProtocolError(f"property {spec.name} must be {rule[1]}, got {value}",
                                reason_code=rule[2], spec=rule[3])
        if ident == 0x26:
            if max_user_properties and len(user_properties) >= max_user_properties:
                raise TooManyUserProperties(
                    f"{where} with more than {max_user_properties} user properties "
                    f"(the limit per packet)")
            user_properties.append(value)
        elif ident == 0x0B:
            if subscription_identifiers and packet_type != PUBLISH:
                raise ProtocolError(
                    f"It is a Protocol Error to include subscription_identifiers "
                    f"more than once in {where}", spec="MQTT 5.0 §3.8.2.1.2")
            subscription_identifiers.append(value)
        else:
            if spec.name in fields:
                raise ProtocolError(
                    f"It is a Protocol Error to include {spec.name} more than once",
                    spec="MQTT 5.0 §2.2.2.2")
            fields[spec.name] = value
    if user_properties:
        fields["user_properties"] = tuple(user_properties)
    if subscription_identifiers:
        fields["subscription_identifiers"] = tuple(subscription_identifiers)
    return Properties(**fields), offset
