"""The seams between the broker core and what plugs into it (layer L2)."""
from __future__ import annotations

from zope.interface import Attribute, Interface


class IClientConnection(Interface):
    """What the broker core needs of one connected client.

    Implemented by :class:`mqttd.connection.ClientConnection`; tests use a
    recording fake.  The broker never touches a transport directly.
    """

    client_id = Attribute("The client identifier in use on this connection.")
    protocol_level = Attribute("3, 4 or 5.")

    def send(packet):
        """Encode ``packet`` for this connection's protocol level and write it."""

    def send_publish(message, qos, packet_id, dup, retain, properties):
        """Write a PUBLISH for ``message`` (may reuse pre-encoded bytes)."""

    def writable():
        """True while the outgoing buffer is below its high-water mark."""

    def disconnect(reason_code, reason_string=None):
        """Close the connection; v5 clients get a DISCONNECT with the reason first."""


class IBrokerStore(Interface):
    """Durable broker state (sessions, outbound queues, QoS 2 ids, retained).

    The broker describes every change as an operation value from
    :mod:`mqttd.persistence.records` and calls :meth:`write`; acknowledgements
    that promise durability wait for :meth:`sync`.  Implementations must give
    back, from :meth:`open`, exactly the state that the operations written
    before the last fired :meth:`sync` Deferred describe (at least that much:
    later operations may also be present).
    """

    durable = Attribute("True if data survives a process restart.")

    # Optional: ``failure`` -- None while the store can write; while it cannot
    # (disk full, I/O error) an exception with an ``errno`` attribute that
    # sync() fails with.  The broker reads it with getattr() and refuses
    # persistent CONNECTs meanwhile (CONNACK 0x97/0x88, v3 0x03).

    # Optional: ``subscription_deltas`` -- True if the store accepts the format 5
    # operations ``PutSubscription``, ``DeleteSubscription`` and
    # ``PutSessionState`` (see mqttd.persistence.records); the broker then
    # journals one changed filter per SUBSCRIBE/UNSUBSCRIBE filter and a
    # session's (dis)connection without its subscriptions.  Read with getattr();
    # a store without it gets whole-record ``PutSession`` operations as before.

    def open():
        """Load and return the recovered :class:`StoredState` (synchronous).

        Called once before any other method.  Never raises for a damaged file:
        what cannot be read is set aside and logged, and the rest is returned.
        """

    def write(op):
        """Record one operation.  Cheap: buffered, never blocks on the disk."""

    def sync():
        """Return a Deferred firing once every op written so far is durable.

        Concurrent calls are group-committed (one fsync serves them all).
        For a non-durable store it fires at once.
        """

    def close():
        """Flush and release files; return a Deferred."""


class IAuthenticator(Interface):
    """Decides whether a CONNECT may proceed: the broker's ``authenticate`` hook.

    Implemented by :class:`mqttd.auth.Authenticator` (a ``twisted.cred``
    ``Portal`` behind the anonymous policy); embedders may plug their own.
    """

    def authenticate(request):
        """Decide on one CONNECT.

        :param request: an :class:`AuthRequest`-like value with ``client_id``,
            ``username`` (``None`` if absent), ``password`` (bytes or ``None``),
            ``peer`` (``"host:port"``), ``protocol_level`` and ``connect`` (the
            packet).
        :returns: (or a Deferred firing with) ``True``/``0`` to accept with the
            CONNECT's username, a ``str`` to accept with that username (e.g.
            a certificate identity), or ``False`` / a CONNACK reason code
            (MQTT 5 value, >= 0x80; mapped for MQTT 3 clients) to refuse.  A
            Deferred that fails or takes longer than the broker's
            ``hook_timeout`` refuses with 0x87 Not authorized (v3: 0x05).
        """


