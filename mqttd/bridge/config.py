"""Bridge configuration: mosquitto's directives as typed, validated values.

A bridge is one ``[[bridge]]`` table in mqttd's TOML file (``--config``)
whose keys are mosquitto's bridge directives, or one ``connection`` block
of a ``mosquitto.conf`` (see :mod:`mqttd.bridge.mosquitto`).  Both produce a
:class:`BridgeConfig`; every error is a :class:`BridgeConfigError` that names
the line at fault.

``topic`` lines keep mosquitto's syntax verbatim::

    topic PATTERN [[[out|in|both] QOS] LOCAL-PREFIX REMOTE-PREFIX]

(``""`` is an empty prefix; the local topic is ``LOCAL-PREFIX + PATTERN``, the
remote one ``REMOTE-PREFIX + PATTERN``; with an empty pattern the prefixes are
the whole topics, which then must not contain wildcards.)
"""
from __future__ import annotations

import socket
from typing import List, Optional, Tuple

import attrs
from attrs import validators as v

from mqttd import topics
from mqttd.codec.errors import MQTTError

DIRECTIONS = ("out", "in", "both")
PROTOCOLS = {"mqttv31": 3, "mqttv311": 4, "mqttv50": 5}


class BridgeConfigError(ValueError):
    """A bridge setting is wrong; ``line`` (1-based) and ``source`` say where."""

    def __init__(self, message: str, line: Optional[int] = None, source: str = ""):
        self.message = message
        self.line = line
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source or "bridge configuration"
        if self.line is not None:
            where = f"{where}, line {self.line}"
        return f"{where}: {self.message}"


def _no_wildcards(name: str, value: str) -> None:
    if "+" in value or "#" in value:
        raise ValueError(f"{name} {value!r} must not contain wildcards (+ or #)")


@attrs.frozen
class TopicMap:
    """One ``topic`` line.  ``to_remote``/``to_local`` map a topic name."""

    pattern: str
    direction: str = attrs.field(default="out", validator=v.in_(DIRECTIONS))
    qos: int = attrs.field(default=0, validator=v.in_((0, 1, 2)))
    local_prefix: str = ""
    remote_prefix: str = ""

    def __attrs_post_init__(self):
        _no_wildcards("local prefix", self.local_prefix)
        _no_wildcards("remote prefix", self.remote_prefix)
        if not self.pattern and not (self.local_prefix or self.remote_prefix):
            raise ValueError('an empty topic pattern ("") needs a local or remote prefix')
        for what, value in (("local", self.local_filter), ("remote", self.remote_filter)):
            try:
                topics.validate_topic_filter(value)
            except MQTTError as error:
                raise ValueError(f"{what} topic filter {value!r}: {error.message}") from None

    @property
    def local_filter(self) -> str:
        return self.local_prefix + self.pattern

    @property
    def remote_filter(self) -> str:
        return self.remote_prefix + self.pattern

    @property
    def outgoing(self) -> bool:
        return self.direction in ("out", "both")

    @property
    def incoming(self) -> bool:
        return self.direction in ("in", "both")

    def to_remote(self, local_topic: str) -> Optional[str]:
        """The remote name of ``local_topic``, or None if this line does not map it."""
        if not topics.matches(self.local_filter, local_topic):
            return None
        return self.remote_prefix + local_topic[len(self.local_prefix):]

    def to_local(self, remote_topic: str) -> Optional[str]:
        if not topics.matches(self.remote_filter, remote_topic):
            return None
        return self.local_prefix + remote_topic[len(self.remote_prefix):]

    def line(self) -> str:
        """The mosquitto ``topic`` line (without the keyword)."""
        def q(s):
            return '""' if s == "" else s
        parts = [q(self.pattern), self.direction, str(self.qos)]
        if self.local_prefix or self.remote_prefix:
            parts += [q(self.local_prefix), q(self.remote_prefix)]
        return " ".join(parts)


def parse_topic_line(text: str) -> TopicMap:
    """Parse ``PATTERN [[[out|in|both] QOS] LOCAL-PREFIX REMOTE-PREFIX]``.

    Split as mosquitto does (conf.c: ``strtok`` on spaces): the words are
    separated by blanks, ``""`` alone stands for an empty pattern or prefix,
    and nothing else is special -- ``'`` and ``\\`` are ordinary topic
    characters (a topic with a space cannot be written, as in mosquitto).

    Raises ValueError with what is wrong.
    """
    words = ["" if word == '""' else word for word in text.split()]
    if not words or len(words) > 5 or len(words) == 4:
        raise ValueError(f"topic {text!r}: expected PATTERN [[[out|in|both] QOS] "
                         "LOCAL-PREFIX REMOTE-PREFIX]")
    kwargs = {"pattern": words[0]}
    if len(words) >= 2:
        if words[1] not in DIRECTIONS:
            raise ValueError(f"topic {text!r}: direction must be out, in or both, "
                             f"not {words[1]!r}")
        kwargs["direction"] = words[1]
    if len(words) >= 3:
        if words[2] not in ("0", "1", "2"):
            raise ValueError(f"topic {text!r}: QoS must be 0, 1 or 2, not {words[2]!r}")
        kwargs["qos"] = int(words[2])
    if len(words) == 5:
        kwargs["local_prefix"], kwargs["remote_prefix"] = words[3], words[4]
    try:
        return TopicMap(**kwargs)
    except ValueError as error:
        raise ValueError(f"topic {text!r}: {error}") from None


