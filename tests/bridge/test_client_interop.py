"""mqttd.client.MQTTClient against a real mosquitto (real reactor, 127.0.0.1)."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from mqttd.client import MQTTClient
from mqttd.codec.packets import MQTT_3_1_1, MQTT_5

from .procs import Mosquitto

pytestmark = [pytest.mark.interop]


@pytest.fixture
def mosquitto(tmp_path):
    mosq = Mosquitto(tmp_path / "mosq", persistent=True).start()
    yield mosq
    mosq.stop()


def _client(port, client_id, level, got=None, **options):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    client = MQTTClient(reactor, endpoint, client_id=client_id, protocol_level=level,
                        keepalive=10, on_message=(got.append if got is not None else None),
                        **options)
    client.startService()
    return client


@defer.inlineCallbacks
def _wait(predicate, timeout=30.0):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("timed out")


@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
@pytest_twisted.inlineCallbacks
def test_publish_and_subscribe_at_every_qos(mosquitto, level):
    """Deferreds fire on PUBACK/PUBCOMP; a subscriber gets QoS 0/1/2 and a retained message."""
    got = []
    sub = _client(mosquitto.port, f"sub{level}", level, got)
    pub = _client(mosquitto.port, f"pub{level}", level)
    try:
        codes = yield sub.subscribe("t/#", qos=2)
        assert list(codes) == [2]
        yield pub.when_connected()
        for qos in (0, 1, 2):
            yield pub.publish(f"t/{qos}", f"m{qos}".encode(), qos=qos)
        yield pub.publish("t/kept", b"r", qos=1, retain=True)
        yield _wait(lambda: len(got) == 4)
        assert sorted((m.topic, m.payload, m.qos) for m in got) == [
            ("t/0", b"m0", 0), ("t/1", b"m1", 1), ("t/2", b"m2", 2), ("t/kept", b"r", 1)]
    finally:
        yield pub.stopService()
        yield sub.stopService()


@pytest_twisted.inlineCallbacks
def test_reconnects_and_delivers_what_was_published_while_the_server_was_down(mosquitto):
    """A QoS 1 publish made while mosquitto is down fires once the client has reconnected."""
    from mqttd.client import ConstantDelay
    got = []
    sub = _client(mosquitto.port, "persub", MQTT_3_1_1, got, clean_start=False,
                  retry_policy=ConstantDelay(0.2))
    pub = _client(mosquitto.port, "perpub", MQTT_3_1_1, clean_start=False,
                  retry_policy=ConstantDelay(0.2))
    try:
        yield sub.subscribe("d/#", qos=1)
        yield pub.when_connected()
        mosquitto.stop()
        yield _wait(lambda: pub.protocol is None and sub.protocol is None)
        pending = pub.publish("d/1", b"later", qos=1)
        assert not pending.called
        mosquitto.start()
        yield pending
        yield _wait(lambda: len(got) == 1)
        assert got[0].payload == b"later"
    finally:
        yield pub.stopService()
        yield sub.stopService()
