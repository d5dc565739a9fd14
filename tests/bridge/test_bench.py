"""Smoke test of bench/bridge.py --quick: the bridge benchmark keeps working (no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_bridge_bench_quick_mode_delivers_everything(tmp_path):
    """Every kind (mqttd memory, mqttd file, mosquitto) runs and loses nothing."""
    out = tmp_path / "bridge.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bridge.py"), "--quick",
                           "--json", str(out)], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["summary"]) == {"mqttd", "mqttd-file", "mosquitto"}
    for kind, summary in results["summary"].items():
        assert summary["lost"] == 0, kind
        assert summary["median_msgs_per_s"], kind
