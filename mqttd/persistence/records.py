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
#: 5: subscription deltas (``PutSubscription``, ``DeleteSubscription``) and a
#: session's connect/disconnect state without its subscriptions
#: (``PutSessionState``): a SUBSCRIBE or a reconnect of a session with 10,000
#: subscriptions no longer rewrites them all (REVIEW-S9 R15).  Checkpoints
#: still hold whole ``SessionRecord``\ s; versions 1..4 read unchanged.
FORMAT_VERSION = 5


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


@attrs.define(eq=False)
class StoredSession:
    """What a store holds of one persistent session (mutable while applying).

    ``record`` is the session's whole :class:`SessionRecord`.  The subscription
    delta operations (format 5) change one filter in O(1): they keep the
    subscriptions in a dict (filter -> record, in subscription order) and
    ``record`` builds its ``subscriptions`` tuple again only when it is read
    after a change (a checkpoint, the broker's restore, ``mqttd store dump``).
    """

    _record: SessionRecord
    outbound: Dict[int, OutboundRecord] = attrs.Factory(dict)   # seq -> record, in seq order
    inbound_qos2: set = attrs.Factory(set)                       # packet ids awaiting PUBREL
    #: filter -> SubscriptionRecord once a delta was applied (then authoritative:
    #: ``_record.subscriptions`` may be stale while ``_stale``); None before
    _subs: Optional[Dict[str, SubscriptionRecord]] = attrs.field(default=None, init=False)
    _stale: bool = attrs.field(default=False, init=False)

    @property
    def record(self) -> SessionRecord:
        if self._stale:
            self._record = attrs.evolve(self._record,
                                        subscriptions=tuple(self._subs.values()))
            self._stale = False
        return self._record

    @record.setter
    def record(self, record: SessionRecord) -> None:
        self._record = record
        self._subs = None
        self._stale = False

    def subscription_map(self) -> Dict[str, SubscriptionRecord]:
        """The subscriptions as a dict to change in place (then call :meth:`changed`)."""
        if self._subs is None:
            self._subs = {sub.topic_filter: sub for sub in self._record.subscriptions}
        return self._subs

    def changed(self) -> None:
        self._stale = True

    def __eq__(self, other):
        if other.__class__ is not StoredSession:
            return NotImplemented
        return (self.record == other.record and self.outbound == other.outbound
                and self.inbound_qos2 == other.inbound_qos2)

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # mutable, compared by value (as attrs' eq=True would)

    def __repr__(self) -> str:
        return (f"StoredSession(record={self.record!r}, outbound={self.outbound!r}, "
                f"inbound_qos2={self.inbound_qos2!r})")


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


# format 5: subscription deltas and session state without the subscriptions

@attrs.frozen(slots=True)
class PutSubscription:
    """Add or replace one subscription of a session [MQTT-3.8.4-3] (others kept)."""
    client_id: str
    record: SubscriptionRecord


@attrs.frozen(slots=True)
class DeleteSubscription:
    """Remove one subscription of a session (others kept)."""
    client_id: str
    topic_filter: str


@attrs.frozen(slots=True)
class PutSessionState:
    """A session's record fields but its subscriptions: written on (re)connect,
    close and a v5 DISCONNECT's new expiry interval.  Keeps the session's
    subscriptions, outbound messages and inbound QoS 2 ids; creates the session
    (without subscriptions) if the store has none of that client id."""
    client_id: str
    protocol_level: int = 4
    expiry_interval: Optional[int] = None
    disconnected_at: Optional[float] = None
    owner: Optional[str] = None

    @classmethod
    def of(cls, record: SessionRecord) -> "PutSessionState":
        return cls(record.client_id, record.protocol_level, record.expiry_interval,
                   record.disconnected_at, record.owner)


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


def _put_subscription(state: StoredState, op: PutSubscription) -> None:
    session = state.sessions.get(op.client_id)
    if session is not None:
        session.subscription_map()[op.record.topic_filter] = op.record
        session.changed()


def _delete_subscription(state: StoredState, op: DeleteSubscription) -> None:
    session = state.sessions.get(op.client_id)
    if session is not None:
        subs = session.subscription_map()
        if subs.pop(op.topic_filter, None) is not None:
            session.changed()


def _put_session_state(state: StoredState, op: PutSessionState) -> None:
    session = state.sessions.get(op.client_id)
    if session is None:
        state.sessions[op.client_id] = StoredSession(SessionRecord(
            op.client_id, op.protocol_level, (), op.expiry_interval, op.disconnected_at,
            op.owner))
        return
    # the record's subscriptions as they are (possibly stale: the dict of the
    # deltas stays authoritative), the other fields replaced -- O(1)
    old = session._record
    session._record = SessionRecord(op.client_id, op.protocol_level, old.subscriptions,
                                    op.expiry_interval, op.disconnected_at, op.owner)


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
    PutSubscription: _put_subscription,
    DeleteSubscription: _delete_subscription,
    PutSessionState: _put_session_state,
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
