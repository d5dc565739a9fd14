"""The security bench scripts keep working (not performance tests: no timed assertions)."""
from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_acl_hotpath_delivers_every_message_with_and_without_the_acl(capsys):
    """bench/acl_hotpath.py routes through the real ACL (it asserts every delivery) and prints both figures."""
    acl_hotpath = _load("acl_hotpath")
    assert acl_hotpath.main(["--messages", "200", "--best-of", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["messages"] == 200
    assert result["plain_deliveries_per_cpu_s"] > 0 and result["acl_deliveries_per_cpu_s"] > 0


def test_acl_hotpath_acl_is_the_100_rule_file_of_bench_run():
    """The in-process figure uses the same 100 rules as bench/run --mqttd-security, granting last."""
    from mqttd.auth.acl import parse_acl

    text = _load("acl_hotpath").acl_rules()
    rules = [line for line in text.splitlines() if line.startswith(("topic", "pattern"))]
    assert len(rules) == 100 and rules[-1] == "topic readwrite bench/#"
    assert parse_acl(text).rule_count == 100
