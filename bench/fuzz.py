#!/usr/bin/env python3
"""Fuzz the codec and the connection in-process, or a running broker end to end.

    ./dev fuzz                                   # in-process: 10^6 inputs (codec + connection)
    ./dev fuzz --inputs 200000 --seed 7          # fewer, another seed
    ./dev fuzz --e2e --streams 20000             # mutated packet streams to a broker subprocess
    .venv/bin/python bench/fuzz.py --help

In-process mode feeds generated and mutated byte streams (valid packets of
every type at every protocol level, concatenated, then bit flips, byte
insertions and deletions, truncation, splices, rewritten Remaining Lengths,
rewritten first bytes, random bytes) to

* the codec (``PacketReader``): only ``MQTTError`` may come out; the same
  stream fed whole and in random chunks gives the same packets and the same
  error; a decoded packet encodes again and decodes to itself;
* ``ClientConnection`` (one broker on a ``task.Clock``, StringTransport
  clients, a valid or mutated CONNECT first, random clock steps): nothing may
  escape ``data_received``/``connection_lost``, nothing may be logged as a
  failure, and a canary subscriber on the same broker keeps getting messages.

End-to-end mode starts ``twistd -n mqttd`` on 127.0.0.1 and sends mutated
packet streams from ``--workers`` threads while a canary publisher and
subscriber check that every QoS 1 message arrives in order; any traceback or
unhandled error in the broker's log is a failure.

A failing input is written to ``--crash-dir`` (one file per input, with the
level and mode in its name) and the exit status is 1.  Everything is bounded
by ``--inputs``/``--streams`` and ``--timeout``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogPublisher  # noqa: E402

from mqttd.broker import Broker, BrokerConfig  # noqa: E402
from mqttd.codec import PacketReader, encode  # noqa: E402
from mqttd.codec.errors import MQTTError  # noqa: E402
from mqttd.codec.wire import encode_varint as _varint  # noqa: E402
from mqttd.codec.packets import (  # noqa: E402
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, Puback, Pubcomp,
    Publish, Pubrec, Pubrel, Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will)
from mqttd.connection import ClientConnection  # noqa: E402
from bench.benchlib import start_mqttd, stop_process  # noqa: E402

LEVELS = (3, 4, 5)


# --- seeds: valid packets of every type at every level ---------------------------------------

def _sample_packets(level: int) -> list:
    v5 = level == 5
    props = Properties(user_properties=(("k", "v"),), reason_string="why") if v5 else Properties()
    pub_props = Properties(message_expiry_interval=60, content_type="text/plain",
                           response_topic="r/t", correlation_data=b"c",
                           user_properties=(("a", "b"),), payload_format_indicator=1) \
        if v5 else Properties()
    will_props = Properties(will_delay_interval=0, message_expiry_interval=5) \
        if v5 else Properties()
    connect_props = Properties(session_expiry_interval=30, receive_maximum=10,
                               maximum_packet_size=4096, topic_alias_maximum=5,
                               request_problem_information=1) if v5 else Properties()
    sub_opts = dict(no_local=True, retain_as_published=True, retain_handling=1) if v5 else {}
    packets = [
        Connect(level, "fz", True, 30, username="u", password=b"p",
                will=Will("w/t", b"bye", 1, True, will_props), properties=connect_props),
        Connect(level, "fz2", False, 0),
        Connack(False, 0, props if v5 else Properties()),
        Publish("a/b", b"payload", 0),
        Publish("a/b", b"x" * 40, 1, True, False, 7, pub_props),
        Publish("c", b"", 2, False, True, 9),
        Puback(7), Pubrec(9), Pubrel(9), Pubcomp(9),
        Subscribe(3, (Subscription("a/+", 1, **sub_opts), Subscription("#", 2)),
                  Properties(subscription_identifiers=(4,)) if v5 else Properties()),
        Suback(3, (1, 0x80) if not v5 else (1, 0x8F)),
        Unsubscribe(4, ("a/+", "x/#")),
        Unsuback(4, (0, 0x11) if v5 else ()),
        Pingreq(), Pingresp(), Disconnect(),
    ]
    if v5:
        packets += [
            Puback(7, 0x10, props), Pubrec(9, 0x80), Disconnect(0x04, props),
            Disconnect(0x81), Auth(0x18, Properties(authentication_method="m",
                                                    authentication_data=b"d")),
            Publish("", b"alias", 1, False, False, 11, Properties(topic_alias=1)),
        ]
    return [(p, encode(p, level)) for p in packets]


SEEDS = {level: _sample_packets(level) for level in LEVELS}

_INTERESTING = (0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF, 0x10, 0x20, 0x30, 0x3F, 0x62, 0x82, 0xC0,
                0xE0, 0xF0)


def mutate(rng: random.Random, data: bytes, level: int) -> bytes:
    """1 to 4 random mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(10)
        n = len(buf)
        if op == 0 and n:                                   # flip a bit
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                                 # an interesting byte
            buf[rng.randrange(n)] = rng.choice(_INTERESTING)
        elif op == 2:                                       # insert random bytes
            i = rng.randint(0, n)
            buf[i:i] = os.urandom(rng.randint(1, 8))
        elif op == 3 and n:                                 # delete a range
            i = rng.randrange(n)
            del buf[i:i + rng.randint(1, 8)]
        elif op == 4 and n:                                 # duplicate a range
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 16))
            buf[j:j] = buf[i:j]
        elif op == 5 and n > 1:                             # truncate
            del buf[rng.randrange(1, n):]
        elif op == 6:                                       # splice another seed in
            _, other = rng.choice(SEEDS[level])
            i = rng.randint(0, n)
            buf[i:i] = other[:rng.randint(1, len(other))]
        elif op == 7 and n > 1:                             # rewrite the Remaining Length
            value = rng.choice((0, 1, 2, 127, 128, 16383, 16384, 2 ** 21, 2 ** 28 - 1,
                                rng.randrange(256)))
            length = _varint(value) if rng.random() < 0.9 else b"\xff\xff\xff\xff\x7f"
            end = 1
            while end < n and end < 5 and buf[end] & 0x80:
                end += 1
            buf[1:end + 1] = length
        elif op == 8 and n:                                 # rewrite the first byte
            buf[0] = rng.randrange(256)
        else:                                               # random tail
            buf += os.urandom(rng.randint(1, 32))
    return bytes(buf)


