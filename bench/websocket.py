#!/usr/bin/env python3
"""MQTT over WebSocket vs TCP with MQTT.js: one publisher -> one subscriber, QoS 0.

    .venv/bin/python bench/websocket.py [--messages 20000] [--reps 3]

Starts ``twistd mqttd`` (this venv, memory store) with a ``tcp:`` and a ``ws:``
listener on 127.0.0.1, then runs ``bench/ws_throughput.js`` (MQTT.js from
tests/interop/node, installed by ./dev test) against each, alternating, and
prints the median messages/s of each, the broker's CPU time per message
(from /proc) and their ratios.  MQTT.js in Node sends
each PUBLISH as several WebSocket messages, so this measures the per-frame
cost of the WebSocket path (autobahn) as a browser-like client causes it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MQTTJS = ROOT / "tests" / "interop" / "node" / "node_modules" / "mqtt"
SCRIPT = ROOT / "bench" / "ws_throughput.js"
sys.path.insert(0, str(ROOT))

from bench.benchlib import cpu_seconds  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    if not (MQTTJS / "package.json").exists():
        print(f"MQTT.js not installed in {MQTTJS}: run ./dev test once", file=sys.stderr)
        return 2
    twistd = Path(sys.executable).parent / "twistd"
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        broker = subprocess.Popen(
            [str(twistd), "-n", "--pidfile", "", "mqttd", "--persistence", "memory",
             "--sys-interval", "0", "--ready-file", str(ready),
             "--listen", "tcp:0:interface=127.0.0.1", "--listen", "ws:0:interface=127.0.0.1"],
            cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while not ready.exists():
                if broker.poll() is not None or time.monotonic() > deadline:
                    print("broker did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            ports = {entry["endpoint"].split(":", 1)[0]: entry["port"]
                     for entry in json.loads(ready.read_text())["listeners"]}
            urls = {"tcp": f"mqtt://127.0.0.1:{ports['tcp']}",
                    "ws": f"ws://127.0.0.1:{ports['ws']}/mqtt"}
            results = {"tcp": [], "ws": []}
            cpu = {"tcp": [], "ws": []}
            env = dict(os.environ, MQTTJS_MODULE=str(MQTTJS))
            for _ in range(args.reps):
                for kind, url in urls.items():
                    before = cpu_seconds(broker.pid)
                    out = subprocess.run(["node", str(SCRIPT), url, str(args.messages)],
                                         env=env, capture_output=True, text=True, timeout=90)
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    if "error" in result:
                        print(f"{kind}: {result}", file=sys.stderr)
                        return 1
                    results[kind].append(result["per_second"])
                    # broker CPU per message, microseconds
                    cpu[kind].append((cpu_seconds(broker.pid) - before) / args.messages * 1e6)
        finally:
            broker.terminate()
            broker.wait(10)
    tcp, ws = statistics.median(results["tcp"]), statistics.median(results["ws"])
    print(f"messages per run: {args.messages}, reps: {args.reps} (medians; all runs {results})")
    print(f"tcp: {tcp:,.0f} msg/s   ws: {ws:,.0f} msg/s   ws/tcp: {ws / tcp:.2f}")
    tcp_cpu, ws_cpu = statistics.median(cpu["tcp"]), statistics.median(cpu["ws"])
    print(f"broker CPU per message: tcp {tcp_cpu:.1f} us   ws {ws_cpu:.1f} us   "
          f"ws/tcp: {ws_cpu / tcp_cpu:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
