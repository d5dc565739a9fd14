"""Incremental MQTT packet reader (sans-IO, layer L0).

:class:`PacketReader` turns a byte stream into packet values.  Bytes may arrive
split anywhere, or many packets per chunk.  It never holds more than one
incomplete packet, and it checks the maximum packet size from the fixed header
alone, before any of the body is buffered.

It decodes every packet type in both directions; which side may send what is
the connection layer's business.  Every violation raises an
:class:`~mqttd.codec.errors.MQTTError` carrying its reason code and the
normative statement it enforces; after one the reader refuses further input.
"""
from __future__ import annotations

from typing import List, Optional

from .errors import (
    MalformedPacket, MQTTError, PacketTooLarge, ProtocolError, ReasonCode,
    TooManyTopicFilters, UnsupportedProtocolVersion,
)
from .packets import (
    AUTH, CONNACK, CONNECT, DISCONNECT, MQTT_3_1, MQTT_3_1_1, MQTT_5,
    NO_PROPERTIES, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, Auth, Connack, Connect,
    Disconnect, Pingreq, Pingresp, Puback, Pubcomp, Publish, Pubrec, Pubrel,
    Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will,
)
from .properties import WILL_PROPERTIES, decode_properties
from .wire import decode_binary, decode_utf8

#: 1 byte of packet type and flags + 4 bytes of Remaining Length + 268435455.
MAX_PACKET_SIZE = 268_435_460

_SUPPORTED = {("MQIsdp", MQTT_3_1), ("MQTT", MQTT_3_1_1), ("MQTT", MQTT_5)}
#: levels that may carry the bridge bit (0x80): 0x83 and 0x84, as mosquitto accepts
_BRIDGE_LEVELS = {("MQIsdp", MQTT_3_1), ("MQTT", MQTT_3_1_1)}

# Fixed-header flags every packet type but PUBLISH must carry.
_FLAGS = {
    CONNECT: 0, CONNACK: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0,
    SUBSCRIBE: 2, SUBACK: 0, UNSUBSCRIBE: 2, UNSUBACK: 0, PINGREQ: 0,
    PINGRESP: 0, DISCONNECT: 0, AUTH: 0,
}

#: MQTT 3.1 (level 3) lets a retransmitted SUBSCRIBE, UNSUBSCRIBE or PUBREL
#: carry the DUP bit (first bytes 0x8A, 0xAA, 0x6A; MQTT 3.1 §2.1 "DUP flag");
#: 3.1.1 and 5.0 reserve those flags [MQTT-2.2.2-2], [MQTT-2.1.3-1]
_V31_DUP = {SUBSCRIBE: 0x0A, UNSUBSCRIBE: 0x0A, PUBREL: 0x0A}

_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
    PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}


def _spec(level, v3, v5):
    """The statement number in the spec the peer speaks (3.1.1 or 5.0)."""
    return v5 if level == MQTT_5 else v3


def _truncated(what):
    return MalformedPacket(f"{what} is truncated", spec="MQTT-1.5")


def _trailing(name, level):
    return MalformedPacket(f"{name} has bytes beyond its content",
                           spec=_spec(level, "MQTT 3.1.1 §2.2.3", "MQTT 5.0 §2.1.4"))


def _packet_id(data, i, end, name, level, required_nonzero):
    if i + 2 > end:
        raise _truncated(f"{name} packet identifier")
    pid = (data[i] << 8) | data[i + 1]
    if pid == 0 and required_nonzero:
        # [MQTT-2.3.1-1] in 3.1.1, [MQTT-2.2.1-3] in 5.0
        raise ProtocolError(f"{name} with packet identifier 0",
                            spec=_spec(level, "MQTT-2.3.1-1", "MQTT-2.2.1-3"))
    return pid, i + 2


# -- one decoder per packet type: (level, flags, data, start, end) -> packet -------

