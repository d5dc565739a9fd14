"""Real brokers for the bridge interop tests: mosquitto and mqttd subprocesses.

mqttd binds port 0 and reports its port (ready file) unless a test names the
port (a bridge config must name its remote's port before the remote starts,
and meshes are cycles); mosquitto cannot report one, so it gets a
:func:`~brokerproc.free_port` and, when it was not named by the test, is
started again on another port if that one was taken meanwhile.  Every wait is
bounded (:data:`~brokerproc.READY_TIMEOUT` for a start, with the server's log
tail on failure); processes are only signalled through their own handles.
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
from brokerproc import (  # noqa: E402
    MOSQUITTO_RUNNING, PORT_ATTEMPTS, BrokerProcess, PortInUse, find_mosquitto, free_port,
    start_on_free_port, wait_until_ready)

import paho.mqtt.client as paho  # noqa: E402

__all__ = ["Mosquitto", "Mqttd", "Client", "PORT_ATTEMPTS", "PortInUse", "free_port",
           "start_on_free_port", "wait_for"]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


class Mosquitto:
    """mosquitto on ``port`` with ``extra`` lines (bridge sections) in its conf."""

    def __init__(self, workdir: Path, port: int = 0, extra: str = "", persistent: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        #: a port the test named (its peers' configs know it): never changed
        self.fixed_port = port
        self.port = port or None
        self.extra = textwrap.dedent(extra)
        self.persistent = persistent
        self.proc = None
        self.log_path = self.workdir / "mosquitto.log"

    def start(self) -> "Mosquitto":
        """Start it on its named port, or on a free one (another if that was taken)."""
        if self.fixed_port:
            return self._start(self.fixed_port)
        if self.port is not None:
            try:   # a restart: the port its clients know, if it is still free
                return self._start(self.port)
            except PortInUse:
                pass
        return start_on_free_port(self._start)

    def _start(self, port: int) -> "Mosquitto":
        self.port = port
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "log_dest stderr", "log_type all"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")
        if self.persistent:
            data = self.workdir / "data"
            data.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {data}/",
                      "autosave_interval 1"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n" + self.extra + "\n")
        with open(self.log_path, "ab") as log:
            log.write(f"=== start on port {port}\n".encode())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([find_mosquitto() or "mosquitto", "-c", str(conf)],
                                     cwd=str(self.workdir), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_until_ready(self.proc, lambda: MOSQUITTO_RUNNING.search(self._this_start_log()) is not None,
                             self._this_start_log, f"mosquitto on port {port}")
        except BaseException:
            self.stop()
            raise
        return self

    def _this_start_log(self) -> str:
        return self.log().rsplit("=== start on port", 1)[-1][-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Mqttd(BrokerProcess):
    """mqttd with a TOML config (``[[bridge]]`` tables): on port 0 (the port it got
    is read from its ready file), or on ``port`` when a test names it beforehand
    (a mesh: each node's config names the next one's port)."""

    def __init__(self, workdir: Path, broker_id: str, port: int = 0, config: str = "",
                 persistence: str = "file:data"):
        self.fixed_port = port
        super().__init__(workdir, broker_id=broker_id, persistence=persistence, kind="mqttd")
        path = Path(workdir) / "mqttd.toml"
        path.write_text(textwrap.dedent(config))
        self.extra_args = ["--config", str(path), "--sys-interval", "0"]

    def command(self) -> list:
        cmd = super().command()
        if self.fixed_port:
            i = cmd.index("--listen")
            cmd[i + 1] = f"tcp:{self.fixed_port}:interface=127.0.0.1"
        return cmd


class Client:
    """A paho client that records what it receives: ``messages`` is a Queue of
    ``(topic, payload, qos, retain)``."""

    def __init__(self, port: int, client_id: str = "", clean: bool = True, v5: bool = False):
        self.messages: "queue.Queue" = queue.Queue()
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        kwargs = {} if v5 else {"clean_session": clean}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, **kwargs)
        #: (topic, payload, [(name, value)] user properties) of every message (v5)
        self.user_properties: list = []

        def on_message(c, u, m):
            props = getattr(m, "properties", None)
            self.user_properties.append(
                (m.topic, m.payload, list(getattr(props, "UserProperty", None) or [])))
            self.messages.put((m.topic, m.payload, m.qos, bool(m.retain)))
        self.client.on_message = on_message
        self._acked = set()
        self.client.on_publish = lambda c, u, mid, rc, props: self._acked.add(mid)
        self._subacks = []
        self.client.on_subscribe = lambda c, u, mid, codes, props: self._subacks.append(mid)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_for(self.client.is_connected, 10, what=f"client connected to {port}")

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        _rc, mid = self.client.subscribe(topic_filter, qos)
        wait_for(lambda: mid in self._subacks, 10, what=f"SUBACK for {topic_filter}")

    def publish(self, topic: str, payload, qos: int = 1, retain: bool = False,
                user_properties=None) -> None:
        props = None
        if user_properties:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = list(user_properties)
        info = self.client.publish(topic, payload, qos, retain, properties=props)
        if qos:
            wait_for(lambda: info.mid in self._acked, 15, what=f"ack of {topic}")

    def collect(self, count: int, timeout: float = 20.0) -> list:
        """Exactly ``count`` messages (or AssertionError after ``timeout``)."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(got)} of {count} messages: {got[:10]}")
            try:
                got.append(self.messages.get(timeout=left))
            except queue.Empty:
                pass
        return got

    def quiet(self, seconds: float = 1.0) -> list:
        """Whatever else arrives within ``seconds`` (should be nothing)."""
        time.sleep(seconds)
        extra = []
        while not self.messages.empty():
            extra.append(self.messages.get_nowait())
        return extra

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
