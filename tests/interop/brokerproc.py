"""Run a real broker as a subprocess for the interop tests.

``BrokerProcess`` starts ``twistd -n mqttd`` on an ephemeral loopback port and
learns the port from mqttd's ``--ready-file`` (a JSON document written
atomically once every listener is up)::

    {"pid": N, "broker_id": "...",
     "listeners": [{"endpoint": "...", "host": "127.0.0.1", "port": P}]}

Development-only switch: with ``MQTTD_INTEROP_BROKER=mosquitto`` in the
environment the same class starts ``mosquitto`` instead (on a free port picked
beforehand, with a generated config) and writes the ready file itself. That
exists to check the client side of the interop tests against a known-good
broker; mosquitto does not publish mqttd's ``$SYS`` topics, so the tests marked
``mqttd_only`` are skipped under it.

Every wait here is bounded; processes are only ever signalled through their
own ``Popen`` handle.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

BROKER_ENV = "MQTTD_INTEROP_BROKER"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class BrokerStartError(RuntimeError):
    """The broker did not become ready; the message carries its log tail."""


def broker_kind() -> str:
    """Which broker the interop tests run against: ``mqttd`` or ``mosquitto``."""
    kind = os.environ.get(BROKER_ENV, "mqttd").strip().lower() or "mqttd"
    if kind not in ("mqttd", "mosquitto"):
        raise ValueError(f"{BROKER_ENV} must be 'mqttd' or 'mosquitto', not {kind!r}")
    return kind


def find_twistd() -> str:
    """The ``twistd`` of the interpreter running the tests (the project venv)."""
    candidate = Path(sys.executable).parent / "twistd"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("twistd")
    if found:
        return found
    raise FileNotFoundError("twistd not found next to %s nor on PATH; run ./dev test" % sys.executable)


def find_mosquitto() -> Optional[str]:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port (only for mosquitto, which cannot report one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BrokerProcess:
    """One broker subprocess, run in its own working directory.

    ``persistence`` is mqttd's ``--persistence`` value (``memory`` or
    ``file:DIR``); ``extra_args`` are appended to the mqttd options.
    """

    def __init__(
        self,
        workdir: Path,
        broker_id: str = "mqttd-interop",
        persistence: str = "memory",
        extra_args: Sequence[str] = (),
        kind: Optional[str] = None,
        ready_timeout: float = READY_TIMEOUT,
        env: Optional[dict] = None,
    ) -> None:
        #: extra environment variables for the broker process
        self.env = dict(env or {})
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker_id = broker_id
        self.persistence = persistence
        self.extra_args = list(extra_args)
        self.kind = kind or broker_kind()
        self.ready_timeout = ready_timeout
        self.ready_file = self.workdir / "ready.json"
        self.log_path = self.workdir / "broker.log"
        self.ready: Optional[dict] = None
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self.starts = 0
        self._proc: Optional[subprocess.Popen] = None
        self._log = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll() if self._proc else None

    def command(self) -> list:
        if self.kind == "mosquitto":
            return [find_mosquitto() or "mosquitto", "-c", str(self._write_mosquitto_conf())]
        return [
            find_twistd(), "-n", "--pidfile", "",
            "mqttd",
            "--listen", "tcp:0:interface=127.0.0.1",
            # persistence None: mqttd's default store (./mqttd-data in workdir)
            *(["--persistence", self.persistence] if self.persistence else []),
            "--broker-id", self.broker_id,
            "--ready-file", str(self.ready_file),
            *self.extra_args,
        ]

    def start(self) -> "BrokerProcess":
        if self.running:
            raise RuntimeError("broker already running (pid %s)" % self.pid)
        if self.kind == "mosquitto" and not find_mosquitto():
            raise BrokerStartError("mosquitto not installed; run ./dev test")
        try:
            self.ready_file.unlink()
        except FileNotFoundError:
            pass
        self.starts += 1
        cmd = self.command()
        self._log = open(self.log_path, "ab", buffering=0)
        self._log.write(("\n=== start #%d: %s\n" % (self.starts, " ".join(map(repr, cmd)))).encode())
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self._proc = subprocess.Popen(
            cmd,
            cwd=str(self.workdir),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            if self.kind == "mosquitto":
                self._wait_mosquitto_ready()
            self._wait_ready_file()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._note("did not exit %.1fs after SIGTERM; sending SIGKILL" % timeout)
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        return self._finish()

    def signal(self, signum: int) -> None:
        """Send ``signum`` (e.g. SIGHUP) to the running broker through its own handle."""
        if not self.running:
            raise RuntimeError("broker not running")
        self._proc.send_signal(signum)

    def kill(self) -> Optional[int]:
        """SIGKILL: a crash, as far as the broker can tell."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        return self._finish()

    def restart(self, kill: bool = False) -> "BrokerProcess":
        """Stop (or kill) and start again with the same data dir and arguments."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def _finish(self) -> Optional[int]:
        rc = self._proc.returncode if self._proc else None
        self._note("exited with %s" % rc)
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    # -- readiness ---------------------------------------------------------

    def _wait_ready_file(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.ready_file.exists():
                try:
                    info = json.loads(self.ready_file.read_text())
                except (OSError, ValueError):
                    info = None  # mqttd writes atomically; mosquitto mode too. Retry anyway.
                if info is not None:
                    self._take_ready(info)
                    return
            rc = self._proc.poll()
            if rc is not None:
                raise BrokerStartError(
                    "%s exited with %s before it was ready\n%s" % (self.kind, rc, self.log_tail())
                )
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    "%s not ready after %.0fs (no %s)\n%s"
                    % (self.kind, self.ready_timeout, self.ready_file, self.log_tail())
                )
            time.sleep(0.02)

    def _take_ready(self, info: dict) -> None:
        try:
            listener = info["listeners"][0]
            host, port = listener["host"], int(listener["port"])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BrokerStartError("malformed ready file %r: %s\n%s" % (info, e, self.log_tail()))
        self.ready = info
        self.host = host
        self.port = port

    # -- mosquitto development mode ---------------------------------------

    def _write_mosquitto_conf(self) -> Path:
        self._mosquitto_port = free_port()
        lines = [
            "listener %d 127.0.0.1" % self._mosquitto_port,
            "allow_anonymous true",
            "log_dest stderr",
            "log_type all",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto and cannot write our dirs
        if self.persistence.startswith("file:"):
            data = Path(self.persistence[len("file:"):])
            if not data.is_absolute():
                data = self.workdir / data
            data.mkdir(parents=True, exist_ok=True)
            lines += ["persistence true", "persistence_location %s/" % data, "autosave_interval 1"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _wait_mosquitto_ready(self) -> None:
        port = self._mosquitto_port
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc.poll() is not None:
                raise BrokerStartError(
                    "mosquitto exited with %s\n%s" % (self._proc.returncode, self.log_tail())
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerStartError("mosquitto not listening on %d\n%s" % (port, self.log_tail()))
                time.sleep(0.02)
        info = {
            "pid": self._proc.pid,
            "broker_id": self.broker_id,
            "listeners": [{"endpoint": "tcp:%d:interface=127.0.0.1" % port,
                           "host": "127.0.0.1", "port": port}],
        }
        tmp = self.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.ready_file)

    # -- diagnostics -------------------------------------------------------

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._log.write(("=== %s\n" % text).encode())

    def log_tail(self, lines: int = 60) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no broker log at %s)" % self.log_path
        tail = data.decode("utf-8", "replace").splitlines()[-lines:]
        return "--- last %d lines of %s ---\n%s" % (len(tail), self.log_path, "\n".join(tail))

    def __repr__(self) -> str:
        return "<BrokerProcess %s id=%s pid=%s %s:%s>" % (
            self.kind, self.broker_id, self.pid, self.host, self.port)
