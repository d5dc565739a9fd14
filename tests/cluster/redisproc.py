"""Real ``redis-server`` processes for the cluster tests (loopback, ephemeral ports).

``RedisServer`` is one standalone server (``--save '' --appendonly yes`` in
its own directory), ``RedisCluster`` three of them with ``--cluster-enabled
yes`` joined by ``redis-cli --cluster create`` (3 masters, no replicas).
Every wait is bounded; processes are only signalled through their own
``Popen`` handle.  ``redis-server`` cannot report an ephemeral port, so a
free one is picked first (:func:`brokerproc.free_port`: outside the kernel's
ephemeral range) and, when redis-server still finds it taken ("Address already
in use"), the start is retried on new ports (bounded: ``PORT_ATTEMPTS``).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

INTEROP = Path(__file__).resolve().parent.parent / "interop"
if str(INTEROP) not in sys.path:
    sys.path.insert(0, str(INTEROP))

from brokerproc import (  # noqa: E402  (tests/interop/brokerproc.py)
    PORT_ATTEMPTS, READY_TIMEOUT, BrokerStartError, PortInUse, terminate, wait_until_ready)
from brokerproc import free_port as _free_port  # noqa: E402

#: seconds redis-server may take to answer PING (bounded; see READY_TIMEOUT)
START_TIMEOUT = READY_TIMEOUT
STOP_TIMEOUT = 5.0
#: what redis-server logs once it listens
REDIS_READY = "Ready to accept connections"


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries its log tail."""


def find(program: str) -> str:
    found = shutil.which(program) or next(
        (p for p in (f"/usr/bin/{program}", f"/usr/local/bin/{program}") if os.path.exists(p)),
        None)
    if not found:
        raise RedisStartError(f"{program} not installed; run ./dev test (installs redis-server)")
    return found


class RedisPortInUse(RedisStartError):
    """redis-server could not listen: a port was taken meanwhile."""


def free_port(avoid=()) -> int:
    """A free loopback TCP port below 55536 (its +10000 cluster bus port stays
    valid) and not in ``avoid``."""
    return _free_port(avoid=avoid, below=55536)


