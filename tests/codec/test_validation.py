"""Every validation rule of the reader: error class, reason code and spec citation."""
import pytest

from mqttd.codec import (
    MalformedPacket, MQTTError, PacketReader, PacketTooLarge, ProtocolError,
    ReasonCode, UnsupportedProtocolVersion,
)

from .fixtures import hexb

M, P = MalformedPacket, ProtocolError
MALFORMED, PROTOCOL = ReasonCode.MALFORMED_PACKET, ReasonCode.PROTOCOL_ERROR

# (behaviour, reader level, bytes, error class, reason code, spec)
CASES = [
    # -- order and fixed header
    ("first_packet_must_be_connect", None, "c0 00", P, PROTOCOL, "MQTT-3.1.0-1"),
    ("publish_before_connect_rejected", None, "30 05 00 03 61 2f 62", P, PROTOCOL, "MQTT-3.1.0-1"),
    ("pubrel_needs_flags_0010", 4, "60 02 00 01", M, MALFORMED, "MQTT-2.2.2-2"),
    ("subscribe_needs_flags_0010", 4, "80 06 00 01 00 01 61 00", M, MALFORMED, "MQTT-2.2.2-2"),
    ("unsubscribe_needs_flags_0010", 4, "a0 05 00 01 00 01 61", M, MALFORMED, "MQTT-2.2.2-2"),
    ("puback_reserved_flags_must_be_zero_v5", 5, "41 02 00 01", M, MALFORMED, "MQTT-2.1.3-1"),
    ("connect_reserved_flags_must_be_zero", None,
     "18 0e 00 04 4d 51 54 54 04 02 00 3c 00 02 63 31", M, MALFORMED, "MQTT-2.2.2-2"),
    ("pingreq_reserved_flags_must_be_zero", 4, "c2 00", M, MALFORMED, "MQTT-2.2.2-2"),
    ("packet_type_0_is_reserved", 4, "00 00", M, MALFORMED, "MQTT 3.1.1 §2.2.1"),
    ("packet_type_0_is_forbidden_v5", 5, "00 00", M, MALFORMED, "MQTT 5.0 §2.1.2"),
    ("auth_is_reserved_before_v5", 4, "f0 00", M, MALFORMED, "MQTT 3.1.1 §2.2.1"),
    ("auth_is_reserved_in_v3", 3, "f0 00", M, MALFORMED, "MQTT 3.1.1 §2.2.1"),
    ("remaining_length_longer_than_four_bytes", 4, "30 ff ff ff ff 01", M, MALFORMED,
     "MQTT-1.5.5-1"),
    # -- reason codes a client may send [MQTT-3.4.2-1] and the like
    ("puback_undefined_reason_code", 5, "40 03 00 01 ff", P, PROTOCOL, "MQTT-3.4.2-1"),
    ("pubrec_undefined_reason_code", 5, "50 03 00 01 01", P, PROTOCOL, "MQTT-3.5.2-1"),
    ("pubrel_undefined_reason_code", 5, "62 03 00 01 10", P, PROTOCOL, "MQTT-3.6.2-1"),
    ("pubcomp_undefined_reason_code", 5, "70 03 00 01 80", P, PROTOCOL, "MQTT-3.7.2-1"),
    ("disconnect_undefined_reason_code", 5, "e0 01 05", P, PROTOCOL, "MQTT-3.14.2-1"),
    ("auth_undefined_reason_code", 5, "f0 02 01 00", P, PROTOCOL, "MQTT-3.15.2-1"),
    # -- Authentication Data needs an Authentication Method (MQTT 5.0 §3.1.2.11.10)
    ("connect_authentication_data_without_method", None,
     "10 13 00 04 4d 51 54 54 05 02 00 3c 04 16 00 01 41 00 02 63 31", P, PROTOCOL,
     "MQTT 5.0 §3.1.2.11.10"),
    ("auth_authentication_data_without_method", 5, "f0 06 18 04 16 00 01 41", P, PROTOCOL,
     "MQTT 5.0 §3.1.2.11.10"),
    # -- PUBLISH
    ("publish_qos_3_is_malformed", 4, "36 07 00 03 61 2f 62 00 01", M, MALFORMED, "MQTT-3.3.1-4"),
    ("publish_dup_on_qos_0_is_malformed", 4, "38 05 00 03 61 2f 62", M, MALFORMED, "MQTT-3.3.1-2"),
    ("publish_topic_with_plus_invalid", 4, "30 05 00 03 61 2f 2b", P,
     ReasonCode.TOPIC_NAME_INVALID, "MQTT-3.3.2-2"),
    ("publish_topic_with_hash_invalid_v5", 5, "30 06 00 03 61 2f 23 00", P,
     ReasonCode.TOPIC_NAME_INVALID, "MQTT-3.3.2-2"),
    ("publish_empty_topic_malformed_v4", 4, "30 02 00 00", M, MALFORMED, "MQTT-4.7.3-1"),
    ("publish_empty_topic_malformed_v3", 3, "30 03 00 00 78", M, MALFORMED, "MQTT-4.7.3-1"),
    ("publish_empty_topic_without_alias_v5", 5, "30 03 00 00 00", P, PROTOCOL,
     "MQTT 5.0 §3.3.2.3.4"),
    ("publish_qos1_packet_id_0_v4", 4, "32 07 00 03 61 2f 62 00 00", P, PROTOCOL, "MQTT-2.3.1-1"),
    ("publish_qos2_packet_id_0_v5", 5, "34 08 00 03 61 2f 62 00 00 00", P, PROTOCOL,
     "MQTT-2.2.1-3"),
    ("publish_topic_not_utf8_v4", 4, "30 05 00 03 61 ff 62", M, MALFORMED, "MQTT-1.5.3-1"),
    ("publish_topic_encoded_surrogate_v5", 5, "30 06 00 03 ed a0 80 00", M, MALFORMED,
     "MQTT-1.5.4-1"),
    ("publish_topic_with_null_v4", 4, "30 05 00 03 61 00 62", M, MALFORMED, "MQTT-1.5.3-2"),
    ("publish_topic_longer_than_packet", 4, "30 04 00 05 61 2f", M, MALFORMED, "MQTT-1.5"),
    ("publish_packet_id_truncated", 4, "32 06 00 03 61 2f 62 00", M, MALFORMED, "MQTT-1.5"),
    # -- CONNECT
    ("connect_reserved_flag_bit_0", None,
     "10 0e 00 04 4d 51 54 54 04 03 00 3c 00 02 63 31", M, MALFORMED, "MQTT-3.1.2-3"),
    ("connect_will_qos_without_will_flag", None,
     "10 0e 00 04 4d 51 54 54 04 0a 00 3c 00 02 63 31", M, MALFORMED, "MQTT-3.1.2-13"),
    ("connect_will_retain_without_will_flag", None,
     "10 0e 00 04 4d 51 54 54 04 22 00 3c 00 02 63 31", M, MALFORMED, "MQTT-3.1.2-15"),
    ("connect_will_qos_3", None,
     "10 0e 00 04 4d 51 54 54 04 1e 00 3c 00 02 63 31", M, MALFORMED, "MQTT-3.1.2-14"),
    ("connect_will_qos_without_will_flag_v5", None,
     "10 0f 00 04 4d 51 54 54 05 12 00 3c 00 00 02 63 31", M, MALFORMED, "MQTT-3.1.2-13"),
    ("connect_password_without_username_v4", None,
     "10 11 00 04 4d 51 54 54 04 42 00 3c 00 02 63 31 00 01 70", M, MALFORMED,
     "MQTT-3.1.2-22"),
    ("connect_password_without_username_v3", None,
     "10 13 00 06 4d 51 49 73 64 70 03 42 00 3c 00 02 63 31 00 01 70", M, MALFORMED,
     "MQTT-3.1.2-22"),
    ("connect_trailing_byte", None,
     "10 0f 00 04 4d 51 54 54 04 02 00 3c 00 02 63 31 00", M, MALFORMED, "MQTT 3.1.1 §2.2.3"),
    ("connect_truncated_will", None,
     "10 12 00 04 4d 51 54 54 04 06 00 3c 00 02 63 31 00 05 77 2f", M, MALFORMED, "MQTT-1.5"),
    ("connect_client_id_with_null", None,
     "10 0e 00 04 4d 51 54 54 04 02 00 3c 00 02 63 00", M, MALFORMED, "MQTT-1.5.4-2"),
    # -- CONNACK
    ("connack_reserved_flags_v4", 4, "20 02 02 00", M, MALFORMED, "MQTT-3.2.2-1"),
    ("connack_reserved_flags_v5", 5, "20 03 80 00 00", M, MALFORMED, "MQTT-3.2.2-1"),
    ("connack_trailing_byte_v4", 4, "20 03 00 00 00", M, MALFORMED, "MQTT 3.1.1 §2.2.3"),
    # -- SUBSCRIBE / SUBACK / UNSUBSCRIBE / UNSUBACK
    ("subscribe_without_filters_v4", 4, "82 02 00 01", P, PROTOCOL, "MQTT-3.8.3-3"),
    ("subscribe_without_filters_v5", 5, "82 03 00 01 00", P, PROTOCOL, "MQTT-3.8.3-2"),
    ("subscribe_packet_id_0", 4, "82 06 00 00 00 01 61 00", P, PROTOCOL, "MQTT-2.3.1-1"),
    ("subscribe_v4_qos_byte_upper_bits", 4, "82 06 00 01 00 01 61 04", M, MALFORMED,
     "MQTT-3.8.3-4"),
    ("subscribe_v3_qos_3", 3, "82 06 00 01 00 01 61 03", M, MALFORMED, "MQTT-3.8.3-4"),
    ("subscribe_v5_reserved_option_bits", 5, "82 07 00 01 00 00 01 61 40", M, MALFORMED,
     "MQTT-3.8.3-5"),
    ("subscribe_v5_retain_handling_3", 5, "82 07 00 01 00 00 01 61 30", P, PROTOCOL,
     "MQTT 5.0 §3.8.3.1"),
    ("subscribe_v5_qos_3", 5, "82 07 00 01 00 00 01 61 03", P, PROTOCOL, "MQTT 5.0 §3.8.3.1"),
    ("subscribe_missing_options_byte", 4, "82 05 00 01 00 01 61", M, MALFORMED, "MQTT-1.5"),
    ("subscribe_filter_runs_past_packet", 4, "82 05 00 01 00 05 61", M, MALFORMED, "MQTT-1.5"),
    ("suback_without_codes", 4, "90 02 00 01", M, MALFORMED, "MQTT 3.1.1 §3.9.3"),
    ("unsubscribe_without_filters", 4, "a2 02 00 01", P, PROTOCOL, "MQTT-3.10.3-2"),
    ("unsubscribe_without_filters_v5", 5, "a2 03 00 01 00", P, PROTOCOL, "MQTT-3.10.3-2"),
    ("unsubscribe_packet_id_0_v5", 5, "a2 06 00 00 00 00 01 61", P, PROTOCOL, "MQTT-2.2.1-3"),
    ("unsuback_v4_trailing_codes", 4, "b0 03 00 01 00", M, MALFORMED, "MQTT 3.1.1 §2.2.3"),
    # -- acks, pings, disconnect
    ("puback_v4_trailing_byte", 4, "40 03 00 01 00", M, MALFORMED, "MQTT 3.1.1 §2.2.3"),
    ("puback_truncated_packet_id", 4, "40 01 00", M, MALFORMED, "MQTT-1.5"),
    ("pubrec_v5_trailing_after_properties", 5, "50 05 00 01 00 00 00", M, MALFORMED,
     "MQTT 5.0 §2.1.4"),
    ("pingreq_with_body", 4, "c0 01 00", M, MALFORMED, "MQTT 3.1.1 §3.12"),
    ("pingresp_with_body_v5", 5, "d0 01 00", M, MALFORMED, "MQTT 5.0 §3.13"),
    ("disconnect_v4_with_body", 4, "e0 01 00", M, MALFORMED, "MQTT 3.1.1 §3.14"),
    ("disconnect_v5_trailing_after_properties", 5, "e0 03 00 00 00", M, MALFORMED,
     "MQTT 5.0 §2.1.4"),
    ("auth_v5_trailing_after_properties", 5, "f0 03 18 00 00", M, MALFORMED, "MQTT 5.0 §2.1.4"),
    # -- properties
    ("property_unknown_identifier", 5, "40 06 00 01 00 02 05 00", M, MALFORMED,
     "MQTT 5.0 §2.2.2.2"),
    ("property_not_allowed_in_packet", 5, "40 07 00 01 00 03 23 00 01", M, MALFORMED,
     "MQTT 5.0 §2.2.2.2"),
    ("will_delay_not_allowed_in_publish", 5, "30 09 00 01 74 05 18 00 00 00 01", M, MALFORMED,
     "MQTT 5.0 §2.2.2.2"),
    ("property_included_twice", 5, "40 0c 00 01 00 08 1f 00 01 61 1f 00 01 62", P, PROTOCOL,
     "MQTT 5.0 §2.2.2.2"),
    ("subscription_identifier_twice_in_subscribe", 5,
     "82 0b 00 01 04 0b 01 0b 02 00 01 61 00", P, PROTOCOL, "MQTT 5.0 §3.8.2.1.2"),
    ("subscription_identifier_zero", 5, "30 06 00 01 74 02 0b 00", P, PROTOCOL,
     "MQTT 5.0 §3.3.2.3.8"),
    ("payload_format_indicator_not_0_or_1", 5, "30 06 00 01 74 02 01 02", P, PROTOCOL,
     "MQTT 5.0 §3.3.2.3.2"),
    ("topic_alias_zero", 5, "30 07 00 01 74 03 23 00 00", P, ReasonCode.TOPIC_ALIAS_INVALID,
     "MQTT-3.3.2-8"),
    ("receive_maximum_zero", None,
     "10 12 00 04 4d 51 54 54 05 02 00 3c 03 21 00 00 00 02 63 31", P, PROTOCOL,
     "MQTT 5.0 §3.1.2.11.3"),
    ("maximum_packet_size_zero", None,
     "10 14 00 04 4d 51 54 54 05 02 00 3c 05 27 00 00 00 00 00 02 63 31", P, PROTOCOL,
     "MQTT 5.0 §3.1.2.11.4"),
    ("request_problem_information_not_0_or_1", None,
     "10 11 00 04 4d 51 54 54 05 02 00 3c 02 17 02 00 02 63 31", P, PROTOCOL,
     "MQTT 5.0 §3.1.2.11.7"),
    ("maximum_qos_not_0_or_1", 5, "20 05 00 00 02 24 02", P, PROTOCOL, "MQTT 5.0 §3.2.2.3.4"),
    ("property_length_past_packet", 5, "40 05 00 01 00 09 1f", M, MALFORMED, "MQTT 5.0 §2.2.2.1"),
    ("property_value_past_property_length", 5, "40 08 00 01 00 02 1f 00 01 61", M, MALFORMED,
     "MQTT-1.5"),
    ("will_property_not_allowed", None,
     "10 18 00 04 4d 51 54 54 05 06 00 3c 00 00 02 63 31 03 23 00 01 00 01 77 00 00", M, MALFORMED,
     "MQTT 5.0 §2.2.2.2"),
]


