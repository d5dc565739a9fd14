"""The port helpers of the process-based tests: no "address already in use" race.

mqttd binds port 0 and reports its port; servers that cannot (mosquitto,
redis-server, Prometheus) get a port picked outside the kernel's ephemeral
range and are started again elsewhere when it was taken meanwhile.
"""
from __future__ import annotations

import socket

import pytest

import brokerproc
from brokerproc import (
    PORT_ATTEMPTS, BrokerProcess, PortInUse, address_in_use, find_mosquitto, free_port,
    start_on_free_port)


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    """A picked port is never one the kernel hands to bind(0) or an outgoing connection."""
    low, high = brokerproc._ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_port_honours_avoid_and_below():
    """Redis cluster ports stay below 55536 and distinct from the ones already used."""
    first = free_port(below=55536)
    for _ in range(20):
        port = free_port(avoid=(first,), below=55536)
        assert port != first and port < 55536


def test_a_start_whose_port_was_taken_is_retried_on_another_port():
    """PortInUse from the start -> a new port, until one works (each port tried once)."""
    tried = []

    def start(port):
        tried.append(port)
        if len(tried) < 3:
            raise PortInUse("taken")
        return port

    assert start_on_free_port(start) == tried[-1]
    assert len(tried) == 3 and len(set(tried)) == 3


def test_retries_are_bounded():
    """A port clash every time ends after PORT_ATTEMPTS starts with PortInUse."""
    tried = []

    def start(port):
        tried.append(port)
        raise PortInUse("taken")

    with pytest.raises(PortInUse):
        start_on_free_port(start)
    assert len(tried) == PORT_ATTEMPTS


def test_address_in_use_recognises_the_servers_messages():
    """mosquitto, redis-server, Prometheus (Go) and mqttd's own wording."""
    assert address_in_use("Error: Address already in use")
    assert address_in_use("Could not create server TCP listening socket 127.0.0.1:6379: "
                          "bind: Address already in use")
    assert address_in_use('err="listen tcp 127.0.0.1:9090: bind: address already in use"')
    assert address_in_use("mqttd: cannot listen on tcp:1883:interface=127.0.0.1: ...")
    assert not address_in_use("Opening ipv4 listen socket on port 1883.")


@pytest.mark.interop
def test_mosquitto_whose_port_was_taken_starts_on_another(tmp_path, monkeypatch):
    """The race itself: the first port picked is taken before mosquitto binds it."""
    if not find_mosquitto():
        pytest.fail("mosquitto not installed: run ./dev test", pytrace=False)
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen(1)
    picks = iter([taken.getsockname()[1]])
    real = brokerproc.free_port
    monkeypatch.setattr(brokerproc, "free_port",
                        lambda *a, **kw: next(picks, None) or real(*a, **kw))
    broker = BrokerProcess(tmp_path / "mosq", kind="mosquitto")
    try:
        broker.start()
        assert broker.port != taken.getsockname()[1]
        assert broker.starts == 2
        with socket.create_connection((broker.host, broker.port), timeout=10):
            pass
    finally:
        broker.stop()
        taken.close()
