"""What every part of :class:`mqttd.connection.ClientConnection` shares (layer L3).

The connection's states and the rate-limit key of a client before its CONNECT;
the modules the connection is composed of (:mod:`mqttd.outbound`,
:mod:`mqttd.inflow`, :mod:`mqttd.connecting`, :mod:`mqttd.publishing`,
:mod:`mqttd.subscribing`) import them from here.
"""
from __future__ import annotations

from mqttd.ratelimit import peer_host

__all__ = ["_CONNECTING", "_CONNECTED", "_CLOSED", "_peer_host"]

_CONNECTING, _CONNECTED, _CLOSED = "connecting", "connected", "closed"


#: ``host`` of ``host:port`` (who a connection is before its CONNECT): the
#: broker's one judgement, :func:`mqttd.ratelimit.peer_host`
_peer_host = peer_host
