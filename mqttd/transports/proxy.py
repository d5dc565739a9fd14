"""PROXY protocol (``haproxy:`` listeners) whose refusals are counted and logged (layer L4).

Twisted's ``haproxy:`` wrapper (``twisted.protocols.haproxy``) closes a
connection whose PROXY header is malformed, or that starts with anything
else, without a word.  On a broker that hides a misconfigured balancer (no
``send-proxy``, v1 vs v2, a health check speaking MQTT directly) or a client
that skips the balancer.  :class:`CountedHAProxyWrappingFactory` keeps
Twisted's parsers and answers such a connection as every other refusal:
closed, counted in ``BrokerStats.refused["proxy-header"]`` and one
rate-limited log line per balancer address (``Refused proxy-header for -
from 127.0.0.1:40312: malformed PROXY header: ...``).

It also waits for the first 16 bytes before deciding v1 or v2 (Twisted
decides on the first read and drops a header split across reads).

:func:`count_proxy_refusals` puts it under a ``haproxy:`` endpoint that
``serverFromString`` made; :class:`mqttd.service.BrokerService` does that for
its listeners.
"""
from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import _WrapperServerEndpoint
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

#: the refusal kind in BrokerStats.refused and the log line
REFUSAL = "proxy-header"
#: bytes needed to tell a v2 header (16-byte fixed part) from a v1 one
_DECIDE = 16


def _describe(address) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else str(address)


def _check_addresses(info) -> None:
    """ValueError unless the header's addresses are IP addresses of their
    family with ports 0-65535 (Twisted's v1 parser takes any text)."""
    for where in (info.source, info.destination):
        if where is None:
            continue  # PROXY UNKNOWN / LOCAL: the socket's own addresses
        if isinstance(where, (IPv4Address, IPv6Address)):
            family = 4 if isinstance(where, IPv4Address) else 6
            if ipaddress.ip_address(where.host).version != family:  # ValueError: no address
                raise ValueError(f"{where.host!r} is not an IPv{family} address")
            if not 0 <= where.port <= 65535:
                raise ValueError(f"port {where.port} out of range")


class _V1Parser(V1Parser):
    """Twisted's v1 parser, plus ``PROXY UNKNOWN`` without addresses.

    The PROXY protocol spec (v1, section 2.1): for the UNKNOWN protocol "the
    receiver must ignore anything presented before the CRLF is found" and use
    the real connection's addresses; HAProxy sends the bare ``PROXY
    UNKNOWN\r\n`` for connections it makes itself (health checks with
    ``check-send-proxy``).  Twisted accepts UNKNOWN only when more words
    follow; this accepts it in every form, like v2's LOCAL command."""

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        words = line.split(b" ", 2)
        if len(words) >= 2 and words[0] == cls.PROXYSTR and words[1] == cls.UNKNOWN_PROTO:
            return ProxyInfo(line, None, None)
        return super().parse(line)


class CountedHAProxyProtocolWrapper(HAProxyProtocolWrapper):
    """Twisted's PROXY protocol wrapper; a bad header is counted and logged before the close."""

    _start = b""

    def dataReceived(self, data: bytes) -> None:
        if self._proxyInfo is not None or self._parser is not None:
            return self._feed(data)
        data = self._start + data
        v2 = V2Parser.PREFIX
        if (len(data) < _DECIDE and v2.startswith(data[:len(v2)])) or (
                len(data) < len(V1Parser.PROXYSTR) and V1Parser.PROXYSTR.startswith(data)):
            self._start = data  # the start of a header, split across reads: wait
            return None
        self._start = b""
        if data[:len(v2)] == v2 and data[12] & 0xF0 == 0x20:
            self._parser = V2Parser()
        elif data[:len(V1Parser.PROXYSTR)] == V1Parser.PROXYSTR:
            self._parser = _V1Parser()
        else:
            return self._refuse(f"no PROXY header (the connection starts with "
                                f"{data[:16]!r})")
        return self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self._proxyInfo is not None:
            return self.wrappedProtocol.dataReceived(data)
        try:
            info, remaining = self._parser.feed(data)
            if info is not None:
                _check_addresses(info)
        except (InvalidProxyHeader, ValueError) as error:
            # ValueError: Twisted's v1 parser lets int()/decode() errors through
            return self._refuse(f"malformed PROXY header ({type(error).__name__}"
                                f"{': ' + str(error) if str(error) else ''})")
        self._proxyInfo = info
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)
        return None

    def _refuse(self, detail: str) -> None:
        self.factory.refused(self.transport.getPeer(), detail)
        self.loseConnection()


class CountedHAProxyWrappingFactory(HAProxyWrappingFactory):
    """``HAProxyWrappingFactory`` that counts and logs the connections it refuses.

    :param broker: its ``refused(what, client_id, peer, detail)`` counts the
        refusal and logs it through the broker's log rate limiter, keyed by the
        balancer's host (no client id yet: see ``ratelimit.refusal_key``; 3
        lines per 10 s, then a count).
    """

    protocol = CountedHAProxyProtocolWrapper

    def __init__(self, wrappedFactory, broker):
        super().__init__(wrappedFactory)
        self.broker = broker

    def refused(self, address, detail: str) -> None:
        self.broker.refused(REFUSAL, None, _describe(address), detail)


def count_proxy_refusals(endpoint, broker):
    """Make a ``haproxy:`` endpoint from ``serverFromString`` use
    :class:`CountedHAProxyWrappingFactory` (with ``broker``); any other
    endpoint is returned unchanged."""
    if isinstance(endpoint, _WrapperServerEndpoint) and \
            endpoint._wrapperFactory is HAProxyWrappingFactory:
        endpoint._wrapperFactory = lambda factory: CountedHAProxyWrappingFactory(factory, broker)
    return endpoint


__all__ = ["CountedHAProxyProtocolWrapper", "CountedHAProxyWrappingFactory", "REFUSAL",
           "count_proxy_refusals"]
