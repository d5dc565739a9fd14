"""MQTT.js v5 against mqttd: shared subscriptions, subscription identifiers, topic
aliases both ways, announced capabilities, and durable state across a restart
(scenarios in mqtt5_features.js)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from paho.mqtt.client import MQTTv5

from test_paho import Paho

pytestmark = [pytest.mark.interop, pytest.mark.mqttd_only]

SCRIPT = Path(__file__).resolve().parent / "mqtt5_features.js"


def run_scenario(node_mqtt, broker, scenario, run_id=None):
    run_id = run_id or uuid.uuid4().hex[:8]
    env = dict(os.environ, MQTTJS_MODULE=node_mqtt.module)
    try:
        proc = subprocess.run(
            [node_mqtt.node, str(SCRIPT), str(broker.port), broker.host, scenario, run_id],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired as e:
        pytest.fail("mqtt5_features.js %s still running after %ss\nstdout: %s\nstderr: %s"
                    % (scenario, e.timeout, e.stdout, e.stderr))
    lines = proc.stdout.strip().splitlines()
    assert lines, "no output (exit %s)\nstderr: %s" % (proc.returncode, proc.stderr)
    result = json.loads(lines[-1])
    assert proc.returncode == 0 and "error" not in result, (
        "%s failed (exit %s): %s\nstderr: %s"
        % (scenario, proc.returncode, result.get("error", result), proc.stderr))
    return result


def test_mqttjs_sees_the_announced_capabilities(mqttd_broker_factory, node_mqtt):
    """CONNACK announces aliases, identifiers, shared subscriptions, limits and Response Information."""
    broker = mqttd_broker_factory(extra_args=[
        "--max-topic-alias", "7", "--max-inflight-incoming", "20", "--max-qos", "1",
        "--retain-available", "false", "--response-information", "reply/"])
    props = run_scenario(node_mqtt, broker, "connack", "cap")["properties"]
    assert props["topicAliasMaximum"] == 7
    assert props["receiveMaximum"] == 20
    assert props["maximumQoS"] == 1
    assert props["retainAvailable"] is False
    assert props["sharedSubscriptionAvailable"] is True
    assert props["subscriptionIdentifiersAvailable"] is True
    assert props["responseInformation"] == "reply/js-connack-cap"


def test_mqttjs_maximum_qos_and_retain_available_are_enforced(mqttd_broker_factory, node_mqtt):
    """--max-qos 1, --retain-available false: SUBSCRIBE granted 1; retained PUBLISH 0x9A,
    QoS 2 PUBLISH 0x9B (DISCONNECT); will QoS 2 0x9B, retained will 0x9A (CONNACK)."""
    broker = mqttd_broker_factory(extra_args=["--max-qos", "1", "--retain-available", "false"])
    result = run_scenario(node_mqtt, broker, "limits")
    assert result["granted"] == [1]
    assert result["retained"] == {"disconnect": 0x9A}
    assert result["qos2"] == {"disconnect": 0x9B}
    assert result["willQos"] == {"connack": 0x9B}
    assert result["willRetain"] == {"connack": 0x9A}


def test_mqttjs_shared_subscription_gives_each_message_to_one_member(mqttd_broker, node_mqtt):
    """Three members (two v5, one v3.1.1), six messages: two each (round-robin), none twice;
    No Local on a shared subscription gets DISCONNECT 0x82."""
    result = run_scenario(node_mqtt, mqttd_broker, "shared")
    per_member = result["perMember"]
    assert sorted(sum(per_member, [])) == ["job %d" % i for i in range(6)]
    assert [len(m) for m in per_member] == [2, 2, 2]
    assert result["noLocalReasonCode"] == 0x82


def test_mqttjs_gets_every_matching_subscription_identifier(mqttd_broker, node_mqtt):
    """Overlapping subscriptions: one copy with both identifiers; one match: its own."""
    messages = run_scenario(node_mqtt, mqttd_broker, "ids")["messages"]
    by_payload = {m["payload"]: m for m in messages}
    assert sorted(by_payload["both"]["subscriptionIdentifier"]) == [5, 6]
    assert by_payload["both"]["qos"] == 1
    assert by_payload["one"]["subscriptionIdentifier"] in (5, [5])


def test_mqttjs_topic_aliases_both_ways(mqttd_broker, node_mqtt):
    """MQTT.js assigns its own aliases on publish; the server sends aliases to a subscriber
    that allows two: every message arrives under its full topic name."""
    result = run_scenario(node_mqtt, mqttd_broker, "aliases", "al")
    assert result["serverTopicAliasMaximum"] == 10
    messages = result["messages"]
    assert [(m["topic"].rsplit("/", 1)[1], m["payload"]) for m in messages] == [
        ("a", "m0"), ("a", "m1"), ("b", "m2"), ("c", "m3"), ("a", "m4"), ("a", "m5")]
    assert all(m["topicAlias"] in (1, 2) for m in messages)


def test_mqttjs_shared_subscription_and_identifiers_survive_a_restart(mqttd_broker_factory,
                                                                      node_mqtt):
    """A persistent member's shared subscription and identifiers are stored: messages queued
    before and after a restart reach it with the right identifiers."""
    broker = mqttd_broker_factory(persistence="file:data")
    run_id = uuid.uuid4().hex[:8]
    run_scenario(node_mqtt, broker, "prepare-restart", run_id)
    pub = Paho(broker, MQTTv5, client_id="pub-before-" + run_id)
    pub.connect()
    pub.publish("plain/%s/x" % run_id, b"before", qos=1)
    pub.disconnect()
    broker.restart()
    pub = Paho(broker, MQTTv5, client_id="pub-after-" + run_id)
    pub.connect()
    pub.publish("durable/%s" % run_id, b"after", qos=1)
    pub.disconnect()
    result = run_scenario(node_mqtt, broker, "resume-restart", run_id)
    assert result["sessionPresent"] is True
    got = [(m["payload"], m["subscriptionIdentifier"]) for m in result["messages"]]
    norm = [(p, s if isinstance(s, list) else [s]) for p, s in got]
    assert norm == [("before", [43]), ("after", [42]), ("live", [42])]
