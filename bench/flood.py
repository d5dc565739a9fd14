#!/usr/bin/env python3
"""Longest gap an established client sees during a flood of short abusive connections.

    .venv/bin/python bench/flood.py                                 # 20,000 connections
    .venv/bin/python bench/flood.py --connections 100000 --workers 2
    .venv/bin/python bench/flood.py --broker-root /tmp/old-mqttd    # measure another checkout
    .venv/bin/python bench/flood.py --rss                           # item 2: huge declared lengths
    .venv/bin/python bench/flood.py --zombies 400                   # rate-limited clients that close

Everything on 127.0.0.1: one ``twistd -n mqttd`` process (memory store); a
*canary* pair (a subscriber of ``canary/t`` and a publisher sending one QoS 0
message every ``--interval`` s with its send time in the payload) and
``--workers`` processes that each keep ``--concurrency`` short connections in
flight until ``--connections`` in all were made: each connects and sends one
of: a malformed packet, a partial CONNECT, a CONNECT then nothing, a CONNECT
then DISCONNECT, or nothing at all — then closes.

Reports the canary's longest gap between two deliveries and its worst latency
during the flood, the connections per second achieved, the broker's CPU time
and its log lines per second.  ``--rss`` instead opens ``--sockets`` sockets
that each declare a 16 MiB CONNECT and send ``--body`` bytes of it, and reports
the broker's RSS before, while they are open and after they closed.  Every
wait is bounded; the broker is stopped through its own process handle.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqttd.blockingclient import BlockingClient  # noqa: E402
from mqttd.codec import encode  # noqa: E402
from mqttd.codec.wire import encode_varint as _varint  # noqa: E402
from mqttd.codec.packets import Connect, Disconnect, Publish, Subscribe, Subscription  # noqa: E402
from bench.benchlib import cpu_seconds, rss_kib, start_mqttd, stop_process  # noqa: E402


# --- the flood -------------------------------------------------------------------------------

_CONNECT = encode(Connect(4, "", True, 0), 4)
_PAYLOADS = [
    b"\xf0\x00",                                  # reserved packet type: malformed
    _CONNECT[:7],                                 # partial CONNECT, then close
    _CONNECT,                                     # CONNECT, then close without DISCONNECT
    _CONNECT + encode(Disconnect(), 4),           # a polite short session
    b"",                                          # connect and close
    b"\x10\xff\xff\xff\x7f",                      # a CONNECT declaring 256 MiB
]


def flood_worker(port: int, count: int, concurrency: int, deadline: float, seed: int,
                 out) -> None:
    """Open ``count`` short connections, ``concurrency`` at a time, until ``deadline``."""
    rng = random.Random(seed)
    sel = selectors.DefaultSelector()
    started = done = errors = 0
    open_socks = 0
    while done < count and time.monotonic() < deadline:
        while open_socks < concurrency and started < count:
            s = socket.socket()
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                errors += 1
                started += 1
                done += 1
                continue
            sel.register(s, selectors.EVENT_WRITE, rng.choice(_PAYLOADS))
            open_socks += 1
            started += 1
        for key, _ in sel.select(0.05):
            s = key.fileobj
            sel.unregister(s)
            try:
                if key.data:
                    s.send(key.data)
            except OSError:
                errors += 1
            s.close()
            open_socks -= 1
            done += 1
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    out.put((done, errors))


# --- the canary --------------------------------------------------------------------------------

def canary(port, stop, arrivals, interval) -> None:
    sub = BlockingClient(port, "canary-sub", timeout=30)
    sub.send(Subscribe(1, (Subscription("canary/t", 0),)))
    sub.next_packet(30)
    pub = BlockingClient(port, "canary-pub", timeout=30)

    def publish():
        seq = 0
        while not stop.is_set():
            pub.send(Publish("canary/t", struct.pack("!dI", time.monotonic(), seq)))
            seq += 1
            time.sleep(interval)

    t = threading.Thread(target=publish, daemon=True)
    t.start()
    while not stop.is_set():
        try:
            packet = sub.next_packet(0.5)
        except socket.timeout:
            continue
        except (ConnectionError, OSError):
            break
        if isinstance(packet, Publish):
            sent, _ = struct.unpack("!dI", packet.payload)
            now = time.monotonic()
            arrivals.append((now, now - sent))
    t.join(5)


def build_c_flood() -> str:
    """bench/.build/flood from bench/flood.c (gcc -O2), rebuilt when the source is newer."""
    src = ROOT / "bench" / "flood.c"
    out = ROOT / "bench" / ".build" / "flood"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(out), str(src)], check=True)
    return str(out)


def gaps(arrivals, start, end):
    inside = [a for a in arrivals if start <= a[0] <= end]
    times = [start] + [a[0] for a in inside] + [end]
    longest = max(b - a for a, b in zip(times, times[1:]))
    worst_latency = max((a[1] for a in inside), default=float("nan"))
    return longest, worst_latency, len(inside)


def run_flood(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mqttd-flood-") as tmp:
        workdir = Path(tmp)
        proc, port = start_mqttd(workdir, args.broker_arg, broker_root=args.broker_root)
        try:
            stop = threading.Event()
            arrivals = []
            t = threading.Thread(target=canary, args=(port, stop, arrivals, args.interval),
                                 daemon=True)
            t.start()
            time.sleep(1.0)
            cpu0 = cpu_seconds(proc.pid)
            log0 = (workdir / "broker.log").stat().st_size
            start = time.monotonic()
            deadline = start + args.timeout
            per = args.connections // args.workers
            if args.c_flood:
                binary = build_c_flood()
                procs = [subprocess.Popen([binary, str(port), str(per), str(args.concurrency),
                                           str(args.timeout)], stdout=subprocess.PIPE, text=True)
                         for _ in range(args.workers)]
                results = []
                for p in procs:
                    out_text, _ = p.communicate(timeout=args.timeout + 30)
                    r = json.loads(out_text)
                    results.append((r["connections"], r["errors"]))
            else:
                out = multiprocessing.Queue()
                workers = [multiprocessing.Process(
                    target=flood_worker, args=(port, per, args.concurrency, deadline, i, out))
                    for i in range(args.workers)]
                for w in workers:
                    w.start()
                results = [out.get(timeout=args.timeout + 30) for _ in workers]
                for w in workers:
                    w.join(10)
            end = time.monotonic()
            time.sleep(1.0)
            stop.set()
            t.join(10)
            longest, worst, received = gaps(arrivals, start, end)
            log_lines = sum(1 for _ in open(workdir / "broker.log", "rb")
                            .read()[log0:].splitlines())
            made = sum(r[0] for r in results)
            return {
                "connections": made,
                "connect_errors": sum(r[1] for r in results),
                "flood_seconds": round(end - start, 2),
                "connections_per_second": round(made / (end - start)),
                "canary_longest_gap_s": round(longest, 3),
                "canary_worst_latency_s": round(worst, 3),
                "canary_messages": received,
                "broker_cpu_s": round(cpu_seconds(proc.pid) - cpu0, 2),
                "broker_log_lines": log_lines,
                "broker_log_lines_per_second": round(log_lines / (end - start), 1),
                "broker_alive": proc.poll() is None,
            }
        finally:
            stop_process(proc)
            if args.keep_log:
                Path(args.keep_log).write_bytes((workdir / "broker.log").read_bytes())


def run_bad_publishes(args) -> dict:
    """One client sends --bad-publishes PUBLISHes the broker refuses ($SYS): log lines."""
    with tempfile.TemporaryDirectory(prefix="mqttd-logflood-") as tmp:
        workdir = Path(tmp)
        proc, port = start_mqttd(workdir, args.broker_arg, broker_root=args.broker_root)
        try:
            client = BlockingClient(port, "log-flood", timeout=30)
            log0 = (workdir / "broker.log").stat().st_size
            batch = encode(Publish("$SYS/x", b"p", 1, packet_id=1), 4) * 1000
            start = time.monotonic()
            for _ in range(args.bad_publishes // 1000):
                client.sock.sendall(batch)
            client.send(Publish("done/marker", b"", 1, packet_id=2))
            client.sock.settimeout(60)
            acks = 0
            while True:                           # every PUBACK, then the marker's
                packet = client.next_packet(60)
                acks += 1
                if getattr(packet, "packet_id", None) == 2:
                    break
            seconds = time.monotonic() - start
            data = (workdir / "broker.log").read_bytes()[log0:]
            lines = data.splitlines()
            return {"bad_publishes": args.bad_publishes, "acks": acks,
                    "seconds": round(seconds, 2), "log_lines": len(lines),
                    "log_bytes": len(data),
                    "log_lines_per_second": round(len(lines) / seconds, 2)}
        finally:
            stop_process(proc)


def run_rss(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mqttd-rss-") as tmp:
        workdir = Path(tmp)
        proc, port = start_mqttd(workdir, args.broker_arg, broker_root=args.broker_root)
        try:
            time.sleep(1.0)
            before = rss_kib(proc.pid)
            socks = []
            chunk = b"\x00" * 65536
            header = b"\x10" + _varint(args.declared)  # a CONNECT declaring --declared bytes
            for _ in range(args.sockets):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(header)
                socks.append(s)
            sent = [0] * len(socks)
            deadline = time.monotonic() + args.timeout
            for i, s in enumerate(socks):
                try:
                    s.settimeout(2)
                    while sent[i] < args.body and time.monotonic() < deadline:
                        s.sendall(chunk)
                        sent[i] += len(chunk)
                except OSError:
                    pass                          # refused and closed by the broker
            time.sleep(1.0)
            during = rss_kib(proc.pid)
            for s in socks:
                s.close()
            time.sleep(2.0)
            after = rss_kib(proc.pid)
            return {
                "sockets": args.sockets,
                "declared_bytes": args.declared,
                "bytes_sent_per_socket_max": max(sent),
                "rss_before_mib": round(before / 1024, 1),
                "rss_open_mib": round(during / 1024, 1),
                "rss_after_close_mib": round(after / 1024, 1),
                "growth_open_mib": round((during - before) / 1024, 1),
                "growth_after_close_mib": round((after - before) / 1024, 1),
            }
        finally:
            stop_process(proc)


def _close_wait(port: int) -> int:
    """Server sockets of ``port`` in CLOSE-WAIT (the client closed, the broker did not)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "08":
                count += 1
    return count


