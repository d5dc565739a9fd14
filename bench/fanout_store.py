#!/usr/bin/env python3
"""What one message fanned out to many offline persistent sessions costs (REVIEW-S9 R11).

Two figures, each for this checkout and, with ``--baseline DIR`` (the files of another
revision, e.g. ``git archive fd631d4 | tar -x -C /tmp/base``), for that one, in the same
run, alternating:

``fanout`` -- the reviewer's scenario, scaled: ``--sessions`` (1100) persistent v3.1.1
sessions subscribe ``fan/#`` at QoS 1 and disconnect; one ``--size`` (100,000) byte QoS 1
PUBLISH to ``fan/x`` is PUBACKed; then the broker's RSS, SIGTERM (the checkpoint), the
data directory's size, a restart (seconds until the ready file, the store's own "Opened
store" time) and the RSS after the restart.  A real ``twistd -n mqttd`` per run, default
durable store (``file:``, fsync always), 127.0.0.1 only.

``durable`` -- CPU seconds (best of ``--best-of``) of the durable QoS 1 hot path in one
process: ``--messages`` QoS 1 PUBLISHes to one offline persistent subscriber (file store,
fsync never, the store's jobs run inline) then the subscriber resumes and acknowledges
every one (PutOutbound, UpdateOutbound, DeleteOutbound each).  Printed as messages per
CPU second.

    .venv/bin/python bench/fanout_store.py                       # both, this checkout
    .venv/bin/python bench/fanout_store.py --baseline /tmp/base  # before/after
    .venv/bin/python bench/fanout_store.py --only durable --best-of 5
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "bench" / "peers" / "mqttd-base.py"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class BrokerProc:
    """``twistd -n mqttd`` from checkout ``root`` (through bench/peers/mqttd-base.py)."""

    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir = root, workdir
        self.proc = None
        self.port = None

    def start(self, timeout=300.0) -> float:
        ready = self.workdir / "ready.json"
        if ready.exists():
            ready.unlink()
        cmd = [sys.executable, str(PEER), str(self.root), "-n", "--pidfile", "", "mqttd",
               "--listen", "tcp:0:interface=127.0.0.1", "--ready-file", str(ready),
               "--sys-interval", "0"]
        log = open(self.workdir / "broker.log", "ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: see {self.workdir / 'broker.log'}")
            if time.monotonic() - started > timeout:
                self.proc.kill()
                raise RuntimeError("broker did not become ready")
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        self.port = json.loads(ready.read_text())["listeners"][0]["port"]
        return elapsed

    def stop(self, timeout=300.0) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return time.monotonic() - started

    def opened_seconds(self) -> float:
        text = (self.workdir / "broker.log").read_text(errors="replace")
        found = re.findall(r"Opened store .* in ([0-9.]+)s", text)
        return float(found[-1]) if found else float("nan")


def fanout(root: Path, sessions: int, size: int) -> dict:
    """The reviewer's scenario against the broker of checkout ``root``."""
    sys.path.insert(0, str(ROOT))
    from mqttd.blockingclient import BlockingClient
    from mqttd.codec import encode
    from mqttd.codec.packets import Puback, Publish, Suback, Subscribe, Subscription

    work = Path(tempfile.mkdtemp(prefix="mqttd-fanout-"))
    try:
        broker = BrokerProc(root, work)
        broker.start()
        for i in range(sessions):
            sub = BlockingClient(broker.port, f"fan-{i:05d}", clean=False)
            sub.sock.sendall(encode(Subscribe(1, (Subscription("fan/#", 1),)), 4))
            assert isinstance(sub.next_packet(), Suback)
            sub.close()
        rss_before = rss_kib(broker.proc.pid)
        pub = BlockingClient(broker.port, "fan-pub")
        pub.sock.sendall(encode(Publish("fan/x", os.urandom(size), 1, packet_id=1), 4))
        assert pub.next_packet(timeout=120) == Puback(1)
        pub.close()
        time.sleep(1.0)
        rss_after = rss_kib(broker.proc.pid)
        stop_s = broker.stop()
        data = dir_size(work / "mqttd-data")
        restart_s = broker.start()
        time.sleep(0.5)
        rss_restarted = rss_kib(broker.proc.pid)
        opened_s = broker.opened_seconds()
        broker.stop()
        return {"sessions": sessions, "size": size,
                "rss_before_publish_kib": rss_before, "rss_after_publish_kib": rss_after,
                "stop_s": round(stop_s, 3), "data_dir_bytes": data,
                "restart_s": round(restart_s, 3), "store_open_s": opened_s,
                "rss_after_restart_kib": rss_restarted}
    finally:
        shutil.rmtree(work, ignore_errors=True)