def _decode_publish(level, flags, data, i, end, pos=None, max_user=0):
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3", spec="MQTT-3.3.1-4")
    dup = flags & 8
    if dup and not qos:
        raise MalformedPacket("PUBLISH with DUP set on QoS 0", spec="MQTT-3.3.1-2")
    j = i + 2
    if j > end:
        raise _truncated("PUBLISH topic name")
    k = j + ((data[i] << 8) | data[i + 1])
    if k > end:
        raise _truncated("PUBLISH topic name")
    try:
        topic = data[j:k].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("PUBLISH topic name is not well-formed UTF-8",
                              spec=_spec(level, "MQTT-1.5.3-1", "MQTT-1.5.4-1")) from None
    if "+" in topic or "#" in topic or "\x00" in topic:
        if "\x00" in topic:
            raise MalformedPacket("PUBLISH topic name contains U+0000",
                                  spec=_spec(level, "MQTT-1.5.3-2", "MQTT-1.5.4-2"))
        raise ProtocolError("PUBLISH topic name contains a wildcard",
                            reason_code=ReasonCode.TOPIC_NAME_INVALID, spec="MQTT-3.3.2-2")
    if qos:
        if k + 2 > end:
            raise _truncated("PUBLISH packet identifier")
        packet_id = (data[k] << 8) | data[k + 1]
        if not packet_id:
            raise ProtocolError("PUBLISH with QoS > 0 and packet identifier 0",
                                spec=_spec(level, "MQTT-2.3.1-1", "MQTT-2.2.1-3"))
        k += 2
    else:
        packet_id = None
    if level == MQTT_5:
        if k < end and data[k] == 0:
            props = NO_PROPERTIES
            k += 1
        else:
            props, k = decode_properties(data, k, PUBLISH, end, max_user)
        if not topic and props.topic_alias is None:
            raise ProtocolError("PUBLISH with an empty topic name and no topic alias",
                                spec="MQTT 5.0 §3.3.2.3.4")
    else:
        props = NO_PROPERTIES
        if not topic:
            raise MalformedPacket("PUBLISH with an empty topic name", spec="MQTT-4.7.3-1")
    return Publish(topic, data[k:end], qos, bool(flags & 1), bool(dup), packet_id, props,
                   None if pos is None else data[pos:end])


def _decode_connect(reader, data, i, end):
    name, i = decode_utf8(data, i, end)
    if i >= end:
        raise _truncated("CONNECT protocol level")
    level = data[i]
    i += 1
    bridge = False
    if level & 0x80 and (name, level & 0x7F) in _BRIDGE_LEVELS:
        # mosquitto's bridge bit (try_private): a broker bridging to us
        bridge = True
        level &= 0x7F
    if (name, level) not in _SUPPORTED:
        if name not in ("MQTT", "MQIsdp"):
            # 3.x: close without a CONNACK [MQTT-3.1.2-1], [MQTT-3.1.4-1];
            # a level-5 CONNECT is answered with CONNACK 0x84
            raise UnsupportedProtocolVersion(
                f"unsupported protocol name {name!r}", protocol_level=level,
                spec="MQTT-3.1.2-1", answer=level == MQTT_5)
        raise UnsupportedProtocolVersion(
            f"unsupported protocol level {level} for {name!r}", protocol_level=level,
            spec="MQTT-3.1.2-2")
    # From here on errors are answered in the client's own protocol version.
    reader.level = level
    if i + 3 > end:
        raise _truncated("CONNECT variable header")
    flags = data[i]
    keepalive = (data[i + 1] << 8) | data[i + 2]
    i += 3
    if flags & 0x01 and level != MQTT_3_1:
        # MQTT 3.1 has no rule for the reserved bit; 3.1.1 and 5.0 do
        raise MalformedPacket("CONNECT reserved flag is set", spec="MQTT-3.1.2-3")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    if not will_flag:
        if will_qos:
            raise MalformedPacket("CONNECT will QoS set without will flag",
                                  spec="MQTT-3.1.2-13")
        if will_retain:
            raise MalformedPacket("CONNECT will retain set without will flag",
                                  spec="MQTT-3.1.2-15")
    elif will_qos == 3:
        raise MalformedPacket("CONNECT will QoS 3", spec="MQTT-3.1.2-14")
    has_password = flags & 0x40
    has_username = flags & 0x80
    if has_password and not has_username and level != MQTT_5:
        raise MalformedPacket("CONNECT password flag set without user name flag",
                              spec="MQTT-3.1.2-22")
    if level == MQTT_5:
        props, i = decode_properties(data, i, CONNECT, end, reader.max_user_properties)
        if props is not NO_PROPERTIES:
            _check_authentication(props, "CONNECT")
    else:
        props = NO_PROPERTIES
    client_id, i = decode_utf8(data, i, end)
    will = None
    if will_flag:
        if level == MQTT_5:
            will_props, i = decode_properties(data, i, WILL_PROPERTIES, end,
                                              reader.max_user_properties)
        else:
            will_props = NO_PROPERTIES
        will_topic, i = decode_utf8(data, i, end)
        will_payload, i = decode_binary(data, i, end)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
    username = password = None
    if has_username:
        username, i = decode_utf8(data, i, end)
    if has_password:
        password, i = decode_binary(data, i, end)
    if i != end:
        raise _trailing("CONNECT", level)
    return Connect(level, client_id, bool(flags & 0x02), keepalive, username,
                   password, will, props, bridge=bridge)


