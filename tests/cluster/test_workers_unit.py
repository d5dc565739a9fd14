"""mqttd/cluster/workers.py without processes: command lines, port sharing,
the supervisor's restart/backoff/stop rules on a fake process reactor
(the real processes: test_workers.py)."""
from __future__ import annotations

import json
import socket

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mqttd.cluster import workers as W


class FakeProcess:
    def __init__(self, reactor, proto, argv, env, pid):
        self.reactor, self.proto, self.argv, self.env, self.pid = reactor, proto, argv, env, pid
        self.signals = []
        self.alive = True

    def signalProcess(self, name):
        if not self.alive:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def end(self, code=0, sig=None):
        self.alive = False
        self.proto.processEnded(Failure(error.ProcessTerminated(code, sig)))


class ProcessClock(Clock):
    running = True

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.stopped = False

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):
        process = FakeProcess(self, proto, args, env, 1000 + len(self.spawned))
        self.spawned.append(process)
        return process

    def stop(self):
        self.stopped = True


def supervisor(tmp_path, count=2, ready_file=True):
    reactor = ProcessClock()
    ready = {k: str(tmp_path / f"r.w{k}") for k in range(1, count + 1)}
    sup = W.Supervisor(reactor, count, lambda k: (["/bin/worker", str(k)], {"K": str(k)}),
                       {k: f"n-w{k}" for k in range(1, count + 1)}, ready,
                       ready_file=str(tmp_path / "ready.json") if ready_file else None)
    return reactor, sup


def make_ready(process, sup, index):
    with open(sup.workers[index - 1].ready_file, "w") as f:
        json.dump({"pid": process.pid, "listeners": [{"host": "127.0.0.1", "port": 1}]}, f)


def start_all(tmp_path, count=2):
    reactor, sup = supervisor(tmp_path, count)
    sup.startService()
    for k, process in enumerate(reactor.spawned, 1):
        make_ready(process, sup, k)
    reactor.advance(W.POLL_INTERVAL)
    return reactor, sup


def test_worker_node_ids_and_stores_are_per_worker():
    """<node-id>-w<k>; a file or dbm store gets its own directory per worker."""
    assert W.worker_node_id("edge", 3) == "edge-w3"
    assert W.worker_persistence("file:/var/lib/mqttd/", 2) == "file:/var/lib/mqttd-w2"
    assert W.worker_persistence("dbm:data", 1) == "dbm:data-w1"
    assert W.worker_persistence("memory", 1) == "memory"
    assert W.worker_persistence(None, 1) is None


def test_worker_arguments_replace_what_the_supervisor_decides():
    """--workers, --node-id, --listen/--port, --ready-file and --persistence are the supervisor's."""
    raw = ["--cluster", "redis://h:1", "--workers", "4", "--node-id=n", "-p", "1883",
           "--listen", "tcp:1884", "--ready-file", "r.json", "--persistence", "file:d",
           "--max-qos", "1", "-p1885", "--workers=3"]
    args = W.worker_arguments(raw, 2, "n", ["tcp:40000"], "r.json.w2", "file:d")
    assert args == ["--cluster", "redis://h:1", "--max-qos", "1",
                    "--node-id", "n-w2", "--ready-file", "r.json.w2",
                    "--listen", "tcp:40000", "--persistence", "file:d-w2"]


def test_workers_log_to_syslog_when_the_supervisor_does():
    """`twistd --syslog --prefix P mqttd --workers N`: each worker's twistd gets --syslog
    and the prefix too (it used to log to the supervisor's stdout instead)."""
    assert W._twistd_arguments({"syslog": True, "prefix": "mqttd-edge", "reactor": "epoll"}) == [
        "--reactor=epoll", "--syslog", "--prefix=mqttd-edge"]
    assert W._twistd_arguments({"syslog": False, "prefix": "twisted"}) == []
    assert W._twistd_arguments(None) == []


def test_ephemeral_ports_are_resolved_once_and_held():
    """tcp:0 becomes one real port for every worker, reserved by a socket that never listens."""
    held = []
    try:
        out = W.resolve_ephemeral_ports(
            ["tcp:0:interface=127.0.0.1", "ws:port=0:interface=127.0.0.1",
             "haproxy:tcp:0:interface=127.0.0.1", "tcp:1883", "unix:/tmp/x.sock"], held)
        assert len(held) == 3
        ports = [s.getsockname()[1] for s in held]
        assert out[0] == f"tcp:{ports[0]}:interface=127.0.0.1"
        assert out[1] == f"ws:port={ports[1]}:interface=127.0.0.1"
        assert out[2] == f"haproxy:tcp:{ports[2]}:interface=127.0.0.1"
        assert out[3:] == ["tcp:1883", "unix:/tmp/x.sock"]
        # another SO_REUSEPORT socket (a worker's) can listen on the reserved port
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", ports[0]))
        other.listen(1)
        other.close()
    finally:
        for s in held:
            s.close()


