"""PublishTemplate.from_raw: forwarding a received PUBLISH's own bytes."""
import pytest

from mqttd.codec import PacketReader, encode, publish_template
from mqttd.codec.encoder import PublishTemplate
from mqttd.codec.packets import Properties, Publish


@pytest.mark.parametrize("level", [3, 4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_raw_template_equals_a_fresh_encoding(level, qos):
    """The received bytes, re-stamped, are exactly what encoding the message again gives."""
    props = Properties(user_properties=(("k", "v"),)) if level == 5 else Properties()
    received = Publish("a/b", b"payload" * 30, qos, False, dup=bool(qos),
                       packet_id=77 if qos else None, properties=props)
    (decoded,) = PacketReader(level=level).feed(encode(received, level))
    assert decoded.raw == encode(received, level)
    fresh = publish_template("a/b", b"payload" * 30, qos, False, props, level)

    raw = PublishTemplate.from_raw(decoded.raw, qos)
    for pid, dup in ([(None, False)] if qos == 0 else [(1, False), (513, True), (65535, False)]):
        assert raw.encode(pid, dup) == fresh.encode(pid, dup)


def test_raw_is_not_part_of_the_packet_value():
    """Two PUBLISH values that differ only in raw are equal."""
    assert Publish("t", b"x", raw=b"\x30\x04\x00\x01tx") == Publish("t", b"x")
