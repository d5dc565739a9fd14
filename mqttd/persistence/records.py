"""Plain, picklable records of durable broker state, and the operations on it.

Stores never see a live Session or Protocol object.  The broker describes every
change of durable state as one of the operation values below and hands it to
``IBrokerStore.write``; a store persists the operations (journal) and can
rebuild a :class:`StoredState` from them with :func:`apply_op`.  That function
is the single definition of what an operation means, shared by every backend
and by the tests.

Layer L1: imports only the codec values and attrs.
"""
from __future__ import annotations

import enum
from typing import Dict, Optional, Tuple

import attrs

from mqttd.messages import Message

#: bumped whenever the shape of a record or file changes; stores write it in
#: their files and read every version from 1 to this one.
#: 2: pending delayed wills (``WillRecord``, ``PutWill``, ``DeleteWill``, the
#: ``"w"`` checkpoint item).
#: 3: dbm checkpoint values are frame sequences; snapshot end frames carry the
#: generation and version (a damaged header costs nothing).
#: 4: journal records of outbound-message operations may be in the compact
#: binary form of :mod:`mqttd.persistence.opcodec` (first byte 0xB4).
FORMAT_VERSION = 4


class OutboundStage(enum.IntEnum):
    """Where an outbound message to one session stands."""

    QUEUED = 0          # not sent yet (session offline or window full)
    PUBLISH_SENT = 1    # QoS 1/2 PUBLISH sent, waiting for PUBACK / PUBREC
    PUBREL_SENT = 2     # QoS 2 PUBREL sent, waiting for PUBCOMP


@attrs.frozen(slots=True)
class SubscriptionRecord:
    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    subscription_identifier: Optional[int] = None


@attrs.frozen(slots=True)
class SessionRecord:
    client_id: str
    protocol_level: int = 4
    subscriptions: Tuple[SubscriptionRecord, ...] = ()
    #: seconds the session outlives its connection; ``None`` = forever (v3)
    expiry_interval: Optional[int] = None
    #: broker clock time of the last disconnect; ``None`` while connected
    disconnected_at: Optional[float] = None
    #: the username that created the session (session ownership); records
    #: written before this field existed have none (read with getattr)
    owner: Optional[str] = None


@attrs.frozen(slots=True)
class OutboundRecord:
    """A message owed to a session: queued, or in flight with a packet id."""

    seq: int                     # per-session order of delivery
    message: Message
    qos: int                     # the QoS it is delivered with
    packet_id: Optional[int] = None
    stage: OutboundStage = OutboundStage.QUEUED
    #: ``$share/{ShareName}/{filter}`` when the message came through that shared
    #: subscription (it goes to another member if this session ends first)
    share: Optional[str] = None


@attrs.frozen(slots=True)
class WillRecord:
    """A will waiting for its Will Delay Interval [MQTT-3.1.2-8] (see mqttd.wills)."""

    client_id: str
    #: the will as the PUBLISH it becomes (``expires_at`` unset until published)
    message: Message
    #: broker clock time (wall clock) at which it is published
    publish_at: float
    #: stored (the session is persistent) or only in memory
    durable: bool = True


@attrs.define
class StoredSession:
    """What a store holds of one persistent session (mutable while applying)."""

    record: SessionRecord
    outbound: Dict[int, OutboundRecord] = attrs.Factory(dict)   # seq -> record, in seq order
    inbound_qos2: set = attrs.Factory(set)                       # packet ids awaiting PUBREL


@attrs.define
class StoredState:
    sessions: Dict[str, StoredSession] = attrs.Factory(dict)
    retained: Dict[str, Message] = attrs.Factory(dict)
    #: client id -> pending delayed will
    wills: Dict[str, WillRecord] = attrs.Factory(dict)


# --- operations -------------------------------------------------------------

@attrs.frozen(slots=True)
class PutSession:
    """Create or replace a session's record (subscriptions, expiry).

    Replacing keeps the session's outbound messages and inbound QoS 2 ids."""
    record: SessionRecord


@attrs.frozen(slots=True)
class DeleteSession:
    """Forget a session with everything it owned."""
    client_id: str