class IAuthorizer(Interface):
    """Per-topic permissions: the broker's ``authorize_*`` hooks.

    ``client`` is a :class:`mqttd.broker.ClientInfo` (``client_id``,
    ``username``, ``peer``, ``protocol_level``...).  Every method may return a
    value or a Deferred; ``True`` allows, anything else refuses (``False`` or a
    reason code >= 0x80).  A Deferred that fails or times out refuses, with a
    log line.  While a hook of a connection is pending, the later packets of
    that connection wait, so acknowledgements keep their order [MQTT-4.6.0-2].
    An implementation may leave out a method (``None`` attribute): that check
    is then skipped.
    """

    def authorize_publish(client, message):
        """May ``client`` publish ``message`` (a :class:`mqttd.messages.Message`)?

        Also asked for the will message at CONNECT (refusal: CONNACK 0x87/0x05).
        Refused: MQTT 5 PUBACK/PUBREC 0x87; MQTT 3 acknowledged and dropped.
        """

    def authorize_subscribe(client, topic_filter, qos):
        """May ``client`` subscribe to ``topic_filter``?  (SUBACK 0x87 / 0x80).

        ``topic_filter`` is as sent, a shared one with its ``$share/GROUP/`` prefix.
        """

    def authorize_forward(client, message):
        """May ``message`` be delivered to the subscriber ``client``?

        Asked per delivery (live routing and retained replay).  ``client`` of
        an offline persistent session carries its owner's username.  A refusal
        silently skips this subscriber.
        """

    def revalidate_subscription(client, topic_filter):
        """Optional: after a reload, is the live subscription still allowed?

        Must answer synchronously (bool).  Used by :meth:`Broker.recheck_subscriptions`.
        """


class IEnhancedAuthenticator(Interface):
    """MQTT 5 enhanced authentication (AUTH packets) [MQTT-4.12].

    The broker asks :meth:`start` when a CONNECT (or a re-authentication AUTH
    0x19) carries an Authentication Method.
    """

    def start(method, client):
        """An :class:`IAuthExchange` for ``method``, or ``None`` if unknown.

        ``client`` is the :class:`mqttd.broker.ClientInfo` known so far.  An
        unknown method is refused with CONNACK 0x8C Bad authentication method
        (re-authentication: DISCONNECT 0x8C).
        """


class IAuthExchange(Interface):
    """One enhanced-authentication conversation (a SASL-style mechanism)."""

    def step(data):
        """Consume the client's Authentication Data (bytes or ``None``).

        :returns: (or a Deferred firing with) an :class:`mqttd.hooks.AuthStep`:
            continue (the server sends AUTH 0x18), success (CONNACK 0x00 or,
            on re-authentication, AUTH 0x00; its ``username`` is the
            authenticated identity) or failure (its ``reason_code``, 0x87 by
            default).  Raising, failing or timing out is a failure.
        """


class IRetainedStore(Interface):
    """The broker's retained messages (one per topic name [MQTT-3.3.1-5]).

    The single-node implementation is :class:`mqttd.retained.RetainedIndex`
    (a topic trie with an expiry heap), synchronous throughout; a clustered
    one (:mod:`mqttd.cluster.retained`) shares the messages between nodes and
    answers ``set``/``remove``/``cursor``/``match`` with Deferreds.
    Durability: when ``set``/``remove`` return None, the broker writes
    ``PutRetained`` / ``DeleteRetained`` to its store; when they return a
    Deferred, the store keeps the message itself and the broker's
    acknowledgements wait for that Deferred (``Broker.track_write``).  Times
    are the broker clock's ``seconds()`` (wall-clock seconds on a reactor).
    """

    def get(topic):
        """The retained message of ``topic``, or None (a clustered store:
        only what this node holds in memory, e.g. its ``$SYS`` values)."""

    def set(message):
        """Make ``message`` the retained message of ``message.topic``.

        :returns: None (kept in memory; the broker stores it), or a Deferred
            firing once the store that keeps it acknowledged the write
            (errback: not stored)."""

    def remove(topic):
        """Forget the retained message of ``topic``.

        :returns: the message removed (None if none) when synchronous, or a
            Deferred firing with it (or None) once the removal is stored."""

    def cursor(topic_filter, now=None):
        """An iterator over the messages matching the plain ``topic_filter``,
        walked lazily and safe while the store changes; messages expired at
        ``now`` are skipped.  A leading wildcard never matches ``$`` topics
        [MQTT-4.7.2-1].  It may also yield ``None`` (no match yet) to bound
        the work of one step: the broker's replay counts each item against
        its budget per reactor turn.  It may be a Deferred firing with an
        iterable instead (the broker replays nothing of this filter, and
        nothing of later filters, until it fires)."""

    def match(topic_filter, now=None):
        """A list of what :meth:`cursor` yields (or a Deferred firing with it)."""

    def next_expiry():
        """The earliest expiry time of a retained message, or None."""

    def expire(now):
        """Remove the messages expired at ``now``; return their topics."""

    def __len__():
        """How many retained messages there are."""

    def __iter__():
        """The topic names that have a retained message."""

    def __contains__(topic):
        """Whether ``topic`` has a retained message."""
