"""``twistd mqttd``: command line and TOML configuration (layer L6).

The only module that touches the global reactor.  Every option can also be
given in the TOML file named by ``--config`` (same key, ``-`` or ``_``);
the command line wins over the file.
"""
from __future__ import annotations

import sys

from twisted.python import usage

from mqttd.broker import BrokerConfig
from mqttd.session import OverflowPolicy
from mqttd.shared import STRATEGIES as SHARED_STRATEGIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_STORE = "file:mqttd-data"

#: option name -> (BrokerConfig field, converter)
_CONFIG_OPTIONS = {
    "max-queued-messages": ("max_queued_messages", int),
    "max-queued-bytes": ("max_queued_bytes", int),
    "overflow-policy": ("overflow_policy", str),
    "max-inflight": ("max_inflight", int),
    "max-packet-size": ("max_packet_size", int),
    "connect-timeout": ("connect_timeout", float),
    "max-keepalive": ("max_keepalive", int),
    "max-session-expiry": ("max_session_expiry", int),
    "max-publisher-pause": ("max_publisher_pause", float),
    "shared-subscription-strategy": ("shared_subscription_strategy", str),
    "max-topic-alias": ("max_topic_alias", int),
    "max-inflight-incoming": ("max_inflight_incoming", int),
    "max-qos": ("max_qos", int),
    "response-information": ("response_information", str),
}


