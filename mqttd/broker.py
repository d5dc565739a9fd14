"""The broker core: sessions, routing, retained messages, wills, QoS fan-out.

Layer L3.  No transport and no global reactor here: connections implement
:class:`~mqttd.interfaces.IClientConnection`, time comes from an injected
``IReactorTime`` and durable state goes through an injected
:class:`~mqttd.interfaces.IBrokerStore`.

Embedding code can publish and subscribe in-process (:meth:`Broker.publish_message`,
:meth:`Broker.subscribe_local`) and observe what happens through the mosca-named
events (:meth:`Broker.on`): ``clientConnected``, ``clientDisconnecting``,
``clientDisconnected``, ``published``, ``subscribed``, ``unsubscribed``.
"""
from __future__ import annotations

import collections
import errno
import itertools
import uuid
from typing import Callable, Dict, List, Optional

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import classImplements
from twisted.python.failure import Failure

from mqttd import debuglog, shared, topics
from mqttd.ratelimit import BucketMemory, LogRateLimiter, refusal_key
from mqttd.clients import ClientSummary, summarize
from mqttd.codec.errors import MQTTError, ReasonCode
from mqttd.codec.packets import Pubrel
from mqttd.hooks import HOOK_FAILED, call_hook
from mqttd.durability import PendingWrites
from mqttd.flowcontrol import SlowConsumerGuard, Watermarks
from mqttd.messages import (
    SYS_ORIGIN, Message, forwarded_properties, outbound_message, published_at, will_message)
from mqttd.metrics import BrokerStats
from mqttd.persistence import records as R
from mqttd.persistence.records import OutboundRecord, OutboundStage, SubscriptionRecord
from mqttd.interfaces import IRetainedStore
from mqttd.retained import RetainedIndex
from mqttd.session import OverflowPolicy, QueueLimits, Session, delivery_message
from mqttd.wills import WillScheduler

# the single-node retained store (mqttd.retained is L1 and imports no seam)
classImplements(RetainedIndex, IRetainedStore)

#: the cursor of a retained replay whose lookup has not answered yet
_LOOKUP_PENDING = object()

log = Logger(namespace="mqttd.broker")

#: the mosca event names, in the order a client's life produces them
EVENTS = ("clientConnected", "published", "subscribed", "unsubscribed",
          "clientDisconnecting", "clientDisconnected")

#: session expiry value meaning "never" in MQTT 5 [MQTT-3.1.2-...] (0xFFFFFFFF)
NEVER_EXPIRES = 0xFFFFFFFF


def _int_in(minimum: int, maximum: Optional[int] = None, optional: bool = False):
    """attrs validator: an int (not a bool) in [minimum, maximum] (None allowed if optional)."""
    def check(_instance, attribute, value):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name}: expected an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{attribute.name}: must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{attribute.name}: must be at most {maximum}, got {value}")
    return check


def _seconds(minimum: float = 0.0, above: bool = False):
    """attrs validator: a finite number of seconds >= minimum (> minimum if ``above``)."""
    def check(_instance, attribute, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or value != value or value in (float("inf"), float("-inf")):
            raise TypeError(f"{attribute.name}: expected a finite number, got {value!r}")
        if value < minimum or (above and value == minimum):
            word = "greater than" if above else "at least"
            raise ValueError(f"{attribute.name}: must be {word} {minimum:g}, got {value:g}")
    return check


def _is_bool(_instance, attribute, value):
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name}: expected true or false, got {value!r}")


def _topic_level(_instance, attribute, value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name}: must be a non-empty string, got {value!r}")
    bad = set(value) & set("/+#\0")
    if bad:
        raise ValueError(f"{attribute.name}: must be one topic level, without "
                         f"{' '.join(sorted(bad))}: {value!r}")


def _one_of(values):
    def check(_instance, attribute, value):
        if value not in values:
            raise ValueError(f"{attribute.name}: must be one of {', '.join(values)}; "
                             f"got {value!r}")
    return check


#: the largest MQTT packet: 1 + 4 bytes of fixed header + 268,435,455 [MQTT-2.2.3]
MAX_PACKET_SIZE = 268_435_460
#: the smallest packet limit that still admits a CONNECT (v3.1.1, empty client id)
MIN_PACKET_SIZE = 14
#: seconds a stopping broker waits for its clients' transports to write their
#: DISCONNECT (v5: 0x8B Server shutting down) and close
SHUTDOWN_FLUSH_TIMEOUT = 2.0
#: retained-replay steps (one cursor advance: a message sent, skipped as
#: expired or not readable, or an exhausted cursor) all sessions together take
#: before the replay yields to the reactor for a turn; a ``#`` subscription
#: over a million retained messages the ACL hides, or a thousand filters
#: matching nothing, never holds the reactor longer than this many steps
REPLAY_STEPS_PER_TURN = 10_000
#: retained-index nodes one replay step walks at most without a match (so a
#: step is bounded however wide the index is around a wildcard filter)
REPLAY_NODES_PER_STEP = 16
#: live subscriptions re-checked per reactor turn after an ACL reload
RECHECKS_PER_TURN = 5_000
#: an exhausted replay cursor
_END = object()


