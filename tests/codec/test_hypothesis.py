"""Property-based tests: round trips, arbitrary chunking, and fuzzing the reader.

The level (and packet type) is drawn inside each test rather than with
``pytest.mark.parametrize``: pytest-twisted wraps ``@given`` tests in place, and
a parametrized ``@given`` test gets wrapped twice and fails
("blockon cannot be called from the twisted greenlet").
"""
from hypothesis import HealthCheck, given, settings, strategies as st

from mqttd.codec import Connect, MQTTError, PacketReader, Publish, encode, publish_template
from mqttd.codec.properties import PROPERTIES, decode_properties, encode_properties

from .fixtures import FIXTURES
from .strategies import connects, packet_ids, packets, properties, publishes

LEVELS = [3, 4, 5]
relaxed = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
levels = st.sampled_from(LEVELS)


def _reader_for(packet, level):
    return PacketReader(level=None if isinstance(packet, Connect) else level)


@relaxed
@given(level=levels, data=st.data())
def test_any_valid_packet_round_trips(level, data):
    """decode(encode(p, level)) == p for every packet valid at that level."""
    packet = data.draw(packets(level))
    assert _reader_for(packet, level).feed(encode(packet, level)) == [packet]


@settings(relaxed, max_examples=200)
@given(level=levels, data=st.data())
def test_any_stream_survives_any_chunking(level, data):
    """A stream of packets cut at arbitrary points decodes to the same packets."""
    first = data.draw(connects(level))
    rest = data.draw(st.lists(packets(level, include_connect=False), max_size=8))
    stream = b"".join(encode(p, level) for p in [first] + rest)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    reader = PacketReader()
    out, prev = [], 0
    for cut in cuts + [len(stream)]:
        out.extend(reader.feed(stream[prev:cut]))
        prev = cut
    assert out == [first] + rest
    assert reader.buffered == 0


_PROPERTY_PACKETS = sorted({t for s in PROPERTIES.values() for t in s.packet_types})


@relaxed
@given(packet_type=st.sampled_from(_PROPERTY_PACKETS), data=st.data())
def test_properties_round_trip(packet_type, data):
    """Any valid property set for a packet type survives encode/decode, order kept."""
    props = data.draw(properties(packet_type))
    raw = b"\xaa" + encode_properties(props, packet_type) + b"\xbb"
    decoded, offset = decode_properties(raw, 1, packet_type, len(raw) - 1)
    assert decoded == props
    assert offset == len(raw) - 1


@relaxed
@given(level=levels, data=st.data())
def test_publish_template_matches_encode(level, data):
    """The fan-out template gives byte-identical output to encode(Publish(...))."""
    p = data.draw(publishes(level))
    template = publish_template(p.topic, p.payload, p.qos, p.retain, p.properties, level)
    if p.qos == 0:
        assert template.encode() == encode(p, level)
        assert template.encode() is template.encode()
    else:
        pid = data.draw(packet_ids)
        dup = data.draw(st.booleans())
        expected = encode(Publish(p.topic, p.payload, p.qos, p.retain, dup, pid,
                                  p.properties), level)
        assert template.encode(pid, dup) == expected


@settings(max_examples=1000)
@given(level=st.sampled_from([None, 3, 4, 5]), data=st.binary(max_size=200),
       cuts=st.lists(st.integers(0, 200), max_size=6))
def test_arbitrary_bytes_yield_packets_or_mqtt_errors(level, data, cuts):
    """Garbage never escapes as anything but MQTTError (no IndexError, ValueError...)."""
    reader = PacketReader(level=level)
    prev = 0
    try:
        for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
            reader.feed(data[prev:cut])
            prev = cut
    except MQTTError:
        pass


@settings(max_examples=600)
@given(index=st.integers(0, len(FIXTURES) - 1), data=st.data())
def test_mutated_fixtures_yield_packets_or_mqtt_errors(index, data):
    """Valid packets with a few bytes changed, cut or added only fail as MQTTError."""
    fx = FIXTURES[index]
    raw = bytearray(fx.data)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["set", "delete", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if action == "set" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif action == "delete" and raw:
            del raw[pos]
        else:
            raw.insert(pos, data.draw(st.integers(0, 255)))
    level = None if isinstance(fx.packet, Connect) else fx.level
    try:
        PacketReader(level=level).feed(bytes(raw))
    except MQTTError:
        pass
