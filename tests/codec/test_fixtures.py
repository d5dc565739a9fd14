"""Every hand-written fixture, tested three ways, byte by byte and in one burst."""
import pytest

from mqttd.codec import Connect, PacketReader, encode

from .fixtures import DECODE_ONLY, FIXTURES

ids = [f.name for f in FIXTURES]


def reader_for(fixture):
    """A server-side reader before CONNECT for CONNECT fixtures, else one at the level."""
    return PacketReader(level=None if isinstance(fixture.packet, Connect) else fixture.level)


@pytest.mark.parametrize("fx", FIXTURES, ids=ids)
def test_fixture_decodes_to_packet(fx):
    """The reader turns the hand-written bytes into exactly the expected value."""
    assert reader_for(fx).feed(fx.data) == [fx.packet]


@pytest.mark.parametrize("fx", FIXTURES, ids=ids)
def test_fixture_encodes_to_bytes(fx):
    """The encoder writes exactly the bytes the specification describes."""
    assert encode(fx.packet, fx.level) == fx.data


@pytest.mark.parametrize("fx", FIXTURES, ids=ids)
def test_fixture_round_trips(fx):
    """decode(encode(packet)) gives the packet back."""
    assert reader_for(fx).feed(encode(fx.packet, fx.level)) == [fx.packet]


@pytest.mark.parametrize("fx", FIXTURES + DECODE_ONLY, ids=ids + [f.name for f in DECODE_ONLY])
def test_fixture_fed_one_byte_at_a_time(fx):
    """Framing copes with a packet split at every possible byte boundary."""
    reader = reader_for(fx)
    out = []
    for i in range(len(fx.data)):
        out.extend(reader.feed(fx.data[i:i + 1]))
        if i < len(fx.data) - 1:
            assert out == []
    assert out == [fx.packet]
    assert reader.buffered == 0


@pytest.mark.parametrize("fx", DECODE_ONLY, ids=[f.name for f in DECODE_ONLY])
def test_alternative_form_decodes(fx):
    """Legal forms the encoder does not produce (long forms, any property order) decode."""
    assert reader_for(fx).feed(fx.data) == [fx.packet]


@pytest.mark.parametrize("level", [3, 4, 5])
def test_all_fixtures_of_a_level_in_one_feed(level):
    """Many packets in one chunk come out in order: CONNECT first, then the rest."""
    connects = [f for f in FIXTURES if f.level == level and isinstance(f.packet, Connect)]
    others = [f for f in FIXTURES + DECODE_ONLY
              if f.level == level and not isinstance(f.packet, Connect)]
    stream = connects[0].data + b"".join(f.data for f in others)
    reader = PacketReader()
    assert reader.feed(stream) == [connects[0].packet] + [f.packet for f in others]
    assert reader.level == level


@pytest.mark.parametrize("level", [3, 4, 5])
def test_all_fixtures_of_a_level_in_odd_chunks(level):
    """Chunks that straddle packet boundaries (sizes 1..7 cycling) lose nothing."""
    fxs = [f for f in FIXTURES if f.level == level and not isinstance(f.packet, Connect)]
    stream = b"".join(f.data for f in fxs) * 3
    reader = PacketReader(level=level)
    out, pos, size = [], 0, 1
    while pos < len(stream):
        out.extend(reader.feed(stream[pos:pos + size]))
        pos += size
        size = size % 7 + 1
    assert out == [f.packet for f in fxs] * 3


def test_fixture_names_are_unique():
    """Fixture names identify failing cases; duplicates would hide one."""
    names = [f.name for f in FIXTURES + DECODE_ONLY]
    assert len(names) == len(set(names))


def test_fixtures_cover_every_packet_type_at_every_level():
    """Each level has a fixture for every packet type it has (AUTH only in v5)."""
    from mqttd.codec import PACKET_CLASSES
    for level in (3, 4, 5):
        have = {type(f.packet) for f in FIXTURES if f.level == level}
        want = {cls for t, cls in PACKET_CLASSES.items() if level == 5 or t != 15}
        assert want <= have, (level, want - have)
