"""``bench/cluster_shared.py`` keeps running (a few hundred messages per scenario,
in-process): the figure docs/cluster.rst quotes for the shared-group look."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent.parent / "bench" / "cluster_shared.py"


def test_the_shared_group_publish_bench_runs_every_scenario():
    """Each scenario routes every message as it says (the script asserts it) and
    reports a CPU time per message."""
    out = subprocess.run([sys.executable, str(BENCH), "--messages", "300", "--best-of", "1",
                          "--json"], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    assert set(result["us_cpu_per_message"]) == {"group-here", "group-elsewhere", "plain"}
    assert all(v > 0 for v in result["us_cpu_per_message"].values())
