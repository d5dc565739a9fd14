"""A broker that cannot listen exits non-zero at once with one line (issue 8 item 9)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from brokerproc import BrokerProcess, find_twistd

pytestmark = pytest.mark.interop

TIMEOUT = 30


@pytest.fixture
def busy_port():
    """A loopback port held by a listening socket of this test."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def _mqttd():
    return [sys.executable, "-m", "mqttd.cli"]


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def test_port_in_use_exits_1_with_one_line_and_no_data_dir_lock(tmp_path, busy_port):
    """mqttd run on a busy port: exit 1, one stderr line naming endpoint and cause, and the
    data dir is free for the next broker."""
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    data = tmp_path / "data"
    result = _run(_mqttd() + ["run", "--listen", endpoint, "--persistence", f"file:{data}"],
                  tmp_path)
    assert result.returncode == 1
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines == [f"mqttd: cannot listen on {endpoint}: Address already in use"]
    assert "Traceback" not in result.stdout + result.stderr
    broker = BrokerProcess(tmp_path / "next", persistence=f"file:{data}", kind="mqttd").start()
    try:
        assert broker.running and broker.port
    finally:
        broker.stop()


def test_twistd_foreground_prints_one_line_not_a_traceback(tmp_path, busy_port):
    """twistd -n mqttd on a busy port: exit 1, the one line, no traceback on stderr."""
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    result = _run([find_twistd(), "-n", "--pidfile", "", "mqttd", "--listen", endpoint,
                   "--persistence", "memory"], tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on {endpoint}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_daemonized_twistd_exits_1_naming_endpoint_and_cause(tmp_path, busy_port):
    """Daemonized, the parent exits 1 with the cause from the child's status pipe."""
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    pidfile = tmp_path / "mqttd.pid"
    result = _run([find_twistd(), "--pidfile", str(pidfile), "--logfile",
                   str(tmp_path / "mqttd.log"), "mqttd", "--listen", endpoint,
                   "--persistence", f"file:{tmp_path / 'data'}"], tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on {endpoint}: Address already in use" in result.stderr
    # the parent exits on the child's status report; the child removes its pid
    # file as it exits, which may be a moment later on a loaded machine
    import time
    deadline = time.monotonic() + 10
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()
    log = Path(tmp_path / "mqttd.log").read_text()
    assert f"Cannot listen on {endpoint}: Address already in use" in log


def test_unusable_address_exits_1_after_closing_the_other_listeners(tmp_path):
    """An address this host does not have (TEST-NET-1): exit 1 naming it, even when an
    earlier listener already bound."""
    endpoint = "tcp:0:interface=192.0.2.1"
    result = _run(_mqttd() + ["run", "--listen", "tcp:0:interface=127.0.0.1",
                              "--listen", endpoint, "--persistence", "memory"], tmp_path)
    assert result.returncode == 1
    assert f"mqttd: cannot listen on {endpoint}: " in result.stderr


@pytest.mark.parametrize("how", ["run", "twistd"])
def test_data_directory_in_use_exits_2_with_one_line_before_listening(tmp_path, how):
    """A second broker on a data directory in use: exit 2, one line naming the directory and
    the pid, no traceback, and no listener ever opened (no "MQTT listening")."""
    data = tmp_path / "data"
    first = BrokerProcess(tmp_path / "first", persistence=f"file:{data}", kind="mqttd").start()
    try:
        args = ["--listen", "tcp:0:interface=127.0.0.1", "--persistence", f"file:{data}"]
        if how == "run":
            cmd = _mqttd() + ["run"] + args
        else:
            cmd = [find_twistd(), "-n", "--pidfile", "", "mqttd"] + args
        result = _run(cmd, tmp_path)
        assert result.returncode == 2, (result.stdout, result.stderr)
        output = result.stdout + result.stderr
        assert "Traceback" not in output
        assert "listening" not in output
        assert "broker.restore" not in output          # the embedder's hint is not for twistd users
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("mqttd: cannot open the store: "), lines
        assert str(data) in lines[0] and str(first.pid) in lines[0]
        assert first.running
        if how == "run":   # foreground: no pid file left behind to refuse the next start
            assert not (tmp_path / "twistd.pid").exists()
    finally:
        first.stop()


def test_mqttd_run_writes_no_pid_file_in_the_working_directory(tmp_path):
    """mqttd run is a foreground command: no twistd.pid that a kill -9 would leave to refuse the next start."""
    import signal
    import time
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(_mqttd() + ["run", "--listen", "tcp:0:interface=127.0.0.1",
                                        "--persistence", "memory", "--ready-file", str(ready)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ready.exists(), "broker did not become ready"
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)


def test_out_of_file_descriptors_is_counted_and_logged_rate_limited(tmp_path):
    """RLIMIT_NOFILE 64 and 100 connections: refused ones are a few rate-limited lines, not one Twisted line each; the broker recovers."""
    import resource
    import time
    from mqttd.blockingclient import BlockingClient

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    ready = tmp_path / "ready.json"
    log_path = tmp_path / "broker.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [find_twistd(), "-n", "--pidfile", "", "mqttd", "--listen",
             "tcp:0:interface=127.0.0.1", "--persistence", "memory", "--ready-file", str(ready)],
            cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=low_limit)
    sockets = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        import json
        port = json.loads(ready.read_text())["listeners"][0]["port"]
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            sockets.append(s)
        # the broker hit the limit and said so (bounded wait, not a fixed sleep)
        deadline = time.monotonic() + TIMEOUT
        while "Refused file-descriptors" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, "no refusal line\n" + \
                log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        for s in sockets:
            s.close()
        sockets = []
        # recovered: a client connects once the broker has closed the 100 (bounded retries)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                probe = BlockingClient(port, "after-emfile", level=4)
                break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, "no recovery after the connections closed"
                time.sleep(0.1)
        probe.close()
        text = log_path.read_text(errors="replace")
        assert "EMFILE recovery" not in text
        refusal_lines = [l for l in text.splitlines() if "Refused file-descriptors" in l]
        assert 1 <= len(refusal_lines) <= 4, refusal_lines
        assert "RLIMIT_NOFILE 64" in refusal_lines[0]
    finally:
        for s in sockets:
            s.close()
        proc.terminate()
        proc.wait(TIMEOUT)
