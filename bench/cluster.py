#!/usr/bin/env python3
"""Cluster figures: cross-node throughput, Redis cost per message, connections per node.

    .venv/bin/python bench/cluster.py                  # 20000 messages, 3 repetitions
    .venv/bin/python bench/cluster.py --quick          # smoke mode (seconds)
    .venv/bin/python bench/cluster.py --messages 50000 --reps 5 --json out.json
    .venv/bin/python bench/cluster.py --client-choice  # + redis.asyncio vs txredisapi XADD loop

Each repetition starts a fresh ``redis-server`` (AOF on, ``appendfsync everysec``) and
fresh mqttd nodes (``--cluster``, ``--persistence memory``) on free 127.0.0.1 ports.
Scenarios, for QoS 0 and QoS 1 (``--qos 0,1,2`` adds QoS 2; ``--persistent-publisher``
makes the publisher a persistent session, whose QoS 2 hand-off is exactly once across
nodes):

- ``1 node``: publisher and subscriber on the same cluster node (local delivery: no
  Redis operation per message is expected);
- ``2 nodes``: publisher on node A, subscriber on node B (every message crosses Redis:
  one XADD on A, one XREADGROUP share and one XACK share on B).

One publisher sends N numbered messages (QoS 1/2: at most ``--window`` unacknowledged);
the figure is N / (time of the last message at the subscriber - time of the first
PUBLISH).  Per delivered message it also reports Redis commands (``INFO commandstats``
delta), Redis CPU (``INFO cpu`` delta) and each node's CPU (``/proc/PID/stat``).
Messages lost are reported (QoS 1 must lose none).  ``connections``: the resident
memory one idle MQTT connection costs a node (``--connections`` idle clients opened).
The machine has 2 cores shared by everything: figures are for comparison and sizing,
with the machine's note printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mqttd.blockingclient import BlockingClient  # noqa: E402
from mqttd.codec import encode  # noqa: E402
from mqttd.codec.packets import (  # noqa: E402
    Puback, Pubcomp, Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription)

HOST = "127.0.0.1"
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), *args],
                          capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL).stdout


def redis_counters(port: int):
    """(total commands, {command: calls}, cpu seconds) of a Redis now."""
    calls = {}
    for line in redis_cli(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            fields = dict(kv.split("=") for kv in rest.split(","))
            calls[name[len("cmdstat_"):]] = int(fields["calls"])
    cpu = 0.0
    for line in redis_cli(port, "INFO", "cpu").splitlines():
        if line.startswith(("used_cpu_sys:", "used_cpu_user:")):
            cpu += float(line.split(":")[1])
    return sum(calls.values()), calls, cpu


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Redis:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(workdir),
             "--logfile", str(workdir / "redis.log")], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while "PONG" not in redis_cli(self.port, "PING"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Node:
    def __init__(self, workdir: Path, url: str, node_id: str):
        self.ready = workdir / "ready.json"
        twistd = str(Path(sys.executable).parent / "twistd")
        self.log = open(workdir / "node.log", "wb")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile", "", "mqttd", "--listen", f"tcp:0:interface={HOST}",
             "--persistence", "memory", "--sys-interval", "0", "--ready-file", str(self.ready),
             "--cluster", url, "--node-id", node_id, "--max-queued-messages", "1000000"],
            cwd=str(workdir), stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                info = json.loads(self.ready.read_text())
                if info.get("cluster", {}).get("joined"):
                    self.port = info["listeners"][0]["port"]
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"node {node_id} did not join")
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


class Subscriber(threading.Thread):
    def __init__(self, port: int, qos: int, count: int):
        super().__init__(daemon=True)
        self.client = BlockingClient(port, f"bench-sub-{os.getpid()}-{time.monotonic_ns()}")
        self.client.send(Subscribe(1, (Subscription("bench/#", qos),)))
        while not isinstance(self.client.next_packet(10), Suback):
            pass
        self.count = count
        self.got = set()
        self.probes = 0
        self.last = None
        self.done = threading.Event()

    def run(self):
        client = self.client
        acks = []
        try:
            while len(self.got) < self.count:
                packet = client.next_packet(timeout=15)
                if isinstance(packet, Pubrel):
                    acks.append(encode(Pubcomp(packet.packet_id), 4))
                    if len(acks) >= 64 or not client.pending:
                        client.sock.sendall(b"".join(acks))
                        acks = []
                    continue
                if isinstance(packet, Publish):
                    if packet.qos:
                        ack = Puback if packet.qos == 1 else Pubrec
                        acks.append(encode(ack(packet.packet_id), 4))
                        if len(acks) >= 64 or not client.pending:
                            client.sock.sendall(b"".join(acks))
                            acks = []
                    if packet.topic == "bench/probe":
                        self.probes += 1
                        continue
                    self.got.add(int(packet.payload))
                    self.last = time.monotonic()
        except (OSError, ConnectionError):
            pass
        finally:
            self.done.set()


def route(pub: BlockingClient, sub: Subscriber, timeout: float = 20.0) -> None:
    """Probe until the subscriber's node is routed from the publisher's."""
    deadline = time.monotonic() + timeout
    while sub.probes == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("no route from publisher to subscriber")
        pub.send(Publish("bench/probe", b"p", 0))
        time.sleep(0.05)


def publish(pub: BlockingClient, count: int, qos: int, window: int) -> float:
    start = time.monotonic()
    if qos == 0:
        batch = []
        for i in range(count):
            batch.append(encode(Publish("bench/t", str(i).encode(), 0), 4))
            if len(batch) == 200:
                pub.sock.sendall(b"".join(batch))
                batch = []
        if batch:
            pub.sock.sendall(b"".join(batch))
        return start
    outstanding = 0
    sent = 0
    pid = 0
    while sent < count or outstanding:
        chunk = []
        while sent < count and outstanding < window:
            pid = pid % 65535 + 1
            chunk.append(encode(Publish("bench/t", str(sent).encode(), qos, packet_id=pid), 4))
            sent += 1
            outstanding += 1
        if chunk:
            pub.sock.sendall(b"".join(chunk))
        packet = pub.next_packet(timeout=30)
        if isinstance(packet, (Puback, Pubcomp)):
            outstanding -= 1
        elif isinstance(packet, Pubrec):
            pub.sock.sendall(encode(Pubrel(packet.packet_id), 4))
    return start


def scenario(tmp: Path, nodes: int, qos: int, count: int, window: int,
             persistent: bool = False) -> dict:
    redis = Redis(tmp)
    started = []
    try:
        for i in range(nodes):
            d = tmp / f"node{i}"
            d.mkdir()
            started.append(Node(d, redis.url, f"bench-{i}"))
        pub_node, sub_node = started[0], started[-1]
        sub = Subscriber(sub_node.port, qos, count)
        pub = BlockingClient(pub_node.port, "bench-pub", clean=not persistent)
        sub.start()
        route(pub, sub)
        time.sleep(0.3)
        r_calls0, by0, r_cpu0 = redis_counters(redis.port)
        cpu0 = [proc_cpu(n.proc.pid) for n in started]
        start = publish(pub, count, qos, window)
        sub.done.wait(60)
        r_calls1, by1, r_cpu1 = redis_counters(redis.port)
        cpu1 = [proc_cpu(n.proc.pid) for n in started]
        received = len(sub.got)
        elapsed = (sub.last or time.monotonic()) - start
        pub.close()
        sub.client.close()
        per = max(received, 1)
        commands = {k: by1.get(k, 0) - by0.get(k, 0) for k in by1}
        return {
            "nodes": nodes, "qos": qos, "persistent_publisher": persistent,
            "messages": count, "received": received,
            "lost": count - received,
            "msg_per_s": round(received / elapsed) if elapsed > 0 else None,
            "redis_commands_per_msg": round((r_calls1 - r_calls0) / per, 3),
            "redis_cpu_us_per_msg": round((r_cpu1 - r_cpu0) * 1e6 / per, 2),
            "node_cpu_us_per_msg": [round((b - a) * 1e6 / per, 1) for a, b in zip(cpu0, cpu1)],
            "redis_commands": {k: v for k, v in sorted(commands.items()) if v},
        }
    finally:
        for node in started:
            node.stop()
        redis.stop()


def connections(tmp: Path, count: int) -> dict:
    """Resident memory per idle connection on one node, and the connect rate."""
    redis = Redis(tmp)
    d = tmp / "conn-node"
    d.mkdir()
    node = Node(d, redis.url, "bench-conn")
    clients = []
    try:
        time.sleep(0.5)
        rss0 = proc_rss(node.proc.pid)
        start = time.monotonic()
        for i in range(count):
            clients.append(BlockingClient(node.port, f"idle-{i}"))
        elapsed = time.monotonic() - start
        time.sleep(0.5)
        rss1 = proc_rss(node.proc.pid)
        return {"connections": count, "rss_bytes_per_connection": (rss1 - rss0) // count,
                "connects_per_s": round(count / elapsed)}
    finally:
        for c in clients:
            c.sock.close()
        node.stop()
        redis.stop()


CLIENT_CHOICE = r'''
import sys, time
N = int(sys.argv[2]); PORT = int(sys.argv[3])
if sys.argv[1] == "redis.asyncio":
    import asyncio
    from twisted.internet import asyncioreactor
    asyncioreactor.install(asyncio.new_event_loop())
    from twisted.internet import reactor, defer
    from mqttd.cluster.backend import Backend
    b = Backend("redis://127.0.0.1:%d" % PORT)
    @defer.inlineCallbacks
    def main():
        yield b.connect()
        t = time.perf_counter()
        for start in range(0, N, 100):
            yield b.pipeline([("XADD", "bench:s", "MAXLEN", "~", 100000, "*", "e", b"x" * 64)
                              for _ in range(100)])
        print(N / (time.perf_counter() - t))
        yield b.close()
        reactor.stop()
else:
    from twisted.internet import reactor, defer
    import txredisapi
    @defer.inlineCallbacks
    def main():
        r = yield txredisapi.Connection("127.0.0.1", PORT, charset=None, convertNumbers=False)
        t = time.perf_counter()
        for start in range(0, N, 100):
            p = yield r.pipeline()
            for _ in range(100):
                p.execute_command("XADD", "bench:s", "MAXLEN", "~", 100000, "*", "e", b"x" * 64)
            yield p.execute_pipeline()
        print(N / (time.perf_counter() - t))
        yield r.disconnect()
        reactor.stop()
reactor.callWhenRunning(main)
reactor.run()
'''


def client_choice(tmp: Path, count: int, reps: int) -> dict:
    """XADDs/s in pipelines of 100: redis.asyncio on the asyncio reactor vs txredisapi."""
    target = ROOT / "bench" / ".peers" / "txredisapi"
    if not (target / "txredisapi.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target",
                        str(target), "--no-deps", "txredisapi", "six"], check=True)
    script = tmp / "client_choice.py"
    script.write_text(CLIENT_CHOICE)
    redis = Redis(tmp)
    results = {}
    try:
        for client in ("redis.asyncio", "txredisapi"):
            rates = []
            for _ in range(reps):
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(target)]))
                out = subprocess.run([sys.executable, str(script), client, str(count),
                                      str(redis.port)], capture_output=True, text=True,
                                     timeout=300, env=env)
                if out.returncode != 0:
                    raise RuntimeError(f"{client}: {out.stderr[-2000:]}")
                rates.append(float(out.stdout.strip().splitlines()[-1]))
            results[client] = {"xadd_per_s_median": round(statistics.median(rates)),
                               "runs": [round(r) for r in rates]}
    finally:
        redis.stop()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--qos", default="0,1",
                        help="QoS levels of the throughput scenarios (default 0,1)")
    parser.add_argument("--nodes", default="1,2", help="node counts (default 1,2)")
    parser.add_argument("--persistent-publisher", action="store_true",
                        help="the publisher is a persistent session (clean session 0)")
    parser.add_argument("--no-connections", action="store_true",
                        help="skip the idle-connections figure")
    parser.add_argument("--client-choice", action="store_true")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.reps, args.connections = 500, 1, 50
    if not shutil.which("redis-server"):
        print("redis-server is not installed (./dev test installs it)", file=sys.stderr)
        return 2
    results = {"machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
               "scenarios": []}
    with tempfile.TemporaryDirectory(prefix="mqttd-bench-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        n = 0
        for nodes in [int(n) for n in args.nodes.split(",")]:
            for qos in [int(q) for q in args.qos.split(",")]:
                runs = []
                for _ in range(args.reps):
                    n += 1
                    d = tmp / f"run{n}"
                    d.mkdir()
                    runs.append(scenario(d, nodes, qos, args.messages, args.window,
                                         args.persistent_publisher))
                rates = [r["msg_per_s"] for r in runs if r["msg_per_s"]]
                summary = dict(runs[len(runs) // 2])
                summary["msg_per_s_median"] = round(statistics.median(rates)) if rates else None
                summary["msg_per_s_runs"] = rates
                summary["lost_total"] = sum(r["lost"] for r in runs)
                results["scenarios"].append(summary)
                print(f"{nodes} node{'s' if nodes > 1 else ' '} QoS {qos}: "
                      f"{summary['msg_per_s_median']} msg/s (runs {rates}), lost "
                      f"{summary['lost_total']}, Redis {summary['redis_commands_per_msg']} "
                      f"cmd/msg {summary['redis_cpu_us_per_msg']} us CPU/msg, nodes "
                      f"{summary['node_cpu_us_per_msg']} us CPU/msg", flush=True)
        if not args.no_connections:
            d = tmp / "conn"
            d.mkdir()
            results["connections"] = connections(d, args.connections)
            print(f"connections: {results['connections']}", flush=True)
        if args.client_choice:
            d = tmp / "choice"
            d.mkdir()
            results["client_choice"] = client_choice(d, max(args.messages, 1000) * 5,
                                                     args.reps)
            print(f"client choice: {results['client_choice']}", flush=True)
    results["machine"] += f" (load after: {os.getloadavg()[0]:.1f})"
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    qos1_lost = sum(s["lost_total"] for s in results["scenarios"] if s["qos"] >= 1)
    return 1 if qos1_lost else 0


if __name__ == "__main__":
    sys.exit(main())
