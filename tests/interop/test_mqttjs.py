"""MQTT.js (npm ``mqtt``) runs the reference tutorial's three scenarios against the broker."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

TUTORIAL = Path(__file__).resolve().parent / "tutorial.js"


def run_tutorial(node_mqtt, broker, protocol_version):
    env = dict(os.environ, MQTTJS_MODULE=node_mqtt.module)
    try:
        proc = subprocess.run(
            [node_mqtt.node, str(TUTORIAL), str(broker.port), broker.host, str(protocol_version)],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail("tutorial.js still running after %ss\nstdout: %s\nstderr: %s"
                    % (e.timeout, e.stdout, e.stderr))
    lines = proc.stdout.strip().splitlines()
    assert lines, "tutorial.js printed nothing (exit %s)\nstderr: %s" % (proc.returncode, proc.stderr)
    result = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in result, (
        "tutorial.js failed (exit %s): %s\nstderr: %s"
        % (proc.returncode, result.get("error", result), proc.stderr))
    return result


@pytest.mark.parametrize("protocol_version", [4, 5], ids=["v311", "v5"])
def test_mqttjs_runs_the_tutorial(mqttd_broker, node_mqtt, protocol_version):
    """Self-message, two clients talking, and an offline persistent subscriber, as in the tutorial."""
    result = run_tutorial(node_mqtt, mqttd_broker, protocol_version)

    # (1) a client gets its own message
    assert result["self"] == {"topic": "presence", "payload": "Hello mqtt", "qos": 0, "retain": False}

    # (2) A and B talk through agreed topics
    assert result["talk"]["toB"]["topic"] == "clientA/says"
    assert result["talk"]["toB"]["payload"] == "Hello from A"
    assert result["talk"]["toA"]["topic"] == "clientB/says"
    assert result["talk"]["toA"]["payload"] == "Hello from B"

    # (3) offline: the persistent subscriber returns to its session and the QoS 1 message
    offline = result["offline"]
    assert offline["firstSessionPresent"] is False
    assert offline["granted"] == [1]
    assert offline["sessionPresent"] is True
    msg = offline["message"]
    assert msg["topic"].startswith("offline/")
    assert msg["payload"] == "Hello offline subscriber"
    assert msg["qos"] == 1
