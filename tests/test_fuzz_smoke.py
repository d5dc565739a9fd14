"""A short run of bench/fuzz.py in the suite (the full run is ./dev fuzz, 10^6 inputs)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("mqttd_bench_fuzz", FUZZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_in_process_smoke_finds_nothing(tmp_path):
    """20,000 generated and mutated inputs to the codec and ClientConnection: no
    exception escapes, no failure is logged, whole and chunked feeds agree."""
    fuzz = _fuzz_module()
    assert fuzz.main(["--inputs", "20000", "--seed", "11", "--timeout", "120",
                      "--crash-dir", str(tmp_path / "crashes")]) == 0
    assert not (tmp_path / "crashes").exists()


@pytest.mark.interop
def test_fuzz_end_to_end_smoke_keeps_the_canary_served(tmp_path):
    """Mutated packet streams to a broker subprocess: the canary gets every QoS 1
    message in order and the broker's log has no traceback."""
    fuzz = _fuzz_module()
    assert fuzz.main(["--e2e", "--streams", "200", "--workers", "2", "--seed", "5",
                      "--timeout", "60", "--crash-dir", str(tmp_path / "crashes")]) == 0
