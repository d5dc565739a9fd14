"""Fixed-header and CONNECT flags, validated per protocol level (issue 7 fault 4).

Table-driven over every packet type, every level and all 16 flag values; the
bodies are hand-written valid bodies, so only the flags decide.
"""
from __future__ import annotations

import pytest

from mqttd.codec import PacketReader
from mqttd.codec.errors import MalformedPacket, MQTTError, ProtocolError
from mqttd.codec.packets import Pubrel, Subscribe, Subscription, Unsubscribe

from codec.fixtures import hexb

# packet type -> level -> (base flags, valid body)
_BODIES = {
    2: (0, {3: "00 00", 4: "00 00", 5: "00 00"}),                          # CONNACK
    4: (0, {3: "00 01", 4: "00 01", 5: "00 01"}),                          # PUBACK
    5: (0, {3: "00 01", 4: "00 01", 5: "00 01"}),                          # PUBREC
    6: (2, {3: "00 01", 4: "00 01", 5: "00 01"}),                          # PUBREL
    7: (0, {3: "00 01", 4: "00 01", 5: "00 01"}),                          # PUBCOMP
    8: (2, {3: "00 01 00 01 61 00", 4: "00 01 00 01 61 00",
            5: "00 01 00 00 01 61 00"}),                                   # SUBSCRIBE
    9: (0, {3: "00 01 00", 4: "00 01 00", 5: "00 01 00 00"}),              # SUBACK
    10: (2, {3: "00 01 00 01 61", 4: "00 01 00 01 61",
             5: "00 01 00 00 01 61"}),                                     # UNSUBSCRIBE
    11: (0, {3: "00 01", 4: "00 01", 5: "00 01 00 00"}),                   # UNSUBACK
    12: (0, {3: "", 4: "", 5: ""}),                                        # PINGREQ
    13: (0, {3: "", 4: "", 5: ""}),                                        # PINGRESP
    14: (0, {3: "", 4: "", 5: ""}),                                        # DISCONNECT
    15: (0, {5: ""}),                                                      # AUTH
}

#: MQTT 3.1 allows DUP on the retransmittable QoS 1 packets (first bytes 0x8A, 0xAA, 0x6A)
_V31_DUP_TYPES = {6, 8, 10}


def _cases():
    for ptype, (base, bodies) in _BODIES.items():
        for level, body in bodies.items():
            for flags in range(16):
                ok = flags == base or (level == 3 and ptype in _V31_DUP_TYPES and flags == 0x0A)
                yield pytest.param(ptype, level, flags, body, ok,
                                   id=f"type{ptype}-level{level}-flags{flags:x}")


@pytest.mark.parametrize("ptype,level,flags,body,ok", list(_cases()))
def test_fixed_header_flags_are_checked_per_level(ptype, level, flags, body, ok):
    """Only the flags the packet's level allows decode; any other is malformed
    [MQTT-2.2.2-2] (3.1.1), [MQTT-2.1.3-1] (5.0), MQTT 3.1 §2.1 (DUP on 0x8A/0xAA/0x6A)."""
    data = bytes((ptype << 4 | flags,)) + bytes((len(hexb(body)),)) + hexb(body)
    reader = PacketReader(level=level)
    if ok:
        assert len(reader.feed(data)) == 1
    else:
        with pytest.raises(MalformedPacket):
            reader.feed(data)


@pytest.mark.parametrize("data,packet", [
    (hexb("8a 06 00 07 00 01 61 01"), Subscribe(7, (Subscription("a", 1),))),
    (hexb("aa 05 00 07 00 01 61"), Unsubscribe(7, ("a",))),
    (hexb("6a 02 00 07"), Pubrel(7)),
])
def test_mqtt31_retransmissions_with_dup_decode(data, packet):
    """The example bytes of issue 7 fault 4 decode at level 3, one byte at a time too."""
    assert PacketReader(level=3).feed(data) == [packet]
    reader = PacketReader(level=3)
    out = []
    for byte in data:
        out += reader.feed(bytes((byte,)))
    assert out == [packet]