def generate(rng: random.Random, level: int) -> bytes:
    """A stream: 1-5 seed packets, usually mutated; sometimes random bytes."""
    r = rng.random()
    if r < 0.03:
        return os.urandom(rng.randint(0, 64))
    stream = b"".join(rng.choice(SEEDS[level])[1] for _ in range(rng.randint(1, 5)))
    return stream if r < 0.1 else mutate(rng, stream, level)


def _chunks(rng: random.Random, data: bytes) -> list:
    out = []
    i = 0
    while i < len(data):
        step = rng.choice((1, 2, 3, 7, 64, len(data)))
        out.append(data[i:i + step])
        i += step
    return out


# --- in-process targets ------------------------------------------------------------------------

class Finding(Exception):
    pass


def _decode_all(level, data, chunks, max_size):
    reader = PacketReader(level=level, max_packet_size=max_size)
    packets = []
    error = None
    try:
        for chunk in chunks:
            packets += reader.feed(chunk)
    except MQTTError as e:
        error = type(e)
        packets += e.decoded_before
    return packets, error, reader.level


def fuzz_codec_one(rng: random.Random, data: bytes, level: int) -> None:
    start_level = level if rng.random() < 0.85 else None
    max_size = rng.choice((268_435_460, 268_435_460, 1024, 64))
    try:
        whole = _decode_all(start_level, data, [data], max_size)
        pieces = _decode_all(start_level, data, _chunks(rng, data), max_size)
    except Exception as e:
        raise Finding(f"codec raised {type(e).__name__}: {e}") from e
    if whole[:2] != pieces[:2]:
        raise Finding(f"whole and chunked feeds differ: {whole[:2]!r} vs {pieces[:2]!r}")
    packets, _, decoded_level = whole
    for packet in packets:
        if decoded_level is None:
            break
        try:
            again = PacketReader(level=decoded_level if not isinstance(packet, Connect)
                                 else None).feed(encode(packet, decoded_level))
        except Exception as e:
            raise Finding(f"decoded {packet!r} does not re-encode/decode at level "
                          f"{decoded_level}: {type(e).__name__}: {e}") from e
        if again != [packet] and not _equal_but_raw(again, packet):
            raise Finding(f"round trip changed {packet!r} into {again!r}")