DURABLE_CODE = r"""
import os, sys, tempfile, time, shutil, json
sys.path.insert(0, sys.argv[1])
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from mqttd.broker import Broker, BrokerConfig
from mqttd.codec import encode
from mqttd.codec.packets import Connect, Puback, Publish, Subscribe, Subscription
from mqttd.connection import ClientConnection
from mqttd.persistence.filestore import FileStore
import mqttd
assert mqttd.__file__.startswith(sys.argv[1]), mqttd.__file__

class Sink(StringTransport):
    def write(self, data):
        pass

def run(messages):
    path = tempfile.mkdtemp(prefix="mqttd-durable-")
    reactor = MemoryReactorClock()
    store = FileStore(path, reactor, fsync="never", compact_bytes=1 << 40,
                      run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    broker = Broker(reactor, store, BrokerConfig())
    broker.start()

    def connect(client_id, clean):
        conn = ClientConnection(broker, Sink(), reactor, peer="127.0.0.1:1")
        conn.data_received(encode(Connect(4, client_id, clean, 0), 4))
        reactor.advance(0)
        return conn

    sub = connect("sub", False)
    sub.data_received(encode(Subscribe(1, (Subscription("bench/#", 1),)), 4))
    reactor.advance(0)
    sub.connection_lost(None)
    pub = connect("pub", True)
    packets = [encode(Publish("bench/%d" % (i % 10), b"x" * 64, 1, packet_id=i % 65535 + 1), 4)
               for i in range(100)]
    started = time.process_time()
    for k in range(messages):
        pub.data_received(packets[k % 100])
        if k % 100 == 99:
            reactor.advance(0)
    reactor.advance(0)
    sub = connect("sub", False)
    session = broker.sessions["sub"]
    while session.inflight or session.queue:
        for pid in list(session.inflight):
            broker.puback(session, pid)
        reactor.advance(0)
    seconds = time.process_time() - started
    assert broker.stats.messages_acked == messages, broker.stats.messages_acked
    broker.stop()
    for _ in range(5):
        reactor.advance(0)
    shutil.rmtree(path, ignore_errors=True)
    return seconds

messages, best_of = int(sys.argv[2]), int(sys.argv[3])
print(json.dumps({"cpu_seconds": min(run(messages) for _ in range(best_of))}))
"""


def durable(root: Path, messages: int, best_of: int) -> dict:
    out = subprocess.run([sys.executable, "-c", DURABLE_CODE, str(root), str(messages),
                          str(best_of)], check=True, capture_output=True, text=True)
    seconds = json.loads(out.stdout.strip().splitlines()[-1])["cpu_seconds"]
    return {"messages": messages, "cpu_seconds": round(seconds, 4),
            "messages_per_cpu_second": round(messages / seconds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a directory holding the files of another mqttd revision")
    parser.add_argument("--only", choices=("fanout", "durable"), default=None)
    parser.add_argument("--sessions", type=int, default=1100)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--best-of", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate this checkout and the baseline this many times")
    parser.add_argument("--baseline-only", action="store_true",
                        help="run only the --baseline checkout")
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.size, args.messages, args.best_of = 20, 10_000, 500, 1
    roots = [("this", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    if args.baseline_only:
        roots = roots[1:]
    results = []
    for round_ in range(args.rounds):
        for name, root in (roots if round_ % 2 == 0 else roots[::-1]):
            entry = {"build": name, "root": str(root)}
            if args.only in (None, "fanout"):
                entry["fanout"] = fanout(root, args.sessions, args.size)
            if args.only in (None, "durable"):
                entry["durable"] = durable(root, args.messages, args.best_of)
            results.append(entry)
            print(json.dumps(entry), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
