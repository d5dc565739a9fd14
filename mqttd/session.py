"""One client's session state, independent of any connection (layer L1).

A session outlives its network connection when it is persistent (MQTT 3 clean
session = 0, MQTT 5 session expiry interval > 0).  It owns the client's
subscriptions, the bounded queue of messages not yet sent, the outbound
in-flight window (QoS 1/2 PUBLISH or PUBREL waiting for their acknowledgement)
and the inbound QoS 2 packet ids waiting for PUBREL.  Nothing here does I/O:
the broker core decides what to send and what to store.
"""
from __future__ import annotations

import collections
from typing import Deque, Dict, Optional

import attrs

from mqttd.codec.packets import Will
from mqttd.messages import Message, message_key, message_size
from mqttd.persistence.records import (
    OutboundRecord, OutboundStage, SessionRecord, SubscriptionRecord)


class OverflowPolicy:
    """What a full session queue does with one more message."""

    DROP_NEW = "drop-new"        # keep what is queued, refuse the newcomer
    DROP_OLDEST = "drop-oldest"  # make room by dropping the oldest queued message
    ALL = (DROP_NEW, DROP_OLDEST)


@attrs.frozen
class QueueLimits:
    max_messages: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    policy: str = OverflowPolicy.DROP_OLDEST
    #: cap on the bytes the queued messages of all sessions together hold (their
    #: ``ledger``: a message queued for many sessions counts once); 0 = none
    max_total_bytes: int = 0


class QueueLedger:
    """The bytes queued messages hold over every session sharing the ledger
    (``--max-queued-bytes-total``).

    A message is one object however many sessions it is queued for (a fan-out,
    or the store's shared copy after a restart), so it counts **once**:
    ``queued_bytes`` is the sum of :func:`~mqttd.messages.message_size` over the
    distinct messages queued, and ``queued_held`` maps
    :func:`~mqttd.messages.message_key` of each to the number of queue entries
    holding it.  (A session's own
    ``queued_bytes`` counts every message of its queue: what it is owed.)
    The broker's :class:`~mqttd.metrics.BrokerStats` is its ledger.
    """

    queued_bytes: int = 0

    def __init__(self) -> None:
        self.queued_held: Dict[int, int] = {}


def ledger_hold(ledger, message: Message, size: int) -> None:
    """One more queue entry holds ``message`` (``size`` bytes): counted the first time."""
    held = ledger.queued_held
    key = message_key(message)
    count = held.get(key)
    if count is None:
        held[key] = 1
        ledger.queued_bytes += size
    else:
        held[key] = count + 1


def ledger_release(ledger, message: Message, size: int) -> None:
    """One queue entry fewer holds ``message``: its bytes go with the last one."""
    held = ledger.queued_held
    key = message_key(message)
    count = held.get(key)
    if count is None:
        return
    if count > 1:
        held[key] = count - 1
    else:
        del held[key]
        ledger.queued_bytes -= size


class PacketIdsExhausted(Exception):
    """All 65535 packet identifiers are in flight."""


