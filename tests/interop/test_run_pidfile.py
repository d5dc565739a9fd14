"""``mqttd run``: no stray ./twistd.pid, and a pid file that survives kill -9 (REVIEW finding 11)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.interop

TIMEOUT = 30
#: a SIGTERMed twistd ends by re-raising the signal
STOPPED = (0, -signal.SIGTERM)


def _start(tmp_path, name, *extra):
    """``mqttd run`` in ``tmp_path`` on an ephemeral loopback port; waits for its ready file."""
    ready = tmp_path / f"{name}.ready.json"
    log = open(tmp_path / f"{name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqttd.cli", "run", "--listen", "tcp:0:interface=127.0.0.1",
         "--persistence", "memory", "--sys-interval", "0", "--ready-file", str(ready), *extra],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + TIMEOUT
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(TIMEOUT)
            pytest.fail(f"mqttd run {name} did not start:\n"
                        + (tmp_path / f"{name}.log").read_text())
        time.sleep(0.05)
    json.loads(ready.read_text())
    return proc


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)


def test_mqttd_run_writes_no_pid_file_into_the_working_directory(tmp_path):
    """A foreground broker leaves no ./twistd.pid that could refuse the next start."""
    proc = _start(tmp_path, "first")
    try:
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        proc.kill()  # not reaped yet: the dead broker is a zombie with a live pid
        second = _start(tmp_path, "second")
        proc.wait(TIMEOUT)
        _stop(second)
    assert second.returncode in STOPPED


def test_pid_file_left_by_kill_9_does_not_refuse_the_restart(tmp_path):
    """--pidfile: after kill -9 (pid still a zombie) the next broker takes the file over;
    a second broker while one runs is refused with one line naming the running pid."""
    pidfile = tmp_path / "run" / "mqttd.pid"
    pidfile.parent.mkdir()
    first = _start(tmp_path, "first", "--pidfile", str(pidfile))
    try:
        assert pidfile.read_text() == f"{first.pid}\n"
        busy = subprocess.run(
            [sys.executable, "-m", "mqttd.cli", "run", "--pidfile", str(pidfile), "--listen",
             "tcp:0:interface=127.0.0.1", "--persistence", "memory"],
            cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
        assert busy.returncode == 1
        assert busy.stderr.splitlines() == [
            f"mqttd: pid file {pidfile} is held by running pid {first.pid} (another broker?)"]
        first.send_signal(signal.SIGKILL)
        time.sleep(0.2)
        os.kill(first.pid, 0)  # unreaped: to kill(pid, 0) the dead broker still "runs"
        second = _start(tmp_path, "second", f"--pidfile={pidfile}")
    finally:
        first.kill()
        first.wait(TIMEOUT)
    try:
        assert pidfile.read_text() == f"{second.pid}\n"
        assert "taken over" in (tmp_path / "second.log").read_text()
    finally:
        _stop(second)
    assert second.returncode in STOPPED
    assert not pidfile.exists()  # a clean stop removes it
