"""bench/session_resume.py keeps working (not a performance test: no timed assertions)."""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    path = os.path.join(ROOT, "bench", "session_resume.py")
    spec = importlib.util.spec_from_file_location("session_resume", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_session_resume_bench_measures_reconnects_and_subscribes_in_process(capsys):
    """The in-process mode resumes the session and prints bytes and CPU per operation."""
    bench = _load()
    args = ["--inprocess", "--filters", "1500", "--reconnects", "3", "--subscribes", "3"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "session of 1500 filters" in out
    assert "per reconnect" in out and "per SUBSCRIBE" in out
