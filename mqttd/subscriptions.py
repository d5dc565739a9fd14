"""Subscriptions in the broker core: the routing index and who is in it (layer L3).

:class:`Subscriptions` is one part of :class:`mqttd.broker.Broker` (a mixin
whose state lives in ``Broker.__init__``): adding and removing a session's
subscriptions [MQTT-3.8.4-3] in the subscription trie or a shared-subscription
group (``$share/{ShareName}/{filter}``), in-process subscribers
(:meth:`~Subscriptions.subscribe_local`, :class:`LocalSubscription`), the
``route_observer`` told of every index change (a cluster's route table), and
re-checking live subscriptions after the authorizer's rules were reloaded.
"""
from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from mqttd import topics
from mqttd.hooks import call_hook
from mqttd.messages import Message, will_message
from mqttd.persistence import records as R
from mqttd.persistence.records import SubscriptionRecord
from mqttd.session import Session

__all__ = ["Subscriptions", "LocalSubscription", "RECHECKS_PER_TURN"]

#: the broker's log lines keep their namespace whichever module of the core
#: writes them (operators filter on it)
log = Logger(namespace="mqttd.broker")

#: live subscriptions re-checked per reactor turn after an ACL reload
RECHECKS_PER_TURN = 5_000


@attrs.define(eq=False)
class LocalSubscription:
    """An in-process subscriber registered with :meth:`Broker.subscribe_local`."""

    topic_filter: str
    callback: Callable[[Message], None]
    qos: int = 2

    @property
    def client_id(self) -> None:
        return None