@attrs.frozen
class BrokerConfig:
    """Limits and switches of the broker core (all have production defaults).

    Every field is validated when the config is built: a wrong type raises
    ``TypeError``, a value out of range ``ValueError``; the message is one
    line starting with the field name (``max_inflight: must be at least 1,
    got 0``).  ``twistd mqttd`` turns it into a usage error (exit status 2).
    """

    #: the <brokerId> of ``$SYS/<brokerId>/...``: one topic level
    broker_id: str = attrs.field(default="mqttd", validator=_topic_level)
    #: per-session queue of messages waiting for an offline/slow client
    max_queued_messages: int = attrs.field(default=100_000, validator=_int_in(1))
    max_queued_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_int_in(1))
    #: payload + topic bytes queued in all sessions together; beyond it the
    #: overflow policy drops (reason "queued-bytes-total"); 0 = no cap
    max_queued_bytes_total: int = attrs.field(default=1024 * 1024 * 1024,
                                              validator=_int_in(0))
    #: persistent sessions held at most; a CONNECT that would create one more
    #: is refused (v5 CONNACK 0x97, v3 0x03); 0 = no cap
    max_sessions: int = attrs.field(default=100_000, validator=_int_in(0))
    overflow_policy: str = attrs.field(default=OverflowPolicy.DROP_OLDEST,
                                       validator=_one_of(OverflowPolicy.ALL))
    #: queue QoS 0 messages for offline persistent sessions (off: they are dropped)
    queue_qos0: bool = attrs.field(default=False, validator=_is_bool)
    #: outbound QoS 1/2 messages in flight per client (v5 Receive Maximum lowers
    #: it); at most 65535, the packet identifier space [MQTT-2.2.1]
    max_inflight: int = attrs.field(default=1000, validator=_int_in(1, 65535))
    #: largest packet accepted or sent, in bytes (fixed header included)
    max_packet_size: int = attrs.field(default=16 * 1024 * 1024,
                                       validator=_int_in(MIN_PACKET_SIZE, MAX_PACKET_SIZE))
    #: largest packet accepted before a CONNECT succeeded (the CONNECT itself),
    #: refused from the fixed header: an unauthenticated socket buffers no more
    max_connect_packet_size: int = attrs.field(
        default=1024 * 1024, validator=_int_in(MIN_PACKET_SIZE, MAX_PACKET_SIZE))
    #: seconds a new connection may take to send CONNECT
    connect_timeout: float = attrs.field(default=10.0, validator=_seconds(0, above=True))
    #: the largest keepalive accepted from clients, seconds; 0 = no limit
    max_keepalive: int = attrs.field(default=0, validator=_int_in(0, 65535))
    #: the longest session expiry granted, seconds; None = unlimited
    max_session_expiry: Optional[int] = attrs.field(
        default=None, validator=_int_in(0, 0xFFFFFFFF, optional=True))
    #: prefix of assigned client identifiers
    assigned_id_prefix: str = attrs.field(default="mqttd-",
                                          validator=attrs.validators.instance_of(str))
    #: stop reading from publishers whose messages go to an online subscriber
    #: that is 1,000 messages (or 1 MiB; at most half its queue limit) behind,
    #: instead of dropping (see drain())
    publisher_backpressure: bool = attrs.field(default=True, validator=_is_bool)
    #: seconds one congestion episode of a subscriber may hold publishers back
    #: (0: never hold)
    max_publisher_pause: float = attrs.field(default=5.0, validator=_seconds(0))
    #: seconds an authentication/authorization hook may take before it refuses
    hook_timeout: float = attrs.field(default=10.0, validator=_seconds(0, above=True))
    #: a CONNECT may take over the session of a client id created by another
    #: username (off: refused with 0x87 / v3 0x05)
    allow_session_takeover_by_other_user: bool = attrs.field(default=False,
                                                             validator=_is_bool)
    #: open client connections, all listeners together; 0 = no limit
    #: (refused with CONNACK 0x97 Quota exceeded / v3 0x03 Server unavailable)
    max_connections: int = attrs.field(default=0, validator=_int_in(0))
    #: subscriptions one session may hold; 0 = no limit (SUBACK 0x97 / v3 0x80)
    max_subscriptions_per_client: int = attrs.field(default=0, validator=_int_in(0))
    #: topic filters one SUBSCRIBE or UNSUBSCRIBE may carry; 0 = no limit.  A
    #: packet over it is refused while it is decoded (v5 DISCONNECT 0x97, v3
    #: close), so no single packet costs more than this many filters' work
    max_topic_filters_per_packet: int = attrs.field(default=1000, validator=_int_in(0))
    #: levels of a topic name or filter; 0 = no limit (v5 DISCONNECT 0x90 for a
    #: PUBLISH, SUBACK 0x8F per filter; v3 close / 0x80)
    max_topic_levels: int = attrs.field(default=0, validator=_int_in(0))
    #: inbound PUBLISH packets per second per client (token bucket, burst of
    #: one second, charged per packet); over it the connection's reads pause
    #: and what it had read waits; a reconnect continues from the bucket the
    #: last connection of that client id or host left; 0 = no limit
    max_inbound_rate: float = attrs.field(default=0.0, validator=_seconds(0))
    #: inbound PUBLISH bytes per second per client (same bucket rules); 0 = no limit
    max_inbound_bytes_rate: float = attrs.field(default=0.0, validator=_seconds(0))
    #: seconds a subscriber that used up max_publisher_pause must stay healthy
    #: (after its queue was empty) before it may hold publishers again
    publisher_pause_recovery: float = attrs.field(default=30.0, validator=_seconds(0))
    #: client ids whose packets are all logged at info level (``--trace-client``)
    trace_clients: frozenset = attrs.field(default=frozenset(), converter=frozenset)
    #: seconds an MQTT 3.x persistent session (clean session 0) may stay
    #: disconnected before it is discarded (mosquitto's
    #: ``persistent_client_expiration``); None = forever.  MQTT 5 sessions
    #: keep their own Session Expiry Interval.
    persistent_client_expiration: Optional[float] = attrs.field(
        default=None, validator=attrs.validators.optional(_seconds(0)))
    #: how a shared subscription group picks the member for a message
    #: (one of :data:`mqttd.shared.STRATEGIES`)
    shared_subscription_strategy: str = attrs.field(default=shared.DEFAULT_STRATEGY,
                                                    validator=_one_of(shared.STRATEGIES))
    #: v5 Topic Alias Maximum announced in CONNACK (0: clients may not use aliases)
    max_topic_alias: int = attrs.field(default=10, validator=_int_in(0, 65535))
    #: inbound QoS 1/2 PUBLISHes a v5 client may have unacknowledged; announced
    #: as the server's Receive Maximum and enforced with 0x93 [MQTT-3.3.4-8]
    max_inflight_incoming: int = attrs.field(default=65535, validator=_int_in(1, 65535))
    #: highest QoS accepted in PUBLISH and wills, granted in SUBSCRIBE (mosquitto's
    #: maximum_qos); announced as Maximum QoS
    max_qos: int = attrs.field(default=2, validator=_int_in(0, 2))
    #: retained messages (and retained wills) accepted (mosquitto's retain_available)
    retain_available: bool = attrs.field(default=True, validator=_is_bool)
    #: prefix of the Response Information sent to v5 clients that request it
    #: (prefix + client id); None: none is sent
    response_information: Optional[str] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str)))

    def queue_limits(self) -> QueueLimits:
        return QueueLimits(self.max_queued_messages, self.max_queued_bytes,
                           self.overflow_policy, self.max_queued_bytes_total)


@attrs.define(eq=False)
class LocalSubscription:
    """An in-process subscriber registered with :meth:`Broker.subscribe_local`."""

    topic_filter: str
    callback: Callable[[Message], None]
    qos: int = 2

    @property
    def client_id(self) -> None:
        return None


@attrs.frozen
class ClientInfo:
    """What events tell about a client."""

    client_id: str
    protocol_level: int
    username: Optional[str] = None
    peer: Optional[str] = None
    clean_start: bool = True
    keepalive: int = 0
    session_present: bool = False
    #: connected with the bridge bit (protocol level | 0x80, mosquitto's
    #: ``try_private``): another broker bridging to this one
    bridge: bool = False


_drop_log_interval = 10.0

#: keys of a publish's ``cache`` set by a remote router (the cluster): the
#: shared-subscription groups (``$share/g/f``) this broker must not serve for
#: the message (another node does), or the only ones it serves (the message
#: came from another node that picked this one for them)
SKIP_SHARES = "\x00skip-shares"
ONLY_SHARES = "\x00only-shares"


def _both(first: defer.Deferred, second: defer.Deferred) -> defer.Deferred:
    """Fires when both fired; fails with the first failure (the other is consumed)."""
    d = defer.Deferred()
    state = [2, None]

    def one(result):
        if isinstance(result, Failure) and state[1] is None:
            state[1] = result
        state[0] -= 1
        if state[0] == 0:
            if state[1] is not None:
                d.errback(state[1])
            else:
                d.callback(None)
        return None
    first.addBoth(one)
    second.addBoth(one)
    return d