def _decode_connack(level, flags, data, i, end, max_user=0):
    if i + 2 > end:
        raise _truncated("CONNACK")
    ack_flags = data[i]
    reason = data[i + 1]
    i += 2
    if level == MQTT_3_1:
        ack_flags = 0  # MQTT 3.1: a reserved, unused byte
    elif ack_flags & 0xFE:
        raise MalformedPacket("CONNACK reserved acknowledge flags are set",
                              spec="MQTT-3.2.2-1")
    props = NO_PROPERTIES
    if level == MQTT_5 and i < end:
        props, i = decode_properties(data, i, CONNACK, end, max_user)
        _check_authentication(props, "CONNACK")
    if i != end:
        raise _trailing("CONNACK", level)
    return Connack(bool(ack_flags), reason, props)


#: The reason codes each packet may carry (MQTT 5.0 §3.4.2.1, §3.5.2.1, §3.6.2.1,
#: §3.7.2.1, §3.14.2.1, §3.15.2.1): "The Client or Server sending the PUBACK packet
#: MUST use one of the PUBACK Reason Codes" [MQTT-3.4.2-1] and likewise for
#: PUBREC [MQTT-3.5.2-1], PUBREL [MQTT-3.6.2-1], PUBCOMP [MQTT-3.7.2-1],
#: DISCONNECT [MQTT-3.14.2-1] and AUTH [MQTT-3.15.2-1].  Any other value is a
#: Protocol Error (0x82), as in mosquitto.
_PUBLISH_ACK_CODES = frozenset((0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99))
_RELEASE_CODES = frozenset((0x00, 0x92))
VALID_REASON_CODES = {
    PUBACK: (_PUBLISH_ACK_CODES, "MQTT-3.4.2-1"),
    PUBREC: (_PUBLISH_ACK_CODES, "MQTT-3.5.2-1"),
    PUBREL: (_RELEASE_CODES, "MQTT-3.6.2-1"),
    PUBCOMP: (_RELEASE_CODES, "MQTT-3.7.2-1"),
    DISCONNECT: (frozenset((0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D,
                            0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
                            0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2)),
                 "MQTT-3.14.2-1"),
    AUTH: (frozenset((0x00, 0x18, 0x19)), "MQTT-3.15.2-1"),
}


