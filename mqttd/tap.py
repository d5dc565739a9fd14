"""``twistd mqttd``: command line and TOML configuration (layer L6).

The only module that touches the global reactor.  Every option is one entry
of :data:`OPTIONS` (see :mod:`mqttd.options`): adding an option is adding one
line there and one row to the README options table (``tests/test_tap.py``
checks both agree).  Every option can also be given in the TOML file named by
``--config`` (same key, ``-`` or ``_``); the command line wins over the file,
``--port``/``--listen`` included.

A wrong value is a one-line error naming the option and exit status 2, under
``twistd mqttd`` as under ``mqttd run``; ``--check-config`` checks everything
(files readable, endpoints parseable, store spec) and exits 0 without starting.
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Dict, List

from twisted.python import usage

from mqttd.broker import BrokerConfig
from mqttd.options import (
    ConfigError, Option, boolean, choice, duration, endpoint, flag, hide_after_kind, hide_all,
    integer, number, text)
from mqttd.session import OverflowPolicy
from mqttd.shared import DEFAULT_STRATEGY as SHARED_DEFAULT, STRATEGIES as SHARED_STRATEGIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_STORE = "file:mqttd-data"
LOG_LEVELS = ("debug", "info", "warn", "error")


def _persistence(value: str) -> None:
    from mqttd.persistence import store_from_spec
    from twisted.internet.testing import MemoryReactor
    store_from_spec(value, MemoryReactor())  # raises ValueError; opens nothing


def _fsync(value: str) -> None:
    from mqttd.persistence.journal import parse_fsync_mode
    parse_fsync_mode(value)


def _password_file(value: str) -> None:
    from mqttd.auth.passwd import PasswordFileError, read_password_file
    try:
        read_password_file(value)
    except (OSError, PasswordFileError) as error:
        raise ValueError(str(error)) from None


def _acl_file(value: str) -> None:
    from mqttd.auth.acl import ACLFileError, read_acl_file
    try:
        read_acl_file(value)
    except (OSError, ACLFileError) as error:
        raise ValueError(str(error)) from None


def _cluster_url(value: str) -> None:
    from mqttd.cluster.backend import parse_url
    parse_url(value)   # ValueError, one line


def _node_id(value: str) -> None:
    from mqttd.cluster.node import check_node_id
    check_node_id(value)


def _redact_url(value) -> str:
    """A Redis URL with its password as ``***``."""
    from mqttd.cluster.backend import parse_url
    try:
        return parse_url(value).redacted()
    except ValueError:
        return "***"


def _listener_limit(value: str) -> None:
    description, sep, count = value.rpartition("=")
    if not sep or not description or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"expected ENDPOINT=N with N >= 1, got {value!r}")


def _strcred(value: str) -> None:
    from twisted.cred import strcred
    kind, _, argument = value.partition(":")
    if kind == "file" and not os.path.isfile(argument):
        # strcred only prints a warning for a missing file and then refuses everyone
        raise ValueError(f"'file': no such file {argument!r}")
    try:
        strcred.makeChecker(value)
    except Exception as error:  # strcred raises several kinds
        raise ValueError(f"{value.split(':')[0]!r}: {error}") from None


#: Every option of ``twistd mqttd``, in ``--help`` order.  One entry each.
OPTIONS: List[Option] = [
    Option("port", integer(0, 65535), "TCP port to listen on (shorthand for --listen tcp:PORT).",
           short="p", doc_default=".."),
    Option("listen", endpoint, "Listen on a Twisted server endpoint, e.g. "
           "tcp:1883:interface=127.0.0.1, mqtts:8883:privateKey=K:certKey=C, ws:9001, "
           "wss:9443:privateKey=K:certKey=C, haproxy:tcp:1884 (repeatable; "
           "docs/transports.rst).",
           default=["tcp:1883:interface=127.0.0.1"], repeatable=True),
    Option("config", text(), "TOML file with any of these options as keys.", short="c"),
    Option("check-config", flag, "Check the options and the config file, print the "
           "result and exit (0: fine, 2: not) without starting."),
    Option("persistence", text(_persistence), "Store: memory, file:PATH or dbm:PATH.",
           default=DEFAULT_STORE),
    Option("fsync", text(_fsync), "When acknowledged writes reach the disk: always, "
           "interval:MS or never. See docs/storage.rst for the risk.", default="always"),
    Option("broker-id", text(), "Name used in $SYS/<broker-id>/... (with --cluster: "
           "the node id, so that every node's $SYS tree is its own).", default="mqttd",
           field="broker_id"),
    Option("ready-file", text(), "Write a JSON file with pid and listening addresses "
           "once listening."),
    Option("sys-interval", number(0), "Seconds between $SYS statistics (0: off).",
           default=10.0),
    Option("log-level", choice(*LOG_LEVELS), "Lowest level logged (debug logs every "
           "message and every drop).", default="info"),
    Option("log-format", choice("text", "json"), "text lines, or one JSON object per line "
           "(twisted.logger's jsonFileLogObserver).", default="text"),
    Option("trace-client", text(), "Log every packet of this client id at info level "
           "(repeatable).", repeatable=True, field="trace_clients"),
    Option("max-queued-messages", integer(1), "Queue limit per session, messages.",
           default=100_000, field="max_queued_messages"),
    Option("max-queued-bytes", integer(1), "Queue limit per session, bytes (topic + payload "
           "+ MQTT 5 properties of each message).",
           default=64 * 1024 * 1024, field="max_queued_bytes"),
    Option("max-queued-bytes-total", integer(0), "Queued bytes of all sessions together; "
           "beyond it the overflow policy drops (0 = no cap).", default=1024 * 1024 * 1024,
           field="max_queued_bytes_total"),
    Option("max-sessions", integer(0), "Persistent sessions held at most; a CONNECT for "
           "one more discards an offline session (longest offline, owing no message first) "
           "of the user holding the most (if at least two more; fair share) or else of its "
           "own user, or without one is refused (v5 0x97, v3 0x03; 0 = no cap).", default=100_000,
           field="max_sessions"),
    Option("max-sessions-per-user", integer(0), "Persistent sessions one user name (the "
           "anonymous clients of one address, IPv6: /64, together: one) holds at most; one "
           "more discards its longest-offline session, or without one is refused "
           "(0 = no share).",
           default=10_000, field="max_sessions_per_user"),
    Option("overflow-policy", choice(*OverflowPolicy.ALL), "What a full queue drops.",
           default=OverflowPolicy.DROP_OLDEST, field="overflow_policy"),
    Option("bridge-dedup-window", number(0), "MQTT 3.1.1 mesh loop guard: seconds a "
           "message is remembered by topic and payload with the link it came "
           "from; a copy coming back over a bridge it was forwarded to is dropped "
           "(see docs/bridge.rst); 0 = off.", default=2.0),
    Option("queue-qos0", flag, "Queue QoS 0 messages for offline persistent sessions.",
           field="queue_qos0"),
    Option("max-inflight", integer(1, 65535), "Outbound QoS 1/2 window per client "
           "(v5: at most its Receive Maximum).", default=1000, field="max_inflight"),
    Option("max-inflight-bytes", integer(0), "Bytes (topic + payload + properties) of "
           "outbound QoS 1/2 messages in flight per client (mosquitto's "
           "max_inflight_bytes); more wait in the queue; a larger message goes alone "
           "(0 = no byte bound).", default=16 * 1024 * 1024, field="max_inflight_bytes"),
    Option("max-packet-size", integer(14, 268_435_460), "Largest packet accepted, bytes.",
           default=16 * 1024 * 1024, field="max_packet_size"),
    Option("max-connect-packet-size", integer(14, 268_435_460), "Largest packet accepted "
           "before CONNECT succeeds (the CONNECT with its will, AUTH packets), bytes; "
           "refused from the fixed header.",
           default=64 * 1024, field="max_connect_packet_size"),
    Option("connect-timeout", number(above=0), "Seconds to wait for CONNECT.",
           default=10.0, field="connect_timeout"),
    Option("max-keepalive", integer(0, 65535), "Largest keepalive granted, seconds, also "
           "bounding keepalive 0 (v5: Server Keep Alive; v3: CONNACK 0x02); 0 = any.",
           default=0, field="max_keepalive"),
    Option("max-session-expiry", integer(0, 0xFFFFFFFF), "Longest v5 session expiry "
           "granted, seconds.", field="max_session_expiry", doc_default="unlimited"),
    Option("persistent-client-expiration", duration, "Discard MQTT 3.x persistent "
           "sessions (clean session 0) disconnected this long: 1h, 2d, 3w, 1m (30 days), "
           "1y, as mosquitto's persistent_client_expiration; v5 sessions keep their own "
           "expiry.", field="persistent_client_expiration", doc_default="never"),
    Option("max-publisher-pause", number(0), "Seconds one congestion episode of a "
           "subscriber may hold publishers back (0: never).", default=5.0,
           field="max_publisher_pause"),
    Option("publisher-pause-recovery", number(0), "Seconds a subscriber that used up its "
           "pause must stay drained and healthy before it may hold publishers again; its "
           "client id, checked user and address hold no one for as long.",
           default=30.0, field="publisher_pause_recovery"),
    Option("metrics-listen", endpoint, "Serve Prometheus metrics at /metrics on this "
           "endpoint, e.g. tcp:9883:interface=127.0.0.1 (repeatable).", repeatable=True),
    Option("admin-listen", endpoint, "Serve the admin API and dashboard on this endpoint; "
           "beyond loopback only with --admin-token (repeatable).", repeatable=True),
    Option("admin-token", text(), "Bearer token the admin API requires "
           "(Authorization: Bearer TOKEN).", redact=hide_all),
    Option("admin-user", text(), "Broker user (checked by the broker's authenticator) "
           "allowed to use the admin API with HTTP Basic (repeatable).", repeatable=True),
    Option("no-publisher-backpressure", flag, "Drop for a congested subscriber instead "
           "of pausing its publishers."),
    Option("shared-subscription-strategy", choice(*SHARED_STRATEGIES), "How a $share/ "
           "group picks the member for a message.", default=SHARED_DEFAULT,
           field="shared_subscription_strategy"),
    Option("max-topic-alias", integer(0, 65535), "v5 Topic Alias Maximum announced to "
           "clients; 0 = no inbound aliases.", default=10, field="max_topic_alias"),
    Option("max-inflight-incoming", integer(1, 65535), "Unacknowledged inbound QoS 1/2 "
           "PUBLISHes per v5 client (the server's Receive Maximum; more gets DISCONNECT "
           "0x93).", default=65535, field="max_inflight_incoming"),
    Option("max-qos", integer(0, 2), "Highest QoS accepted in PUBLISH and wills and "
           "granted in SUBSCRIBE (mosquitto's maximum_qos).", default=2, field="max_qos"),
    Option("retain-available", boolean, "true or false: accept retained messages "
           "(mosquitto's retain_available).", default=True, field="retain_available"),
    Option("response-information", text(), "Prefix of the Response Information for v5 "
           "clients that request it (prefix + client id).", field="response_information",
           doc_default="none"),
    # --- security (mqttd.auth; see docs/security.rst) ---
    Option("password-file", text(_password_file), "mosquitto-format password file "
           "($7$, $6$; mqttd passwd writes it); reloaded on SIGHUP."),
    Option("acl-file", text(_acl_file), "mosquitto-format ACL file (user, topic, "
           "pattern with %c/%u); reloaded on SIGHUP."),
    Option("auth", text(_strcred), "A twisted.cred checker: unix, memory:USER:PASS:..., "
           "file:PATH (repeatable).", repeatable=True, redact=hide_after_kind),
    Option("allow-anonymous", flag, "Let clients without a user name in even when "
           "authentication or a non-loopback listener is configured."),
    Option("allow-session-takeover-by-other-user", flag, "Let another user name take over "
           "and resume a client id's session (otherwise refused while its owner is "
           "connected; an offline one is discarded).", field="allow_session_takeover_by_other_user"),
    Option("hook-timeout", number(above=0), "Seconds an authentication/authorization "
           "hook may take before it refuses.", default=10.0, field="hook_timeout"),
    Option("max-password-checks", integer(1), "Password-file hashes verified at once, all "
           "clients (own threads); the others wait, bounded, then get 0x9F.",
           doc_default="cores - 1, 1 to 4"),
    Option("max-password-checks-per-peer", integer(1), "Password-file hashes verified at "
           "once for one client address.", default=1),
    Option("max-auth-failures", integer(0), "Failed password-file logins of one user name "
           "(within --auth-failure-window) after which its logins from addresses with recent "
           "failures are refused without hashing (0x86 / v3 0x04); 0 = no budget.", default=5),
    Option("auth-failure-window", number(above=0), "Seconds without a failure after which "
           "a user name's or an address's failed logins are forgotten.", default=60.0),
    Option("max-connections", integer(0), "Open client connections, all listeners; "
           "0 = no limit.", default=0, field="max_connections"),
    Option("max-pending-connections-per-address", integer(0), "Sockets of one client "
           "address idle 1 s or more without a CONNECT; with that many, its next socket is "
           "closed at accept; 0 = no limit.", default=32,
           field="max_pending_connections_per_address"),
    Option("listener-max-connections", text(_listener_limit), "ENDPOINT=N: at most N "
           "open connections on that --listen endpoint (repeatable).", repeatable=True),
    Option("max-subscriptions-per-client", integer(0), "Subscriptions per session; "
           "0 = no limit.", default=10000, field="max_subscriptions_per_client"),
    Option("max-topic-filters-per-packet", integer(0), "Topic filters in one SUBSCRIBE "
           "or UNSUBSCRIBE; more: v5 DISCONNECT 0x97, v3 close; 0 = no limit.",
           default=1000, field="max_topic_filters_per_packet"),
    Option("max-user-properties", integer(0), "MQTT 5 User Properties one packet (or will) "
           "may carry; more: DISCONNECT (CONNECT: CONNACK) 0x97 Quota exceeded; 0 = no "
           "limit.", default=64, field="max_user_properties"),
    Option("max-topic-levels", integer(0), "Levels of a topic name or filter (as "
           "mosquitto: 200); more: v5 DISCONNECT 0x90 / SUBACK 0x8F, v3 close / 0x80; "
           "0 = no limit.", default=200, field="max_topic_levels"),
    Option("max-inbound-rate", number(0), "PUBLISH packets per second per client host "
           "(token bucket of one second shared by the host's live connections, charged per "
           "packet); over it their input is held (backpressure); a reconnect continues from "
           "the bucket it left; 0 = no limit.", default=0.0, field="max_inbound_rate"),
    Option("max-inbound-bytes-rate", number(0), "PUBLISH bytes per second per client host "
           "(same rules); 0 = no limit.", default=0.0, field="max_inbound_bytes_rate"),
    # --- cluster (mqttd.cluster; see docs/cluster.rst) ---
    Option("cluster", text(_cluster_url), "Join the cluster whose state is in this Redis: "
           "redis://HOST:PORT[/DB], rediss://..., redis+sentinel://H:P[,H:P]/SERVICE, "
           "redis+cluster://H:P[,H:P] (needs the asyncio reactor; docs/cluster.rst).",
           redact=_redact_url),
    Option("node-id", text(_node_id), "This node's name in the cluster: unique, "
           "[A-Za-z0-9._-], at most 64 characters.", doc_default="``HOSTNAME-PID``"),
    Option("cluster-heartbeat", number(above=0), "Seconds between a node's heartbeats "
           "in Redis.", default=1.0),
    Option("cluster-node-ttl", number(above=0), "Seconds without a heartbeat after which "
           "a node counts as dead (and a node that could not reach Redis that long has "
           "fenced itself); more than 2 heartbeats.", default=5.0),
    Option("cluster-wait-replicas", integer(0, 16), "Acknowledge QoS 1/2 and session changes "
           "only once this many Redis replicas have the writes (Redis WAIT, 1 s at most; "
           "fewer: no acknowledgement); 0 = the primary's acknowledgement is enough. "
           "Redis Cluster: one WAIT per primary written to.", default=0),
    Option("cluster-takeover-timeout", number(above=0), "Seconds a node taking a "
           "session over waits for the old owner node to hand it over (close the client "
           "with 0x8E, write what it had); after it the old owner's writes are fenced.",
           default=5.0),
    Option("cluster-inbox-maxlen", integer(1000), "Entries a node's inbox stream is "
           "trimmed to (approximately, MAXLEN ~): the backlog a slow or dead node may "
           "have before the oldest messages for it are lost.", default=1_000_000),
    # --- all cores of one machine (mqttd.cluster.workers; see docs/cluster.rst) ---
    Option("workers", integer(1, 1024), "With --cluster: run N worker processes (cluster "
           "nodes <node-id>-w1..wN) sharing the listening ports (SO_REUSEPORT); this "
           "process supervises them (restart with backoff, SIGTERM stops all).", default=1),
    Option("workers-sockets", choice("auto", "reuseport", "inherit"), "How --workers share "
           "a port: reuseport (each worker binds with SO_REUSEPORT), inherit (the supervisor "
           "listens and every worker adopts its sockets), auto (reuseport where the "
           "platform has it).", default="auto"),
]

#: Feature packages that add to the service built from the options:
#: ``"module:function"``, each called as ``function(service, options)`` by
#: :func:`makeService` in this order (one line per feature).
FEATURES: List[str] = [
    "mqttd.auth.setup:install",
    "mqttd.bridge.service:from_options",
    "mqttd.admin.service:install",
    "mqttd.cluster.service:from_options",
    "mqttd.cluster.sessionservice:from_options",
    "mqttd.cluster.retained:install",
]


def option(name: str) -> Option:
    for opt in OPTIONS:
        if opt.name == name:
            return opt
    raise KeyError(name)


def _field_option(field: str) -> str:
    for opt in OPTIONS:
        if opt.field == field:
            return opt.name
    return field.replace("_", "-")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the mqttd MQTT broker (MQTT 3.1, 3.1.1 and 5.0). "
                "Without --port/--listen it listens on tcp:1883 on loopback only; without "
                "--persistence it keeps durable state in ./mqttd-data.")

    optParameters = [
        [o.name, o.short, None, o.help + ("" if o.documented_default() == ".." else
                                          f" [default: {o.documented_default().strip('`')}]")]
        for o in OPTIONS if not o.is_flag and not o.repeatable]
    optFlags = [[o.name, o.short, o.help] for o in OPTIONS if o.is_flag]

    def __init__(self):
        super().__init__()
        for o in OPTIONS:
            if o.repeatable:
                self[o.name] = []
        #: where each value came from: "command line", the file name, or "default"
        self.sources: Dict[str, str] = {}
        self._config = None

    def opt_version(self):
        """Print mqttd's version and exit."""
        from mqttd import __version__
        print(f"mqttd {__version__}")
        raise SystemExit(0)

    # --- parsing ----------------------------------------------------------------------

    def parseOptions(self, options=None):
        """Parse and validate; under ``twistd`` a bad option is one line and exit 2."""
        #: the options as given (``--workers`` starts its workers with them)
        self.raw_args = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if self.parent is None:
                raise
            print(f"mqttd: error: {error}", file=sys.stderr)
            raise SystemExit(2)
        if self["check-config"] and self.parent is not None:
            print(check_report(self))
            raise SystemExit(0)

    def postOptions(self):
        given = {}
        for o in OPTIONS:
            value = self[o.name]
            if o.repeatable:
                if value:
                    given[o.name] = value
            elif o.is_flag:
                if value:
                    given[o.name] = True
            elif value is not None:
                given[o.name] = value
        from_file = self._read_file(given.get("config"))
        #: the validated [[bridge]] tables of the config file (BridgeConfig values)
        self["bridges"] = from_file.pop("bridge", [])
        # the command line wins; --port and --listen together decide the addresses
        if "port" in given or "listen" in given:
            from_file.pop("port", None)
            from_file.pop("listen", None)
        for o in OPTIONS:
            if o.name in given:
                self[o.name] = o.check(given[o.name])
                self.sources[o.name] = "command line"
            elif o.name in from_file:
                self[o.name] = o.check(from_file[o.name])
                self.sources[o.name] = self["config"]
            else:
                self[o.name] = [] if o.repeatable else (False if o.is_flag else None)
                self.sources[o.name] = "default"
        listen = list(self["listen"])
        if self["port"] is not None:
            listen.append(f"tcp:{self['port']}")
        self["listen"] = listen or list(option("listen").default)
        self._check_combinations()
        from mqttd.admin.service import check_admin_listen
        for description in self["admin-listen"]:
            try:
                check_admin_listen(description, self["admin-token"], self["admin-user"])
            except ValueError as error:
                raise ConfigError(f"--admin-listen: {error}") from None
        self._config = self._broker_config()

    def _check_combinations(self) -> None:
        """Options that are fine alone but cannot work together (ConfigError)."""
        for value in self["listener-max-connections"]:
            description = value.rpartition("=")[0]
            if description not in self["listen"]:
                raise ConfigError(f"--listener-max-connections: {description!r} is not one of "
                                  f"the --listen endpoints {self['listen']} (spell it as "
                                  f"given to --listen)")
        if self["cluster"] is None:
            for name in ("node-id", "cluster-heartbeat", "cluster-node-ttl",
                         "cluster-takeover-timeout", "cluster-wait-replicas",
                         "cluster-inbox-maxlen"):
                if self.sources.get(name) != "default":
                    raise ConfigError(f"--{name}: only with --cluster")
        elif (self["cluster-node-ttl"] or option("cluster-node-ttl").default) < 2 * (
                self["cluster-heartbeat"] or option("cluster-heartbeat").default):
            raise ConfigError("--cluster-node-ttl: must be at least twice --cluster-heartbeat "
                              "(one lost heartbeat must not make a node dead)")
        if (self["workers"] or 1) > 1 and not self.get("cluster"):
            raise ConfigError("--workers: needs --cluster (workers are cluster nodes sharing "
                              "Redis; without it they would be separate brokers on one port)")
        if (self["workers"] or 1) > 1 and self["node-id"]:
            from mqttd.cluster.node import check_node_id
            from mqttd.cluster.workers import worker_node_id
            try:
                check_node_id(worker_node_id(self["node-id"], self["workers"]))
            except ValueError as error:
                raise ConfigError(f"--node-id: with --workers the workers' ids "
                                  f"<node-id>-w<k>: {error}") from None
        if self["admin-user"] and not (self["password-file"] or self["auth"]):
            raise ConfigError("--admin-user: needs --password-file or --auth (the admin API "
                              "checks its users with the broker's authenticator; without one "
                              "no admin user can log in)")

    def _read_file(self, path) -> dict:
        if path is None:
            return {}
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"--config: cannot read {path}: {error}")
        known = {o.name: o for o in OPTIONS}
        values = {}
        spelled: Dict[str, str] = {}  # option name -> the key that gave it
        for key, value in data.items():
            if key == "bridge":   # [[bridge]] tables: see mqttd.bridge.config
                values["bridge"] = _bridges(path, value)
                continue
            name = key.replace("_", "-")
            opt = known.get(name)
            if opt is None or name == "config":
                raise ConfigError(f"{path}: unknown key {key!r}")
            if name in spelled:
                raise ConfigError(f"{path}: {spelled[name]!r} and {key!r} are the same "
                                  f"option --{name}; give it once")
            spelled[name] = key
            kind = getattr(opt.parse, "kind", None)
            items = value if (opt.repeatable and isinstance(value, list)) else [value]
            for item in items:
                if kind in ("integer", "number") and isinstance(item, str):
                    raise ConfigError(f"{path}: {key} must be a number, not the string "
                                      f"{item!r} (write it without quotes)")
            values[name] = value
        return values

    def _broker_config(self) -> BrokerConfig:
        kwargs = {}
        for o in OPTIONS:
            if o.field is None or self.sources.get(o.name) == "default":
                continue
            value = self[o.name]
            if value is None or (o.is_flag and not value):
                continue
            kwargs[o.field] = value
        if self["no-publisher-backpressure"]:
            kwargs["publisher_backpressure"] = False
        if self.get("cluster") and "broker_id" not in kwargs:
            # every node of a cluster would be $SYS/mqttd/...: a node's own
            # $SYS tree is named by its node id unless --broker-id says otherwise
            from mqttd.cluster.node import default_node_id
            kwargs["broker_id"] = self.get("node-id") or default_node_id()
        try:
            return BrokerConfig(**kwargs)
        except (TypeError, ValueError) as error:
            field, _, why = str(error).partition(": ")
            raise ConfigError(f"--{_field_option(field)}: {why or error}") from None

    def broker_config(self) -> BrokerConfig:
        """The validated :class:`BrokerConfig` of these options."""
        if self._config is None:
            self._config = self._broker_config()
        return self._config


