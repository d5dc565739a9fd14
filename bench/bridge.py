#!/usr/bin/env python3
"""QoS 1 messages/s through one bridge: mqttd -> mosquitto vs mosquitto -> mosquitto.

    .venv/bin/python bench/bridge.py                 # 20000 messages, 3 repetitions
    .venv/bin/python bench/bridge.py --quick         # smoke mode (tests/bridge/test_bench.py)
    .venv/bin/python bench/bridge.py --messages 50000 --reps 5 --json out.json

Each repetition starts fresh brokers on free 127.0.0.1 ports: a remote
mosquitto, and a local bridging broker (mqttd with ``--persistence memory``,
mqttd with the durable default ``file:`` store (fsync always), or mosquitto)
whose only bridge is ``topic bench/# out 1 "" far/``.  Both mosquittos run with
``max_queued_messages 100000`` (mqttd's default queue limit): with mosquitto's
default of 1000 the local one drops messages when the publisher outruns the
bridge (seen here: 4,704 of 20,000 lost).  A subscriber on the
remote (QoS 1, acknowledging every message) waits until it is connected, then
one publisher sends N numbered QoS 1 messages to the local broker, keeping
``--window`` unacknowledged.  The figure is N / (time of the last message at
the subscriber - time of the first PUBLISH).  Every message must arrive (ids
checked): a run with loss is reported as failed, never as a rate.
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

from bench.benchlib import stop_process  # noqa: E402
from mqttd.codec import PacketReader, encode  # noqa: E402
from mqttd.codec.packets import (  # noqa: E402
    Connack, Connect, Puback, Publish, Suback, Subscribe, Subscription)

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def mosquitto_bin() -> str:
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(found):
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    return found


def start_mosquitto(workdir: Path, port: int, extra: str = ""):
    conf = workdir / f"mosquitto-{port}.conf"
    # mosquitto's default max_queued_messages (1000) drops under this load (the
    # publisher outruns the bridge): raise it to mqttd's default, 100000
    lines = [f"listener {port} {HOST}", "allow_anonymous true", "log_type error",
             "max_queued_messages 100000"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n" + extra)
    proc = subprocess.Popen([mosquitto_bin(), "-c", str(conf)], cwd=str(workdir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc


def start_mqttd(workdir: Path, port: int, remote_port: int, persistence: str):
    config = workdir / "mqttd.toml"
    config.write_text(f'''
[[bridge]]
connection = "bench"
address = "{HOST}:{remote_port}"
remote_clientid = "bench-bridge"
topic = ['bench/# out 1 "" far/']
restart_timeout = "0.5 1"
notifications = false
bridge_max_inflight = 1000
''')
    twistd = Path(sys.executable).parent / "twistd"
    proc = subprocess.Popen(
        [str(twistd), "-n", "--pidfile", "", "mqttd", "--listen",
         f"tcp:{port}:interface={HOST}", "--persistence", persistence, "--config", str(config),
         "--sys-interval", "0"],
        cwd=str(workdir), stdout=open(workdir / "mqttd.log", "wb"), stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return proc


class Conn:
    """A bare MQTT 3.1.1 connection (bounded waits)."""

    def __init__(self, port: int, client_id: str, timeout: float = 30.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.reader = PacketReader(level=4)
        self.pending = []
        self.sock.sendall(encode(Connect(4, client_id, True, 0), 4))
        ack = self.next(timeout)
        if not isinstance(ack, Connack) or ack.reason_code:
            raise RuntimeError(f"CONNECT refused: {ack!r}")

    def next(self, timeout: float = 30.0):
        self.sock.settimeout(timeout)
        while not self.pending:
            data = self.sock.recv(1 << 18)
            if not data:
                raise ConnectionError("closed by broker")
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


def subscriber(port: int, count: int, ready: threading.Event, result: dict,
               deadline: float) -> None:
    conn = Conn(port, "bench-sub")
    conn.sock.sendall(encode(Subscribe(1, (Subscription("far/bench/#", 1),)), 4))
    while not isinstance(conn.next(), Suback):
        pass
    ready.set()
    seen = set()
    acks = []
    try:
        while len(seen) < count and time.monotonic() < deadline:
            try:
                packet = conn.next(max(0.1, deadline - time.monotonic()))
            except socket.timeout:
                break
            if isinstance(packet, Publish):
                if packet.topic == "far/bench/m":
                    seen.add(packet.payload)
                if packet.qos:
                    acks.append(encode(Puback(packet.packet_id), 4))
                if len(acks) >= 64 or not conn.pending:
                    conn.sock.sendall(b"".join(acks))
                    acks = []
        result["last"] = time.monotonic()
    finally:
        result["seen"] = seen
        conn.close()


def publisher(port: int, count: int, window: int, deadline: float) -> float:
    conn = Conn(port, "bench-pub")
    start = time.monotonic()
    sent = acked = 0
    out = []
    while acked < count and time.monotonic() < deadline:
        while sent < count and sent - acked < window:
            sent += 1
            out.append(encode(Publish("bench/m", b"%08d" % sent, 1, False, False,
                                      (sent - 1) % 65535 + 1), 4))
        if out:
            conn.sock.sendall(b"".join(out))
            out = []
        packet = conn.next(max(0.1, deadline - time.monotonic()))
        if isinstance(packet, Puback):
            acked += 1
    conn.close()
    return start


def run_once(kind: str, count: int, window: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="mqttd-bench-bridge-") as tmp:
        os.environ.get("BENCH_KEEP") and print("workdir", tmp)
        work = Path(tmp)
        remote_port, local_port = free_port(), free_port()
        remote = start_mosquitto(work, remote_port)
        procs = [remote]
        try:
            if kind == "mosquitto":
                local = start_mosquitto(work, local_port, f'''
connection bench
address {HOST}:{remote_port}
remote_clientid bench-bridge
topic bench/# out 1 "" far/
restart_timeout 1
notifications false
''')
            else:
                persistence = "memory" if kind == "mqttd" else f"file:{work}/data"
                local = start_mqttd(work, local_port, remote_port, persistence)
            procs.append(local)
            # the bridge is up once a probe crosses it
            probe_deadline = time.monotonic() + 20
            while True:
                probe = Conn(remote_port, "bench-probe")
                probe.sock.sendall(encode(Subscribe(1, (Subscription("far/bench/probe", 0),)), 4))
                probe.next()
                p = Conn(local_port, "bench-probe-pub")
                p.sock.sendall(encode(Publish("bench/probe", b"p", 0), 4))
                try:
                    got = probe.next(0.5)
                    if isinstance(got, Publish):
                        break
                except socket.timeout:
                    pass
                finally:
                    probe.close()
                    p.close()
                if time.monotonic() > probe_deadline:
                    raise RuntimeError("bridge did not come up")
            deadline = time.monotonic() + timeout
            ready = threading.Event()
            result: dict = {}
            thread = threading.Thread(target=subscriber,
                                      args=(remote_port, count, ready, result, deadline))
            thread.start()
            if not ready.wait(10):
                raise RuntimeError("subscriber did not subscribe")
            start = publisher(local_port, count, window, deadline)
            thread.join(timeout + 5)
            seen = result.get("seen", set())
            lost = count - len(seen)
            elapsed = result.get("last", time.monotonic()) - start
            return {"kind": kind, "messages": count, "received": len(seen), "lost": lost,
                    "seconds": round(elapsed, 3),
                    "msgs_per_s": round(count / elapsed) if lost == 0 and elapsed > 0 else None}
        finally:
            for proc in reversed(procs):
                stop_process(proc)


KINDS = {
    "mqttd": "mqttd -> mosquitto (mqttd --persistence memory)",
    "mqttd-file": "mqttd -> mosquitto (mqttd file store, fsync always)",
    "mosquitto": "mosquitto -> mosquitto",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--window", type=int, default=100,
                        help="unacknowledged PUBLISHes the publisher keeps in flight")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="500 messages, 1 repetition")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.reps, args.timeout = 500, 1, 60.0
    kinds = [k for k in args.kinds.split(",") if k]
    runs = []
    failed = False
    for rep in range(args.reps):
        for kind in kinds:       # interleaved: the machine's load hits both alike
            run = run_once(kind, args.messages, args.window, args.timeout)
            run["rep"] = rep + 1
            runs.append(run)
            print(json.dumps(run), flush=True)
            failed |= run["lost"] != 0
    summary = {}
    for kind in kinds:
        rates = [r["msgs_per_s"] for r in runs if r["kind"] == kind and r["msgs_per_s"]]
        summary[kind] = {"label": KINDS[kind], "median_msgs_per_s":
                         round(statistics.median(rates)) if rates else None,
                         "lost": sum(r["lost"] for r in runs if r["kind"] == kind)}
    print()
    print(f"QoS 1 through one bridge, {args.messages} messages, window {args.window}, "
          f"{args.reps} repetitions (median):")
    for kind, s in summary.items():
        print(f"  {s['label']:<55} {s['median_msgs_per_s'] or 'FAILED':>8} msg/s  "
              f"lost {s['lost']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary,
                                               "messages": args.messages,
                                               "window": args.window}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
