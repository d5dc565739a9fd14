"""MQTT.js v5 against a broker subprocess: issue 7 faults 1, 2, 3, 6, 7 (mqtt5_core.js)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

SCRIPT = Path(__file__).resolve().parent / "mqtt5_core.js"


def run(node_mqtt, broker, scenario, *args):
    env = dict(os.environ, MQTTJS_MODULE=node_mqtt.module)
    try:
        proc = subprocess.run(
            [node_mqtt.node, str(SCRIPT), scenario, str(broker.port), broker.host, *args],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired as e:
        pytest.fail("mqtt5_core.js %s still running after %ss\nstdout: %s\nstderr: %s"
                    % (scenario, e.timeout, e.stdout, e.stderr))
    lines = proc.stdout.strip().splitlines()
    assert lines, "mqtt5_core.js printed nothing (exit %s)\nstderr: %s" % (proc.returncode, proc.stderr)
    out = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in out, (
        "mqtt5_core.js %s failed: %s\nstderr: %s" % (scenario, out.get("error", out), proc.stderr))
    return out["result"]


def test_mqttjs_will_with_delay_property_and_user_property(mqttd_broker, node_mqtt):
    """Fault 1: the will reaches the subscriber, the session ends, retained copies replay."""
    r = run(node_mqtt, mqttd_broker, "willProperties")
    assert r["will"]["payload"] == "gone"
    assert r["will"]["properties"].get("userProperties") == {"a": "b"}
    assert "willDelayInterval" not in r["will"]["properties"]
    assert r["sessionPresent"] is False
    for late in r["late"]:
        assert late["granted"] == [1]
        assert late["message"]["retain"] and late["message"]["payload"] == "gone"


def test_mqttjs_will_delay_and_cancel_by_reconnect(mqttd_broker, node_mqtt):
    """Fault 2: a 1 s will arrives about a second later; a reconnect in time cancels one."""
    r = run(node_mqtt, mqttd_broker, "willDelay")
    assert r["early"] == []
    assert r["resumed"] is True
    assert r["delayed"] == "late" and r["waitedMs"] >= 800
    assert r["after"] == []


def test_mqttjs_pending_will_fires_on_time_after_kill_9(mqttd_broker_factory, node_mqtt):
    """Fault 2, durable: a 3 s will armed before SIGKILL is published about 3 s after the drop."""
    broker = mqttd_broker_factory(persistence="file:data")
    armed = run(node_mqtt, broker, "willArm")
    broker.restart(kill=True)
    got = run(node_mqtt, broker, "willCollect", armed["topic"])
    assert got["payload"] == "durable"
    assert got["at"] - armed["dropped"] >= 2800


def test_mqttjs_s1_message_expiry(mqttd_broker, node_mqtt):
    """Fault 3: only the two 60 s messages come back, each with an interval <= 57."""
    r = run(node_mqtt, mqttd_broker, "expiry")
    assert r["sessionPresent"] is True
    assert [m["payload"] for m in r["messages"]] == ["m2", "m3"]
    assert all(m["interval"] <= 57 for m in r["messages"])


def test_mqttjs_resume_with_smaller_receive_maximum_gets_everything(mqttd_broker, node_mqtt):
    """Fault 6: resends within Receive Maximum 2 still deliver all ten, in order, with DUP first."""
    r = run(node_mqtt, mqttd_broker, "receiveMaximum")
    assert r["sessionPresent"] is True
    assert r["payloads"] == [str(n) for n in range(10)]
    assert r["dups"][0] is True


def test_mqttjs_no_local_with_overlapping_subscription(mqttd_broker, node_mqtt):
    """Fault 7: the n1 example: own message once, through t/# at QoS 0."""
    r = run(node_mqtt, mqttd_broker, "noLocal")
    assert r["granted"] == [0, 1]
    assert r["messages"] == [{"payload": "mine", "qos": 0}]
