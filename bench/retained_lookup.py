#!/usr/bin/env python3
"""Cluster retained lookups: the per-level index walk against a key scan, on Redis.

Starts its own ``redis-server`` (ephemeral 127.0.0.1 port, no persistence, a
temporary directory), loads N retained messages ``site/<s>/dev/<d>/state``
(default 100,000 = 200 sites x 500 devices) through mqttd's cluster retained
store layout (values + per-level index, bulk-loaded), then times each filter:

* **index** -- :meth:`mqttd.cluster.retained.RedisRetained.match`, what a
  SUBSCRIBE on a cluster node runs (one pipelined round trip per wildcard
  level, then the values);
* **scan** -- the layout without an index: ``SCAN MATCH <literal prefix>*``
  over the value keys, each name tested with ``topics.matches``, then the
  values of the matches (what aedes-persistence-redis does, CLUSTER.md §1.2).

Both are checked to return the same topics.  Prints one line per filter
(median of ``--reps`` runs, milliseconds, and Redis commands sent), or JSON::

    .venv/bin/python bench/retained_lookup.py                 # 100k topics, 5 reps
    .venv/bin/python bench/retained_lookup.py --quick         # 2k topics, smoke mode
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mqttd import topics  # noqa: E402
from mqttd.cluster.backend import Backend  # noqa: E402
from mqttd.cluster.retained import RedisRetained, pack_message  # noqa: E402
from mqttd.messages import Message  # noqa: E402

FILTERS = ["site/17/dev/+/state", "site/+/dev/42/state", "+/17/dev/42/state", "site/17/#",
           "site/17/dev/42/state"]


def start_redis(workdir: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


async def wait(d):
    return await d.asFuture(asyncio.get_running_loop())


async def load(backend, redis: RedisRetained, sites: int, devices: int) -> int:
    """Bulk-load the values and the index (what put() would build, without its
    per-message round trips)."""
    counts = {}
    commands = []
    for s in range(sites):
        for d in range(devices):
            topic = f"site/{s}/dev/{d}/state"
            commands.append(("SET", redis.value_key(topic),
                             pack_message(Message(topic, b'{"on":true}', retain=True))))
            for key, field, weight in redis.index_entries(topic):
                counts[key, field] = counts.get((key, field), 0) + weight
            if len(commands) >= 5000:
                await wait(backend.pipeline(commands))
                commands = []
    commands += [("HSET", key, field, n) for (key, field), n in counts.items()]
    for i in range(0, len(commands), 5000):
        await wait(backend.pipeline(commands[i:i + 5000]))
    return sites * devices


async def scan_match(backend, redis: RedisRetained, topic_filter: str):
    """No index: SCAN the value keys under the filter's literal prefix, match, GET."""
    literal = []
    for level in topic_filter.split("/"):
        if level in ("+", "#"):
            break
        literal.append(level)
    prefix = "/".join(literal)
    pattern = redis.value_key(prefix) + ("/*" if prefix and len(literal) < len(
        topic_filter.split("/")) else "*")
    start = len(redis.value_key(""))
    cursor = 0
    names = []
    commands = 0
    while True:
        cursor, keys = await wait(backend.execute("SCAN", cursor, "MATCH", pattern,
                                                  "COUNT", 1000))
        commands += 1
        for key in keys:
            topic = key.decode()[start:]
            if topics.matches(topic_filter, topic):
                names.append(topic)
        if int(cursor) == 0:
            break
    values = await wait(backend.pipeline([("GET", redis.value_key(t)) for t in names]))
    commands += len(names)
    return [t for t, v in zip(names, values) if v is not None], commands


async def measure(port: int, sites: int, devices: int, reps: int) -> dict:
    backend = Backend(f"redis://127.0.0.1:{port}")
    redis = RedisRetained(backend, prefix="bench:")
    try:
        started = time.perf_counter()
        total = await load(backend, redis, sites, devices)
        loaded = time.perf_counter() - started
        rows = []
        for topic_filter in FILTERS:
            index_ms, scan_ms = [], []
            index_cmds = scan_cmds = 0
            for _ in range(reps):
                before = redis.commands
                t0 = time.perf_counter()
                found = await wait(redis.match(topic_filter))
                index_ms.append((time.perf_counter() - t0) * 1000)
                index_cmds = redis.commands - before
                t0 = time.perf_counter()
                scanned, scan_cmds = await scan_match(backend, redis, topic_filter)
                scan_ms.append((time.perf_counter() - t0) * 1000)
                if sorted(m.topic for m in found) != sorted(scanned):
                    raise SystemExit(f"{topic_filter}: index and scan disagree")
            rows.append({"filter": topic_filter, "matches": len(found),
                         "index_ms": round(statistics.median(index_ms), 2),
                         "index_commands": index_cmds,
                         "scan_ms": round(statistics.median(scan_ms), 2),
                         "scan_commands": scan_cmds})
        return {"retained": total, "load_seconds": round(loaded, 1), "reps": reps,
                "rows": rows}
    finally:
        await wait(backend.close())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="20 x 100 topics, 1 rep")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.quick:
        args.sites, args.devices, args.reps = 20, 100, 1
    workdir = tempfile.mkdtemp(prefix="mqttd-bench-redis-")
    proc, port = start_redis(workdir)
    try:
        result = asyncio.run(measure(port, args.sites, args.devices, args.reps))
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['retained']} retained topics (loaded in {result['load_seconds']} s), "
          f"median of {result['reps']}")
    print(f"{'filter':24} {'matches':>7} {'index ms':>9} {'cmds':>6} {'scan ms':>9} {'cmds':>6}")
    for row in result["rows"]:
        print(f"{row['filter']:24} {row['matches']:7d} {row['index_ms']:9.2f} "
              f"{row['index_commands']:6d} {row['scan_ms']:9.2f} {row['scan_commands']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
