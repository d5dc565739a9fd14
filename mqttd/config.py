"""The broker core's configuration: :class:`BrokerConfig` and its validators (layer L3).

Every field has a production default and an attrs validator; a wrong type
raises ``TypeError``, a value out of range ``ValueError``, with a one-line
message that starts with the field name.  ``mqttd.tap`` turns these into usage
errors; embedders build a ``BrokerConfig(...)`` and hand it to
:class:`mqttd.broker.Broker` (which re-exports it: ``from mqttd.broker import
BrokerConfig`` keeps working).
"""
from __future__ import annotations

from typing import Optional

import attrs

from mqttd import shared
from mqttd.session import OverflowPolicy, QueueLimits

__all__ = ["BrokerConfig", "MAX_PACKET_SIZE", "MIN_PACKET_SIZE"]


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
    #: bytes (topic + payload + properties) queued in all sessions together; beyond it the
    #: overflow policy drops (reason "queued-bytes-total"); 0 = no cap
    max_queued_bytes_total: int = attrs.field(default=1024 * 1024 * 1024,
                                              validator=_int_in(0))
    #: persistent sessions held at most; a CONNECT that would create one more
    #: discards an offline session of the owner holding the most (if it holds
    #: at least two more than the new session's owner: fair share,
    #: ``PersistentSessions.fair_victim``) or else one of its owner's own, or
    #: without one is refused (v5 CONNACK 0x97, v3 0x03); 0 = no cap
    max_sessions: int = attrs.field(default=100_000, validator=_int_in(0))
    #: persistent sessions one owner (user name; the anonymous clients of one
    #: address, an IPv6 /64, are one owner) holds at most; 0 = no share.  At
    #: this share a new persistent session of the owner discards its
    #: longest-offline one that owes no message (else its longest-offline
    #: one); refused (0x97 / v3 0x03) only if it has none offline.  Not below
    #: ``max_sessions`` (or 0) is warned about at start-up
    max_sessions_per_user: int = attrs.field(default=10_000, validator=_int_in(0))
    overflow_policy: str = attrs.field(default=OverflowPolicy.DROP_OLDEST,
                                       validator=_one_of(OverflowPolicy.ALL))
    #: queue QoS 0 messages for offline persistent sessions (off: they are dropped)
    queue_qos0: bool = attrs.field(default=False, validator=_is_bool)
    #: outbound QoS 1/2 messages in flight per client (v5 Receive Maximum lowers
    #: it); at most 65535, the packet identifier space [MQTT-2.2.1]
    max_inflight: int = attrs.field(default=1000, validator=_int_in(1, 65535))
    #: bytes (topic + payload + properties, :func:`mqttd.messages.message_size`)
    #: of outbound QoS 1/2 messages in flight per client (mosquitto's
    #: ``max_inflight_bytes``); 0 = no byte bound.  A message goes in flight
    #: while the window's bytes stay within it, or alone when nothing is in
    #: flight; the others wait in the queue (and count against its limits).
    #: 16 MiB: without it a client's window held up to ``max_inflight`` x
    #: ``max_packet_size`` (16 GiB by default)
    max_inflight_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=_int_in(0))
    #: largest packet accepted or sent, in bytes (fixed header included)
    max_packet_size: int = attrs.field(default=16 * 1024 * 1024,
                                       validator=_int_in(MIN_PACKET_SIZE, MAX_PACKET_SIZE))
    #: largest packet accepted before a CONNECT succeeded (the CONNECT itself),
    #: refused from the fixed header: an unauthenticated socket buffers no more.
    #: 64 KiB: credentials, a client id and a will of a few KiB fit with room
    #: to spare; 1 MiB let 150 unauthenticated sockets pin 160 MB (REVIEW-SEC2 N8)
    max_connect_packet_size: int = attrs.field(
        default=64 * 1024, validator=_int_in(MIN_PACKET_SIZE, MAX_PACKET_SIZE))
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
    #: a CONNECT may take over and resume the session of a client id created
    #: by another username (off: refused with 0x87 / v3 0x05 while its owner is
    #: connected; an offline one is discarded, never resumed)
    allow_session_takeover_by_other_user: bool = attrs.field(default=False,
                                                             validator=_is_bool)
    #: open client connections, all listeners together; 0 = no limit
    #: (refused with CONNACK 0x97 Quota exceeded / v3 0x03 Server unavailable)
    max_connections: int = attrs.field(default=0, validator=_int_in(0))
    #: sockets of one client address that have waited 1 s or more without
    #: sending their CONNECT (half-open); with that many, the address's next
    #: socket is closed at accept; 0 = no limit (see mqttd.protocol.Admission)
    max_pending_connections_per_address: int = attrs.field(default=32, validator=_int_in(0))
    #: subscriptions one session may hold; 0 = no limit (SUBACK 0x97 / v3 0x80).
    #: The default bounds what one (stolen) credential can make the broker hold
    #: (~5 MB of subscriptions) far above what clients use; mosquitto has none
    max_subscriptions_per_client: int = attrs.field(default=10000, validator=_int_in(0))
    #: topic filters one SUBSCRIBE or UNSUBSCRIBE may carry; 0 = no limit.  A
    #: packet over it is refused while it is decoded (v5 DISCONNECT 0x97, v3
    #: close), so no single packet costs more than this many filters' work
    max_topic_filters_per_packet: int = attrs.field(default=1000, validator=_int_in(0))
    #: MQTT 5 User Properties in one property block (a PUBLISH, a CONNECT, its
    #: will...); 0 = no limit.  A packet over it is refused while it is decoded
    #: (v5 DISCONNECT 0x97, CONNECT: CONNACK 0x97): without it a 16 MiB PUBLISH
    #: of empty pairs decodes into ~3 million tuples (seconds of CPU, ~300 MB)
    max_user_properties: int = attrs.field(default=64, validator=_int_in(0))
    #: levels of a topic name or filter, default 200 (mosquitto's
    #: TOPIC_HIERARCHY_LIMIT; each level of a filter is a node of the
    #: subscription tree, ~430 bytes: a 32,000-level filter cost 14 MB);
    #: 0 = no limit (v5 DISCONNECT 0x90 for a PUBLISH, SUBACK 0x8F per filter;
    #: v3 close / 0x80)
    max_topic_levels: int = attrs.field(default=200, validator=_int_in(0))
    #: inbound PUBLISH packets per second per client host (token bucket, burst
    #: of one second, charged per packet, shared by the host's live connections;
    #: IPv6: per /64); over it the connection's input is held (mqttd.inflow);
    #: a reconnect continues from the bucket the last connection of that client
    #: id or host left; 0 = no limit
    max_inbound_rate: float = attrs.field(default=0.0, validator=_seconds(0))
    #: inbound PUBLISH bytes per second per client host (same bucket rules); 0 = no limit
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

