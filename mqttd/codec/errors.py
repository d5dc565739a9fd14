"""Reason codes and the errors that carry them (sans-IO, layer L0).

Every protocol error raised anywhere in mqttd is an :class:`MQTTError` with the
MQTT 5 reason code that describes it and, where one applies, the normative
statement of the OASIS specification it enforces.  The connection layer turns
it into a DISCONNECT (v5), a CONNACK (during CONNECT) or a plain close (v3).
"""
from __future__ import annotations

from typing import Optional


class ReasonCode:
    """MQTT 5 reason codes (OASIS MQTT 5.0, section 2.4)."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    REAUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


class ConnackV3:
    """MQTT 3.1 / 3.1.1 CONNACK return codes (3.1.1 section 3.2.2.3)."""

    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_USER_NAME_OR_PASSWORD = 0x04
    NOT_AUTHORIZED = 0x05


#: How a v5 CONNACK reason code is expressed to a v3 client.
V5_TO_V3_CONNACK = {
    ReasonCode.SUCCESS: ConnackV3.ACCEPTED,
    ReasonCode.UNSUPPORTED_PROTOCOL_VERSION: ConnackV3.UNACCEPTABLE_PROTOCOL_VERSION,
    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID: ConnackV3.IDENTIFIER_REJECTED,
    ReasonCode.SERVER_UNAVAILABLE: ConnackV3.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_BUSY: ConnackV3.SERVER_UNAVAILABLE,
    ReasonCode.SERVER_SHUTTING_DOWN: ConnackV3.SERVER_UNAVAILABLE,
    ReasonCode.BAD_USER_NAME_OR_PASSWORD: ConnackV3.BAD_USER_NAME_OR_PASSWORD,
    ReasonCode.NOT_AUTHORIZED: ConnackV3.NOT_AUTHORIZED,
    ReasonCode.BANNED: ConnackV3.NOT_AUTHORIZED,
}


class MQTTError(Exception):
    """A protocol violation or refusal with its wire meaning.

    :param message: human readable text for the log (never a payload).
    :param reason_code: the MQTT 5 reason code for DISCONNECT / CONNACK.
    :param spec: the normative statement, e.g. ``"MQTT-3.3.1-4"``.
    """

    default_reason_code = ReasonCode.UNSPECIFIED_ERROR
    #: packets a ``PacketReader.feed`` call completed before this error
    decoded_before: list = ()

    def __init__(self, message: str, reason_code: Optional[int] = None,
                 spec: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.reason_code = self.default_reason_code if reason_code is None else reason_code
        self.spec = spec

    def __str__(self) -> str:
        if self.spec:
            return f"{self.message} [{self.spec}]"
        return self.message


class MalformedPacket(MQTTError):
    """The bytes do not form a valid packet (reason 0x81)."""

    default_reason_code = ReasonCode.MALFORMED_PACKET


class ProtocolError(MQTTError):
    """A well-formed packet that breaks a protocol rule (reason 0x82)."""

    default_reason_code = ReasonCode.PROTOCOL_ERROR


class PacketTooLarge(MQTTError):
    """The fixed header announces more than the maximum packet size (0x95)."""

    default_reason_code = ReasonCode.PACKET_TOO_LARGE


class TooManyTopicFilters(MQTTError):
    """A SUBSCRIBE or UNSUBSCRIBE with more topic filters than the reader's
    ``max_topic_filters`` (v5 DISCONNECT 0x97 Quota exceeded, v3 close).
    Raised while decoding, at the first filter over the limit, so the work
    spent on such a packet is bounded by the limit, not by its size."""

    default_reason_code = ReasonCode.QUOTA_EXCEEDED
    #: the refusal kind it is counted as (``BrokerStats.refused``)
    refusal = "max-topic-filters-per-packet"


class TooManyUserProperties(MQTTError):
    """An MQTT 5 property block with more User Properties than the reader's
    ``max_user_properties``.  Not malformed, not a protocol error: a limit
    this server imposes, so 0x97 Quota exceeded ("an implementation or
    administrative imposed limit has been exceeded", MQTT 5.0 §3.14.2.1) --
    v5 DISCONNECT 0x97, or CONNACK 0x97 for a CONNECT.  Raised while decoding,
    at the first pair over the limit, so such a packet costs at most the limit."""

    default_reason_code = ReasonCode.QUOTA_EXCEEDED
    #: the refusal kind it is counted as (``BrokerStats.refused``)
    refusal = "max-user-properties"


class UnsupportedProtocolVersion(MQTTError):
    """CONNECT with an unknown protocol name or level (v5 0x84, v3 0x01).

    ``answer`` is False when the connection must be closed without any
    CONNACK: a 3.x CONNECT whose protocol name is wrong [MQTT-3.1.4-1].
    """

    default_reason_code = ReasonCode.UNSUPPORTED_PROTOCOL_VERSION

    def __init__(self, message: str, protocol_level: Optional[int] = None,
                 spec: Optional[str] = None, answer: bool = True):
        super().__init__(message, spec=spec)
        #: the level the client asked for, used to choose the CONNACK form
        self.protocol_level = protocol_level
        #: whether a CONNACK answers it (False: close only)
        self.answer = answer
