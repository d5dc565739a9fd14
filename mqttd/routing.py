"""Routing in the broker core: from one published message to its receivers (layer L3).

:class:`Routing` is one part of :class:`mqttd.broker.Broker` (a mixin whose
state lives in ``Broker.__init__``): the publish entry points
(:meth:`~Routing.publish`, :meth:`~Routing.publish_message`,
:meth:`~Routing.publish_volatile`, :meth:`~Routing.dispatch` for messages of
other nodes), the remote router seam (a cluster), the trie match with
overlapping subscriptions merged per client [MQTT-3.3.5-1, MQTT-3.3.4-4],
No Local [MQTT-3.8.3-3], shared-subscription groups, in-process subscribers,
and the ``authorize_forward`` read check at delivery time.  Each receiver's
copy then goes to :meth:`mqttd.delivery.Delivery._deliver`.

This is the hot path (``bench/hotpath.py``): one method lookup per step,
no per-message logging above debug.
"""
from __future__ import annotations

import collections
from typing import Dict, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttd import shared, topics
from mqttd.clients import ClientInfo
from mqttd.codec.errors import MQTTError
from mqttd.hooks import HOOK_FAILED, call_hook
from mqttd.messages import (
    SYS_ORIGIN, Message, forwarded_properties, published_at, with_subscription_ids)
from mqttd.persistence.records import OutboundStage, SubscriptionRecord
from mqttd.session import Session, delivery_message
from mqttd.subscriptions import LocalSubscription

__all__ = ["Routing", "SKIP_SHARES", "ONLY_SHARES", "merge_matches"]

#: the broker's log lines keep their namespace whichever module of the core
#: writes them (operators filter on it)
log = Logger(namespace="mqttd.broker")

#: keys of a publish's ``cache`` set by a remote router (the cluster): the
#: shared-subscription groups (``$share/g/f``) this broker must not serve for
#: the message (another node does), or the only ones it serves (the message
#: came from another node that picked this one for them)
SKIP_SHARES = "\x00skip-shares"
ONLY_SHARES = "\x00only-shares"
#: key of a dispatch's ``cache``: the set the shared groups it served are put in
SERVED_SHARES = "\x00served-shares"
#: key of a publish's ``cache``: the packet id of an inbound QoS 2 PUBLISH (a
#: remote router makes the hand-off to other nodes idempotent per packet id)
INBOUND_PACKET_ID = "\x00inbound-packet-id"

#: ``str`` as a module global: the client-id check in :meth:`Routing._route`
#: (a global lookup, cheaper than the builtin one)
_STR = str