@attrs.frozen(slots=True)
class PutOutbound:
    client_id: str
    record: OutboundRecord


@attrs.frozen(slots=True)
class UpdateOutbound:
    """Move an outbound message to another stage without rewriting its body."""
    client_id: str
    seq: int
    packet_id: Optional[int]
    stage: OutboundStage


@attrs.frozen(slots=True)
class DeleteOutbound:
    client_id: str
    seq: int


@attrs.frozen(slots=True)
class AddInboundQos2:
    client_id: str
    packet_id: int


@attrs.frozen(slots=True)
class DeleteInboundQos2:
    client_id: str
    packet_id: int


@attrs.frozen(slots=True)
class PutRetained:
    message: Message


@attrs.frozen(slots=True)
class DeleteRetained:
    topic: str


@attrs.frozen(slots=True)
class PutWill:
    """A delayed will is pending (replaces the client's previous one)."""
    record: WillRecord


@attrs.frozen(slots=True)
class DeleteWill:
    """The client's pending will was published or cancelled."""
    client_id: str


def _put_session(state: StoredState, op: PutSession) -> None:
    existing = state.sessions.get(op.record.client_id)
    if existing is None:
        state.sessions[op.record.client_id] = StoredSession(op.record)
    else:
        existing.record = op.record


def _delete_session(state: StoredState, op: DeleteSession) -> None:
    state.sessions.pop(op.client_id, None)


def _put_outbound(state: StoredState, op: PutOutbound) -> None:
    session = state.sessions.get(op.client_id)
    if session is not None:
        session.outbound[op.record.seq] = op.record


def _update_outbound(state: StoredState, op: UpdateOutbound) -> None:
    session = state.sessions.get(op.client_id)
    if session is not None:
        record = session.outbound.get(op.seq)
        if record is not None:
            # the constructor, not attrs.evolve: once per message sent to a
            # persistent session (evolve costs 3x as much, more on PyPy)
            session.outbound[op.seq] = OutboundRecord(
                record.seq, record.message, record.qos, op.packet_id, op.stage, record.share)


def _delete_outbound(state: StoredState, op: DeleteOutbound) -> None:
    session = state.sessions.get(op.client_id)
    if session is not None:
        session.outbound.pop(op.seq, None)


def _add_inbound(state: StoredState, op: AddInboundQos2) -> None:
    session = state.sessions.get(op.client_id)
    if session is not None:
        session.inbound_qos2.add(op.packet_id)


def _delete_inbound(state: StoredState, op: DeleteInboundQos2) -> None:
    session = state.sessions.get(op.client_id)
    if session is not None:
        session.inbound_qos2.discard(op.packet_id)


def _put_retained(state: StoredState, op: PutRetained) -> None:
    state.retained[op.message.topic] = op.message


def _delete_retained(state: StoredState, op: DeleteRetained) -> None:
    state.retained.pop(op.topic, None)


def _put_will(state: StoredState, op: PutWill) -> None:
    state.wills[op.record.client_id] = op.record


def _delete_will(state: StoredState, op: DeleteWill) -> None:
    state.wills.pop(op.client_id, None)


_APPLY = {
    PutSession: _put_session,
    DeleteSession: _delete_session,
    PutOutbound: _put_outbound,
    UpdateOutbound: _update_outbound,
    DeleteOutbound: _delete_outbound,
    AddInboundQos2: _add_inbound,
    DeleteInboundQos2: _delete_inbound,
    PutRetained: _put_retained,
    DeleteRetained: _delete_retained,
    PutWill: _put_will,
    DeleteWill: _delete_will,
}

#: every operation type, for allow-lists and tests
OPERATION_TYPES = tuple(_APPLY)


def apply_op(state: StoredState, op) -> None:
    """Apply one operation to ``state`` in place.

    Every operation is idempotent (applying it twice gives the same state),
    so replaying a journal over a checkpoint that already holds part of it
    is safe.  Operations on an unknown session are ignored.
    """
    try:
        handler = _APPLY[type(op)]
    except KeyError:
        raise TypeError(f"not a store operation: {op!r}") from None
    handler(state, op)
