"""Interop test fixtures: a real broker subprocess and real clients.

The broker is ``twistd -n --pidfile '' mqttd --listen tcp:0:interface=127.0.0.1
--persistence memory --broker-id ID --ready-file PATH`` started in a per-test
temporary directory (its cwd); the port comes from the ready file. See
``brokerproc.BrokerProcess``.

Fixtures:

``mqttd_broker``
    a running broker (memory persistence), function scope.
``mqttd_broker_factory``
    ``factory(broker_id=..., persistence=..., extra_args=[...])`` starts more
    brokers, e.g. ``persistence="file:data"`` (relative to the broker's
    directory) for a durable store; every broker is stopped at teardown.
``node_mqtt``
    ``(node, module_dir)`` for MQTT.js; skipped only when ``node`` is absent.
``mosquitto_clients``
    paths of ``mosquitto_pub`` / ``mosquitto_sub``.

When a test fails, the tail of each of its brokers' logs is attached to the
report (section "broker log").

Development-only switch: ``MQTTD_INTEROP_BROKER=mosquitto`` runs the same
tests against mosquitto (free port picked first, generated config
``listener PORT 127.0.0.1`` + ``allow_anonymous true``), to check the client
side of these tests against a known-good broker. Tests marked ``mqttd_only``
(mqttd's ``$SYS`` topics, mqttd's command line) are skipped under it.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from brokerproc import BrokerProcess, broker_kind

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
MQTTJS_DIR = NODE_DIR / "node_modules" / "mqtt"

_brokers_key = pytest.StashKey[list]()
_counter = itertools.count(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "interop: runs real clients against a broker subprocess over loopback")
    config.addinivalue_line("markers", "mqttd_only: needs mqttd itself (skipped under MQTTD_INTEROP_BROKER=mosquitto)")


def pytest_collection_modifyitems(config, items):
    if broker_kind() == "mqttd":
        return
    skip = pytest.mark.skip(reason="mqttd-specific; MQTTD_INTEROP_BROKER=%s" % broker_kind())
    for item in items:
        if item.get_closest_marker("mqttd_only"):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":  # a start failure already carries the tail
        for broker in item.stash.get(_brokers_key, []):
            report.sections.append(("broker log: %r" % (broker,), broker.log_tail()))


@pytest.fixture
def mqttd_broker_factory(request, tmp_path):
    """Start brokers on demand; all are stopped (SIGTERM, then SIGKILL) at teardown."""
    started = request.node.stash.setdefault(_brokers_key, [])

    def factory(broker_id=None, persistence="memory", extra_args=(), **kwargs):
        n = len(started) + 1
        broker_id = broker_id or "mqttd-it-%d-%d" % (next(_counter), n)
        broker = BrokerProcess(
            tmp_path / ("broker%d" % n),
            broker_id=broker_id,
            persistence=persistence,
            extra_args=extra_args,
            **kwargs,
        )
        started.append(broker)
        broker.start()
        return broker

    yield factory
    for broker in reversed(started):
        broker.stop()


@pytest.fixture
def mqttd_broker(mqttd_broker_factory):
    """One running broker with memory persistence."""
    return mqttd_broker_factory()


@pytest.fixture(scope="session")
def node_mqtt():
    """``SimpleNamespace(node=path, module=dir)`` for MQTT.js."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: MQTT.js interop tests need Node.js >= 18")
    if not (MQTTJS_DIR / "package.json").exists():
        pytest.fail("MQTT.js is not installed in %s: run ./dev test" % NODE_DIR, pytrace=False)
    return SimpleNamespace(node=node, module=str(MQTTJS_DIR))


@pytest.fixture(scope="session")
def mosquitto_clients():
    """``SimpleNamespace(pub=path, sub=path)`` of the mosquitto command line clients."""
    pub, sub = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if not (pub and sub):
        pytest.fail("mosquitto_pub/mosquitto_sub not found (package mosquitto-clients): run ./dev test",
                    pytrace=False)
    return SimpleNamespace(pub=pub, sub=sub)
