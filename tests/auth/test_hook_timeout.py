"""A hook that does not answer in time is an overload, not a crash (REVIEW-SEC2 N5).

Before, an ``authenticate`` Deferred cancelled by the hook timeout refused the
client with 0x87 (v3 0x05: "not authorized", a wrong answer: nothing was
decided) and logged a CRITICAL line with a ``CancelledError`` traceback.  Now
a timed-out ``authenticate`` (and SCRAM step) is answered 0x89 Server busy
(v3 0x03 Server unavailable) -- try again later -- and every hook timeout is
one rate-limited WARN line (refusal ``hook-timeout``, counted), no traceback.
"""
from __future__ import annotations

import pytest
from twisted.internet import defer

from mqttd.codec.packets import Connect, Properties
from mqttd.hooks import AuthOutcome, AuthStep
from tests.core.harness import FakeClient, make_broker


class _NeverAnswers:
    def __init__(self):
        self.pending = []

    def authenticate(self, request):
        d = defer.Deferred()
        self.pending.append(d)
        return d


def _levels(events):
    return [e["log_level"].name for e in events
            if e.get("log_namespace", "").startswith("mqttd")]


@pytest.mark.parametrize("level,code", [(5, 0x89), (4, 0x03)])
def test_authenticate_timeout_is_server_busy_with_one_warn_line(log_events, level, code):
    """0x89 (v3 0x03) after hook_timeout, one WARN refusal line, no CRITICAL, no traceback."""
    broker, clock = make_broker(hook_timeout=2.0)
    broker.authenticator = _NeverAnswers()
    client = FakeClient(broker, clock, level=level)
    client.send(Connect(level, "c", True, 0, username="u", password=b"p"))
    assert client.received() == []
    clock.advance(2.0)
    (connack,) = client.received()
    assert connack.reason_code == code and client.disconnecting
    lines = [e for e in log_events if e.get("what") == "hook-timeout"]
    assert len(lines) == 1 and lines[0]["log_level"].name == "warn"
    assert "authenticate" in lines[0]["detail"]
    assert "critical" not in _levels(log_events) and "error" not in _levels(log_events)
    assert not any(e.get("log_failure") for e in log_events)
    assert broker.stats.refused["hook-timeout"] == 1


def test_other_hook_timeouts_are_one_warn_line_without_traceback(log_events):
    """authorize_publish pending past hook_timeout: refused as before (0x87), logged WARN, no traceback."""
    broker, clock = make_broker(hook_timeout=2.0)

    class Stuck:
        def authorize_publish(self, client, message):
            return defer.Deferred()
    broker.authorizer = Stuck()
    client = FakeClient(broker, clock, level=5)
    client.connect()
    client.publish("t", qos=1, packet_id=1)
    clock.advance(2.0)
    assert [a.reason_code for a in client.received()] == [0x87]
    lines = [e for e in log_events if e.get("what") == "hook-timeout"]
    assert len(lines) == 1 and lines[0]["hook"] == "authorize_publish"
    assert "critical" not in _levels(log_events)
    assert not any(e.get("log_failure") for e in log_events)


def test_scram_step_timeout_is_server_busy():
    """An enhanced-authentication step that never answers: CONNACK 0x89, not 0x87."""
    broker, clock = make_broker(hook_timeout=2.0)

    class SlowExchange:
        def step(self, data):
            return defer.Deferred()

    class Enhanced:
        def start(self, method, client):
            return SlowExchange()
    broker.enhanced_authenticator = Enhanced()
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(5, "c", True, 0, properties=Properties(
        authentication_method="SLOW", authentication_data=b"x")))
    clock.advance(2.0)
    (connack,) = client.received()
    assert connack.reason_code == 0x89
    assert broker.stats.refused["hook-timeout"] == 1


def test_a_failing_authenticate_hook_is_still_not_authorized():
    """Only a timeout is 'busy': a hook that fails is a refusal 0x87 (v3 0x05), as before."""
    broker, clock = make_broker()

    class Broken:
        def authenticate(self, request):
            return defer.fail(RuntimeError("db down"))
    broker.authenticator = Broken()
    client = FakeClient(broker, clock, level=5)
    client.send(Connect(5, "c", True, 0, username="u", password=b"p"))
    assert client.received()[0].reason_code == 0x87
    assert AuthStep(AuthOutcome.FAILURE).reason_code == 0x87