def run_zombies(args) -> dict:
    """``--zombies N`` (REVIEW-SEC2 N1): N clients from 127.0.1.x each CONNECT, write 2,500
    PUBLISHes (70 KB) in one write under ``--max-inbound-rate 10`` and close at once.
    Reports the broker's RSS and its sockets left in CLOSE-WAIT 3 s later."""
    def connect_packet(client_id: bytes) -> bytes:
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(client_id).to_bytes(2, "big") + client_id
        return bytes((0x10, len(body))) + body
    burst = b"".join(bytes((0x30, 26, 0, 1, ord("t"))) + b"x" * 23 for _ in range(2500))
    with tempfile.TemporaryDirectory(prefix="mqttd-zombies-") as tmp:
        proc, port = start_mqttd(Path(tmp), ["--max-inbound-rate", "10",
                                             "--max-inbound-bytes-rate", "10000",
                                             *args.broker_arg],
                                 broker_root=args.broker_root)
        try:
            time.sleep(1.0)
            before = rss_kib(proc.pid)
            started = time.monotonic()
            for n in range(args.zombies):
                with socket.socket() as s:
                    s.settimeout(10)
                    s.bind((f"127.0.1.{n % 250 + 1}", 0))
                    s.connect(("127.0.0.1", port))
                    s.sendall(connect_packet(b"zombie%d" % n))
                    s.recv(4)                                  # CONNACK
                    s.sendall(burst)
            written = time.monotonic() - started
            time.sleep(3.0)
            return {
                "clients": args.zombies,
                "bytes_each": len(burst),
                "seconds_to_write": round(written, 1),
                "rss_before_mib": round(before / 1024, 1),
                "rss_3s_after_mib": round(rss_kib(proc.pid) / 1024, 1),
                "close_wait_sockets_3s_after": _close_wait(port),
            }
        finally:
            stop_process(proc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=200, help="per worker")
    p.add_argument("--interval", type=float, default=0.01, help="canary publish interval, s")
    p.add_argument("--timeout", type=float, default=120.0, help="flood deadline, s")
    p.add_argument("--broker-root", default=None,
                   help="run the broker from this source tree (PYTHONPATH)")
    p.add_argument("--broker-arg", action="append", default=[],
                   help="extra mqttd option (repeatable)")
    p.add_argument("--c-flood", action="store_true",
                   help="flood from bench/flood.c (gcc) instead of Python workers: "
                        "fast enough to saturate the broker")
    p.add_argument("--keep-log", default=None, help="copy the broker's log here")
    p.add_argument("--bad-publishes", type=int, default=0,
                   help="instead: one client sends this many refused PUBLISHes; count log "
                        "lines (item 8)")
    p.add_argument("--rss", action="store_true", help="measure memory instead (item 2)")
    p.add_argument("--sockets", type=int, default=20)
    p.add_argument("--body", type=int, default=15 * 1024 * 1024,
                   help="--rss: bytes each socket tries to send")
    p.add_argument("--declared", type=int, default=16 * 1024 * 1024 - 16,
                   help="--rss: remaining length each CONNECT declares (default: just "
                        "under the default --max-packet-size)")
    p.add_argument("--zombies", type=int, default=0,
                   help="instead: this many rate-limited clients write 70 KB and close; "
                        "RSS and CLOSE-WAIT sockets left (REVIEW-SEC2 N1)")
    args = p.parse_args(argv)
    if args.zombies:
        result = run_zombies(args)
    elif args.bad_publishes:
        result = run_bad_publishes(args)
    elif args.rss:
        result = run_rss(args)
    else:
        result = run_flood(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
