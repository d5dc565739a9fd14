"""BrokerService.reload: the seam SIGHUP and feature packages use."""
from twisted.internet import defer, task

from mqttd.broker import Broker
from mqttd.service import BrokerService


def _service():
    clock = task.Clock()
    return BrokerService(clock, Broker(clock), listen=[], sys_interval=0)


def test_reload_runs_every_reloader_and_reports_failures():
    """A failing reloader is reported and does not stop the others."""
    service = _service()
    calls = []
    service.add_reloader("a", lambda: calls.append("a"))

    def broken():
        raise ValueError("bad file")
    service.add_reloader("b", broken)
    service.add_reloader("c", lambda: defer.succeed(calls.append("c")))
    results = []
    service.reload().addCallback(results.append)
    assert results == [{"a": True, "b": False, "c": True}]
    assert calls == ["a", "c"]


def test_registering_a_name_again_replaces_it():
    service = _service()
    calls = []
    service.add_reloader("x", lambda: calls.append(1))
    service.add_reloader("x", lambda: calls.append(2))
    service.reload()
    assert calls == [2]