@attrs.define(eq=False)
class Session:
    client_id: str
    protocol_level: int = 4
    persistent: bool = False
    #: v5 session expiry interval in seconds; ``None`` means never (v3)
    expiry_interval: Optional[int] = None
    #: full filter string -> subscription options
    subscriptions: Dict[str, SubscriptionRecord] = attrs.Factory(dict)
    #: messages waiting to be sent, in delivery order: ``()`` while none has
    #: been queued (an empty deque costs 760 bytes on CPython and most online
    #: sessions never queue; enqueue() makes the deque)
    queue: Deque[OutboundRecord] = ()
    queued_bytes: int = 0
    #: packet id -> in-flight record, in the order they were sent
    inflight: Dict[int, OutboundRecord] = attrs.Factory(dict)
    #: bytes (:func:`~mqttd.messages.message_size`) of the :attr:`inflight`
    #: messages, against ``--max-inflight-bytes``; every change of
    #: :attr:`inflight` keeps it (the broker's delivery, recovery, release)
    inflight_bytes: int = 0
    #: True while queued messages wait because :attr:`inflight_bytes` reached
    #: ``--max-inflight-bytes`` (one counted limit hit per such episode; it
    #: ends when the queue is empty)
    inflight_held: bool = False
    #: inbound QoS 2 packet ids whose PUBREL has not arrived yet (an empty
    #: frozenset until the first; the broker makes the set)
    inbound_qos2: set = frozenset()
    #: seq -> PublishTemplate of queued messages of the *online* connection
    #: (the bytes as received, so a drained message is not encoded again);
    #: cleared when the connection goes, since the next may speak another level
    wire: Dict[int, object] = attrs.Factory(dict)
    will: Optional[Will] = None
    #: the live connection (an IClientConnection) or None while offline
    connection: object = None
    disconnected_at: Optional[float] = None
    #: counters of dropped messages by reason
    dropped: Dict[str, int] = attrs.Factory(dict)
    #: the queued-bytes account shared by the broker's sessions (None: own only)
    ledger: Optional[QueueLedger] = None
    #: which limit the last enqueue() that dropped a message hit
    overflow: str = "queue-full"
    _next_seq: int = 1
    _next_packet_id: int = 1
    #: pending expiry timer (an IDelayedCall) while offline
    expiry_call: object = None
    #: broker clock time since which the queue of this online session is
    #: over its high-water mark (publishers are held back); None otherwise
    congested_since: Optional[float] = None
    #: the authenticated username that created the session (None: anonymous)
    owner: Optional[str] = None
    #: the owner of the offline session this one discarded when it took the
    #: client id from another user (the first such owner along a chain); that
    #: user takes the client id back even while this session is connected
    #: (REVIEW-S10 S5).  None: the client id was free or this owner's own.
    #: Its :func:`mqttd.ratelimit.memory_key` form (a long name: its digest).
    claimed_from: Optional[str] = None
    #: the ClientInfo of the connection (or of the owner while offline), for hooks
    info: object = None
    #: deliveries waiting for a Deferred ``authorize_forward`` answer, in order:
    #: [deferred, message, qos, force, answer-or-None]; ``()`` until the first
    #: (an empty deque costs 760 bytes on CPython, and most sessions never
    #: have one; the broker makes the deque when it appends)
    forward_waiting: Deque[list] = ()
    #: packet ids of in-flight messages still to be resent on this connection
    #: (a resumed session resends within the client's Receive Maximum);
    #: ``()`` when there are none (the broker sets a deque)
    resend: Deque[int] = ()
    #: retained replays in progress: filter -> (cursor over the retained
    #: index, subscription QoS, subscription identifier or None), fed by
    #: Broker.drain as the client reads
    #: (an OrderedDict: Broker._replay takes the first entry and deletes it;
    #: on a plain dict that scans every entry deleted before since the last
    #: resize, so draining the replays of a SUBSCRIBE with 100,000 filters,
    #: queued while the client was not writable, took quadratic time)
    #: ``()`` while there is none (the broker makes the OrderedDict)
    replays: Dict[str, tuple] = ()
    #: broker clock time the session used up its publisher-pause budget
    #: without draining (it holds no one until healthy again); None otherwise
    demoted_since: Optional[float] = None
    #: while demoted: when its queue was last found empty (None: not since
    #: it last passed the high-water mark)
    healthy_since: Optional[float] = None

    # --- ordering and packet ids ------------------------------------------

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq = seq + 1
        return seq

    def restore_seq(self, seq: int) -> None:
        """Make sure sequence numbers continue after ``seq`` (recovery)."""
        if seq >= self._next_seq:
            self._next_seq = seq + 1

    def allocate_packet_id(self) -> int:
        """A packet id not in use by an outbound in-flight message [MQTT-2.2.1-3]."""
        inflight = self.inflight
        if len(inflight) >= 65535:
            raise PacketIdsExhausted(self.client_id)
        pid = self._next_packet_id
        while pid in inflight:
            pid = pid % 65535 + 1
        self._next_packet_id = pid % 65535 + 1
        return pid

    def clear_inflight(self) -> None:
        """Forget every in-flight message (the session is discarded or handed on)."""
        self.inflight.clear()
        self.inflight_bytes = 0
        self.inflight_held = False

    def restore_inflight(self, record: OutboundRecord) -> None:
        """Put a recovered in-flight record back under its packet id (no
        limits: it was in flight before; its bytes count)."""
        self.inflight[record.packet_id] = record
        self.inflight_bytes += message_size(record.message)

    def pop_inflight(self, packet_id: int) -> OutboundRecord:
        """Take the in-flight record of ``packet_id`` out (acknowledged,
        failed or expired); :attr:`inflight_bytes` drops by its size.

        :raises KeyError: nothing is in flight under ``packet_id``.
        """
        record = self.inflight.pop(packet_id)
        self.inflight_bytes -= message_size(record.message)
        return record

    # --- queue ----------------------------------------------------------------

    def enqueue(self, record: OutboundRecord, limits: QueueLimits,
                force: bool = False) -> Optional[OutboundRecord]:
        """Append ``record`` to the queue, applying ``limits``.

        Bytes are the message's held size, topic + payload + properties
        (:func:`~mqttd.messages.message_size`): in this session's
        :attr:`queued_bytes` and ``limits.max_bytes`` every queued message
        counts; in the shared :attr:`ledger` and ``limits.max_total_bytes`` a
        message queued for several sessions counts once (:class:`QueueLedger`),
        so queuing a message another queue already holds never exceeds the
        total.

        Returns the record that was dropped to respect the limits (which may be
        ``record`` itself under DROP_NEW), or ``None``; :attr:`overflow` then
        says which limit (``"queue-full"``: this session's count or bytes;
        ``"queued-bytes-total"``: all sessions' bytes).  Under DROP_OLDEST one
        message of this session's queue makes room -- for the total only if
        no other queue holds it (dropping it would free nothing; the new one is
        dropped instead) -- so the total stays within one message of its cap.
        ``force`` bypasses the limits (retained messages sent on SUBSCRIBE are
        never dropped).
        """
        message = record.message
        size = message_size(message)
        victim = None
        ledger = self.ledger
        if not force:
            over = (len(self.queue) >= limits.max_messages
                    or self.queued_bytes + size > limits.max_bytes)
            if over:
                self.overflow = "queue-full"
            elif (limits.max_total_bytes and ledger is not None
                  and ledger.queued_bytes + size > limits.max_total_bytes
                  and message_key(message) not in ledger.queued_held):
                over = True
                self.overflow = "queued-bytes-total"
            if over:
                if limits.policy == OverflowPolicy.DROP_NEW or not self.queue:
                    return record
                if (self.overflow == "queued-bytes-total"
                        and ledger.queued_held.get(message_key(self.queue[0].message), 0) > 1):
                    return record       # the oldest is shared: dropping it frees nothing
                victim = self.queue.popleft()
                victim_size = message_size(victim.message)
                self.queued_bytes -= victim_size
                if ledger is not None:
                    ledger_release(ledger, victim.message, victim_size)
        queue = self.queue
        if queue.__class__ is tuple:
            queue = self.queue = collections.deque()
        queue.append(record)
        self.queued_bytes += size
        if ledger is not None:
            # ledger_hold, inline: once per message queued
            held = ledger.queued_held
            key = message_key(message)
            count = held.get(key)
            if count is None:
                held[key] = 1
                ledger.queued_bytes += size
            else:
                held[key] = count + 1
        return victim

    def dequeue(self) -> OutboundRecord:
        record = self.queue.popleft()
        message = record.message
        size = message_size(message)
        self.queued_bytes -= size
        ledger = self.ledger
        if ledger is not None:
            # ledger_release, inline: once per queued message sent
            held = ledger.queued_held
            key = message_key(message)
            count = held.get(key)
            if count is not None:
                if count > 1:
                    held[key] = count - 1
                else:
                    del held[key]
                    ledger.queued_bytes -= size
        return record

    def restore_queued(self, record: OutboundRecord) -> None:
        """Append a recovered queued record (no limits: it was accepted before)."""
        size = message_size(record.message)
        if self.queue.__class__ is tuple:
            self.queue = collections.deque()
        self.queue.append(record)
        self.queued_bytes += size
        if self.ledger is not None:
            ledger_hold(self.ledger, record.message, size)

    def remove_queued(self, records) -> list:
        """Take those of ``records`` that are still queued out of the queue
        (kept in order otherwise, byte counts adjusted); returns them.  Costs
        one pass over the queue."""
        wanted = {id(record) for record in records}
        if not wanted or not self.queue:
            return []
        kept: Deque[OutboundRecord] = collections.deque()
        removed = []
        for record in self.queue:
            (removed if id(record) in wanted else kept).append(record)
        if removed:
            self.queue = kept if kept else ()
            ledger = self.ledger
            for record in removed:
                size = message_size(record.message)
                self.queued_bytes -= size
                if ledger is not None:
                    ledger_release(ledger, record.message, size)
        return removed

    def clear_queue(self) -> None:
        """Forget every queued message (the session is discarded)."""
        ledger = self.ledger
        if ledger is not None:
            for record in self.queue:
                ledger_release(ledger, record.message, message_size(record.message))
        self.queue = ()
        self.queued_bytes = 0

    def count_drop(self, reason: str) -> int:
        count = self.dropped.get(reason, 0) + 1
        self.dropped[reason] = count
        return count

    # --- records ----------------------------------------------------------

    def to_record(self) -> SessionRecord:
        return SessionRecord(
            client_id=self.client_id,
            protocol_level=self.protocol_level,
            subscriptions=tuple(self.subscriptions.values()),
            expiry_interval=self.expiry_interval,
            disconnected_at=self.disconnected_at,
            owner=self.owner,
        )

    def outbound_records(self):
        """Everything owed to the client, in-flight first, in delivery order."""
        yield from self.inflight.values()
        yield from self.queue


def delivery_message(message: Message, retain: bool) -> Message:
    """The message as one subscriber receives it (only the retain flag varies)."""
    if message.retain == retain:
        return message
    return attrs.evolve(message, retain=retain)


__all__ = [
    "OutboundRecord", "OutboundStage", "OverflowPolicy", "PacketIdsExhausted",
    "QueueLimits", "Session", "delivery_message",
]