@pytest.mark.parametrize("level,data,cls,reason,spec", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_reader_rejects_invalid_packet(level, data, cls, reason, spec):
    """Each rule raises its own error class, reason code and spec citation."""
    with pytest.raises(cls) as info:
        PacketReader(level=level).feed(hexb(data))
    assert info.value.reason_code == reason
    assert info.value.spec == spec


@pytest.mark.parametrize("level,data,cls,reason,spec", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_reader_rejects_invalid_packet_fed_bytewise(level, data, cls, reason, spec):
    """The same errors come out when the bad packet trickles in one byte at a time."""
    reader = PacketReader(level=level)
    raw = hexb(data)
    with pytest.raises(cls) as info:
        for i in range(len(raw)):
            reader.feed(raw[i:i + 1])
    assert info.value.reason_code == reason


def test_case_names_are_unique():
    """Case ids name behaviours; a duplicate would silently drop one."""
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("data,level", [
    ("10 0e 00 04 4d 51 54 54 06 02 00 3c 00 02 63 31", 6),        # MQTT level 6
    ("10 0e 00 04 4d 51 54 54 03 02 00 3c 00 02 63 31", 3),        # MQTT level 3
    ("10 10 00 06 4d 51 49 73 64 70 04 02 00 3c 00 02 63 31", 4),  # MQIsdp level 4
])
def test_unsupported_protocol_level_reports_the_level(data, level):
    """The broker needs the requested level to answer v3 0x01 or v5 0x84 [MQTT-3.1.2-2]."""
    with pytest.raises(UnsupportedProtocolVersion) as info:
        PacketReader().feed(hexb(data))
    assert info.value.protocol_level == level
    assert info.value.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION
    assert info.value.spec == "MQTT-3.1.2-2"


def test_unknown_protocol_name_is_unsupported_version():
    """A CONNECT that is not MQTT at all is refused with the level byte it carried."""
    data = hexb("10 0e 00 04 48 54 54 50 04 02 00 3c 00 02 63 31")  # "HTTP", 4
    with pytest.raises(UnsupportedProtocolVersion) as info:
        PacketReader().feed(data)
    assert info.value.protocol_level == 4
    assert info.value.spec == "MQTT-3.1.2-1"


def test_level_is_known_when_a_connect_is_malformed_after_its_version():
    """A v5 CONNECT with bad flags is answered in v5: reader.level is already 5."""
    reader = PacketReader()
    with pytest.raises(MalformedPacket):
        reader.feed(hexb("10 0f 00 04 4d 51 54 54 05 03 00 3c 00 00 02 63 31"))
    assert reader.level == 5


def test_packet_too_large_detected_from_fixed_header_alone():
    """The size limit is enforced before any of the body is buffered."""
    reader = PacketReader(level=4, max_packet_size=1024)
    with pytest.raises(PacketTooLarge) as info:
        reader.feed(hexb("30 ff ff ff 7f"))    # announces 268435455 bytes; no body fed
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert info.value.spec
    assert reader.buffered == 0


def test_packet_too_large_detected_when_header_arrives_bytewise():
    """A fixed header trickling in is checked as soon as its last byte arrives."""
    reader = PacketReader(level=5, max_packet_size=100)
    assert reader.feed(b"\x30") == []
    assert reader.feed(b"\xe8") == []
    with pytest.raises(PacketTooLarge):
        reader.feed(b"\x07")                 # remaining length 1000


def test_packet_too_large_after_a_pending_packet():
    """The header check also runs for a packet that starts mid-chunk."""
    reader = PacketReader(level=4, max_packet_size=100)
    assert reader.feed(hexb("c0")) == []
    with pytest.raises(PacketTooLarge):
        reader.feed(hexb("00 30 e8 07"))


def test_max_packet_size_counts_the_whole_packet():
    """The limit covers fixed header plus remaining length (MQTT 5.0 §3.1.2.11.4)."""
    data = hexb("30 08 00 03 61 2f 62 78 79 7a")  # 10 bytes in all
    assert len(PacketReader(level=4, max_packet_size=10).feed(data)) == 1
    with pytest.raises(PacketTooLarge):
        PacketReader(level=4, max_packet_size=9).feed(data)


def test_max_packet_size_can_change_after_connect():
    """The broker lowers the limit once the CONNECT is known; later packets obey it."""
    reader = PacketReader(level=4)
    reader.max_packet_size = 3
    assert reader.feed(hexb("c0 00")) != []
    with pytest.raises(PacketTooLarge):
        reader.feed(hexb("40 02 00 01"))


def test_reader_is_unusable_after_an_error():
    """After a protocol violation the connection closes; the reader keeps refusing."""
    reader = PacketReader(level=4)
    with pytest.raises(MalformedPacket) as first:
        reader.feed(hexb("c0 01 00"))
    with pytest.raises(MQTTError) as second:
        reader.feed(hexb("c0 00"))
    assert second.value is first.value


def test_errors_render_their_spec():
    """The log line carries the normative statement."""
    with pytest.raises(MalformedPacket) as info:
        PacketReader(level=4).feed(hexb("36 07 00 03 61 2f 62 00 01"))
    assert "[MQTT-3.3.1-4]" in str(info.value)
