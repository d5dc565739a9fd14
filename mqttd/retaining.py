"""Retained messages in the broker core: keeping them and replaying them (layer L3).

:class:`Retaining` is one part of :class:`mqttd.broker.Broker` (a mixin whose
state lives in ``Broker.__init__``): a retained PUBLISH replaces or clears its
topic's retained message [MQTT-3.3.1-5, MQTT-3.3.1-10, MQTT-3.3.1-11] in the
retained store (the in-memory :class:`mqttd.retained.RetainedIndex` by
default, a cluster's :class:`~mqttd.interfaces.IRetainedStore` when one is
installed), one timer expires them [MQTT-3.3.2-5], and a SUBSCRIBE replays
the matching ones with retain=1 [MQTT-3.3.1-6] from a cursor, as the client
takes messages, in bounded steps per reactor turn (:data:`REPLAY_STEPS_PER_TURN`).
"""
from __future__ import annotations

import collections

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from mqttd.interfaces import IRetainedStore
from mqttd.messages import Message, outbound_message, with_subscription_ids
from mqttd.persistence import records as R
from mqttd.persistence.records import SubscriptionRecord
from mqttd.retained import RetainedIndex
from mqttd.session import Session, delivery_message

__all__ = ["Retaining", "REPLAY_STEPS_PER_TURN", "REPLAY_NODES_PER_STEP"]

# the single-node retained store (mqttd.retained is L1 and imports no seam)
classImplements(RetainedIndex, IRetainedStore)

#: the broker's log lines keep their namespace whichever module of the core
#: writes them (operators filter on it)
log = Logger(namespace="mqttd.broker")

#: retained-replay steps (one cursor advance: a message sent, skipped as
#: expired or not readable, or an exhausted cursor) all sessions together take
#: before the replay yields to the reactor for a turn; a ``#`` subscription
#: over a million retained messages the ACL hides, or a thousand filters
#: matching nothing, never holds the reactor longer than this many steps
REPLAY_STEPS_PER_TURN = 10_000
#: retained-index nodes one replay step walks at most without a match (so a
#: step is bounded however wide the index is around a wildcard filter)
REPLAY_NODES_PER_STEP = 16
#: the cursor of a retained replay whose lookup has not answered yet
_LOOKUP_PENDING = object()
#: an exhausted replay cursor
_END = object()