def _equal_but_raw(again, packet) -> bool:
    # Publish keeps the raw bytes it was decoded from; compare without them
    if len(again) != 1 or not isinstance(packet, Publish):
        return False
    a = again[0]
    return (a.topic, a.payload, a.qos, a.retain, a.dup, a.packet_id, a.properties) == (
        packet.topic, packet.payload, packet.qos, packet.retain, packet.dup,
        packet.packet_id, packet.properties)


class _FailureLog:
    """Collects log events that report a failure (a traceback) or an error."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        if "log_failure" in event or event.get("log_level") is not None and \
                event["log_level"].name in ("error", "critical"):
            self.events.append(event)


class ConnectionTarget:
    """One broker on a Clock; each input is one short connection."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.clock = Clock()
        self.broker = Broker(self.clock, None, BrokerConfig(
            max_queued_messages=50, max_inflight=5, connect_timeout=5.0, max_keepalive=60))
        self.canary = []
        self.broker.subscribe_local("canary/#", self.canary.append, qos=1)
        self.live = []

    def _connect_bytes(self, level: int) -> bytes:
        rng = self.rng
        packet, data = SEEDS[level][rng.randrange(2)]
        cid = f"fz{rng.randrange(20)}"          # a small pool: takeovers, bounded sessions
        packet = Connect(level, cid, rng.random() < 0.7, rng.choice((0, 10, 60)),
                         will=packet.will if rng.random() < 0.3 else None,
                         properties=packet.properties)
        return encode(packet, level)

    def one(self, data: bytes, level: int) -> None:
        rng = self.rng
        transport = StringTransport()
        conn = ClientConnection(self.broker, transport, self.clock, peer="127.0.0.1:1")
        stream = (self._connect_bytes(level) if rng.random() < 0.8 else b"") + data
        try:
            for chunk in _chunks(rng, stream):
                conn.data_received(chunk)
                if rng.random() < 0.05:
                    self.clock.advance(rng.choice((0, 0.5, 5, 50)))
            if rng.random() < 0.2 and not transport.disconnecting:
                self.live.append((conn, transport))      # stays open for a while
            else:
                conn.connection_lost(None)
            if len(self.live) > 30 or (self.live and rng.random() < 0.05):
                old, _ = self.live.pop(rng.randrange(len(self.live)))
                old.connection_lost(None)
        except Exception as e:
            raise Finding(f"ClientConnection raised {type(e).__name__}: {e}\n"
                          f"{traceback.format_exc()}") from e

    def check_canary(self, n: int) -> None:
        before = len(self.canary)
        self.broker.publish_message("canary/t", str(n).encode(), qos=1)
        self.clock.advance(0)
        if len(self.canary) != before + 1:
            raise Finding("the canary subscriber stopped getting messages")


def run_inprocess(args) -> dict:
    rng = random.Random(args.seed)
    crash_dir = Path(args.crash_dir)
    failures = _FailureLog()
    globalLogPublisher.addObserver(failures)
    target = ConnectionTarget(random.Random(args.seed + 1))
    counts = {"codec": 0, "connection": 0, "findings": 0}
    deadline = time.monotonic() + args.timeout
    started = time.monotonic()
    try:
        for i in range(args.inputs):
            if time.monotonic() > deadline:
                break
            level = rng.choice(LEVELS)
            data = generate(rng, level)
            mode = "connection" if rng.random() < args.connection_share else "codec"
            try:
                if mode == "codec":
                    fuzz_codec_one(rng, data, level)
                else:
                    target.one(data, level)
                    if counts["connection"] % 500 == 0:
                        target.check_canary(i)
                if failures.events:
                    event = failures.events[0]
                    failures.events.clear()
                    failure = event.get("log_failure")
                    raise Finding("logged: " + (failure.getTraceback() if failure is not None
                                                else str(event.get("log_format"))))
            except Finding as finding:
                counts["findings"] += 1
                crash_dir.mkdir(parents=True, exist_ok=True)
                path = crash_dir / f"{mode}-level{level}-{i}.bin"
                path.write_bytes(data)
                path.with_suffix(".txt").write_text(str(finding))
                print(f"FINDING {path}: {str(finding).splitlines()[0][:300]}", file=sys.stderr)
                if counts["findings"] >= args.max_findings:
                    break
            counts[mode] += 1
    finally:
        globalLogPublisher.removeObserver(failures)
    seconds = time.monotonic() - started
    return dict(counts, inputs=counts["codec"] + counts["connection"], seconds=round(seconds, 1),
                inputs_per_second=round((counts["codec"] + counts["connection"]) / seconds),
                seed=args.seed)