def test_supervisor_starts_each_worker_with_its_command_and_reports_ready(tmp_path):
    """The ready file appears once every worker wrote its own, with each worker's pid."""
    reactor, sup = supervisor(tmp_path)
    sup.startService()
    assert [p.argv for p in reactor.spawned] == [["/bin/worker", "1"], ["/bin/worker", "2"]]
    make_ready(reactor.spawned[0], sup, 1)
    reactor.advance(W.POLL_INTERVAL)
    assert not (tmp_path / "ready.json").exists()
    make_ready(reactor.spawned[1], sup, 2)
    reactor.advance(W.POLL_INTERVAL)
    info = json.loads((tmp_path / "ready.json").read_text())
    assert [(w["index"], w["pid"], w["node_id"]) for w in info["workers"]] == [
        (1, 1000, "n-w1"), (2, 1001, "n-w2")]
    assert info["listeners"] == [{"host": "127.0.0.1", "port": 1}]


def test_crashed_worker_is_restarted_with_growing_backoff(tmp_path):
    """kill -9 of a worker: restarted after 0.5 s, then 1 s, ...; the others are untouched."""
    reactor, sup = start_all(tmp_path)
    first = reactor.spawned[0]
    first.end(sig=9)
    assert len(reactor.spawned) == 2
    reactor.advance(W.BACKOFF_FIRST)
    assert len(reactor.spawned) == 3 and reactor.spawned[2].argv == ["/bin/worker", "1"]
    make_ready(reactor.spawned[2], sup, 1)
    reactor.advance(W.POLL_INTERVAL)
    info = json.loads((tmp_path / "ready.json").read_text())
    assert info["workers"][0]["pid"] == reactor.spawned[2].pid
    assert info["workers"][0]["restarts"] == 1
    reactor.spawned[2].end(code=1)
    reactor.advance(W.BACKOFF_FIRST)
    assert len(reactor.spawned) == 3          # the second delay is longer
    reactor.advance(W.BACKOFF_FIRST)
    assert len(reactor.spawned) == 4
    assert reactor.spawned[1].signals == []


def test_backoff_resets_after_a_stable_run(tmp_path):
    """A worker that stayed up STABLE_AFTER seconds restarts after the first delay again."""
    reactor, sup = start_all(tmp_path)
    sup.workers[0].backoff = W.BACKOFF_MAX
    reactor.advance(W.STABLE_AFTER)
    reactor.spawned[0].end(sig=9)
    reactor.advance(W.BACKOFF_FIRST)
    assert len(reactor.spawned) == 3


def test_worker_that_never_starts_stops_everything(tmp_path):
    """A bad configuration is no restart loop: the supervisor stops the reactor."""
    reactor, sup = supervisor(tmp_path)
    sup.startService()
    reactor.spawned[0].end(code=2)
    assert reactor.stopped and sup.failed
    reactor.advance(W.BACKOFF_MAX)
    assert len(reactor.spawned) == 2


def test_worker_not_ready_in_time_stops_everything(tmp_path):
    """A worker hanging at start is not waited for forever."""
    reactor, sup = supervisor(tmp_path)
    sup.ready_timeout = 5
    sup.startService()
    make_ready(reactor.spawned[0], sup, 1)
    for _ in range(60):
        reactor.advance(W.POLL_INTERVAL)
    assert reactor.stopped


def test_stop_terminates_every_worker_and_waits_for_them(tmp_path):
    """SIGTERM to each, done when the last exited; no restart while stopping."""
    reactor, sup = start_all(tmp_path)
    done = []
    sup.stopService().addCallback(done.append)
    assert [p.signals for p in reactor.spawned] == [["TERM"], ["TERM"]]
    reactor.spawned[0].end(code=0)
    reactor.advance(W.BACKOFF_MAX)
    assert done == [] and len(reactor.spawned) == 2
    reactor.spawned[1].end(code=0)
    assert done == [None]
    assert not (tmp_path / "ready.json").exists()


def test_stop_kills_a_worker_that_does_not_exit(tmp_path):
    """After stop_timeout the rest get SIGKILL."""
    reactor, sup = start_all(tmp_path)
    sup.stopService()
    reactor.spawned[0].end(code=0)
    reactor.advance(sup.stop_timeout)
    assert reactor.spawned[1].signals == ["TERM", "KILL"]


