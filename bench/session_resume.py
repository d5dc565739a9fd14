"""What a persistent session with many subscriptions costs per reconnect and per
SUBSCRIBE: journal bytes and broker CPU (REVIEW-S9 R15).

A v3.1.1 client ``heavy`` (clean session 0) subscribes ``--filters`` filters (10,000 by
default, in SUBSCRIBEs of 1,000), then CONNECTs and closes ``--reconnects`` times; then,
connected, sends ``--subscribes`` SUBSCRIBEs of one filter it already has (13 bytes each,
pipelined).  Printed per reconnect and per SUBSCRIBE: the bytes the data directory grew
by (the journal; the default ``--compact-bytes`` of 64 MiB is not reached) and the
broker's CPU time (from /proc).  Format 5 journals the session's state per reconnect and
one filter per SUBSCRIBE; format 4 rewrote all the filters each time.

    .venv/bin/python bench/session_resume.py                      # this tree
    .venv/bin/python bench/session_resume.py --broker-root /work/main   # another checkout
    .venv/bin/python bench/session_resume.py --inprocess          # no process: the broker
        core on a task.Clock with a file store (fsync never), CPU by time.process_time
    .venv/bin/python bench/session_resume.py --cluster            # a cluster node's Redis
        session store (in-process node, its own redis-server): bytes sent to Redis
    (with --inprocess / --cluster, PYTHONPATH=/work/main measures another checkout)

The broker runs with ``--persistence file:DIR`` (fsync always) on an ephemeral
127.0.0.1 port, started and stopped by its own handle; every wait is bounded.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

# appended: a PYTHONPATH naming another checkout's mqttd comes first (the baseline)
sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.benchlib import cpu_seconds, start_mqttd, stop_process  # noqa: E402
from mqttd.codec import PacketReader, encode  # noqa: E402
from mqttd.codec.packets import (  # noqa: E402
    Connack, Connect, Disconnect, Suback, Subscribe, Subscription)

LEVEL = 4
DEADLINE = 120.0


class Client:
    """A blocking MQTT 3.1.1 client on one socket (enough for this bench)."""

    def __init__(self, port: int, client_id: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.reader = PacketReader(level=LEVEL)
        self.pending = []
        self.sock.sendall(encode(Connect(LEVEL, client_id, False, 0), LEVEL))
        connack = self.expect(Connack, 1)[0]
        assert connack.reason_code == 0, connack

    def expect(self, kind, count: int):
        got = []
        deadline = time.monotonic() + DEADLINE
        while len(got) < count:
            while self.pending and len(got) < count:
                packet = self.pending.pop(0)
                if isinstance(packet, kind):
                    got.append(packet)
            if len(got) == count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count - len(got)} {kind.__name__} missing")
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("broker closed the connection")
            self.pending += self.reader.feed(data)
        return got

    def close(self, disconnect: bool = False):
        if disconnect:
            self.sock.sendall(encode(Disconnect(), LEVEL))
        self.sock.close()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def filters(n: int):
    return [f"dev/{i // 1000}/{i % 1000}/+" for i in range(n)]


def run_process(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        proc, port = start_mqttd(work, broker_root=args.broker_root,
                                 persistence=f"file:{data}")
        try:
            heavy = Client(port, "heavy")
            wanted = filters(args.filters)
            for k in range(0, len(wanted), 1000):
                heavy.sock.sendall(encode(Subscribe(k // 1000 + 1, tuple(
                    Subscription(f, 1) for f in wanted[k:k + 1000])), LEVEL))
                heavy.expect(Suback, 1)
            heavy.close(disconnect=True)
            time.sleep(0.5)  # the close is stored
            size, cpu = dir_bytes(data), cpu_seconds(proc.pid)
            started = time.monotonic()
            for _ in range(args.reconnects):
                Client(port, "heavy").close()
            time.sleep(0.5)
            reconnect = ((dir_bytes(data) - size) / args.reconnects,
                         (cpu_seconds(proc.pid) - cpu) / args.reconnects,
                         time.monotonic() - started)
            heavy = Client(port, "heavy")
            size, cpu = dir_bytes(data), cpu_seconds(proc.pid)
            packet = encode(Subscribe(1, (Subscription(wanted[0], 1),)), LEVEL)
            heavy.sock.sendall(packet * args.subscribes)
            heavy.expect(Suback, args.subscribes)
            time.sleep(0.2)
            subscribe = ((dir_bytes(data) - size) / args.subscribes,
                         (cpu_seconds(proc.pid) - cpu) / args.subscribes, len(packet))
            heavy.close(disconnect=True)
        finally:
            stop_process(proc)
    return {"reconnect": reconnect, "subscribe": subscribe}


def run_inprocess(args) -> dict:
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from core.harness import FakeClient
    from mqttd.broker import Broker, BrokerConfig
    from mqttd.persistence.filestore import FileStore
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        store = FileStore(tmp, clock, fsync="never",
                          run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
        broker = Broker(clock, store, BrokerConfig())
        broker.restore(store.open())

        def connect():
            client = FakeClient(broker, clock, level=LEVEL)
            client.connect("heavy", clean=False, expect_ok=False)
            clock.advance(0)
            return client
        client = connect()
        wanted = filters(args.filters)
        for k in range(0, len(wanted), 1000):
            client.subscribe(*wanted[k:k + 1000], qos=1, packet_id=k // 1000 + 1)
            clock.advance(0)
        client.drop()
        clock.advance(0)
        written, cpu = store._written, time.process_time()
        for _ in range(args.reconnects):
            connect().drop()
            clock.advance(0)
        reconnect = ((store._written - written) / args.reconnects,
                     (time.process_time() - cpu) / args.reconnects, None)
        assert len(broker.sessions["heavy"].subscriptions) == len(wanted)
        client = connect()
        written, cpu = store._written, time.process_time()
        for i in range(args.subscribes):
            client.subscribe(wanted[0], qos=1, packet_id=i % 65535 + 1)
            clock.advance(0)
        subscribe = ((store._written - written) / args.subscribes,
                     (time.process_time() - cpu) / args.subscribes, None)
        client.drop()
        clock.advance(0)
        result_of = []
        store.close().addBoth(result_of.append)
    return {"reconnect": reconnect, "subscribe": subscribe}


def run_cluster(args) -> dict:
    """The cluster's session store: one in-process node (tests/cluster/sessionnodes.py)
    on a real redis-server of its own; bytes = the arguments of the ``session_apply``
    calls the node sends to Redis, CPU = this process's (node and client)."""
    import asyncio

    from cluster.redisproc import RedisServer
    from cluster.sessionnodes import connect, settle, start_nodes

    async def measure(url):
        _alive, node = start_nodes(url, "A")
        sent = [0]
        pipeline = node.backend.pipeline

        def counting(commands, **kw):
            for command in commands:
                sent[0] += sum(len(a) if isinstance(a, (bytes, str)) else 8
                               for a in command[2:])
            return pipeline(commands, **kw)
        node.backend.pipeline = counting
        client = node.client(level=LEVEL)
        await connect(node, client, "heavy")
        wanted = filters(args.filters)
        for k in range(0, len(wanted), 1000):
            client.subscribe(*wanted[k:k + 1000], qos=1, packet_id=k // 1000 + 1)
        await settle(node)
        client.conn.connection_lost()
        await settle(node)
        nbytes, cpu = sent[0], time.process_time()
        for _ in range(args.reconnects):
            client = node.client(level=LEVEL)
            await connect(node, client, "heavy")
            client.conn.connection_lost()
            await settle(node, rounds=1)
        reconnect = ((sent[0] - nbytes) / args.reconnects,
                     (time.process_time() - cpu) / args.reconnects, None)
        assert len(node.broker.sessions["heavy"].subscriptions) == len(wanted)
        client = node.client(level=LEVEL)
        await connect(node, client, "heavy")
        await settle(node, rounds=1)
        nbytes, cpu = sent[0], time.process_time()
        for i in range(args.subscribes):
            client.subscribe(wanted[0], qos=1, packet_id=i % 65535 + 1)
            await settle(node, rounds=1)
        subscribe = ((sent[0] - nbytes) / args.subscribes,
                     (time.process_time() - cpu) / args.subscribes, None)
        return {"reconnect": reconnect, "subscribe": subscribe}

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(measure(server.url), 600))
        finally:
            loop.close()
            server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--filters", type=int, default=10_000)
    parser.add_argument("--reconnects", type=int, default=50)
    parser.add_argument("--subscribes", type=int, default=200)
    parser.add_argument("--broker-root", default=None,
                        help="measure the mqttd of another checkout (PYTHONPATH)")
    parser.add_argument("--inprocess", action="store_true")
    parser.add_argument("--cluster", action="store_true",
                        help="the cluster's Redis session store (bytes sent to Redis)")
    args = parser.parse_args(argv)
    if args.cluster:
        result, where = run_cluster(args), "cluster node in-process, bytes to Redis"
    elif args.inprocess:
        result, where = run_inprocess(args), "in-process"
    else:
        result, where = run_process(args), f"process {sys.implementation.name}"
    root = args.broker_root or "this tree"
    what = "to Redis" if args.cluster else "journal"
    nbytes, cpu, wall = result["reconnect"]
    if args.inprocess or args.cluster:
        import mqttd
        root = os.path.dirname(os.path.dirname(os.path.abspath(mqttd.__file__)))
    print(f"{root} ({where}), session of {args.filters} filters:")
    print(f"  per reconnect (CONNECT + close, {args.reconnects}x): {what} {nbytes / 1024:.1f} KB, "
          f"broker CPU {cpu * 1000:.2f} ms" + (f", {wall:.1f} s in all" if wall else ""))
    nbytes, cpu, size = result["subscribe"]
    print(f"  per SUBSCRIBE of one filter it has ({args.subscribes}x"
          + (f", {size} bytes each" if size else "") + f"): {what} {nbytes / 1024:.2f} KB, "
          f"broker CPU {cpu * 1000:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