def _check_reason(ptype: int, reason: int) -> None:
    codes, rule = VALID_REASON_CODES[ptype]
    if reason not in codes:
        raise ProtocolError(f"{_NAMES[ptype]} with undefined reason code 0x{reason:02x}",
                            spec=rule)


def _check_authentication(props, where: str) -> None:
    # "It is a Protocol Error to include Authentication Data if there is no
    # Authentication Method" (MQTT 5.0 §3.1.2.11.10, §3.2.2.3.18, §3.15.2.2.3)
    if props.authentication_data is not None and props.authentication_method is None:
        raise ProtocolError(f"{where} with Authentication Data but no Authentication Method",
                            spec="MQTT 5.0 §3.1.2.11.10")


def _make_ack_decoder(cls, ptype):
    name = _NAMES[ptype]
    codes = VALID_REASON_CODES[ptype][0]

    def decode(level, flags, data, i, end, max_user=0):
        # an acknowledgement carries the id of the packet it acknowledges,
        # never 0 [MQTT-2.3.1-1] (3.1.1), [MQTT-2.2.1-3] (5.0)
        pid, i = _packet_id(data, i, end, name, level, True)
        if i == end:
            return cls(pid)
        if level != MQTT_5:
            raise _trailing(name, level)
        reason = data[i]
        if reason not in codes:
            _check_reason(ptype, reason)
        i += 1
        props = NO_PROPERTIES
        if i < end:  # Remaining Length < 4: no Property Length (MQTT 5.0 §3.4.2.2.1)
            props, i = decode_properties(data, i, ptype, end, max_user)
            if i != end:
                raise _trailing(name, level)
        return cls(pid, reason, props)
    return decode


#: first byte of an acknowledgement with valid flags -> its class
_SHORT_ACKS = {0x40: Puback, 0x50: Pubrec, 0x62: Pubrel, 0x70: Pubcomp}


def _too_many_filters(name: str, limit: int) -> TooManyTopicFilters:
    return TooManyTopicFilters(f"{name} with more than {limit} topic filters "
                               f"(the limit per packet)")


def _decode_subscribe(level, flags, data, i, end, max_filters=0, max_user=0):
    pid, i = _packet_id(data, i, end, "SUBSCRIBE", level, True)
    props = NO_PROPERTIES
    if level == MQTT_5:
        props, i = decode_properties(data, i, SUBSCRIBE, end, max_user)
    subs = []
    while i < end:
        if max_filters and len(subs) == max_filters:
            raise _too_many_filters("SUBSCRIBE", max_filters)
        topic_filter, i = decode_utf8(data, i, end)
        if i >= end:
            raise _truncated("SUBSCRIBE subscription options")
        opts = data[i]
        i += 1
        qos = opts & 3
        if level == MQTT_5:
            if opts & 0xC0:
                raise MalformedPacket("SUBSCRIBE options reserved bits are set",
                                      spec="MQTT-3.8.3-5")
            if qos == 3:
                raise ProtocolError("SUBSCRIBE with maximum QoS 3",
                                    spec="MQTT 5.0 §3.8.3.1")
            retain_handling = (opts >> 4) & 3
            if retain_handling == 3:
                raise ProtocolError("SUBSCRIBE with retain handling 3",
                                    spec="MQTT 5.0 §3.8.3.1")
            subs.append(Subscription(topic_filter, qos, bool(opts & 4), bool(opts & 8),
                                     retain_handling))
        else:
            if opts & 0xFC or qos == 3:
                raise MalformedPacket("SUBSCRIBE requested QoS byte is invalid",
                                      spec="MQTT-3.8.3-4")
            subs.append(Subscription(topic_filter, qos))
    if not subs:
        raise ProtocolError("SUBSCRIBE without any topic filter",
                            spec=_spec(level, "MQTT-3.8.3-3", "MQTT-3.8.3-2"))
    return Subscribe(pid, tuple(subs), props)


