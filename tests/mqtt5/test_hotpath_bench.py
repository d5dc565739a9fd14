"""bench/hotpath.py (the in-process hot-path timing) runs, so it cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "hotpath.py"


def test_hotpath_bench_quick_mode_reports_every_scenario():
    """--quick --json gives a positive rate for the three hot-path scenarios."""
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    results = json.loads(out)
    assert set(results) == {"fanin_qos0", "fanin_qos1", "fanout_qos0"}
    assert all(r["deliveries_per_cpu_second"] > 0 for r in results.values())


CONNECT_BENCH = BENCH.parent / "connect_hotpath.py"


def test_connect_hotpath_bench_answers_every_client():
    """bench/connect_hotpath.py --quick: every client got CONNACK and SUBACK (it exits
    non-zero otherwise) and the CPU time per handshake is reported."""
    out = subprocess.run([sys.executable, str(CONNECT_BENCH), "--quick", "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    result = json.loads(out)
    assert result["clients"] == 200
    assert result["connect_subscribe_us"] > 0 and result["teardown_us"] > 0