def _connect(level: int, flags: int) -> bytes:
    name = b"MQIsdp" if level == 3 else b"MQTT"
    props = b"\x00" if level == 5 else b""
    body = (len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c"
            + props + b"\x00\x02c1")
    return bytes((0x10, len(body))) + body


@pytest.mark.parametrize("level,ok", [(3, True), (4, False), (5, False)])
def test_connect_reserved_flag_is_checked_per_level(level, ok):
    """MQTT 3.1 has no reserved-bit rule in CONNECT flags; 3.1.1 and 5.0 do [MQTT-3.1.2-3]."""
    reader = PacketReader()
    if ok:
        [packet] = reader.feed(_connect(level, 0x03))
        assert packet.protocol_level == 3 and packet.clean_start
    else:
        with pytest.raises(MalformedPacket):
            reader.feed(_connect(level, 0x03))


@pytest.mark.parametrize("first", [0x40, 0x50, 0x62, 0x70])
@pytest.mark.parametrize("level", [3, 4, 5])
def test_acknowledgement_with_packet_id_0_is_a_protocol_error(first, level):
    """PUBACK/PUBREC/PUBREL/PUBCOMP with packet id 0 [MQTT-2.3.1-1], [MQTT-2.2.1-3];
    also in a longer v5 form and through the fast path."""
    with pytest.raises(ProtocolError):
        PacketReader(level=level).feed(bytes((first, 2, 0, 0)))
    if level == 5:
        with pytest.raises(ProtocolError):
            PacketReader(level=5).feed(bytes((first, 4, 0, 0, 0x10, 0)))


@pytest.mark.parametrize("data", [hexb("90 03 00 00 00"), hexb("b0 02 00 00")])
def test_suback_and_unsuback_with_packet_id_0_are_refused(data):
    """SUBACK/UNSUBACK carry the non-zero id of what they acknowledge."""
    with pytest.raises(MQTTError):
        PacketReader(level=4).feed(data)


# --- found by bench/fuzz.py -------------------------------------------------------------------

@pytest.mark.parametrize("level", [3, 4, 5])
def test_short_ack_with_a_two_byte_remaining_length_is_framed_by_its_header(level):
    """70 81 00 3b: PUBCOMP whose Remaining Length 1 takes two bytes: the packet id is
    truncated (malformed), fed whole or byte by byte — not PUBCOMP 59 from the wrong offset."""
    data = hexb("70 81 00 3b")
    with pytest.raises(MalformedPacket):
        PacketReader(level=level).feed(data)
    reader = PacketReader(level=level)
    with pytest.raises(MalformedPacket):
        for byte in data:
            reader.feed(bytes((byte,)))


def test_second_connect_does_not_change_the_level_of_the_stream():
    """A CONNECT after the level is known is a protocol error in the reader itself
    [MQTT-3.1.0-2]: what follows is never decoded at another level."""
    v4_connect = hexb("10 0e 00 04 4d 51 54 54 04 02 00 3c 00 02 63 31")
    reader = PacketReader(level=5)
    with pytest.raises(ProtocolError):
        reader.feed(v4_connect)
    assert reader.level == 5


def test_packets_before_an_error_in_the_same_chunk_are_kept():
    """PINGREQ then a reserved packet type in one chunk: the PINGREQ is in
    decoded_before, as it would have been returned had it come in its own chunk."""
    reader = PacketReader(level=4)
    with pytest.raises(MalformedPacket) as info:
        reader.feed(hexb("c0 00 f0 00"))
    assert [type(p).__name__ for p in info.value.decoded_before] == ["Pingreq"]
    with pytest.raises(MalformedPacket) as again:
        reader.feed(b"")
    assert again.value.decoded_before == []
