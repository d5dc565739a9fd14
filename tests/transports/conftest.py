"""Fixtures for the transport tests: a test PKI and broker subprocesses with extra listeners."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .certs import PKI

INTEROP = Path(__file__).resolve().parent.parent / "interop"
if str(INTEROP) not in sys.path:
    sys.path.insert(0, str(INTEROP))

from brokerproc import BrokerProcess  # noqa: E402  (tests/interop/brokerproc.py)

NODE_DIR = INTEROP / "node"
MQTTJS_DIR = NODE_DIR / "node_modules" / "mqtt"


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, a second untrusted CA, server and client certificates (made once per run)."""
    return PKI(tmp_path_factory.mktemp("pki"))


class Listeners:
    """A broker subprocess and the port of each of its listeners, by endpoint prefix."""

    def __init__(self, broker: BrokerProcess):
        self.broker = broker
        self.host = "127.0.0.1"
        self.ports = {}
        for listener in broker.ready["listeners"]:
            kind = listener["endpoint"].split(":", 1)[0]
            if kind == "haproxy":
                kind = "haproxy:" + listener["endpoint"].split(":", 2)[1]
            self.ports.setdefault(kind, listener["port"])

    def port(self, kind: str) -> int:
        return self.ports[kind]


@pytest.fixture
def broker_with(tmp_path):
    """``broker_with(*listen)``: an mqttd subprocess with these extra listeners (stopped at teardown)."""
    started = []

    def start(*listen, extra_args=()):
        args = []
        for description in listen:
            args += ["--listen", description]
        broker = BrokerProcess(tmp_path / f"broker{len(started) + 1}", kind="mqttd",
                               extra_args=[*args, *extra_args])
        started.append(broker)
        broker.start()
        return Listeners(broker)

    yield start
    for broker in reversed(started):
        broker.stop()


@pytest.fixture(scope="session")
def node_mqtt():
    """``SimpleNamespace(node=path, module=dir)`` for MQTT.js."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: MQTT.js tests need Node.js >= 18")
    if not (MQTTJS_DIR / "package.json").exists():
        pytest.fail(f"MQTT.js is not installed in {NODE_DIR}: run ./dev test", pytrace=False)
    return SimpleNamespace(node=node, module=str(MQTTJS_DIR))


@pytest.fixture(scope="session")
def mosquitto_clients():
    """``SimpleNamespace(pub=path, sub=path)`` of the mosquitto command line clients."""
    pub, sub = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if not (pub and sub):
        pytest.fail("mosquitto_pub/mosquitto_sub not found (mosquitto-clients): run ./dev test",
                    pytrace=False)
    return SimpleNamespace(pub=pub, sub=sub)
