"""The broker core: :class:`Broker`, the one object every listener of a process shares.

Layer L3.  No transport and no global reactor here: connections implement
:class:`~mqttd.interfaces.IClientConnection`, time comes from an injected
``IReactorTime`` and durable state goes through an injected
:class:`~mqttd.interfaces.IBrokerStore`.

Embedding code can publish and subscribe in-process (:meth:`Broker.publish_message`,
:meth:`Broker.subscribe_local`) and observe what happens through the mosca-named
events (:meth:`Broker.on`): ``clientConnected``, ``clientDisconnecting``,
``clientDisconnected``, ``published``, ``subscribed``, ``unsubscribed``.

:class:`Broker` is composed of one part per responsibility, each in its own
module (mixins sharing the state set up in :meth:`Broker.__init__`):

* :mod:`mqttd.lifecycle` -- sessions from CONNECT to their end (restore,
  claim/install/release, takeover, wills, expiry, discard);
* :mod:`mqttd.subscriptions` -- the subscription index, in-process subscribers;
* :mod:`mqttd.routing` -- a published message to its receivers;
* :mod:`mqttd.delivery` -- one session's outbound queue, acknowledgements, drops;
* :mod:`mqttd.retaining` -- retained messages, their expiry and replay;
* :mod:`mqttd.durability` -- store writes and the barrier acknowledgements wait for;
* :mod:`mqttd.config` -- :class:`BrokerConfig`.

This module keeps what the parts share: construction, events, incidents and
refusals, the seams features plug into (publish filters, reserved client ids,
private user properties), administration, start and stop.  Everything that
was importable from ``mqttd.broker`` still is.
"""
from __future__ import annotations

import collections

import itertools
from typing import Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from mqttd import shared, topics
from mqttd.clients import ClientInfo, ClientSummary, summarize
from mqttd.codec.errors import ReasonCode
from mqttd.config import MAX_PACKET_SIZE, MIN_PACKET_SIZE, BrokerConfig
from mqttd.delivery import MAX_INFLIGHT_UNBOUNDED, Delivery
from mqttd.durability import Durability, PendingWrites
from mqttd.flowcontrol import SlowConsumerGuard, Watermarks
from mqttd.lifecycle import NEVER_EXPIRES, SessionLifecycle
from mqttd.messages import Message, with_subscription_ids, with_user_properties
from mqttd.metrics import BrokerStats
from mqttd.ratelimit import BucketMemory, InboundBuckets, LogRateLimiter, refusal_key
from mqttd.retained import RetainedIndex
from mqttd.retaining import REPLAY_NODES_PER_STEP, REPLAY_STEPS_PER_TURN, Retaining
from mqttd.routing import ONLY_SHARES, SKIP_SHARES, Routing
from mqttd.session import Session
from mqttd.sessionbudget import PersistentSessions
from mqttd.subscriptions import RECHECKS_PER_TURN, LocalSubscription, Subscriptions
from mqttd.wills import WillScheduler

__all__ = [
    "Broker", "BrokerConfig", "ClientInfo", "EVENTS", "LocalSubscription",
    "MAX_PACKET_SIZE", "MIN_PACKET_SIZE", "NEVER_EXPIRES", "ONLY_SHARES",
    "RECHECKS_PER_TURN", "REPLAY_NODES_PER_STEP", "REPLAY_STEPS_PER_TURN",
    "SHUTDOWN_FLUSH_TIMEOUT", "SKIP_SHARES", "with_subscription_ids",
    "with_user_properties",
]

log = Logger(namespace="mqttd.broker")

#: the mosca event names, in the order a client's life produces them
EVENTS = ("clientConnected", "published", "subscribed", "unsubscribed",
          "clientDisconnecting", "clientDisconnected")

#: seconds a stopping broker waits for its clients' transports to write their
#: DISCONNECT (v5: 0x8B Server shutting down) and close
SHUTDOWN_FLUSH_TIMEOUT = 2.0