class Broker:
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
        #: retained messages by topic (index, wildcard lookup, expiry)
        self.retained = RetainedIndex(pause_every=REPLAY_NODES_PER_STEP)
        self._retained_expiry_call = None
        #: pending delayed wills [MQTT-3.1.2-8]
        self.wills = WillScheduler(clock, self._publish_will_now, self._write)
        self._trie = topics.SubscriptionTrie()
        #: shared-subscription groups; each is one entry of the trie
        self.shared = shared.SharedSubscriptions(self._trie, config.shared_subscription_strategy)
        self._limits = config.queue_limits()
        #: client ids of the persistent sessions (--max-sessions)
        self._persistent: set = set()
        self._total_logged = None
        #: which congested subscriber holds publishers back, for how long; an
        #: online subscriber this far behind (messages or bytes) holds them
        self.flow = SlowConsumerGuard(
            clock, config.max_publisher_pause, config.publisher_pause_recovery, self.stats,
            enabled=config.publisher_backpressure,
            watermarks=Watermarks.for_limits(config.max_queued_messages,
                                             config.max_queued_bytes))
        #: set by publish() when a message went to a congested subscriber
        self.backpressure = False
        self._observers: Dict[str, List[Callable]] = {name: [] for name in EVENTS}
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
        self._drop_logged: Dict[tuple, float] = {}
        #: rate limit of client-triggered log lines, keyed (client, reason);
        #: features (auth, ACL, bridges) use it for their own lines
        self.log_limiter = LogRateLimiter(clock)
        #: inbound rate buckets left by closed connections (--max-inbound-rate):
        #: a reconnect continues from them rather than from a full bucket
        self.inbound_memory = BucketMemory()
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

    def session_client(self, session: Session) -> ClientInfo:
        """The ClientInfo of ``session`` (its owner for an offline session)."""
        info = session.info
        if info is None:
            info = session.info = ClientInfo(session.client_id, session.protocol_level,
                                             session.owner)
        return info

    def recheck_subscriptions(self) -> defer.Deferred:
        """Remove live subscriptions the authorizer no longer allows.

        Called after the authorizer's rules were reloaded.  Uses its optional
        synchronous ``revalidate_subscription(client, topic_filter)``.  Checks
        at most :data:`RECHECKS_PER_TURN` subscriptions per reactor turn, so a
        million live subscriptions never hold the reactor; a session that
        is gone by its turn is skipped, a subscription added meanwhile is
        checked by the SUBSCRIBE itself under the new rules.

        :returns: a Deferred firing with how many subscriptions were removed
            (already fired when one turn was enough).
        """
        done = defer.Deferred()
        check = getattr(self._authorizer, "revalidate_subscription", None)
        if check is None:
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
        """Yield 1 per subscription removed, 0 per subscription kept."""
        for client_id in list(self.sessions):
            session = self.sessions.get(client_id)
            if session is None:
                continue
            changed = False
            for topic_filter in list(session.subscriptions):
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
                    changed = True
                    self.refused("subscription", session.client_id,
                                 getattr(client, "peer", None),
                                 f"{topic_filter!r} no longer allowed after reload; removed",
                                 topic_filter=topic_filter)
                    yield 1
                else:
                    yield 0
            if changed and self.sessions.get(client_id) is session:
                self.save_subscriptions(session)  # once per session, not per filter

    # --- events -------------------------------------------------------------

    def on(self, event: str, callback: Callable) -> Callable[[], None]:
        """Call ``callback(**fields)`` on ``event``; returns an unregister function.

        Fields: ``client`` (:class:`ClientInfo`, ``None`` for internal
        publishes), ``message`` (published), ``topic`` (subscribed,
        unsubscribed), ``reason`` (clientDisconnecting / clientDisconnected).
        """
        if event not in self._observers:
            raise ValueError(f"unknown event {event!r}; known: {', '.join(EVENTS)}")
        observers = self._observers[event]
        observers.append(callback)

        def unregister():
            if callback in observers:
                observers.remove(callback)
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
        for callback in list(self._observers[event]):
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

    # --- durability ---------------------------------------------------------

    def _write(self, op) -> None:
        if self._durable:
            self.store.write(op)
            self.write_count += 1

    def track_write(self, write: defer.Deferred) -> None:
        """Count ``write``, an asynchronous write of a seam implementation that
        keeps its state outside the store (a clustered retained store), as a
        store write: the next :meth:`barrier` also waits for it, and fails if
        it fails (no acknowledgement promises what was not stored)."""
        self.write_count += 1
        self.pending_writes.add(write)

    def barrier(self, since: int) -> Optional[defer.Deferred]:
        """A Deferred for the durability of what was written after ``since``.

        ``since`` is a former :attr:`write_count`.  Acknowledgements that
        promise a message is stored wait for it (group committed by the
        store); None means nothing was written since, so nothing to wait for.
        """
        if self.write_count == since:
            return None
        # one store sync per reactor turn, shared by every packet of the turn:
        # a chunk of 100 PUBLISHes waits for one fsync, not two
        if self._turn_sync is None:
            self._turn_sync = []
            self.clock.callLater(0, self._sync_turn)
        d = defer.Deferred()
        self._turn_sync.append(d)
        return d

    def _sync_turn(self) -> None:
        waiting, self._turn_sync = self._turn_sync, None
        done = self.store.sync()
        router = self.router
        if router is not None:
            # a QoS 1/2 message forwarded to other nodes is acknowledged once
            # Redis took it, too
            pending = router.sync()
            if pending is not None:
                done = _both(done, pending)
        others = self.pending_writes.settled()
        if others is not None:
            # a retained store kept elsewhere (a cluster's) wrote asynchronously
            done = _both(done, others)

        def fire(result):
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
        done.addBoth(fire)

    # --- recovery -------------------------------------------------------------

    #: True once the store's state was restored (see :meth:`start`)
    started = False

    def restore(self, state: R.StoredState) -> None:
        """Rebuild sessions, subscriptions, retained messages and pending wills
        from the store.  Messages that expired while the broker was down are
        dropped (and deleted from the store) [MQTT-3.3.2-5].  Stored messages
        written by older versions go through the same property mapping as
        live ones (a retained will could carry its Will Delay Interval)."""
        self.started = True
        now = self.clock.seconds()
        expired = 0
        for topic, message in list(state.retained.items()):
            if message.expires_at is not None and message.expires_at <= now:
                self._write(R.DeleteRetained(topic))
                expired += 1
                continue
            self.retained.set(_forwardable(message))
        self._schedule_retained_expiry()
        for client_id, stored in state.sessions.items():
            expired += self._restore_session(stored, now)
        # wills first: a session that expired while we were down publishes its will
        self.wills.restore(state.wills.values(), self.sessions)
        for session in list(self.sessions.values()):
            self._schedule_expiry(session, now)
        log.info("Restored {sessions} sessions ({messages} stored messages), "
                 "{retained} retained messages and {wills} delayed wills; "
                 "{expired} expired messages dropped",
                 sessions=len(state.sessions), retained=len(self.retained),
                 messages=sum(len(s.outbound) for s in state.sessions.values()),
                 wills=len(state.wills), expired=expired)

    def _restore_session(self, stored: R.StoredSession, now: float) -> int:
        """Rebuild one stored persistent session, offline; returns how many of
        its messages had expired (dropped and deleted from the store)."""
        record = stored.record
        client_id = record.client_id
        expired = 0
        session = Session(client_id=client_id, protocol_level=record.protocol_level,
                          persistent=True, expiry_interval=record.expiry_interval,
                          owner=getattr(record, "owner", None),  # older records: none
                          ledger=self.stats)
        self._persistent.add(client_id)
        session.disconnected_at = (record.disconnected_at
                                   if record.disconnected_at is not None else now)
        for sub in record.subscriptions:
            session.subscriptions[sub.topic_filter] = sub
            self._index(client_id, sub)
        for seq in sorted(stored.outbound):
            out = stored.outbound[seq]
            session.restore_seq(seq)
            expires_at = out.message.expires_at
            if (expires_at is not None and expires_at <= now
                    and out.stage != OutboundStage.PUBREL_SENT):
                self._write(R.DeleteOutbound(client_id, seq))
                expired += 1
                continue
            forwardable = _forwardable(out.message, keep_subscription_ids=True)
            if forwardable is not out.message:
                out = attrs.evolve(out, message=forwardable)
            if out.stage == OutboundStage.QUEUED or out.packet_id is None:
                session.restore_queued(out)
            else:
                session.inflight[out.packet_id] = out
        if stored.inbound_qos2:
            session.inbound_qos2 = set(stored.inbound_qos2)
        self.sessions[client_id] = session
        self.stats.persistent_sessions = len(self._persistent)
        return expired

    # --- the session seam (a cluster plugs in here) -------------------------------

    #: an object with ``claim(connection, client_id, clean_start, persistent,
    #: will, username)`` and ``abandoned(client_id, connection)``, or None (a
    #: single node: nothing to claim).  See :meth:`claim_session`.
    session_registry = None

    def claim_session(self, connection, client_id: str, clean_start: bool,
                      persistent: bool, will, username: Optional[str]):
        """The step before :meth:`open_session`: make ``client_id`` ours.

        A single node has nothing to claim and answers ``None`` at once (no
        Deferred on the fast path).  With a :attr:`session_registry` (the
        cluster) it returns its answer: ``None`` or a Deferred firing with
        ``None`` once the client id is owned here (the session, if resumed,
        installed with :meth:`install_session`), or with a refusal
        ``(reason_code, why, stats_reason)`` for the CONNACK.  The connection
        waits meanwhile; its later packets queue [MQTT-4.6.0-2].
        """
        registry = self.session_registry
        if registry is None:
            return None
        return registry.claim(connection, client_id, clean_start, persistent, will, username)

    def claim_abandoned(self, client_id: Optional[str], connection) -> None:
        """The connection that claimed ``client_id`` went (or was refused)
        before its session was opened."""
        registry = self.session_registry
        if registry is not None and client_id is not None:
            registry.abandoned(client_id, connection)

    def install_session(self, stored: R.StoredSession, will: Optional[R.WillRecord] = None,
                        ) -> Session:
        """Take over ``stored`` (a persistent session another node owned) as an
        offline session of this broker, replacing any copy held here, with its
        pending delayed will; its expiry timer starts (from its
        ``disconnected_at``).  Writes nothing except dropping expired messages
        [MQTT-3.3.2-5].  Returns the session."""
        client_id = stored.record.client_id
        existing = self.sessions.get(client_id)
        if existing is not None:
            self.release_session(client_id)
        now = self.clock.seconds()
        self._restore_session(stored, now)
        if will is not None:
            self.wills.restore([will], self.sessions)
        session = self.sessions[client_id]
        self._schedule_expiry(session, now)
        return session

    def release_session(self, client_id: str, clean_start: bool = False) -> Optional[Session]:
        """Forget the session of ``client_id`` without touching the store:
        another node owns it now (session takeover across nodes).

        An online client is disconnected with 0x8E Session taken over
        [MQTT-3.1.4-3]; its will is published when the new owner starts a
        clean session or the will has no delay (a resumed session cancels a
        delayed will [MQTT-3.1.3-9]); a pending delayed will likewise.  Nothing
        is written: the new owner's store state wins.  Returns the session
        forgotten, or None.
        """
        session = self.sessions.get(client_id)
        if session is None:
            self.wills.session_resumed_elsewhere(client_id, publish=clean_start)
            return None
        conn = session.connection
        if conn is not None:
            will, session.will = session.will, None
            self.online -= 1
            info = getattr(conn, "info", None)
            self.emit("clientDisconnecting", client=info, reason="takeover")
            session.connection = None
            session.wire.clear()
            session.resend = ()
            if session.congested_since is not None:
                self._teardown_step(client_id, "release of held publishers",
                                    self._decongested, session)
            if will is not None and (clean_start or not session.persistent
                                     or not will.properties.will_delay_interval):
                self._teardown_step(client_id, "will", self.wills.schedule, client_id,
                                    will_message(will, client_id), 0, False)
            conn.disconnect(ReasonCode.SESSION_TAKEN_OVER)
            self.emit("clientDisconnected", client=info, reason="takeover")
        self.wills.session_resumed_elsewhere(client_id, publish=clean_start)
        for topic_filter in list(session.subscriptions):
            self._unindex(client_id, topic_filter)
        session.clear_queue()
        session.inflight.clear()
        session.replays = ()
        if session.expiry_call is not None and session.expiry_call.active():
            session.expiry_call.cancel()
        session.expiry_call = None
        del self.sessions[client_id]
        self._persistent.discard(client_id)
        self.stats.persistent_sessions = len(self._persistent)
        return session

    # --- sessions ---------------------------------------------------------------

    def assign_client_id(self) -> str:
        return self.config.assigned_id_prefix + uuid.uuid4().hex[:16]

    def session_owner_conflict(self, client_id: str, username: Optional[str]) -> Optional[str]:
        """The username owning ``client_id``'s session if it is not ``username``.

        A session remembers the username that created it; another username
        (or an anonymous client) may not take it over or discard it unless
        ``allow_session_takeover_by_other_user``.  A session created
        anonymously (or stored before owners were recorded) has no owner to
        protect: any client may take it, and then owns it.  Returns None when
        allowed.
        """
        existing = self.sessions.get(client_id)
        if (existing is None or existing.owner is None or existing.owner == username
                or self.config.allow_session_takeover_by_other_user):
            return None
        return existing.owner

    def open_session(self, connection, client_id: str, protocol_level: int,
                     clean_start: bool, expiry_interval: Optional[int], will,
                     owner: Optional[str] = None, info: Optional[ClientInfo] = None) -> tuple:
        """Attach ``connection`` to a new or existing session.

        Returns ``(session, session_present)``.  An existing connection with the
        same client id is taken over [MQTT-3.1.4-2]; the session is discarded
        first if ``clean_start`` [MQTT-3.1.2-4].  The session is not yet
        online: call :meth:`session_online` once CONNACK is on the wire.
        ``owner`` is the authenticated username, stored with the session
        (see :meth:`session_owner_conflict`).
        """
        persistent = expiry_interval is None or expiry_interval > 0
        if expiry_interval == NEVER_EXPIRES:
            expiry_interval = None
        existing = self.sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            old = existing.connection
            log.info("Session takeover for {client_id}", client_id=client_id)
            self.connection_lost(existing, old, publish_will=True, reason="takeover")
            old.disconnect(ReasonCode.SESSION_TAKEN_OVER)
            existing = self.sessions.get(client_id)  # a clean one is gone now
        if existing is not None and existing.expiry_call is not None:
            if existing.expiry_call.active():
                existing.expiry_call.cancel()
            existing.expiry_call = None
        session_present = False
        if existing is not None and not clean_start:
            session = existing
            session_present = True
            # resumed in time: its delayed will is not sent [MQTT-3.1.3-9]
            self.wills.session_resumed(client_id)
        else:
            if existing is not None:
                self._discard_session(existing)
            # the old session ended: a will still waiting goes out now [MQTT-3.1.2-8]
            self.wills.session_ended(client_id)
            session = Session(client_id=client_id, ledger=self.stats)
            self.sessions[client_id] = session
        was_persistent = session.persistent
        session.owner = owner
        session.info = info
        session.protocol_level = protocol_level
        session.persistent = persistent
        self._track_persistent(session)
        session.expiry_interval = expiry_interval
        session.will = will
        session.connection = connection
        session.disconnected_at = None
        self.online += 1
        if self.online > self.stats.clients_maximum:
            self.stats.clients_maximum = self.online
        if persistent:
            self._write(R.PutSession(session.to_record()))
            if not was_persistent:
                # a clean session became persistent: store what it owes
                for out in session.outbound_records():
                    self._write(R.PutOutbound(client_id, out))
        elif was_persistent:
            self._write(R.DeleteSession(client_id))
        self.stats.connections_total += 1
        return session, session_present

    def _track_persistent(self, session: Session) -> None:
        if session.persistent:
            self._persistent.add(session.client_id)
        else:
            self._persistent.discard(session.client_id)
        self.stats.persistent_sessions = len(self._persistent)

    def session_refusal(self, client_id: str, persistent: bool) -> Optional[tuple]:
        """Why a CONNECT for ``client_id`` must be refused before its session is
        touched: ``(reason_code, why, stats_reason)``, or None to go on.

        * the store cannot write (disk full, I/O error) and the session would be
          persistent: v5 0x97 Quota exceeded for a full disk, else 0x88 Server
          unavailable (v3: 0x03) -- a CONNACK refusal, never a DISCONNECT before
          CONNACK [MQTT-3.14.0-1];
        * it would create one persistent session more than ``max_sessions``:
          0x97 Quota exceeded (v3: 0x03).  Resuming or replacing an existing
          persistent session is always allowed.
        """
        if not persistent:
            return None
        failure = getattr(self.store, "failure", None)
        if failure is not None:
            full = getattr(failure, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            return ((ReasonCode.QUOTA_EXCEEDED if full else ReasonCode.SERVER_UNAVAILABLE),
                    f"the store cannot write ({failure})", "store-unavailable")
        limit = self.config.max_sessions
        if limit and client_id not in self._persistent and len(self._persistent) >= limit:
            # repair the count if anything removed sessions behind our back
            self._persistent = {cid for cid, s in self.sessions.items() if s.persistent}
            self.stats.persistent_sessions = len(self._persistent)
            if len(self._persistent) >= limit:
                return (ReasonCode.QUOTA_EXCEEDED,
                        f"{len(self._persistent)} persistent sessions, the maximum "
                        f"(--max-sessions)", "max-sessions")
        return None

    def session_online(self, session: Session) -> None:
        """Resend in-flight messages with DUP [MQTT-4.4.0-1], then drain the queue.

        The resends count against the client's Receive Maximum like any
        PUBLISH [MQTT-3.3.4-9]: at most ``send_window`` go out now, the others
        as acknowledgements come back (:meth:`drain`).
        """
        conn = session.connection
        if conn is None:
            return
        session.resend = collections.deque(session.inflight) if session.inflight else ()
        self.drain(session)

    def connection_lost(self, session: Session, connection, publish_will: bool,
                        reason: str) -> None:
        """The network connection of ``session`` is gone (for whatever reason)."""
        if session.connection is not connection:
            return  # already taken over
        self.online -= 1
        info = getattr(connection, "info", None)
        client_id = session.client_id
        # every step runs even if an earlier one fails: never half torn down
        self._teardown_step(client_id, "clientDisconnecting event", self.emit,
                            "clientDisconnecting", client=info, reason=reason)
        will = session.will
        session.will = None
        session.connection = None
        session.wire.clear()
        session.resend = ()
        now = self.clock.seconds()
        session.disconnected_at = now
        if session.congested_since is not None:
            self._teardown_step(client_id, "release of held publishers",
                                self._decongested, session)
        if publish_will and will is not None:
            self._teardown_step(client_id, "will", self._schedule_will, session, will)
        if not session.persistent:
            self._teardown_step(client_id, "session discard", self._discard_session, session)
        else:
            self._teardown_step(client_id, "session store", self._write,
                                R.PutSession(session.to_record()))
            self._teardown_step(client_id, "session expiry", self._schedule_expiry,
                                session, now)
        self._teardown_step(client_id, "clientDisconnected event", self.emit,
                            "clientDisconnected", client=info, reason=reason)

    def _teardown_step(self, client_id: str, step: str, f, *args, **kwargs) -> None:
        try:
            f(*args, **kwargs)
        except Exception:
            log.failure("Teardown of {client_id}: {step} failed; continuing",
                        client_id=client_id, step=step)

    def _schedule_will(self, session: Session, will) -> None:
        """The connection ended without DISCONNECT 0x00: publish its will now or
        after its Will Delay Interval, whichever comes before the session ends
        [MQTT-3.1.2-8] (MQTT 5.0 §3.1.3.2.2)."""
        delay = will.properties.will_delay_interval or 0
        if not session.persistent:
            delay = 0  # the session ends with this connection
        elif session.expiry_interval is not None:
            delay = min(delay, session.expiry_interval)
        durable = session.persistent and delay > 0
        self.wills.schedule(session.client_id, will_message(will, session.client_id),
                            delay, durable=durable)
        if durable:
            # nothing else may sync the store soon: a pending will must
            # survive a crash right after the connection went
            synced = self.barrier(self.write_count - 1)
            if synced is not None:
                synced.addErrback(lambda failure: log.failure(
                    "Storing the delayed will of {client_id} failed", failure,
                    client_id=session.client_id))

    def _publish_will_now(self, client_id: str, message: Message) -> None:
        # one $SYS will is published: a bridging broker's state notification
        if topics_is_sys(message.topic) and not topics.is_bridge_state_topic(message.topic):
            return
        log.info("Publishing will of {client_id} to {topic}",
                 client_id=client_id, topic=message.topic)
        self.publish(published_at(message, self.clock.seconds()), client=None)

    def _schedule_expiry(self, session: Session, now: float) -> None:
        interval = session.expiry_interval
        if interval is None and session.protocol_level < 5:
            # MQTT 3.x persistent sessions: --persistent-client-expiration
            interval = self.config.persistent_client_expiration
        if interval is None:
            return  # never expires
        started = session.disconnected_at if session.disconnected_at is not None else now
        delay = max(0.0, started + interval - now)
        session.expiry_call = self.clock.callLater(delay, self._expire, session)

    def _expire(self, session: Session) -> None:
        session.expiry_call = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            log.info("Session {client_id} expired", client_id=session.client_id)
            queued = len(session.queue) + len(session.inflight)
            self.stats.sessions_expired += 1
            self._discard_session(session)
            if self.incident_listeners:
                self.incident(session.client_id, "session-expired",
                              f"session expired after {session.expiry_interval} s offline; "
                              f"{queued} queued or in-flight messages discarded")

    def _discard_session(self, session: Session) -> None:
        for topic_filter in list(session.subscriptions):
            self._unindex(session.client_id, topic_filter)
        session.subscriptions.clear()
        session.clear_queue()
        if session.persistent:
            self._write(R.DeleteSession(session.client_id))
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self._persistent.discard(session.client_id)
            self.stats.persistent_sessions = len(self._persistent)
        if session.expiry_call is not None and session.expiry_call.active():
            session.expiry_call.cancel()
        session.expiry_call = None
        session.replays = ()
        # the session ended: a will still waiting for its delay goes out now
        self.wills.session_ended(session.client_id)
        if session.inflight or session.queue:
            self._redispatch(session)

    def session_expiry_changed(self, session: Session, interval: int) -> None:
        """A v5 DISCONNECT carried a new Session Expiry Interval [MQTT-3.14.2-2]."""
        was_persistent = session.persistent
        session.persistent = interval > 0
        self._track_persistent(session)
        session.expiry_interval = None if interval == NEVER_EXPIRES else interval
        if was_persistent and not session.persistent:
            self._write(R.DeleteSession(session.client_id))  # ends with this connection
        elif session.persistent:
            self._write(R.PutSession(session.to_record()))

    # --- subscriptions --------------------------------------------------------

    def subscribe(self, session: Session, sub: SubscriptionRecord,
                  persist: bool = True) -> bool:
        """Add or replace a subscription [MQTT-3.8.4-3]; True if it is new.

        A ``$share/{ShareName}/{filter}`` filter joins that shared
        subscription group (:mod:`mqttd.shared`).  ``persist=False``: the
        caller changes several subscriptions (one SUBSCRIBE packet) and calls
        :meth:`save_subscriptions` once after them -- the session's record
        holds all its subscriptions, so writing it per filter would cost the
        square of their number.
        """
        is_new = sub.topic_filter not in session.subscriptions
        session.subscriptions[sub.topic_filter] = sub
        self._index(session.client_id, sub)
        if persist and session.persistent:
            self._write(R.PutSession(session.to_record()))
        self.stats.subscriptions_total += 1
        return is_new

    def unsubscribe(self, session: Session, topic_filter: str, persist: bool = True) -> bool:
        """Remove a subscription; True if there was one (``persist``: as in
        :meth:`subscribe`)."""
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        self._unindex(session.client_id, topic_filter)
        if persist and session.persistent:
            self._write(R.PutSession(session.to_record()))
        return True

    def save_subscriptions(self, session: Session) -> None:
        """Write a persistent session's record (all its subscriptions) once,
        after :meth:`subscribe` / :meth:`unsubscribe` calls with ``persist=False``."""
        if session.persistent:
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

    # --- authorize_forward: read permission at delivery time ----------------------

    def _may_forward(self, session: Session, message: Message):
        """True, or what the hook said instead (False, a Deferred, a Failure)."""
        if session.forward_waiting:
            return None  # a pending answer before: keep the delivery order
        return call_hook(self.authorize_forward, self.session_client(session), message)

    def _forward_later(self, session: Session, message: Message, qos: int, allowed,
                       force: bool = False) -> int:
        """Deliver once a Deferred answer allows it, in order; count refusals."""
        if allowed is None or isinstance(allowed, defer.Deferred):
            if allowed is None:
                allowed = defer.maybeDeferred(self.authorize_forward,
                                              self.session_client(session), message)
            if len(session.forward_waiting) >= self.config.max_queued_messages:
                self.count_dropped(session, "queue-full", message)
                allowed.cancel()
                return 0
            entry = [allowed, message, qos, force, None]
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
        return 0

    def _forward_answered(self, session: Session) -> None:
        waiting = session.forward_waiting
        while waiting and waiting[0][4] is not None:
            _d, message, qos, force, result = waiting.popleft()
            if self.sessions.get(session.client_id) is not session:
                continue
            if result is True:
                self._deliver(session, message, qos, force=force)
            else:
                self._forward_refused(session, message)

    def _forward_refused(self, session: Session, message: Message) -> None:
        self.refused("forward", session.client_id, None,
                     f"no read permission for {message.topic!r}", topic=message.topic)

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
            found.addCallback(deliver).addErrback(
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

    # --- publishing -------------------------------------------------------------

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

    def flush(self) -> defer.Deferred:
        """A Deferred firing once everything written to the store so far is on
        disk (after :meth:`publish_message`, for example); at once for the
        memory store.  Fails if the store failed (the write is then not durable)."""
        return self.store.sync()

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

    def add_remote_router(self, router) -> None:
        """Install the remote router (one at most): after a message's local
        checks, ``router.forward(message, cache) -> int`` sends it to the other
        nodes that need it (returns how many), and may put :data:`SKIP_SHARES`
        in ``cache``; ``router.sync() -> Deferred | None`` joins the store's
        sync, so QoS 1/2 acknowledgements wait for the hand-off too.  Messages
        from other nodes come in through :meth:`dispatch`, never forwarded again.
        """
        if self.router is not None and router is not None:
            raise ValueError("a remote router is already installed")
        self.router = router

    def dispatch(self, message: Message, only_shares=None) -> int:
        """Deliver ``message``, published on another node, to this broker's
        subscribers: matching, QoS, No Local and overlapping subscriptions as
        for :meth:`publish`, but it is neither counted as received, retained,
        filtered, announced nor forwarded again.  ``only_shares``: the shared
        groups (``$share/g/f``) to serve (None: all).  Returns the receivers."""
        cache = {}
        if only_shares is not None:
            cache[ONLY_SHARES] = only_shares
        return self._dispatch(message, cache)

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
        # merge overlapping subscriptions per client, each subscription's
        # options applied first: a No Local subscription of the publisher does
        # not take part, another of its subscriptions may still deliver
        # [MQTT-3.8.3-3]; then the highest QoS [MQTT-3.3.5-1] with every
        # matching subscription identifier [MQTT-3.3.4-4]
        origin = message.origin
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
            self._merge_identifiers(matches, origin, overlapping, best)
        receivers = 0
        for key, sub in best.items():
            # one subscriber's failure never reaches the others
            try:
                receivers += self._route(key, sub, message, cache)
            except Exception:
                self._delivery_failed(key, message)
        return receivers

    @staticmethod
    def _merge_identifiers(matches, origin, overlapping: set, best: dict) -> None:
        """A client with several matching subscriptions gets one copy carrying the
        identifiers of all of them [MQTT-3.3.4-4]: its entry in ``best`` becomes a
        routing-only record whose ``subscription_identifier`` is that tuple (never
        stored).  Rare, so the common path of :meth:`publish` never looks at ids."""
        ids: Dict[object, list] = {}
        for _filter, key, sub in matches:
            if key in overlapping and not (key == origin and sub.no_local):
                sid = sub.subscription_identifier
                if sid is not None:
                    ids.setdefault(key, []).append(sid)
        for key, found in ids.items():
            best[key] = attrs.evolve(best[key], subscription_identifier=tuple(found))

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
        identifiers (see :meth:`_merge_identifiers`).
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
            live = cache.get("live")
            if live is None:
                live = cache["live"] = delivery_message(message, False)
            message = live
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

    # --- shared subscriptions -----------------------------------------------------

    def _availability(self, client_id: str) -> int:
        session = self.sessions.get(client_id)
        if session is None:
            return shared.UNAVAILABLE
        if session.connection is not None:
            return shared.ONLINE
        return shared.OFFLINE if session.persistent else shared.UNAVAILABLE

    def _route_shared(self, group, message: Message, cache: dict) -> int:
        """Deliver ``message`` to one member of a shared subscription group
        [MQTT 5.0 §4.8.2]: online members first, then an offline persistent one."""
        if cache:   # a cluster node serves only the groups it was picked for
            skip = cache.get(SKIP_SHARES)
            if skip is not None and group.share_filter in skip:
                return 0
            only = cache.get(ONLY_SHARES)
            if only is not None and group.share_filter not in only:
                return 0
        client_id = self.shared.choose(group, message.topic, message.origin,
                                       self._availability)
        if client_id is None:
            return 0
        sub = group.members[client_id]
        session = self.sessions[client_id]
        qos = sub.qos if sub.qos < message.qos else message.qos
        if message.retain and not sub.retain_as_published:
            live = cache.get("live")
            if live is None:
                live = cache["live"] = delivery_message(message, False)
            message = live
        if sub.subscription_identifier is not None:
            message = self._with_ids(message, sub.subscription_identifier, cache)
        if self.authorize_forward is not None:
            allowed = self._may_forward(session, message)
            if allowed is not True:
                return self._forward_later(session, message, qos, allowed)
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
        session.inflight.clear()
        for out in owed:
            group = self.shared.group(out.share)
            message = out.message
            if message.properties.subscription_identifiers:
                message = with_subscription_ids(message, ())
            try:
                if group is not None and self._route_shared(group, message, {}):
                    continue
            except Exception:
                self._delivery_failed(out.share, message)
                continue
            self.count_dropped(session, "shared-no-member", message)

    def _call_local(self, local: LocalSubscription, message: Message) -> None:
        try:
            local.callback(self.public_form(message))
        except Exception:
            log.failure("In-process subscriber of {filter} failed",
                        filter=local.topic_filter)

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

    def _deliver(self, session: Session, message: Message, qos: int,
                 cache: Optional[dict] = None, force: bool = False,
                 share: Optional[str] = None) -> None:
        conn = session.connection
        if conn is not None:
            if not session.queue and conn.writable():
                if qos == 0:
                    conn.send_publish(message, 0, None, False, cache)
                    return
                if len(session.inflight) < conn.send_window:
                    pid = session.allocate_packet_id()
                    record = OutboundRecord(session.next_seq(), message, qos, pid,
                                            OutboundStage.PUBLISH_SENT, share)
                    session.inflight[pid] = record
                    if session.persistent:
                        self._write(R.PutOutbound(session.client_id, record))
                    conn.send_publish(message, qos, pid, False, cache)
                    return
        elif qos == 0 and not (force or (session.persistent and self.config.queue_qos0)):
            return  # QoS 0 is not kept for offline clients unless configured
        record = OutboundRecord(session.next_seq(), message, qos, share=share)
        victim = session.enqueue(record, self._limits, force)
        persistent = session.persistent
        if victim is not record:
            if qos and persistent:
                self._write(R.PutOutbound(session.client_id, record))
            if conn is not None and cache:
                template = conn.cached_template(message, qos, cache)
                if template is not None:
                    session.wire[record.seq] = template
        if victim is not None:
            reason = session.overflow
            if reason == "queued-bytes-total":
                self._total_cap_hit()
            self.count_dropped(session, reason, victim.message)
            if victim is not record:
                session.wire.pop(victim.seq, None)
                if victim.qos and persistent:
                    self._write(R.DeleteOutbound(session.client_id, victim.seq))
        if conn is not None:
            if self.flow.routed(session):
                self.backpressure = True
            self.drain(session)

    # --- backpressure on publishers ---------------------------------------------------
    #
    # A subscriber that is online but cannot keep up fills its queue.  Rather
    # than dropping, the broker stops reading from the publishers whose
    # messages go to it until the queue is below the low-water mark again --
    # for at most max_publisher_pause per episode; a subscriber that used up
    # its budget holds no one until it has drained and stayed healthy
    # (mqttd.flowcontrol.SlowConsumerGuard).  Its queue then overflows by its
    # policy, and the drops are counted.

    def _decongested(self, session: Session) -> None:
        self.flow.decongested(session)

    def hold_publisher(self, connection) -> None:
        """Remember a publisher that paused reading because of congestion."""
        self.flow.hold(connection)

    def drain(self, session: Session) -> None:
        """Send what the client is owed while it can take it: in-flight resends
        first, then the queue, then the retained replay.

        Queued messages that expired are dropped, the others go out with their
        Message Expiry Interval lowered by the time they waited
        [MQTT-3.3.2-5], [MQTT-3.3.2-6].
        """
        conn = session.connection
        if conn is None:
            return
        if session.resend:
            self._resend(session, conn)
        queue = session.queue
        inflight = session.inflight
        window = conn.send_window
        persistent = session.persistent
        wire = session.wire
        while queue and conn.writable():
            head = queue[0]
            message = head.message
            template = None
            if message.expires_at is not None:
                message = outbound_message(message, self.clock.seconds())
                if message is None:
                    session.dequeue()
                    wire.pop(head.seq, None)
                    if head.qos and persistent:
                        self._write(R.DeleteOutbound(session.client_id, head.seq))
                    self.count_dropped(session, "expired", head.message)
                    continue
                if message is not head.message:
                    wire.pop(head.seq, None)  # the bytes carry the old interval
            if head.qos == 0:
                session.dequeue()
                if wire:
                    template = wire.pop(head.seq, None)
                conn.send_publish(message, 0, None, False, template=template)
                continue
            if len(inflight) >= window:
                break
            session.dequeue()
            pid = session.allocate_packet_id()
            record = OutboundRecord(head.seq, head.message, head.qos, pid,
                                    OutboundStage.PUBLISH_SENT, head.share)
            inflight[pid] = record
            if persistent:
                self._write(R.UpdateOutbound(session.client_id, head.seq, pid,
                                             OutboundStage.PUBLISH_SENT))
            if wire:
                template = wire.pop(head.seq, None)
            conn.send_publish(message, head.qos, pid, False, template=template)
        if session.congested_since is not None or session.demoted_since is not None:
            self.flow.drained(session)
        if session.replays and not queue:
            self._replay(session, conn)

    def _resend(self, session: Session, conn) -> None:
        """Resend in-flight messages of a resumed session with DUP [MQTT-4.4.0-1],
        their original packet ids, and no more than the client's Receive
        Maximum unacknowledged at once [MQTT-3.3.4-9].

        An expired PUBLISH is dropped rather than resent (as mosquitto does);
        a PUBREL is always resent (the message was delivered).
        """
        resend = session.resend
        inflight = session.inflight
        window = conn.send_window
        now = self.clock.seconds()
        while resend and conn.writable() and len(inflight) - len(resend) < window:
            pid = resend.popleft()
            out = inflight.get(pid)
            if out is None:
                continue
            if out.stage == OutboundStage.PUBREL_SENT:
                conn.send(Pubrel(pid))
                continue
            message = outbound_message(out.message, now)
            if message is None:
                del inflight[pid]
                if session.persistent:
                    self._write(R.DeleteOutbound(session.client_id, out.seq))
                self.count_dropped(session, "expired", out.message)
                continue
            conn.send_publish(message, out.qos, pid, True)

    def _total_cap_hit(self) -> None:
        now = self.clock.seconds()
        if self._total_logged is None or now - self._total_logged >= 60.0:
            self._total_logged = now
            log.warn("All sessions' queues together hold {queued} bytes, the maximum "
                     "(--max-queued-bytes-total {limit}); messages beyond it are dropped "
                     "by the overflow policy ({policy}) and counted as queued-bytes-total",
                     queued=self.stats.queued_bytes, policy=self.config.overflow_policy,
                     limit=self.config.max_queued_bytes_total)

    def count_dropped(self, session: Session, reason: str, message: Message) -> None:
        """Count, and log (rate-limited), one message not delivered to ``session``."""
        count = session.count_drop(reason)
        self.stats.count_drop(reason)
        if self.incident_listeners:
            self.incident(session.client_id, reason,
                          f"dropped a QoS {message.qos} message to {message.topic!r}: {reason}")
        if debuglog.enabled:
            log.debug("Dropped a message to {topic} for {client_id}: {reason}",
                      client_id=session.client_id, reason=reason, topic=message.topic)
        key = (session.client_id, reason)
        now = self.clock.seconds()
        last = self._drop_logged.get(key)
        if last is None or now - last >= _drop_log_interval:
            if len(self._drop_logged) > 10000:
                self._drop_logged.clear()
            self._drop_logged[key] = now
            log.warn("Dropping messages for {client_id}: {reason} "
                     "({count} dropped for this reason so far)",
                     client_id=session.client_id, reason=reason, count=count)

    # --- acknowledgements from subscribers ----------------------------------------

    def puback(self, session: Session, packet_id: int) -> bool:
        record = session.inflight.get(packet_id)
        if record is None or record.qos != 1:
            return False
        del session.inflight[packet_id]
        self.stats.messages_acked += 1
        if session.persistent:
            self._write(R.DeleteOutbound(session.client_id, record.seq))
        if session.queue or session.resend or session.replays:
            self.drain(session)
        return True

    def pubrec(self, session: Session, packet_id: int, failed: bool = False) -> bool:
        """PUBREC for an outbound QoS 2 message; the caller sends PUBREL if True."""
        record = session.inflight.get(packet_id)
        if record is None or record.qos != 2:
            return False
        if failed:  # v5 PUBREC with a reason code >= 0x80 ends the flow [MQTT-4.3.3-...]
            del session.inflight[packet_id]
            if session.persistent:
                self._write(R.DeleteOutbound(session.client_id, record.seq))
            self.drain(session)
            return False
        if record.stage != OutboundStage.PUBREL_SENT:
            session.inflight[packet_id] = OutboundRecord(
                record.seq, record.message, 2, packet_id, OutboundStage.PUBREL_SENT,
                record.share)
            if session.persistent:
                self._write(R.UpdateOutbound(session.client_id, record.seq, packet_id,
                                             OutboundStage.PUBREL_SENT))
        return True

    def pubcomp(self, session: Session, packet_id: int) -> bool:
        record = session.inflight.get(packet_id)
        if record is None or record.stage != OutboundStage.PUBREL_SENT:
            return False
        del session.inflight[packet_id]
        self.stats.messages_acked += 1
        if session.persistent:
            self._write(R.DeleteOutbound(session.client_id, record.seq))
        self.drain(session)
        return True

    # --- inbound QoS 2 --------------------------------------------------------------

    def inbound_qos2_seen(self, session: Session, packet_id: int) -> bool:
        return packet_id in session.inbound_qos2

    def inbound_qos2_add(self, session: Session, packet_id: int) -> None:
        if session.inbound_qos2.__class__ is frozenset:
            session.inbound_qos2 = set()
        session.inbound_qos2.add(packet_id)
        if session.persistent:
            self._write(R.AddInboundQos2(session.client_id, packet_id))

    def inbound_qos2_release(self, session: Session, packet_id: int) -> bool:
        if packet_id not in session.inbound_qos2:
            return False
        session.inbound_qos2.discard(packet_id)
        if session.persistent:
            self._write(R.DeleteInboundQos2(session.client_id, packet_id))
        return True

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


def _forwardable(message: Message, keep_subscription_ids: bool = False) -> Message:
    """``message`` with only the properties a PUBLISH forwards (see mqttd.messages).

    ``keep_subscription_ids``: a message owed to one session carries that
    subscriber's Subscription Identifiers, which the broker itself set.
    """
    props = forwarded_properties(message.properties)
    if props is message.properties:
        return message
    ids = message.properties.subscription_identifiers
    if keep_subscription_ids and ids:
        props = attrs.evolve(props, subscription_identifiers=ids)
    return attrs.evolve(message, properties=props)


#: ``str`` as a module global: the client-id check in :meth:`Broker._route`
#: (a global lookup, cheaper than the builtin one)
_STR = str


def with_user_properties(message: Message, user: tuple) -> Message:
    """A copy of ``message`` whose user properties are ``user`` (name, value pairs)."""
    return attrs.evolve(message, properties=attrs.evolve(
        message.properties, user_properties=tuple(user)))


def with_subscription_ids(message: Message, ids: tuple) -> Message:
    """A copy of ``message`` whose Subscription Identifiers are ``ids``
    (``()``: none), for one subscriber [MQTT-3.3.4-3, MQTT-3.3.4-5]."""
    return attrs.evolve(message, properties=attrs.evolve(
        message.properties, subscription_identifiers=tuple(ids)))


def _rewrappable(error: Exception) -> bool:
    """Can ``type(error)(message)`` rebuild ``error`` with a longer message?"""
    try:
        type(error)("x")
    except Exception:
        return False
    return True


def topics_is_sys(topic: str) -> bool:
    return topic.startswith("$SYS")
