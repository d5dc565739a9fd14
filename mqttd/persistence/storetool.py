"""``mqttd store check|dump DIR``: inspect a data directory offline (like mosquitto_db_dump).

Reads a ``file:`` or ``dbm:`` data directory without changing it: the
checkpoint (snapshot or dbm) and every journal after it, with the same
resynchronising readers that recovery uses, so it shows exactly what a
broker started on the directory would recover and what damage would cost.

``check`` prints one line per file and a summary; exit status 0 when
everything is intact, 1 when something is damaged -- even if only single
flipped bits that recovery repairs without loss (``repaired``) -- with what
would be lost, 2 for a usage error or a directory that is not a data directory.
``dump`` prints the recovered sessions, subscriptions, queued/in-flight
messages and retained messages (``--json`` for a JSON document,
``--payloads`` to include payloads, hex-escaped).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import sys
from typing import List, Optional

from mqttd.messages import message_key
from mqttd.persistence.journal import (
    journal_path, list_journals, read_journal, replay_batches)
from mqttd.persistence.records import StoredState, drop_unreferenced


def _locked(path: str) -> bool:
    """True if a running broker holds the directory's LOCK."""
    lock = os.path.join(path, "LOCK")
    if not os.path.exists(lock):
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def inspect(path: str) -> dict:
    """Read ``path`` without side effects; returns a report dict with ``state``.

    Raises FileNotFoundError if ``path`` is not a directory.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    report = {"path": os.path.abspath(path), "kind": None, "files": [], "damaged": False,
              "locked": _locked(path)}
    state, generation = StoredState(), 0
    current = os.path.join(path, "CURRENT")
    snapshot = os.path.join(path, "snapshot.pkl")
    checkpoint = None
    if os.path.exists(current):
        from mqttd.persistence.dbmstore import DbmStore
        report["kind"] = "dbm"
        store = DbmStore(path, None)
        entry = {"file": "CURRENT"}
        try:
            with open(current, "rb") as f:
                generation, version = store._parse_current(f.read())
            entry["file"] = f"state.{generation}.dat"
            if version >= 3:
                checkpoint, _ = store.read_checkpoint(generation)
            else:
                checkpoint = store._read_dbm_v1(generation)
        except Exception as e:
            entry.update(status="unusable", error=str(e))
            report["damaged"] = True
            generation = 0
        report["files"].append(entry)
    elif os.path.exists(snapshot):
        from mqttd.persistence.filestore import SnapshotError, read_snapshot
        report["kind"] = "file"
        entry = {"file": "snapshot.pkl"}
        try:
            with open(snapshot, "rb") as f:
                checkpoint = read_snapshot(f.read())
        except SnapshotError as e:
            entry.update(status="unusable", error=str(e))
            report["damaged"] = True
        report["files"].append(entry)
    if checkpoint is not None:
        state, generation = checkpoint.state, checkpoint.generation
        entry = report["files"][-1]
        entry.update(status="ok" if checkpoint.intact else (
                         "repaired" if checkpoint.repaired and not checkpoint.damaged
                         and not any((checkpoint.lost or {}).values()) else "damaged"),
                     generation=generation, frames=checkpoint.frames,
                     repaired=checkpoint.repaired,
                     damaged_ranges=[list(r) for r in checkpoint.damaged],
                     damaged_bytes=sum(e - s for s, e in checkpoint.damaged),
                     expected=checkpoint.expected, lost=checkpoint.lost,
                     orphaned_sessions=list(checkpoint.orphans))
        if checkpoint.reason:
            entry["error"] = checkpoint.reason
        report["damaged"] |= not checkpoint.intact
    journals = [g for g in list_journals(path) if g >= generation]
    orphans: set = set()
    if journals and report["kind"] is None:
        report["kind"] = "file"
    for index, gen in enumerate(journals):
        with open(journal_path(path, gen), "rb") as f:
            data = f.read()
        read = read_journal(data, gen)
        replay_batches(state, read.batches, report["damaged"] or bool(read.damaged), orphans)
        last = index == len(journals) - 1
        torn_only = (not read.damaged and not read.header and not read.repaired
                     and read.torn_at is not None)
        if read.clean:
            status = "ok"
        elif torn_only and last:
            status = "torn tail"
        elif not read.damaged and not read.header and read.torn_at is None:
            status = "repaired"     # single flipped bits, nothing lost
        else:
            status = "damaged"
        entry = {"file": f"journal.{gen}", "status": status, "records": len(read.batches),
                 "operations": read.operations, "repaired": read.repaired,
                 "damaged_ranges": [list(r) for r in read.damaged],
                 "damaged_bytes": sum(e - s for s, e in read.damaged)}
        if read.header:
            entry["error"] = read.header
        if read.torn_at is not None:
            entry["torn_at"] = read.torn_at
        report["files"].append(entry)
        report["damaged"] |= status in ("damaged", "repaired")
    report["orphaned_sessions"] = sorted(orphans)
    if report["kind"] is None:
        raise FileNotFoundError(f"{path} holds no mqttd store (no snapshot.pkl, CURRENT "
                                f"or journal.<n>)")
    report["aside"] = sorted(n for n in os.listdir(path)
                             if ".damaged-" in n or ".corrupt-" in n or ".skipped-" in n)
    drop_unreferenced(state)      # as recovery does
    report["state"] = state
    report["counts"] = {"sessions": len(state.sessions),
                        "outbound": sum(len(s.outbound) for s in state.sessions.values()),
                        "retained": len(state.retained),
                        # the message table: each queued message once, however many
                        # sessions owe it (format 6)
                        "messages": len(state.messages),
                        "message_bytes": sum(len(m.topic) + len(m.payload)
                                             for m in state.messages.values())}
    return report


def _message_dict(message, payloads: bool) -> dict:
    out = {"topic": message.topic, "qos": message.qos, "retain": message.retain,
           "payload_bytes": len(message.payload)}
    if payloads:
        out["payload"] = message.payload.decode("latin-1").encode(
            "unicode_escape").decode("ascii")
    if message.expires_at is not None:
        out["expires_at"] = message.expires_at
    return out


def state_dict(state: StoredState, payloads: bool = False) -> dict:
    """A JSON-ready picture of ``state``."""
    sessions = {}
    for client_id, stored in sorted(state.sessions.items()):
        record = stored.record
        sessions[client_id] = {
            "protocol_level": record.protocol_level,
            "expiry_interval": record.expiry_interval,
            "disconnected_at": record.disconnected_at,
            "subscriptions": [{"filter": s.topic_filter, "qos": s.qos} for s in
                              record.subscriptions],
            "inbound_qos2": sorted(stored.inbound_qos2),
            "outbound": [dict(_message_dict(o.message, payloads), seq=o.seq, qos=o.qos,
                              packet_id=o.packet_id, stage=o.stage.name.lower(),
                              message_id=state.message_ids.get(message_key(o.message)))
                         for o in sorted(stored.outbound.values(), key=lambda o: o.seq)],
        }
    retained = [_message_dict(m, payloads) for _, m in sorted(state.retained.items())]
    return {"sessions": sessions, "retained": retained}


def _print_check(report: dict, out) -> None:
    print(f"{report['path']}: {report['kind']} store"
          + (" (LOCKED by a running broker: reading a live directory)"
             if report["locked"] else ""), file=out)
    for entry in report["files"]:
        details = [f"{k}={entry[k]}" for k in ("generation", "frames", "records",
                                               "operations", "repaired", "damaged_bytes",
                                               "torn_at")
                   if entry.get(k) not in (None, 0, [])]
        print(f"  {entry['file']}: {entry['status']}" + (f" ({', '.join(details)})"
                                                        if details else ""), file=out)
        if entry.get("error"):
            print(f"    {entry['error']}", file=out)
        for start, end in entry.get("damaged_ranges", [])[:20]:
            print(f"    damaged bytes {start}..{end}", file=out)
        if entry.get("lost"):
            print("    lost: {sessions} sessions, {outbound} queued messages, "
                  "{retained} retained messages".format(**entry["lost"]), file=out)
        if entry.get("orphaned_sessions"):
            print(f"    session records lost (messages kept): "
                  f"{', '.join(entry['orphaned_sessions'])}", file=out)
    if report.get("orphaned_sessions"):
        print(f"  session records lost in journals (messages kept): "
              f"{', '.join(report['orphaned_sessions'])}", file=out)
    for name in report["aside"]:
        print(f"  set aside earlier: {name}", file=out)
    counts = report["counts"]
    print(f"message table: {counts['messages']} messages ({counts['message_bytes']} bytes) "
          f"stored once for {counts['outbound']} queued/in-flight records", file=out)
    print(f"recoverable: {counts['sessions']} sessions, {counts['outbound']} queued/in-flight "
          f"messages, {counts['retained']} retained messages; "
          + ("DAMAGED" if report["damaged"] else "intact"), file=out)


def _print_dump(report: dict, payloads: bool, out) -> None:
    picture = state_dict(report["state"], payloads)
    for client_id, s in picture["sessions"].items():
        print(f"session {client_id!r} level={s['protocol_level']} "
              f"expiry={s['expiry_interval']} disconnected_at={s['disconnected_at']}", file=out)
        for sub in s["subscriptions"]:
            print(f"  subscription {sub['filter']!r} qos={sub['qos']}", file=out)
        if s["inbound_qos2"]:
            print(f"  inbound qos2 packet ids {s['inbound_qos2']}", file=out)
        for o in s["outbound"]:
            line = (f"  message seq={o['seq']} {o['stage']} qos={o['qos']} "
                    f"pid={o['packet_id']} id={o['message_id']} topic={o['topic']!r} "
                    f"{o['payload_bytes']} bytes")
            if payloads:
                line += f" payload={o['payload']}"
            print(line, file=out)
    for m in picture["retained"]:
        line = f"retained topic={m['topic']!r} qos={m['qos']} {m['payload_bytes']} bytes"
        if payloads:
            line += f" payload={m['payload']}"
        print(line, file=out)


def main(argv: Optional[List[str]] = None, out=None) -> int:
    """``mqttd store check|dump DIR [--json] [--payloads]``; returns the exit status."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="mqttd store", description="Inspect an mqttd data directory offline.")
    parser.add_argument("action", choices=("check", "dump"))
    parser.add_argument("directory")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--payloads", action="store_true",
                        help="dump: include payloads (escaped)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        report = inspect(args.directory)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"mqttd store: {e}", file=sys.stderr)
        return 2
    if args.json:
        document = {k: v for k, v in report.items() if k != "state"}
        if args.action == "dump":
            document.update(state_dict(report["state"], args.payloads))
        print(json.dumps(document, indent=2, default=str), file=out)
    elif args.action == "check":
        _print_check(report, out)
    else:
        _print_dump(report, args.payloads, out)
    return 1 if report["damaged"] else 0


__all__ = ["inspect", "main", "state_dict"]
