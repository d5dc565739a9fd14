"""MQTT wire primitives (sans-IO, layer L0).

Data types of OASIS MQTT 5.0 section 1.5 (3.1.1 section 1.5): two and four byte
integers, the Variable Byte Integer, UTF-8 Encoded Strings, Binary Data and
UTF-8 String Pairs.

Every ``decode_*`` function takes ``(data, offset, end=None)`` and returns
``(value, new_offset)``.  ``end`` bounds the field (normally the end of the
packet being decoded, since ``data`` may hold further packets); it defaults to
``len(data)``.  Running past ``end`` raises :class:`MalformedPacket`.

Every ``encode_*`` function returns ``bytes`` and raises :class:`ValueError`
when the value cannot be represented (that is a bug in the caller, not a
protocol error of the peer).
"""
from __future__ import annotations

from codecs import utf_8_decode as _utf8_decode
from typing import Tuple, Union

from .errors import MalformedPacket

Buffer = Union[bytes, bytearray, memoryview]

#: Largest value a Variable Byte Integer can carry (four bytes).
VARINT_MAX = 268_435_455
#: Largest UTF-8 string / binary field (two byte length prefix).
STRING_MAX = 65_535


def _truncated(what: str) -> MalformedPacket:
    return MalformedPacket(f"{what} runs past the end of the packet",
                           spec="MQTT-1.5")


# -- Variable Byte Integer (1.5.5) ------------------------------------------------

def encode_varint(value: int) -> bytes:
    """Encode ``value`` (0..268435455) as a Variable Byte Integer."""
    if value < 128:
        if value < 0:
            raise ValueError(f"variable byte integer out of range: {value}")
        return bytes((value,))
    if value > VARINT_MAX:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: Buffer, offset: int, end: int = None) -> Tuple[int, int]:
    """Decode a Variable Byte Integer of at most four bytes [MQTT-1.5.5-1]."""
    if end is None:
        end = len(data)
    value = 0
    shift = 0
    for i in range(offset, offset + 4):
        if i >= end:
            raise _truncated("variable byte integer")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise MalformedPacket("variable byte integer longer than four bytes",
                          spec="MQTT-1.5.5-1")


# -- integers (1.5.2, 1.5.3) ------------------------------------------------------

def encode_byte(value: int) -> bytes:
    return bytes((value,))


def decode_byte(data: Buffer, offset: int, end: int = None) -> Tuple[int, int]:
    if end is None:
        end = len(data)
    if offset >= end:
        raise _truncated("byte")
    return data[offset], offset + 1


def encode_u16(value: int) -> bytes:
    """Two Byte Integer, big-endian."""
    return value.to_bytes(2, "big")


def decode_u16(data: Buffer, offset: int, end: int = None) -> Tuple[int, int]:
    if end is None:
        end = len(data)
    new = offset + 2
    if new > end:
        raise _truncated("two byte integer")
    return (data[offset] << 8) | data[offset + 1], new


def encode_u32(value: int) -> bytes:
    """Four Byte Integer, big-endian."""
    return value.to_bytes(4, "big")


def decode_u32(data: Buffer, offset: int, end: int = None) -> Tuple[int, int]:
    if end is None:
        end = len(data)
    new = offset + 4
    if new > end:
        raise _truncated("four byte integer")
    return int.from_bytes(data[offset:new], "big"), new


# -- UTF-8 Encoded String (1.5.4), Binary Data (1.5.6), String Pair (1.5.7) -------

def encode_utf8(text: str) -> bytes:
    """A UTF-8 Encoded String with its two byte length prefix.

    Refuses U+0000, lone surrogates and strings longer than 65535 bytes.
    """
    if "\x00" in text:
        raise ValueError("UTF-8 string contains U+0000 [MQTT-1.5.4-2]")
    raw = text.encode("utf-8")  # lone surrogates raise UnicodeEncodeError (a ValueError)
    n = len(raw)
    if n > STRING_MAX:
        raise ValueError(f"UTF-8 string longer than {STRING_MAX} bytes")
    return n.to_bytes(2, "big") + raw


def decode_utf8(data: Buffer, offset: int, end: int = None) -> Tuple[str, int]:
    """Decode a UTF-8 Encoded String.

    Ill-formed UTF-8 (including encoded surrogates U+D800..U+DFFF) is rejected
    [MQTT-1.5.4-1], and so is U+0000 [MQTT-1.5.4-2]; both are Malformed Packets.
    """
    if end is None:
        end = len(data)
    start = offset + 2
    if start > end:
        raise _truncated("UTF-8 string length")
    stop = start + ((data[offset] << 8) | data[offset + 1])
    if stop > end:
        raise _truncated("UTF-8 string")
    try:
        # not str(..., "utf-8"): PyPy 7.3's str() lets encoded surrogates through
        text = _utf8_decode(data[start:stop], "strict", True)[0]
    except UnicodeDecodeError:
        raise MalformedPacket("UTF-8 string is not well-formed UTF-8",
                              spec="MQTT-1.5.4-1") from None
    if "\x00" in text:
        raise MalformedPacket("UTF-8 string contains U+0000", spec="MQTT-1.5.4-2")
    return text, stop


def encode_binary(value: bytes) -> bytes:
    """Binary Data with its two byte length prefix."""
    n = len(value)
    if n > STRING_MAX:
        raise ValueError(f"binary data longer than {STRING_MAX} bytes")
    return n.to_bytes(2, "big") + bytes(value)


def decode_binary(data: Buffer, offset: int, end: int = None) -> Tuple[bytes, int]:
    if end is None:
        end = len(data)
    start = offset + 2
    if start > end:
        raise _truncated("binary data length")
    stop = start + ((data[offset] << 8) | data[offset + 1])
    if stop > end:
        raise _truncated("binary data")
    return bytes(data[start:stop]), stop


def encode_string_pair(pair: Tuple[str, str]) -> bytes:
    """UTF-8 String Pair [MQTT-1.5.7-1]."""
    name, value = pair
    return encode_utf8(name) + encode_utf8(value)


def decode_string_pair(data: Buffer, offset: int,
                       end: int = None) -> Tuple[Tuple[str, str], int]:
    name, offset = decode_utf8(data, offset, end)
    value, offset = decode_utf8(data, offset, end)
    return (name, value), offset
