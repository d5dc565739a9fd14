"""``twistd mqttd --cluster URL --workers 2`` with real processes (issue 10, all
cores of one machine): clients land on both workers, messages cross workers,
SIGTERM stops everything, a killed worker comes back."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from mqttd.blockingclient import BlockingClient
from mqttd.codec.packets import Disconnect, Publish, Subscribe, Subscription

INTEROP = Path(__file__).resolve().parent.parent / "interop"
if str(INTEROP) not in sys.path:
    sys.path.insert(0, str(INTEROP))

from brokerproc import BrokerProcess  # noqa: E402

pytestmark = [pytest.mark.interop, pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to see which worker holds a socket")]

TIMEOUT = 20.0


@pytest.fixture
def workers(redis_server, tmp_path):
    """A supervisor with 2 workers on one ephemeral port; stopped at teardown."""
    proc = BrokerProcess(tmp_path / "sup", broker_id="wk", ready_timeout=60,
                         extra_args=["--cluster", redis_server.url, "--node-id", "wk",
                                     "--workers", "2", "--sys-interval", "0"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop(timeout=30)


def ready_info(proc) -> dict:
    return json.loads(proc.ready_file.read_text())


def worker_pids(proc) -> dict:
    return {w["index"]: w["pid"] for w in ready_info(proc)["workers"]}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False


def socket_inodes(pid: int) -> set:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def owner_of(client, pids) -> int:
    """The worker pid holding the server side of ``client``'s connection."""
    client_port = client.sock.getsockname()[1]
    server_port = client.sock.getpeername()[1]
    deadline = time.monotonic() + TIMEOUT
    while True:
        inodes = set()
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].split(":")[1], 16)
                remote_port = int(fields[2].split(":")[1], 16)
                if local_port == server_port and remote_port == client_port:
                    inodes.add(fields[9])
        for pid in pids:
            if inodes & socket_inodes(pid):
                return pid
        if time.monotonic() > deadline:
            raise AssertionError(f"no worker holds the connection from port {client_port}")
        time.sleep(0.05)


def test_clients_land_on_both_workers_and_retained_messages_cross_them(workers):
    """SO_REUSEPORT spreads connections; a retained message taken by one worker reaches a client of the other."""
    pids = worker_pids(workers)
    clients = [BlockingClient(workers.port, f"c{i}", level=5, timeout=TIMEOUT)
               for i in range(16)]
    try:
        owners = {}
        for client in clients:
            owners.setdefault(owner_of(client, pids.values()),
                              []).append(client)
        assert set(owners) == set(pids.values()), "every connection landed on one worker"
        first, second = (owners[pids[1]][0], owners[pids[2]][0])
        # retained: published on worker 1, replayed on worker 2
        first.send(Publish("wk/retained", b"r", 1, True, packet_id=1))
        first.next_packet(TIMEOUT)                                  # PUBACK
        second.send(Subscribe(1, (Subscription("wk/#", 1),)))
        got = [second.next_packet(TIMEOUT) for _ in range(2)]      # SUBACK, PUBLISH
        assert [(p.topic, p.payload, p.retain) for p in got if isinstance(p, Publish)] == [
            ("wk/retained", b"r", True)]
    finally:
        for client in clients:
            client.sock.close()


def on_two_workers(proc, prefix):
    """A v5 client on worker 1 and one on worker 2 (others closed)."""
    pids = worker_pids(proc)
    found = {}
    spare = []
    for i in range(64):
        client = BlockingClient(proc.port, f"{prefix}{i}", level=5, timeout=TIMEOUT)
        pid = owner_of(client, pids.values())
        if pid in found:
            spare.append(client)
        else:
            found[pid] = client
        if len(found) == 2:
            break
    for client in spare:
        client.sock.close()
    assert len(found) == 2, "64 connections all landed on one worker"
    return found[pids[1]], found[pids[2]]


@pytest.mark.skipif(importlib.util.find_spec("mqttd.cluster.bus") is None,
                    reason="the cross-node bus (mqttd.cluster.bus) is not there yet")
def test_a_live_message_crosses_workers(workers):
    """A subscriber on worker 2 gets what a client of worker 1 publishes (the cluster bus)."""
    first, second = on_two_workers(workers, "live")
    try:
        second.send(Subscribe(1, (Subscription("wk/#", 1),)))
        second.next_packet(TIMEOUT)                                 # SUBACK
        deadline = time.monotonic() + TIMEOUT
        received = None
        n = 0
        while received is None and time.monotonic() < deadline:
            n += 1   # the route may take a moment to reach worker 1
            first.send(Publish("wk/live", b"%d" % n, 0))
            try:
                packet = second.next_packet(0.5)
            except OSError:
                continue
            if isinstance(packet, Publish) and packet.topic == "wk/live":
                received = packet
        assert received is not None and not received.retain
    finally:
        first.sock.close()
        second.sock.close()


