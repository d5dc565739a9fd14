"""Wire primitives of MQTT section 1.5."""
import pytest

from mqttd.codec import MalformedPacket
from mqttd.codec import wire


@pytest.mark.parametrize("value,encoded", [
    (0, "00"), (127, "7f"), (128, "80 01"), (16_383, "ff 7f"), (16_384, "80 80 01"),
    (2_097_151, "ff ff 7f"), (2_097_152, "80 80 80 01"), (268_435_455, "ff ff ff 7f"),
])
def test_varint_matches_spec_table(value, encoded):
    """The boundary values of MQTT 5.0 Table 1-1 encode and decode exactly."""
    raw = bytes.fromhex(encoded)
    assert wire.encode_varint(value) == raw
    assert wire.decode_varint(raw, 0) == (value, len(raw))


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_varint_out_of_range_is_refused_by_encoder(value):
    """The encoder never writes a value a Variable Byte Integer cannot hold."""
    with pytest.raises(ValueError):
        wire.encode_varint(value)


def test_varint_of_five_bytes_is_malformed():
    """A fifth continuation byte is a Malformed Packet [MQTT-1.5.5-1]."""
    with pytest.raises(MalformedPacket) as info:
        wire.decode_varint(bytes.fromhex("ff ff ff ff 01"), 0)
    assert info.value.spec == "MQTT-1.5.5-1"


def test_varint_truncated_is_malformed():
    """A continuation bit with nothing after it runs past the packet."""
    with pytest.raises(MalformedPacket):
        wire.decode_varint(b"\x80\x80", 0)


def test_integers_are_big_endian():
    """Two and four byte integers are in network byte order (1.5.2, 1.5.3)."""
    assert wire.encode_u16(0x1234) == b"\x12\x34"
    assert wire.decode_u16(b"\x00\x12\x34", 1) == (0x1234, 3)
    assert wire.encode_u32(0x01020304) == b"\x01\x02\x03\x04"
    assert wire.decode_u32(b"\x01\x02\x03\x04", 0) == (0x01020304, 4)


def test_decoders_respect_the_end_bound():
    """A field may not borrow bytes of the next packet in the same buffer."""
    data = b"\x00\x03abc"
    with pytest.raises(MalformedPacket):
        wire.decode_utf8(data, 0, 4)
    with pytest.raises(MalformedPacket):
        wire.decode_u16(data, 0, 1)
    with pytest.raises(MalformedPacket):
        wire.decode_u32(data, 0, 3)
    with pytest.raises(MalformedPacket):
        wire.decode_binary(data, 0, 4)
    with pytest.raises(MalformedPacket):
        wire.decode_byte(data, 5, 5)


def test_utf8_string_round_trips_with_length_prefix():
    """A UTF-8 Encoded String is a two byte length then the bytes (1.5.4)."""
    assert wire.encode_utf8("é") == b"\x00\x02\xc3\xa9"
    assert wire.decode_utf8(b"\x00\x02\xc3\xa9", 0) == ("é", 4)
    assert wire.decode_utf8(b"\x00\x00", 0) == ("", 2)


def test_utf8_zero_width_no_break_space_is_kept():
    """0xEF 0xBB 0xBF is U+FEFF and must not be stripped [MQTT-1.5.4-3]."""
    assert wire.decode_utf8(b"\x00\x04\xef\xbb\xbfa", 0) == ("\ufeffa", 6)


@pytest.mark.parametrize("raw,spec", [
    (b"\x00\x01\xff", "MQTT-1.5.4-1"),             # not UTF-8 at all
    (b"\x00\x03\xed\xa0\x80", "MQTT-1.5.4-1"),     # encoded surrogate U+D800
    (b"\x00\x02\xc0\x80", "MQTT-1.5.4-1"),         # overlong encoding of U+0000
    (b"\x00\x01\x00", "MQTT-1.5.4-2"),             # U+0000
])
def test_invalid_utf8_strings_are_malformed(raw, spec):
    """Ill-formed UTF-8, surrogates and U+0000 are Malformed Packets."""
    with pytest.raises(MalformedPacket) as info:
        wire.decode_utf8(raw, 0)
    assert info.value.spec == spec


@pytest.mark.parametrize("text", ["a\x00b", "\ud800", "x" * 65536])
def test_encoder_refuses_unsendable_strings(text):
    """U+0000, lone surrogates and >65535 bytes cannot be written."""
    with pytest.raises(ValueError):
        wire.encode_utf8(text)


def test_binary_and_string_pair_round_trip():
    """Binary Data and UTF-8 String Pairs (1.5.6, 1.5.7)."""
    assert wire.decode_binary(wire.encode_binary(b"\x00\xff"), 0) == (b"\x00\xff", 4)
    raw = wire.encode_string_pair(("k", "v"))
    assert raw == b"\x00\x01k\x00\x01v"
    assert wire.decode_string_pair(raw, 0) == (("k", "v"), 6)
    with pytest.raises(ValueError):
        wire.encode_binary(b"x" * 65536)
