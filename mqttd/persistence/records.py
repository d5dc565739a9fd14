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

from mqttd.messages import Message, message_key

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
#: 6: the message table: a queued message is stored once (``PutOutboundMessage``)
#: and the outbound records of other sessions reference it by id
#: (``PutOutboundRef``; checkpoint items ``"m"`` and ``"l"``); ``PutOutbound`` and
#: ``"o"`` items of earlier versions are still read (REVIEW-S9 R11).
FORMAT_VERSION = 6


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
    # --- the message table (format 6): every message owed to sessions once ---
    # Not compared (two states are equal when their sessions owe equal
    # messages, whatever ids the messages have) and kept consistent by
    # apply_op: an outbound record's message is always the table's object.
    #: message id -> the message, for every message some outbound record holds
    messages: Dict[int, Message] = attrs.field(factory=dict, eq=False, repr=False)
    #: the id the next new message gets (ids are never reused)
    next_message_id: int = attrs.field(default=1, eq=False, repr=False)
    #: message id -> how many outbound records (all sessions) hold it, for the
    #: messages not held by exactly one (absent: one -- most messages are owed
    #: to one session, and this saves them an entry)
    message_refs: Dict[int, int] = attrs.field(init=False, factory=dict, eq=False, repr=False)
    #: :func:`~mqttd.messages.message_key` of the message object -> message id
    #: (identity index)
    message_ids: Dict[int, int] = attrs.field(init=False, factory=dict, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # built with a table (an unpickled state): index it, count its holders
        if self.messages:
            ids = self.message_ids
            refs = self.message_refs
            for mid, message in self.messages.items():
                ids[message_key(message)] = mid
                refs[mid] = 0
            for session in self.sessions.values():
                for record in session.outbound.values():
                    mid = ids.get(message_key(record.message))
                    if mid is not None:
                        refs[mid] += 1
            for mid in [mid for mid, n in refs.items() if n == 1]:
                del refs[mid]


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
    session = state.sessions.pop(op.client_id, None)
    if session is not None and session.outbound:
        for record in session.outbound.values():
            release_message(state, record.message)


def _put_outbound(state: StoredState, op: PutOutbound) -> None:
    link_outbound(state, op.client_id, op.record)


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
        record = session.outbound.pop(op.seq, None)
        if record is not None:
            # release_message, inline: once per message acknowledged
            key = message_key(record.message)
            mid = state.message_ids.get(key)
            if mid is not None:
                refs = state.message_refs
                count = refs.get(mid, 1) - 1
                if count > 1:
                    refs[mid] = count
                elif count == 1:
                    del refs[mid]
                else:
                    refs.pop(mid, None)
                    del state.messages[mid], state.message_ids[key]


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


# --- the message table (format 6, REVIEW-S9 R11) ------------------------------
#
# A message routed to many sessions is one object in the broker; the store
# keeps it once too.  ``StoredState.messages`` maps a message id to the
# message, ``message_refs`` counts the outbound records holding it (over all
# sessions; no entry for the usual one) and a message leaves the table with
# its last record, so no
# message's bytes outlive the last session that owed it.  The broker still
# writes ``PutOutbound`` (the record holds the message); a store that journals
# writes the first record holding a message as ``PutOutboundMessage`` (the
# message with its new id) and every other as ``PutOutboundRef`` (the id
# only), and its checkpoints hold each message once (``"m"`` items) and
# per-session references (``"l"`` items).  Applying ``PutOutbound`` interns
# its message by identity, so applying the broker's operations builds the
# same table (by identity: :func:`~mqttd.messages.message_key`).

@attrs.frozen(slots=True)
class OutboundRef:
    """An :class:`OutboundRecord` as a checkpoint stores it: its message by id."""

    seq: int
    message_id: int
    qos: int
    packet_id: Optional[int] = None
    stage: OutboundStage = OutboundStage.QUEUED
    share: Optional[str] = None


@attrs.frozen(slots=True)
class PutOutboundMessage:
    """:class:`PutOutbound` of a message the table does not hold yet: it is
    added under ``message_id`` (later records reference it by that id)."""
    client_id: str
    record: OutboundRecord
    message_id: int


@attrs.frozen(slots=True)
class PutOutboundRef:
    """:class:`PutOutbound` of a message the table holds (``message_id``)."""
    client_id: str
    seq: int
    message_id: int
    qos: int
    packet_id: Optional[int] = None
    stage: OutboundStage = OutboundStage.QUEUED
    share: Optional[str] = None


def hold_message(state: StoredState, message: Message) -> Tuple[int, bool]:
    """Count one more record holding ``message``; ``(message id, new)`` where
    ``new`` says the table did not hold it before (interned by identity)."""
    key = message_key(message)
    mid = state.message_ids.get(key)
    if mid is None:
        mid = state.next_message_id
        state.next_message_id = mid + 1
        state.messages[mid] = message
        state.message_ids[key] = mid
        return mid, True
    refs = state.message_refs
    count = refs.get(mid, 1) + 1
    if count == 1:
        del refs[mid]           # was held by none (added by add_message)
    else:
        refs[mid] = count
    return mid, False


def release_message(state: StoredState, message: Message) -> None:
    """One record fewer holds ``message``; the last one takes it out of the table."""
    key = message_key(message)
    mid = state.message_ids.get(key)
    if mid is None:
        return          # not in the table (a state built without apply_op)
    refs = state.message_refs
    count = refs.get(mid, 1) - 1
    if count > 1:
        refs[mid] = count
    elif count == 1:
        del refs[mid]
    else:
        refs.pop(mid, None)
        del state.messages[mid], state.message_ids[key]


def link_outbound(state: StoredState, client_id: str,
                  record: OutboundRecord) -> Optional[Tuple[int, bool]]:
    """Put ``record`` in session ``client_id``'s outbound messages, holding its
    message in the table; returns :func:`hold_message`'s ``(id, new)``, or
    None when the session is unknown (nothing changes)."""
    session = state.sessions.get(client_id)
    if session is None:
        return None
    held = hold_message(state, record.message)
    old = session.outbound.get(record.seq)
    session.outbound[record.seq] = record
    if old is not None:
        release_message(state, old.message)
    return held


def resolve_ref(state: StoredState, ref) -> Optional[OutboundRecord]:
    """The record an :class:`OutboundRef` (or :class:`PutOutboundRef`) stands
    for, or None if its message is not in the table."""
    message = state.messages.get(ref.message_id)
    if message is None:
        return None
    return OutboundRecord(ref.seq, message, ref.qos, ref.packet_id, ref.stage, ref.share)


def add_message(state: StoredState, message_id: int, message: Message) -> Message:
    """Put ``message`` in the table under ``message_id`` unless it holds one
    there already (a replay); returns the table's message, not yet counted."""
    held = state.messages.get(message_id)
    if held is not None:
        return held
    state.messages[message_id] = message
    state.message_ids[message_key(message)] = message_id
    state.message_refs[message_id] = 0          # held by none yet
    if message_id >= state.next_message_id:
        state.next_message_id = message_id + 1
    return message


def _put_outbound_message(state: StoredState, op: PutOutboundMessage) -> None:
    if op.client_id in state.sessions:
        record = op.record
        message = add_message(state, op.message_id, record.message)
        if message is not record.message:
            record = OutboundRecord(record.seq, message, record.qos, record.packet_id,
                                    record.stage, record.share)
        link_outbound(state, op.client_id, record)


def _put_outbound_ref(state: StoredState, op: PutOutboundRef) -> None:
    if op.client_id in state.sessions:
        record = resolve_ref(state, op)
        if record is not None:       # else: its message was in a damaged record
            link_outbound(state, op.client_id, record)


def drop_unreferenced(state: StoredState) -> int:
    """Take messages no record holds out of the table (after recovery: a
    message whose first record was for a session that was gone, or whose
    records were lost with a damaged checkpoint frame).
    Returns how many were dropped."""
    unused = [mid for mid, refs in state.message_refs.items() if refs <= 0]
    for mid in unused:
        message = state.messages.pop(mid)
        del state.message_refs[mid]
        state.message_ids.pop(message_key(message), None)
    return len(unused)


def share_equal_messages(state: StoredState) -> int:
    """Make outbound records holding *equal* messages hold one object (one
    table entry): stores of format < 6 kept one copy per session, and this
    turns them into shared ones on their first load.  Returns how many
    duplicate messages were merged away.  Costs one hash of each distinct
    message (its payload) once."""
    first: Dict[Message, Message] = {}
    merged = 0
    for session in state.sessions.values():
        outbound = session.outbound
        for seq, record in list(outbound.items()):
            message = record.message
            try:
                kept = first.setdefault(message, message)
            except TypeError:       # unhashable (properties with a list): keep it
                continue
            if kept is not message:
                hold_message(state, kept)
                outbound[seq] = OutboundRecord(record.seq, kept, record.qos, record.packet_id,
                                               record.stage, record.share)
                before = len(state.messages)
                release_message(state, message)
                merged += before - len(state.messages)
    return merged


_APPLY.update({
    PutOutboundMessage: _put_outbound_message,
    PutOutboundRef: _put_outbound_ref,
})
#: every operation type, for allow-lists and tests (again: with the message
#: table's operations, registered above)
OPERATION_TYPES = tuple(_APPLY)
#: operation class -> the function :func:`apply_op` calls for it (read only:
#: the journal's write path looks the handler up itself, once per operation)
APPLY_HANDLERS = _APPLY
