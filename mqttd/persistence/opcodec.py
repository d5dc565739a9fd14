"""A compact binary form of the journal's most frequent batches (format versions 4, 6).

Most journal records of a busy broker are batches of outbound-message operations:
``PutOutbound`` (a message queued for a persistent session), ``UpdateOutbound``,
``DeleteOutbound`` and the inbound QoS 2 ids.  Pickling them costs about 20 µs per
operation on CPython and 30 µs (several ms before the JIT has warmed up) on PyPy,
whose pickler is written in Python; that cost capped QoS 1 to an offline persistent
subscriber with the durable store at a third of the in-memory rate.  This codec
writes such a batch with :mod:`struct` in about a tenth of the time.

:func:`encode` returns None for a batch it cannot express (any other operation, a
message with MQTT 5 properties, a shared-subscription record): the journal pickles
that batch as before (:mod:`mqttd.persistence.safepickle`).  A pickle starts with
``0x80`` (PROTO), this form with :data:`MAGIC` (``0xB4``), so a reader tells them apart
by the first byte.  Journals holding such records have format version 4; an older
mqttd refuses them by their header instead of reading them as damaged.

Record layout (big-endian), after the magic byte, one item per operation::

    u8 tag, then
    1 PutOutbound     str client_id | u64 seq | u8 qos | u16 packet_id (0: none)
                      | u8 stage | str topic | u32 len + payload | u8 message qos
                      | u8 retain | u8 has_origin [str origin] | u8 has_expiry [f64]
    2 UpdateOutbound  str client_id | u64 seq | u16 packet_id (0: none) | u8 stage
    3 DeleteOutbound  str client_id | u64 seq
    4 AddInboundQos2  str client_id | u16 packet_id
    5 DeleteInboundQos2  str client_id | u16 packet_id
    7 PutOutboundRef  str client_id | u64 seq | u64 message_id | u8 qos
                      | u16 packet_id (0: none) | u8 stage          (format 6)
    6 PutOutboundMessage  as 7, then the message as in 1 (str topic ...)  (format 6)

where ``str`` is u16 length + UTF-8 bytes.  :func:`decode` raises ``ValueError`` on
anything else (an unknown tag, a short or overlong record, bad UTF-8, an invalid
stage): the journal treats that record as damaged, like a pickle that does not load.

Layer L3 (stdlib, attrs records of L0/L1 only).
"""
from __future__ import annotations

import struct
from typing import List, Optional

from mqttd.codec.packets import NO_PROPERTIES
from mqttd.messages import Message
from mqttd.persistence.records import (
    AddInboundQos2, DeleteInboundQos2, DeleteOutbound, OutboundRecord, OutboundStage,
    PutOutbound, PutOutboundMessage, PutOutboundRef, UpdateOutbound)

#: first byte of a record in this form (a pickle's is 0x80)
MAGIC = 0xB4
_MAGIC = bytes([MAGIC])

_PUT, _UPDATE, _DELETE, _ADD_QOS2, _DELETE_QOS2 = 1, 2, 3, 4, 5
_PUT_NEW, _PUT_REF = 6, 7

_U16 = struct.Struct(">H")
_TAG_STR = struct.Struct(">BH")             # tag, client id length
_SEQ_QOS_PID_STAGE = struct.Struct(">QBHB")
_SEQ = struct.Struct(">Q")
_SEQ_PID_STAGE = struct.Struct(">QHB")
_SEQ_MID_QOS_PID_STAGE = struct.Struct(">QQBHB")
_U32 = struct.Struct(">I")
_MSG_FLAGS = struct.Struct(">BBB")          # message qos, retain, has origin
_F64 = struct.Struct(">d")
_STAGES = tuple(OutboundStage)


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise OverflowError("string longer than 65535 bytes")
    return _U16.pack(len(data)) + data


def _name(names: dict, client_id: str) -> bytes:
    data = names[client_id] = client_id.encode("utf-8")
    return data


def _append_message(append, message) -> None:
    """Append the compact form of ``message`` (no properties): topic, payload,
    flags, origin, expiry -- the same bytes for a plain outbound record and
    for the first holder of a shared one."""
    topic = message.topic.encode("utf-8")
    origin = message.origin
    append(_U16.pack(len(topic)))
    append(topic)
    append(_U32.pack(len(message.payload)))
    append(message.payload)
    append(_MSG_FLAGS.pack(message.qos, 1 if message.retain else 0,
                           0 if origin is None else 1))
    if origin is not None:
        append(_str(origin))
    if message.expires_at is None:
        append(b"\x00")
    else:
        append(b"\x01")
        append(_F64.pack(message.expires_at))


