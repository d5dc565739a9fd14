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
- ``no_auth``: CONNECT -> CONNACK of a broker without a password file;
- ``wrong_known`` / ``wrong_unknown``: a wrong password for an existing user
  and for a user name not in the file (both refused 0x04; the unknown one is
  hashed against a dummy entry, so the two cost the same);
- ``storm``: ``--storm`` (100) CONNECTs with distinct wrong passwords at once
  from ``--storm-addresses`` (1) addresses (127.0.0.2, ...), then, while they
  are in flight, the first login of another user from ``--legit-source``
  (127.0.1.1, an address without failed logins): its
  CONNECT -> CONNACK time, and how the storm was answered (0x04 checked and refused, 0x03 refused unchecked by the
  bounded password-check queue).

- ``storm_one_name`` (``--storm-one-name``, REVIEW-SEC2 S2 residual): ``--storm-threads``
  (40) attackers guess ONE name's password for ``--storm-seconds`` (25), each
  attempt from a fresh address (``--storm-spread``: 127.1.x.y, 250 per /24, or
  each from a new /24); the name's device logged in once
  from 127.0.2.1 before.  Measured one after the other while the storm runs
  (``during_storm``), each uncached (a SIGHUP empties the success cache
  before it): the device's login from its known address, an untargeted
  user's first login, a login of the name from a new address (127.0.3.1), and
  the same with retries (``new_address_retried``: 0.5 s back-off after a
  0x03, up to 10 tries; time to 0x00);
  ``--baseline-root DIR`` runs the same against another checkout first
  (before/after in one run).

- ``mixed_file``: a wrong password in a file migrated from mosquitto (``$7$101``,
  ``$6$`` and one ``$7$100000`` entry) for each kind of entry and an unknown
  name: the same time for all (every check does the costliest entry's work).

Prints one JSON line. Every wait is bounded; the broker is stopped by its own handle.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mqttd.auth.passwd import DEFAULT_ITERATIONS, PasswordEntry, make_entry  # noqa: E402
from mqttd.blockingclient import BlockingClient  # noqa: E402
from mqttd.codec import PacketReader, encode  # noqa: E402
from mqttd.codec.packets import Connect, Pingreq  # noqa: E402
from bench.benchlib import start_mqttd, stop_process  # noqa: E402


def start_broker(workdir, extra, broker_root=None):
    # the broker on CPU 0 alone, when taskset is there
    return start_mqttd(Path(workdir), extra, timeout=30, broker_root=broker_root,
                       prefix=("taskset", "-c", "0") if shutil.which("taskset") else ())


def connect_ms(port, client_id, user=None, password=None):
    t = time.perf_counter()
    client = BlockingClient(port, client_id, username=user,
                            password=None if password is None else password.encode(),
                            timeout=30)
    elapsed = (time.perf_counter() - t) * 1000
    client.close()
    return elapsed


def connack(port, client_id, user, password, source="127.0.0.1", timeout=30.0):
    """``(ms, CONNACK return code)`` of one v3.1.1 CONNECT from ``source``
    (refusals are answers here, not errors); ``(ms, None)`` if closed first."""
    t = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))
    try:
        sock.sendall(encode(Connect(4, client_id, True, 0, user, password.encode()), 4))
        reader = PacketReader(level=4)
        packets = []
        while not packets:
            data = sock.recv(4096)
            if not data:
                return (time.perf_counter() - t) * 1000, None
            packets = reader.feed(data)
        return (time.perf_counter() - t) * 1000, packets[0].reason_code
    finally:
        sock.close()


