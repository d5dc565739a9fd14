"""The bridge bit (protocol level | 0x80, mosquitto's try_private) in CONNECT."""
import pytest

from mqttd.codec import PacketReader, UnsupportedProtocolVersion, encode
from mqttd.codec.packets import Connect

# CONNECT, MQTT 3.1.1 with the bridge bit (level 0x84), clean session, keepalive 60, id "b"
BRIDGE_311 = bytes([0x10, 0x0D, 0x00, 0x04]) + b"MQTT" + bytes([0x84, 0x02, 0x00, 0x3C,
                                                                 0x00, 0x01]) + b"b"
# the same for MQTT 3.1 (level 0x83)
BRIDGE_31 = bytes([0x10, 0x0F, 0x00, 0x06]) + b"MQIsdp" + bytes([0x83, 0x02, 0x00, 0x3C,
                                                                   0x00, 0x01]) + b"b"


@pytest.mark.parametrize("data, level", [(BRIDGE_311, 4), (BRIDGE_31, 3)])
def test_bridge_levels_decode_as_bridge_connects(data, level):
    """Levels 0x83/0x84 are v3.1/v3.1.1 CONNECTs with bridge=True; encoding gives the bytes back."""
    reader = PacketReader(level=None)
    (connect,) = reader.feed(data)
    assert connect == Connect(level, "b", True, 60, bridge=True)
    assert reader.level == level
    assert encode(connect, level) == data


def test_bridge_bit_on_mqtt5_is_an_unsupported_level():
    """There is no bridge bit in MQTT 5: level 0x85 is refused as unsupported."""
    data = bytearray(BRIDGE_311)
    data[8] = 0x85
    with pytest.raises(UnsupportedProtocolVersion):
        PacketReader(level=None).feed(bytes(data))
    with pytest.raises(ValueError):
        encode(Connect(5, "b", bridge=True), 5)