def cli(port: int, *args: str, timeout: float = 10.0) -> str:
    """``redis-cli -h 127.0.0.1 -p PORT ARGS``: its output (raises on failure)."""
    out = subprocess.run([find("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)}: {out.stderr or out.stdout}")
    return out.stdout


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 in ``workdir``.

    :param appendonly: AOF on (``appendfsync everysec``): a restart keeps the data.
    :param cluster: ``--cluster-enabled yes`` (a node of :class:`RedisCluster`).
    """

    def __init__(self, workdir: Path, appendonly: bool = True, cluster: bool = False,
                 extra_args=()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.cluster = cluster
        self.extra_args = list(extra_args)
        self.port: Optional[int] = None
        self.bus_port: Optional[int] = None
        self.log_path = self.workdir / "redis.log"
        self._proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def command(self) -> List[str]:
        cmd = [find("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "yes" if self.appendonly else "no",
               "--appendfsync", "everysec", "--dir", str(self.workdir),
               "--logfile", str(self.log_path), "--daemonize", "no",
               "--protected-mode", "yes"]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                    "--cluster-config-file", str(self.workdir / "nodes.conf"),
                    "--cluster-node-timeout", "2000"]
        return cmd + self.extra_args

    def start(self, keep_port: bool = False) -> "RedisServer":
        """Start it (again: on the same port when ``keep_port``, e.g. a restart)."""
        if self.running:
            raise RuntimeError(f"redis-server already running (pid {self.pid})")
        attempts = 1 if keep_port and self.port is not None else PORT_ATTEMPTS
        for attempt in range(attempts):
            if not keep_port or self.port is None:
                self.port = free_port()
                self.bus_port = free_port(avoid=(self.port,))
            self._log_start = self._log_size()
            self._proc = subprocess.Popen(self.command(), cwd=str(self.workdir),
                                          stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                self._wait_ready()
                return self
            except RedisPortInUse:
                self.kill()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                self.kill()
                raise
        return self

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _this_start_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        """Until its log says it accepts connections (a PING could be answered by
        another redis-server that took the port); bounded, with its log tail."""
        try:
            wait_until_ready(self._proc, lambda: REDIS_READY in self._this_start_log(),
                             self._this_start_log, f"redis-server on port {self.port}",
                             START_TIMEOUT)
        except PortInUse as error:
            raise RedisPortInUse(str(error)) from None
        except BrokerStartError as error:
            raise RedisStartError(str(error)) from None

    def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """SIGTERM (Redis flushes its AOF), wait, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return None
        terminate(proc, timeout)
        self._proc = None
        return proc.returncode

    def pause(self) -> None:
        """SIGSTOP: Redis stalls (every client's packets wait unanswered)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> Optional[int]:
        """SIGKILL: a crash (AOF ``everysec`` may lose the last second)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        self._proc = None
        return proc.returncode

    def cli(self, *args: str) -> str:
        return cli(self.port, *args)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return "\n".join(text)


class RedisCluster:
    """Three ``redis-server --cluster-enabled yes`` masters joined into one Redis
    Cluster (``redis-cli --cluster create ... --cluster-replicas 0``), waited for
    ``cluster_state:ok`` on every node (bounded)."""

    def __init__(self, workdir: Path, masters: int = 3, extra_args=()):
        self.workdir = Path(workdir)
        self.servers = [RedisServer(self.workdir / f"node{i}", cluster=True,
                                    extra_args=extra_args)
                        for i in range(masters)]

    def server_of(self, key: str) -> RedisServer:
        """The master that serves ``key``'s slot (asked of a running master)."""
        up = next(s for s in self.servers if s.running)
        slot = int(up.cli("CLUSTER", "KEYSLOT", key).strip())
        for line in up.cli("CLUSTER", "NODES").splitlines():
            parts = line.split()
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            for spec in parts[8:]:
                if spec.startswith("["):
                    continue
                low, _, high = spec.partition("-")
                if int(low) <= slot <= int(high or low):
                    return next(s for s in self.servers if s.port == port)
        raise LookupError(f"no master serves slot {slot} of {key!r}")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self) -> "RedisCluster":
        try:
            used = set()
            for server in self.servers:
                server.start()
                used.update((server.port, server.bus_port))
            out = subprocess.run(
                [find("redis-cli"), "--cluster", "create",
                 *[f"127.0.0.1:{s.port}" for s in self.servers],
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=START_TIMEOUT, stdin=subprocess.DEVNULL)
            if out.returncode != 0:
                raise RedisStartError(f"redis-cli --cluster create failed: "
                                      f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for server in self.servers:
                try:
                    info = server.cli("CLUSTER", "INFO")
                except Exception as error:
                    info = str(error)
                states.append("cluster_state:ok" in info)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RedisStartError(f"Redis Cluster not ok after {timeout:.0f}s: {states}")
            time.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class RedisSentinelSet:
    """A Redis primary, one replica and ``sentinels`` Sentinels watching them
    (service ``mymaster``, quorum 1, ``down-after-milliseconds 5000``: no
    failover of their own on a loaded machine), all
    on 127.0.0.1 ephemeral ports.  :meth:`failover` asks a Sentinel to promote
    the replica (``SENTINEL FAILOVER``) and waits (bounded) until every
    Sentinel names the new primary and the old one follows it."""

    SERVICE = "mymaster"

    def __init__(self, workdir: Path, sentinels: int = 2):
        self.workdir = Path(workdir)
        self.primary = RedisServer(self.workdir / "primary")
        self.replica: Optional[RedisServer] = None
        self.sentinel_count = sentinels
        self.sentinels: List[RedisServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.SERVICE}"

    @property
    def servers(self) -> List[RedisServer]:
        return [self.primary] + ([self.replica] if self.replica else [])

    def start(self) -> "RedisSentinelSet":
        try:
            self.primary.start()
            self.replica = RedisServer(self.workdir / "replica", extra_args=[
                "--replicaof", "127.0.0.1", str(self.primary.port)]).start()
            self.wait_replicated(self.primary)
            for i in range(self.sentinel_count):
                self.sentinels.append(_Sentinel(self.workdir / f"sentinel{i}",
                                                self.primary.port, self.SERVICE).start())
            self.wait_sentinels_see_replica()
        except BaseException:
            self.stop()
            raise
        return self

    def primary_port(self, sentinel=None) -> int:
        sentinel = sentinel or self.sentinels[0]
        out = sentinel.cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE).split()
        return int(out[1])

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def wait_replicated(self, primary: RedisServer, timeout: float = 20.0) -> None:
        """Until ``primary`` has a replica whose link is up and in sync."""
        deadline = time.monotonic() + timeout
        while True:
            info = primary.cli("INFO", "replication")
            if "role:master" in info and "connected_slaves:1" in info and \
                    "state=online" in info:
                return
            if time.monotonic() > deadline:
                raise RedisStartError(f"replica not in sync after {timeout:.0f}s:\n{info}")
            time.sleep(0.05)

    def wait_sentinels_see_replica(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            seen = [s.cli("SENTINEL", "REPLICAS", self.SERVICE).strip() != ""
                    for s in self.sentinels]
            if all(seen):
                return
            if time.monotonic() > deadline:
                raise RedisStartError(f"Sentinels do not see the replica after "
                                      f"{timeout:.0f}s: {seen}")
            time.sleep(0.1)

    def failover(self, timeout: float = 30.0) -> RedisServer:
        """Promote the replica; returns the new primary (the old one is then
        its replica, in sync)."""
        old = self.primary_port()
        self.sentinels[0].cli("SENTINEL", "FAILOVER", self.SERVICE)
        deadline = time.monotonic() + timeout
        while True:
            ports = {self.primary_port(s) for s in self.sentinels}
            if len(ports) == 1 and old not in ports:
                new = self.server_on(ports.pop())
                if "role:master" in new.cli("INFO", "replication"):
                    break
            if time.monotonic() > deadline:
                raise RedisStartError(f"failover not done after {timeout:.0f}s: "
                                      f"{ports}\n{self.sentinels[0].log_tail()}")
            time.sleep(0.1)
        self.primary, self.replica = new, self.server_on(old)
        self.wait_replicated(new, timeout=max(1.0, deadline - time.monotonic()))
        return new

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()


class _Sentinel(RedisServer):
    """``redis-server sentinel.conf --sentinel`` (Sentinel rewrites its file)."""

    def __init__(self, workdir: Path, primary_port: int, service: str):
        super().__init__(workdir, appendonly=False)
        self.primary_port = primary_port
        self.service = service

    def _wait_ready(self) -> None:
        """Until its log says it monitors the primary (a Sentinel never logs
        "Ready to accept connections"); bounded, with its log tail."""
        try:
            wait_until_ready(self._proc,
                             lambda: "+monitor master" in self._this_start_log(),
                             self._this_start_log, f"redis-server --sentinel on port {self.port}",
                             START_TIMEOUT)
        except PortInUse as error:
            raise RedisPortInUse(str(error)) from None
        except BrokerStartError as error:
            raise RedisStartError(str(error)) from None

    def command(self) -> List[str]:
        conf = self.workdir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"logfile {self.log_path}\ndaemonize no\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 5000\n"
            f"sentinel failover-timeout {self.service} 10000\n"
            f"sentinel parallel-syncs {self.service} 1\n")
        return [find("redis-server"), str(conf), "--sentinel"]