class Routing:
    """Publish, match, merge, pick shared members, check read permission."""

    def _may_forward(self, session: Session, message: Message):
        """True, or what the hook said instead (False, a Deferred, a Failure)."""
        if session.forward_waiting:
            return None  # a pending answer before: keep the delivery order
        return call_hook(self.authorize_forward, self.session_client(session), message)

    def _forward_later(self, session: Session, message: Message, qos: int, allowed,
                       force: bool = False, share=None, passed=None) -> int:
        """Deliver once a Deferred answer allows it, in order; count refusals.

        ``share``: the shared group (its ``$share/g/f`` filter) ``session`` was
        chosen in for ``message``; a refusal then hands the message to another
        member (``passed``: the members refused before this one)."""
        if allowed is None or isinstance(allowed, defer.Deferred):
            if allowed is None:
                allowed = defer.maybeDeferred(self.authorize_forward,
                                              self.session_client(session), message)
            if len(session.forward_waiting) >= self.config.max_queued_messages:
                self.count_dropped(session, "queue-full", message)
                allowed.cancel()
                return 0
            entry = [allowed, message, qos, force, None, share, passed]
            if not session.forward_waiting:
                session.forward_waiting = collections.deque()
            session.forward_waiting.append(entry)
            timer = self.clock.callLater(self.config.hook_timeout, allowed.cancel)

            def answered(result):
                if timer.active():
                    timer.cancel()
                entry[4] = result if result is True else (
                    HOOK_FAILED if isinstance(result, Failure) else False)
                if isinstance(result, Failure):
                    log.failure("authorize_forward failed for {client_id}; not delivering",
                                result, client_id=session.client_id)
                self._forward_answered(session)
            allowed.addBoth(answered)
            return 1
        if isinstance(allowed, Failure):
            log.failure("authorize_forward failed for {client_id}; not delivering",
                        allowed, client_id=session.client_id)
        self._forward_refused(session, message)
        if share is not None:
            return self._share_refused(share, session.client_id, message, passed)
        return 0

    def _forward_answered(self, session: Session) -> None:
        waiting = session.forward_waiting
        while waiting and waiting[0][4] is not None:
            _d, message, qos, force, result, share, passed = waiting.popleft()
            if self.sessions.get(session.client_id) is not session:
                if share is not None and qos:  # owed to the group: another member
                    self._share_refused(share, session.client_id, message, passed)
                continue
            if result is True:
                self._deliver(session, message, qos, force=force, share=share)
            else:
                self._forward_refused(session, message)
                if share is not None:
                    self._share_refused(share, session.client_id, message, passed)

    def _share_refused(self, share: str, client_id: str, message: Message, passed) -> int:
        """Member ``client_id`` of the shared group ``share`` may not read
        ``message`` (a Deferred ``authorize_forward`` said so), or its session
        ended while the answer was pending: the message goes to another member
        that may read it; when none may, it is counted as dropped
        (``shared-not-authorized``).  Returns the receivers (0 or 1)."""
        passed = set(passed) if passed else set()
        passed.add(client_id)
        group = self.shared.group(share)
        receivers = -1
        if group is not None:
            if message.properties.subscription_identifiers:  # the refused member's ids
                message = with_subscription_ids(message, ())
            try:
                receivers = self._share_route(group, message, {}, passed)
            except Exception:
                self._delivery_failed(share, message)
                return 0
        if receivers < 0:
            self.stats.count_drop("shared-not-authorized")
            return 0
        return receivers

    def _forward_refused(self, session: Session, message: Message) -> None:
        self.refused("forward", session.client_id, self.session_peer(session),
                     f"no read permission for {message.topic!r}", topic=message.topic)

    def publish_volatile(self, message: Message) -> int:
        """Publish ``message``; if retained, it becomes its topic's retained message
        in memory only (never written to the store, gone after a restart).

        For ``$SYS`` statistics: new subscribers get the latest value at once
        without one store write per value per interval.  Returns receivers.
        """
        if message.retain:
            stored = self.retained.set(message)
            if stored is not None:  # a retained store elsewhere: not waited for
                stored.addErrback(lambda failure: log.failure(
                    "Storing the retained {topic} failed", failure, topic=message.topic))
            message = attrs.evolve(message, retain=False)
        return self.publish(message, client=None)

    def publish_message(self, topic: str, payload: bytes = b"", qos: int = 0,
                        retain: bool = False, properties=None) -> int:
        """Publish from inside the process (the embedding API); returns the receivers.

        :param topic: a topic name (``str``; no wildcards, no U+0000, at most
            65,535 bytes of UTF-8) [MQTT-4.7.3-1, 4.7.3-2, 4.7.3-3].
        :param payload: ``bytes`` (or ``bytearray``/``memoryview``), or ``str``
            sent as UTF-8.  Empty with ``retain=True`` clears the retained message.
        :param qos: 0, 1 or 2: the most a subscriber gets (each gets the lower
            of this and its granted QoS).
        :param retain: make it the retained message of ``topic``.
        :param properties: :class:`~mqttd.codec.packets.Properties` forwarded to
            MQTT 5 subscribers (user properties, content type, message expiry
            interval counted from now...); per-connection ones are dropped.
        :returns: how many subscribers (sessions and in-process subscribers)
            got it or have it queued.
        :raises TypeError: ``topic`` not a ``str``, ``payload`` neither bytes nor
            ``str``, ``qos`` not an ``int``, ``retain`` not a ``bool``,
            ``properties`` not ``Properties``.
        :raises ValueError: an invalid topic name, or ``qos`` not 0, 1 or 2.

        **Durability when it returns**: the message has been routed — sent to
        online subscribers' transports, queued for offline persistent sessions
        (QoS 1/2; QoS 0 only with ``queue_qos0``) and, if retained, made the
        retained message — and every store write it caused is *buffered* in the
        store, not yet on disk.  ``yield broker.flush()`` waits until it is
        (one group-committed fsync; at once for the memory store).
        """
        if not isinstance(topic, str):
            raise TypeError(f"topic must be a str, not {type(topic).__name__}")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        elif isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        elif not isinstance(payload, bytes):
            raise TypeError(f"payload must be bytes or str, not {type(payload).__name__}")
        if isinstance(qos, bool) or not isinstance(qos, int):
            raise TypeError(f"qos must be an int, not {type(qos).__name__}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        if not isinstance(retain, bool):
            raise TypeError(f"retain must be a bool, not {type(retain).__name__}")
        try:
            topics.validate_topic_name(topic)
        except MQTTError as error:
            raise ValueError(f"invalid topic name {topic!r}: {error.message}") from None
        message = Message(topic, payload, qos, retain)
        if properties is not None:
            from mqttd.codec.packets import Properties
            if not isinstance(properties, Properties):
                raise TypeError("properties must be mqttd.Properties, not "
                                f"{type(properties).__name__}")
            # only what a PUBLISH forwards; the expiry counts from now
            message = published_at(attrs.evolve(
                message, properties=forwarded_properties(properties)), self.clock.seconds())
        return self.publish(message, client=None)

    def publish(self, message: Message, client: Optional[ClientInfo] = None,
                cache: Optional[dict] = None) -> int:
        """Route ``message`` to every matching subscriber; returns how many got it.

        A retained message also replaces (or, with an empty payload, clears)
        the retained message of its topic [MQTT-3.3.1-5, 3.3.1-10, 3.3.1-11].
        Each client gets one copy at the highest QoS of its matching
        subscriptions [MQTT-3.3.5-1], at most the published QoS [MQTT-3.8.4-8].
        ``cache`` holds the PUBLISH bytes encoded (or received) for this
        message, shared by every subscriber that gets the same form.
        """
        self.backpressure = False
        if message.origin != SYS_ORIGIN:  # $SYS traffic is not counted
            stats = self.stats
            qos = message.qos
            stats.messages_in[qos] += 1
            stats.payload_in[qos] += len(message.payload)
        if self._publish_filters:
            for publish_filter in self._publish_filters:
                message = publish_filter(message, client)
                if message is None:
                    return 0
        if message.retain:
            self._retain(message)
        if self._observers["published"]:
            self.emit("published", message=message, client=client)
        router = self.router
        if router is None:
            return self._dispatch(message, cache)
        if cache is None:
            cache = {}
        remote = router.forward(message, cache)
        return self._dispatch(message, cache) + remote

    def reaches_anyone(self, topic: str) -> bool:
        """Whether a message published to ``topic`` now could reach anyone: a
        local subscription (client or in-process) whose filter matches, another
        node (a remote router is installed), a ``published`` observer or a
        publish filter.  False lets a producer of optional messages (the
        per-client ``$SYS`` events) skip building one nobody would get."""
        if self.router is not None or self._publish_filters or self._observers["published"]:
            return True
        return bool(self._trie.match(topic))

    def subscribed_here(self, topic: str) -> bool:
        """Whether a subscription of this broker (a session's, a shared group's or
        an in-process one) matches ``topic``: a remote router asks whether a
        message it forwards was also delivered here."""
        return bool(self._trie.match(topic))

    def add_remote_router(self, router) -> None:
        """Install the remote router (one at most): after a message's local
        checks, ``router.forward(message, cache) -> int`` sends it to the other
        nodes that need it (returns how many), and may put :data:`SKIP_SHARES`
        in ``cache``; ``router.sync() -> Deferred | None`` joins the store's
        sync, so QoS 1/2 acknowledgements wait for the hand-off too.  Messages
        from other nodes come in through :meth:`dispatch`, never forwarded again.
        Optional: ``router.reroute_share(share, message) -> int`` hands a
        message owed to a shared group with no member left here to the
        group's members on other nodes (1 if it did, else 0);
        ``router.resend_qos2(message, packet_id) -> int`` hands a re-sent QoS 2
        PUBLISH whose packet id the session already received to the nodes
        again, idempotently (those that took it keep one copy), and returns
        how many it went to (see :meth:`inbound_qos2_resent`).
        """
        if self.router is not None and router is not None:
            raise ValueError("a remote router is already installed")
        self.router = router

    def dispatch(self, message: Message, only_shares=None, served: Optional[set] = None) -> int:
        """Deliver ``message``, published on another node, to this broker's
        subscribers: matching, QoS, No Local and overlapping subscriptions as
        for :meth:`publish`, but it is neither counted as received, retained,
        filtered, announced nor forwarded again.  ``only_shares``: the shared
        groups (``$share/g/f``) to serve (None: all).  ``served``: a set the
        groups that took the message are added to (a group without an
        available member here is not: the caller may send it to another
        node's members).  Returns the receivers."""
        cache = {}
        if only_shares is not None:
            cache[ONLY_SHARES] = only_shares
        if served is not None:
            cache[SERVED_SHARES] = served
        return self._dispatch(message, cache)

    def dispatch_shares(self, message: Message, shares) -> set:
        """Deliver ``message`` to one member of each of the shared groups
        ``shares`` (``$share/g/f`` filters) here, and to no one else (a
        message another node could not serve to a group and handed on);
        returns the groups that took it."""
        served: set = set()
        for share in shares:
            group = self.shared.group(share)
            if group is None or not topics.matches(group.topic_filter, message.topic):
                continue
            try:
                if self._share_route(group, message, {}, None) != 0:
                    served.add(share)
            except Exception:
                self._delivery_failed(share, message)
                served.add(share)   # counted as a delivery error, not handed on
        return served

    def deliver_among(self, message: Message, client_ids, only_shares=None,
                      served: Optional[set] = None) -> int:
        """Deliver ``message`` as :meth:`dispatch` does -- the same matching,
        merging and options -- but only to the sessions ``client_ids`` and to
        the shared groups named in ``only_shares`` (None: every group); for a
        dead node's messages replayed into the sessions adopted from it.
        ``served``: as for :meth:`dispatch`.  Returns the receivers."""
        matches = self._trie.match(message.topic)
        if not matches:
            return 0
        picked = []
        for match in matches:
            key = match[1]
            cls = key.__class__
            if cls is _STR:
                if key in client_ids:
                    picked.append(match)
            elif cls is not LocalSubscription:       # a shared group
                if only_shares is None or key.share_filter in only_shares:
                    picked.append(match)
        if not picked:
            return 0
        cache = {}
        if served is not None:
            cache[SERVED_SHARES] = served
        receivers = 0
        for key, sub in merge_matches(picked, message.origin).items():
            try:
                receivers += self._route(key, sub, message, cache)
            except Exception:
                self._delivery_failed(key, message)
        return receivers

    def judge(self, message: Message, subscriptions, client_id: str, only_shares=None):
        """The routing judgement for one session known only by its
        subscriptions (``{filter: SubscriptionRecord}``; a session another node
        owns): ``(message, qos)`` as it receives ``message`` -- the highest
        QoS of its matching subscriptions [MQTT-3.3.5-1] at most the
        message's, No Local [MQTT-3.8.3-3], every matching Subscription
        Identifier [MQTT-3.3.4-4], Retain As Published [MQTT-3.3.1-12] -- or
        None when none matches.  A ``$share/g/f`` subscription counts only
        when ``only_shares`` names it (the group's copy went to that node)."""
        topic = message.topic
        matches = []
        for topic_filter, sub in subscriptions.items():
            if topic_filter.startswith(topics.SHARE_PREFIX):
                if only_shares is None or topic_filter not in only_shares:
                    continue
                _name, plain = topics.parse_shared(topic_filter)
            else:
                plain = topic_filter
            if topics.matches(plain, topic):
                matches.append((topic_filter, client_id, sub))
        best = merge_matches(matches, message.origin).get(client_id)
        if best is None:
            return None
        qos = best.qos if best.qos < message.qos else message.qos
        if message.retain and not best.retain_as_published:
            message = delivery_message(message, False)
        sid = best.subscription_identifier
        if sid is not None:
            message = with_subscription_ids(message, sid if sid.__class__ is tuple else (sid,))
        return message, qos

    def _dispatch(self, message: Message, cache: Optional[dict]) -> int:
        """Deliver ``message`` to every matching local subscriber (see publish)."""
        matches = self._trie.match(message.topic)
        if not matches:
            return 0
        if cache is None:
            cache = {}
        if len(matches) == 1:  # the common case: no merging needed
            _filter, key, sub = matches[0]
            try:
                return self._route(key, sub, message, cache)
            except Exception:
                self._delivery_failed(key, message)
                return 0
        receivers = 0
        for key, sub in self._merged_matches(message.topic, matches, message.origin).items():
            # one subscriber's failure never reaches the others
            try:
                receivers += self._route(key, sub, message, cache)
            except Exception:
                self._delivery_failed(key, message)
        return receivers

    def _merged_matches(self, topic: str, matches, origin) -> Dict[object, SubscriptionRecord]:
        """:func:`merge_matches` of ``matches``, the trie's (cached) answer for
        ``topic``, remembered while the trie returns the same list: one client
        with 10,000 overlapping filters that match a topic cost ~15 ms per
        PUBLISH to merge (REVIEW-S10 S8), one dictionary lookup now.  Only
        merges that collapsed overlapping subscriptions are kept (a plain
        fan-out's merge is its own matches); a merge that depended on the
        publisher (a No Local subscription among the matches) is kept for
        that publisher only.  At most :data:`MERGED_CACHE_SIZE` topics of at
        most :data:`mqttd.topics.CACHED_NAME_LIMIT` characters, holding at most
        :data:`MERGED_CACHE_MATCHES` matches in all (the lists it keeps may be
        ones the trie's cache has let go)."""
        entry = self._merged.get(topic)
        if entry is not None and entry[0] is matches and (
                entry[1] is _ANY_ORIGIN or entry[1] == origin):
            return entry[2]
        merged = merge_matches(matches, origin)
        if len(merged) < len(matches) and len(topic) <= topics.CACHED_NAME_LIMIT \
                and len(matches) <= MERGED_CACHE_MATCHES:
            cache = self._merged
            old = cache.pop(topic, None)
            if old is not None:
                self._merged_matches_held -= len(old[0])
            while cache and (len(cache) >= MERGED_CACHE_SIZE or
                             self._merged_matches_held + len(matches) > MERGED_CACHE_MATCHES):
                oldest = next(iter(cache))    # the oldest entry goes first
                self._merged_matches_held -= len(cache.pop(oldest)[0])
            depends = any(getattr(sub, "no_local", False) for _filter, _key, sub in matches)
            cache[topic] = (matches, origin if depends else _ANY_ORIGIN, merged)
            self._merged_matches_held += len(matches)
        return merged

    def _delivery_failed(self, key, message: Message) -> None:
        client_id = getattr(key, "topic_filter", key)
        self.stats.count_drop("delivery-error")
        log.failure("Delivering a message to {topic} for {client_id} failed; "
                    "other subscribers are unaffected", client_id=client_id,
                    topic=message.topic)

    def _route(self, key, sub: SubscriptionRecord, message: Message, cache: dict) -> int:
        """Deliver ``message`` to one subscriber; 1 if it was a receiver.

        ``key`` is a client id, a :class:`LocalSubscription` or a shared
        subscription group; ``sub.subscription_identifier`` may be a tuple of
        identifiers (see :func:`merge_matches`).
        """
        cls = key.__class__
        if cls is not _STR:
            if cls is LocalSubscription:
                self._call_local(key, message)
                return 1
            return self._route_shared(key, message, cache)
        if sub.no_local and key == message.origin:
            return 0  # [MQTT-3.8.3-3]
        session = self.sessions.get(key)
        if session is None:
            return 0
        qos = sub.qos if sub.qos < message.qos else message.qos
        if message.retain and not sub.retain_as_published:
            message = _live(message, cache)  # [MQTT-3.3.1-12]
        sid = sub.subscription_identifier
        if sid is not None or self.authorize_forward is not None:
            # rare: Subscription Identifiers, or a read-permission hook; the plain
            # path pays for these two reads only (bench/hotpath.py)
            return self._route_checked(session, message, qos, sid, cache)
        if qos == 0:  # _deliver's first case inline: the fan-out hot path
            conn = session.connection
            if conn is not None and not session.queue and conn.writable():
                conn.send_publish(message, 0, None, False, cache)
                return 1
        self._deliver(session, message, qos, cache)
        return 1

    def _route_checked(self, session: Session, message: Message, qos: int, sid,
                       cache: dict) -> int:
        """The end of :meth:`_route` for a subscription with identifiers or a
        broker with an ``authorize_forward`` hook (read permission at delivery time)."""
        if sid is not None:
            message = self._with_ids(message, sid, cache)
        forward = self.authorize_forward
        if forward is not None:
            if session.forward_waiting:
                allowed = None  # answers pending before: keep the delivery order
            else:
                try:
                    allowed = forward(session.info or self.session_client(session), message)
                except Exception:
                    allowed = Failure()
            if allowed is not True:
                return self._forward_later(session, message, qos, allowed)
        self._deliver(session, message, qos, cache)
        return 1

    def _with_ids(self, message: Message, ids, cache: dict) -> Message:
        """``message`` carrying the Subscription Identifiers ``ids`` (one int or a
        tuple) [MQTT-3.3.4-3]; one copy per distinct set, so subscribers with
        the same set share the encoded bytes."""
        key = ("ids", id(message), ids)
        tagged = cache.get(key)
        if tagged is None:
            tagged = cache[key] = with_subscription_ids(
                message, ids if ids.__class__ is tuple else (ids,))
        return tagged

    def share_online(self, share_filter: str) -> bool:
        """Whether the shared group ``share_filter`` (``$share/g/f``) has a member
        here whose client is connected now.  A cluster router asks it: a node
        whose members of a group are all offline (persistent sessions, e.g.
        adopted from a dead node) hands the group's messages to a node that may
        have a connected one, as this broker prefers online members over
        offline ones [MQTT 5.0 §4.8.2]."""
        group = self.shared.group(share_filter)
        if group is None:
            return False
        get = self.sessions.get
        for client_id in group.members:
            session = get(client_id)
            if session is not None and session.connection is not None:
                return True
        return False

    def _availability(self, client_id: str) -> int:
        session = self.sessions.get(client_id)
        if session is None:
            return shared.UNAVAILABLE
        if session.connection is not None:
            return shared.ONLINE
        return shared.OFFLINE if session.persistent else shared.UNAVAILABLE

    def _route_shared(self, group, message: Message, cache: dict) -> int:
        """Deliver ``message`` to one member of a shared subscription group
        [MQTT 5.0 §4.8.2]: online members first, then an offline persistent
        one, among those that may read it (:meth:`_share_route`).  When no
        member may read it, the message is not delivered to the group and
        counted as dropped (``shared-not-authorized``)."""
        if cache:   # a cluster node serves only the groups it was picked for
            skip = cache.get(SKIP_SHARES)
            if skip is not None and group.share_filter in skip:
                return 0
            only = cache.get(ONLY_SHARES)
            if only is not None and group.share_filter not in only:
                return 0
        receivers = self._share_route(group, message, cache, None)
        if cache:
            served = cache.get(SERVED_SHARES)
            if served is not None and receivers:
                served.add(group.share_filter)
        if receivers < 0:
            self.stats.count_drop("shared-not-authorized")
            return 0
        return receivers

    def _share_route(self, group, message: Message, cache: dict, passed) -> int:
        """Choose a member of ``group`` for ``message`` and deliver it: 1 if
        delivered (or waiting for a Deferred ``authorize_forward``), 0 if no
        member is available, -1 if every available member may not read it.

        A member that ``authorize_forward`` refuses is passed over
        (``passed``: the members refused so far) and another one chosen --
        also when the refusal comes later from a Deferred
        (:meth:`_share_refused`) -- so a member allowed to subscribe to
        ``$share/g/#`` but not to read every topic cannot make the group lose
        messages (REVIEW-SEC2 N13)."""
        forward = self.authorize_forward
        original = message
        while True:  # at most one round per member: each refusal is passed over
            client_id = self.shared.choose(group, original.topic, original.origin,
                                           self._availability, passed)
            if client_id is None:
                return -1 if passed else 0
            sub = group.members[client_id]
            session = self.sessions[client_id]
            qos = sub.qos if sub.qos < original.qos else original.qos
            message = original
            if message.retain and not sub.retain_as_published:
                message = _live(message, cache)  # [MQTT-3.3.1-12]
            if sub.subscription_identifier is not None:
                message = self._with_ids(message, sub.subscription_identifier, cache)
            if forward is not None:
                allowed = self._may_forward(session, message)
                if allowed is not True:
                    if allowed is None or isinstance(allowed, defer.Deferred):
                        return self._forward_later(session, message, qos, allowed,
                                                   share=group.share_filter, passed=passed)
                    if isinstance(allowed, Failure):
                        log.failure("authorize_forward failed for {client_id}; not delivering",
                                    allowed, client_id=session.client_id)
                    self._forward_refused(session, message)
                    passed = set(passed) if passed else set()
                    passed.add(client_id)
                    continue
            self._deliver(session, message, qos, cache, share=group.share_filter)
            return 1

    def _redispatch(self, session: Session) -> None:
        """A session that ended still owed QoS 1/2 messages it got through shared
        subscriptions: each goes to another member of its group, unless the
        client already has it (a QoS 2 message whose PUBREC arrived)."""
        owed = [out for out in session.outbound_records()
                if out.share is not None and out.qos
                and out.stage != OutboundStage.PUBREL_SENT]
        if not owed:
            return
        session.clear_queue()       # gives its bytes back to --max-queued-bytes-total
        session.clear_inflight()
        for out in owed:
            group = self.shared.group(out.share)
            message = out.message
            if message.properties.subscription_identifiers:
                message = with_subscription_ids(message, ())
            receivers = 0
            try:
                if group is not None:
                    receivers = self._share_route(group, message, {}, None)
                if receivers == 0:
                    # no member left here: the members on other nodes (a cluster)
                    reroute = getattr(self.router, "reroute_share", None)
                    if reroute is not None:
                        receivers = reroute(out.share, message)
            except Exception:
                self._delivery_failed(out.share, message)
                continue
            if receivers <= 0:
                self.count_dropped(session, "shared-not-authorized" if receivers < 0
                                   else "shared-no-member", message)

    def _call_local(self, local: LocalSubscription, message: Message) -> None:
        try:
            local.callback(self.public_form(message))
        except Exception:
            log.failure("In-process subscriber of {filter} failed",
                        filter=local.topic_filter)


#: topics whose merged matches :meth:`Routing._merged_matches` keeps
MERGED_CACHE_SIZE = 10_000
#: (filter, key, value) matches the kept merges hold at most, in all
MERGED_CACHE_MATCHES = 1_000_000
#: the cached merge did not depend on the publisher
_ANY_ORIGIN = object()


def merge_matches(matches, origin) -> Dict[object, SubscriptionRecord]:
    """The routing judgement over one message's matches ``[(filter, key,
    SubscriptionRecord)]``: ``{key: the record it is delivered by}``.

    Overlapping subscriptions merge per subscriber, each subscription's
    options applied first: a No Local subscription of the publisher
    (``origin``) does not take part, another of its subscriptions may
    still deliver [MQTT-3.8.3-3]; then the highest QoS [MQTT-3.3.5-1]
    with every matching Subscription Identifier [MQTT-3.3.4-4] (a
    routing-only record whose ``subscription_identifier`` is that tuple,
    never stored).  Used by the broker's dispatch, by
    :meth:`Routing.deliver_among` and :meth:`Routing.judge`."""
    best: Dict[object, SubscriptionRecord] = {}
    overlapping = None
    for _filter, key, sub in matches:
        if key == origin and sub.no_local:
            continue
        prev = best.get(key)
        if prev is None:
            best[key] = sub
            continue
        if overlapping is None:
            overlapping = set()
        overlapping.add(key)
        if sub.qos > prev.qos:
            best[key] = sub
    if overlapping is not None:
        ids: Dict[object, list] = {}
        for _filter, key, sub in matches:
            if key in overlapping and not (key == origin and sub.no_local):
                sid = sub.subscription_identifier
                if sid is not None:
                    ids.setdefault(key, []).append(sid)
        for key, found in ids.items():
            best[key] = attrs.evolve(best[key], subscription_identifier=tuple(found))
    return best


def _live(message: Message, cache: dict) -> Message:
    """A retained ``message`` as routed live: retain=0 for a subscription without
    Retain As Published [MQTT-3.3.1-12]; one copy per fan-out (``cache``), so
    those subscribers share its encoded bytes."""
    live = cache.get("live")
    if live is None:
        live = cache["live"] = delivery_message(message, False)
    return live