# --- end to end ----------------------------------------------------------------------------------

def _abuser(port, streams, seed, deadline, counter, lock) -> None:
    rng = random.Random(seed)
    target = ConnectionTarget.__new__(ConnectionTarget)
    target.rng = rng
    for _ in range(streams):
        if time.monotonic() > deadline:
            return
        level = rng.choice(LEVELS)
        data = generate(rng, level)
        prefix = target._connect_bytes(level) if rng.random() < 0.8 else b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                for chunk in _chunks(rng, prefix + data):
                    s.sendall(chunk)
                s.settimeout(0.05 if rng.random() < 0.9 else 0.3)
                try:
                    while s.recv(65536):
                        pass
                except (socket.timeout, OSError):
                    pass
        except OSError:
            pass
        with lock:
            counter[0] += 1


def run_e2e(args) -> dict:
    from mqttd.blockingclient import BlockingClient

    with tempfile.TemporaryDirectory(prefix="mqttd-fuzz-") as tmp:
        workdir = Path(tmp)
        proc, port = start_mqttd(workdir, args.broker_arg, persistence=f"file:{workdir / 'data'}",
                                 sys_interval=1)
        problems = []
        sent = received = 0
        counter = [0]
        try:
            sub = BlockingClient(port, "canary-sub", clean=True, timeout=30)
            sub.send(Subscribe(1, (Subscription("canary/t", 1),)))
            sub.next_packet(30)
            pub = BlockingClient(port, "canary-pub", clean=True, timeout=30)
            deadline = time.monotonic() + args.timeout
            lock = threading.Lock()
            per = max(1, args.streams // args.workers)
            threads = [threading.Thread(target=_abuser, daemon=True,
                                        args=(port, per, args.seed + i, deadline, counter, lock))
                       for i in range(args.workers)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                sent += 1
                pub.send(Publish("canary/t", str(sent).encode(), 1, packet_id=sent % 65535 + 1))
                got = None
                wait_until = time.monotonic() + 10
                while got is None and time.monotonic() < wait_until:
                    try:
                        packet = sub.next_packet(max(0.01, wait_until - time.monotonic()))
                    except socket.timeout:
                        break
                    if isinstance(packet, Publish):
                        got = packet
                        sub.send(Puback(packet.packet_id))
                if got is None or got.payload != str(sent).encode():
                    problems.append(f"canary message {sent} not delivered in order within 10 s "
                                    f"(got {got!r})")
                    break
                received += 1
                time.sleep(0.02)
            for t in threads:
                t.join(5)
            if proc.poll() is not None:
                problems.append(f"broker exited with {proc.returncode}")
        finally:
            stop_process(proc, 15)
            log_text = (workdir / "broker.log").read_text(errors="replace")
            for marker in ("Traceback (most recent call last)", "Unhandled error",
                           "Unhandled Error"):
                if marker in log_text:
                    i = log_text.index(marker)
                    problems.append("broker log: " + log_text[max(0, i - 300):i + 2000])
                    break
            if problems:
                crash_dir = Path(args.crash_dir)
                crash_dir.mkdir(parents=True, exist_ok=True)
                (crash_dir / f"e2e-seed{args.seed}-broker.log").write_text(log_text)
        return {"streams": counter[0], "canary_sent": sent, "canary_received": received,
                "problems": problems, "seed": args.seed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000, help="in-process inputs")
    p.add_argument("--connection-share", type=float, default=0.3,
                   help="share of in-process inputs fed to ClientConnection (rest: codec)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds, at most")
    p.add_argument("--crash-dir", default="bench/results/fuzz-crashes")
    p.add_argument("--max-findings", type=int, default=20)
    p.add_argument("--e2e", action="store_true", help="fuzz a broker subprocess instead")
    p.add_argument("--streams", type=int, default=20_000, help="e2e: mutated streams")
    p.add_argument("--workers", type=int, default=4, help="e2e: abusing threads")
    p.add_argument("--broker-arg", action="append", default=[],
                   help="e2e: extra mqttd option (repeatable)")
    args = p.parse_args(argv)
    if args.e2e:
        result = run_e2e(args)
        print(json.dumps(result, indent=2))
        return 1 if result["problems"] else 0
    result = run_inprocess(args)
    print(json.dumps(result, indent=2))
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
