"""What the bench scripts share: start an mqttd on an ephemeral loopback port, stop
it by its own process handle, read its CPU time and RSS from /proc.

    from bench.benchlib import cpu_seconds, start_mqttd, stop_process

Every wait is bounded.  (``bench/run`` has its own launcher for every peer broker.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
#: the twistd of the interpreter running the bench (the project's venv)
TWISTD = str(Path(sys.executable).parent / "twistd")


def start_mqttd(workdir: Path, extra: Iterable[str] = (), broker_root=None,
                persistence: str = "memory", sys_interval: float = 0,
                prefix: Sequence[str] = (), timeout: float = 60.0) -> Tuple[subprocess.Popen, int]:
    """Start ``twistd -n mqttd`` on ``tcp:0`` (127.0.0.1) in ``workdir`` and wait
    (at most ``timeout`` s) for its ready file; returns ``(process, port)``.

    :param extra: more mqttd options.
    :param broker_root: another checkout to measure (put first on PYTHONPATH).
    :param persistence: ``--persistence`` (``memory``, ``file:DIR``...).
    :param sys_interval: ``--sys-interval`` seconds (0: no $SYS).
    :param prefix: command words before twistd (e.g. ``taskset -c 0``).
    :raises RuntimeError: it exited or was not ready in time (see ``broker.log``).
    """
    workdir = Path(workdir)
    ready = workdir / "ready.json"
    cmd = [*prefix, TWISTD, "-n", "--pidfile", "", "mqttd",
           "--listen", "tcp:0:interface=127.0.0.1", "--ready-file", str(ready),
           "--sys-interval", str(sys_interval), "--persistence", persistence, *extra]
    env = dict(os.environ)
    if broker_root:
        env["PYTHONPATH"] = str(broker_root)
    log = open(workdir / "broker.log", "ab")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, env=env)
    log.close()
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise RuntimeError(f"broker did not start; see {workdir / 'broker.log'}")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())["listeners"][0]["port"]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> Optional[int]:
    """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if /proc does not say)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
