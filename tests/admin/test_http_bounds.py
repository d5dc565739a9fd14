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


def _post(length, body=b"", chunked=False):
    head = b"POST /api/clients/x/disconnect HTTP/1.1\r\nHost: x\r\n"
    if chunked:
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + body
    return head + b"Content-Length: %d\r\n\r\n" % length + body


def test_large_declared_body_is_refused_413_before_it_is_read():
    """A 200 MB Content-Length is answered 413 from the headers: nothing stored, no temp file (REVIEW-S10 S7)."""
    site, broker, _clock = _site(limit=10)
    channel = _connect(site, "10.0.0.7", 5000)
    channel.dataReceived(_post(200 * 1024 * 1024, b"x" * 65536))
    assert channel.transport.value().startswith(b"HTTP/1.1 413 ")
    assert channel.transport.disconnecting
    request = channel.requests[0] if channel.requests else None
    assert request is None or len(request.content.getvalue()) == 0
    assert broker.stats.refused["http-body"] == 1


def test_chunked_body_over_the_bound_is_cut_off():
    """A chunked upload is refused once it passes the bound, not buffered to the end (REVIEW-S10 S7)."""
    from mqttd.admin.service import MAX_HTTP_REQUEST_BODY
    site, broker, _clock = _site(limit=10)
    channel = _connect(site, "10.0.0.8", 5001)
    chunk = b"%x\r\n%s\r\n" % (32768, b"y" * 32768)
    channel.dataReceived(_post(None, chunk * (MAX_HTTP_REQUEST_BODY // 32768 + 2), chunked=True))
    assert channel.transport.value().startswith(b"HTTP/1.1 413 ")
    assert broker.stats.refused["http-body"] == 1


def test_small_body_still_reaches_the_resource():
    """A request with a small body is served as before, its body readable."""
    class Echo(Resource):
        isLeaf = True

        def render_POST(self, request):
            return b"got %d" % len(request.content.read())

    broker, _clock = make_broker()
    site = BoundedSite(Echo(), broker)
    channel = _connect(site, "10.0.0.9", 5002)
    channel.dataReceived(_post(5, b"hello"))
    assert channel.transport.value().startswith(b"HTTP/1.1 200 ")
    assert channel.transport.value().endswith(b"got 5")
    assert "http-body" not in broker.stats.refused
