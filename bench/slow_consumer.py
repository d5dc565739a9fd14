#!/usr/bin/env python3
"""Longest delivery gap a healthy subscriber sees while another subscriber is frozen.

    .venv/bin/python bench/slow_consumer.py                      # 20 s, frozen subscriber
    .venv/bin/python bench/slow_consumer.py --mode flap          # freeze 6 s / drain 2 s, repeated
    .venv/bin/python bench/slow_consumer.py --broker-root /tmp/old-mqttd   # measure another checkout

Everything on 127.0.0.1: one ``twistd -n mqttd`` process (memory store), four
publishers flooding ``flood/<n>`` with QoS 1 (64-byte payloads, 50 in flight
each), one *healthy* subscriber to ``flood/#`` that reads and acknowledges
everything, and one *slow* subscriber to ``flood/#`` that stops reading
(``--mode frozen``: for the whole run; ``--mode flap``: frozen ``--freeze`` s,
then reads and acknowledges for ``--drain`` s, again and again).  ``--rate``
limits each publisher (messages/s) so that a draining subscriber can catch up,
which is what used to re-arm the hold on every freeze.

Reports the healthy subscriber's longest gap between two messages, the share
of the run spent in gaps longer than 0.5 s, messages received, and the broker's
publish rate.  Every wait is bounded; the broker is stopped through its own
process handle.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqttd.blockingclient import BlockingClient  # noqa: E402
from mqttd.codec import encode  # noqa: E402
from mqttd.codec.packets import Puback, Publish, Subscribe, Subscription  # noqa: E402
from bench.benchlib import start_mqttd, stop_process  # noqa: E402

def subscribe(port, client_id, rcvbuf=None) -> BlockingClient:
    c = BlockingClient(port, client_id)
    if rcvbuf:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    c.send(Subscribe(1, (Subscription("flood/#", 1),)))
    c.next_packet(10)   # SUBACK
    return c


def read_and_ack(client, until, arrivals=None, stop=None) -> int:
    """Read and PUBACK until ``until`` (monotonic) or ``stop`` is set; returns messages.

    Reads as fast as the socket delivers and acknowledges each chunk with one
    send, so a subscriber that drains catches up quickly."""
    n = 0
    sock = client.sock
    sock.settimeout(0.2)
    pending = client.pending
    while time.monotonic() < until and not (stop and stop.is_set()):
        if not pending:
            try:
                data = sock.recv(1 << 18)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            pending.extend(client.reader.feed(data))
        acks = []
        now = time.monotonic()
        for packet in pending:
            if isinstance(packet, Publish):
                n += 1
                if arrivals is not None:
                    arrivals.append(now)
                if packet.qos:
                    acks.append(encode(Puback(packet.packet_id), 4))
        pending.clear()
        if acks:
            try:
                sock.sendall(b"".join(acks))
            except OSError:
                break
    return n


def publisher(port, index, until, counts, window=50, rate=0.0):
    c = BlockingClient(port, f"bench-pub-{index}")
    payload = b"p" * 64
    pid = 0
    inflight = 0
    sent = 0
    started = time.monotonic()
    try:
        while time.monotonic() < until:
            batch = []
            allowed = (rate * (time.monotonic() - started) + window) if rate else float("inf")
            while inflight < window and sent + len(batch) < allowed:
                pid = pid % 65535 + 1
                batch.append(Publish(f"flood/{index}", payload, 1, packet_id=pid))
                inflight += 1
            if batch:
                c.send(*batch)
                sent += len(batch)
            if rate and not batch and inflight == 0:
                time.sleep(0.005)
                continue
            try:
                packet = c.next_packet(0.5)
            except socket.timeout:
                continue
            if isinstance(packet, Puback):
                inflight -= 1
    except (ConnectionError, OSError):
        pass
    counts[index] = sent
    c.sock.close()


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="mqttd-slow-"))
    extra = []
    if args.max_publisher_pause is not None:
        extra += ["--max-publisher-pause", str(args.max_publisher_pause)]
    proc, port = start_mqttd(workdir, extra, broker_root=args.broker_root)
    try:
        healthy = subscribe(port, "bench-healthy")
        slow = subscribe(port, "bench-slow", rcvbuf=65536)
        start = time.monotonic()
        until = start + args.duration
        arrivals = []
        counts = {}
        threads = [threading.Thread(target=read_and_ack, args=(healthy, until + 1, arrivals))]
        threads += [threading.Thread(target=publisher, args=(port, i, until, counts),
                                     kwargs={"rate": args.rate})
                    for i in range(args.publishers)]
        for t in threads:
            t.start()
        slow_read = 0
        if args.mode == "flap":
            t = start
            while t < until:
                time.sleep(min(args.freeze, max(0, until - t)))
                slow_read += read_and_ack(slow, min(until, time.monotonic() + args.drain))
                t = time.monotonic()
        for t in threads:
            t.join(args.duration + 30)
        times = [start] + [a for a in arrivals if a <= until] + [until]
        gaps = [b - a for a, b in zip(times, times[1:])]
        longest = max(gaps)
        stalled = sum(g for g in gaps if g > 0.5)
        result = {
            "mode": args.mode, "duration_s": args.duration,
            "broker": str(args.broker_root or ROOT),
            "longest_gap_s": round(longest, 3),
            "time_in_gaps_over_0.5s_pct": round(100 * stalled / args.duration, 1),
            "healthy_received": len(arrivals),
            "published": sum(counts.values()),
            "slow_read": slow_read,
        }
        healthy.sock.close()
        slow.sock.close()
        return result
    finally:
        stop_process(proc, 15)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("frozen", "flap"), default="frozen")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="messages per second per publisher (0: as fast as acknowledged)")
    parser.add_argument("--freeze", type=float, default=6.0)
    parser.add_argument("--drain", type=float, default=2.0)
    parser.add_argument("--max-publisher-pause", type=float, default=None)
    parser.add_argument("--broker-root", default=None,
                        help="checkout whose mqttd package to run (PYTHONPATH)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