class Broker(SessionLifecycle, Subscriptions, Routing, Delivery, Retaining, Durability):
    """The broker core.  One instance serves every listener of a process."""

    def __init__(self, clock, store=None, config: BrokerConfig = BrokerConfig(),
                 authenticator=None, authorizer=None, enhanced_authenticator=None):
        from mqttd.persistence.memory import MemoryStore
        self.clock = clock
        self.config = config
        self.store = store if store is not None else MemoryStore()
        #: an IAuthenticator (``authenticate`` hook) or None: everyone is in
        self.authenticator = authenticator
        #: an IEnhancedAuthenticator (MQTT 5 AUTH) or None: 0x8C for any method
        self.enhanced_authenticator = enhanced_authenticator
        self.authorize_publish = self.authorize_subscribe = self.authorize_forward = None
        self.authorizer = authorizer
        self.stats = BrokerStats()
        #: Deferreds of transports_closed() waiting for open_connections to reach 0
        self._closed_waiters: List[defer.Deferred] = []
        #: open client connections (see BrokerConfig.max_connections)
        self.open_connections = 0
        self.sessions: Dict[str, Session] = {}
        #: client id -> the user whose session under it ended last (not kept
        #: with a live or stored session; bounded, oldest first): that user
        #: takes the client id back from another user (mqttd.lifecycle,
        #: session_owner_conflict; REVIEW-S10 S5)
        self.earlier_owners: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        #: retained messages by topic (index, wildcard lookup, expiry)
        self.retained = RetainedIndex(pause_every=REPLAY_NODES_PER_STEP)
        self._retained_expiry_call = None
        #: pending delayed wills [MQTT-3.1.2-8]
        self.wills = WillScheduler(clock, self._publish_will_now, self._write)
        self._trie = topics.SubscriptionTrie()
        #: topic -> (the trie's matches, origin, merged): mqttd.routing._merged_matches
        self._merged: Dict[str, tuple] = {}
        self._merged_matches_held = 0
        #: shared-subscription groups; each is one entry of the trie
        self.shared = shared.SharedSubscriptions(self._trie, config.shared_subscription_strategy)
        self._limits = config.queue_limits()
        #: --max-inflight-bytes per client; 0 (no bound) is "never reached"
        self._max_inflight_bytes = config.max_inflight_bytes or MAX_INFLIGHT_UNBOUNDED
        #: client ids of the persistent sessions, by owner (--max-sessions,
        #: --max-sessions-per-user)
        self._persistent = PersistentSessions()
        self._total_logged = None
        #: which congested subscriber holds publishers back, for how long; an
        #: online subscriber this far behind (messages or bytes) holds them
        self.flow = SlowConsumerGuard(
            clock, config.max_publisher_pause, config.publisher_pause_recovery, self.stats,
            enabled=config.publisher_backpressure,
            watermarks=Watermarks.for_limits(config.max_queued_messages,
                                             config.max_queued_bytes),
            identities=self._pause_identities)
        #: set by publish() when a message went to a congested subscriber
        self.backpressure = False
        #: event -> its observers, a tuple replaced (never changed) on (un)register,
        #: so emit iterates it without a copy
        self._observers: Dict[str, Tuple[Callable, ...]] = {name: () for name in EVENTS}
        #: callables ``filter(message, client) -> Message | None`` (see add_publish_filter)
        self._publish_filters: List[Callable] = []
        #: client id -> (owner, token) of internal sessions (see reserve_client_id)
        self._reserved_ids: Dict[str, tuple] = {}
        #: user property names that are the broker's own bookkeeping (see
        #: add_private_user_properties); empty: nothing is stripped, no cost
        self.private_user_properties: frozenset = frozenset()
        self._private_registrations: List[frozenset] = []
        self._durable = bool(getattr(self.store, "durable", False))
        #: number of store operations written so far (see :meth:`barrier`)
        self.write_count = 0
        #: asynchronous writes of seam implementations (see :meth:`track_write`)
        self.pending_writes = PendingWrites()
        self._turn_sync: Optional[list] = None
        #: store syncs started by barriers (a barrier taken while this count is
        #: unchanged waits for the same sync)
        self.sync_turns = 0
        self._drop_logged: Dict[tuple, float] = {}
        #: rate limit of client-triggered log lines, keyed (client, reason);
        #: features (auth, ACL, bridges) use it for their own lines
        self.log_limiter = LogRateLimiter(clock)
        self.wills.limiter = self.log_limiter
        #: inbound rate buckets left by closed connections (--max-inbound-rate):
        #: a reconnect continues from them rather than from a full bucket
        self.inbound_memory = BucketMemory()
        #: the live connections' inbound buckets, one per client host
        self.inbound_buckets = InboundBuckets(self.inbound_memory)
        #: callables(client_id, reason, text) told of every drop and refusal
        self.incident_listeners: List[Callable[[str, str, str], None]] = []
        #: sessions with a connection attached now
        self.online = 0
        #: the remote router (a cluster's :class:`mqttd.cluster.bus.Router`) or
        #: None: see :meth:`add_remote_router`
        self.router = None
        #: ``observer(topic_filter, key, added)`` told of every entry added to or
        #: removed from the routing index (client subscriptions, shared-group
        #: members with their ``$share/...`` filter, in-process subscriptions)
        self.route_observer: Optional[Callable] = None
        #: None, or why this broker cannot serve clients now (a cluster node
        #: fenced off from Redis): every CONNECT is then refused with v5 0x88
        #: Server unavailable / v3 rc 3 and this text in the log
        self.unavailable: Optional[str] = None
        self._ids = itertools.count(1)
        self.started_at = clock.seconds()
        #: retained-replay steps since the last yield (see REPLAY_STEPS_PER_TURN)
        self._replay_steps = 0
        #: sessions whose replay waits for the next turn, and that turn's call
        self._replay_waiting: Dict[str, Session] = {}
        self._replay_call = None

    # --- authorization hooks ----------------------------------------------------

    @property
    def authorizer(self):
        """The :class:`~mqttd.interfaces.IAuthorizer` in force (or None).

        Setting it caches its ``authorize_publish``, ``authorize_subscribe``
        and ``authorize_forward`` hooks (a missing one is skipped).
        """
        return self._authorizer

    @authorizer.setter
    def authorizer(self, authorizer) -> None:
        self._authorizer = authorizer
        for name in ("authorize_publish", "authorize_subscribe", "authorize_forward"):
            setattr(self, name, getattr(authorizer, name, None))

    def refused(self, what: str, client_id, peer, detail: str, **fields) -> None:
        """Count one refusal or limit hit ``what`` and log it, rate-limited per
        :func:`~mqttd.ratelimit.refusal_key`: ``(client_id, what)``, or
        ``(peer host, what)`` while no client id is known (``client_id`` None).

        :param peer: ``"host:port"`` (as the connection describes it) or None.
        :param fields: extra named fields of the log line.
        """
        self.stats.count_refusal(what)
        self.log_limiter.warn(log, refusal_key(what, client_id, peer),
                              "Refused {what} for {client_id} from {peer}: {detail}",
                              what=what, client_id=client_id or "-", peer=peer,
                              detail=detail, **fields)
        if self.incident_listeners:  # the admin's per-client ring (not rate-limited)
            self.incident(client_id, f"refused-{what}", f"refused {what}: {detail}")

    @staticmethod
    def session_peer(session: Session) -> str:
        """The peer a log line about ``session`` names: its connection's
        ``host:port``, or ``"offline"`` -- never the last connection's
        address (gone) nor ``None``."""
        connection = session.connection
        peer = getattr(connection, "peer", None) if connection is not None else None
        return peer if peer else ("offline" if connection is None else "-")

    def session_client(self, session: Session) -> ClientInfo:
        """The ClientInfo of ``session`` (its owner for an offline session)."""
        info = session.info
        if info is None:
            info = session.info = ClientInfo(session.client_id, session.protocol_level,
                                             session.owner)
        return info

    # --- events -------------------------------------------------------------

    def on(self, event: str, callback: Callable) -> Callable[[], None]:
        """Call ``callback(**fields)`` on ``event``; returns an unregister function.

        Fields: ``client`` (:class:`ClientInfo`, ``None`` for internal
        publishes), ``message`` (published), ``topic`` (subscribed,
        unsubscribed), ``reason`` (clientDisconnecting / clientDisconnected).
        """
        if event not in self._observers:
            raise ValueError(f"unknown event {event!r}; known: {', '.join(EVENTS)}")
        self._observers[event] += (callback,)

        def unregister():
            observers = self._observers[event]
            if callback in observers:
                i = observers.index(callback)
                self._observers[event] = observers[:i] + observers[i + 1:]
        return unregister

    def observe(self, callbacks: Dict[str, Callable]) -> Callable[[], None]:
        """Register several callbacks ``{event: callback}``; returns one function
        that unregisters them all."""
        unregisters = [self.on(event, callback) for event, callback in callbacks.items()]

        def unregister_all():
            for unregister in unregisters:
                unregister()
        return unregister_all

    def emit(self, event: str, **fields) -> None:
        for callback in self._observers[event]:
            try:
                callback(**fields)
            except Exception:
                log.failure("Event observer {observer!r} failed on {event}",
                            observer=callback, event=event)

    # --- inspection -----------------------------------------------------------

    def clients(self, online: Optional[bool] = None) -> List[ClientSummary]:
        """Every session as a :class:`~mqttd.clients.ClientSummary`, sorted by client id.

        ``online=True``: only connected clients; ``False``: only offline
        persistent sessions; ``None`` (default): all.  The summaries are
        copies taken now (O(sessions)); they do not change afterwards.
        """
        return [summarize(session) for _id, session in sorted(self.sessions.items())
                if online is None or (session.connection is not None) == online]

    # --- administration (the admin API; also for embedders) -------------------------

    def disconnect_client(self, client_id: str,
                          reason_code: int = ReasonCode.ADMINISTRATIVE_ACTION) -> bool:
        """Close the connection of ``client_id`` (v5: DISCONNECT with ``reason_code``,
        0x98 Administrative action by default); its will is published and a
        persistent session stays.  False if it is not connected."""
        session = self.sessions.get(client_id)
        if session is None or session.connection is None:
            return False
        conn = session.connection
        log.info("Disconnecting {client_id} (administrative action)", client_id=client_id)
        self.connection_lost(session, conn, publish_will=True, reason="administrative action")
        conn.disconnect(reason_code)
        return True

    def delete_session(self, client_id: str) -> bool:
        """Discard the session of ``client_id`` with its subscriptions and queued
        messages (from the store too), disconnecting it first if it is online.
        False if there is no such session."""
        session = self.sessions.get(client_id)
        if session is None:
            return False
        if session.connection is not None:
            self.disconnect_client(client_id)
        session = self.sessions.get(client_id)
        if session is not None:
            log.info("Deleting session {client_id} (administrative action)",
                     client_id=client_id)
            self._discard_session(session)
        return True

    # --- incidents: drops and refusals, per client ------------------------------

    def on_incident(self, callback: Callable[[str, str, str], None]) -> Callable[[], None]:
        """Call ``callback(client_id, reason, text)`` for every message dropped for a
        client and every refusal of a client's packet (rate limits do not apply:
        the admin's per-client ring of recent drops and refusals is fed here).

        ``reason`` is a stable token (``queue-full``, ``publish-refused``,
        ``connect-refused``, ``session-expired``...); ``text`` one line for
        humans.  Returns an unregister function.  Only the rare paths call it.
        """
        self.incident_listeners.append(callback)

        def unregister():
            if callback in self.incident_listeners:
                self.incident_listeners.remove(callback)
        return unregister

    def incident(self, client_id: Optional[str], reason: str, text: str) -> None:
        """Report one drop or refusal to the :meth:`on_incident` listeners."""
        for callback in list(self.incident_listeners):
            try:
                callback(client_id, reason, text)
            except Exception:
                log.failure("Incident listener {listener!r} failed", listener=callback)

    def add_publish_filter(self, publish_filter: Callable) -> Callable[[], None]:
        """Run ``publish_filter(message, client)`` on every message published.

        It returns the message to route (the same one, or a changed copy, e.g.
        with a user property added) or ``None`` to drop it: the message is then
        neither retained nor delivered, and the publisher is acknowledged as
        usual.  Filters run in registration order before anything else.  Used
        by feature packages (the bridge mesh guard); returns an unregister
        function.
        """
        self._publish_filters.append(publish_filter)

        def unregister():
            if publish_filter in self._publish_filters:
                self._publish_filters.remove(publish_filter)
        return unregister

    # --- internal sessions and private user properties (seams for features) -----------

    def reserve_client_id(self, client_id: str, owner: str) -> Callable[[], None]:
        """Reserve ``client_id`` for an internal session (a bridge's local end).

        No network client may use it, whatever the authentication policy: a
        CONNECT with it is refused with CONNACK 0x85 Client Identifier not
        valid (MQTT 3.1.1: 0x02 Identifier rejected) [MQTT-3.1.3-8, 3.1.3-9],
        counted as the refusal ``internal-client-id`` and logged once
        (rate-limited), so nobody can claim, take over or discard the session
        or read what is queued in it.  ``owner`` names the feature in that
        line (e.g. ``"bridge central"``).  The session itself is opened by the
        feature with :meth:`open_session` as usual.  Returns the release
        function (it releases only this reservation, not a later one of the
        same id).
        """
        token = object()
        self._reserved_ids[client_id] = (owner, token)

        def release():
            held = self._reserved_ids.get(client_id)
            if held is not None and held[1] is token:
                del self._reserved_ids[client_id]
        return release

    def internal_owner(self, client_id: Optional[str]) -> Optional[str]:
        """The owner named by :meth:`reserve_client_id` if ``client_id`` is an
        internal session's, else None."""
        held = self._reserved_ids.get(client_id) if client_id else None
        return held[0] if held is not None else None

    def add_private_user_properties(self, names) -> Callable[[], None]:
        """Declare the user property ``names`` the broker's own bookkeeping
        (the bridge mesh guard's ``mqttd-mid``/``mqttd-path``).

        Messages may carry them inside the broker (routing, queues, the
        store, retained messages) and to bridges -- connections of another
        broker (:attr:`ClientInfo.bridge`) and features' own connections --
        but they are removed from every PUBLISH to any other client and from
        in-process subscribers' messages, so those get the publisher's user
        properties unaltered and in order [MQTT-3.3.2-17, MQTT-3.3.2-18].
        They must be the *last* user properties, each name once (a block the
        registrant appends); only that trailing block is removed, so pairs of
        the same names that a publisher set itself are kept.
        Removed once per message and form, shared by all such subscribers.
        Returns the unregister function.
        """
        entry = frozenset(names)
        self._private_registrations.append(entry)
        self.private_user_properties = frozenset().union(*self._private_registrations)

        def unregister():
            if entry in self._private_registrations:
                self._private_registrations.remove(entry)
                self.private_user_properties = frozenset().union(
                    *self._private_registrations)
        return unregister

    def public_form(self, message: Message, cache: Optional[dict] = None) -> Message:
        """``message`` as a subscriber that is not a bridge may see it: without
        the :attr:`private_user_properties` (the same object when it has
        none).  ``cache`` (a publish's fan-out cache) keeps one copy per
        message, so every subscriber shares it and its encoded bytes."""
        private = self.private_user_properties
        user = message.properties.user_properties
        if not private or not user:
            return message
        if cache is not None:
            key = ("public", id(message))
            found = cache.get(key)
            if found is not None and found[0] is message:
                return found[1]
        # the private names form a block at the end (each name once, as the
        # mesh guard stamps them): only that block goes; a publisher's own
        # pairs of the same names, before it, stay [MQTT-3.3.2-17]
        end = len(user)
        seen = set()
        while end and user[end - 1][0] in private and user[end - 1][0] not in seen:
            seen.add(user[end - 1][0])
            end -= 1
        public = message if end == len(user) else with_user_properties(
            message, tuple(user[:end]))
        if cache is not None:
            cache[key] = (message, public)   # the original kept alive: its id stays unique
        return public

    # --- backpressure on publishers ---------------------------------------------------
    #
    # A subscriber that is online but cannot keep up fills its queue.  Rather
    # than dropping, the broker stops reading from the publishers whose
    # messages go to it until the queue is below the low-water mark again --
    # for at most max_publisher_pause per episode; a subscriber that used up
    # its budget holds no one until it has drained and stayed healthy, and its
    # client id, checked user and address hold no one for the recovery period
    # (mqttd.flowcontrol.SlowConsumerGuard, PauseLedger).  Its queue then
    # overflows by its policy, and the drops are counted.

    # --- start and stop (embedding) ------------------------------------------------------

    def start(self) -> None:
        """Open the store given to the constructor and restore its state, once.

        Idempotent: later calls do nothing, and so does a call after
        :meth:`restore` was called directly.  :class:`~mqttd.protocol.MQTTFactory`
        calls it when it starts listening and ``BrokerService`` when it starts,
        so a broker embedded with ``Broker(reactor, store=...)`` serves its
        persistent sessions and retained messages without more code.

        :raises: whatever the store's ``open()`` raises (e.g. ``StoreError``
            when another process holds its directory, or when the store was
            already opened by someone else: open it yourself and call
            :meth:`restore` instead).
        """
        if self.started:
            return
        try:
            state = self.store.open()
        except Exception as error:
            hint = ("the broker opens the store it is given: pass an unopened store, "
                    "or call broker.restore(store.open()) yourself")
            if _rewrappable(error):
                raise type(error)(f"{error} ({hint})") from error
            raise
        self.restore(state)

    @defer.inlineCallbacks
    def stop(self, timeout: float = SHUTDOWN_FLUSH_TIMEOUT):
        """:meth:`shutdown` (every client disconnected, v5: 0x8B), wait until
        their transports have written it and closed (:meth:`transports_closed`,
        at most ``timeout`` seconds), then close the store.

        Fires once the store is flushed and closed; the broker cannot be
        started again (build a new one on a new store object)."""
        self.shutdown()
        yield self.transports_closed(timeout)
        yield defer.maybeDeferred(self.store.close)

    # --- open transports -----------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Client connections whose transport is open (``MQTTProtocol`` counts
        them; see ``BrokerConfig.max_connections``)."""
        return self._open_connections

    @open_connections.setter
    def open_connections(self, value: int) -> None:
        self._open_connections = value
        if value <= 0 and self._closed_waiters:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def transports_closed(self, timeout: float = SHUTDOWN_FLUSH_TIMEOUT) -> defer.Deferred:
        """A Deferred that fires with None once no client transport is open
        (every one wrote what it had, e.g. the DISCONNECT 0x8B of
        :meth:`shutdown`, and closed), or after ``timeout`` seconds (a client
        that does not read, a connection still before its CONNECT): the
        reactor's shutdown closes those.  Without this wait a reactor that
        stops right after :meth:`shutdown` drops the unwritten DISCONNECTs.
        """
        if self._open_connections <= 0:
            return defer.succeed(None)
        d = defer.Deferred()
        self._closed_waiters.append(d)
        call = self.clock.callLater(timeout, self._stop_waiting, d)
        d.addBoth(lambda result: (call.cancel() if call.active() else None, result)[1])
        return d

    def _stop_waiting(self, d: defer.Deferred) -> None:
        if d in self._closed_waiters:
            self._closed_waiters.remove(d)
            log.info("{count} client connections still open {timeout} s after the "
                     "shutdown; the reactor closes them", count=self._open_connections,
                     timeout=SHUTDOWN_FLUSH_TIMEOUT)
            d.callback(None)

    # --- shutdown ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Disconnect every client (v5: 0x8B Server shutting down); keep sessions."""
        for session in list(self.sessions.values()):
            conn = session.connection
            if conn is not None:
                self.connection_lost(session, conn, publish_will=False, reason="shutdown")
                conn.disconnect(ReasonCode.SERVER_SHUTTING_DOWN)
            if session.expiry_call is not None and session.expiry_call.active():
                session.expiry_call.cancel()
                session.expiry_call = None
        # pending delayed wills stay stored and fire after the next start
        self.wills.stop()
        if self._retained_expiry_call is not None and self._retained_expiry_call.active():
            self._retained_expiry_call.cancel()
        self._retained_expiry_call = None
        if self._replay_call is not None and self._replay_call.active():
            self._replay_call.cancel()
        self._replay_call = None
        self._replay_waiting = {}
        self.flow.release_all()


def _rewrappable(error: Exception) -> bool:
    """Can ``type(error)(message)`` rebuild ``error`` with a longer message?"""
    try:
        type(error)("x")
    except Exception:
        return False
    return True