def _repeatable(opt: Option):
    def append(self, value):
        self[opt.name].append(value)
    append.__doc__ = opt.help
    return append


# a repeatable option is an opt_NAME method of usage.Options (one per entry above)
for _opt in OPTIONS:
    if _opt.repeatable:
        setattr(Options, "opt_" + _opt.name.replace("-", "_"), _repeatable(_opt))


def _bridges(path, tables) -> list:
    """The ``[[bridge]]`` tables as BridgeConfig values; ConfigError names the line."""
    from mqttd.bridge.config import BridgeConfigError, bridges_from_toml
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return bridges_from_toml(tables, text, str(path))
    except BridgeConfigError as error:
        raise ConfigError(f"bad bridge: {error}") from None


#: options whose values check-config prints as '***'
SECRET_OPTIONS = frozenset({"admin-token"})


def check_report(options: Options) -> str:
    """What ``--check-config`` prints for options that parsed and validated."""
    lines = ["mqttd: configuration OK" + (f" ({options['config']})" if options["config"]
                                          else "")]
    for o in OPTIONS:
        if o.name in ("check-config", "config", "port", "listen"):
            continue
        source = options.sources.get(o.name, "default")
        if source == "default":
            continue
        lines.append(f"  {o.name} = {o.shown(options[o.name])!r}  ({source})")
    # --port and --listen together make the addresses: one line for both
    sources = sorted({options.sources.get(name, "default") for name in ("port", "listen")}
                     - {"default"}) or ["default"]
    lines.append(f"  listen = {options['listen']!r}  ({', '.join(sources)})")
    for bridge in options.get("bridges") or ():
        lines.append(f"  bridge {bridge.connection} -> "
                     + " ".join(f"{h}:{p}" for h, p in bridge.addresses)
                     + f" ({len(bridge.topics)} topic lines)")
    return "\n".join(lines)


