"""Frozen packet values for MQTT 3.1 (level 3), 3.1.1 (level 4) and 5.0 (level 5).

One class per control packet type.  The classes are a superset of the three
protocol versions: fields that only exist in MQTT 5 (properties, reason codes on
acknowledgements) keep their defaults when a v3 packet is decoded, and are
ignored (or, where information would be lost, rejected) when encoding for v3.

No Twisted here: this module is part of the sans-IO codec (layer L0).
"""
from __future__ import annotations

from typing import Optional, Tuple

import attrs

# Protocol levels carried in the CONNECT variable header.
MQTT_3_1 = 3
MQTT_3_1_1 = 4
MQTT_5 = 5
PROTOCOL_NAMES = {MQTT_3_1: "MQIsdp", MQTT_3_1_1: "MQTT", MQTT_5: "MQTT"}

# Control packet types (high nibble of the fixed header's first byte).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15


@attrs.frozen(slots=True)
class Properties:
    """MQTT 5 properties; every field is ``None`` (absent) unless set.

    ``user_properties`` keeps its pairs in wire order (it may repeat names);
    ``subscription_identifiers`` may hold several values in a PUBLISH.
    The identifier, wire type and the packets each property may appear in are
    in :mod:`mqttd.codec.properties`.
    """

    payload_format_indicator: Optional[int] = None          # 0x01 byte
    message_expiry_interval: Optional[int] = None           # 0x02 four-byte int
    content_type: Optional[str] = None                      # 0x03 utf-8
    response_topic: Optional[str] = None                    # 0x08 utf-8
    correlation_data: Optional[bytes] = None                # 0x09 binary
    subscription_identifiers: Tuple[int, ...] = ()          # 0x0B varint (repeatable in PUBLISH)
    session_expiry_interval: Optional[int] = None           # 0x11 four-byte int
    assigned_client_identifier: Optional[str] = None        # 0x12 utf-8
    server_keep_alive: Optional[int] = None                 # 0x13 two-byte int
    authentication_method: Optional[str] = None            # 0x15 utf-8
    authentication_data: Optional[bytes] = None             # 0x16 binary
    request_problem_information: Optional[int] = None       # 0x17 byte
    will_delay_interval: Optional[int] = None               # 0x18 four-byte int
    request_response_information: Optional[int] = None      # 0x19 byte
    response_information: Optional[str] = None              # 0x1A utf-8
    server_reference: Optional[str] = None                  # 0x1C utf-8
    reason_string: Optional[str] = None                     # 0x1F utf-8
    receive_maximum: Optional[int] = None                   # 0x21 two-byte int
    topic_alias_maximum: Optional[int] = None               # 0x22 two-byte int
    topic_alias: Optional[int] = None                       # 0x23 two-byte int
    maximum_qos: Optional[int] = None                       # 0x24 byte
    retain_available: Optional[int] = None                  # 0x25 byte
    user_properties: Tuple[Tuple[str, str], ...] = ()       # 0x26 utf-8 pair (repeatable)
    maximum_packet_size: Optional[int] = None               # 0x27 four-byte int
    wildcard_subscription_available: Optional[int] = None   # 0x28 byte
    subscription_identifier_available: Optional[int] = None  # 0x29 byte
    shared_subscription_available: Optional[int] = None     # 0x2A byte


#: The empty property set, shared (Properties is immutable).
NO_PROPERTIES = Properties()


@attrs.frozen(slots=True)
class Will:
    """The will message carried in a CONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@attrs.frozen(slots=True)
class Connect:
    protocol_level: int = MQTT_3_1_1
    client_id: str = ""
    clean_start: bool = True          # "clean session" in v3
    keepalive: int = 0
    username: Optional[str] = None
    password: Optional[bytes] = None
    will: Optional[Will] = None
    properties: Properties = NO_PROPERTIES
    protocol_name: str = ""          # "" means: the standard name for protocol_level
    #: the "bridge bit": protocol level | 0x80 on the wire (MQTT 3.1 / 3.1.1 only),
    #: mosquitto's ``try_private`` marking a broker-to-broker bridge connection
    bridge: bool = False

    packet_type = CONNECT


@attrs.frozen(slots=True)
class Connack:
    session_present: bool = False
    reason_code: int = 0              # v3: the return code (0..5)
    properties: Properties = NO_PROPERTIES

    packet_type = CONNACK


@attrs.frozen(slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: Optional[int] = None   # required for qos > 0, absent for qos 0
    properties: Properties = NO_PROPERTIES
    #: the packet's own bytes when it was decoded (not part of its value): the
    #: broker forwards them unchanged when the form it must send is the same
    raw: Optional[bytes] = attrs.field(default=None, eq=False, repr=False)

    packet_type = PUBLISH


@attrs.frozen(slots=True)
class Puback:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES

    packet_type = PUBACK


@attrs.frozen(slots=True)
class Pubrec:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES

    packet_type = PUBREC


@attrs.frozen(slots=True)
class Pubrel:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES

    packet_type = PUBREL


@attrs.frozen(slots=True)
class Pubcomp:
    packet_id: int
    reason_code: int = 0
    properties: Properties = NO_PROPERTIES

    packet_type = PUBCOMP


@attrs.frozen(slots=True)
class Subscription:
    """One topic filter with its options in a SUBSCRIBE."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False            # v5 only
    retain_as_published: bool = False  # v5 only
    retain_handling: int = 0          # v5 only: 0, 1 or 2


@attrs.frozen(slots=True)
class Subscribe:
    packet_id: int
    subscriptions: Tuple[Subscription, ...]
    properties: Properties = NO_PROPERTIES

    packet_type = SUBSCRIBE


@attrs.frozen(slots=True)
class Suback:
    packet_id: int
    reason_codes: Tuple[int, ...]     # v3: granted QoS or 0x80 per filter
    properties: Properties = NO_PROPERTIES

    packet_type = SUBACK


@attrs.frozen(slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: Tuple[str, ...]
    properties: Properties = NO_PROPERTIES

    packet_type = UNSUBSCRIBE


@attrs.frozen(slots=True)
class Unsuback:
    packet_id: int
    reason_codes: Tuple[int, ...] = ()  # v5 only; v3 UNSUBACK carries none
    properties: Properties = NO_PROPERTIES

    packet_type = UNSUBACK


@attrs.frozen(slots=True)
class Pingreq:
    packet_type = PINGREQ


@attrs.frozen(slots=True)
class Pingresp:
    packet_type = PINGRESP


@attrs.frozen(slots=True)
class Disconnect:
    reason_code: int = 0              # v5 only; v3 DISCONNECT is empty
    properties: Properties = NO_PROPERTIES

    packet_type = DISCONNECT


@attrs.frozen(slots=True)
class Auth:
    reason_code: int = 0              # v5 only packet
    properties: Properties = NO_PROPERTIES

    packet_type = AUTH


PACKET_CLASSES = {
    CONNECT: Connect, CONNACK: Connack, PUBLISH: Publish, PUBACK: Puback,
    PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp, SUBSCRIBE: Subscribe,
    SUBACK: Suback, UNSUBSCRIBE: Unsubscribe, UNSUBACK: Unsuback,
    PINGREQ: Pingreq, PINGRESP: Pingresp, DISCONNECT: Disconnect, AUTH: Auth,
}