def parse_address(text: str, default_port: int) -> Tuple[str, int]:
    """``HOST[:PORT]`` or ``[IPV6]:PORT`` / ``[IPV6]`` as ``(host, port)``.

    A bare IPv6 literal (``::1``) is refused rather than guessed at (its last
    group could be a port): write ``[::1]:1883``.  A host that is only digits
    (a port without its host) is refused too.

    :raises ValueError: with what is wrong and the form expected.
    """
    text = text.strip()
    expected = "must be HOST[:PORT] or [IPV6-ADDRESS][:PORT] with a port in 1..65535"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"address {text!r} {expected}")
        port = rest[1:] if rest else str(default_port)
    else:
        if text.count(":") > 1:
            raise ValueError(f"address {text!r}: an IPv6 address is written in brackets "
                             f"with its port, e.g. [{text}]:{default_port}")
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, str(default_port)
        if host.isdigit():
            raise ValueError(f"address {text!r} has no host (only a number): {expected}")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {text!r} {expected}")
    return host, int(port)


def _positive(instance, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _restart(instance, attribute, value):
    if len(value) not in (1, 2) or any(x <= 0 for x in value) or (
            len(value) == 2 and value[1] < value[0]):
        raise ValueError("restart_timeout must be N or BASE CAP with 0 < BASE <= CAP, "
                         f"got {' '.join(map(str, value))}")


def _keepalive(instance, attribute, value):
    if not 5 <= value <= 65535:
        raise ValueError(f"keepalive_interval must be 5..65535 seconds, got {value}")


@attrs.frozen
class BridgeConfig:
    """One bridge (mosquitto's ``connection`` block).

    Defaults are mosquitto's: ``remote_clientid`` ``<hostname>.<connection>``,
    ``local_clientid`` ``local.<remote_clientid>``, ``cleansession false``,
    ``try_private true``, ``keepalive_interval 60``, ``restart_timeout 5 30``,
    ``notifications true``.  ``max_inflight`` and ``hop_limit`` are mqttd's.
    """

    connection: str = attrs.field(validator=v.matches_re(r"[A-Za-z0-9_.\-]+"))
    addresses: Tuple[Tuple[str, int], ...] = attrs.field(validator=v.min_len(1))
    topics: Tuple[TopicMap, ...] = attrs.field(validator=v.min_len(1))
    remote_clientid: str = ""
    local_clientid: str = ""
    remote_username: Optional[str] = None
    remote_password: Optional[str] = None
    cleansession: bool = False
    local_cleansession: Optional[bool] = None
    try_private: bool = True
    protocol_version: str = attrs.field(default="mqttv311", validator=v.in_(tuple(PROTOCOLS)))
    keepalive_interval: int = attrs.field(default=60, validator=_keepalive)
    restart_timeout: Tuple[float, ...] = attrs.field(default=(5.0, 30.0), validator=_restart)
    round_robin: bool = False
    notifications: bool = True
    notifications_local_only: bool = False
    notification_topic: str = ""
    outgoing_retain: bool = True
    attempt_unsubscribe: bool = True
    cafile: Optional[str] = None
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    insecure: bool = False
    max_inflight: int = attrs.field(default=100, validator=[_positive, v.le(65535)])
    hop_limit: int = attrs.field(default=8, validator=_positive)

    def __attrs_post_init__(self):
        if not self.remote_clientid:
            object.__setattr__(self, "remote_clientid",
                               f"{socket.gethostname()}.{self.connection}")
        if not self.local_clientid:
            object.__setattr__(self, "local_clientid", f"local.{self.remote_clientid}")
        if self.local_cleansession is None:
            object.__setattr__(self, "local_cleansession", self.cleansession)
        if not self.notification_topic:
            object.__setattr__(self, "notification_topic",
                               f"$SYS/broker/connection/{self.remote_clientid}/state")
        if self.local_clientid == self.remote_clientid:
            raise ValueError("local_clientid and remote_clientid must differ")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("bridge_certfile and bridge_keyfile go together")
        if self.certfile is not None and self.cafile is None:
            raise ValueError("bridge_certfile needs bridge_cafile")
        if self.remote_password is not None and self.remote_username is None \
                and self.protocol_version != "mqttv50":
            raise ValueError("remote_password needs remote_username before MQTT 5")

    @property
    def protocol_level(self) -> int:
        return PROTOCOLS[self.protocol_version]

    @property
    def tls(self) -> bool:
        return self.cafile is not None

    def restart_policy(self):
        from mqttd.client import ConstantDelay, DecorrelatedJitter
        if len(self.restart_timeout) == 1:
            return ConstantDelay(self.restart_timeout[0])
        return DecorrelatedJitter(*self.restart_timeout)


# --- from TOML ---------------------------------------------------------------------

#: TOML key (mosquitto directive) -> BridgeConfig field
TOML_KEYS = {
    "connection": "connection",
    "address": "addresses",
    "addresses": "addresses",
    "topic": "topics",
    "remote_clientid": "remote_clientid",
    "local_clientid": "local_clientid",
    "remote_username": "remote_username",
    "remote_password": "remote_password",
    "cleansession": "cleansession",
    "local_cleansession": "local_cleansession",
    "try_private": "try_private",
    "bridge_protocol_version": "protocol_version",
    "keepalive_interval": "keepalive_interval",
    "restart_timeout": "restart_timeout",
    "round_robin": "round_robin",
    "notifications": "notifications",
    "notifications_local_only": "notifications_local_only",
    "notification_topic": "notification_topic",
    "bridge_outgoing_retain": "outgoing_retain",
    "bridge_attempt_unsubscribe": "attempt_unsubscribe",
    "bridge_cafile": "cafile",
    "bridge_certfile": "certfile",
    "bridge_keyfile": "keyfile",
    "bridge_insecure": "insecure",
    "bridge_max_inflight": "max_inflight",
    "bridge_hop_limit": "hop_limit",
}

_BOOLS = {"cleansession", "local_cleansession", "try_private", "round_robin", "notifications",
          "notifications_local_only", "outgoing_retain", "attempt_unsubscribe", "insecure"}
_INTS = {"keepalive_interval", "max_inflight", "hop_limit"}
_STRS = {"connection", "remote_clientid", "local_clientid", "remote_username",
         "remote_password", "protocol_version", "notification_topic", "cafile",
         "certfile", "keyfile"}


class TLSFileError(ValueError):
    """A bridge's TLS file is unusable; ``key`` is the setting that names it."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def load_tls_files(config: "BridgeConfig") -> dict:
    """Load and check the TLS files of ``config`` (which has ``bridge_cafile``).

    Returns ``{"trust": [every certificate of bridge_cafile, in file order],
    "chain": [certificate, its chain...] or [], "key": private key or None}``
    as ``cryptography`` objects.  Every certificate of ``bridge_cafile`` is
    trusted (a CA bundle), as mosquitto's ``SSL_CTX_load_verify_locations``.

    :raises TLSFileError: a file is missing, unreadable, holds no PEM
        certificate / unencrypted key, or the key does not fit the certificate.
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from mqttd.transports.tls import TLSConfigError, load_certificates, load_private_key
    key_name = "bridge_cafile"
    try:
        trust = load_certificates(config.cafile, "bridge_cafile")
        chain, key = [], None
        if config.certfile is not None:
            key_name = "bridge_certfile"
            chain = load_certificates(config.certfile, "bridge_certfile")
            key_name = "bridge_keyfile"
            key = load_private_key(config.keyfile)
            spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
                raise TLSConfigError(f"private key {config.keyfile!r} does not fit "
                                     f"bridge_certfile {config.certfile!r}")
    except TLSConfigError as error:
        raise TLSFileError(f"bridge {config.connection!r}: {error}", key_name) from None
    return {"trust": trust, "chain": chain, "key": key}


def _as_list(value) -> List[str]:
    if isinstance(value, list):
        return [str(x) for x in value]
    return [str(value)]


def bridge_from_table(table: dict, index: int = 0, text: str = "",
                      source: str = "", check_files: bool = True) -> BridgeConfig:
    """A :class:`BridgeConfig` from one parsed ``[[bridge]]`` table.

    ``index`` is the table's position and ``text`` the TOML source, used only
    to point at the line at fault in a :class:`BridgeConfigError`.  With
    ``check_files`` the TLS files are loaded and checked (:func:`load_tls_files`)
    so that ``check-config`` and start-up refuse a missing or bad one.
    """
    def fail(message, key=None, needle=None):
        raise BridgeConfigError(message, _find_line(text, index, key, needle), source)

    kwargs = {}
    for key, value in table.items():
        field = TOML_KEYS.get(key)
        if field is None:
            fail(f"unknown bridge setting {key!r}", key)
        try:
            if field == "addresses":
                if not isinstance(value, (str, list)) or (
                        isinstance(value, list) and not all(isinstance(v, str) for v in value)):
                    raise ValueError(f"address must be a string \"HOST[:PORT]\" (or a list "
                                     f"of them), got {value!r}")
                addresses = []
                for item in _as_list(value):
                    for word in item.replace(",", " ").split():
                        addresses.append(parse_address(word, 8883 if "bridge_cafile" in table
                                                       else 1883))
                kwargs[field] = tuple(addresses)
            elif field == "topics":
                maps = []
                for line in _as_list(value):
                    try:
                        maps.append(parse_topic_line(line))
                    except ValueError as error:
                        fail(str(error), key, line)
                kwargs[field] = tuple(maps)
            elif field == "restart_timeout":
                words = value if isinstance(value, list) else str(value).split()
                kwargs[field] = tuple(float(w) for w in words)
            elif field in _BOOLS:
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false, got {value!r}")
                kwargs[field] = value
            elif field in _INTS:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{key} must be an integer, got {value!r}")
                kwargs[field] = value
            else:
                if not isinstance(value, str):
                    raise ValueError(f"{key} must be a string, got {value!r}")
                kwargs[field] = value
        except BridgeConfigError:
            raise
        except (ValueError, TypeError) as error:
            fail(str(error), key)
    for required, key in (("connection", "connection"), ("addresses", "address"),
                          ("topics", "topic")):
        if required not in kwargs:
            fail(f"bridge needs {key!r}", None)
    try:
        config = BridgeConfig(**kwargs)
    except (ValueError, TypeError) as error:
        message = _clean_attrs_error(error)
        key = _key_of_error(message)
        if key is not None:   # speak of the setting as the user wrote it
            message = message.replace(f"'{TOML_KEYS[key]}'", key)
        fail(message, key)
    if check_files and config.tls:
        try:
            load_tls_files(config)
        except TLSFileError as error:
            fail(str(error), error.key)
    return config


def bridges_from_toml(tables, text: str = "", source: str = "",
                      check_files: bool = True) -> List[BridgeConfig]:
    """Every ``[[bridge]]`` table; names must be unique (``check_files``: see
    :func:`bridge_from_table`)."""
    if isinstance(tables, dict):
        tables = [tables]
    if not isinstance(tables, list):
        raise BridgeConfigError("'bridge' must be an array of tables ([[bridge]])",
                                _find_line(text, 0, None, None), source)
    result = []
    seen = {}
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            raise BridgeConfigError("each bridge must be a table ([[bridge]])", None, source)
        config = bridge_from_table(table, index, text, source, check_files)
        for other in result:
            if other.connection == config.connection:
                raise BridgeConfigError(f"two bridges named {config.connection!r}",
                                        _find_line(text, index, "connection", None), source)
            if other.local_clientid == config.local_clientid:
                raise BridgeConfigError(
                    f"bridges {other.connection!r} and {config.connection!r} share "
                    f"local_clientid {config.local_clientid!r}",
                    _find_line(text, index, "connection", None), source)
        seen[config.connection] = index
        result.append(config)
    return result


def _clean_attrs_error(error) -> str:
    if isinstance(error, TypeError) and "must be" in str(error):
        return str(error).split(" (got")[0]
    if isinstance(error, ValueError) and error.args and isinstance(error.args[0], str) \
            and "'" in error.args[0] and "must be in" in error.args[0]:
        return error.args[0].split(" (got")[0]
    return str(error.args[0]) if error.args else str(error)


def _key_of_error(message: str) -> Optional[str]:
    """The TOML key an attrs/validator message is about (the bridge_* name first)."""
    for key, field in sorted(TOML_KEYS.items(), key=lambda kv: -len(kv[0])):
        if key == "addresses":
            continue
        if f"'{field}'" in message or message.startswith(field + " ") \
                or message.startswith(key + " ") or f" {key} " in message:
            return key
    return None


def _find_line(text: str, index: int, key: Optional[str], needle: Optional[str]) -> Optional[int]:
    """The line of ``key`` (or of ``needle``) in the ``index``-th [[bridge]] table."""
    if not text:
        return None
    lines = text.splitlines()
    starts = [n for n, line in enumerate(lines) if line.strip().replace(" ", "") == "[[bridge]]"]
    if index >= len(starts):
        return None
    start = starts[index]
    end = len(lines)
    for n in range(start + 1, len(lines)):
        if lines[n].strip().startswith("["):   # the next table header
            end = n
            break
    if needle is not None:
        for n in range(start, end):
            if needle in lines[n] or repr(needle)[1:-1] in lines[n]:
                return n + 1
    if key is not None:
        for n in range(start, end):
            stripped = lines[n].strip()
            if stripped.startswith(key) and stripped[len(key):].lstrip().startswith("="):
                return n + 1
    return start + 1