class Retaining:
    """Retain, clear, expire and replay retained messages."""

    def use_retained_store(self, store, hand_over: bool = False) -> None:
        """Keep retained messages in ``store`` (an :class:`~mqttd.interfaces.IRetainedStore`,
        e.g. a cluster's, shared by every node) instead of the in-memory index.

        Call it before clients connect.  The messages retained here so far
        (restored from the local store, ``$SYS`` values) are dropped unless
        ``hand_over``: a cluster's retained messages are authoritative, and a
        node's old local copy must not overwrite newer ones.  With
        ``hand_over`` each goes to ``store.set`` (its writes are tracked like
        any other, :meth:`track_write`).  The local expiry timer stops: a
        store whose ``next_expiry`` answers None expires messages itself.
        """
        old, self.retained = self.retained, store
        call = self._retained_expiry_call
        if call is not None and call.active():
            call.cancel()
        self._retained_expiry_call = None
        if hand_over:
            for message in list(old.values()):
                stored = store.set(message)
                if stored is not None:
                    self.track_write(stored)
        self._schedule_retained_expiry()

    def clear_retained(self, topic: str) -> bool:
        """Remove the retained message of ``topic`` (from the store too); False if none."""
        if topic not in self.retained:
            return False
        self._retain(Message(topic, b"", 0, True))
        self.retained.remove(topic)  # a volatile ($SYS) one is not in the store
        return True

    def send_retained(self, session: Session, sub: SubscriptionRecord) -> None:
        """Replay the retained messages matching ``sub`` with retain=1 [MQTT-3.3.1-6].

        The replay is streamed from a cursor over the retained index as the
        client takes messages (:meth:`drain`), never queued all at once: no
        retained message is dropped, and a client that does not read costs
        one cursor per filter.  A repeated SUBSCRIBE to the same filter
        restarts that filter's cursor.
        """
        cursor = self.retained.cursor(sub.topic_filter, self.clock.seconds())
        if not session.replays:
            session.replays = collections.OrderedDict()
        session.replays.pop(sub.topic_filter, None)
        if isinstance(cursor, defer.Deferred):
            # a retained store elsewhere (a cluster): the replay of this filter
            # waits in its place (later filters wait behind it) for the lookup
            entry = (_LOOKUP_PENDING, sub.qos, sub.subscription_identifier)
            session.replays[sub.topic_filter] = entry
            cursor.addCallbacks(self._replay_found, self._replay_failed,
                                callbackArgs=(session, sub.topic_filter, entry),
                                errbackArgs=(session, sub.topic_filter, entry))
            return
        session.replays[sub.topic_filter] = (cursor, sub.qos, sub.subscription_identifier)
        if session.connection is not None:
            self.drain(session)

    def _replay_found(self, messages, session: Session, topic_filter: str, entry) -> None:
        replays = session.replays
        if replays.get(topic_filter) is not entry:
            return  # re-subscribed (a newer lookup) or the session ended
        replays[topic_filter] = (iter(messages), entry[1], entry[2])
        if session.connection is not None:
            self.drain(session)

    def _replay_failed(self, failure: Failure, session: Session, topic_filter: str,
                       entry) -> None:
        replays = session.replays
        if replays.get(topic_filter) is not entry:
            return
        del replays[topic_filter]
        self.log_limiter.warn(
            log, ("retained-lookup",), "Retained messages of {topic_filter} not sent to "
            "{client_id}: the retained store failed ({error})",
            topic_filter=topic_filter, client_id=session.client_id,
            error=failure.getErrorMessage())
        if session.connection is not None:
            self.drain(session)

    def _replay(self, session: Session, conn) -> None:
        """Feed the retained replay cursors while the client can take messages.

        Called by :meth:`drain` once the queue is empty; leaves at most one
        message in the queue (the one the window had no room for).
        """
        replays = session.replays
        now = self.clock.seconds()
        while replays and not session.queue and conn.writable():
            if self._replay_steps >= REPLAY_STEPS_PER_TURN:
                self._replay_next_turn(session)
                return
            self._replay_steps += 1
            topic_filter = next(iter(replays))
            cursor, max_qos, sid = replays[topic_filter]
            if cursor is _LOOKUP_PENDING:
                break  # an asynchronous lookup: resumed by _replay_found
            message = next(cursor, _END)
            if message is None:
                continue  # REPLAY_NODES_PER_STEP index nodes walked, no match yet
            if message is _END:
                del replays[topic_filter]
                continue
            if message.expires_at is not None:
                # retained for a while: forwarded with the interval left
                message = outbound_message(message, now)  # [MQTT-3.3.2-6]
                if message is None:
                    continue
            qos = message.qos if message.qos < max_qos else max_qos
            message = delivery_message(message, True)
            if sid is not None:  # [MQTT-3.3.4-3]
                message = with_subscription_ids(message, (sid,))
            if self.authorize_forward is not None:
                # read permission at delivery time, retained replay included
                allowed = self._may_forward(session, message)
                if allowed is not True:
                    self._forward_later(session, message, qos, allowed, force=True)
                    continue
            try:
                self._deliver(session, message, qos, force=True)
            except Exception:
                self._delivery_failed(session.client_id, message)

    def _replay_next_turn(self, session: Session) -> None:
        """Continue ``session``'s replay in the next reactor turn (the budget of
        this one is spent); every waiting session is drained then, in order."""
        self._replay_waiting[session.client_id] = session
        if self._replay_call is None:
            self._replay_call = self.clock.callLater(0, self._replay_turn)

    def _replay_turn(self) -> None:
        self._replay_call = None
        self._replay_steps = 0
        waiting, self._replay_waiting = self._replay_waiting, {}
        for client_id, session in waiting.items():
            # the session may have gone (taken over, expired) or gone offline
            if self.sessions.get(client_id) is session and session.connection is not None:
                self.drain(session)

    def _retain(self, message: Message) -> None:
        topic = message.topic
        if not message.payload:
            removed = self.retained.remove(topic)
            if removed.__class__ is defer.Deferred:
                self.track_write(removed)  # the retained store keeps it itself
            elif removed is not None:
                self._write(R.DeleteRetained(topic))
            return
        stored = self.retained.set(message)
        if stored is not None:
            # a retained store that keeps its messages itself (a cluster's):
            # acknowledgements wait for its write instead of the store's
            self.track_write(stored)
            return
        self._write(R.PutRetained(message))
        if message.expires_at is not None:
            self._schedule_retained_expiry()

    def _schedule_retained_expiry(self) -> None:
        """One timer for the earliest retained expiry [MQTT-3.3.2-5]."""
        at = self.retained.next_expiry()
        call = self._retained_expiry_call
        if call is not None and call.active():
            if at is not None and call.getTime() <= at:
                return
            call.cancel()
        self._retained_expiry_call = None
        if at is not None:
            delay = max(0.0, at - self.clock.seconds())
            self._retained_expiry_call = self.clock.callLater(delay, self._expire_retained)

    def _expire_retained(self) -> None:
        self._retained_expiry_call = None
        for topic in self.retained.expire(self.clock.seconds()):
            self._write(R.DeleteRetained(topic))
        self._schedule_retained_expiry()
