"""``mqttd bridge import mosquitto.conf``: mosquitto bridge blocks to TOML.

Every ``connection NAME`` starts a bridge; the bridge directives after it (up
to the next ``connection``) belong to it, as in mosquitto.  ``include_dir DIR``
is followed as mosquitto does (the ``*.conf`` files of DIR in name order, read
in place of the line).  Global directives are skipped (warned), mosquitto's
older names ``clientid``/``username``/``password`` are read as
``remote_clientid``/``remote_username``/``remote_password``, booleans are
mosquitto's (``true``/``false``/``1``/``0``; anything else -- ``yes`` too -- is
an error, as in mosquitto), directives mqttd does not need are warnings, and a
bad value is an error naming the file and line.  TLS that mqttd cannot express
(``bridge_capath``, ``bridge_identity``/``bridge_psk``) is an error too: the
importer never prints a plaintext bridge for a TLS one.  The output is the
equivalent ``[[bridge]]`` tables for mqttd's ``--config`` file.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Tuple

from mqttd.bridge.config import (
    TOML_KEYS, BridgeConfig, BridgeConfigError, bridge_from_table)

#: mosquitto directives of a bridge block that mqttd has no use for (accepted, reported)
IGNORED = {
    "bridge_bind_address", "bridge_tls_version", "bridge_require_ocsp", "bridge_alpn",
    "bridge_reload_type",
    "bridge_receive_maximum", "bridge_session_expiry_interval",
    "bridge_max_packet_size", "bridge_max_topic_alias", "bridge_outgoing_retain_as_published",
    "idle_timeout", "start_type", "threshold", "local_username", "local_password",
    "keepalive", "cleansession_local",
}
_BOOLS = {"cleansession", "local_cleansession", "try_private", "round_robin", "notifications",
          "notifications_local_only", "bridge_outgoing_retain", "bridge_attempt_unsubscribe",
          "bridge_insecure"}
_INTS = {"keepalive_interval", "bridge_max_inflight", "bridge_hop_limit"}
#: mosquitto's older names of bridge directives (conf.c accepts both)
ALIASES = {"clientid": "remote_clientid", "username": "remote_username",
           "password": "remote_password"}
#: TLS directives mqttd cannot express: importing them would give a plaintext bridge
REFUSED = {
    "bridge_capath": "mqttd trusts a CA file only: put the certificates of the directory "
                     "in one PEM file and use bridge_cafile",
    "bridge_psk": "mqttd bridges do not support TLS-PSK; use certificates (bridge_cafile)",
    "bridge_identity": "mqttd bridges do not support TLS-PSK; use certificates "
                       "(bridge_cafile)",
}
#: include_dir nesting at most (a directory including itself stops here)
MAX_INCLUDE_DEPTH = 10


def _lines(text: str, source: str, depth: int = 0):
    """``(source, line number, stripped line)`` of ``text``, ``include_dir`` expanded."""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        directive, _, value = line.partition(" ")
        if directive != "include_dir":
            yield source, number, line
            continue
        directory = value.strip()
        if depth >= MAX_INCLUDE_DEPTH:
            raise BridgeConfigError(f"include_dir {directory!r} nested more than "
                                    f"{MAX_INCLUDE_DEPTH} deep", number, source)
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".conf"))
        except OSError as error:
            raise BridgeConfigError(f"include_dir {directory!r}: {error.strerror or error}",
                                    number, source) from None
        for name in names:
            path = os.path.join(directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    included = f.read()
            except (OSError, UnicodeDecodeError) as error:
                raise BridgeConfigError(f"include_dir {directory!r}: cannot read {path}: "
                                        f"{error}", number, source) from None
            yield from _lines(included, path, depth + 1)


def parse_mosquitto(text: str, source: str = "mosquitto.conf") -> Tuple[List[dict], List[str]]:
    """Bridge tables (TOML-shaped dicts) and warnings from a mosquitto.conf text.

    Raises :class:`BridgeConfigError` with the line number for a bad value.
    """
    tables: List[dict] = []
    lines_of: List[dict] = []
    warnings: List[str] = []
    current: Optional[dict] = None
    for where_file, number, line in _lines(text, source):
        directive, _, value = line.partition(" ")
        value = value.strip()
        directive = ALIASES.get(directive, directive)
        if directive == "connection":
            current = {"connection": value}
            tables.append(current)
            lines_of.append({"connection": (where_file, number)})
            continue
        if directive == "address":
            directive = "addresses"
        if current is None or (directive not in TOML_KEYS and directive not in IGNORED
                               and directive not in REFUSED
                               and not directive.startswith("bridge_")):
            if current is not None:
                warnings.append(f"{where_file}:{number}: {directive!r} is a global "
                                "directive, not a bridge one; not imported")
            continue
        if directive in REFUSED:
            raise BridgeConfigError(f"{directive} (bridge {current['connection']!r}): "
                                    f"{REFUSED[directive]}", number, where_file)
        if directive in IGNORED or directive not in TOML_KEYS:
            warnings.append(f"{where_file}:{number}: {directive} is not supported by mqttd; "
                            "skipped")
            continue
        where = lines_of[-1]
        where.setdefault(directive, (where_file, number))
        try:
            if directive == "topic":
                current.setdefault("topic", []).append(value)
                where.setdefault("topic:" + value, (where_file, number))
            elif directive == "addresses":
                current.setdefault("address", []).extend(value.replace(",", " ").split())
            elif directive in _BOOLS:
                # mosquitto's conf__parse_bool: true/1, false/0, nothing else
                if value not in ("true", "false", "1", "0"):
                    raise ValueError(f"{directive} must be true, false, 1 or 0 (as in "
                                     f"mosquitto), got {value!r}")
                current[directive] = value in ("true", "1")
            elif directive in _INTS:
                if not value.isdigit():
                    raise ValueError(f"{directive} must be an integer, got {value!r}")
                current[directive] = int(value)
            elif directive == "restart_timeout":
                current[directive] = [float(w) for w in value.split()]
            else:
                current[directive] = value
        except ValueError as error:
            raise BridgeConfigError(str(error), number, where_file) from None
    # validate each block, pointing at mosquitto.conf lines
    for index, table in enumerate(tables):
        try:
            bridge_from_table(table, index, check_files=False)
        except BridgeConfigError as error:
            where_file, number = _line_for(error.message, lines_of[index])
            raise BridgeConfigError(error.message, number, where_file) from None
    return tables, warnings


def _line_for(message: str, where: dict) -> Tuple[str, int]:
    for key, number in where.items():
        if key.startswith("topic:") and key[6:] in message:
            return number
    for key, number in where.items():
        if key != "connection" and not key.startswith("topic:") and key in message:
            return number
    return where["connection"]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        if len(value) > 1 and all(isinstance(x, str) for x in value):
            return "[\n" + "".join(f"    {_toml_value(x)},\n" for x in value) + "]"
        return "[" + ", ".join(_toml_value(x) for x in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def to_toml(tables: List[dict]) -> str:
    """``[[bridge]]`` tables in the key order of mosquitto's documentation."""
    order = list(TOML_KEYS)
    out = []
    for table in tables:
        out.append("[[bridge]]")
        for key in sorted(table, key=lambda k: order.index(k) if k in order else len(order)):
            out.append(f"{key} = {_toml_value(table[key])}")
        out.append("")
    return "\n".join(out)


def main(argv: List[str]) -> int:
    """``mqttd bridge import FILE``: print the TOML equivalent of FILE's bridges.

    Exit status 0, 2 for a usage error or a bad bridge (the line is named on
    stderr).
    """
    if len(argv) != 2 or argv[0] != "import" or argv[1] in ("-h", "--help"):
        print("usage: mqttd bridge import MOSQUITTO.CONF\n\n"
              "Print the [[bridge]] tables equivalent to the bridge sections of a\n"
              "mosquitto.conf, for mqttd's --config TOML file.",
              file=sys.stdout if argv[-1:] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[-1:] in (["-h"], ["--help"]) else 2
    path = argv[1]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        print(f"mqttd bridge import: cannot read {path}: {error}", file=sys.stderr)
        return 2
    try:
        tables, warnings = parse_mosquitto(text, path)
    except BridgeConfigError as error:
        print(f"mqttd bridge import: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not tables:
        print(f"mqttd bridge import: no 'connection' block in {path}", file=sys.stderr)
        return 2
    sys.stdout.write(f"# bridges imported from {path} by 'mqttd bridge import'\n\n")
    sys.stdout.write(to_toml(tables))
    return 0


__all__ = ["BridgeConfig", "main", "parse_mosquitto", "to_toml"]
