"""PacketReader framing and level handling."""
import pytest

from mqttd.codec import (
    Auth, Connack, Connect, MalformedPacket, PacketReader, Pingreq, Publish, encode,
)

from .fixtures import hexb

PUBLISH_QOS0 = hexb("30 0a 00 03 61 2f 62 68 65 6c 6c 6f")


def test_server_reader_learns_level_from_connect():
    """Before CONNECT the level is unknown; the CONNECT decides it."""
    reader = PacketReader()
    assert reader.level is None
    reader.feed(encode(Connect(5, "c"), 5))
    assert reader.level == 5


def test_level_applies_to_packets_after_connect_in_the_same_chunk():
    """A v5 CONNECT followed at once by a v5 PUBLISH decodes the PUBLISH as v5."""
    data = encode(Connect(5, "c"), 5) + hexb("30 07 00 03 61 2f 62 00 78")
    packets = PacketReader().feed(data)
    assert packets[1] == Publish("a/b", b"x")


def test_client_reader_decodes_server_packets():
    """The client side constructs a reader at its level and reads CONNACK and AUTH."""
    reader = PacketReader(level=5)
    assert reader.feed(hexb("20 03 00 00 00 f0 00")) == [Connack(), Auth()]


def test_unknown_level_is_refused():
    """Only levels 3, 4, 5 (or None) make sense."""
    with pytest.raises(ValueError):
        PacketReader(level=6)


def test_partial_packet_is_buffered_and_completed():
    """A packet split across feeds is returned once, when complete."""
    reader = PacketReader(level=4)
    assert reader.feed(PUBLISH_QOS0[:5]) == []
    assert reader.buffered == 5
    assert reader.feed(PUBLISH_QOS0[5:] + PUBLISH_QOS0[:1]) == [Publish("a/b", b"hello")]
    assert reader.buffered == 1


def test_never_buffers_more_than_the_incomplete_packet():
    """After a burst, only the tail of the one unfinished packet is held."""
    reader = PacketReader(level=4)
    burst = PUBLISH_QOS0 * 1000 + PUBLISH_QOS0[:7]
    assert len(reader.feed(burst)) == 1000
    assert reader.buffered == 7


def test_pending_packet_takes_only_its_own_bytes():
    """Completing a pending packet does not swallow the next one into the buffer."""
    reader = PacketReader(level=4)
    reader.feed(b"\xc0")
    assert reader.feed(b"\x00" + PUBLISH_QOS0 + b"\xc0\x00") == \
        [Pingreq(), Publish("a/b", b"hello"), Pingreq()]
    assert reader.buffered == 0


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_accepts_any_bytes_like_input(wrap):
    """Transports may hand over bytes, bytearray or memoryview."""
    reader = PacketReader(level=4)
    assert reader.feed(wrap(PUBLISH_QOS0[:3])) == []
    assert reader.feed(wrap(PUBLISH_QOS0[3:] + PUBLISH_QOS0)) == [Publish("a/b", b"hello")] * 2


def test_payload_is_bytes():
    """Payloads are immutable bytes, never views into the reader's buffer."""
    reader = PacketReader(level=4)
    reader.feed(PUBLISH_QOS0[:4])
    (packet,) = reader.feed(PUBLISH_QOS0[4:])
    assert type(packet.payload) is bytes


def test_empty_feed_is_harmless():
    """Feeding nothing yields nothing and keeps state."""
    reader = PacketReader(level=4)
    assert reader.feed(b"") == []
    reader.feed(PUBLISH_QOS0[:2])
    assert reader.feed(b"") == []
    assert reader.feed(PUBLISH_QOS0[2:]) == [Publish("a/b", b"hello")]


def test_error_after_good_packets_in_same_chunk_raises():
    """A malformed packet fails the feed; the connection closes [MQTT-4.13]."""
    with pytest.raises(MalformedPacket):
        PacketReader(level=4).feed(PUBLISH_QOS0 + hexb("c0 01 00"))


@pytest.mark.parametrize("level", [4, 5])
def test_subscribe_and_unsubscribe_over_the_filter_limit_stop_decoding_at_the_limit(level):
    """A reader with max_topic_filters decodes up to that many filters and raises
    TooManyTopicFilters (0x97) at the first one over it, without reading the rest of the
    packet: what decoding one packet costs is bounded by the limit, not its size."""
    from mqttd.codec import ReasonCode, Subscribe, Subscription, TooManyTopicFilters, Unsubscribe
    subscribe = encode(Subscribe(1, tuple(Subscription(f"t/{i}", 1) for i in range(3))), level)
    unsubscribe = encode(Unsubscribe(2, ("a", "b", "c")), level)
    reader = PacketReader(level=level, max_topic_filters=3)
    assert [len(p.subscriptions) if isinstance(p, Subscribe) else len(p.topic_filters)
            for p in reader.feed(subscribe + unsubscribe)] == [3, 3]
    # a 4th filter whose bytes are not even a valid string: never looked at
    for packet, extra in ((Subscribe(3, tuple(Subscription(f"t/{i}", 1) for i in range(3))),
                           b"\x00\x05\xff\xfe"),
                          (Unsubscribe(4, ("a", "b", "c")), b"\x00\x05\xff\xfe")):
        data = bytearray(encode(packet, level))
        body = bytes(data[2:]) + extra                   # one-byte remaining length
        reader = PacketReader(level=level, max_topic_filters=3)
        with pytest.raises(TooManyTopicFilters, match="more than 3 topic filters") as info:
            reader.feed(bytes([data[0], len(body)]) + body)
        assert info.value.reason_code == ReasonCode.QUOTA_EXCEEDED == 0x97
        assert info.value.refusal == "max-topic-filters-per-packet"


def test_no_filter_limit_by_default():
    """PacketReader alone (a client, a tool) keeps decoding every filter."""
    from mqttd.codec import Subscribe, Subscription
    packet = Subscribe(1, tuple(Subscription(f"t/{i}", 0) for i in range(5000)))
    assert PacketReader(level=4).feed(encode(packet, 4)) == [packet]