def _decode_suback(level, flags, data, i, end, max_user=0):
    pid, i = _packet_id(data, i, end, "SUBACK", level, True)
    props = NO_PROPERTIES
    if level == MQTT_5:
        props, i = decode_properties(data, i, SUBACK, end, max_user)
    if i >= end:
        raise MalformedPacket("SUBACK without any reason code",
                              spec=_spec(level, "MQTT 3.1.1 §3.9.3", "MQTT 5.0 §3.9.3"))
    return Suback(pid, tuple(data[i:end]), props)


def _decode_unsubscribe(level, flags, data, i, end, max_filters=0, max_user=0):
    pid, i = _packet_id(data, i, end, "UNSUBSCRIBE", level, True)
    props = NO_PROPERTIES
    if level == MQTT_5:
        props, i = decode_properties(data, i, UNSUBSCRIBE, end, max_user)
    filters = []
    while i < end:
        if max_filters and len(filters) == max_filters:
            raise _too_many_filters("UNSUBSCRIBE", max_filters)
        topic_filter, i = decode_utf8(data, i, end)
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without any topic filter", spec="MQTT-3.10.3-2")
    return Unsubscribe(pid, tuple(filters), props)


def _decode_unsuback(level, flags, data, i, end, max_user=0):
    pid, i = _packet_id(data, i, end, "UNSUBACK", level, True)
    if level != MQTT_5:
        if i != end:
            raise _trailing("UNSUBACK", level)
        return Unsuback(pid)
    props, i = decode_properties(data, i, UNSUBACK, end, max_user)
    return Unsuback(pid, tuple(data[i:end]), props)


def _make_empty_decoder(cls, ptype):
    name = _NAMES[ptype]
    packet = cls()

    def decode(level, flags, data, i, end, max_user=0):
        if i != end:
            raise MalformedPacket(f"{name} with a non-zero remaining length",
                                  spec=_spec(level, f"MQTT 3.1.1 §3.{ptype}",
                                             f"MQTT 5.0 §3.{ptype}"))
        return packet
    return decode


_EMPTY_DISCONNECT = Disconnect()


def _decode_disconnect(level, flags, data, i, end, max_user=0):
    if i == end:
        return _EMPTY_DISCONNECT
    if level != MQTT_5:
        raise MalformedPacket("DISCONNECT with a non-zero remaining length",
                              spec="MQTT 3.1.1 §3.14")
    reason = data[i]
    _check_reason(DISCONNECT, reason)
    i += 1
    props = NO_PROPERTIES
    if i < end:  # Remaining Length < 2: no Property Length (MQTT 5.0 §3.14.2.2.1)
        props, i = decode_properties(data, i, DISCONNECT, end, max_user)
        if i != end:
            raise _trailing("DISCONNECT", level)
    return Disconnect(reason, props)


def _decode_auth(level, flags, data, i, end, max_user=0):
    if level != MQTT_5:
        raise MalformedPacket("AUTH (packet type 15) is reserved before MQTT 5",
                              spec="MQTT 3.1.1 §2.2.1")
    if i == end:
        return Auth()
    reason = data[i]
    i += 1
    props = NO_PROPERTIES
    if i < end:
        props, i = decode_properties(data, i, AUTH, end, max_user)
        if i != end:
            raise _trailing("AUTH", level)
        _check_authentication(props, "AUTH")
    _check_reason(AUTH, reason)
    return Auth(reason, props)


_DECODERS = {
    CONNACK: _decode_connack,
    PUBACK: _make_ack_decoder(Puback, PUBACK),
    PUBREC: _make_ack_decoder(Pubrec, PUBREC),
    PUBREL: _make_ack_decoder(Pubrel, PUBREL),
    PUBCOMP: _make_ack_decoder(Pubcomp, PUBCOMP),
    SUBSCRIBE: _decode_subscribe,
    SUBACK: _decode_suback,
    UNSUBSCRIBE: _decode_unsubscribe,
    UNSUBACK: _decode_unsuback,
    PINGREQ: _make_empty_decoder(Pingreq, PINGREQ),
    PINGRESP: _make_empty_decoder(Pingresp, PINGRESP),
    DISCONNECT: _decode_disconnect,
    AUTH: _decode_auth,
}