def _one_line_for_cannot_listen(previous_hook):
    """``sys.excepthook`` that prints :class:`~mqttd.service.CannotStart`
    (cannot listen, cannot open the store) as one line (``twistd -n mqttd`` in
    the foreground) instead of a traceback, and exits with its ``exit_status``
    (the interpreter would exit 1 after any uncaught exception; twistd has
    already removed its pid file and the log lines are flushed)."""
    from mqttd.service import CannotStart

    def hook(kind, value, traceback):
        if isinstance(value, CannotStart):
            print(f"mqttd: {value}", file=sys.__stderr__)
            if value.exit_status != 1:
                for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(value.exit_status)
        else:
            previous_hook(kind, value, traceback)
    return hook


def _log_stream(options: Options):
    """Where twistd would write its log: --logfile PATH, else stdout."""
    parent = options.parent
    path = parent.get("logfile") if parent is not None else None
    if path and path != "-":
        from twisted.python.logfile import LogFile
        return LogFile.fromFullPath(path)
    return sys.stdout


def _log_observer(options: Options, settings):
    """The observer twistd logs to: ``--syslog`` (prefix ``--prefix``) or
    ``--logfile``/stdout in ``--log-format``; either with the level filter
    ``settings`` and the field bound of :mod:`mqttd.logs`."""
    from mqttd import logs
    parent = options.parent
    if parent.get("syslog"):
        return logs.make_syslog_observer(parent.get("prefix") or "mqttd", settings)
    return logs.make_observer(_log_stream(options), options["log-format"] or "text", settings)