def summary(values):
    values = sorted(values)
    return {"n": len(values), "p50_ms": round(statistics.median(values), 2),
            "max_ms": round(values[-1], 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--storm", type=int, default=100,
                    help="wrong-password CONNECTs at once [100]")
    ap.add_argument("--legit-source", default="127.0.1.1",
                    help="the address of the honest first login during the storm: one "
                         "without failed logins (the wrong_* figures come from 127.0.0.1) "
                         "[127.0.1.1]")
    ap.add_argument("--storm-addresses", type=int, default=1, choices=range(1, 250),
                    metavar="N", help="from N addresses 127.0.0.2... [1]")
    ap.add_argument("--storm-one-name", action="store_true",
                    help="only the storm_one_name scenario (see above)")
    ap.add_argument("--storm-threads", type=int, default=40)
    ap.add_argument("--storm-seconds", type=float, default=25.0)
    ap.add_argument("--storm-spread", choices=("network", "scattered"), default="network",
                    help="storm_one_name's fresh addresses: 250 per /24 (one host, an "
                         "IPv6 /48) or each from a new /24 (a botnet) [network]")
    ap.add_argument("--baseline-root", default=None,
                    help="with --storm-one-name: also measure this checkout, first")
    args = ap.parse_args()
    if args.storm_one_name:
        result = {}
        if args.baseline_root:
            result["baseline"] = storm_one_name(args, args.baseline_root)
        result["this"] = storm_one_name(args)
        print(json.dumps(result))
        return
    workdir = tempfile.mkdtemp(prefix="bench-connect-auth-")
    pw = os.path.join(workdir, "passwd")
    users = [f"user{i}" for i in range(2 * args.users + 2)]
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
        watcher_user = users[2 * args.users]
        watcher = BlockingClient(port, "watcher", username=watcher_user,
                                 password=("pw-" + watcher_user).encode())
        refused = []

        def first_login(client_id, user):
            try:
                connect_ms(port, client_id, user, "pw-" + user)
            except ConnectionError:  # 0x03: the bounded password-check queue was full
                refused.append(user)
        storm = [threading.Thread(target=first_login, args=(f"s{i}", u))
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
        result["ping_during_storm"]["first_logins_refused"] = len(refused)
        known, unknown = users[0], "nosuchuser"
        result["wrong_known"] = summary([connack(port, f"wk{i}", known, "wrong")[0]
                                         for i in range(args.repeat)])
        result["wrong_unknown"] = summary([connack(port, f"wu{i}", unknown, "wrong")[0]
                                           for i in range(args.repeat)])
        answers = collections.Counter()
        lock = threading.Lock()

        def attack(i):
            try:
                _ms, code = connack(port, f"a{i}", known, f"wrong{i}",
                                    source=f"127.0.0.{2 + i % args.storm_addresses}")
            except OSError as error:
                code = type(error).__name__
            with lock:
                answers[str(code)] += 1
        attackers = [threading.Thread(target=attack, args=(i,)) for i in range(args.storm)]
        for thread in attackers:
            thread.start()
        time.sleep(0.2)  # the storm is queued at the broker
        legit_user = users[2 * args.users + 1]  # never logged in: not cached
        legit_ms, legit_code = connack(port, "legit", legit_user, "pw-" + legit_user,
                                       source=args.legit_source)
        for thread in attackers:
            thread.join(60)
        result["storm"] = {"attackers": args.storm, "addresses": args.storm_addresses, "legit_first_login_ms": round(legit_ms, 2),
                           "legit_connack": legit_code, "storm_connacks": dict(answers)}
    finally:
        stop_process(proc)
    proc, port = start_broker(tempfile.mkdtemp(prefix="bench-connect-noauth-"), [])
    try:
        result["no_auth"] = summary([connect_ms(port, f"n{i}") for i in range(args.repeat)])
    finally:
        stop_process(proc)
    result["mixed_file"] = mixed_file_timing(args.repeat)
    print(json.dumps(result))


def _wait_for_log(path: Path, text: str, timeout: float = 15.0, count: int = 1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.read_text(errors="replace").count(text) >= count:
            return True
        time.sleep(0.05)
    return False


def storm_one_name(args, broker_root=None) -> dict:
    """The S2-residual scenario (see the module docstring); one JSON object."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-connect-one-name-"))
    pw = str(workdir / "passwd")
    with open(pw, "w") as f:
        for user in ("dashboard", "other"):
            f.write(make_entry(user, "pw-" + user).line() + "\n")
    proc, port = start_broker(workdir, ["--password-file", pw], broker_root)
    out = {"broker": str(broker_root or ROOT), "threads": args.storm_threads,
           "seconds": args.storm_seconds, "spread": args.storm_spread}
    try:
        _ms, code = connack(port, "device", "dashboard", "pw-dashboard", source="127.0.2.1")
        assert code == 0, code
        reloads = [0]

        def reload_cache():
            """SIGHUP: the password file is read again, the success cache emptied."""
            reloads[0] += 1
            proc.send_signal(signal.SIGHUP)
            if not _wait_for_log(workdir / "broker.log", "Reloaded password_file",
                                 count=reloads[0]):
                raise RuntimeError("no reload after SIGHUP")
        reload_cache()
        answers = collections.Counter()
        lock = threading.Lock()
        counter = [0]
        stop = time.monotonic() + args.storm_seconds

        def attacker(t):
            while time.monotonic() < stop:
                with lock:
                    counter[0] += 1
                    n = counter[0]
                if args.storm_spread == "scattered":   # every attempt from a new /24
                    source = f"127.{1 + n % 200}.{n // 200 % 250}.1"
                else:                                    # a few /24s (one host's addresses)
                    source = f"127.1.{n // 250 % 250}.{1 + n % 250}"
                try:
                    _ms, code = connack(port, f"atk{t}", "dashboard", f"wrong{n}",
                                        source=source, timeout=15)
                except OSError as error:
                    code = type(error).__name__
                with lock:
                    answers[str(code)] += 1
        threads = [threading.Thread(target=attacker, args=(t,))
                   for t in range(args.storm_threads)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)   # the storm is established

        def measure(name, client_id, user, source, retry=False):
            """One uncached login (a SIGHUP empties the success cache first)."""
            reload_cache()
            t0 = time.perf_counter()
            tries, code = 0, None
            while tries < (10 if retry else 1) and code != 0:
                if tries:
                    time.sleep(0.5)
                tries += 1
                _ms, code = connack(port, client_id, user, "pw-" + user, source=source)
            out[name] = {"ms": round((time.perf_counter() - t0) * 1000, 1), "connack": code,
                         "during_storm": time.monotonic() < stop}
            if retry:
                out[name]["tries"] = tries
        measure("known_address", "device", "dashboard", "127.0.2.1")
        measure("other_user", "other", "other", "127.0.4.1")
        measure("new_address", "device2", "dashboard", "127.0.3.1")
        measure("new_address_retried", "device3", "dashboard", "127.0.3.2", retry=True)
        for thread in threads:
            thread.join(60)
        out["storm_connacks"] = dict(answers)
    finally:
        stop_process(proc)
    return out


def mixed_file_timing(repeat: int) -> dict:
    """Median CONNECT -> CONNACK of a wrong password in a file migrated from
    mosquitto ($7$101 entries, a $6$ one, one mqttd $7$100000 entry) for an
    old entry, the $6$ one, the new one and an unknown name, interleaved:
    equal when every check does the costliest entry's work (REVIEW-SEC S1)."""
    workdir = tempfile.mkdtemp(prefix="bench-connect-mixed-")
    pw = os.path.join(workdir, "passwd")
    salt = os.urandom(12)
    with open(pw, "w") as f:
        for user in ("alice", "bob"):
            f.write(make_entry(user, "pw", iterations=101).line() + "\n")
        f.write(PasswordEntry("carol", "6", salt,
                              hashlib.sha512(b"pw" + salt).digest()).line() + "\n")
        f.write(make_entry("dan", "pw").line() + "\n")
    samples = {"old_7_101": [], "old_6": [], "new_7_100000": [], "unknown": []}
    names = {"old_7_101": "alice", "old_6": "carol", "new_7_100000": "dan", "unknown": "nobody"}
    # no failure budget here: every attempt must be hashed to be measured
    proc, port = start_broker(workdir, ["--password-file", pw, "--max-auth-failures", "0"])
    try:
        for i in range(repeat):
            for kind, user in names.items():
                samples[kind].append(connack(port, f"m{i}", user, "wrong")[0])
    finally:
        stop_process(proc)
    return {kind: round(statistics.median(values), 2) for kind, values in samples.items()}


if __name__ == "__main__":
    main()
