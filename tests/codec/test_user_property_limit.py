"""A bound on MQTT 5 User Properties per packet (REVIEW-SEC: millions of empty pairs).

A 16 MiB PUBLISH of empty user properties (5 bytes each) decoded into ~3.3
million tuples -- seconds of CPU and hundreds of MB -- before anything could
refuse it.  The reader stops at the first pair over its limit.
"""
from __future__ import annotations

import pytest

from mqttd.codec import PacketReader, TooManyUserProperties, encode
from mqttd.codec import properties as properties_module
from mqttd.codec.packets import Connect, Properties, Publish, Subscribe, Subscription, Will
from mqttd.codec.wire import encode_varint


def _publish_with_empty_pairs(count: int) -> bytes:
    props = b"\x26\x00\x00\x00\x00" * count
    body = b"\x00\x01t" + encode_varint(len(props)) + props
    return b"\x30" + encode_varint(len(body)) + body


def test_publish_at_the_limit_is_decoded():
    """64 pairs with a limit of 64: an ordinary packet."""
    (packet,) = PacketReader(level=5, max_user_properties=64).feed(
        _publish_with_empty_pairs(64))
    assert len(packet.properties.user_properties) == 64


def test_publish_over_the_limit_is_refused_with_quota_exceeded():
    """One pair over: TooManyUserProperties, reason 0x97, counted as max-user-properties."""
    with pytest.raises(TooManyUserProperties) as raised:
        PacketReader(level=5, max_user_properties=64).feed(_publish_with_empty_pairs(65))
    assert raised.value.reason_code == 0x97
    assert raised.value.refusal == "max-user-properties"


def test_decoding_stops_at_the_first_pair_over_the_limit(monkeypatch):
    """200,000 pairs cost 11 pair decodes with a limit of 10, not 200,000."""
    calls = []
    real = properties_module.decode_string_pair

    def counting(data, offset, end):
        calls.append(offset)
        return real(data, offset, end)
    monkeypatch.setattr(properties_module, "decode_string_pair", counting)
    with pytest.raises(TooManyUserProperties):
        PacketReader(level=5, max_packet_size=2_000_000, max_user_properties=10).feed(
            _publish_with_empty_pairs(200_000))
    assert len(calls) == 11


@pytest.mark.parametrize("packet", [
    Connect(5, "c", True, 0, properties=Properties(user_properties=(("k", "v"),) * 5)),
    Connect(5, "c", True, 0, will=Will("w", b"x", 0, False,
                                       Properties(user_properties=(("k", "v"),) * 5))),
    Subscribe(1, (Subscription("a", 0),), Properties(user_properties=(("k", "v"),) * 5)),
], ids=["connect", "will", "subscribe"])
def test_every_property_block_is_bounded(packet):
    """CONNECT, its will and SUBSCRIBE blocks obey the same limit."""
    reader = PacketReader(level=None if isinstance(packet, Connect) else 5,
                          max_user_properties=4)
    with pytest.raises(TooManyUserProperties):
        reader.feed(encode(packet, 5))
    assert PacketReader(level=None if isinstance(packet, Connect) else 5,
                        max_user_properties=5).feed(encode(packet, 5))


def test_no_limit_by_default_in_the_codec():
    """The codec's own default is no limit (the broker configures 64)."""
    (packet,) = PacketReader(level=5).feed(_publish_with_empty_pairs(1000))
    assert len(packet.properties.user_properties) == 1000
    assert encode(Publish("t", properties=packet.properties), 5)
