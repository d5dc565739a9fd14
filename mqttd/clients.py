"""Read-only summaries of the broker's clients and sessions (layer L3).

:meth:`mqttd.Broker.clients` returns one :class:`ClientSummary` per session
(online or not): what an operator or an embedding program asks first — who
is connected, with which subscriptions, and whose queue is growing.  The
summaries are copies: holding one never keeps the broker's state alive or
changes it.  :class:`ClientInfo` is what events and hooks tell about a client.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import attrs


@attrs.frozen
class ClientInfo:
    """What events and hooks tell about a client (``mqttd.broker`` re-exports it)."""

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


@attrs.frozen
class SubscriptionSummary:
    """One subscription of a session, as granted."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@attrs.frozen
class ClientSummary:
    """One session and its connection, if any.

    :ivar client_id: the MQTT client identifier.
    :ivar online: a network connection is attached now.
    :ivar persistent: the session outlives its connection (v3 clean session 0,
        v5 Session Expiry Interval > 0).
    :ivar protocol_level: 3 (3.1), 4 (3.1.1) or 5 (5.0).
    :ivar expiry_interval: v5 Session Expiry Interval in seconds; None: never.
    :ivar expires_at: broker clock time at which an offline persistent
        session expires; None while online or if it never expires.
    :ivar queued: messages waiting in the session queue; ``queued_bytes``
        their bytes (topic + payload + properties).
    :ivar inflight: outbound QoS 1/2 messages sent and not yet acknowledged;
        ``inflight_bytes`` their bytes (topic + payload + properties,
        against ``--max-inflight-bytes``).
    :ivar dropped: messages dropped for this session, by reason.
    :ivar peer: ``host:port`` of the connection (None offline).
    :ivar username: the CONNECT user name (None offline or anonymous).
    :ivar disconnected_at: broker clock time of the last disconnect (None online).
    """

    client_id: str
    online: bool
    persistent: bool
    protocol_level: int
    expiry_interval: Optional[int]
    expires_at: Optional[float]
    subscriptions: Tuple[SubscriptionSummary, ...]
    queued: int
    queued_bytes: int
    inflight: int
    dropped: Dict[str, int]
    peer: Optional[str] = None
    username: Optional[str] = None
    disconnected_at: Optional[float] = None
    keepalive: Optional[int] = None
    listener: Optional[str] = None
    inflight_bytes: int = 0

    def to_json(self) -> dict:
        """A JSON-ready dict (subscriptions as a list of dicts)."""
        data = attrs.asdict(self, recurse=True)
        data["subscriptions"] = [attrs.asdict(s) for s in self.subscriptions]
        return data


def summarize(session) -> ClientSummary:
    """The :class:`ClientSummary` of one :class:`~mqttd.session.Session`."""
    conn = session.connection
    info = getattr(conn, "info", None) if conn is not None else None
    expires_at = None
    if conn is None and session.persistent and session.expiry_interval is not None \
            and session.disconnected_at is not None:
        expires_at = session.disconnected_at + session.expiry_interval
    subs = tuple(
        SubscriptionSummary(f, getattr(s, "qos", 0), bool(getattr(s, "no_local", False)),
                            bool(getattr(s, "retain_as_published", False)),
                            int(getattr(s, "retain_handling", 0) or 0))
        for f, s in sorted(session.subscriptions.items()))
    return ClientSummary(
        client_id=session.client_id, online=conn is not None,
        persistent=bool(session.persistent), protocol_level=session.protocol_level,
        expiry_interval=session.expiry_interval, expires_at=expires_at,
        subscriptions=subs, queued=len(session.queue), queued_bytes=session.queued_bytes,
        inflight=len(session.inflight), inflight_bytes=session.inflight_bytes,
        dropped=dict(session.dropped),
        peer=getattr(conn, "peer", None) if conn is not None else None,
        username=getattr(info, "username", None),
        disconnected_at=session.disconnected_at if conn is None else None,
        keepalive=getattr(info, "keepalive", None),
        listener=getattr(conn, "listener", None) if conn is not None else None)
