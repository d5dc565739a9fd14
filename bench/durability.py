#!/usr/bin/env python3
"""Durability figures for mqttd (issue "Durable storage"), in one command.

    .venv/bin/python bench/durability.py                 # 100,000 messages
    .venv/bin/python bench/durability.py --messages 20000 --quick

Measures, on 127.0.0.1 only, each broker a fresh ``twistd -n mqttd`` process:

1. **kill test**: a persistent QoS 1 subscriber registers and leaves; a
   publisher streams QoS 1 messages (window 100); the broker is SIGKILLed after
   a third of them; after a restart the subscriber drains: acknowledged vs
   delivered counts (every acknowledged message must be delivered).
2. **restart with N stored messages**: N QoS 1 messages queued for the
   offline subscriber with the default durable store, SIGTERM, then the time
   from starting the process to its ready file, the data directory's size,
   and a full drain.
3. **QoS 1 throughput to the offline subscriber**, default durability
   (``file:``, fsync always) against ``--persistence memory``, same run.

Prints a Markdown summary and writes JSON next to it (``--out``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqttd.blockingclient import BlockingClient  # noqa: E402
from mqttd.codec import encode  # noqa: E402
from mqttd.codec.packets import Puback, Publish, Suback, Subscribe, Subscription  # noqa: E402

TWISTD = str(Path(sys.executable).parent / "twistd")
TOPIC = "durability/t"
SUB_ID = "durability-sub"


class Broker:
    def __init__(self, workdir: Path, persistence=None):
        self.workdir = workdir
        self.persistence = persistence
        self.proc = None
        self.port = None

    def start(self, timeout=120.0) -> float:
        ready = self.workdir / "ready.json"
        if ready.exists():
            ready.unlink()
        cmd = [TWISTD, "-n", "--pidfile", "", "mqttd",
               "--listen", "tcp:0:interface=127.0.0.1", "--ready-file", str(ready),
               "--sys-interval", "0"]
        if self.persistence:
            cmd += ["--persistence", self.persistence]
        log = open(self.workdir / "broker.log", "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: see {self.workdir / 'broker.log'}")
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise RuntimeError("broker did not become ready")
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        self.port = json.loads(ready.read_text())["listeners"][0]["port"]
        return elapsed

    def stop(self, timeout=60.0):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def register(port):
    sub = BlockingClient(port, SUB_ID, clean=False)
    sub.sock.sendall(encode(Subscribe(1, (Subscription(TOPIC, 1),)), 4))
    assert sub.next_packet() == Suback(1, (1,))
    sub.close()


def publish(port, count, window=100, interrupt_after=None, interrupt=None, deadline=600):
    """QoS 1 stream; returns (acked payload numbers, seconds)."""
    pub = BlockingClient(port, "durability-pub")
    acked, unacked, sent = set(), {}, 0
    t0 = time.monotonic()
    try:
        while len(acked) < count and time.monotonic() - t0 < deadline:
            batch = []
            while sent < count and len(unacked) < window:
                pid = sent % 65535 + 1
                unacked[pid] = sent
                batch.append(encode(Publish(TOPIC, b"%08d" % sent + b"x" * 56, 1,
                                            packet_id=pid), 4))
                sent += 1
            if batch:
                pub.sock.sendall(b"".join(batch))
            packet = pub.next_packet()
            if isinstance(packet, Puback):
                acked.add(unacked.pop(packet.packet_id))
            if interrupt and len(acked) >= interrupt_after:
                interrupt()
                interrupt = None
    except (ConnectionError, OSError):
        pass
    elapsed = time.monotonic() - t0
    pub.sock.close()
    return acked, elapsed


def drain(port, expected, deadline=600):
    sub = BlockingClient(port, SUB_ID, clean=False)
    present = sub.connack.session_present
    got = set()
    t0 = time.monotonic()
    acks = []
    while not expected <= got and time.monotonic() - t0 < deadline:
        try:
            packet = sub.next_packet(timeout=10)
        except socket.timeout:
            break
        if isinstance(packet, Publish):
            got.add(int(packet.payload[:8]))
            acks.append(encode(Puback(packet.packet_id), 4))
            if len(acks) >= 64 or not sub.pending:
                sub.sock.sendall(b"".join(acks))
                acks = []
    elapsed = time.monotonic() - t0
    sub.close()
    return got, present, elapsed


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def kill_test(base: Path, count: int) -> dict:
    work = base / "kill"
    work.mkdir()
    broker = Broker(work)
    broker.start()
    register(broker.port)
    acked, _ = publish(broker.port, count, interrupt_after=count // 3, interrupt=broker.kill)
    broker.start()
    got, present, _ = drain(broker.port, acked)
    broker.stop()
    return {"acked": len(acked), "delivered": len(got & acked),
            "missing": len(acked - got), "session_present": present}


def restart_test(base: Path, count: int) -> dict:
    work = base / "restart"
    work.mkdir()
    broker = Broker(work)
    first_start = broker.start()
    register(broker.port)
    acked, seconds = publish(broker.port, count)
    broker.stop()
    size = dir_size(work / "mqttd-data")
    restart = broker.start()
    got, present, drain_s = drain(broker.port, acked)
    broker.stop()
    return {"messages": count, "acked": len(acked), "publish_msg_s": len(acked) / seconds,
            "empty_start_s": first_start, "restart_s": restart,
            "data_dir_bytes": size, "delivered_after_restart": len(got & acked),
            "missing": len(acked - got), "session_present": present,
            "drain_msg_s": len(got) / drain_s if drain_s else None}


def throughput(base: Path, count: int, persistence) -> dict:
    work = base / ("tp-" + (persistence or "default").split(":")[0])
    work.mkdir()
    broker = Broker(work, persistence)
    broker.start()
    register(broker.port)
    acked, seconds = publish(broker.port, count)
    broker.stop()
    return {"persistence": persistence or "file:mqttd-data (default)",
            "acked": len(acked), "publish_msg_s": len(acked) / seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--kill-messages", type=int, default=9000)
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.kill_messages = 2000, 1500
    base = Path(tempfile.mkdtemp(prefix="mqttd-durability-"))
    try:
        results = {
            "kill": kill_test(base, args.kill_messages),
            "restart": restart_test(base, args.messages),
            "throughput_default": throughput(base, min(args.messages, 30000), None),
            "throughput_memory": throughput(base, min(args.messages, 30000), "memory"),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    k, r = results["kill"], results["restart"]
    d, m = results["throughput_default"], results["throughput_memory"]
    print(f"| kill -9 mid-stream | {k['acked']} acknowledged, {k['delivered']} delivered "
          f"after restart, {k['missing']} missing |")
    print(f"| restart with {r['messages']:,} stored messages | {r['restart_s']:.2f} s to "
          f"listening (empty: {r['empty_start_s']:.2f} s), data dir "
          f"{r['data_dir_bytes'] / 1e6:.1f} MB, {r['delivered_after_restart']:,} delivered, "
          f"{r['missing']} missing |")
    print(f"| QoS 1 to offline subscriber, window 100 | default durable "
          f"{d['publish_msg_s']:,.0f} msg/s, memory {m['publish_msg_s']:,.0f} msg/s "
          f"(ratio {d['publish_msg_s'] / m['publish_msg_s']:.2f}) |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    ok = k["missing"] == 0 and r["missing"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