class PacketReader:
    """Frame and decode MQTT packets from a byte stream.

    :param level: the protocol level (3, 4 or 5) of the peer, or ``None`` on
        the server side before CONNECT: then the first packet must be a
        CONNECT [MQTT-3.1.0-1] and decoding it sets :attr:`level`.
    :param max_packet_size: the largest whole packet (fixed header included)
        accepted; larger ones raise :class:`PacketTooLarge` as soon as the
        fixed header is known.  May be changed at any time (e.g. after CONNECT).
    :param max_topic_filters: the most topic filters one SUBSCRIBE or
        UNSUBSCRIBE may carry (0: no limit); decoding stops at the first one
        over it and raises :class:`TooManyTopicFilters` (0x97), so decoding
        such a packet costs at most this many filters.
    :param max_user_properties: the most User Properties (MQTT 5) one property
        block may carry (0: no limit); decoding stops at the first one over it
        and raises :class:`TooManyUserProperties` (0x97 Quota exceeded), so a
        PUBLISH of millions of empty pairs costs at most this many.

    Once :meth:`feed` has raised, the reader raises the same error again.
    If the error was raised after the version of a CONNECT was known,
    :attr:`level` already holds it (so the error can be answered in the
    client's own protocol version).
    """

    __slots__ = ("level", "max_packet_size", "max_topic_filters", "max_user_properties",
                 "_buf", "_total", "_error")

    def __init__(self, level: Optional[int] = None,
                 max_packet_size: int = MAX_PACKET_SIZE, max_topic_filters: int = 0,
                 max_user_properties: int = 0):
        if level not in (None, MQTT_3_1, MQTT_3_1_1, MQTT_5):
            raise ValueError(f"unknown protocol level {level!r}")
        self.level = level
        self.max_packet_size = max_packet_size
        self.max_topic_filters = max_topic_filters
        self.max_user_properties = max_user_properties
        self._buf = bytearray()   # at most one incomplete packet
        self._total = 0           # its whole size, once its fixed header is complete
        self._error = None

    def release(self) -> None:
        """Drop the buffered part of a packet (the connection is closed).

        Also drops the traceback of a stored error: its frames reference the
        caller (the connection), a cycle that would keep everything alive
        until a full garbage collection.
        """
        self._buf = bytearray()
        self._total = 0
        if self._error is not None:
            self._error.__traceback__ = None

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete packet are held."""
        return len(self._buf)

    def feed(self, data: bytes) -> List[object]:
        """Consume ``data``; return the packets it completes, in order.

        :raises MQTTError: at the first violation.  The packets ``data``
            completed before it are in the error's ``decoded_before`` list, so
            a caller handles the same packets however the stream was split
            into chunks.
        """
        if self._error is not None:
            self._error.decoded_before = []
            raise self._error
        out = []
        try:
            return self._feed(data, out)
        except MQTTError as e:
            self._error = e
            self._buf = bytearray()
            e.decoded_before = out
            raise

    # -- framing ---------------------------------------------------------------

    def _header(self, data, pos, n):
        """Size of the packet at ``pos`` and of its fixed header, or (0, 0)
        while the fixed header is incomplete.  Checks the size limit."""
        value = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= n:
                return 0, 0
            byte = data[i]
            value |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift == 28:
                raise MalformedPacket("remaining length longer than four bytes",
                                      spec="MQTT-1.5.5-1")
        header = i - pos
        total = header + value
        if total > self.max_packet_size:
            raise PacketTooLarge(
                f"packet of {total} bytes exceeds the maximum packet size of "
                f"{self.max_packet_size}", spec="MQTT-3.2.2-15")
        return total, header

    def _feed(self, data, out):
        buf = self._buf
        if buf:
            # Complete the one pending packet first.
            n = len(data)
            i = 0
            if not self._total:
                while True:
                    if i >= n:
                        return out
                    buf.append(data[i])
                    i += 1
                    total, _ = self._header(buf, 0, len(buf))
                    if total:
                        self._total = total
                        break
            need = self._total - len(buf)
            if n - i < need:
                buf += data[i:]
                return out
            buf += data[i:i + need]
            i += need
            packet = bytes(buf)
            buf.clear()
            self._total = 0
            _, header = self._header(packet, 0, len(packet))
            out.append(self._decode(packet, 0, header, len(packet)))
            if i == n:
                return out
            data = data[i:]
        if type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        pos = 0
        max_size = self.max_packet_size
        decode = self._decode
        level = self.level
        max_user = self.max_user_properties
        append = out.append
        while pos < n:
            # Fixed header; the one-byte Remaining Length case inline.
            if pos + 1 < n and data[pos + 1] < 128:
                header = 2
                total = 2 + data[pos + 1]
                if total > max_size:
                    total, header = self._header(data, pos, n)  # raises
            else:
                total, header = self._header(data, pos, n)
                if not total:
                    break
            end = pos + total
            if end > n:
                self._total = total
                break
            byte0 = data[pos]
            if byte0 >> 4 == PUBLISH and level is not None:     # the hot path
                append(_decode_publish(level, byte0 & 0x0F, data, pos + header, end, pos,
                                       max_user))
            elif total == 4 and header == 2 and byte0 in _SHORT_ACKS and level is not None:
                # PUBACK/PUBREC/PUBREL/PUBCOMP with only a packet id: the other hot path
                pid = (data[pos + 2] << 8) | data[pos + 3]
                if not pid:
                    raise ProtocolError(
                        f"{_NAMES[byte0 >> 4]} with packet identifier 0",
                        spec=_spec(level, "MQTT-2.3.1-1", "MQTT-2.2.1-3"))
                append(_SHORT_ACKS[byte0](pid))
            else:
                append(decode(data, pos, header, end))
                level = self.level                              # a CONNECT sets it
            pos = end
        if pos < n:
            buf += data[pos:]
        return out

    def _decode(self, data, pos, header, end):
        byte0 = data[pos]
        ptype = byte0 >> 4
        flags = byte0 & 0x0F
        start = pos + header
        level = self.level
        if ptype == PUBLISH and level is not None:
            return _decode_publish(level, flags, data, start, end, pos,
                                   self.max_user_properties)
        if level is None and ptype != CONNECT:
            raise ProtocolError("first packet must be CONNECT", spec="MQTT-3.1.0-1")
        expected = _FLAGS.get(ptype)
        if expected is None:
            raise MalformedPacket(f"reserved packet type {ptype}",
                                  spec=_spec(level, "MQTT 3.1.1 §2.2.1", "MQTT 5.0 §2.1.2"))
        if flags != expected and not (level == MQTT_3_1 and flags == _V31_DUP.get(ptype)):
            raise MalformedPacket(
                f"{_NAMES[ptype]} with invalid fixed header flags {flags:#06b}",
                spec=_spec(level, "MQTT-2.2.2-2", "MQTT-2.1.3-1"))
        if ptype == CONNECT:
            if level is not None:
                # the level is fixed by the first CONNECT; a later one must not
                # change how the rest of the stream is decoded [MQTT-3.1.0-2]
                raise ProtocolError("second CONNECT on a connection", spec="MQTT-3.1.0-2")
            return _decode_connect(self, data, start, end)
        if ptype == SUBSCRIBE or ptype == UNSUBSCRIBE:
            return _DECODERS[ptype](level, flags, data, start, end, self.max_topic_filters,
                                    self.max_user_properties)
        return _DECODERS[ptype](level, flags, data, start, end,
                                max_user=self.max_user_properties)