def test_stop_during_a_restart_delay_cancels_the_restart(tmp_path):
    """A worker waiting to be restarted is not started by a stopping supervisor."""
    reactor, sup = start_all(tmp_path)
    reactor.spawned[0].end(sig=9)
    done = []
    sup.stopService().addCallback(done.append)
    reactor.spawned[1].end(code=0)
    assert done == [None]
    reactor.advance(W.BACKOFF_MAX)
    assert len(reactor.spawned) == 2


def test_reload_passes_sighup_on(tmp_path):
    """SIGHUP to the supervisor reaches every worker."""
    reactor, sup = start_all(tmp_path)
    assert sup.reload() == {1: True, 2: True}
    assert [p.signals for p in reactor.spawned] == [["HUP"], ["HUP"]]


def test_workers_without_cluster_are_refused():
    """Separate brokers on one port would not see each other's clients: a one-line error."""
    from mqttd.options import ConfigError
    from mqttd.tap import Options
    with pytest.raises(ConfigError, match="--workers: needs --cluster"):
        Options().parseOptions(["--workers", "2", "--persistence", "memory"])
    Options().parseOptions(["--workers", "1", "--persistence", "memory"])


def test_worker_environment_is_recognised(monkeypatch):
    """MQTTD_WORKER=<k>:<supervisor pid> marks a worker; anything else is none."""
    monkeypatch.setenv(W.WORKER_ENV, "3:77")
    assert W.worker_env() == (3, 77)
    monkeypatch.setenv(W.WORKER_ENV, "x")
    assert W.worker_env() is None
    monkeypatch.delenv(W.WORKER_ENV)
    assert W.prepare_worker() is None


def test_worker_whose_supervisor_is_gone_exits(monkeypatch):
    """A worker started for a supervisor that already died does not run unsupervised."""
    import os
    monkeypatch.setattr(W, "_set_parent_death_signal", lambda: None)  # not on pytest itself
    monkeypatch.setenv(W.WORKER_ENV, f"1:{os.getppid() + 100000}")
    with pytest.raises(SystemExit, match="supervisor"):
        W.prepare_worker()


def test_tcp_addresses_of_listener_descriptions():
    """Which (interface, port) each listener kind binds: the sockets an inheriting
    supervisor opens; unix and other kinds none."""
    assert W.tcp_address("tcp:1883") == ("", 1883)
    assert W.tcp_address("tcp:port=1883:interface=127.0.0.1") == ("127.0.0.1", 1883)
    assert W.tcp_address("haproxy:tcp:1884:interface=127.0.0.1") == ("127.0.0.1", 1884)
    assert W.tcp_address("mqtts:8883:privateKey=k.pem:interface=\\:\\:1") == ("::1", 8883)
    assert W.tcp_address("ws:9001:path=/mqtt") == ("", 9001)
    assert W.tcp_address("unix:/run/mqttd.sock") is None


def test_inherited_sockets_are_named_in_the_environment_and_adopted_by_the_listener():
    """The worker's TCP listener on an inherited (interface, port) takes the descriptor
    instead of binding (a second bind would fail: the supervisor holds the port)."""
    reservations = []
    opened = W.open_listening_sockets(["tcp:0:interface=127.0.0.1"], reservations)
    assert opened == []                     # port 0 is resolved first, never inherited
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()
    opened = W.open_listening_sockets([f"tcp:{port}:interface=127.0.0.1",
                                       f"ws:{port}:interface=127.0.0.1"], reservations)
    try:
        assert [(i, p) for i, p, _s in opened] == [("127.0.0.1", port)]
        fd = opened[0][2].fileno()
        env = f"{fd}=127.0.0.1|{port}"
        assert W.parse_sockets_env(env) == {("127.0.0.1", port): fd}
        from twisted.internet import tcp
        from twisted.internet.protocol import Factory
        saved, shared = tcp.Port.startListening, W._shared
        W._shared = False
        try:
            W.inherit_tcp_ports(W.parse_sockets_env(env))
            listener = tcp.Port(port, Factory(), interface="127.0.0.1", reactor=Clock())
            listener.startReading = lambda: None
            listener.startListening()
            assert listener.socket.getsockname() == ("127.0.0.1", port)
            listener.socket.close()
        finally:
            tcp.Port.startListening, W._shared = saved, shared
    finally:
        for sock in reservations:
            sock.close()