def _boolean(value) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0) from the command line or TOML."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the mqttd MQTT broker (MQTT 3.1, 3.1.1 and 5.0). "
                "Without --port/--listen it listens on tcp:1883; without "
                "--persistence it keeps durable state in ./mqttd-data.")

    optParameters = [
        ["port", "p", None, "TCP port to listen on (shorthand for --listen tcp:PORT).", int],
        ["config", "c", None, "TOML file with any of these options as keys."],
        ["persistence", None, None,
         f"Store: memory, file:PATH or dbm:PATH [default: {DEFAULT_STORE}]."],
        ["fsync", None, None,
         "When acknowledged writes reach the disk: always (default), "
         "interval:MS or never. See docs/storage.rst for the risk."],
        ["broker-id", None, None, "Name used in $SYS/<broker-id>/... [default: mqttd]."],
        ["ready-file", None, None,
         "Write a JSON file with pid and listening addresses once listening."],
        ["sys-interval", None, None, "Seconds between $SYS statistics (0: off) [10].", float],
        ["max-queued-messages", None, None, "Queue limit per session, messages [100000].", int],
        ["max-queued-bytes", None, None, "Queue limit per session, bytes [64 MiB].", int],
        ["overflow-policy", None, None,
         f"A full queue drops: {' or '.join(OverflowPolicy.ALL)} [drop-oldest]."],
        ["max-inflight", None, None, "Outbound QoS 1/2 window per client (v5: at most its Receive Maximum) [1000].", int],
        ["max-packet-size", None, None, "Largest packet accepted, bytes [16 MiB].", int],
        ["connect-timeout", None, None, "Seconds to wait for CONNECT [10].", float],
        ["max-keepalive", None, None, "Largest keepalive granted, seconds; 0 = any [0].", int],
        ["max-session-expiry", None, None, "Longest v5 session expiry granted, seconds.", int],
        ["max-publisher-pause", None, None,
         "Seconds a congested subscriber may hold publishers back [5].", float],
        ["log-level", None, None, "info or debug (debug logs every message) [info]."],
        ["shared-subscription-strategy", None, None,
         f"How a $share group picks the member for a message: "
         f"{', '.join(SHARED_STRATEGIES)} [round-robin]."],
        ["max-topic-alias", None, None,
         "v5 Topic Alias Maximum announced to clients; 0 = no inbound aliases [10].", int],
        ["max-inflight-incoming", None, None,
         "Unacknowledged inbound QoS 1/2 PUBLISHes per v5 client (the server's "
         "Receive Maximum; more gets DISCONNECT 0x93) [65535].", int],
        ["max-qos", None, None,
         "Highest QoS accepted in PUBLISH and wills and granted in SUBSCRIBE "
         "(mosquitto's maximum_qos) [2].", int],
        ["retain-available", None, None,
         "true or false: accept retained messages (mosquitto's retain_available) [true]."],
        ["response-information", None, None,
         "Prefix of the Response Information for v5 clients that request it "
         "(prefix + client id) [none]."],
    ]
    optFlags = [
        ["queue-qos0", None, "Queue QoS 0 messages for offline persistent sessions."],
        ["no-publisher-backpressure", None,
         "Drop for a congested subscriber instead of pausing its publishers."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """Listen on a Twisted server endpoint, e.g. tcp:1883:interface=127.0.0.1
        (repeatable)."""
        self["listen"].append(description)

    def postOptions(self):
        if self["config"]:
            try:
                with open(self["config"], "rb") as f:
                    file_options = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as error:
                raise usage.UsageError(f"cannot read {self['config']}: {error}")
            self._merge(file_options)
        if self["port"] is not None:
            self["listen"].append(f"tcp:{self['port']}")
        if not self["listen"]:
            self["listen"] = ["tcp:1883"]
        if self["log-level"] not in (None, "info", "debug"):
            raise usage.UsageError("--log-level must be info or debug")
        policy = self["overflow-policy"]
        if policy is not None and policy not in OverflowPolicy.ALL:
            raise usage.UsageError(f"--overflow-policy must be one of {OverflowPolicy.ALL}")
        strategy = self["shared-subscription-strategy"]
        if strategy is not None and strategy not in SHARED_STRATEGIES:
            raise usage.UsageError("--shared-subscription-strategy must be one of "
                                   + ", ".join(SHARED_STRATEGIES))
        limits = {"max-topic-alias": (0, 65535), "max-inflight-incoming": (1, 65535),
                  "max-qos": (0, 2)}
        for name, (low, high) in limits.items():
            value = self[name]
            if value is not None and not low <= int(value) <= high:
                raise usage.UsageError(f"--{name} must be in {low}..{high}, not {value}")
        if self["retain-available"] is not None:
            try:
                self["retain-available"] = _boolean(self["retain-available"])
            except ValueError as error:
                raise usage.UsageError(f"--retain-available: {error}")

    def _merge(self, file_options: dict) -> None:
        known = {name for name, *_ in self.optParameters} | {
            "queue-qos0", "no-publisher-backpressure", "listen"}
        for key, value in file_options.items():
            name = key.replace("_", "-")
            if name not in known:
                raise usage.UsageError(f"unknown key {key!r} in {self['config']}")
            if name == "listen":
                values = value if isinstance(value, list) else [value]
                if not self["listen"]:
                    self["listen"].extend(str(v) for v in values)
            elif name in ("queue-qos0", "no-publisher-backpressure"):
                self[name] = self[name] or bool(value)
            elif self.get(name) is None:
                self[name] = value

    def broker_config(self) -> BrokerConfig:
        kwargs = {}
        if self["broker-id"]:
            kwargs["broker_id"] = str(self["broker-id"])
        for name, (field, convert) in _CONFIG_OPTIONS.items():
            if self[name] is not None:
                kwargs[field] = convert(self[name])
        if self["queue-qos0"]:
            kwargs["queue_qos0"] = True
        if self["no-publisher-backpressure"]:
            kwargs["publisher_backpressure"] = False
        if self["retain-available"] is not None:
            kwargs["retain_available"] = bool(self["retain-available"])
        return BrokerConfig(**kwargs)


def makeService(options: Options):
    from twisted.internet import reactor

    from mqttd import debuglog
    from mqttd.service import make_broker_service

    debuglog.set_enabled(options["log-level"] == "debug")
    store_options = {}
    if options["fsync"]:
        store_options["fsync"] = options["fsync"]
    spec = options["persistence"] or DEFAULT_STORE
    sys_interval = options["sys-interval"]
    return make_broker_service(
        reactor, listen=options["listen"], store=spec, config=options.broker_config(),
        ready_file=options["ready-file"],
        sys_interval=10.0 if sys_interval is None else float(sys_interval),
        store_options=store_options if not spec.startswith("memory") else None)
