"""The MQTT 5 property table and its codec."""
import pytest

from mqttd.codec import NO_PROPERTIES, Properties
from mqttd.codec.packets import CONNECT, PUBACK, PUBLISH, SUBSCRIBE
from mqttd.codec.properties import (
    PROPERTIES, WILL_PROPERTIES, decode_properties, encode_properties,
)


def test_table_names_every_properties_field():
    """Each Properties field has exactly one row in the table, and vice versa."""
    import attrs
    assert {s.name for s in PROPERTIES.values()} == {f.name for f in attrs.fields(Properties)}
    assert all(ident == s.identifier for ident, s in PROPERTIES.items())


def test_table_matches_spec_identifiers():
    """Identifiers are those of MQTT 5.0 Table 2-4."""
    assert sorted(PROPERTIES) == [0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13,
                                  0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1C, 0x1F, 0x21,
                                  0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A]
    assert PROPERTIES[0x18].packet_types == frozenset({WILL_PROPERTIES})
    assert PROPERTIES[0x26].repeatable and PROPERTIES[0x0B].repeatable
    assert not PROPERTIES[0x1F].repeatable


def test_empty_properties_are_a_zero_length():
    """No properties is written as Property Length 0 [MQTT-2.2.2-1]."""
    assert encode_properties(NO_PROPERTIES, PUBLISH) == b"\x00"
    assert encode_properties(Properties(), PUBLISH) == b"\x00"
    props, offset = decode_properties(b"\x00", 0, PUBLISH)
    assert props is NO_PROPERTIES and offset == 1


def test_user_properties_keep_order_and_repeats():
    """User properties are an ordered multiset of pairs (MQTT 5.0 §3.3.2.3.7)."""
    props = Properties(user_properties=(("a", "1"), ("b", "2"), ("a", "3")))
    raw = encode_properties(props, PUBACK)
    assert decode_properties(raw, 0, PUBACK) == (props, len(raw))


def test_encoder_refuses_property_the_packet_cannot_carry():
    """Writing a topic alias in a CONNECT is a caller bug, not a silent drop."""
    with pytest.raises(ValueError):
        encode_properties(Properties(topic_alias=1), CONNECT)


def test_encoder_refuses_two_subscription_ids_in_subscribe():
    """SUBSCRIBE carries at most one subscription identifier (MQTT 5.0 §3.8.2.1.2)."""
    with pytest.raises(ValueError):
        encode_properties(Properties(subscription_identifiers=(1, 2)), SUBSCRIBE)


def test_properties_are_written_in_identifier_order():
    """A canonical order makes encoded bytes stable (and fixtures possible)."""
    props = Properties(topic_alias=3, payload_format_indicator=1)
    assert encode_properties(props, PUBLISH) == bytes.fromhex("05 01 01 23 00 03")
