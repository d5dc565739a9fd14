"""Run a real broker as a subprocess for the interop tests.

``BrokerProcess`` starts ``twistd -n mqttd`` on an ephemeral loopback port and
learns the port from mqttd's ``--ready-file`` (a JSON document written
atomically once every listener is up)::

    {"pid": N, "broker_id": "...",
     "listeners": [{"endpoint": "...", "host": "127.0.0.1", "port": P}]}

Development-only switch: with ``MQTTD_INTEROP_BROKER=mosquitto`` in the
environment the same class starts ``mosquitto`` instead (on a free port picked
beforehand, with a generated config; started again on another port if that
one was taken meanwhile) and writes the ready file itself. That
exists to check the client side of the interop tests against a known-good
broker; mosquitto does not publish mqttd's ``$SYS`` topics, so the tests marked
``mqttd_only`` are skipped under it.

Every wait here is bounded; processes are only ever signalled through their
own ``Popen`` handle.

Ports, under load (a 2-core CI machine running several suites): mqttd always
binds port 0 and reports the port it got (its ready file), so it never races
another process for a port.  A server that cannot report its port (mosquitto,
redis-server, Prometheus) or whose port must be known before it starts (a
bridge peer named in another broker's config) gets one from :func:`free_port`,
which picks outside the kernel's ephemeral range, where no ``bind(0)`` and no
outgoing connection is given it meanwhile; and :func:`start_on_free_port`
starts such a server again on another port when it still finds its port taken
(bounded: :data:`PORT_ATTEMPTS`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

BROKER_ENV = "MQTTD_INTEROP_BROKER"
#: seconds a spawned server may take to be ready: generous, since a loaded
#: 2-core machine starts a Python process slowly, but bounded (a failure then
#: says so with the server's log tail)
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
#: starts of a server on a fresh port after "address already in use"
PORT_ATTEMPTS = 5
#: what servers print when their port is taken (Linux strerror, Go's net
#: package, Twisted's CannotListenError as mqttd reports it)
ADDRESS_IN_USE = ("address already in use", "cannot listen on")

#: what mosquitto logs once every listener is open (``log_type all``)
MOSQUITTO_RUNNING = re.compile(r"mosquitto version \S+ running")

T = TypeVar("T")


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


class PortInUse(BrokerStartError):
    """A server could not listen: its port was taken meanwhile (retry elsewhere)."""


def address_in_use(text: str) -> bool:
    """Does a server's output say its port was already in use?"""
    text = text.lower()
    return any(marker in text for marker in ADDRESS_IN_USE)


def _ephemeral_range() -> tuple:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999   # Linux's default


def terminate(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT,
              on_kill: Optional[Callable[[], None]] = None) -> Optional[int]:
    """SIGTERM ``proc`` (if it still runs), wait up to ``timeout`` s, then SIGKILL
    (``on_kill()`` first) and wait up to :data:`STOP_TIMEOUT`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill()
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    return proc.returncode


def free_port(host: str = "127.0.0.1", avoid=(), below: int = 65536) -> int:
    """A TCP port free now, for a server that cannot report the port it got or
    whose port must be known before it starts.

    Picked at random outside the kernel's ephemeral port range (from 10000 up
    to it, or above it), so no ``bind(0)`` and no outgoing connection of this
    machine is handed it before the server binds it; only another test that
    picked the same number can take it (:func:`start_on_free_port` then
    starts the server again elsewhere).  ``avoid``: ports not to return;
    ``below``: an exclusive upper bound (redis cluster: its bus port is +10000).
    """
    low, high = _ephemeral_range()
    candidates = [r for r in (range(10000, min(low, below)), range(high + 1, below)) if len(r)]
    rng = random.SystemRandom()
    for _ in range(200):
        if candidates:
            port = rng.choice(rng.choice(candidates))
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        if port in avoid or port >= below:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP port found in 200 tries")


def wait_until_ready(proc: subprocess.Popen, is_ready: Callable[[], bool],
                     this_start_log: Callable[[], str], what: str,
                     timeout: float = READY_TIMEOUT) -> None:
    """Wait (bounded) until ``is_ready()``.  The process exiting first raises
    :class:`PortInUse` when ``this_start_log()`` says its port was taken, else
    :class:`BrokerStartError`; so does the timeout.  Both carry the log's tail.

    ``is_ready`` should be the server's own word (a log line), not a successful
    connect: another server that took the port would answer a connect too."""
    deadline = time.monotonic() + timeout
    while True:
        if is_ready():
            if proc.poll() is None:
                return
        if proc.poll() is not None:
            text = this_start_log()
            error = PortInUse if address_in_use(text) else BrokerStartError
            raise error("%s exited with %s before it was ready\n--- its log ---\n%s"
                        % (what, proc.returncode, text[-4000:]))
        if time.monotonic() > deadline:
            raise BrokerStartError("%s not ready after %.0f s\n--- its log ---\n%s"
                                   % (what, timeout, this_start_log()[-4000:]))
        time.sleep(0.02)


def start_on_free_port(start: Callable[[int], T], attempts: int = PORT_ATTEMPTS,
                       avoid=()) -> T:
    """``start(port)`` on a :func:`free_port`; when it raises :class:`PortInUse`
    (the port was taken between the pick and the bind), again on another one,
    at most ``attempts`` times.  Returns what ``start`` returned."""
    tried = []
    for _ in range(attempts):
        port = free_port(avoid=tuple(avoid) + tuple(tried))
        tried.append(port)
        try:
            return start(port)
        except PortInUse:
            continue
    raise PortInUse(f"ports {tried} were all taken before the server could listen")


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
        if self.kind == "mosquitto":
            # it cannot report a port: one picked first, another if it was taken
            return start_on_free_port(self._start)
        return self._start(None)

    def _start(self, port: Optional[int]) -> "BrokerProcess":
        self._mosquitto_port = port
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
        terminate(proc, timeout, lambda: self._note(
            "did not exit %.1fs after SIGTERM; sending SIGKILL" % timeout))
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
                if address_in_use(self._this_start_log()):   # a port named by the test
                    raise PortInUse("%s could not listen: port taken\n%s"
                                    % (self.kind, self.log_tail()))
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
        # its own word, not a connect: another server on a taken port would answer
        wait_until_ready(self._proc, lambda: MOSQUITTO_RUNNING.search(self._this_start_log()) is not None,
                         self._this_start_log, "mosquitto on port %d" % port,
                         self.ready_timeout)
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

    def _this_start_log(self) -> str:
        """The log of the latest start only."""
        try:
            data = self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""
        return data.rsplit("\n=== start #", 1)[-1]

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
