#!/usr/bin/env python3
"""CONNECT latency with a password file of 100,000-iteration $7$ hashes.

    .venv/bin/python bench/connect_auth.py [--users 20] [--repeat 20]

Starts ``twistd -n mqttd --password-file F`` on a free loopback port (broker on
CPU 0 with ``taskset`` when available) and measures, with the project's
BlockingClient:

- ``first``: CONNECT -> CONNACK of each user's first login (a PBKDF2 check in
  the reactor's thread pool);
- ``cached``: the same user logging in again (the success cache answers);
- ``ping_during_storm``: PINGREQ -> PINGRESP round trips of a connected client
  while ``--users`` first logins run concurrently (is the reactor thread free?);
- ``no_auth``: CONNECT -> CONNACK of a broker without a password file.

Prints one JSON line. Every wait is bounded; the broker is stopped by its own handle.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mqttd.auth.passwd import DEFAULT_ITERATIONS, make_entry  # noqa: E402
from mqttd.blockingclient import BlockingClient  # noqa: E402
from mqttd.codec.packets import Pingreq  # noqa: E402
from bench.benchlib import start_mqttd, stop_process  # noqa: E402


def start_broker(workdir, extra):
    # the broker on CPU 0 alone, when taskset is there
    return start_mqttd(Path(workdir), extra, timeout=30,
                       prefix=("taskset", "-c", "0") if shutil.which("taskset") else ())


def connect_ms(port, client_id, user=None, password=None):
    t = time.perf_counter()
    client = BlockingClient(port, client_id, username=user,
                            password=None if password is None else password.encode(),
                            timeout=30)
    elapsed = (time.perf_counter() - t) * 1000
    client.close()
    return elapsed


def summary(values):
    values = sorted(values)
    return {"n": len(values), "p50_ms": round(statistics.median(values), 2),
            "max_ms": round(values[-1], 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-connect-auth-")
    pw = os.path.join(workdir, "passwd")
    users = [f"user{i}" for i in range(2 * args.users + 1)]
    with open(pw, "w") as f:
        for user in users:
            f.write(make_entry(user, "pw-" + user).line() + "\n")
    result = {"iterations": DEFAULT_ITERATIONS, "cpus": os.cpu_count()}
    proc, port = start_broker(workdir, ["--password-file", pw])
    try:
        result["first"] = summary([connect_ms(port, f"c{i}", u, "pw-" + u)
                                   for i, u in enumerate(users[:args.users])])
        result["cached"] = summary([connect_ms(port, "again", users[0], "pw-" + users[0])
                                    for _ in range(args.repeat)])
        watcher = BlockingClient(port, "watcher", username=users[-1],
                                 password=("pw-" + users[-1]).encode())
        storm = [threading.Thread(target=connect_ms, args=(port, f"s{i}", u, "pw-" + u))
                 for i, u in enumerate(users[args.users:2 * args.users])]
        pings = []
        for thread in storm:
            thread.start()
        while any(t.is_alive() for t in storm) and len(pings) < 10000:
            t = time.perf_counter()
            watcher.send(Pingreq())
            watcher.next_packet(10)
            pings.append((time.perf_counter() - t) * 1000)
        for thread in storm:
            thread.join(60)
        watcher.close()
        result["ping_during_storm"] = summary(pings)
    finally:
        stop_process(proc)
    proc, port = start_broker(tempfile.mkdtemp(prefix="bench-connect-noauth-"), [])
    try:
        result["no_auth"] = summary([connect_ms(port, f"n{i}") for i in range(args.repeat)])
    finally:
        stop_process(proc)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
