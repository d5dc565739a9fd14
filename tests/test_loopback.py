"""One judgement of "loopback" for the anonymous policy and the admin API: on the endpoint string
as Twisted binds it, then on the address really bound (REVIEW-SEC2 N6)."""
from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock

from mqttd.admin.service import check_admin_bound, check_admin_listen
from mqttd.loopback import bound_host, check_bound, is_loopback_endpoint, is_loopback_host
from mqttd.service import CannotListen


class Port:
    def __init__(self, address):
        self.address = address
        self.stopped = False

    def getHost(self):
        return self.address

    def stopListening(self):
        self.stopped = True


@pytest.mark.parametrize("description, loopback", [
    ("tcp:9884:interface=127.0.0.1", True),
    ("tcp:9884:interface=127.0.0.1:interface=0.0.0.0", False),   # Twisted binds the last one
    ("tcp:9884:interface=0.0.0.0:interface=127.0.0.1", True),
    ("ws:9001:interface=127.0.0.1:interface=0.0.0.0", False),
    ("tcp:9884:interface=\\:\\:1", True), ("tcp:9884:interface=localhost", True),
    ("unix:/run/mqttd-admin.sock", True), ("tcp:9884", False),
    ("haproxy:tcp:1883:interface=127.0.0.1", False),
    ("ws:9001:interface=127.0.0.1:trustXForwardedFor=1", False),
    ("tcp:9884:interface=127.0.0.1.evil.example", False), ("not an endpoint::::", False),
])
def test_loopback_endpoint_is_judged_as_twisted_binds_it(description, loopback):
    """The last of a repeated interface= decides, as in serverFromString."""
    assert is_loopback_endpoint(description) is loopback


def test_admin_listen_with_a_repeated_interface_needs_credentials():
    """--admin-listen tcp:P:interface=127.0.0.1:interface=0.0.0.0 is no credential-less loopback API."""
    with pytest.raises(ValueError, match="0.0.0.0: beyond loopback the admin API needs"):
        check_admin_listen("tcp:9884:interface=127.0.0.1:interface=0.0.0.0", None, ())
    check_admin_listen("tcp:9884:interface=127.0.0.1:interface=0.0.0.0", "token", ())
    check_admin_listen("tcp:9884:interface=127.0.0.1", None, ())


@pytest.mark.parametrize("address, host, ok", [
    (IPv4Address("TCP", "127.0.0.1", 9884), "127.0.0.1", True),
    (IPv6Address("TCP", "::1", 9884), "::1", True),
    (UNIXAddress(b"/run/x.sock"), "unix", True),
    (IPv4Address("TCP", "0.0.0.0", 9884), "0.0.0.0", False),
    (IPv4Address("TCP", "192.0.2.7", 9884), "192.0.2.7", False),
])
def test_bound_address_is_checked_too(address, host, ok):
    """Whatever the string said, a credential-less admin port bound off loopback is refused."""
    port = Port(address)
    assert bound_host(port) == host and is_loopback_host(host) is (host != "unix" and ok)
    if ok:
        check_admin_bound("tcp:9884:interface=127.0.0.1", port)
    else:
        with pytest.raises(ValueError, match=f"bound to {host}, not loopback"):
            check_admin_bound("tcp:9884:interface=127.0.0.1", port)


def test_a_refused_bound_admin_port_is_closed_and_stops_the_start(monkeypatch):
    """The service closes the port and fails the start with CannotListen (one line, exit 1)."""
    from twisted.internet import testing

    from mqttd.service import make_broker_service
    stopped = []
    monkeypatch.setattr(testing._FakePort, "stopListening",
                        lambda port: stopped.append(port.getHost()))
    reactor = MemoryReactorClock()
    service = make_broker_service(reactor, listen=["tcp:0:interface=127.0.0.1"], store="memory")
    service.add_listener("admin", "tcp:0:interface=0.0.0.0", object(), check=check_admin_bound)
    from twisted.internet import defer
    failures = []
    defer.ensureDeferred(service._listen()).addErrback(failures.append)
    assert failures and failures[0].check(CannotListen)
    assert "bound to 0.0.0.0, not loopback" in str(failures[0].value)
    assert [address.host for address in stopped] == ["0.0.0.0"]   # closed again


def test_anonymous_policy_relying_on_loopback_checks_the_bound_mqtt_ports():
    """Anonymous clients are allowed because every listener is on loopback: a port bound elsewhere
    stops the start instead of serving anonymous clients to the network."""
    from mqttd.auth.setup import configure
    from mqttd.service import make_broker_service
    reactor = MemoryReactorClock()
    service = make_broker_service(reactor, listen=["tcp:0:interface=127.0.0.1"], store="memory")
    security = configure(reactor, service.endpoints)
    assert security.allow_anonymous
    security.attach(service)
    (check,) = service.bind_checks
    check("tcp:0:interface=127.0.0.1", Port(IPv4Address("TCP", "127.0.0.1", 1883)))
    with pytest.raises(ValueError, match="anonymous clients are allowed only while"):
        check("tcp:0:interface=127.0.0.1", Port(IPv4Address("TCP", "10.0.0.5", 1883)))
    forced = configure(reactor, service.endpoints, allow_anonymous=True)
    other = make_broker_service(reactor, listen=["tcp:0"], store="memory")
    forced.attach(other)
    assert other.bind_checks == []   # --allow-anonymous: the operator's choice, nothing to check


def test_check_bound_names_the_policy():
    with pytest.raises(ValueError, match="because-of-this"):
        check_bound("tcp:1", Port(IPv4Address("TCP", "0.0.0.0", 1)), "because-of-this")