def test_sigterm_stops_every_worker_and_clients_get_0x8b(workers):
    """SIGTERM to the supervisor: each worker says DISCONNECT 0x8B, no process is left."""
    pids = worker_pids(workers)
    clients = [BlockingClient(workers.port, f"t{i}", level=5, timeout=TIMEOUT)
               for i in range(8)]
    workers.signal(signal.SIGTERM)
    reasons = []
    for client in clients:
        packet = client.next_packet(TIMEOUT)
        assert isinstance(packet, Disconnect)
        reasons.append(packet.reason_code)
        client.sock.close()
    assert reasons == [0x8B] * len(clients)
    deadline = time.monotonic() + 30
    while workers.running and time.monotonic() < deadline:
        time.sleep(0.05)
    # twistd ends by re-raising the signal it stopped for
    assert workers.returncode in (0, -signal.SIGTERM), workers.log_tail()
    assert "All 2 workers stopped" in workers.log_path.read_text()
    deadline = time.monotonic() + TIMEOUT
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids.values()), "a worker outlived its supervisor"


def test_killed_worker_is_restarted(workers):
    """kill -9 of one worker: the supervisor starts it again; the port keeps serving."""
    before = worker_pids(workers)
    os.kill(before[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    info = None
    while time.monotonic() < deadline:
        try:
            info = ready_info(workers)
        except (OSError, ValueError):
            info = None
        if info and info["workers"][0]["pid"] != before[1] and alive(info["workers"][0]["pid"]):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker 1 not restarted: {info}\n{workers.log_tail()}")
    assert info["workers"][0]["restarts"] == 1
    assert info["workers"][1]["pid"] == before[2]
    assert "Worker 1 (pid %d, node wk-w1) was killed by SIGKILL" % before[1] in \
        workers.log_path.read_text()
    for i in range(6):
        client = BlockingClient(workers.port, f"after{i}", timeout=TIMEOUT)
        client.sock.close()


def test_supervisor_killed_with_sigkill_leaves_no_worker(workers):
    """Even kill -9 of the supervisor: the workers get SIGTERM from the kernel and exit."""
    pids = worker_pids(workers)
    workers.kill()
    deadline = time.monotonic() + TIMEOUT
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids.values())


def test_workers_that_cannot_start_stop_the_supervisor_with_status_1(redis_server, tmp_path):
    """A port held by another program: no restart loop, one error line, exit status 1."""
    import socket
    import subprocess

    from brokerproc import find_twistd
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        out = subprocess.run(
            [find_twistd(), "-n", "--pidfile=", "mqttd", "--cluster", redis_server.url,
             "--node-id", "bad", "--workers", "2", "--persistence", "memory",
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--sys-interval", "0"],
            cwd=tmp_path, capture_output=True, text=True, timeout=90,
            stdin=subprocess.DEVNULL)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "exited before it was ready" in text and "stopping all workers" in text
    assert text.count("Started worker") == 2          # no restart loop


@pytest.fixture
def inherit_workers(redis_server, tmp_path):
    """2 workers sharing sockets the supervisor listens on (--workers-sockets inherit)."""
    proc = BrokerProcess(tmp_path / "sup", broker_id="wi", ready_timeout=60,
                         extra_args=["--cluster", redis_server.url, "--node-id", "wi",
                                     "--workers", "2", "--workers-sockets", "inherit",
                                     "--sys-interval", "0"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop(timeout=30)


def listening_inodes(port: int) -> set:
    """Inodes of the sockets in LISTEN state on ``port`` (IPv4)."""
    out = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
                out.add(fields[9])
    return out


def test_inherited_listening_socket_serves_both_workers_and_survives_a_restart(
        inherit_workers):
    """Without SO_REUSEPORT: one listening socket, opened by the supervisor and adopted by
    both workers; connections land on both, a message crosses them, a client that connects
    while a worker restarts is served."""
    proc = inherit_workers
    pids = worker_pids(proc)
    listening = listening_inodes(proc.port)
    assert len(listening) == 1, "one socket, not one per worker"
    for pid in [proc.pid, *pids.values()]:
        assert listening & socket_inodes(pid), f"pid {pid} does not hold the listening socket"
    first, second = on_two_workers(proc, "inh")
    try:
        second.send(Subscribe(1, (Subscription("wi/#", 1),)))
        second.next_packet(TIMEOUT)                                 # SUBACK
        deadline = time.monotonic() + TIMEOUT
        received = None
        while received is None and time.monotonic() < deadline:
            first.send(Publish("wi/live", b"x", 0))
            try:
                packet = second.next_packet(0.5)
            except OSError:
                continue
            if isinstance(packet, Publish) and packet.topic == "wi/live":
                received = packet
        assert received is not None
    finally:
        first.sock.close()
        second.sock.close()
    os.kill(pids[1], signal.SIGKILL)
    for i in range(6):   # the other worker, or the restarted one, takes each
        client = BlockingClient(proc.port, f"during{i}", timeout=TIMEOUT)
        client.sock.close()