def encode(ops) -> Optional[bytes]:
    """``ops`` (a list of store operations) in this form, or None when a pickle must
    carry them (an operation or field this form does not express).  An entry may
    also be the journal's ``(PutOutbound, message id, new)``
    (:func:`mqttd.persistence.journal.journal_ops`): written as
    ``PutOutboundMessage`` when ``new``, else as ``PutOutboundRef``."""
    parts = [_MAGIC]
    append = parts.append
    # client id -> its UTF-8 bytes: a batch is mostly one client's operations
    names: dict = {}
    try:
        for op in ops:
            cls = op.__class__
            if cls is tuple or cls is PutOutboundMessage:
                # the journal's pending (PutOutbound, message id, new): the
                # message's first record carries it (tag 6), the others its id
                if cls is tuple:
                    put, mid, new = op
                else:
                    put, mid, new = op, op.message_id, True
                record = put.record
                if record.share is not None:
                    return None
                message = record.message
                if new and (message.properties is not NO_PROPERTIES
                            or message.__class__ is not Message):
                    return None
                cid = (names.get(put.client_id) or _name(names, put.client_id))
                append(_TAG_STR.pack(_PUT_NEW if new else _PUT_REF, len(cid)))
                append(cid)
                append(_SEQ_MID_QOS_PID_STAGE.pack(record.seq, mid, record.qos,
                                                   record.packet_id or 0, record.stage))
                if not new:
                    continue
                _append_message(append, message)
            elif cls is PutOutbound:
                record = op.record
                message = record.message
                if (record.share is not None or message.properties is not NO_PROPERTIES
                        or message.__class__ is not Message):
                    return None
                cid = (names.get(op.client_id) or _name(names, op.client_id))
                append(_TAG_STR.pack(_PUT, len(cid)))
                append(cid)
                append(_SEQ_QOS_PID_STAGE.pack(record.seq, record.qos, record.packet_id or 0,
                                               record.stage))
                _append_message(append, message)
            elif cls is PutOutboundRef:
                if op.share is not None:
                    return None
                cid = (names.get(op.client_id) or _name(names, op.client_id))
                append(_TAG_STR.pack(_PUT_REF, len(cid)))
                append(cid)
                append(_SEQ_MID_QOS_PID_STAGE.pack(op.seq, op.message_id, op.qos,
                                                   op.packet_id or 0, op.stage))
            elif cls is DeleteOutbound:
                cid = (names.get(op.client_id) or _name(names, op.client_id))
                append(_TAG_STR.pack(_DELETE, len(cid)))
                append(cid)
                append(_SEQ.pack(op.seq))
            elif cls is UpdateOutbound:
                cid = (names.get(op.client_id) or _name(names, op.client_id))
                append(_TAG_STR.pack(_UPDATE, len(cid)))
                append(cid)
                append(_SEQ_PID_STAGE.pack(op.seq, op.packet_id or 0, op.stage))
            elif cls is AddInboundQos2 or cls is DeleteInboundQos2:
                cid = (names.get(op.client_id) or _name(names, op.client_id))
                append(_TAG_STR.pack(_ADD_QOS2 if cls is AddInboundQos2 else _DELETE_QOS2,
                                     len(cid)))
                append(cid)
                append(_U16.pack(op.packet_id))
            else:
                return None
    except (struct.error, OverflowError, TypeError, ValueError):
        # out of this form's ranges (a client id over 64 KiB, a negative number: PyPy's
        # struct raises ValueError for those, CPython struct.error): pickle it
        return None
    return b"".join(parts)


def is_encoded(payload) -> bool:
    return len(payload) > 0 and payload[0] == MAGIC


def decode(payload) -> List[object]:
    """The operations of a record written by :func:`encode`; ``ValueError`` if it is
    not one (truncated, trailing bytes, unknown tag or stage, bad UTF-8)."""
    data = bytes(payload)
    end = len(data)
    if not end or data[0] != MAGIC:
        raise ValueError("not a compact operations record")
    pos = 1
    ops: List[object] = []

    def take(n: int) -> int:
        nonlocal pos
        start = pos
        pos += n
        if pos > end:
            raise ValueError("truncated compact operations record")
        return start

    def text() -> str:
        (n,) = _U16.unpack_from(data, take(2))
        start = take(n)
        return data[start:start + n].decode("utf-8")

    def stage(value: int) -> OutboundStage:
        if value >= len(_STAGES):
            raise ValueError(f"invalid outbound stage {value}")
        return _STAGES[value]

    def message_body(topic: str) -> Message:
        (n,) = _U32.unpack_from(data, take(4))
        start = take(n)
        body = data[start:start + n]
        mqos, retain, has_origin = _MSG_FLAGS.unpack_from(data, take(_MSG_FLAGS.size))
        origin = text() if has_origin else None
        expires_at = None
        if data[take(1)]:
            (expires_at,) = _F64.unpack_from(data, take(8))
        return Message(topic, body, mqos, bool(retain), NO_PROPERTIES, origin, expires_at)

    while pos < end:
        tag = data[take(1)]
        client_id = text()
        if tag == _PUT_REF or tag == _PUT_NEW:
            seq, mid, qos, pid, st = _SEQ_MID_QOS_PID_STAGE.unpack_from(
                data, take(_SEQ_MID_QOS_PID_STAGE.size))
            if tag == _PUT_REF:
                ops.append(PutOutboundRef(client_id, seq, mid, qos, pid or None, stage(st)))
            else:
                record = OutboundRecord(seq, message_body(text()), qos, pid or None, stage(st))
                ops.append(PutOutboundMessage(client_id, record, mid))
        elif tag == _PUT:
            seq, qos, pid, st = _SEQ_QOS_PID_STAGE.unpack_from(data, take(_SEQ_QOS_PID_STAGE.size))
            record = OutboundRecord(seq, message_body(text()), qos, pid or None, stage(st))
            ops.append(PutOutbound(client_id, record))
        elif tag == _DELETE:
            (seq,) = _SEQ.unpack_from(data, take(8))
            ops.append(DeleteOutbound(client_id, seq))
        elif tag == _UPDATE:
            seq, pid, st = _SEQ_PID_STAGE.unpack_from(data, take(_SEQ_PID_STAGE.size))
            ops.append(UpdateOutbound(client_id, seq, pid or None, stage(st)))
        elif tag == _ADD_QOS2 or tag == _DELETE_QOS2:
            (pid,) = _U16.unpack_from(data, take(2))
            ops.append((AddInboundQos2 if tag == _ADD_QOS2 else DeleteInboundQos2)(client_id, pid))
        else:
            raise ValueError(f"unknown operation tag {tag}")
    return ops
