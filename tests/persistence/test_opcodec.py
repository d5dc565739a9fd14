"""The compact journal form of outbound-message batches (mqttd.persistence.opcodec)."""
from __future__ import annotations

import os
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttd.codec.packets import NO_PROPERTIES, Properties
from mqttd.messages import Message
from mqttd.persistence import opcodec, safepickle
from mqttd.persistence.journal import decode_payload
from mqttd.persistence.records import (
    AddInboundQos2, DeleteInboundQos2, DeleteOutbound, DeleteSession, OutboundRecord,
    OutboundStage, PutOutbound, UpdateOutbound)


def put(seq=1, client_id="c", topic="t", payload=b"p", qos=1, packet_id=None,
        stage=OutboundStage.QUEUED, **message):
    return PutOutbound(client_id, OutboundRecord(
        seq, Message(topic, payload, message.pop("mqos", qos), **message), qos, packet_id, stage))


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
stages = st.sampled_from(list(OutboundStage))
pids = st.one_of(st.none(), st.integers(1, 65535))
ops = st.one_of(
    st.builds(lambda cid, seq, topic, body, qos, pid, stage, retain, origin, exp: put(
        seq, cid, topic, body, qos, pid, stage, retain=retain, origin=origin, expires_at=exp),
        texts, st.integers(0, 2 ** 63), texts, st.binary(max_size=300), st.integers(0, 2), pids,
        stages, st.booleans(), st.one_of(st.none(), texts),
        st.one_of(st.none(), st.floats(allow_nan=False))),
    st.builds(UpdateOutbound, texts, st.integers(0, 2 ** 63), pids, stages),
    st.builds(DeleteOutbound, texts, st.integers(0, 2 ** 63)),
    st.builds(AddInboundQos2, texts, st.integers(1, 65535)),
    st.builds(DeleteInboundQos2, texts, st.integers(1, 65535)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, min_size=1, max_size=20))
def test_every_outbound_batch_round_trips_through_the_compact_form(batch):
    """Whatever the journal writes in the compact form, it reads back equal."""
    encoded = opcodec.encode(batch)
    assert encoded is not None and encoded[0] == opcodec.MAGIC
    assert decode_payload(encoded) == batch


def test_batches_the_form_cannot_carry_are_left_to_pickle():
    """Another operation, MQTT 5 properties or a shared subscription: encode() declines."""
    assert opcodec.encode([put(), DeleteSession("c")]) is None
    with_props = PutOutbound("c", OutboundRecord(
        1, Message("t", b"p", 1, properties=Properties(content_type="x")), 1))
    assert opcodec.encode([with_props]) is None
    shared = PutOutbound("c", OutboundRecord(1, Message("t"), 1, share="$share/g/t"))
    assert opcodec.encode([shared]) is None
    assert opcodec.encode([put(client_id="x" * 70000)]) is None
    assert opcodec.encode([put(seq=-1)]) is None          # PyPy: ValueError, CPython: struct.error
    assert opcodec.encode([DeleteOutbound("c", 2 ** 64)]) is None
    # and those batches still load as pickles
    batch = [put(), DeleteSession("c")]
    assert decode_payload(safepickle.dumps(batch)) == batch


def test_a_decoded_message_shares_the_default_properties():
    """Messages read back use the NO_PROPERTIES singleton the hot path compares by identity."""
    (op,) = decode_payload(opcodec.encode([put()]))
    assert op.record.message.properties is NO_PROPERTIES


@pytest.mark.parametrize("damage", [
    lambda b: b[:-1],                          # truncated
    lambda b: b + b"\x03",                     # a trailing partial item
    lambda b: b[:1] + b"\x09" + b[2:],         # unknown tag
    lambda b: b.replace(b"t\xc3\xa4", b"t\xff\xa4"),           # bad UTF-8
])
def test_a_damaged_compact_record_is_refused_not_misread(damage):
    """A CRC-valid record that is not a well-formed batch raises, so the journal counts it damaged."""
    good = opcodec.encode([put(topic="tä"), DeleteOutbound("c", 5)])
    bad = damage(good)
    assert bad != good
    with pytest.raises(pickle.UnpicklingError):
        decode_payload(bad)


def test_an_invalid_stage_is_refused():
    """A stage byte outside OutboundStage is damage, not a new stage."""
    good = opcodec.encode([UpdateOutbound("c", 1, 2, OutboundStage.PUBREL_SENT)])
    with pytest.raises(pickle.UnpicklingError):
        decode_payload(good[:-1] + b"\x07")


def test_random_bytes_after_the_magic_never_crash_the_reader():
    """Garbage behind the magic byte is UnpicklingError or a list of operations, nothing else."""
    rng = __import__("random").Random(13)
    for _ in range(300):
        junk = bytes([opcodec.MAGIC]) + os.urandom(rng.randrange(1, 60))
        try:
            result = decode_payload(junk)
        except pickle.UnpicklingError:
            continue
        assert isinstance(result, list)
