"""``mqttd why CLIENT TOPIC``: ask a running broker's admin API why a message
on TOPIC does (not) reach CLIENT, and print the answer for humans.

The admin API address comes from ``--admin URL`` or ``$MQTTD_ADMIN``
(default ``http://127.0.0.1:9884``, the port ``docs/admin.rst`` suggests); the token
from ``--token`` or ``$MQTTD_ADMIN_TOKEN``.  Exit status: 0 delivered or
queued, 1 not delivered (or maybe), 2 usage error, 3 the API could not be
reached or answered with an error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import List

from mqttd.logs import escape_controls

DEFAULT_ADMIN = "http://127.0.0.1:9884"
_MARK = {True: "ok ", False: "NO ", None: " - "}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqttd why", description="Why does (not) a message on TOPIC reach CLIENT? "
        "Asks the admin API of a running broker (--admin-listen).")
    parser.add_argument("client", help="the subscribing client id")
    parser.add_argument("topic", help="the topic the message is published to")
    parser.add_argument("--qos", type=int, choices=(0, 1, 2),
                        help="the QoS it is published with (default: explain for 1)")
    parser.add_argument("--publisher", help="the publishing client id (No Local, ACL)")
    parser.add_argument("--admin", default=os.environ.get("MQTTD_ADMIN", DEFAULT_ADMIN),
                        help=f"admin API base URL [$MQTTD_ADMIN or {DEFAULT_ADMIN}]")
    parser.add_argument("--token", default=os.environ.get("MQTTD_ADMIN_TOKEN"),
                        help="admin token [$MQTTD_ADMIN_TOKEN]")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds [10]")
    return parser


def fetch(base: str, path: str, params: dict, token=None, timeout: float = 10.0) -> dict:
    """GET ``base + path?params`` and decode the JSON; raises RuntimeError(one line)."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    try:
        # inside: a base that is no URL ("notaurl") raises ValueError here
        request = urllib.request.Request(f"{base.rstrip('/')}{path}?{query}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read().decode("utf-8")).get("error", error.reason)
        except ValueError:
            message = error.reason
        raise RuntimeError(f"{error.code}: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise RuntimeError(f"cannot reach the admin API at {base}: {reason}") from None


def render(answer: dict) -> str:
    """The explanation as text lines, for a terminal: what clients chose (topic
    filters, client ids, incident texts) has its control characters escaped
    (``\\r``, ``\\n``, ``\\x1b``: no forged line, no escape sequence)."""
    lines = [f"{answer['verdict'].upper()}: {answer['summary']}", ""]
    for step in answer["steps"]:
        lines.append(f"  [{_MARK[step['ok']]}] {step['check']}: {step['detail']}")
    if answer.get("nearest"):
        lines.append("")
        lines.append("  nearest subscriptions:")
        for entry in answer["nearest"]:
            lines.append(f"    {entry['filter']}: {entry['why']}")
    if answer.get("recent"):
        lines.append("")
        lines.append(f"  recent drops and refusals of {answer['client']}:")
        for incident in answer["recent"][-10:]:
            times = f" (x{incident['repeated']})" if incident.get("repeated", 1) > 1 else ""
            lines.append(f"    {incident['reason']}: {incident['text']}{times}")
    return "\n".join(escape_controls(line) for line in lines)


def main(argv: List[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    try:
        answer = fetch(args.admin, "/api/why", {"client": args.client, "topic": args.topic,
                                                "qos": args.qos, "publisher": args.publisher},
                       args.token, args.timeout)
    except RuntimeError as error:
        print(f"mqttd why: {error}", file=sys.stderr)
        return 3
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 0 if answer["verdict"] in ("delivered", "queued") else 1
