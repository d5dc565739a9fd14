"""--persistent-client-expiration: MQTT 3.x persistent sessions end after idling that
long (mosquitto's persistent_client_expiration); v5 sessions keep their own expiry."""
from __future__ import annotations

import pytest
from twisted.python import usage

from mqttd import tap
from mqttd.codec.packets import Connect, Properties

from tests.core.harness import FakeClient, make_broker

HOUR = 3600.0


def test_v3_persistent_session_is_discarded_after_the_expiration():
    """A clean-session-0 v3.1.1 session idle for the configured time is gone."""
    broker, clock = make_broker(persistent_client_expiration=HOUR)
    c = FakeClient(broker, clock, level=4)
    c.connect("old", clean=False)
    c.subscribe("t/#", qos=1)
    c.drop()
    clock.advance(HOUR - 1)
    assert "old" in broker.sessions
    clock.advance(1)
    assert "old" not in broker.sessions
    back = FakeClient(broker, clock, level=4)
    (connack,) = back.connect("old", clean=False)
    assert connack.session_present is False


def test_v3_session_resumed_in_time_restarts_the_idle_clock():
    """Reconnecting before the expiration keeps the session; the clock restarts at the next drop."""
    broker, clock = make_broker(persistent_client_expiration=HOUR)
    c = FakeClient(broker, clock, level=4)
    c.connect("old", clean=False)
    c.drop()
    clock.advance(HOUR - 10)
    again = FakeClient(broker, clock, level=4)
    assert again.connect("old", clean=False)[0].session_present
    again.drop()
    clock.advance(HOUR - 10)
    assert "old" in broker.sessions


def test_v5_sessions_keep_their_own_expiry():
    """An MQTT 5 session that never expires (0xFFFFFFFF) is not cut short."""
    broker, clock = make_broker(persistent_client_expiration=HOUR)
    c = FakeClient(broker, clock, level=5)
    c.connect("v5", clean=False, properties=Properties(session_expiry_interval=0xFFFFFFFF))
    c.drop()
    clock.advance(10 * HOUR)
    assert "v5" in broker.sessions


def test_restored_v3_session_expires_from_its_last_disconnect():
    """After a restart the idle time counts from the stored disconnect time."""
    from twisted.internet.task import Clock

    from mqttd.broker import Broker, BrokerConfig
    from tests.core.test_will_delay import RecordingStore
    store = RecordingStore()
    broker, clock = make_broker(store, persistent_client_expiration=HOUR)
    c = FakeClient(broker, clock, level=4)
    c.send(Connect(4, "old", False, 0))
    clock.advance(0)
    c.drop()
    broker.shutdown()
    clock2 = Clock()
    clock2.advance(clock.seconds() + HOUR - 5)
    broker2 = Broker(clock2, store, BrokerConfig(persistent_client_expiration=HOUR))
    broker2.restore(store.open())
    assert "old" in broker2.sessions
    clock2.advance(5)
    assert "old" not in broker2.sessions and "old" not in store.state.sessions


@pytest.mark.parametrize("text,seconds", [
    ("1h", 3600), ("2d", 2 * 86400), ("3w", 21 * 86400), ("1m", 30 * 86400),
    ("1y", 365 * 86400), ("90s", 90)])
def test_duration_syntax_is_mosquittos(text, seconds):
    """The option takes mosquitto's units (h d w m y)."""
    options = tap.Options()
    options.parseOptions(["--persistent-client-expiration", text])
    assert options.broker_config().persistent_client_expiration == seconds


@pytest.mark.parametrize("text", ["10", "1x", "h", "-1d", "0d", "1.5h"])
def test_bad_duration_is_a_usage_error(text):
    """A duration without a known unit is refused at startup with the expected syntax."""
    with pytest.raises(usage.UsageError, match="persistent-client-expiration"):
        tap.Options().parseOptions(["--persistent-client-expiration", text])