class Subscriptions:
    """Subscribe, unsubscribe, in-process subscribers, re-check after a reload."""

    def recheck_subscriptions(self) -> defer.Deferred:
        """Remove live subscriptions the authorizer no longer allows, wills
        whose topic it no longer lets the client publish to, and queued
        messages it no longer lets the session read.

        Called after the authorizer's rules were reloaded.  Uses its optional
        synchronous ``revalidate_subscription(client, topic_filter)``; when it
        has one, each session's will -- held by its connection, or pending
        for its Will Delay Interval -- is asked to ``authorize_publish`` again
        and dropped if refused (counted and logged as the refusal ``will``),
        so a revoked write permission is never used by a will accepted
        before the reload (REVIEW-SEC2 N14).  With an ``authorize_forward``
        hook, every message queued for a session and not sent yet (an
        offline session's, or one waiting behind the client's Receive
        Maximum) is asked again; a refused one is dropped -- counted as the
        drop ``not-authorized``, one ``forward`` refusal line per session --
        so deliveries follow the new rules from the reload on, queued ones
        included (REVIEW-SEC2 N4); a Deferred answer applies when it comes,
        if the message is still queued.  Checks at most
        :data:`RECHECKS_PER_TURN` subscriptions or queued messages per
        reactor turn, so a million of them never hold the reactor; a session
        that is gone by its turn is skipped, a subscription added meanwhile
        is checked by the SUBSCRIBE itself and a message routed meanwhile by
        ``authorize_forward``, under the new rules.

        :returns: a Deferred firing with how many subscriptions were removed
            (already fired when one turn was enough).
        """
        done = defer.Deferred()
        check = getattr(self._authorizer, "revalidate_subscription", None)
        if check is None and self.authorize_forward is None:
            done.callback(0)
            return done
        steps = self._recheck_steps(check)
        removed = [0]

        def turn():
            for _ in range(RECHECKS_PER_TURN):
                try:
                    removed[0] += next(steps)
                except StopIteration:
                    done.callback(removed[0])
                    return
            self.clock.callLater(0, turn)
        turn()
        return done

    def _recheck_steps(self, check):
        """Yield 1 per subscription removed, 0 per subscription kept or
        queued message checked."""
        for client_id in list(self.sessions):
            session = self.sessions.get(client_id)
            if session is None:
                continue
            changed = []
            for topic_filter in list(session.subscriptions) if check is not None else ():
                if self.sessions.get(client_id) is not session:
                    break  # gone meanwhile: nothing left to check
                client = self.session_client(session)
                try:
                    allowed = check(client, topic_filter)
                except Exception:
                    log.failure("revalidate_subscription failed for {client_id}",
                                client_id=session.client_id)
                    allowed = False
                if allowed is not True and self.unsubscribe(session, topic_filter,
                                                            persist=False):
                    changed.append(topic_filter)
                    self.refused("subscription", session.client_id,
                                 self.session_peer(session),
                                 f"{topic_filter!r} no longer allowed after reload; removed",
                                 topic_filter=topic_filter)
                    yield 1
                else:
                    yield 0
            if changed and self.sessions.get(client_id) is session:
                self.save_subscriptions(session, changed)  # once per session
            if check is not None and self.sessions.get(client_id) is session:
                self._recheck_will(session)
                yield 0
            if self.authorize_forward is not None and session.queue:
                yield from self._recheck_queue(session)

    def _recheck_queue(self, session: Session):
        """Ask ``authorize_forward`` again about every message queued for
        ``session``; drop the refused ones (yields 0 per message checked)."""
        forward = self.authorize_forward
        client_id = session.client_id
        refused = []
        for record in list(session.queue):
            if self.sessions.get(client_id) is not session:
                return
            allowed = call_hook(forward, self.session_client(session), record.message)
            if isinstance(allowed, defer.Deferred):
                allowed.addErrback(lambda failure: False).addCallback(
                    lambda result, record=record: result is True or self._drop_queued(
                        session, [record]))
            elif allowed is not True:
                refused.append(record)
            yield 0
        if refused and self.sessions.get(client_id) is session:
            self._drop_queued(session, refused)

    def _drop_queued(self, session: Session, records) -> None:
        """Drop those of ``records`` still queued for ``session``: out of
        the queue and the store, counted ``not-authorized``, one log line."""
        removed = session.remove_queued(records)
        if not removed or self.sessions.get(session.client_id) is not session:
            return
        for record in removed:
            session.wire.pop(record.seq, None)
            if record.qos and session.persistent:
                self._write(R.DeleteOutbound(session.client_id, record.seq))
            self.count_dropped(session, "not-authorized", record.message)
        topics_ = sorted({record.message.topic for record in removed})
        self.refused("forward", session.client_id, self.session_peer(session),
                     f"{len(removed)} queued messages no longer readable after reload "
                     f"(to {', '.join(repr(t) for t in topics_[:3])}"
                     f"{', ...' if len(topics_) > 3 else ''}); dropped",
                     topic=topics_[0])

    def _recheck_will(self, session: Session) -> None:
        """Drop ``session``'s will (live or pending) if ``authorize_publish``
        no longer allows its topic; a Deferred answer is applied when it comes,
        if the will is still the same."""
        check = self.authorize_publish
        if check is None:
            return
        client_id = session.client_id
        will = session.will
        if will is not None:
            message = will_message(will, client_id)
        else:
            record = self.wills.pending(client_id)
            if record is None:
                return
            message = record.message
        client = self.session_client(session)
        pending = self.wills.pending(client_id)

        def answered(allowed):
            if allowed is True:
                return
            if will is not None:
                if session.will is not will:
                    return  # replaced or published meanwhile
                session.will = None
            else:
                if self.wills.pending(client_id) is not pending:
                    return
                self.wills.cancel(client_id)
            self.refused("will", client_id, self.session_peer(session),
                         f"will topic {message.topic!r} no longer allowed after reload; "
                         "the will is dropped", topic=message.topic)

        allowed = call_hook(check, client, message)
        if isinstance(allowed, defer.Deferred):
            allowed.addErrback(lambda failure: False).addCallback(answered)
        else:
            answered(allowed)

    def subscribe(self, session: Session, sub: SubscriptionRecord,
                  persist: bool = True) -> bool:
        """Add or replace a subscription [MQTT-3.8.4-3]; True if it is new.

        A ``$share/{ShareName}/{filter}`` filter joins that shared
        subscription group (:mod:`mqttd.shared`).  A persistent session's
        change is written to the store: one ``PutSubscription`` (O(1), format
        5), or the whole record for a store without ``subscription_deltas``.
        ``persist=False``: the caller changes several subscriptions (one
        SUBSCRIBE packet) and calls :meth:`save_subscriptions` once after them
        with the filters it changed (for a store without deltas one whole
        record per packet, not one per filter).
        """
        is_new = sub.topic_filter not in session.subscriptions
        session.subscriptions[sub.topic_filter] = sub
        self._index(session.client_id, sub)
        if persist and session.persistent:
            self.save_subscriptions(session, (sub.topic_filter,))
        self.stats.subscriptions_total += 1
        return is_new

    def unsubscribe(self, session: Session, topic_filter: str, persist: bool = True) -> bool:
        """Remove a subscription; True if there was one (``persist``: as in
        :meth:`subscribe`)."""
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        self._unindex(session.client_id, topic_filter)
        if persist and session.persistent:
            self.save_subscriptions(session, (topic_filter,))
        return True

    def save_subscriptions(self, session: Session, changed=None) -> None:
        """Store a persistent session's subscription changes, after
        :meth:`subscribe` / :meth:`unsubscribe` calls with ``persist=False``.

        ``changed``: the filters subscribed, replaced or removed (an iterable
        of str; repeats are written once).  With a store taking
        ``subscription_deltas`` each is one ``PutSubscription`` (the filter is
        subscribed now) or ``DeleteSubscription`` (it is not): the bytes
        written do not grow with the session's other subscriptions
        (REVIEW-S9 R15).  Otherwise, or with ``changed=None``, the whole
        record (every subscription) is written once.
        """
        if not session.persistent:
            return
        if changed is None or not getattr(self.store, "subscription_deltas", False):
            self._write(R.PutSession(session.to_record()))
            return
        client_id = session.client_id
        subscriptions = session.subscriptions
        for topic_filter in dict.fromkeys(changed):
            sub = subscriptions.get(topic_filter)
            if sub is None:
                self._write(R.DeleteSubscription(client_id, topic_filter))
            else:
                self._write(R.PutSubscription(client_id, sub))

    def save_session_state(self, session: Session) -> None:
        """Store a persistent session's (dis)connection state -- protocol level,
        expiry interval, time of disconnect, owner -- without its
        subscriptions when the store takes ``subscription_deltas``
        (``PutSessionState``, O(1)), else its whole record.  The session must
        be in the store already (written whole when it became persistent)."""
        if getattr(self.store, "subscription_deltas", False):
            self._write(R.PutSessionState(
                session.client_id, session.protocol_level, session.expiry_interval,
                session.disconnected_at, session.owner))
        else:
            self._write(R.PutSession(session.to_record()))

    def _index(self, client_id: str, sub: SubscriptionRecord) -> None:
        if sub.topic_filter.startswith(topics.SHARE_PREFIX):
            self.shared.add(client_id, sub)
        else:
            self._trie.add(sub.topic_filter, client_id, sub)
        if self.route_observer is not None:
            self.route_observer(sub.topic_filter, client_id, True)

    def _unindex(self, client_id: str, topic_filter: str) -> None:
        if topic_filter.startswith(topics.SHARE_PREFIX):
            self.shared.remove(client_id, topic_filter)
        else:
            self._trie.remove(topic_filter, client_id)
        if self.route_observer is not None:
            self.route_observer(topic_filter, client_id, False)

    def subscribe_local(self, topic_filter: str, callback: Callable[[Message], None],
                        qos: int = 2) -> Callable[[], None]:
        """Subscribe in-process: ``callback(message)`` for every matching message.

        Returns a function that removes the subscription.  Retained messages
        that match are delivered at once.
        """
        topics.validate_topic_filter(topic_filter)
        local = LocalSubscription(topic_filter, callback, qos)
        self._trie.add(topic_filter, local, local)
        if self.route_observer is not None:
            self.route_observer(topic_filter, local, True)
        found = self.retained.match(topic_filter, self.clock.seconds())
        if isinstance(found, defer.Deferred):
            def deliver(messages):
                for message in messages:
                    self._call_local(local, message)
            def failed(failure):
                # the store kept elsewhere (a cluster's, in Redis) did not
                # answer: an outage, not a bug -- one rate-limited WARN, as
                # for a client's replay (REVIEW-S9-CLUSTER C8)
                self.log_limiter.warn(
                    log, ("retained-lookup-local",), "Retained messages of {filter} not "
                    "sent to an in-process subscriber: the retained store failed ({error})",
                    filter=topic_filter, error=failure.getErrorMessage())
            found.addCallbacks(deliver, failed).addErrback(
                lambda failure: log.failure("Retained messages of {filter} not sent to an "
                                            "in-process subscriber", failure,
                                            filter=topic_filter))
        else:
            for message in found:
                self._call_local(local, message)

        def unsubscribe():
            if self._trie.remove(topic_filter, local) and self.route_observer is not None:
                self.route_observer(topic_filter, local, False)
        return unsubscribe
