"""Smoke test for the benchmark suite: ``bench/run --quick`` against mqttd.

Not a performance test (no timed assertions): it keeps the load generator, the runner and
the mqttd broker entry working together, so that the bench cannot rot. It needs gcc (the
runner builds bench/loadgen.c) and taskset.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "bench", "run")
SCENARIOS = ["fanin_qos0", "fanin_qos1", "fanout_qos0", "latency_qos1", "connect_storm", "connect_subscribe",
             "idle_100k", "retained_subscribe", "persistent_qos1", "persistent_qos1_memory"]
#: scenarios that count connections, not messages
STORMS = {"connect_storm", "connect_subscribe", "idle_100k"}

pytestmark = [
    pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc")),
                       reason="gcc is missing: bench/run cannot build the C load generator"),
    pytest.mark.skipif(not shutil.which("taskset"),
                       reason="taskset (util-linux) is missing: bench/run pins broker and load to CPUs"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2,
                       reason="bench/run needs 2 CPUs (broker on CPU 0, load generator on CPU 1)"),
]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, RUNNER, "--quick", "--brokers", "mqttd", "--reps", "1", "--out", str(out),
         "--no-chart"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    assert (out / "results.md").exists()
    return results, proc.stdout


def test_quick_bench_covers_every_scenario_for_mqttd(quick_results):
    """Every scenario ran against mqttd and produced data (no failed repetition)."""
    results, log = quick_results
    assert results["peers"]["mqttd"].get("error") is None, results["peers"]["mqttd"]
    summary = results["summary"]["mqttd"]
    for scenario in SCENARIOS:
        assert scenario in summary, scenario
        assert "error" not in summary[scenario], (scenario, summary[scenario], log[-2000:])
        assert summary[scenario]["ok_reps"] == 1, (scenario, summary[scenario])


def test_quick_bench_delivers_everything_with_mqttd(quick_results):
    """mqttd delivers messages in every scenario, with no loss (a broker that drops is not faster)."""
    results, _ = quick_results
    for run in results["runs"]:
        assert run["broker"] == "mqttd"
        scenario = run["scenario"]
        assert run.get("delivered", 0) > 0, (scenario, run)
        assert run.get("lost", 0) == 0, (scenario, run)
        assert run.get("errors", 0) == 0, (scenario, run)
        if scenario not in STORMS:
            assert run["delivered"] == run["expected"], (scenario, run)
    assert {r["scenario"] for r in results["runs"]} == set(SCENARIOS)


def test_quick_bench_reports_the_targets_it_can_compute_from_one_broker(quick_results):
    """With mqttd alone, the targets table holds the mqttd-only ones (memory, retained index,
    durable ÷ memory), each with a figure and a ratio, and results.md shows the table."""
    results, log = quick_results
    targets = {t["target"]: t for t in results["targets"]}
    durable = targets["mqttd CPython: durable QoS 1 to an offline subscriber ÷ in-memory"]
    assert durable["ratio"] is not None and durable["ratio"] > 0, durable
    retained = targets["mqttd CPython: SUBSCRIBE among 1M retained ÷ among 10k (same 100 matches)"]
    assert retained["ratio"] is not None and retained["ratio"] > 0, retained
    assert "## Targets (issue 13)" in log


def test_durability_figures_script_runs_and_loses_nothing(tmp_path):
    """bench/durability.py --quick: kill test, restart, throughput; nothing acknowledged is lost."""
    out = tmp_path / "durability.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "durability.py"), "--quick",
         "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads(out.read_text())
    assert results["kill"]["missing"] == 0 and results["kill"]["acked"] > 0
    assert results["kill"]["session_present"]
    assert results["restart"]["missing"] == 0
    assert results["restart"]["delivered_after_restart"] == results["restart"]["messages"]
    assert results["throughput_default"]["acked"] == results["throughput_memory"]["acked"]


def test_fanout_store_script_runs_and_stores_one_copy():
    """bench/fanout_store.py --quick: one message to 20 offline sessions is stored once
    (the data directory holds less than two copies), and the durable CPU figure comes out."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "fanout_store.py"), "--quick"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    entry = json.loads(proc.stdout.strip().splitlines()[-1])
    fanout = entry["fanout"]
    assert fanout["data_dir_bytes"] < 2 * fanout["size"] < fanout["sessions"] * fanout["size"]
    assert entry["durable"]["messages_per_cpu_second"] > 0