def _log_level_reloader(options: Options, settings):
    """Re-read ``log-level`` from the config file (unless the command line set it)."""
    def reload():
        if options.sources.get("log-level") == "command line" or not options["config"]:
            return
        # only the log level: the rest of the file (bridges, ...) is the other
        # reloaders' business, a broken [[bridge]] must not fail this one too
        path = options["config"]
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"--config: cannot read {path}: {error}") from None
        level = option("log-level").check(data.get("log-level", data.get("log_level",
                                                                           "info")))
        settings.set_level(level)
    return reload


def install_signal_handlers(reactor, service) -> None:
    """SIGHUP runs ``service.reload()`` in the reactor thread (no connection dropped)."""
    import signal

    def on_sighup(_signum, _frame):
        reactor.callFromThread(service.reload)
    signal.signal(signal.SIGHUP, on_sighup)


def makeService(options: Options):
    import importlib

    if options["cluster"]:
        # redis.asyncio runs on Twisted's asyncio reactor: install it before
        # anything imports the default one (exit 2 if another is installed)
        from mqttd.cluster.reactor import require_asyncio_reactor
        require_asyncio_reactor()
    from twisted.internet import reactor

    from mqttd import logs
    from mqttd.service import make_broker_service

    sys.excepthook = _one_line_for_cannot_listen(sys.excepthook)
    settings = logs.LogSettings(options["log-level"] or "info")
    from mqttd.cluster import workers
    if workers.prepare_worker() is None and (options["workers"] or 1) > 1:
        # this process supervises the workers and runs no broker itself
        supervisor = workers.make_supervisor(options, reactor)
        if options.parent is not None:
            supervisor.log_observer = _log_observer(options, settings)
        if options.parent is not None:
            install_signal_handlers(reactor, supervisor)
        return supervisor
    store_options = {}
    if options["fsync"]:
        store_options["fsync"] = options["fsync"]
    spec = options["persistence"] or DEFAULT_STORE
    sys_interval = options["sys-interval"]
    service = make_broker_service(
        reactor, listen=options["listen"], store=spec, config=options.broker_config(),
        ready_file=options["ready-file"],
        sys_interval=option("sys-interval").default if sys_interval is None else sys_interval,
        store_options=store_options if not spec.startswith("memory") else None)
    service.log_settings = settings
    if options.parent is not None:
        # under twistd: our observer (format, level, field bound) instead of twistd's default
        service.log_observer = _log_observer(options, settings)
    if options["config"] and options.sources.get("log-level") != "command line":
        # only a config file's log level can change on SIGHUP
        service.add_reloader("log_level", _log_level_reloader(options, settings))
    for target in FEATURES:
        module_name, function_name = target.split(":")
        getattr(importlib.import_module(module_name), function_name)(service, options)
    if options.parent is not None:
        install_signal_handlers(reactor, service)
        # a broker process: what exists now lives as long as it (the store is
        # restored later, when the service starts, and stays collectable)
        freeze_startup_heap()
    return service


def freeze_startup_heap() -> bool:
    """Move every object alive now into CPython's permanent GC generation (``gc.freeze``).

    A full (generation 2) collection traverses every tracked object, and CPython runs one
    each time the number of long-lived objects has grown by a quarter -- six times during
    a storm of 10,000 connections, each then also walking the broker's modules, classes
    and configuration (about 70,000 objects: 30-50 ms per collection here).  Frozen, they
    are no longer traversed: the full collections of a 20,000-client storm took 0.7-0.8 s
    instead of 1.1-1.3 s, and each one pauses every client for that much less.  Called
    once, when the process has imported everything and before the store is restored, so
    what clients and the store create later stays collectable (frozen objects are still
    freed by reference counting; only a reference cycle among them would stay).
    Returns False where the collector has no ``freeze`` (PyPy: its collector is
    generational and incremental; nothing to do).
    """
    if not hasattr(gc, "freeze"):
        return False
    gc.collect()
    gc.freeze()
    return True
