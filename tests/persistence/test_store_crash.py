"""SIGKILL a process that drives a store mid-write: every acknowledged op survives."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from .storehelpers import StoreMaker, result_of

WRITER = os.path.join(os.path.dirname(__file__), "crash_writer.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_and_kill(kind, path, kill_after, timeout=30.0):
    """Start the writer, SIGKILL it after ``kill_after`` acknowledged seqs; return all seqs."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, WRITER, kind, path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    acked, buffer = [], b""
    deadline = time.monotonic() + timeout
    try:
        while len(acked) < kill_after:
            assert time.monotonic() < deadline, f"writer too slow: {len(acked)} acks"
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                assert proc.poll() is None, proc.stderr.read().decode()
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, proc.stderr.read().decode()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            acked += [int(line) for line in lines]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # printed before the kill but not read yet: acknowledged too
        rest = (buffer + proc.stdout.read()).split(b"\n")
        acked += [int(line) for line in rest[:-1]]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return acked


@pytest.mark.parametrize("kill_after", [800, 5000])
@pytest.mark.parametrize("kind", ["file", "dbm"])
def test_every_synced_op_survives_sigkill(kind, kill_after, tmp_path):
    """What a sync() acknowledged before a SIGKILL is there after reopening."""
    path = str(tmp_path / "data")
    acked = run_and_kill(kind, path, kill_after)
    assert len(acked) >= kill_after
    assert acked == sorted(acked)                   # sync order = request order
    maker = StoreMaker(kind, path)
    store = maker()
    state = store.open()
    stored = state.sessions["crash"].outbound
    missing = sorted(set(acked) - set(stored))
    assert not missing, f"{len(missing)} acknowledged ops lost, first {missing[:10]}"
    assert list(stored) == list(range(len(stored)))  # a prefix, in order, no gaps
    assert all(stored[s].message.payload == b"%064d" % s for s in acked)
    result_of(store.close())
