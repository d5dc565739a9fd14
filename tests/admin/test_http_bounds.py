"""The admin and metrics HTTP listeners are bounded like the MQTT ones (REVIEW-S9 R12)."""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from mqttd.admin.service import BoundedSite
from tests.core.harness import make_broker


def _site(limit=3):
    broker, clock = make_broker()
    return BoundedSite(Resource(), broker, max_per_address=limit), broker, clock


def _connect(site, host, port):
    addr = IPv4Address("TCP", host, port)
    channel = site.buildProtocol(addr)
    if channel is not None:
        channel.makeConnection(StringTransport(peerAddress=addr))
    return channel


def test_http_connections_per_address_are_capped_and_counted():
    """Past the cap one address's sockets are closed at accept and counted; others still
    connect, and a closed socket makes room again."""
    site, broker, _clock = _site(limit=3)
    channels = [_connect(site, "10.0.0.1", 1000 + i) for i in range(5)]
    assert [c is not None for c in channels] == [True, True, True, False, False]
    assert broker.stats.refused["http-connections"] == 2
    assert _connect(site, "10.0.0.2", 2000) is not None
    channels[0].connectionLost(None)
    assert _connect(site, "10.0.0.1", 3000) is not None
    assert site.open_by_address == {"10.0.0.1": 3, "10.0.0.2": 1}


def test_idle_http_sockets_time_out_with_rate_limited_lines(log_events):
    """twisted.web's 'Timing out client' line per idle socket goes through the broker's
    limiter: 100 idle sockets from one address write a few lines, not 100."""
    site, _broker, _clock = _site(limit=1000)
    channels = [_connect(site, "10.0.0.9", 4000 + i) for i in range(100)]
    for channel in channels:
        channel.timeoutConnection()
    lines = [e for e in log_events if "Timing out client" in e.get("log_format", "")]
    assert 1 <= len(lines) <= 3
